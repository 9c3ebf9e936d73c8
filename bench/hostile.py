"""Hostile messages for a running steplog service, and the checks of what
comes back: the generator and driver shared by tests/integration/test_fuzz.py
(10,000 messages) and bench/fuzz.py (100,000 and more).

It talks to the service from outside, like a client written from the .proto
files: raw bytes on every RPC method (`channel.unary_unary(method)` with no
serializers), and hand-built messages: mismatched and huge counts, huge and
unicode names, NUL, invalid UTF-8 (a valid message's bytes with a string's
bytes replaced), steps at the int64 limits, sequence gaps, other workspaces'
writers and runs, truncated uploads, wrong hashes, path traversal, and valid
points mixed into hostile batches.

What is checked, for every call:
- the service process stays alive (a death is a crash) and every call ends
  within its deadline (DEADLINE_EXCEEDED is a hang);
- a failed call has a status other than UNKNOWN or INTERNAL, with a message;
- every rejection in an acknowledgement has a reason (and rejected points a
  message), and the counts by reason add up to the rejected count;
- a health check answers SERVING within `health_bound_s` after every
  `health_every` messages, while the load goes on;
- the service's RSS (VmRSS of the process and its children) is sampled;
- the valid points of every mixed batch are remembered, so the caller can
  check by SQL that all of them are stored, each once (`missing_and_doubled`).

Everything comes from one seed: case i uses random.Random(f"{seed}:{i}"), so a
finding names the case that reproduces it whatever the thread schedule.
Only the standard library, grpc, asyncpg and the generated steplog.v1 modules
are used (no tests.*, so bench/ can import it).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import random
import re
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

from steplog.v1 import artifact_service_pb2 as ap
from steplog.v1 import common_pb2, data_pb2
from steplog.v1 import experiment_service_pb2 as ep
from steplog.v1 import ingest_service_pb2 as ip
from steplog.v1 import query_service_pb2 as qp
from steplog.v1 import run_service_pb2 as rp

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
UINT64_MAX = 2**64 - 1
INT32_MAX = 2**31 - 1
MiB = 1024 * 1024

# Every RPC of the API: (full method path, client streaming, server streaming,
# request class, response class).
_MODULES = (ip, rp, ep, qp, ap)


@dataclass(frozen=True)
class Method:
    path: str
    client_streaming: bool
    server_streaming: bool
    request: type[Message]
    response: type[Message]


def _methods() -> list[Method]:
    out = []
    for mod in _MODULES:
        for service in mod.DESCRIPTOR.services_by_name.values():
            for m in service.methods:
                req = getattr(mod, m.input_type.name)
                resp = getattr(mod, m.output_type.name)
                out.append(
                    Method(
                        f"/{service.full_name}/{m.name}",
                        m.client_streaming,
                        m.server_streaming,
                        req,
                        resp,
                    )
                )
    return out


METHODS = _methods()
BY_NAME = {m.path.rsplit("/", 1)[1]: m for m in METHODS}

# What hostile_series puts into a batch (repeats weigh more).
SERIES_KINDS: tuple[str, ...] = (
    "lengths",
    "lengths",
    "int64",
    "negative",
    "name",
    "name",
    "label",
    "description",
    "text",
    "unknown_run",
    "foreign_run",
    "completed_run",
    "nul_run",
    "empty",
    "table_rows",
    "table_columns",
    "table_mismatch",
    "image",
    "evaluation",
    "times",
    "many_labels",
    "text_and_values",
)

# Statuses a call may end with only for a reason that is not the client's.
FORBIDDEN_CODES = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
FOREIGN_WORKSPACE = "fuzz-other"


@dataclass
class Finding:
    case: int
    kind: str
    method: str
    problem: str

    def __str__(self) -> str:
        return f"case {self.case} [{self.kind}] {self.method}: {self.problem}"


@dataclass
class Report:
    messages: int = 0
    calls: int = 0
    cases: int = 0
    crashes: int = 0
    hangs: int = 0
    health_checks: int = 0
    max_health_s: float = 0.0
    max_rss_mb: float = 0.0
    valid_points: int = 0
    elapsed_s: float = 0.0
    codes: Counter[str] = field(default_factory=Counter)
    kinds: Counter[str] = field(default_factory=Counter)
    kind_seconds: Counter[str] = field(default_factory=Counter)
    findings: list[Finding] = field(default_factory=list)

    def summary(self, limit: int = 40) -> str:
        by_problem: Counter[str] = Counter(
            f"[{f.kind}] {f.method.rsplit('/', 1)[-1]}: {_shape(f.problem)[:160]}"
            for f in self.findings
        )
        lines = [
            f"messages={self.messages} calls={self.calls} cases={self.cases}"
            f" crashes={self.crashes} hangs={self.hangs} findings={len(self.findings)}"
            f" max_rss_mb={self.max_rss_mb:.0f} max_health_s={self.max_health_s:.3f}"
            f" elapsed_s={self.elapsed_s:.1f}",
            "codes: " + ", ".join(f"{k}={v}" for k, v in self.codes.most_common()),
            "cases (seconds): "
            + ", ".join(
                f"{k}={n} ({self.kind_seconds[k]:.0f}s)" for k, n in self.kinds.most_common()
            ),
        ]
        lines += [f"  {n}x {p}" for p, n in by_problem.most_common(limit)]
        firsts: dict[str, Finding] = {}
        for f in self.findings:
            firsts.setdefault(f"{f.kind}|{f.method}|{_shape(f.problem)[:160]}", f)
        lines += ["first case of each:"] + [f"  {f}"[:300] for f in list(firsts.values())[:limit]]
        return "\n".join(lines)


def _shape(problem: str) -> str:
    """A finding without its numbers, so findings of one kind group together."""
    return re.sub(r"[0-9]+", "N", problem)


def rss_mb(pid: int, children: bool = True) -> float:
    """VmRSS of a process and (unless children=False) all its descendants, in MiB (0 when gone)."""
    total_kb = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kb += int(line.split()[1])
            if not children:
                break
            for task in Path(f"/proc/{p}/task").iterdir():
                children = (task / "children").read_text().split()
                todo.extend(int(c) for c in children)
        except (OSError, ValueError):
            continue
    return total_kb / 1024


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


# ---------------------------------------------------------------- strings


def _unicode(rng: random.Random, n: int) -> str:
    pools = [
        "ÄÖÜßéèçñ",
        "你好世界训练损失",
        "مرحبا\u200f\u200e",
        "🔥💥🚀👩\u200d💻",
        "e\u0301a\u0300\u0308",  # combining marks
        "\ufeff\u2028\u2029",  # BOM, line and paragraph separators
        "\U0010fffd\U000e0001",
    ]
    pool = rng.choice(pools)
    return "".join(rng.choice(pool) for _ in range(n))


def _control(rng: random.Random) -> str:
    return rng.choice(["\x00", "\x01", "\x07", "\x1b", "\x7f", "\n", "\r", "\t", "\x9b"])


def hostile_string(rng: random.Random, kind: str = "") -> str:
    """A string a careful service must not trust."""
    kind = kind or rng.choice(
        ["nul", "control", "huge", "unicode", "empty", "traversal", "sql", "long", "spaces"]
    )
    if kind == "nul":
        base = rng.choice(["loss", "a", "run", "x" * 20])
        i = rng.randrange(len(base) + 1)
        return base[:i] + "\x00" + base[i:]
    if kind == "control":
        return "loss" + _control(rng) + "x"
    if kind == "huge":
        n = rng.choice([256, 1024, 4097, 65_536, 65_536, 1 * MiB])
        return rng.choice("abxyz") * n
    if kind == "unicode":
        return _unicode(rng, rng.randint(1, 40))
    if kind == "empty":
        return ""
    if kind == "traversal":
        return rng.choice(["../../etc/passwd", "/etc/passwd", "a/../../b", "..", ".", "a\\..\\b"])
    if kind == "sql":
        return rng.choice(["'; DROP TABLE runs; --", "%s%s%n", "$1", "\\x00", "' OR 1=1 --"])
    if kind == "long":
        return "n" * rng.choice([255, 256, 300, 4096])
    return rng.choice([" ", "  loss", "loss ", "\u00a0"])


# ----------------------------------------------------------- wire helpers


def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def invalid_utf8(msg: Message, marker: str) -> bytes:
    """msg's bytes with every occurrence of `marker` (ASCII, set in one of its
    string fields) replaced by as many bytes that are not UTF-8: the lengths on
    the wire stay right, only the text is broken."""
    raw = msg.SerializeToString()
    m = marker.encode()
    assert m in raw, "the marker must be in a string field"
    bad = (b"\xff\xfe\xc0\x80\xed\xa0\x80\xf8" * (len(m) // 8 + 1))[: len(m)]
    return raw.replace(m, bad)


def _mutate(rng: random.Random, raw: bytes) -> bytes:
    """Random damage to a serialized message: flips, cuts, inserts, huge lengths."""
    b = bytearray(raw)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(5)
        if not b:
            b += os.urandom(4)
        pos = rng.randrange(len(b))
        if op == 0:
            b[pos] ^= 1 << rng.randrange(8)
        elif op == 1:
            del b[pos:]
        elif op == 2:
            b[pos:pos] = rng.randbytes(rng.randint(1, 16))
        elif op == 3:  # a length-delimited field claiming a huge length
            b[pos:pos] = bytes([rng.choice([0x0A, 0x12, 0x1A, 0x22])]) + _varint(
                rng.choice([2**31 - 1, 2**32, 2**62, 1 << 40])
            )
        else:
            b[pos] = 0xFF
    return bytes(b)


# --------------------------------------------------------------- fuzzer


@dataclass
class Context:
    workspace: str
    valid_runs: list[str]
    victim_runs: list[str]  # hostile metadata calls (rewind, status) go here
    file_runs: list[str]  # the artifact cases' runs: never finished by a hostile call
    completed_run: str
    foreign_run: str  # a run of FOREIGN_WORKSPACE
    experiment: str


class _Case:
    """One case: a few calls, with their checks."""

    def __init__(self, fuzzer: Fuzzer, index: int, kind: str) -> None:
        self.f = fuzzer
        self.index = index
        self.kind = kind
        self.rng = random.Random(f"{fuzzer.seed}:{index}")
        self.ctx = fuzzer.ctx
        self.messages = 0
        self.calls = 0
        self.findings: list[Finding] = []
        self.codes: Counter[str] = Counter()
        self.valid: list[tuple[str, str, int, float]] = []
        self.hang = 0
        self.last_error = ""

    # -- reporting
    def finding(self, method: str, problem: str) -> None:
        self.findings.append(Finding(self.index, self.kind, method, problem))

    def _error(self, method: str, err: grpc.RpcError, expect: Iterable[grpc.StatusCode]) -> None:
        code = err.code() if isinstance(err, grpc.Call) else None
        details = (err.details() if isinstance(err, grpc.Call) else str(err)) or ""
        self.codes[code.name if code else "NONE"] += 1
        self.last_error = f"{code.name if code else code}: {details[:160]!r}"
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            self.hang += 1
            self.finding(method, f"no answer within {self.f.call_timeout}s (hang)")
            return
        if code == grpc.StatusCode.UNAVAILABLE and not _alive(self.f.pid or 0) and self.f.pid:
            self.finding(method, f"UNAVAILABLE and the service process is gone: {details[:200]}")
            return
        if code in FORBIDDEN_CODES:
            self.finding(method, f"{code.name}: {details[:300]!r}")
        elif not details.strip():
            self.finding(method, f"{code.name if code else code} without a message")
        expect = set(expect)
        if expect and code not in expect and code not in FORBIDDEN_CODES:
            self.finding(
                method,
                f"expected {'/'.join(sorted(c.name for c in expect))},"
                f" got {code.name if code else code}: {details[:200]!r}",
            )

    def _check_result(self, method: str, result: ip.BatchResult) -> None:
        total = 0
        for c in result.reject_counts:
            total += c.count
            if c.reason == ip.REJECT_REASON_UNSPECIFIED:
                self.finding(method, f"a reject count without a reason ({c.count} points)")
        if total != result.rejected:
            self.finding(method, f"reject counts add up to {total}, rejected={result.rejected}")
        for p in result.rejected_points:
            if p.reason == ip.REJECT_REASON_UNSPECIFIED or not p.message.strip():
                self.finding(method, f"a rejected point without a reason or message: {p}"[:300])
        if result.rejected and not result.reject_counts:
            self.finding(method, f"{result.rejected} rejected points without any reason")

    def _check_reply(self, method: str, reply: Message) -> None:
        if isinstance(reply, ip.WriteResponse | ip.IngestResponse):
            self._check_result(method, reply.result)

    # -- calls
    def unary(
        self,
        name: str,
        request: Message | bytes,
        expect: Iterable[grpc.StatusCode] = (),
        ok_allowed: bool = True,
        channel: grpc.Channel | None = None,
    ) -> Message | None:
        m = BY_NAME[name]
        channel = channel or self.f.channel
        raw = request if isinstance(request, bytes) else request.SerializeToString()
        self._check_own_size(m.path, len(raw))
        self.messages += 1
        self.calls += 1
        try:
            if m.server_streaming:
                call = channel.unary_stream(m.path)
                replies = [m.response.FromString(r) for r in call(raw, timeout=self.f.call_timeout)]
                reply = replies[0] if replies else m.response()
            else:
                out = channel.unary_unary(m.path)(raw, timeout=self.f.call_timeout)
                reply = m.response.FromString(out)
                self._check_size(m.path, len(raw), len(out))
        except grpc.RpcError as err:
            self._error(m.path, err, expect)
            return None
        self.codes["OK"] += 1
        if not ok_allowed:
            self.finding(m.path, f"accepted a request it must refuse ({self._what(raw)})")
        self._check_reply(m.path, reply)
        return reply

    def stream(
        self,
        name: str,
        requests: list[Message | bytes],
        expect: Iterable[grpc.StatusCode] = (),
        ok_allowed: bool = True,
    ) -> list[Message] | None:
        m = BY_NAME[name]
        raws = [r if isinstance(r, bytes) else r.SerializeToString() for r in requests]
        for r in raws:
            self._check_own_size(m.path, len(r))
        self.messages += len(raws)
        self.calls += 1
        replies: list[Message] = []
        try:
            if m.server_streaming:
                call = self.f.channel.stream_stream(m.path)
                for r in call(iter(raws), timeout=self.f.call_timeout):
                    replies.append(m.response.FromString(r))
            else:
                out = self.f.channel.stream_unary(m.path)(iter(raws), timeout=self.f.call_timeout)
                replies.append(m.response.FromString(out))
        except grpc.RpcError as err:
            for r in replies:
                self._check_reply(m.path, r)
            self._error(m.path, err, expect)
            return None
        self.codes["OK"] += 1
        if not ok_allowed:
            self.finding(m.path, f"accepted a request it must refuse ({self._what(raws[0])})")
        for r in replies:
            self._check_reply(m.path, r)
        return replies

    @staticmethod
    def _check_own_size(method: str, size: int) -> None:
        # The generator keeps every message near the service's 64 MiB limit
        # at most: a bug here would be the fuzzer's, and could exhaust memory.
        if size > 80 * MiB:
            raise AssertionError(f"the fuzzer built a {size}-byte request for {method}")

    def _check_size(self, method: str, sent: int, got: int) -> None:
        """An acknowledgement is bounded: never much larger than the batch it answers."""
        if method.endswith(("/Write", "/Ingest")) and got > 2 * sent + 64 * 1024:
            self.finding(method, f"an acknowledgement of {got} bytes for a request of {sent} bytes")

    @staticmethod
    def _what(raw: bytes) -> str:
        return repr(raw[:120])

    # -- building blocks
    def writer(self) -> str:
        return f"fz-{self.f.seed}-{self.index}-{self.rng.randrange(1 << 30):x}"

    def valid_series(
        self, run_id: str, n_points: int | None = None, unstepped: bool | None = None
    ) -> ip.RunSeries:
        """A new series of valid points, remembered as expected in the database.
        A third are unstepped: the service numbers them 0, 1, ... in commit
        order, so a batch committed twice shows as extra rows (a stepped
        repeat would be an exact duplicate, not stored)."""
        j = len(self.valid)
        name = f"valid.{self.f.seed}.{self.index}.{j}"
        n = n_points or self.rng.randint(1, 20)
        if unstepped is None:
            unstepped = self.rng.random() < 1 / 3
        steps = list(range(n))
        values = [float(self.index * 1000 + j + s / 64) for s in steps]
        for s, v in zip(steps, values, strict=True):
            self.valid.append((run_id, name, s, v))
        columns = data_pb2.ScalarColumns(steps=[] if unstepped else steps, values=values)
        return ip.RunSeries(run_id=run_id, series=data_pb2.SeriesData(name=name, scalars=columns))

    def forget_valid(self, upto: int) -> None:
        """The valid points of a whole batch the service refused are not expected."""
        del self.valid[upto:]

    def hostile_series(self) -> ip.RunSeries:
        """A series with something wrong in it (or merely unusual)."""
        rng = self.rng
        ctx = self.ctx
        run_id = rng.choice(ctx.victim_runs)
        name = f"h.{self.index}.{rng.randrange(1000)}"
        what = rng.choice(self.f.series_kinds)
        sd = data_pb2.SeriesData(name=name)
        if what == "lengths":
            n = rng.randint(0, 50)
            sd.scalars.steps.extend(range(n))
            sd.scalars.values.extend([1.0] * rng.choice([0, max(0, n - 1), n + 1, n * 3 + 1]))
            if rng.random() < 0.5:
                sd.scalars.times.extend([time.time()] * rng.randint(0, 2 * n + 1))
        elif what == "int64":
            sd.scalars.steps.extend(
                rng.sample([INT64_MAX, INT64_MAX - 1, INT64_MIN, 0, 1, INT64_MIN + 1], 3)
            )
            sd.scalars.values.extend([1.0, 2.0, 3.0])
        elif what == "negative":
            sd.scalars.steps.extend([-1, -(2**40), 5])
            sd.scalars.values.extend([1.0, 2.0, 3.0])
        elif what == "name":
            sd.name = hostile_string(rng)
            sd.scalars.values.append(1.0)
        elif what == "label":
            key = rng.choice([hostile_string(rng), "rank"])
            sd.labels[key] = hostile_string(rng)
            sd.scalars.values.append(1.0)
        elif what == "description":
            sd.description = hostile_string(rng, rng.choice(["nul", "control", "huge"]))
            sd.scalars.values.append(1.0)
        elif what == "text":
            sd.scalars.text_values.append(hostile_string(rng))
        elif what == "unknown_run":
            run_id = f"no-such-run-{rng.randrange(1 << 30)}"
            sd.scalars.values.append(1.0)
        elif what == "foreign_run":
            run_id = ctx.foreign_run
            sd.scalars.values.append(1.0)
        elif what == "completed_run":
            run_id = ctx.completed_run
            sd.scalars.values.append(1.0)
        elif what == "nul_run":
            run_id = rng.choice(ctx.victim_runs) + rng.choice(["\x00", "\x00x", "\n"])
            sd.scalars.values.append(1.0)
        elif what == "empty":
            pass
        elif what == "table_rows":
            sd.table.row_count = rng.choice([INT32_MAX, 2**30, -1, -(2**31), 100_001, 10**9])
            col = sd.table.columns.add(name="c", type=data_pb2.COLUMN_TYPE_DOUBLE)
            col.doubles.extend([1.0] * rng.randint(0, 3))
        elif what == "table_columns":
            n = rng.choice([1001, 2000, 5000])
            sd.table.row_count = 1
            for i in range(n):
                sd.table.columns.add(name=f"c{i}", type=data_pb2.COLUMN_TYPE_BOOL, bools=[True])
        elif what == "table_mismatch":
            sd.table.row_count = rng.randint(1, 5)
            sd.table.steps.extend(range(rng.randint(0, 9)))
            sd.table.columns.add(
                name=rng.choice(["a", hostile_string(rng)]),
                type=rng.choice([0, 1, 2, 3, 4, 99]),  # type: ignore[arg-type]
                doubles=[1.0] * rng.randint(0, 9),
                strings=[hostile_string(rng)],
                present=[True] * rng.randint(0, 9),
            )
        elif what == "image":
            data = rng.choice([b"", b"\x89PNG\r\n\x1a\n" + rng.randbytes(40), rng.randbytes(64)])
            sd.images.images.add(
                data=data,
                content_type=rng.choice(["image/png", "text/html", "", hostile_string(rng)]),
                width=rng.choice([0, 1, 2**32 - 1]),
                height=rng.choice([0, 1, 2**32 - 1]),
                sha256=rng.choice(["", "0" * 64, "zz", hashlib.sha256(data).hexdigest()]),
            )
            sd.images.steps.extend(range(rng.randint(0, 3)))
        elif what == "evaluation":
            doc = rng.choice(
                [
                    "{",
                    "null",
                    '{"schema_type": "confusion_matrix", "schema_version": "1.0.0", "data": 1}',
                    "[" * 5000 + "]" * 5000,
                    json.dumps({"schema_type": "\x00", "schema_version": "x", "data": {}}),
                    hostile_string(rng),
                ]
            )
            sd.evaluations.documents.append(doc)
            sd.evaluations.steps.extend(range(rng.randint(0, 2)))
        elif what == "times":
            sd.scalars.values.extend([1.0, 2.0])
            sd.scalars.times.extend(
                rng.sample([float("nan"), float("inf"), -1e300, 1e300, -1.0, 0.0], 2)
            )
        elif what == "many_labels":
            for i in range(rng.choice([17, 100, 1000])):
                sd.labels[f"k{i}"] = "v"
            sd.scalars.values.append(1.0)
        else:  # text and numeric values at once
            sd.scalars.values.append(1.0)
            sd.scalars.text_values.append("a")
        if rng.random() < 0.1:
            sd.step_policy = rng.choice([0, 1, 2, 7, -1])  # type: ignore[assignment]
        return ip.RunSeries(run_id=run_id, series=sd)

    def mixed_batch(self, writer: str, sequence: int) -> ip.Batch:
        rng = self.rng
        series = [self.hostile_series() for _ in range(rng.randint(1, 4))]
        for _ in range(rng.randint(1, 3)):
            series.insert(
                rng.randrange(len(series) + 1), self.valid_series(rng.choice(self.ctx.valid_runs))
            )
        return ip.Batch(writer_id=writer, sequence=sequence, series=series, sent_time=time.time())


class Fuzzer:
    """Drives cases against one service address with a few threads."""

    KINDS: tuple[tuple[str, int], ...] = (
        ("random_bytes", 22),
        ("mutated", 14),
        ("mixed_write", 20),
        ("mixed_stream", 8),
        ("invalid_utf8", 8),
        ("sequence", 5),
        ("cross_workspace", 3),
        ("metadata", 10),
        ("artifacts", 8),
        ("queries", 2),
        ("echo", 2),
        ("wide", 1),
        ("big_image", 1),
        ("slow_reader", 1),
        ("race", 2),
        ("envelope", 2),
    )

    def __init__(
        self,
        address: str,
        seed: int = 9,
        pid: int | None = None,
        threads: int = 4,
        call_timeout: float = 20.0,
        health_every: int = 250,
        health_bound_s: float = 2.0,
        rss_kill_mb: float = 0.0,
        kinds: dict[str, int] | None = None,
        series_kinds: Iterable[str] = SERIES_KINDS,
        peer: str | None = None,
    ) -> None:
        """rss_kill_mb: above this RSS the service process is killed (SIGKILL)
        and the run stops with a finding, so a service that allocates without
        bound cannot take the machine down with it (0: never). peer: the
        address of a second service process on the same database; the race
        cases send one of their two copies there."""
        self.address = address
        self.rss_kill_mb = rss_kill_mb
        self.series_kinds = list(series_kinds)
        self.seed = seed
        self.pid = pid
        self.threads = threads
        self.call_timeout = call_timeout
        self.health_every = health_every
        self.health_bound_s = health_bound_s
        opts = [
            ("grpc.max_send_message_length", 256 * MiB),
            ("grpc.max_receive_message_length", 256 * MiB),
            ("grpc.enable_http_proxy", 0),
        ]
        self.channel = grpc.insecure_channel(address, options=opts)
        # A second service process on the same database, for the races.
        self.peer_channel = grpc.insecure_channel(peer, options=opts) if peer else self.channel
        self.ctx = self._setup()
        self.valid: list[tuple[str, str, int, float]] = []
        self.report = Report()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        weights = dict(self.KINDS) if kinds is None else kinds
        self._kinds = list(weights)
        self._weights = list(weights.values())
        self._inflight: dict[int, str] = {}

    def close(self) -> None:
        self.channel.close()
        self.peer_channel.close()

    # -- set up: the runs the cases write to
    def _call(self, name: str, req: Message) -> Any:
        m = BY_NAME[name]
        out = self.channel.unary_unary(m.path)(req.SerializeToString(), timeout=30)
        return m.response.FromString(out)

    def _run(self, workspace: str, experiment: str) -> str:
        reply = self._call(
            "CreateRun", rp.CreateRunRequest(workspace=workspace, experiment_name=experiment)
        )
        return str(reply.run.run_id)

    def _setup(self) -> Context:
        exp = f"fuzz-{self.seed}-{uuid.uuid4().hex[:8]}"
        valid = [self._run("default", exp) for _ in range(4)]
        victims = [self._run("default", exp) for _ in range(4)]
        files = [self._run("default", exp) for _ in range(2)]
        completed = self._run("default", exp)
        self._call(
            "UpdateRunStatus",
            rp.UpdateRunStatusRequest(
                workspace="default", run_id=completed, status=common_pb2.RUN_STATUS_COMPLETED
            ),
        )
        foreign = self._run(FOREIGN_WORKSPACE, exp)
        return Context("default", valid, victims, files, completed, foreign, exp)

    # -- the run
    def run(
        self,
        messages: int,
        time_limit_s: float | None = None,
        progress: Callable[[Report], None] | None = None,
        progress_every: int = 10_000,
    ) -> Report:
        rep = self.report
        start = time.monotonic()
        sampler = threading.Thread(target=self._sample, daemon=True)
        sampler.start()
        index = 0
        next_progress = progress_every
        try:
            with ThreadPoolExecutor(self.threads) as pool:
                pending: set[Any] = set()
                while rep.messages < messages and not self._stop.is_set():
                    if time_limit_s and time.monotonic() - start > time_limit_s:
                        break
                    while len(pending) < self.threads * 2:
                        pending.add(pool.submit(self._one, index))
                        index += 1
                    done = next(iter(_wait_first(pending)))
                    pending.discard(done)
                    done.result()
                    if progress and rep.messages >= next_progress:
                        next_progress += progress_every
                        progress(rep)
                for fut in pending:
                    fut.result()
        finally:
            self._stop.set()
            sampler.join(timeout=10)
        rep.elapsed_s = time.monotonic() - start
        rep.valid_points = len(self.valid)
        # One last look at health after the load.
        self._health()
        return rep

    def _one(self, index: int) -> None:
        if self._stop.is_set():
            return
        kind = random.Random(f"{self.seed}:{index}:kind").choices(self._kinds, self._weights)[0]
        case = _Case(self, index, kind)
        with self._lock:
            self._inflight[index] = kind
        t0 = time.monotonic()
        try:
            getattr(self, f"_case_{kind}")(case)
        except Exception as exc:  # a bug of the fuzzer itself: say so, do not hide it
            case.finding("fuzzer", f"{type(exc).__name__}: {exc}"[:300])
        finally:
            with self._lock:
                self._inflight.pop(index, None)
        crashed = bool(self.pid) and not _alive(self.pid or 0)
        with self._lock:
            rep = self.report
            rep.messages += case.messages
            rep.calls += case.calls
            rep.cases += 1
            rep.kinds[kind] += 1
            rep.kind_seconds[kind] += time.monotonic() - t0
            rep.codes.update(case.codes)
            rep.findings.extend(case.findings)
            rep.hangs += case.hang
            self.valid.extend(case.valid)
            if crashed and not rep.crashes:
                rep.crashes = 1
                rep.findings.append(Finding(index, kind, "process", "the service process died"))
                self._stop.set()

    def _sample(self) -> None:
        next_health = self.health_every
        while not self._stop.wait(0.05):
            if self.pid:
                mb = rss_mb(self.pid)
                self.report.max_rss_mb = max(self.report.max_rss_mb, mb)
                if self.rss_kill_mb and mb > self.rss_kill_mb:
                    self._kill_for_memory(mb)
                    return
            own = rss_mb(os.getpid(), children=False)
            if own > 4096:  # the fuzzer's own bug: stop before the machine runs out
                with self._lock:
                    self.report.findings.append(
                        Finding(-1, "fuzzer", "self", f"the fuzzer itself holds {own:.0f} MiB")
                    )
                self._stop.set()
                return
            if self.report.messages >= next_health:
                next_health = self.report.messages + self.health_every
                self._health()

    def _kill_for_memory(self, mb: float) -> None:
        with self._lock:
            inflight = ", ".join(f"{i}:{k}" for i, k in sorted(self._inflight.items()))
            self.report.findings.append(
                Finding(
                    -1,
                    "memory",
                    "process",
                    f"RSS {mb:.0f} MiB over {self.rss_kill_mb:.0f} MiB; killed the service;"
                    f" cases in flight: {inflight}",
                )
            )
            self.report.crashes += 1
        with contextlib.suppress(OSError):
            os.kill(self.pid or 0, signal.SIGKILL)
        self._stop.set()

    def _health(self) -> None:
        stub = health_pb2_grpc.HealthStub(self.channel)
        t0 = time.monotonic()
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=self.health_bound_s)
            ok = reply.status == health_pb2.HealthCheckResponse.SERVING
            what = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        except grpc.RpcError as err:
            ok = False
            what = f"{err.code().name if isinstance(err, grpc.Call) else err}"
        took = time.monotonic() - t0
        with self._lock:
            rep = self.report
            rep.health_checks += 1
            rep.max_health_s = max(rep.max_health_s, took)
            if not ok:
                rep.hangs += 1
                rep.findings.append(
                    Finding(
                        -1,
                        "health",
                        "/grpc.health.v1.Health/Check",
                        f"{what} after {rep.messages} messages ({took:.2f}s,"
                        f" bound {self.health_bound_s}s)",
                    )
                )

    # ------------------------------------------------------------ cases
    def _case_random_bytes(self, c: _Case) -> None:
        m = c.rng.choice(METHODS)
        name = m.path.rsplit("/", 1)[1]
        blobs = [c.rng.randbytes(c.rng.choice([0, 1, 3, 17, 100, 1000])) for _ in range(3)]
        if m.client_streaming:
            c.stream(name, list(blobs[: c.rng.randint(1, 3)]))
        else:
            c.unary(name, blobs[0])

    def _template(self, c: _Case, name: str) -> Message:
        """A valid-looking request for any method, aimed at victim runs only."""
        rng, ctx = c.rng, self.ctx
        run = rng.choice(ctx.victim_runs)
        ws = ctx.workspace
        if name in ("Write", "Ingest"):
            batch = ip.Batch(writer_id=c.writer(), sequence=1, series=[c.hostile_series()])
            batch.series.add(
                run_id=run,
                series=data_pb2.SeriesData(
                    name="m", scalars=data_pb2.ScalarColumns(steps=[1], values=[1.0])
                ),
            )
            cls = ip.WriteRequest if name == "Write" else ip.IngestRequest
            return cls(workspace=ws, batch=batch)
        if name == "UploadArtifact":
            return ap.UploadArtifactRequest(
                header=ap.UploadArtifactHeader(workspace=ws, run_id=run, path="a/b.txt", size=3)
            )
        req = BY_NAME[name].request()
        for f in req.DESCRIPTOR.fields:
            if f.name == "workspace":
                req.workspace = ws
            elif f.name in ("run_id",):
                setattr(req, f.name, run)
            elif f.name in ("experiment_name", "name") and f.type == f.TYPE_STRING:
                setattr(req, f.name, ctx.experiment if "Experiment" in name else "m")
            elif f.name == "run_ids":
                req.run_ids.append(run)  # type: ignore[attr-defined]
            elif f.name == "path":
                req.path = "a/b.txt"
        if name == "UpdateRunStatus":
            req.status = rng.choice([0, 3, 6, 7, 8, 99])  # type: ignore[attr-defined]
        return req

    def _case_mutated(self, c: _Case) -> None:
        m = c.rng.choice(METHODS)
        name = m.path.rsplit("/", 1)[1]
        raw = _mutate(c.rng, self._template(c, name).SerializeToString())
        if m.client_streaming:
            c.stream(name, [raw])
        else:
            c.unary(name, raw)

    def _mixed_ok(
        self, c: _Case, reply: Message | None, start: int, method: str, hostile: bool = True
    ) -> None:
        """A batch with valid points came back: when the whole request failed,
        its valid points were lost with it (the service must isolate the bad
        part: a per-point rejection, never the batch, nor a neighbour's)."""
        if reply is None:
            lost = len(c.valid) - start
            c.forget_valid(start)
            what = "a batch with hostile series" if hostile else "an all-valid batch"
            c.finding(method, f"{what} failed as a whole, {lost} valid points lost: {c.last_error}")

    def _case_mixed_write(self, c: _Case) -> None:
        w = c.writer()
        for seq in range(1, c.rng.randint(1, 3) + 1):
            start = len(c.valid)
            batch = c.mixed_batch(w, seq)
            # Like a client behind a load balancer: each batch to either replica.
            channel = self.peer_channel if c.rng.random() < 0.5 else None
            request = ip.WriteRequest(workspace="default", batch=batch)
            reply = c.unary("Write", request, channel=channel)
            self._mixed_ok(c, reply, start, "/steplog.v1.IngestService/Write")
            if reply is None:
                return
            assert isinstance(reply, ip.WriteResponse)
            if reply.duplicate_batch:
                c.finding("Write", f"first send of batch {seq} of {w} acknowledged as duplicate")

    def _case_mixed_stream(self, c: _Case) -> None:
        w = c.writer()
        start = len(c.valid)
        n = c.rng.randint(2, 6)
        batches = [
            ip.IngestRequest(workspace="default", batch=c.mixed_batch(w, s))
            for s in range(1, n + 1)
        ]
        replies = c.stream("Ingest", list(batches))
        if replies is None:
            self._mixed_ok(c, None, start, "/steplog.v1.IngestService/Ingest")
            return
        acked = sorted(r.sequence for r in replies)  # type: ignore[attr-defined]
        if acked != list(range(1, n + 1)):
            c.finding("Ingest", f"acknowledged sequences {acked}, sent 1..{n}")
        if any(r.duplicate_batch for r in replies):  # type: ignore[attr-defined]
            c.finding("Ingest", "a first send acknowledged as a duplicate batch")

    def _case_race(self, c: _Case) -> None:
        """A writer's first batch sent twice at the same moment (a client
        resending while its first call is still running; to the peer replica
        when there is one): stored once, one of the two answers a duplicate."""
        run = c.rng.choice(self.ctx.valid_runs)
        series = [c.valid_series(run, unstepped=True) for _ in range(c.rng.randint(1, 3))]
        request = ip.WriteRequest(batch=ip.Batch(writer_id=c.writer(), sequence=1, series=series))
        replies: list[Message | None] = [None, None]
        barrier = threading.Barrier(2)

        def send(i: int) -> None:
            barrier.wait(5)
            channel = self.peer_channel if i == 1 else None
            replies[i] = c.unary("Write", request, channel=channel)

        other = threading.Thread(target=send, args=(1,))
        other.start()
        send(0)
        other.join()
        if any(r is None for r in replies):
            # One failed: the other may have stored it; the points stay expected.
            c.finding("Write", f"a raced first batch failed: {c.last_error}")
            return
        dups = [bool(r.duplicate_batch) for r in replies]  # type: ignore[union-attr]
        if dups.count(True) != 1:
            c.finding("Write", f"a first batch sent twice at once: duplicate_batch {dups}")

    def _case_envelope(self, c: _Case) -> None:
        """Hostile writer ids and workspaces: the whole batch is refused, as INVALID_ARGUMENT."""
        rng = c.rng
        run = rng.choice(self.ctx.victim_runs)
        bad = hostile_string(rng, rng.choice(["nul", "control", "huge", "unicode"]))
        if re.fullmatch(r"[A-Za-z0-9_.:-]{1,128}", bad):  # a short unicode draw can be plain ASCII
            bad += "\u00e9"
        batch = ip.Batch(writer_id=c.writer(), sequence=1)
        batch.series.add(run_id=run).series.name = "m"
        batch.series[0].series.scalars.values.append(1.0)
        workspace = "default"
        if rng.random() < 0.5:
            batch.writer_id = bad
        else:
            workspace = bad
        inv = (grpc.StatusCode.INVALID_ARGUMENT,)
        if rng.random() < 0.5:
            c.unary("Write", ip.WriteRequest(workspace=workspace, batch=batch), inv, False)
        else:
            req = ip.IngestRequest(workspace=workspace, batch=batch)
            c.stream("Ingest", [req], inv, False)

    def _case_echo(self, c: _Case) -> None:
        """One series with a huge name (or labels) and many bad points: the
        acknowledgement must not echo the name once per rejected point."""
        rng = c.rng
        sd = data_pb2.SeriesData(name="e" * rng.choice([300_000, 1 * MiB]))
        if rng.random() < 0.5:
            for i in range(16):
                sd.labels[f"k{i}"] = "v" * 60_000
        n = rng.choice([25, 100])
        sd.scalars.steps.extend([-1] * n)
        sd.scalars.values.extend([1.0] * n)
        series = [ip.RunSeries(run_id=rng.choice(self.ctx.victim_runs), series=sd)]
        start = len(c.valid)
        series.append(c.valid_series(rng.choice(self.ctx.valid_runs)))
        batch = ip.Batch(writer_id=c.writer(), sequence=1, series=series)
        reply = c.unary("Write", ip.WriteRequest(batch=batch))
        self._mixed_ok(c, reply, start, "/steplog.v1.IngestService/Write")

    def _case_wide(self, c: _Case) -> None:
        """10,000 one-point series in one batch (to runs that mostly do not
        exist), beside valid points: decoding it must not stall the service."""
        rng = c.rng
        batch = ip.Batch(writer_id=c.writer(), sequence=1)
        for i in range(10_000):
            rs = batch.series.add(run_id=f"nope-{i % 97}")
            rs.series.name = f"w{i}"
            rs.series.scalars.values.append(float(i))
        start = len(c.valid)
        batch.series.append(c.valid_series(rng.choice(self.ctx.valid_runs)))
        reply = c.unary("Write", ip.WriteRequest(batch=batch))
        self._mixed_ok(c, reply, start, "/steplog.v1.IngestService/Write")

    def _case_big_image(self, c: _Case) -> None:
        """An image of up to 16 MiB that is not an image (right hash), beside valid points."""
        rng = c.rng
        data = b"\x89PNG\r\n\x1a\n" + rng.randbytes(rng.choice([4, 12, 15]) * MiB)
        sd = data_pb2.SeriesData(name=f"img{c.index}")
        sd.images.images.add(
            data=data, content_type="image/png", sha256=hashlib.sha256(data).hexdigest()
        )
        series = [ip.RunSeries(run_id=rng.choice(self.ctx.victim_runs), series=sd)]
        start = len(c.valid)
        series.append(c.valid_series(rng.choice(self.ctx.valid_runs)))
        batch = ip.Batch(writer_id=c.writer(), sequence=1, series=series)
        reply = c.unary("Write", ip.WriteRequest(batch=batch))
        self._mixed_ok(c, reply, start, "/steplog.v1.IngestService/Write")

    def _case_slow_reader(self, c: _Case) -> None:
        """A stream that sends 20 batches of 1 MiB and reads no acknowledgement
        for 1 s, then goes away: the service must not hold them without bound."""
        w = c.writer()
        values = [0.5] * (MiB // 8)
        reqs = []
        for seq in range(1, 21):
            batch = ip.Batch(writer_id=w, sequence=seq)
            rs = batch.series.add(run_id=f"nope-slow-{c.index}")
            rs.series.name = "slow"
            rs.series.scalars.values.extend(values)
            reqs.append(ip.IngestRequest(batch=batch).SerializeToString())
        c.messages += len(reqs)
        c.calls += 1
        call = self.channel.stream_stream(BY_NAME["Ingest"].path)(
            iter(reqs), timeout=self.call_timeout
        )
        time.sleep(1.0)
        call.cancel()
        c.codes["CANCELLED"] += 1

    def _case_invalid_utf8(self, c: _Case) -> None:
        rng, ctx = c.rng, self.ctx
        marker = f"MARK{rng.randrange(10**8):08d}"
        run = rng.choice(ctx.victim_runs)
        where = rng.choice(
            [
                "series_name",
                "label",
                "text_value",
                "run_id",
                "writer",
                "description",
                "create_run",
                "get_metrics",
                "read_series",
                "upload_path",
                "experiment",
                "tag",
            ]
        )
        inv = (grpc.StatusCode.INVALID_ARGUMENT,)
        if where in ("series_name", "label", "text_value", "run_id", "writer", "description"):
            rs = ip.RunSeries(
                run_id=run,
                series=data_pb2.SeriesData(name="m", scalars=data_pb2.ScalarColumns(values=[1.0])),
            )
            sd = rs.series
            writer = c.writer()
            if where == "series_name":
                sd.name = marker
            elif where == "label":
                sd.labels["k"] = marker
            elif where == "text_value":
                del sd.scalars.values[:]
                sd.scalars.text_values.append(marker)
            elif where == "run_id":
                rs.run_id = marker
            elif where == "writer":
                writer = marker
            else:
                sd.description = marker
            batch = ip.Batch(writer_id=writer, sequence=1, series=[rs])
            if rng.random() < 0.5:
                c.unary("Write", invalid_utf8(ip.WriteRequest(batch=batch), marker), inv, False)
            else:
                raw = invalid_utf8(ip.IngestRequest(batch=batch), marker)
                c.stream("Ingest", [raw], inv, False)
        elif where == "create_run":
            req = rp.CreateRunRequest(experiment_name=ctx.experiment, display_name=marker)
            c.unary("CreateRun", invalid_utf8(req, marker), inv, False)
        elif where == "get_metrics":
            gm = qp.GetMetricsRequest(run_id=run, names=[marker])
            c.unary("GetMetrics", invalid_utf8(gm, marker), inv, False)
        elif where == "read_series":
            rs2 = qp.ReadSeriesRequest(run_id=run, name=marker)
            c.unary("ReadSeries", invalid_utf8(rs2, marker), inv, False)
        elif where == "upload_path":
            up = ap.UploadArtifactRequest(
                header=ap.UploadArtifactHeader(run_id=run, path=marker, size=1)
            )
            c.stream(
                "UploadArtifact",
                [invalid_utf8(up, marker), ap.UploadArtifactRequest(chunk=b"x")],
                inv,
                False,
            )
        elif where == "experiment":
            ge = ep.GetOrCreateExperimentRequest(name=marker)
            c.unary("GetOrCreateExperiment", invalid_utf8(ge, marker), inv, False)
        else:
            tg = rp.UpdateRunTagsRequest(
                run_id=run, set_tags=[common_pb2.Tag(key="k", value=marker)]
            )
            c.unary("UpdateRunTags", invalid_utf8(tg, marker), inv, False)

    def _case_sequence(self, c: _Case) -> None:
        """Gaps, huge sequence numbers, resends: the valid batches after them are stored once."""
        rng = c.rng
        w = c.writer()
        run = rng.choice(self.ctx.valid_runs)

        def batch(seq: int, valid: bool) -> ip.Batch:
            series = [c.valid_series(run)] if valid else []
            return ip.Batch(writer_id=w, sequence=seq, series=series)

        start = len(c.valid)
        r1 = c.unary("Write", ip.WriteRequest(batch=batch(1, True)))
        if r1 is None:
            self._mixed_ok(c, None, start, "/steplog.v1.IngestService/Write", False)
            return
        # A gap: must be refused (ABORTED on the stream, as the proto says).
        gap = rng.choice([3, 10, 2**32, 2**63, UINT64_MAX])
        c.stream(
            "Ingest",
            [ip.IngestRequest(batch=ip.Batch(writer_id=w, sequence=gap, series=[]))],
            (grpc.StatusCode.ABORTED,),
            False,
        )
        # The resend of batch 1 is a duplicate and writes nothing.
        again = c.unary("Write", ip.WriteRequest(batch=batch(1, False)))
        if isinstance(again, ip.WriteResponse) and not again.duplicate_batch:
            c.finding("Write", "a resent batch 1 was not acknowledged as a duplicate")
        # Batch 2, valid, after all that: stored.
        start = len(c.valid)
        r2 = c.unary("Write", ip.WriteRequest(batch=batch(2, True)))
        if r2 is None:
            self._mixed_ok(c, None, start, "/steplog.v1.IngestService/Write", False)
        elif isinstance(r2, ip.WriteResponse) and r2.duplicate_batch:
            c.forget_valid(start)
            c.finding("Write", "batch 2 (never sent before) acknowledged as a duplicate")
        # Sequence 0 and the largest sequence on a fresh writer.
        for seq in (0, UINT64_MAX):
            c.unary("Write", ip.WriteRequest(batch=ip.Batch(writer_id=c.writer(), sequence=seq)))

    def _case_cross_workspace(self, c: _Case) -> None:
        """The same writer id in another workspace must not move this writer's progress."""
        rng = c.rng
        w = c.writer()
        run = rng.choice(self.ctx.valid_runs)
        start = len(c.valid)
        first = ip.Batch(writer_id=w, sequence=1, series=[c.valid_series(run)])
        if c.unary("Write", ip.WriteRequest(workspace="default", batch=first)) is None:
            self._mixed_ok(c, None, start, "/steplog.v1.IngestService/Write", False)
            return
        # The other workspace: the same writer id, many batches, some aimed at our run.
        k = rng.randint(2, 6)
        for seq in range(1, k + 1):
            series = [
                ip.RunSeries(
                    run_id=run,
                    series=data_pb2.SeriesData(
                        name="x", scalars=data_pb2.ScalarColumns(values=[1.0])
                    ),
                )
            ]
            reply = c.unary(
                "Write",
                ip.WriteRequest(
                    workspace=FOREIGN_WORKSPACE,
                    batch=ip.Batch(writer_id=w, sequence=seq, series=series),
                ),
            )
            if isinstance(reply, ip.WriteResponse) and reply.result.accepted:
                c.finding("Write", f"{FOREIGN_WORKSPACE} wrote into a run of 'default'")
        start = len(c.valid)
        second = ip.Batch(writer_id=w, sequence=2, series=[c.valid_series(run)])
        r2 = c.unary("Write", ip.WriteRequest(workspace="default", batch=second))
        if r2 is None:
            self._mixed_ok(c, None, start, "/steplog.v1.IngestService/Write", False)
        elif isinstance(r2, ip.WriteResponse) and r2.duplicate_batch:
            c.forget_valid(start)
            c.finding(
                "Write",
                f"batch 2 of a writer in 'default' acknowledged as a duplicate after the same"
                f" writer id wrote {k} batches in {FOREIGN_WORKSPACE} (progress not per workspace)",
            )

    def _case_metadata(self, c: _Case) -> None:
        rng, ctx = c.rng, self.ctx
        run = rng.choice(ctx.victim_runs)
        s = hostile_string(rng)
        choice = rng.randrange(12)
        if choice == 0:
            c.unary("CreateRun", rp.CreateRunRequest(experiment_name=ctx.experiment, run_id=s))
        elif choice == 1:
            c.unary(
                "CreateRun",
                rp.CreateRunRequest(
                    experiment_name=ctx.experiment,
                    display_name=s,
                    description=hostile_string(rng),
                    run_type=hostile_string(rng),
                    tags=[common_pb2.Tag(key=hostile_string(rng), value=s)],
                    properties={hostile_string(rng): s},
                    parent_run_id=rng.choice([ctx.foreign_run, s, ""]),
                ),
            )
        elif choice == 2:
            c.unary("GetRun", rp.GetRunRequest(workspace=rng.choice(["default", s]), run_id=s))
        elif choice == 3:
            c.unary(
                "ListRuns",
                rp.ListRunsRequest(
                    experiment_name=rng.choice([ctx.experiment, s]),
                    run_type=s,
                    parent_run_id=rng.choice([s, run]),
                    limit=rng.choice([-1, 0, INT32_MAX, -(2**31)]),
                    tags=[common_pb2.Tag(key=s)],
                    properties={s: s},
                ),
            )
        elif choice == 4:
            c.unary(
                "UpdateRunTags",
                rp.UpdateRunTagsRequest(
                    run_id=run,
                    set_tags=[common_pb2.Tag(key=s, value=hostile_string(rng))],
                    remove_keys=[hostile_string(rng)],
                ),
            )
        elif choice == 5:
            c.unary("AddRunProperties", rp.AddRunPropertiesRequest(run_id=run, properties={s: s}))
        elif choice == 6:
            c.unary(
                "UpdateRunStatus",
                rp.UpdateRunStatusRequest(
                    run_id=rng.choice([run, s, ctx.foreign_run]),
                    status=rng.choice([0, 1, 3, 6, 7, 9, 1000]),  # type: ignore[arg-type]
                    error=common_pb2.RunError(message=hostile_string(rng), code=s),
                ),
            )
        elif choice == 7:
            c.unary(
                "Heartbeat",
                rp.HeartbeatRequest(
                    run_ids=[s[:300], run, ctx.foreign_run] * rng.choice([1, 1000])
                ),
            )
        elif choice == 8:
            c.unary(
                "RewindRun",
                rp.RewindRunRequest(
                    run_id=rng.choice([run, s, ctx.foreign_run]),
                    step=rng.choice([INT64_MIN, -1, INT64_MAX, 0]),
                    names=[s, hostile_string(rng)],
                ),
            )
        elif choice == 9:
            c.unary(
                "GetOrCreateExperiment",
                ep.GetOrCreateExperimentRequest(
                    workspace=rng.choice(["default", s, "x" * 300]),
                    name=s,
                    tags=[common_pb2.Tag(key=s)],
                ),
            )
        elif choice == 10:
            c.unary(
                "ListExperiments",
                ep.ListExperimentsRequest(name_prefix=s, tags=[common_pb2.Tag(key=s, value=s)]),
            )
        else:
            name = rng.choice(["ArchiveExperiment", "ReactivateExperiment", "GetExperiment"])
            req = BY_NAME[name].request(name=s)
            c.unary(name, req)

    def _case_queries(self, c: _Case) -> None:
        rng, ctx = c.rng, self.ctx
        run = rng.choice([*ctx.victim_runs, ctx.foreign_run])
        s = hostile_string(rng)
        choice = rng.randrange(3)
        if choice == 0:
            c.unary(
                "GetMetrics",
                qp.GetMetricsRequest(
                    run_id=run, names=[s[:300]] * rng.choice([1, 10_000]), recursive=True
                ),
            )
        elif choice == 1:
            req = qp.ReadSeriesRequest(
                run_id=run,
                name=rng.choice([s, "m"]),
                max_points=rng.choice([-1, 0, 1, 2, INT32_MAX, -(2**31)]),
                include_bytes=rng.random() < 0.5,
            )
            req.labels[hostile_string(rng)] = s
            req.start_step = rng.choice([INT64_MAX, INT64_MIN, 10])
            req.end_step = rng.choice([INT64_MIN, INT64_MAX, 5])
            c.unary("ReadSeries", req)
        else:
            c.unary("ListSeries", qp.ListSeriesRequest(run_id=rng.choice([run, s])))

    def _case_artifacts(self, c: _Case) -> None:
        rng, ctx = c.rng, self.ctx
        run = rng.choice(ctx.file_runs)
        data = rng.randbytes(rng.choice([0, 1, 100, 5000]))
        digest = hashlib.sha256(data).hexdigest()
        path = f"f/{c.index}-{rng.randrange(1 << 20)}.bin"
        head = ap.UploadArtifactHeader
        req = ap.UploadArtifactRequest
        refuse = False
        expect: tuple[grpc.StatusCode, ...] = ()
        choice = rng.randrange(10)
        if choice == 0:  # truncated: fewer bytes than the declared size
            parts = [
                req(header=head(run_id=run, path=path, size=len(data) + 10, sha256=digest)),
                req(chunk=data),
            ]
            refuse = True
        elif choice == 1:  # a wrong hash: DATA_LOSS, as the proto says
            parts = [
                req(header=head(run_id=run, path=path, sha256="0" * 64)),
                req(chunk=data or b"x"),
            ]
            refuse, expect = True, (grpc.StatusCode.DATA_LOSS,)
        elif choice == 2:  # path traversal and friends
            bad = rng.choice(
                [
                    "../x",
                    "../../etc/passwd",
                    "/etc/passwd",
                    "a/../../b",
                    "a/\x00b",
                    "\x00",
                    "",
                    ".",
                    "..",
                    "a/./../..",
                    "//x",
                    "a\\..\\..\\b",
                    "a/\n/b",
                    "x" * 5000,
                ]
            )
            parts = [req(header=head(run_id=run, path=bad, sha256=digest)), req(chunk=data)]
            refuse = True
        elif choice == 3:  # chunk before the header
            parts = [req(chunk=data or b"x"), req(header=head(run_id=run, path=path))]
            refuse = True
        elif choice == 4:  # two headers
            parts = [
                req(header=head(run_id=run, path=path)),
                req(header=head(run_id=run, path=path + "2")),
            ]
            refuse = True
        elif choice == 5:  # more bytes than declared
            parts = [req(header=head(run_id=run, path=path, size=1)), req(chunk=data + b"xx")]
            refuse = True
        elif choice == 6:  # absurd sizes, foreign and completed runs
            size = rng.choice([-1, INT64_MAX, 2**50])
            target = rng.choice([run, ctx.foreign_run, ctx.completed_run, "nope"])
            parts = [req(header=head(run_id=target, path=path, size=size)), req(chunk=data)]
            refuse = size != -1 or target != run
        elif choice == 7:  # no chunks at all, no header at all
            parts = rng.choice([[req(header=head(run_id=run, path=path, size=5))], [], [req()]])
            refuse = True
        elif choice == 8:  # downloads and listings of hostile paths
            bad = rng.choice(["../x", "/etc/passwd", "a\x00b", hostile_string(rng)])
            c.unary(
                "DownloadArtifact",
                ap.DownloadArtifactRequest(run_id=rng.choice([run, ctx.foreign_run]), path=bad),
                ok_allowed=False,
            )
            c.unary("ListArtifacts", ap.ListArtifactsRequest(run_id=run, prefix=bad))
            return
        else:  # a valid upload, right hash: stored
            parts = [
                req(header=head(run_id=run, path=path, size=len(data), sha256=digest)),
                req(chunk=data),
            ]
            got = c.stream("UploadArtifact", list(parts))
            if got is None:
                c.finding("UploadArtifact", f"a valid upload failed: {c.last_error}")
            return
        c.stream("UploadArtifact", list(parts), expect, ok_allowed=not refuse)


def _wait_first(futures: set[Any]) -> set[Any]:
    from concurrent.futures import FIRST_COMPLETED, wait

    done, _ = wait(futures, return_when=FIRST_COMPLETED)
    return done


# ------------------------------------------------------------ checks by SQL

STORED_SQL = (
    "SELECT s.run_id, s.name, p.step, p.value FROM scalar_points p JOIN series s USING (series_id)"
    " WHERE s.run_id = ANY($1::text[]) AND s.name LIKE 'valid.%' AND NOT p.hidden"
)


def missing_and_doubled(
    expected: Iterable[tuple[str, str, int, float]], rows: Iterable[tuple[Any, ...]]
) -> tuple[int, int]:
    """(valid points not stored, points stored more than once) from the rows of
    STORED_SQL. Values are unique inside a valid series, so a row whose (run,
    series, value) another row has is a double, whatever step it got."""
    want = set(expected)
    got = [(str(r[0]), str(r[1]), int(r[2]), float(r[3])) for r in rows]
    seen = set(got)
    by_value = Counter((run, name, value) for run, name, _, value in got)
    missing = sum(1 for p in want if p not in seen)
    doubled = sum(n - 1 for n in by_value.values() if n > 1)
    return missing, doubled


def stored_rows(database_url: str, run_ids: list[str]) -> list[tuple[Any, ...]]:
    import asyncpg

    async def go() -> list[tuple[Any, ...]]:
        conn = await asyncpg.connect(database_url)
        try:
            return [tuple(r) for r in await conn.fetch(STORED_SQL, run_ids)]
        finally:
            await conn.close()

    return asyncio.run(go())
