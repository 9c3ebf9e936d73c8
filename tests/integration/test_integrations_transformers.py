"""SteplogCallback with a real Hugging Face Trainer on the CPU against the
real service: a tiny BERT built from a config (nothing downloaded) on token
ids made here; `train()` then `evaluate()`; the run stores exactly what
`trainer.state.log_history` holds, at its steps; TrainingArguments become
properties; checkpoints run files; the run is completed once finished."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

from steplog import Experiment, Run
from steplog.integrations.transformers import SteplogCallback


def dataset(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 32, (n, 8), generator=gen)
    labels = (ids[:, 0] > 16).long()  # learnable: the first token decides
    return [
        {
            "input_ids": ids[i],
            "attention_mask": torch.ones(8, dtype=torch.long),
            "labels": labels[i],
        }
        for i in range(n)
    ]


def make_trainer(out: Path, callback: SteplogCallback, **overrides: Any) -> Trainer:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=32,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=2,
    )
    settings: dict[str, Any] = {
        "output_dir": str(out),
        "num_train_epochs": 2,
        "per_device_train_batch_size": 8,
        "per_device_eval_batch_size": 8,
        "logging_steps": 2,
        # Evaluations at steps 5 and 10 of 12 (6 an epoch) and at the end.
        "eval_strategy": "steps",
        "eval_steps": 5,
        "save_strategy": "no",
        "learning_rate": 1e-3,
        "report_to": [],
        "use_cpu": True,
        "disable_tqdm": True,
        "run_name": "tiny-bert",
        "seed": 0,
    }
    settings.update(overrides)
    return Trainer(
        model=BertForSequenceClassification(config),
        args=TrainingArguments(**settings),
        train_dataset=dataset(48, seed=1),
        eval_dataset=dataset(16, seed=2),
        callbacks=[callback],
    )


def expected_from(log_history: list[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """log_history as {name: [(step, value)]}: a series keeps one value per
    step, the first (`epoch` is in every entry; evaluate() after train()
    measures eval_runtime again at the last step)."""
    out: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for entry in log_history:
        step = entry["step"]
        for name, value in entry.items():
            if name == "step" or not isinstance(value, (int, float)):
                continue
            if not out[name] or out[name][-1][0] != step:
                out[name].append((step, float(value)))
    return dict(out)


def test_trainer_train_and_evaluate_equal_log_history(
    url: str, experiment_name: str, tmp_path: Path
) -> None:
    callback = SteplogCallback(experiment_name, url=url, tags={"suite": "it"})
    trainer = make_trainer(tmp_path, callback)
    trainer.train()
    final = trainer.evaluate()
    assert "eval_loss" in final
    run = callback.run
    assert run is not None
    assert run.get_status() == "Running"  # evaluate() may still follow train()
    callback.finish()
    run = Run.get(run.id, url=url)
    assert run.status == "Completed" and run.type == "transformers"
    assert run.display_name == "tiny-bert" and run.tags["suite"] == "it"

    expected = expected_from(trainer.state.log_history)
    assert {"loss", "eval_loss", "epoch", "learning_rate", "train_runtime"} <= set(expected)
    assert set(run.get_metrics()) == set(expected)
    for name, points in expected.items():
        series = run.get_series(name)
        assert list(zip(series["steps"], series["values"], strict=True)) == points, name
    # Two evaluations during training and the one after it.
    assert (
        len(expected["eval_loss"]) == 3 or expected["eval_loss"][-1][0] == trainer.state.global_step
    )

    props = run.get_properties()
    assert props["learning_rate"] == "0.001"
    assert props["num_train_epochs"] == "2"
    assert props["per_device_train_batch_size"] == "8"
    assert props["output_dir"] == str(tmp_path)
    callback.finish()  # twice is fine
    assert Run.get(run.id, url=url).status == "Completed"


def test_callback_attaches_to_steplog_run_id_and_uploads_checkpoints(
    url: str, experiment_name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    owner = Experiment(experiment_name, url=url).start_logging(display_name="outer")
    monkeypatch.setenv("STEPLOG_RUN_ID", owner.id)
    callback = SteplogCallback(experiment_name, url=url, log_checkpoints=True)
    trainer = make_trainer(
        tmp_path, callback, num_train_epochs=1, save_strategy="epoch", eval_strategy="no"
    )
    trainer.train()
    assert callback.run is not None and callback.run.id == owner.id
    callback.finish()
    assert owner.get_status() == "Running"  # the creator completes it
    step = trainer.state.global_step
    files = owner.get_file_names()
    assert f"checkpoints/checkpoint-{step}/model.safetensors" in files
    assert len(owner.get_series("loss")["steps"]) == len(
        [e for e in trainer.state.log_history if "loss" in e]
    )
    owner.complete()
