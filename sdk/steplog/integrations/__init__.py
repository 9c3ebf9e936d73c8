"""steplog inside the training frameworks.

- `steplog.integrations.lightning.SteplogLogger`: a PyTorch Lightning logger
  (`pip install steplog[lightning]`).
- `steplog.integrations.transformers.SteplogCallback`: a Hugging Face
  `TrainerCallback` (`pip install steplog[transformers]`).
- `steplog.integrations.system`: CPU, memory, disk, network and GPU metrics
  sampled in the background (`pip install steplog[system]`), switched on by
  `start_logging(..., log_system_metrics=True)` or the integrations' flag.

Each module imports its framework only when it is imported itself, so
`import steplog` never pulls in torch.
"""
