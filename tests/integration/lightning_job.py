"""A tiny Lightning training job for the integration tests: a linear model
on data made here, trained on the CPU with SteplogLogger and Lightning's own
CSVLogger side by side.

Imported by test_integrations_lightning.py, and run as a script for the DDP
tests (`strategy="ddp"` starts the other ranks by running this file again):

    python lightning_job.py <experiment> <out dir> <devices>

STEPLOG_URL names the service. Rank zero writes each run's id to
<out dir>/<all|zero>/run_id once its training is over.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from steplog.integrations.lightning import SteplogLogger

EPOCHS = 3
BATCH = 8
SAMPLES = 64  # 8 steps per epoch (per rank: 4 with two ranks)


class TinyModel(pl.LightningModule):
    def __init__(self, lr: float = 0.05, optimizer: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.layer = nn.Linear(4, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.layer(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        self.log("weight_norm", self.layer.weight.norm())
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.layer(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def data(seed: int) -> tuple[DataLoader[Any], DataLoader[Any]]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(SAMPLES, 4, generator=gen)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.1 * torch.randn(
        SAMPLES, 1, generator=gen
    )
    train = DataLoader(TensorDataset(x, y), batch_size=BATCH)
    val = DataLoader(TensorDataset(x[:16], y[:16]), batch_size=BATCH)
    return train, val


def train(
    logger: SteplogLogger,
    out: Path,
    *,
    devices: int = 1,
    strategy: str = "auto",
    epochs: int = EPOCHS,
    callbacks: list[Any] | None = None,
) -> tuple[pl.Trainer, CSVLogger]:
    pl.seed_everything(7, verbose=False)
    csv = CSVLogger(str(out), name="csv", version=0)
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        logger=[logger, csv],
        log_every_n_steps=2,
        callbacks=[ModelCheckpoint(dirpath=out / "ckpt", save_top_k=1, monitor="val_loss")]
        + (callbacks or []),
        default_root_dir=str(out),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    train_data, val_data = data(seed=3)
    model = TinyModel(lr=0.05, optimizer={"name": "sgd", "momentum": 0.0})
    trainer.fit(model, train_data, val_data)
    return trainer, csv


def main() -> None:
    """Both DDP cases in one launch (the ranks start once; importing torch
    and Lightning is most of the time): every rank logging, then rank zero
    only, each run's id in <out>/<mode>/run_id."""
    experiment, out, devices = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    for mode in ("all", "zero"):
        logger = SteplogLogger(experiment, log_all_ranks=mode == "all", run_name=f"ddp-{mode}")
        trainer, _ = train(logger, out / mode, devices=devices, strategy="ddp")
        if trainer.global_rank == 0:
            (out / mode / "run_id").write_text(logger.run_id)


if __name__ == "__main__":
    main()
