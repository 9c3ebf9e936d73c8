"""Client overhead: the time `run.log()`, `run.log_row()` and `run.log_image()`
take on the training thread, with the service up and with it down.

    python -m bench.log_overhead [--calls 200000] [--rows 100000] [--images 5000]

Prints one line per call and state:

    LOG_OVERHEAD call=log service=up median_us=... p99_us=... max_us=... calls=...

Each call is timed with perf_counter_ns around it (the timer's own cost,
measured on an empty call, is subtracted), with the cyclic GC on, as in a
training loop. The run is made through the public API while the service is
up; "down" is the same run after the service process was stopped (the client
keeps reconnecting meanwhile; everything stays below the memory bound).
`call=reference` is the machine's floor in the same run: a plain function
doing a dict lookup and three array stores, timed the same way (on a loaded
machine its p99 is what preemptions and interrupts alone cost). Targets
(issue 13): log median <= 1 µs and p99 <= 5 µs, up and down; no call longer
than the block bound STEPLOG_MAX_BLOCK_S (0.5 s by default).
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import struct
import tempfile
import time
import zlib
from array import array
from collections.abc import Callable
from typing import Any

from bench.common import bench_stack, median, percentile, service


def _timer_cost(n: int = 100_000) -> float:
    clock = time.perf_counter_ns
    xs = []
    for _ in range(n):
        t = clock()
        xs.append(clock() - t)
    return median([x / 1000.0 for x in xs])


def png(seed: int, side: int = 16) -> bytes:
    """A valid, unique RGB PNG of side x side pixels (about 1 KiB)."""
    raw = b"".join(
        b"\x00" + bytes((x * 7 + y * 13 + seed) % 256 for x in range(side * 3)) for y in range(side)
    )
    raw = struct.pack(">I", seed) + raw[4:]

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(raw, 0))
        + chunk(b"IEND", b"")
    )


def _timed(calls: int, one: Callable[[int], None]) -> list[float]:
    clock = time.perf_counter_ns
    out = [0.0] * calls
    for i in range(calls):
        t = clock()
        one(i)
        out[i] = (clock() - t) / 1000.0
    return out


class Calls:
    """The three calls on one run; the step keeps growing across phases."""

    def __init__(self, run: Any, images: list[bytes]) -> None:
        self.run = run
        self.images = images
        self.names = [f"m{i}" for i in range(10)]
        self.step = 0
        self.row = 0
        self.image = 0

    def log(self, calls: int) -> list[float]:
        log, names, base = self.run.log, self.names, self.step

        def one(i: int) -> None:
            log(names[i % 10], 0.5, step=base + i)

        self.step += calls
        return _timed(calls, one)

    def log_row(self, calls: int) -> list[float]:
        log_row, base = self.run.log_row, self.row

        def one(i: int) -> None:
            log_row("table", epoch=base + i, loss=0.25, acc=0.5, lr=1e-3, tag="train")

        self.row += calls
        return _timed(calls, one)

    def reference(self, calls: int) -> list[float]:
        """The machine's floor, timed the same way: a plain function that
        does a dict lookup and three stores into preallocated arrays (what
        `log` does for a point, without the writer). Its p99 is what this
        machine's preemptions and interrupts alone cost at the moment."""
        size = 8 * calls
        cols = {
            name: (array("d", bytes(size)), array("d", bytes(size)), array("q", bytes(size)))
            for name in self.names
        }
        names, clock = self.names, time.time

        def one(i: int) -> None:
            v, t, s = cols[names[i % 10]]
            v[i] = 0.5
            t[i] = clock()
            s[i] = i

        return _timed(calls, one)

    def log_image(self, calls: int) -> list[float]:
        log_image, images, base = self.run.log_image, self.images, self.image

        def one(i: int) -> None:
            log_image("sample", images[(base + i) % len(images)], step=base + i)

        self.image += calls
        return _timed(calls, one)


def _line(call: str, state: str, xs: list[float], cost: float) -> str:
    us = [max(0.0, x - cost) for x in xs]
    return (
        f"LOG_OVERHEAD call={call} service={state} median_us={median(us):.2f}"
        f" p99_us={percentile(us, 0.99):.2f} max_us={max(us):.0f} calls={len(us)}"
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--calls", type=int, default=200_000, help="run.log calls per phase")
    p.add_argument("--rows", type=int, default=100_000, help="run.log_row calls per phase")
    p.add_argument("--images", type=int, default=5_000, help="run.log_image calls per phase")
    ns = p.parse_args()
    spool = tempfile.mkdtemp(prefix="steplog-bench-overhead-")
    # Registered before steplog is imported, so it runs after the writer's
    # own exit handler has written the undelivered rest there.
    atexit.register(shutil.rmtree, spool, True)
    # Undelivered data at exit (the "down" phase) goes to a scratch spool,
    # and exit does not wait long for a service that is gone.
    os.environ.update({"STEPLOG_SPOOL_DIR": spool, "STEPLOG_EXIT_TIMEOUT": "2"})
    from steplog import Experiment

    images = [png(i) for i in range(256)]
    cost = _timer_cost()
    lines = []
    with bench_stack() as (_s, info, db):
        with service(info, db) as svc:
            run = Experiment("overhead", url=svc.address).start_logging()
            calls = Calls(run, images)
            calls.log(20_000)  # warm up
            calls.log_row(2_000)
            calls.log_image(100)
            assert run.flush(120)
            up = {
                "reference": calls.reference(ns.calls),
                "log": calls.log(ns.calls),
                "log_row": calls.log_row(ns.rows),
                "log_image": calls.log_image(ns.images),
            }
            flushed = run.flush(300)
        # The service process is gone: the same run keeps logging.
        down = {
            "reference": calls.reference(ns.calls),
            "log": calls.log(ns.calls),
            "log_row": calls.log_row(ns.rows),
            "log_image": calls.log_image(ns.images),
        }
        stats = run.writer_stats()
    for call in ("reference", "log", "log_row", "log_image"):
        lines.append(_line(call, "up", up[call], cost))
    for call in ("reference", "log", "log_row", "log_image"):
        lines.append(_line(call, "down", down[call], cost))
    for line in lines:
        print(line, flush=True)
    print(
        f"LOG_OVERHEAD summary timer_cost_us={cost:.3f} up_flushed={flushed}"
        f" blocked_calls={stats.blocked_calls} dropped={stats.dropped}"
        f" cpus={os.cpu_count()} date={time.strftime('%Y-%m-%d')}",
        flush=True,
    )


if __name__ == "__main__":
    main()
