"""Early-termination policies (ingest.core.early_termination), pure: each
expected cancellation is computed by hand in the comments."""

from __future__ import annotations

import math

import pytest

from ingest.core.early_termination import (
    Curve,
    Goal,
    Policy,
    PolicyError,
    PolicyKind,
    applies_at,
    crossed,
    curves_from,
    evaluate,
    evaluate_child,
)

NAN = math.nan
MAX, MIN = Goal.MAXIMIZE, Goal.MINIMIZE


def bandit(goal: Goal = MAX, **kw: float) -> Policy:
    return Policy(PolicyKind.BANDIT, "acc", goal, **kw)  # type: ignore[arg-type]


def cancelled(
    policy: Policy, values: dict[str, list[float]], reached: dict[str, int]
) -> dict[str, int]:
    """{run: interval} of the cancellations when each run in `reached` goes
    from `reached[run]` values to all of its values."""
    curves = curves_from(values)
    decisions = evaluate(policy, curves, {r: (b, len(values[r])) for r, b in reached.items()})
    return {d.run_id: d.interval for d in decisions}


def test_applies_at_interval_and_delay() -> None:
    p = bandit(slack_factor=0.1, evaluation_interval=2, delay_evaluation=5)
    # Multiples of 2 that are >= 5: 6, 8, 10 ...
    assert [n for n in range(0, 11) if applies_at(p, n)] == [6, 8, 10]
    assert crossed(p, 0, 10) == [6, 8, 10]
    assert crossed(p, 6, 9) == [8]
    assert crossed(p, 6, 7) == []
    # Defaults (interval 1, delay 0): every interval from 1.
    d = bandit(slack_amount=0.0)
    assert crossed(d, 0, 3) == [1, 2, 3]
    # delay equal to a multiple: applied at the delay itself.
    assert crossed(bandit(slack_factor=0.1, evaluation_interval=5, delay_evaluation=10), 0, 20) == [
        10,
        15,
        20,
    ]


def test_bandit_slack_factor_maximize() -> None:
    # slack_factor 0.2, every interval. At interval 2: bests so far
    # a = max(0.5, 0.8) = 0.8 (the best run), b = max(0.6, 0.6) = 0.6,
    # c = max(0.7, 0.65) = 0.7.
    # b: 0.6 * 1.2 = 0.72 < 0.8 -> cancelled. c: 0.7 * 1.2 = 0.84 >= 0.8 -> kept.
    # At interval 1: a = 0.5, b = 0.6, c = 0.7 (best 0.7): b 0.72 >= 0.7, a 0.6 < 0.7:
    # a would be cancelled at 1 -- so here only a's interval 2 is new.
    values = {"a": [0.5, 0.8], "b": [0.6, 0.6], "c": [0.7, 0.65]}
    assert cancelled(bandit(slack_factor=0.2), values, {"a": 1, "b": 1, "c": 1}) == {"b": 2}
    # Evaluated from scratch, a is cancelled at interval 1 (0.5 * 1.2 = 0.6 < 0.7)
    # and b at 2; c never.
    assert cancelled(bandit(slack_factor=0.2), values, {"a": 0, "b": 0, "c": 0}) == {
        "a": 1,
        "b": 2,
    }
    d = evaluate_child(bandit(slack_factor=0.2), curves_from(values), "b", 2)
    assert d is not None and d.cancel and d.compared == 3
    assert d.value == 0.6 and d.threshold == pytest.approx(0.8 / 1.2)
    assert "'a'" in d.reason and "slack_factor 0.2" in d.reason


def test_bandit_slack_amount_and_minimize() -> None:
    # slack_amount 0.2, maximize, interval 3: bests a 0.8, b 0.61, c 0.59.
    # The bound is 0.8 - 0.2 = 0.6: c (0.59 < 0.6) cancelled, b (0.61) kept.
    values = {"a": [0.1, 0.8, 0.3], "b": [0.61, 0.2, 0.2], "c": [0.5, 0.59, 0.1]}
    p = bandit(slack_amount=0.2, evaluation_interval=3)
    assert cancelled(p, values, {"a": 0, "b": 0, "c": 0}) == {"c": 3}
    # Minimize a loss, slack_factor 0.5, interval 2: best-so-far = smallest:
    # a min(2.0, 1.0) = 1.0 (best), b min(1.6, 1.4) = 1.4, c min(3.0, 1.6) = 1.6.
    # Bound 1.0 * 1.5 = 1.5: c (1.6 > 1.5) cancelled, b (1.4) kept.
    loss = {"a": [2.0, 1.0], "b": [1.6, 1.4], "c": [3.0, 1.6]}
    p = bandit(MIN, slack_factor=0.5, evaluation_interval=2)
    assert cancelled(p, loss, {"a": 0, "b": 0, "c": 0}) == {"c": 2}
    # Minimize, slack_amount 0.5: bound 1.0 + 0.5 = 1.5 again: c cancelled.
    p = bandit(MIN, slack_amount=0.5, evaluation_interval=2)
    assert cancelled(p, loss, {"a": 0, "b": 0, "c": 0}) == {"c": 2}


def test_young_run_is_compared_only_up_to_its_interval() -> None:
    # a has logged 4 values, the last very good (0.99); b has logged 2.
    # b at interval 2 is compared with a's first 2 values only: a's best is
    # 0.5, b's 0.45; 0.45 * 1.1 = 0.495 < 0.5 -> cancelled at 2.
    # Had a's 0.99 counted, the bound would have been 0.9 (also cancelled):
    # the next case shows it matters.
    values = {"a": [0.4, 0.5, 0.6, 0.99], "b": [0.3, 0.46]}
    p = bandit(slack_factor=0.1)
    # 0.46 * 1.1 = 0.506 >= 0.5: kept at 2, though far below a's later 0.99.
    assert cancelled(p, values, {"b": 1}) == {}
    values["b"] = [0.3, 0.45]
    assert cancelled(p, values, {"b": 1}) == {"b": 2}


def test_median_stopping() -> None:
    # Every interval from 3 (delay 3). At interval 3 (binary-exact numbers):
    #   a: values 0.5 0.75 1.0  -> best 1.0, running average 0.75
    #   b: 0.5 0.5 0.5          -> best 0.5, average 0.5
    #   c: 0.0 0.25 0.5         -> best 0.5, average 0.25
    # Median of the averages (0.25, 0.5, 0.75) = 0.5.
    # b and c: 0.5 is not (strictly) worse than 0.5 -> kept; a kept.
    p = Policy(PolicyKind.MEDIAN_STOPPING, "acc", MAX, delay_evaluation=3)
    values = {"a": [0.5, 0.75, 1.0], "b": [0.5, 0.5, 0.5], "c": [0.0, 0.25, 0.5]}
    assert cancelled(p, values, {"a": 0, "b": 0, "c": 0}) == {}
    # d joins: 0.0 0.0 0.375 -> best 0.375, average 0.125; averages
    # (0.125, 0.25, 0.5, 0.75): median (0.25 + 0.5) / 2 = 0.375. d's best is
    # not strictly worse -> kept. With 0.25 as its third value: average
    # 0.0833, median still 0.375, best 0.25 < 0.375 -> cancelled at 3.
    values["d"] = [0.0, 0.0, 0.375]
    assert cancelled(p, values, {"d": 0}) == {}
    values["d"] = [0.0, 0.0, 0.25]
    assert cancelled(p, values, {"d": 0}) == {"d": 3}
    d = evaluate_child(p, curves_from(values), "d", 3)
    assert d is not None and d.threshold == 0.375 and d.compared == 4
    # Minimize: losses, interval 2. a: 1.0 0.8 (best 0.8, avg 0.9),
    # b: 2.0 1.8 (best 1.8, avg 1.9), c: 1.2 1.1 (best 1.1, avg 1.15).
    # Median of (0.9, 1.15, 1.9) = 1.15: b (1.8 > 1.15) cancelled; c 1.1 kept.
    p = Policy(PolicyKind.MEDIAN_STOPPING, "loss", MIN, evaluation_interval=2)
    loss = {"a": [1.0, 0.8], "b": [2.0, 1.8], "c": [1.2, 1.1]}
    assert cancelled(p, loss, {"a": 0, "b": 0, "c": 0}) == {"b": 2}


def test_truncation_selection() -> None:
    # 20%, interval 2. Five runs at interval 2, bests a .9 b .8 c .7 d .6 e .5:
    # floor(5 * 20 / 100) = 1 -> only the worst (e) is cancelled.
    p = Policy(PolicyKind.TRUNCATION_SELECTION, "acc", MAX, evaluation_interval=2,
               truncation_percentage=20)  # fmt: skip
    values = {r: [0.0, v] for r, v in zip("abcde", [0.9, 0.8, 0.7, 0.6, 0.5], strict=True)}
    assert cancelled(p, values, dict.fromkeys("abcde", 0)) == {"e": 2}
    # Four runs: floor(4 * 0.2) = 0 -> nobody.
    four = {r: values[r] for r in "abcd"}
    assert cancelled(p, four, dict.fromkeys("abcd", 0)) == {}
    # 50% of five = 2: d and e.
    p50 = Policy(PolicyKind.TRUNCATION_SELECTION, "acc", MAX, evaluation_interval=2,
                 truncation_percentage=50)  # fmt: skip
    assert cancelled(p50, values, dict.fromkeys("abcde", 0)) == {"d": 2, "e": 2}
    # A tie at the cut: d and e both 0.5, 20% -> cut 1; each has the other
    # "not better" than itself, so each ranks 2nd from the worst: kept.
    values["d"] = [0.0, 0.5]
    assert cancelled(p, values, dict.fromkeys("abcde", 0)) == {}
    # Minimize: the largest loss is the worst.
    pm = Policy(PolicyKind.TRUNCATION_SELECTION, "loss", MIN, truncation_percentage=20)
    loss = {r: [v] for r, v in zip("abcde", [0.1, 0.2, 0.3, 0.4, 0.5], strict=True)}
    assert cancelled(pm, loss, dict.fromkeys("abcde", 0)) == {"e": 1}


def test_nan_values_and_children_short_of_the_interval() -> None:
    # NaN counts as an interval but never as a best. Interval 3, slack 0.1:
    # a: 0.5 NaN 0.9 -> best 0.9; b: NaN NaN NaN -> no finite value: not
    # judged (kept) and no reference; c: 0.7 NaN NaN -> best 0.7:
    # 0.7 * 1.1 = 0.77 < 0.9 -> cancelled at 3.
    # d has logged only 2 values: it has not reached 3, is not evaluated and
    # is no reference (its 5.0 would have cancelled everyone).
    p = bandit(slack_factor=0.1, evaluation_interval=3)
    values = {
        "a": [0.5, NAN, 0.9],
        "b": [NAN, NAN, NAN],
        "c": [0.7, NAN, NAN],
        "d": [0.1, 5.0],
    }
    assert cancelled(p, values, dict.fromkeys("abcd", 0)) == {"c": 3}
    d = evaluate_child(p, curves_from(values), "b", 3)
    assert d is not None and not d.cancel and "no finite" in d.reason
    assert evaluate_child(p, curves_from(values), "d", 3) is None
    # Infinities are skipped too.
    c = Curve([math.inf, 1.0, -math.inf])
    assert c.best(3, MAX) == 1.0 and c.average(3) == 1.0


def test_a_child_alone_is_never_cancelled_and_stops_at_first_cancel() -> None:
    for p in (
        bandit(slack_amount=0.0),
        Policy(PolicyKind.MEDIAN_STOPPING, "acc", MAX),
        Policy(PolicyKind.TRUNCATION_SELECTION, "acc", MAX, truncation_percentage=99),
    ):
        assert cancelled(p, {"solo": [0.1, 0.0, 0.0]}, {"solo": 0}) == {}
    # One decision per cancelled child: b would fail at 1, 2 and 3.
    curves = curves_from({"a": [1.0, 1.0, 1.0], "b": [0.0, 0.0, 0.0]})
    decisions = evaluate(bandit(slack_amount=0.1), curves, {"b": (0, 3)})
    assert [(d.run_id, d.interval) for d in decisions] == [("b", 1)]


def test_policy_validation() -> None:
    with pytest.raises(PolicyError) as err:
        bandit()
    assert err.value.field == "slack_factor"
    with pytest.raises(PolicyError):
        bandit(slack_factor=0.1, slack_amount=0.1)
    with pytest.raises(PolicyError) as err:
        bandit(slack_factor=-1.0)
    assert err.value.field == "slack_factor"
    with pytest.raises(PolicyError) as err:
        bandit(slack_amount=math.nan)
    assert err.value.field == "slack_amount"
    with pytest.raises(PolicyError) as err:
        bandit(slack_factor=0.1, evaluation_interval=0)
    assert err.value.field == "evaluation_interval"
    with pytest.raises(PolicyError) as err:
        bandit(slack_factor=0.1, delay_evaluation=-1)
    assert err.value.field == "delay_evaluation"
    with pytest.raises(PolicyError) as err:
        Policy(PolicyKind.TRUNCATION_SELECTION, "acc", MAX, truncation_percentage=100)
    assert err.value.field == "truncation_percentage"
    with pytest.raises(PolicyError) as err:
        Policy(PolicyKind.MEDIAN_STOPPING, "acc", MAX, slack_factor=0.1)
    assert err.value.field == "slack_factor"
    with pytest.raises(PolicyError) as err:
        Policy(PolicyKind.MEDIAN_STOPPING, "", MAX)
    assert err.value.field == "primary_metric"
