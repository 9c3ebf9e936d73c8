"""Writer progress, pure parts: sequence classification per (workspace,
writer), the kept outcome's codec and its bound, the sweep's pace."""

from __future__ import annotations

import numpy as np

from ingest.core.batch import INVALID_NAME, STEP_NOT_INCREASING, Chunk, DecodedBatch, Outcome
from ingest.store.writers import (
    MAX_OUTCOME_BYTES,
    classify_sequences,
    decode_outcome,
    encode_outcome,
    sweep_interval,
)


def b(workspace: str, writer: str, seq: int) -> DecodedBatch:
    return DecodedBatch(workspace, writer, seq, 0.0, 0.0, [], Outcome(), 0)


def test_duplicates_live_and_gaps_against_the_mark() -> None:
    batches = [b("ws", "w", 3), b("ws", "w", 4), b("ws", "w", 5), b("ws", "w", 7), b("ws", "w", 2)]
    results, live = classify_sequences(batches, {("ws", "w"): 3})
    assert [r.duplicate_batch for r in results] == [True, False, False, False, True]
    assert [x.sequence for x in live] == [4, 5]
    gap = results[3].gap
    assert gap is not None and gap.expected == 6
    assert "expected batch sequence 6, got 7" in str(gap)


def test_a_writer_is_per_workspace() -> None:
    batches = [b("a", "w", 1), b("b", "w", 1), b("b", "w", 2)]
    results, live = classify_sequences(batches, {("a", "w"): 0, ("b", "w"): 0})
    assert not any(r.duplicate_batch or r.gap for r in results)
    assert len(live) == 3
    # Workspace a far ahead does not move workspace b, nor show in its gap.
    results, live = classify_sequences([b("b", "w", 9)], {("a", "w"): 41, ("b", "w"): 2})
    gap = results[0].gap
    assert gap is not None and gap.expected == 3 and "42" not in str(gap)


def test_a_new_writer_starts_at_one() -> None:
    results, live = classify_sequences([b("ws", "new", 1)], {})
    assert live and not results[0].duplicate_batch
    results, live = classify_sequences([b("ws", "new", 2)], {})
    assert not live and results[0].gap is not None and results[0].gap.expected == 1


def outcome(examples: int, name: str = "loss", labels: dict[str, str] | None = None) -> Outcome:
    o = Outcome(accepted=7, duplicates=2)
    chunk = Chunk(
        run_id="run-1",
        name=name,
        labels=labels or {"rank": "3"},
        labels_key="",
        kind=1,
        value_type=0,
        stepped=True,
        out_of_order=None,
        description="",
        steps=np.arange(examples, dtype=np.int64),
        times=np.zeros(examples),
        values=np.zeros(examples),
        texts=None,
    )
    half = np.arange(examples) % 2 == 0
    o.reject(chunk, half, STEP_NOT_INCREASING, "smaller than the last logged step")
    o.reject(chunk, None, INVALID_NAME, "bad")
    return o


def test_outcome_round_trip() -> None:
    o = outcome(6)
    back = decode_outcome(encode_outcome(o))
    assert (back.accepted, back.duplicates, back.rejected) == (o.accepted, o.duplicates, o.rejected)
    assert back.examples == o.examples
    assert back.by_reason == {STEP_NOT_INCREASING: 3, INVALID_NAME: 3}


def test_outcome_is_bounded_and_keeps_exact_counts() -> None:
    huge = outcome(40, name="n" * 1_000_000, labels={f"k{i}": "v" * 10_000 for i in range(500)})
    data = encode_outcome(huge)
    assert len(data) <= MAX_OUTCOME_BYTES
    back = decode_outcome(data)
    assert (back.accepted, back.duplicates, back.rejected) == (7, 2, 40)
    assert back.by_reason == huge.by_reason
    assert back.examples, "some examples fit"
    assert len(back.examples) <= len(huge.examples)
    assert all(len(e[1]) <= 200 for e in back.examples)
    # Even a bound too small for any example keeps the counts.
    tiny = decode_outcome(encode_outcome(huge, max_bytes=10))
    assert tiny.rejected == 40 and tiny.examples == []


def test_sweep_interval() -> None:
    assert sweep_interval(30 * 86400) == 60.0
    assert sweep_interval(2.0) == 0.5
    assert sweep_interval(0.001) == 0.05
