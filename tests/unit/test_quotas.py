"""Rate quotas (token buckets, waits, RetryInfo delays) and limit overrides,
on a fake clock: no I/O."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from ingest import config
from ingest.store.quotas import (
    BYTES_PER_S,
    POINTS_PER_S,
    Limits,
    Quotas,
    RateLimited,
    TokenBucket,
)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_bucket_passes_its_capacity_then_goes_into_debt() -> None:
    b = TokenBucket(rate=100, capacity=100, now=0.0)
    assert b.delay(100, 0.0) == 0
    b.take(100, 0.0)
    assert b.delay(10, 0.0) == pytest.approx(0.1)
    # A take larger than the capacity passes when the bucket is full, and leaves debt.
    b2 = TokenBucket(rate=100, capacity=100, now=0.0)
    assert b2.delay(1000, 0.0) == 0
    b2.take(1000, 0.0)
    assert b2.delay(1, 0.0) == pytest.approx(9.01)
    assert b2.delay(1, 9.01) == pytest.approx(0.0)


def test_bucket_refills_up_to_capacity_only() -> None:
    b = TokenBucket(rate=10, capacity=10, now=0.0)
    b.take(10, 0.0)
    assert b.delay(10, 1000.0) == 0
    assert b.tokens == 10


def test_admit_is_free_without_quotas() -> None:
    clock = Clock()
    q = Quotas(Limits(), clock=clock)
    for _ in range(1000):
        run(q.admit("w", 10**6, 10**9))


def test_over_the_rate_is_rate_limited_with_the_delay_and_the_quota_named() -> None:
    clock = Clock()
    seen: list[str] = []
    q = Quotas(Limits(points_per_s=100), clock=clock, on_exceeded=seen.append)
    run(q.admit("w", 1000, 10))  # a full bucket takes a large batch
    with pytest.raises(RateLimited) as err:
        run(q.admit("w", 10, 10))
    assert err.value.quota == POINTS_PER_S
    assert err.value.retry_after == pytest.approx(9.1)
    assert "points-per-second quota" in str(err.value) and "'w'" in str(err.value)
    assert seen == [POINTS_PER_S]
    # Another workspace has its own bucket.
    run(q.admit("other", 100, 10))
    # After the delay, the same request passes.
    clock.now += 9.1
    run(q.admit("w", 10, 10))


def test_a_short_wait_is_waited_not_refused() -> None:
    clock = Clock()
    slept: list[float] = []
    q = Quotas(Limits(bytes_per_s=1000), clock=clock)

    async def go() -> None:
        real_sleep = asyncio.sleep

        async def fake_sleep(delay: float) -> None:
            slept.append(delay)
            clock.now += delay
            await real_sleep(0)

        asyncio.sleep = fake_sleep  # type: ignore[assignment]
        try:
            await q.admit("w", 1, 1000)
            await q.admit("w", 1, 500)  # half a second away: waited
        finally:
            asyncio.sleep = real_sleep

    run(go())
    assert slept == [pytest.approx(0.5)]


def test_both_rates_are_taken_together_or_not_at_all() -> None:
    clock = Clock()
    q = Quotas(Limits(points_per_s=100, bytes_per_s=1000), clock=clock)
    run(q.admit("w", 10, 5000))  # bytes bucket in debt (4000), points 90 left
    with pytest.raises(RateLimited) as err:
        run(q.admit("w", 10, 10))
    assert err.value.quota == BYTES_PER_S
    # The refused request took no points: 90 are still there after the bytes refill.
    clock.now += 4.01
    run(q.admit("w", 90, 10))


def test_replicas_divide_the_rate() -> None:
    clock = Clock()
    q = Quotas(Limits(points_per_s=400), replicas=4, clock=clock)
    run(q.admit("w", 100, 1))
    with pytest.raises(RateLimited) as err:
        run(q.admit("w", 100, 1))
    assert err.value.retry_after == pytest.approx(1.0)


def test_overrides_replace_defaults_and_are_cached() -> None:
    clock = Clock()
    calls: list[str] = []
    rows: dict[str, Any] = {"w": {"points_per_s": 10, "runs": None, "series": 0}}

    async def loader(workspace: str) -> Any:
        calls.append(workspace)
        return rows.get(workspace)

    q = Quotas(Limits(points_per_s=1000, runs=5, series=7), loader=loader, clock=clock)
    limits = run(q.limits("w"))
    assert limits == Limits(points_per_s=10, runs=5, series=0)
    assert run(q.limits("free")) == Limits(points_per_s=1000, runs=5, series=7)
    run(q.limits("w"))
    assert calls == ["w", "free"]
    clock.now += 11
    rows["w"] = {"points_per_s": 20}
    assert run(q.limits("w")).points_per_s == 20


def test_quota_settings_parse() -> None:
    cfg = config.from_sources(
        env={
            "STEPLOG_QUOTA_POINTS_PER_S": "5000",
            "STEPLOG_QUOTA_STORED_BYTES": "0",
            "STEPLOG_BLOB_SWEEP_INTERVAL_S": "0",
            "STEPLOG_QUOTA_REPLICAS": "3",
        }
    )
    assert cfg.quota_points_per_s == 5000 and cfg.quota_stored_bytes == 0
    assert cfg.blob_sweep_interval_s == 0 and cfg.quota_replicas == 3
    with pytest.raises(config.ConfigError, match="STEPLOG_QUOTA_RUNS"):
        config.from_sources(env={"STEPLOG_QUOTA_RUNS": "-1"})
    with pytest.raises(config.ConfigError, match="STEPLOG_QUOTA_REPLICAS"):
        config.from_sources(env={"STEPLOG_QUOTA_REPLICAS": "0"})


def test_a_database_outage_keeps_the_last_known_limits() -> None:
    from ingest.core.errors import StoreUnavailable

    clock = Clock()
    down = [False]

    async def loader(workspace: str) -> Any:
        if down[0]:
            raise StoreUnavailable("database unavailable")
        return {"points_per_s": 10}

    q = Quotas(Limits(points_per_s=1000), loader=loader, clock=clock)
    assert run(q.limits("w")).points_per_s == 10
    down[0] = True
    clock.now += 11
    assert run(q.limits("w")).points_per_s == 10
    assert run(q.limits("new")).points_per_s == 1000


def test_requests_that_miss_the_cache_together_share_one_load() -> None:
    clock = Clock()
    calls: list[str] = []
    gate = asyncio.Event()

    async def loader(workspace: str) -> Any:
        calls.append(workspace)
        await gate.wait()
        return {"points_per_s": 10}

    q = Quotas(Limits(points_per_s=1000), loader=loader, clock=clock)

    async def many() -> list[Limits]:
        waiting = [asyncio.create_task(q.limits("w")) for _ in range(50)]
        await asyncio.sleep(0)
        gate.set()
        return await asyncio.gather(*waiting)

    assert {x.points_per_s for x in run(many())} == {10}
    assert calls == ["w"]
    clock.now += 11
    assert run(q.limits("w")).points_per_s == 10
    assert calls == ["w", "w"]
