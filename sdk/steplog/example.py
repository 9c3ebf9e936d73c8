"""The example training script `make run` runs against the local stack.

STEPLOG_URL=127.0.0.1:50051 python -m steplog.example
"""

from __future__ import annotations

import json
import math
import random
import struct
import time
import zlib

import numpy as np

from steplog import Experiment
from steplog.evaluation import confusion_matrix


def loss_curve_png(values: list[float], width: int = 200, height: int = 80) -> bytes:
    """A tiny grayscale PNG of a curve, built with zlib (no plotting library)."""
    lo, hi = min(values), max(values)
    pixels = [[255] * width for _ in range(height)]
    for x in range(width):
        v = values[int(x * (len(values) - 1) / (width - 1))]
        y = int((hi - v) / ((hi - lo) or 1.0) * (height - 1))
        pixels[y][x] = 0
    raw = b"".join(b"\x00" + bytes(row) for row in pixels)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def train(run: object, steps: int, lr: float) -> None:
    from steplog.run import Run

    assert isinstance(run, Run)
    loss = 2.5
    losses = []
    for step in range(steps):
        loss = loss * (1 - lr) + random.uniform(-0.01, 0.01)
        losses.append(loss)
        run.log("loss", loss, step=step)
        run.log("lr", lr * 0.5 * (1 + math.cos(math.pi * step / steps)), step=step)
        if step % 100 == 0:
            run.log("accuracy", 1 - loss / 2.5, step=step)
            run.log_row("eval", step=step, loss=loss, accuracy=1 - loss / 2.5)
            # A distribution per step: weights that narrow as training goes on.
            weights = np.random.default_rng(step).normal(0, 1 / (1 + lr * step), 1000)
            run.log_histogram("weights", weights, step=step)
    # An evaluation: a confusion matrix computed from labels and predictions.
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 3, 500)
    y_pred = np.where(rng.random(500) < 0.8, y_true, rng.integers(0, 3, 500))
    run.log_confusion_matrix("confusion", confusion_matrix(y_true, y_pred, labels=[0, 1, 2]))
    run.log_image("loss_curve", loss_curve_png(losses), step=steps)
    run.upload_file("outputs/config.json", json.dumps({"lr": lr, "steps": steps}).encode())


def main() -> None:
    exp = Experiment("quickstart")
    exp.tag("source", "make run")
    started = time.perf_counter()
    # log_system_metrics: CPU, memory, disk and network (and GPUs) as system/ series
    # (psutil, from `steplog[system]`; without it, one log line and no series).
    with exp.start_logging(
        display_name="sweep", description="example sweep", log_system_metrics=True
    ) as parent:
        parent.add_properties({"dataset": "synthetic", "steps": "1000"})
        for lr in (0.01, 0.003):
            with parent.child_run(name=f"lr={lr}") as child:
                child.tag("lr", str(lr))
                train(child, 1000, lr)
        parent.log("best_lr", 0.01)
        parent.log_list("lrs_tried", [0.01, 0.003])
        parent.flush()
        metrics = parent.get_metrics(recursive=True)
    elapsed = time.perf_counter() - started
    # The sampler's last sample is taken when the run completes: read them now.
    system = sorted(k for k in parent.get_metrics() if k.startswith("system/"))

    print(f"\nexperiment {exp.name!r}: {len(list(exp.get_runs()))} top-level run(s)")
    details = parent.get_details()
    print(f"run {details['runId']} #{details['runNumber']} {details['status']}")
    print(f"  started {details['startTimeUtc']}, ended {details['endTimeUtc']}")
    print(f"  properties {details['properties']}")
    print(f"  system metrics: {', '.join(system) or 'none (psutil is not installed)'}")
    for child in parent.get_children():
        print(f"  child {child.display_name}: {child.get_status()}, tags {child.get_tags()}")
        print(f"    files: {child.get_file_names()}")
    for run_id, series in metrics.items():
        print(f"  metrics of {run_id}:")
        for name, value in sorted(series.items()):
            first = value[0] if isinstance(value, list) and value else value
            if isinstance(first, dict) and "edges" in first:
                hists = value if isinstance(value, list) else [value]
                print(f"    {name}: {len(hists)} histograms of {len(first['counts'])} bins")
            elif isinstance(value, dict) and "schema_type" in value:
                print(f"    {name}: {value['schema_type']} {value['data'].get('matrix')}")
            elif isinstance(value, dict) and "sha256" in value:
                print(f"    {name}: {value['content_type']} {value['width']}x{value['height']}")
            elif isinstance(value, dict):
                rows = len(next(iter(value.values())))
                print(f"    {name}: table with columns {sorted(value)}, {rows} rows")
            elif isinstance(value, list):
                print(f"    {name}: {len(value)} points, last {value[-1]!r}")
            else:
                print(f"    {name}: {value!r}")
    print(f"logged and read back in {elapsed:.2f}s")


if __name__ == "__main__":
    main()
