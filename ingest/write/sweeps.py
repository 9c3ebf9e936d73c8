"""Early termination, applied by the service: after the pipeline commits
points, the children whose parent carries a policy (ingest/core/
early_termination.py) and that crossed an evaluation interval of it are
evaluated, and those that fall behind move to CancelRequested with the
reason in their properties.

Work per commit is bounded: on the worker's thread a commit costs a set
lookup per chunk (is its name the primary metric of some policy?); only the
matching chunks are handed to the service's loop, where one task per
service works through them: the child's parent policy (cached), its point
count (one row), and only when the count crossed an evaluation interval,
the new points of its siblings since the last evaluation (the curves are
cached per parent, appended to, at most MAX_PARENTS parents and
MAX_CURVE_BYTES in all: the least recently evaluated parents are dropped
first, and a parent whose children's curves alone exceed the bound is not
evaluated (logged, counted in `skipped`): its policy stops applying rather
than the service growing without bound).

Prometheus (when given the service's Metrics): evaluations made, children
cancelled, and evaluations skipped over that bound, each by policy kind.

Several replicas: each evaluates the children whose points it committed.
The policy names are re-read every NAMES_REFRESH_S seconds, so a policy set
through another replica applies from then on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from ingest.core.batch import DecodedBatch
from ingest.core.decode import labels_key
from ingest.core.early_termination import Curve, Decision, Policy, crossed, evaluate_child
from ingest.observe.metrics import Metrics

log = logging.getLogger("steplog.sweeps")

__all__ = ["EarlyTermination", "SweepStoreLike"]

NAMES_REFRESH_S = 2.0
POLICY_CACHE_S = 2.0  # how long a child's (parent, policy) lookup is reused
MAX_PARENTS = 64  # parents whose children's curves stay in memory
MAX_CURVE_BYTES = 64 << 20  # all cached curves together
CURVE_POINT_BYTES = 128  # one cached interval: four list slots and their floats
MAX_PENDING = 100_000  # series waiting for evaluation; more are dropped (logged)


class SweepStoreLike(Protocol):
    async def metric_names(self) -> frozenset[str]: ...

    async def parent_policy(self, workspace: str, run_id: str) -> tuple[str, Policy] | None: ...

    async def point_count(self, workspace: str, run_id: str, name: str, key: str) -> int: ...

    async def curves_after(
        self,
        workspace: str,
        parent_id: str,
        name: str,
        key: str,
        last_steps: Mapping[str, int],
        limit: int,
    ) -> dict[str, list[tuple[int, float]]] | None: ...

    async def request_cancel(
        self, workspace: str, run_id: str, reason: str, interval: int
    ) -> bool: ...


@dataclass
class _Parent:
    policy: Policy
    curves: dict[str, Curve] = field(default_factory=dict)
    last_steps: dict[str, int] = field(default_factory=dict)


class EarlyTermination:
    def __init__(
        self,
        store: SweepStoreLike,
        *,
        max_curve_bytes: int = MAX_CURVE_BYTES,
        metrics: Metrics | None = None,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.max_points = max(1, max_curve_bytes // CURVE_POINT_BYTES)
        self._names: frozenset[str] = frozenset()
        self._loop: asyncio.AbstractEventLoop | None = None
        # (workspace, run, name, labels key) -> points committed since last look.
        self._pending: dict[tuple[str, str, str, str], int] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._refresher: asyncio.Task[None] | None = None
        self._policies: dict[tuple[str, str], tuple[float, tuple[str, Policy] | None]] = {}
        self._parents: OrderedDict[tuple[str, str], _Parent] = OrderedDict()
        self.decisions: list[Decision] = []  # the cancellations made (the last 1000)
        self.skipped = 0  # evaluations skipped because a parent's curves exceed the bound

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self._refresh_names()
        self._task = asyncio.create_task(self._run(), name="early-termination")
        self._refresher = asyncio.create_task(self._refresh_loop(), name="sweep-names")

    async def close(self) -> None:
        for task in (self._task, self._refresher):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    def policy_changed(self, workspace: str, run_id: str, policy: Policy | None) -> None:
        """A policy was set here: use it at once (other replicas within
        NAMES_REFRESH_S / POLICY_CACHE_S)."""
        if policy is not None:
            self._names = self._names | {policy.primary_metric}
        self._policies.clear()
        self._parents.pop((workspace, run_id), None)

    # -- the pipeline's hook (a worker's thread) ------------------------------------

    def committed(self, batches: Sequence[DecodedBatch]) -> None:
        """Called by the pipeline right after a commit, on the worker's
        thread, before the batches are freed: pick the chunks of primary
        metrics with new points, hand them to the service's loop."""
        names = self._names
        loop = self._loop
        if not names or loop is None:
            return
        hits: list[tuple[tuple[str, str, str, str], int]] = []
        for batch in batches:
            for chunk in batch.chunks:
                if chunk.name in names and chunk.values is not None:
                    n = int(chunk.alive.sum())
                    if n:
                        hits.append(
                            ((batch.workspace, chunk.run_id, chunk.name, chunk.labels_key), n)
                        )
        if hits:
            with contextlib.suppress(RuntimeError):  # the loop is closing
                loop.call_soon_threadsafe(self._add, hits)

    def _add(self, hits: list[tuple[tuple[str, str, str, str], int]]) -> None:
        for key, n in hits:
            if key not in self._pending and len(self._pending) >= MAX_PENDING:
                log.warning("early termination: %d series waiting; dropped one", MAX_PENDING)
                continue
            self._pending[key] = self._pending.get(key, 0) + n
        self._wake.set()

    # -- the service's loop -----------------------------------------------------------

    async def _refresh_names(self) -> None:
        try:
            self._names = await self.store.metric_names()
        except Exception as exc:  # the database is away: keep the last names
            log.warning("early termination: cannot read the policies (%s)", exc)

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(NAMES_REFRESH_S)
            await self._refresh_names()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            pending, self._pending = self._pending, {}
            for key, n in pending.items():
                try:
                    await self.process(key, n)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # one child's failure must not stop the rest
                    log.warning("early termination of %r failed: %s", key[1], exc)

    async def _parent_policy(self, workspace: str, run_id: str) -> tuple[str, Policy] | None:
        now = time.monotonic()
        cached = self._policies.get((workspace, run_id))
        if cached is not None and now - cached[0] < POLICY_CACHE_S:
            return cached[1]
        found = await self.store.parent_policy(workspace, run_id)
        if len(self._policies) > 100_000:
            self._policies.clear()
        self._policies[(workspace, run_id)] = (now, found)
        return found

    async def process(self, key: tuple[str, str, str, str], new_points: int) -> list[Decision]:
        """Evaluate one child series that got `new_points` points; returns
        the cancellations made."""
        workspace, child, name, lkey = key
        found = await self._parent_policy(workspace, child)
        if found is None:
            return []
        parent_id, policy = found
        if policy.primary_metric != name or labels_key(dict(policy.labels)) != lkey:
            return []
        after = await self.store.point_count(workspace, child, name, lkey)
        intervals = crossed(policy, max(0, after - new_points), after)
        if not intervals:
            return []
        parent = await self._curves(workspace, parent_id, policy, child, after)
        if parent is None:
            return []
        out: list[Decision] = []
        for n in intervals:
            d = evaluate_child(policy, parent.curves, child, n)
            if d is None:
                continue
            if self.metrics is not None:
                self.metrics.sweep_evaluations.labels(policy.kind.value).inc()
            if not d.cancel:
                continue
            if await self.store.request_cancel(workspace, child, d.reason, n):
                log.info("early termination: run %r cancel requested: %s", child, d.reason)
                out.append(d)
                self.decisions = [*self.decisions[-999:], d]
                if self.metrics is not None:
                    self.metrics.sweep_cancelled.labels(policy.kind.value).inc()
            break
        return out

    async def _curves(
        self, workspace: str, parent_id: str, policy: Policy, child: str, count: int
    ) -> _Parent | None:
        """The parent's children's curves, brought up to date; None when
        they do not fit in MAX_CURVE_BYTES."""
        pkey = (workspace, parent_id)
        parent = self._parents.pop(pkey, None)
        if parent is None or parent.policy != policy:
            parent = _Parent(policy)
        lkey = labels_key(dict(policy.labels))
        budget = self.max_points - _points(parent)
        fresh = await self.store.curves_after(
            workspace, parent_id, policy.primary_metric, lkey, parent.last_steps, budget
        )
        if fresh is not None:
            for run_id, points in fresh.items():
                curve = parent.curves.setdefault(run_id, Curve())
                curve.extend(v for _, v in points)
                parent.last_steps[run_id] = points[-1][0]
        if fresh is not None and len(parent.curves.get(child, ())) != count:
            # A rewind hid points the cache still holds (or a replica's commit
            # raced this one): read the parent's curves again from scratch.
            parent = _Parent(policy)
            fresh = await self.store.curves_after(
                workspace,
                parent_id,
                policy.primary_metric,
                lkey,
                {},
                self.max_points,
            )
            for run_id, points in (fresh or {}).items():
                parent.curves[run_id] = Curve(v for _, v in points)
                parent.last_steps[run_id] = points[-1][0]
        if fresh is None:
            self.skipped += 1
            if self.metrics is not None:
                self.metrics.sweep_skipped.labels(policy.kind.value).inc()
            log.warning(
                "early termination: the children of run %r have more than %d points of %r;"
                " not evaluated (bound %d bytes)",
                parent_id,
                self.max_points,
                policy.primary_metric,
                self.max_points * CURVE_POINT_BYTES,
            )
            return None
        self._parents[pkey] = parent
        # Least recently evaluated parents go first, until every bound holds.
        total = sum(_points(p) for p in self._parents.values())
        while len(self._parents) > 1 and (
            len(self._parents) > MAX_PARENTS or total > self.max_points
        ):
            _, dropped = self._parents.popitem(last=False)
            total -= _points(dropped)
        return parent


def _points(parent: _Parent) -> int:
    return sum(len(c) for c in parent.curves.values())
