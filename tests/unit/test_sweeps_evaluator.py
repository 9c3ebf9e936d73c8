"""The service's early-termination step (ingest/write/sweeps.py) beside its
store boundary (a fake store): work per commit is bounded, the curves are
read only when a child crosses an evaluation interval, and read
incrementally."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from ingest.core.early_termination import Goal, Policy, PolicyKind
from ingest.write.sweeps import EarlyTermination

POLICY = Policy(PolicyKind.BANDIT, "acc", Goal.MAXIMIZE, evaluation_interval=2, slack_amount=0.1)


class FakeStore:
    def __init__(self, points: dict[str, list[float]]) -> None:
        self.points = points  # child -> values, step = index
        self.calls: list[str] = []
        self.cancelled: dict[str, int] = {}

    async def metric_names(self) -> frozenset[str]:
        return frozenset({"acc"})

    async def parent_policy(self, workspace: str, run_id: str) -> tuple[str, Policy] | None:
        self.calls.append("policy")
        return ("parent", POLICY) if run_id in self.points else None

    async def point_count(self, workspace: str, run_id: str, name: str, key: str) -> int:
        self.calls.append("count")
        return len(self.points[run_id])

    async def curves_after(
        self,
        workspace: str,
        parent_id: str,
        name: str,
        key: str,
        last_steps: Mapping[str, int],
        limit: int,
    ) -> dict[str, list[tuple[int, float]]] | None:
        self.calls.append(f"curves:{sorted(last_steps.items())}")
        out = {}
        for rid, values in self.points.items():
            pts = [(i, v) for i, v in enumerate(values) if i > last_steps.get(rid, -1)]
            if pts:
                out[rid] = pts
        if sum(len(p) for p in out.values()) > limit:
            return None
        return out

    async def request_cancel(self, workspace: str, run_id: str, reason: str, interval: int) -> bool:
        self.cancelled[run_id] = interval
        return True


def test_curves_are_read_only_at_an_evaluation_interval_and_incrementally() -> None:
    async def main() -> None:
        store = FakeStore({"a": [1.0], "b": [0.5]})
        et = EarlyTermination(store)
        # b's first point: interval 1 is not an evaluation interval (every 2nd):
        # the policy (cached from now) and the count, no curves.
        assert await et.process(("ws", "b", "acc", ""), 1) == []
        assert store.calls == ["policy", "count"]
        store.points["a"].append(1.0)
        store.points["b"].append(0.5)
        store.calls.clear()
        # b reaches 2: curves of every child read (all of them), b cancelled:
        # its best 0.5 < 1.0 - 0.1.
        decisions = await et.process(("ws", "b", "acc", ""), 1)
        assert [(d.run_id, d.interval) for d in decisions] == [("b", 2)]
        assert store.calls == ["count", "curves:[]"]
        # a reaches 4 later: only the points after the cached steps are read.
        store.points["a"] += [1.0, 1.0]
        store.calls.clear()
        assert await et.process(("ws", "a", "acc", ""), 2) == []
        assert store.calls == ["policy", "count", "curves:[('a', 1), ('b', 1)]"]
        # A series that is not the policy's primary metric costs the lookup only.
        store.calls.clear()
        assert await et.process(("ws", "a", "loss", ""), 5) == []
        assert store.calls == []  # the policy lookup is cached

    asyncio.run(main())


def test_the_commit_hook_picks_only_primary_metric_chunks_with_new_points() -> None:
    import numpy as np

    from ingest.core.batch import Chunk, DecodedBatch, Outcome

    def chunk(name: str, alive: list[bool]) -> Chunk:
        n = len(alive)
        return Chunk(
            run_id="b", name=name, labels={}, labels_key="", kind=1, value_type=0,
            stepped=True, out_of_order=None, description="",
            steps=np.arange(n, dtype=np.int64), times=np.zeros(n),
            values=np.zeros(n), texts=None, alive=np.array(alive, dtype=np.bool_),
        )  # fmt: skip

    async def main() -> None:
        et = EarlyTermination(FakeStore({"b": []}))
        et._loop = asyncio.get_running_loop()
        et._names = frozenset({"acc"})
        batch = DecodedBatch(
            workspace="ws", writer_id="w", sequence=1, sent_time=0.0, received_time=0.0,
            chunks=[chunk("acc", [True, False, True]), chunk("loss", [True]),
                    chunk("acc", [False])],
            outcome=Outcome(), points=5,
        )  # fmt: skip
        et.committed([batch])
        await asyncio.sleep(0)  # call_soon_threadsafe runs on the next turn
        assert et._pending == {("ws", "b", "acc", ""): 2}

    asyncio.run(main())


def test_curves_over_the_byte_bound_are_not_evaluated() -> None:
    from ingest.write.sweeps import CURVE_POINT_BYTES

    async def main() -> None:
        store = FakeStore({"a": [1.0, 1.0], "b": [0.5, 0.5]})
        # Room for 6 cached intervals in all.
        et = EarlyTermination(store, max_curve_bytes=6 * CURVE_POINT_BYTES)
        # 4 points fit: b is cancelled at interval 2 as without the bound.
        decisions = await et.process(("ws", "b", "acc", ""), 2)
        assert [(d.run_id, d.interval) for d in decisions] == [("b", 2)]
        assert et.skipped == 0
        # 8 points do not: nothing is evaluated, nothing is cached, counted.
        store.points["a"] += [1.0, 1.0]
        store.points["b"] += [0.5, 0.5]
        store.cancelled.clear()
        assert await et.process(("ws", "b", "acc", ""), 2) == []
        assert et.skipped == 1
        assert et._parents == {}
        assert store.cancelled == {}

    asyncio.run(main())
