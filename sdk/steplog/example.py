"""The example training script `make run` runs against the local stack.

STEPLOG_URL=127.0.0.1:50051 python -m steplog.example
"""

from __future__ import annotations

import math
import random
import time

from steplog import Experiment


def train(run: object, steps: int, lr: float) -> None:
    from steplog.run import Run

    assert isinstance(run, Run)
    loss = 2.5
    for step in range(steps):
        loss = loss * (1 - lr) + random.uniform(-0.01, 0.01)
        run.log("loss", loss, step=step)
        run.log("lr", lr * 0.5 * (1 + math.cos(math.pi * step / steps)), step=step)
        if step % 100 == 0:
            run.log("accuracy", 1 - loss / 2.5, step=step)


def main() -> None:
    exp = Experiment("quickstart")
    exp.tag("source", "make run")
    started = time.perf_counter()
    with exp.start_logging(display_name="sweep", description="example sweep") as parent:
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

    print(f"\nexperiment {exp.name!r}: {len(list(exp.get_runs()))} top-level run(s)")
    details = parent.get_details()
    print(f"run {details['runId']} #{details['runNumber']} {details['status']}")
    print(f"  started {details['startTimeUtc']}, ended {details['endTimeUtc']}")
    print(f"  properties {details['properties']}")
    for child in parent.get_children():
        print(f"  child {child.display_name}: {child.get_status()}, tags {child.get_tags()}")
    for run_id, series in metrics.items():
        print(f"  metrics of {run_id}:")
        for name, value in sorted(series.items()):
            if isinstance(value, list):
                print(f"    {name}: {len(value)} points, last {value[-1]!r}")
            else:
                print(f"    {name}: {value!r}")
    print(f"logged and read back in {elapsed:.2f}s")


if __name__ == "__main__":
    main()
