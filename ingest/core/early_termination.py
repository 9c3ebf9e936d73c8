"""Early termination of a sweep's child runs: Azure ML's Bandit, median
stopping and truncation selection policies, as pure code (no I/O).

Semantics (Azure ML's documented ones; README "Early termination"):

- An *interval* is one logged value of the primary metric: a child's k-th
  point of that series, in step order, is its interval k (1-based).
- The policy is *applied* at interval N when N is a multiple of
  `evaluation_interval` and N >= `delay_evaluation` (and N >= 1).
- A child is evaluated at interval N when it reaches N (logs its N-th
  value), once per such N. It is compared with every child of the same
  parent that has reached N too, whatever its status (finished and cancelled
  children keep their history), using only their first N values, even if
  they logged more (so a young run is never judged against an older run's
  later, better values).
- A child's *best so far* at N is the best of its first N values (the
  largest for goal maximize, the smallest for minimize). Values that are
  not finite (NaN, +-Inf) count as intervals but never as a best or in an
  average; a child with no finite value among its first N is not compared
  at N (neither judged nor a reference).
- Bandit: B is the best of the compared children's bests so far at N (the
  best performing run). With slack_factor s the child is cancelled when its
  best Y is outside the slack: maximize Y * (1 + s) < B (i.e. Y < B / (1 + s),
  Azure's "(Y + Y * s) compared with B"); minimize Y > B * (1 + s). With
  slack_amount a: maximize Y < B - a; minimize Y > B + a.
- Median stopping: each compared child's running average at N is the mean
  of its finite values among its first N; the child is cancelled when its
  best so far is strictly worse than the median of those running averages
  (the child's own included).
- Truncation selection: the compared children are ranked by best so far at
  N; the worst floor(n * truncation_percentage / 100) of the n are the
  lowest X%; the child is cancelled when it is among them, ties ranked in
  the evaluated child's favour (a tie never cancels it).

A child alone at N is never cancelled by any policy.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

__all__ = [
    "Curve",
    "Decision",
    "Goal",
    "Policy",
    "PolicyKind",
    "applies_at",
    "crossed",
    "evaluate",
    "evaluate_child",
]

MAX_INTERVAL = 1_000_000_000


class Goal(StrEnum):
    MAXIMIZE = "maximize"
    MINIMIZE = "minimize"


class PolicyKind(StrEnum):
    BANDIT = "bandit"
    MEDIAN_STOPPING = "median_stopping"
    TRUNCATION_SELECTION = "truncation_selection"


class PolicyError(ValueError):
    """A policy's parameters are invalid; `field` names the parameter."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class Policy:
    kind: PolicyKind
    primary_metric: str
    goal: Goal
    evaluation_interval: int = 1
    delay_evaluation: int = 0
    slack_factor: float | None = None  # bandit: one of these two
    slack_amount: float | None = None
    truncation_percentage: int = 0  # truncation selection: 1..99
    # The labels of the primary metric's series in each child ({} : none).
    labels: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.primary_metric:
            raise PolicyError("primary_metric", "is required")
        if not 1 <= self.evaluation_interval <= MAX_INTERVAL:
            raise PolicyError("evaluation_interval", f"must be 1..{MAX_INTERVAL}")
        if not 0 <= self.delay_evaluation <= MAX_INTERVAL:
            raise PolicyError("delay_evaluation", f"must be 0..{MAX_INTERVAL}")
        if self.kind is PolicyKind.BANDIT:
            if (self.slack_factor is None) == (self.slack_amount is None):
                raise PolicyError(
                    "slack_factor",
                    "a bandit policy takes exactly one of slack_factor and slack_amount",
                )
            for name, value in (
                ("slack_factor", self.slack_factor),
                ("slack_amount", self.slack_amount),
            ):
                if value is not None and not (math.isfinite(value) and value >= 0):
                    raise PolicyError(name, "must be a finite number >= 0")
        elif self.slack_factor is not None or self.slack_amount is not None:
            raise PolicyError("slack_factor", f"only a bandit policy has a slack, not {self.kind}")
        if self.kind is PolicyKind.TRUNCATION_SELECTION:
            if not 1 <= self.truncation_percentage <= 99:
                raise PolicyError("truncation_percentage", "must be 1..99")
        elif self.truncation_percentage:
            raise PolicyError(
                "truncation_percentage", f"only truncation selection has one, not {self.kind}"
            )

    def better(self, a: float, b: float) -> bool:
        """a is strictly better than b."""
        return a > b if self.goal is Goal.MAXIMIZE else a < b


class Curve:
    """One child's primary metric, interval by interval, with prefix
    statistics so that the best so far and the running average at any
    interval cost O(1). Append-only."""

    __slots__ = ("_best_max", "_best_min", "_finite", "_sum")

    def __init__(self, values: Iterable[float] = ()) -> None:
        self._best_max: list[float] = []  # NaN until the first finite value
        self._best_min: list[float] = []
        self._sum: list[float] = []
        self._finite: list[int] = []
        self.extend(values)

    def __len__(self) -> int:
        return len(self._sum)

    def extend(self, values: Iterable[float]) -> None:
        for v in values:
            hi = self._best_max[-1] if self._best_max else math.nan
            lo = self._best_min[-1] if self._best_min else math.nan
            total = self._sum[-1] if self._sum else 0.0
            count = self._finite[-1] if self._finite else 0
            if math.isfinite(v):
                hi = v if math.isnan(hi) or v > hi else hi
                lo = v if math.isnan(lo) or v < lo else lo
                total += v
                count += 1
            self._best_max.append(hi)
            self._best_min.append(lo)
            self._sum.append(total)
            self._finite.append(count)

    def best(self, n: int, goal: Goal) -> float | None:
        """The best finite value among the first n (None: none)."""
        if n < 1 or n > len(self) or self._finite[n - 1] == 0:
            return None
        return (self._best_max if goal is Goal.MAXIMIZE else self._best_min)[n - 1]

    def average(self, n: int) -> float | None:
        """The mean of the finite values among the first n (None: none)."""
        if n < 1 or n > len(self) or self._finite[n - 1] == 0:
            return None
        return self._sum[n - 1] / self._finite[n - 1]


@dataclass(frozen=True)
class Decision:
    """What the policy decided for one child at one interval."""

    run_id: str
    interval: int
    cancel: bool
    reason: str
    value: float | None = None  # the child's best so far
    threshold: float | None = None  # bandit / median: the bound it had to meet
    compared: int = 0  # children compared at this interval (itself included)


def applies_at(policy: Policy, n: int) -> bool:
    """Whether the policy is applied at interval n."""
    return n >= 1 and n % policy.evaluation_interval == 0 and n >= policy.delay_evaluation


def crossed(policy: Policy, before: int, after: int) -> list[int]:
    """The intervals the policy is applied at in (before, after], ascending:
    a child that went from `before` to `after` values reached these."""
    e = policy.evaluation_interval
    first = max(before + 1, policy.delay_evaluation, 1)
    start = -(-first // e) * e  # the first multiple of e >= first
    return list(range(start, after + 1, e))


def _fmt(v: float) -> str:
    return f"{v:.6g}"


def evaluate_child(
    policy: Policy, curves: Mapping[str, Curve], run_id: str, n: int
) -> Decision | None:
    """Evaluate child `run_id` at interval n against every child in
    `curves` that has reached n. None when the policy does not apply at n
    or the child has not reached n."""
    if not applies_at(policy, n) or run_id not in curves or len(curves[run_id]) < n:
        return None
    goal = policy.goal
    metric = policy.primary_metric
    y = curves[run_id].best(n, goal)
    if y is None:
        return Decision(run_id, n, False, f"no finite {metric!r} value in intervals 1..{n}")
    bests: dict[str, float] = {}
    for rid, curve in curves.items():
        if len(curve) >= n:
            b = curve.best(n, goal)
            if b is not None:
                bests[rid] = b
    k = len(bests)
    word = "largest" if goal is Goal.MAXIMIZE else "smallest"
    head = f"{policy.kind} at interval {n}: best {metric!r} {_fmt(y)} ({word} of intervals 1..{n})"
    if policy.kind is PolicyKind.BANDIT:
        leader = (
            max(bests, key=lambda r: bests[r])
            if goal is Goal.MAXIMIZE
            else min(bests, key=lambda r: bests[r])
        )
        b = bests[leader]
        if policy.slack_factor is not None:
            s = policy.slack_factor
            if goal is Goal.MAXIMIZE:
                cancel, bound = y * (1 + s) < b, b / (1 + s)
                rule = f"{_fmt(y)} * (1 + {_fmt(s)}) < {_fmt(b)}"
            else:
                cancel, bound = y > b * (1 + s), b * (1 + s)
                rule = f"{_fmt(y)} > {_fmt(b)} * (1 + {_fmt(s)})"
            slack = f"slack_factor {_fmt(s)}"
        else:
            a = policy.slack_amount or 0.0
            if goal is Goal.MAXIMIZE:
                cancel, bound = y < b - a, b - a
                rule = f"{_fmt(y)} < {_fmt(b)} - {_fmt(a)}"
            else:
                cancel, bound = y > b + a, b + a
                rule = f"{_fmt(y)} > {_fmt(b)} + {_fmt(a)}"
            slack = f"slack_amount {_fmt(a)}"
        ref = f"the best run {leader!r} had {_fmt(b)} ({k} runs compared)"
        if cancel:
            reason = f"{head} is outside the {slack} of the best: {rule}; {ref}"
        else:
            reason = f"{head} is within the {slack} of the best; {ref}"
        return Decision(run_id, n, cancel, reason, y, bound, k)
    if policy.kind is PolicyKind.MEDIAN_STOPPING:
        averages = [avg for rid in bests if (avg := curves[rid].average(n)) is not None]
        median = statistics.median(averages)
        cancel = policy.better(median, y)
        verb = "is worse than" if cancel else "is not worse than"
        reason = (
            f"{head} {verb} the median {_fmt(median)} of the running averages over "
            f"intervals 1..{n} of the {k} runs compared"
        )
        return Decision(run_id, n, cancel, reason, y, median, k)
    # Truncation selection.
    cut = k * policy.truncation_percentage // 100
    # Position from the worst, y placed after every child not better than
    # it (ties in its favour).
    position = 1 + sum(1 for rid, b in bests.items() if rid != run_id and not policy.better(b, y))
    cancel = position <= cut
    where = f"ranks {position} from the worst of {k} runs compared"
    lowest = f"the lowest {policy.truncation_percentage}% are the worst {cut}"
    reason = f"{head} {where}; {lowest}"
    return Decision(run_id, n, cancel, reason, y, None, k)


def evaluate(
    policy: Policy,
    curves: Mapping[str, Curve],
    reached: Mapping[str, tuple[int, int]],
) -> list[Decision]:
    """The decisions for children that just reached new intervals:
    `reached[run_id] = (before, after)` are its value counts before and after
    the commit. Each child is evaluated at every interval it crossed, in
    order, and stops at its first cancellation (one decision per cancelled
    child; none for a child that survives everything)."""
    out: list[Decision] = []
    for run_id, (before, after) in sorted(reached.items()):
        for n in crossed(policy, before, min(after, len(curves.get(run_id, ())))):
            d = evaluate_child(policy, curves, run_id, n)
            if d is not None and d.cancel:
                out.append(d)
                break
    return out


def curves_from(values: Mapping[str, Sequence[float]]) -> dict[str, Curve]:
    """Curves from plain lists (tests, and a store's first load)."""
    return {rid: Curve(v) for rid, v in values.items()}
