"""Client delivery across crashes and resumes, end to end: a training script
in a subprocess, the service as a real process, `steplog sync` as the command
a user runs, and SQL to count what is stored (each point exactly once)."""

from __future__ import annotations

import ast
import contextlib
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import pytest

from bench.chaos import Nginx
from steplog import Experiment
from steplog._writer import DeliveryWarning
from tests.sql import stored_points
from tests.support import ServiceProcess, free_port

NAMES = ("loss", "acc")


def expected(steps: range) -> list[tuple[str, int, float]]:
    return sorted((n, s, s * 0.5 + len(n)) for n in NAMES for s in steps)


def sync(spool: Path, url: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "steplog.cli", "sync", str(spool), "--url", url, *extra],
        capture_output=True,
        text=True,
        timeout=300,
    )


def client_env(run_id: str, spool: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "STEPLOG_RUN_ID": run_id,
            "STEPLOG_SPOOL_DIR": str(spool),
            "STEPLOG_FLUSH_INTERVAL": "0.2",
            "STEPLOG_MAX_BATCH_POINTS": "2000",
            "STEPLOG_HEARTBEAT_INTERVAL": "3600",
        }
    )
    env.update(extra)
    return env


LOG = (
    "def log(run, start, stop):\n"
    "    for step in range(start, stop):\n"
    f"        for name in {NAMES!r}:\n"
    "            run.log(name, step * 0.5 + len(name), step=step)\n"
)


def test_kill_9_of_a_spooling_client_then_sync_stores_every_point_once(
    service_env: dict[str, str], experiment_name: str, database_url: str, tmp_path: Path
) -> None:
    """on_full="spool": the batches in flight and those waiting are on disk;
    kill -9 of the client while the service is down loses none of them."""
    svc = ServiceProcess(service_env).start()
    spool = tmp_path / "spool"
    child: subprocess.Popen[str] | None = None
    try:
        run = Experiment(experiment_name, url=svc.address).start_logging()
        script = (
            "import sys, time\n"
            "from steplog import Run\n" + LOG + "run = Run.get_context()\n"
            "log(run, 0, 20000)\n"
            "print('half', flush=True)\n"
            "sys.stdin.readline()\n"  # the test kills the service meanwhile
            "log(run, 20000, 40000)\n"
            "time.sleep(1.5)\n"  # well past the flush interval: all of it is on disk
            "print('logged', flush=True)\n"
            "time.sleep(600)\n"
        )
        env = client_env(run.id, spool, STEPLOG_URL=svc.address, STEPLOG_ON_FULL="spool")
        child = subprocess.Popen(
            [sys.executable, "-c", script],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert child.stdin is not None and child.stdout is not None
        assert child.stdout.readline().strip() == "half"
        svc.kill()  # batches are in flight: their acks never come
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "logged"
        os.kill(child.pid, signal.SIGKILL)
        child.wait(30)
        svc = ServiceProcess(service_env, port=svc.port).start()
        stored_before = len(stored_points(database_url, run.id))
        assert stored_before < 2 * 40000  # the kill left points undelivered
        first = sync(spool, svc.address)
        assert first.returncode == 0, first.stdout + first.stderr
        assert stored_points(database_url, run.id) == expected(range(40000))
        second = sync(spool, svc.address)
        assert second.returncode == 0, second.stdout + second.stderr
        assert " 0 accepted" in second.stdout, second.stdout
        assert stored_points(database_url, run.id) == expected(range(40000))
    finally:
        if child is not None and child.poll() is None:
            child.kill()
            child.wait()
        svc.stop()


@pytest.mark.parametrize(
    ("first_host", "second_host"), [("node-b", "node-a"), ("node-a", "node-b")]
)
def test_a_run_resumed_on_another_host_keeps_every_earlier_point(
    url: str,
    experiment_name: str,
    database_url: str,
    tmp_path: Path,
    first_host: str,
    second_host: str,
) -> None:
    """Two processes on two "hosts" (the host part of the writer id), offline,
    one after the other on the same run; whichever way their ids sort, sync
    replays them in the order they logged."""
    run = Experiment(experiment_name, url=url).start_logging()
    spool = tmp_path / "spool"
    env = client_env(run.id, spool, STEPLOG_OFFLINE="true")
    env.pop("STEPLOG_URL", None)
    for host, start, stop, kill in ((first_host, 0, 3000, True), (second_host, 3000, 6000, False)):
        script = (
            "import os, signal, socket, time\n"
            f"socket.gethostname = lambda: {host!r}\n"
            "from steplog import Run\n" + LOG + "run = Run.get_context()\n"
            f"log(run, {start}, {stop})\n"
        )
        if kill:  # the first node dies: no close, no flush, kill -9 after the interval
            script += "time.sleep(1.0)\nos.kill(os.getpid(), signal.SIGKILL)\n"
        proc = subprocess.run([sys.executable, "-c", script], env=env, timeout=120)
        assert proc.returncode == (-signal.SIGKILL if kill else 0)
    files = sorted(p.name for p in spool.iterdir() if p.name.endswith(".spool.sqlite"))
    assert len(files) == 2 and files[0].startswith("node-a") and files[1].startswith("node-b")
    assert stored_points(database_url, run.id) == []
    for attempt in range(2):
        out = sync(spool, url)
        assert out.returncode == 0, out.stdout + out.stderr
        assert ("12000 accepted" if attempt == 0 else " 0 accepted") in out.stdout, out.stdout
        assert stored_points(database_url, run.id) == expected(range(6000))


def test_an_offline_run_completes_tags_and_syncs_in_order_without_the_network(
    url: str, experiment_name: str, database_url: str, tmp_path: Path
) -> None:
    """Leaving `with Run.get_context() as run:` offline makes no call (the
    address is a dead port): complete, tags and properties go to the spool
    and `steplog sync` applies them after the points, once."""
    run = Experiment(experiment_name, url=url).start_logging()
    spool = tmp_path / "spool"
    env = client_env(run.id, spool, STEPLOG_OFFLINE="true", STEPLOG_URL=f"127.0.0.1:{free_port()}")
    script = (
        "import time\n"
        "from steplog import Run\n" + LOG + "started = time.monotonic()\n"
        "with Run.get_context() as run:\n"
        "    log(run, 0, 1000)\n"
        "    run.tag('phase', 'offline')\n"
        "    run.add_properties({'dataset': 'v2'})\n"
        "print(run.get_status(), run.get_tags(), time.monotonic() - started)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    status, _, elapsed = out.stdout.strip().partition(" {")
    assert status == "Completed" and "'phase': 'offline'" in out.stdout, out.stdout
    assert float(elapsed.rsplit(" ", 1)[1]) < 10  # no 30 s stall on a call
    assert run.get_status() == "Running"  # nothing was sent
    for _ in range(2):
        synced = sync(spool, url)
        assert synced.returncode == 0, synced.stdout + synced.stderr
        assert "3 run operation(s) applied" in synced.stdout, synced.stdout
        assert stored_points(database_url, run.id) == expected(range(1000))
    assert run.get_status() == "Completed"
    assert run.get_tags()["phase"] == "offline"
    assert run.get_properties()["dataset"] == "v2"


def test_sync_into_a_run_that_cannot_take_the_data_exits_non_zero_and_says_why(
    url: str, experiment_name: str, database_url: str, tmp_path: Path
) -> None:
    run = Experiment(experiment_name, url=url).start_logging()
    spool = tmp_path / "spool"
    env = client_env(run.id, spool, STEPLOG_OFFLINE="true")
    env.pop("STEPLOG_URL", None)
    script = (
        "from steplog import Run\n" + LOG + "run = Run.get_context()\n"
        "log(run, 0, 500)\n"
        "assert run.flush(30)\n"
    )
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=120)
    run.complete()  # meanwhile, the run was completed
    out = sync(spool, url)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "RUN_NOT_ACTIVE: 1000" in out.stdout, out.stdout
    assert "1000 point(s) rejected" in out.stderr, out.stderr
    assert stored_points(database_url, run.id) == []


class StreamCutter:
    """A TCP proxy between nginx and the service that loses streams as a
    dying replica does. The first `cuts` connections that carry more than
    `after_bytes` toward the service (an Ingest stream with a batch, not a
    health check or a unary call) are killed right after the service's
    response headers went through, before its acknowledgement: nginx has
    answered the client's stream already, so it resets it (RST_STREAM), and
    gRPC reports INTERNAL "Stream removed". While `refuse` is set, every
    new connection is reset at once (nginx answers HTTP 502)."""

    def __init__(self, backend: str, *, cuts: int, after_bytes: int) -> None:
        self.backend = backend
        self.cuts_left = cuts
        self.after_bytes = after_bytes
        self.cut = 0
        self.refuse = False
        self.refused = 0
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._sock.getsockname()[1]}"
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            if self.refuse:
                self.refused += 1
                _reset(client)
                continue
            host, _, port = self.backend.rpartition(":")
            upstream = socket.create_connection((host, int(port)), timeout=30)
            upstream.settimeout(None)
            sent = [0]
            threading.Thread(target=self._up, args=(client, upstream, sent), daemon=True).start()
            threading.Thread(target=self._down, args=(upstream, client, sent), daemon=True).start()

    def _up(self, client: socket.socket, upstream: socket.socket, sent: list[int]) -> None:
        with contextlib.suppress(OSError):
            while data := client.recv(65536):
                sent[0] += len(data)
                upstream.sendall(data)
        _reset(client, upstream)

    def _down(self, upstream: socket.socket, client: socket.socket, sent: list[int]) -> None:
        """Forward the service's HTTP/2 frames one by one (9-byte header:
        length, type, flags, stream id), to cut after a HEADERS frame."""
        buffer = b""
        with contextlib.suppress(OSError):
            while data := upstream.recv(65536):
                buffer += data
                while len(buffer) >= 9:
                    size = 9 + int.from_bytes(buffer[:3], "big")
                    if len(buffer) < size:
                        break
                    frame, buffer = buffer[:size], buffer[size:]
                    client.sendall(frame)
                    kind, stream = frame[3], int.from_bytes(frame[5:9], "big") & 0x7FFFFFFF
                    if kind == 0x1 and stream and sent[0] > self.after_bytes:
                        with self._lock:
                            cut = self.cuts_left > 0
                            if cut:
                                self.cuts_left -= 1
                                self.cut += 1
                        if cut:
                            _reset(client, upstream)
                            return
        _reset(client, upstream)

    def close(self) -> None:
        self._sock.close()


def _reset(*socks: socket.socket) -> None:
    for s in socks:
        with contextlib.suppress(OSError):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.shutdown(socket.SHUT_RDWR)
        s.close()


def test_streams_a_load_balancer_resets_lose_nothing_and_complete_rides_out_its_502s(
    url: str, experiment_name: str, database_url: str, tmp_path: Path, monkeypatch: Any
) -> None:
    """The client behind nginx `grpc_pass` (as in bench/chaos.py kill9_lb):
    the same batch's stream is reset five times in a row after the service
    committed it and before its acknowledgement reached the client (a
    stream-level loss, not a refusal: resent until acknowledged, stored
    once); then, while `complete()` is called, nginx answers 502 for 2 s
    (no replica): the call is retried within its timeout and succeeds."""
    spool = tmp_path / "spool"
    monkeypatch.setenv("STEPLOG_SPOOL_DIR", str(spool))
    monkeypatch.setenv("STEPLOG_MAX_BATCH_POINTS", "2000")
    monkeypatch.setenv("STEPLOG_BACKOFF_MAX", "0.5")
    monkeypatch.setenv("STEPLOG_HEARTBEAT_INTERVAL", "3600")
    cutter = StreamCutter(url, cuts=5, after_bytes=8192)
    lb = Nginx(tmp_path / "nginx", [cutter.address])
    try:
        lb.start()
        run = Experiment(experiment_name, url=lb.address).start_logging()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for step in range(6000):
                for name in NAMES:
                    run.log(name, step * 0.5 + len(name), step=step)
            flushed = run.flush(120)
        delivery = [str(c.message) for c in caught if issubclass(c.category, DeliveryWarning)]
        assert flushed and not delivery, delivery
        stats = run.writer_stats()
        assert cutter.cut == 5, stats
        assert stats.refused == stats.dropped == 0 and stats.reconnects >= 5, stats
        assert stored_points(database_url, run.id) == expected(range(6000))  # each once

        cutter.refuse = True
        threading.Timer(2.0, setattr, (cutter, "refuse", False)).start()
        started = time.monotonic()
        run.complete()
        assert time.monotonic() - started >= 1.5  # it waited the outage out
        assert cutter.refused >= 1
        assert run.get_status() == "Completed"
        assert not list(spool.glob("*.spool.sqlite"))  # nothing was set aside
    finally:
        lb.stop()
        cutter.close()


THREADS_SCRIPT = """
import collections, threading, sys
from steplog import Experiment
sys.path.insert(0, {root!r})
from tests import imagegen

run = Experiment({experiment!r}, url={url!r}).start_logging()
for step in range(300):
    run.log("loss", 1.0 / (step + 1), step=step)
    run.log_row("rows", step=step, loss=0.5, tag=f"t{{step}}")
    if step % 50 == 0:
        run.log_table("tbl", {{"x": [1, 2, 3], "y": [0.5, 0.25, 0.125]}})
        run.log_image("frames", imagegen.png(8, 8, seed=step), step=step)
assert run.flush(60), run.writer_stats
names = collections.Counter(t.name for t in threading.enumerate() if t.name.startswith("steplog"))
print(dict(names))
run.complete()
"""


@pytest.mark.parametrize("stream_io", ["threads", "loop"])
def test_one_background_thread_sends_every_kind(
    url: str, experiment_name: str, stream_io: str
) -> None:
    """log, log_row, log_table and log_image (the image stream included) are
    all sent by ONE steplog-writer thread; beside it only the heartbeat and
    the streams' I/O exist, no row timer, no second writer. With
    STEPLOG_STREAM_IO=threads that I/O is one gRPC reader per open stream
    (receiving acknowledgements: the sync gRPC API has no non-blocking
    receive); with "loop" it is the one steplog-io thread, whatever the
    number of streams, and every point is acknowledged through it."""
    root = str(Path(__file__).resolve().parents[2])
    script = THREADS_SCRIPT.format(root=root, experiment=experiment_name, url=url)
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "STEPLOG_HEARTBEAT_INTERVAL": "3600", "STEPLOG_STREAM_IO": stream_io},
    )
    assert done.returncode == 0, done.stderr
    names: dict[str, int] = ast.literal_eval(done.stdout.strip().splitlines()[-1])
    assert names.pop("steplog-writer") == 1
    assert names.pop("steplog-heartbeat") == 1
    if stream_io == "threads":
        assert 1 <= names.pop("steplog-ingest-reader", 0) <= 2  # the main and the image stream
    else:
        assert names.pop("steplog-io") == 1
    assert names == {}
