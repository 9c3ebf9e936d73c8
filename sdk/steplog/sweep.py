"""Early-termination policies for sweeps, named and shaped as Azure ML's
(`azureml.train.hyperdrive.BanditPolicy`, `MedianStoppingPolicy`,
`TruncationSelectionPolicy`, `PrimaryMetricGoal`). Attach one to a parent
run with `parent.set_early_termination_policy(policy, primary_metric=...,
goal=...)`; the service then judges the parent's children as their points
arrive and moves those that fall behind to CancelRequested (the child's
`run.should_stop()` turns True within one heartbeat). The semantics are in
the README ("Early termination") and in protos/steplog/v1/run_service.proto.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum

from steplog.v1 import run_service_pb2 as rs

__all__ = [
    "BanditPolicy",
    "EarlyTerminationPolicy",
    "MedianStoppingPolicy",
    "PrimaryMetricGoal",
    "TruncationSelectionPolicy",
    "policy_from_proto",
]

# The child's properties that say why its parent's policy cancelled it.
REASON_PROPERTY = "steplog.early_termination.reason"
INTERVAL_PROPERTY = "steplog.early_termination.interval"


class PrimaryMetricGoal(Enum):
    """Whether larger (MAXIMIZE) or smaller (MINIMIZE) values are better."""

    MAXIMIZE = "MAXIMIZE"
    MINIMIZE = "MINIMIZE"


@dataclass(frozen=True)
class EarlyTerminationPolicy:
    """Base of the three policies. An interval is one logged value of the
    primary metric; the policy is applied at every multiple of
    `evaluation_interval` that is >= `delay_evaluation`."""

    evaluation_interval: int = 1
    delay_evaluation: int = 0

    def _fill(self, p: rs.EarlyTerminationPolicy) -> None:
        raise NotImplementedError


@dataclass(frozen=True)
class BanditPolicy(EarlyTerminationPolicy):
    """Cancels a child whose best value so far is not within the slack of
    the best run's: with slack_factor s (maximize) when best * (1 + s) <
    leader; with slack_amount a when best < leader - a (mirrored for
    minimize). Give exactly one of slack_factor and slack_amount."""

    slack_factor: float | None = None
    slack_amount: float | None = None

    def __init__(
        self,
        evaluation_interval: int = 1,
        slack_factor: float | None = None,
        slack_amount: float | None = None,
        delay_evaluation: int = 0,
    ) -> None:
        # Azure's positional order: (evaluation_interval, slack_factor, slack_amount, delay).
        if (slack_factor is None) == (slack_amount is None):
            raise ValueError("BanditPolicy takes exactly one of slack_factor and slack_amount")
        object.__setattr__(self, "evaluation_interval", evaluation_interval)
        object.__setattr__(self, "delay_evaluation", delay_evaluation)
        object.__setattr__(self, "slack_factor", slack_factor)
        object.__setattr__(self, "slack_amount", slack_amount)

    def _fill(self, p: rs.EarlyTerminationPolicy) -> None:
        if self.slack_factor is not None:
            p.bandit.slack_factor = self.slack_factor
        else:
            p.bandit.slack_amount = float(self.slack_amount or 0.0)


@dataclass(frozen=True)
class MedianStoppingPolicy(EarlyTerminationPolicy):
    """Cancels a child whose best value so far is worse than the median of
    the running averages of the children compared at the interval."""

    def _fill(self, p: rs.EarlyTerminationPolicy) -> None:
        p.median_stopping.SetInParent()


@dataclass(frozen=True)
class TruncationSelectionPolicy(EarlyTerminationPolicy):
    """Cancels a child that is among the lowest `truncation_percentage`
    percent (1..99, rounded down) of the children compared at the interval."""

    truncation_percentage: int = 0

    def __init__(
        self, truncation_percentage: int, evaluation_interval: int = 1, delay_evaluation: int = 0
    ) -> None:
        object.__setattr__(self, "truncation_percentage", truncation_percentage)
        object.__setattr__(self, "evaluation_interval", evaluation_interval)
        object.__setattr__(self, "delay_evaluation", delay_evaluation)

    def _fill(self, p: rs.EarlyTerminationPolicy) -> None:
        p.truncation_selection.truncation_percentage = self.truncation_percentage


def goal_to_proto(goal: PrimaryMetricGoal | str) -> rs.MetricGoal.ValueType:
    name = goal.value if isinstance(goal, PrimaryMetricGoal) else str(goal).upper()
    if name == "MAXIMIZE":
        return rs.METRIC_GOAL_MAXIMIZE
    if name == "MINIMIZE":
        return rs.METRIC_GOAL_MINIMIZE
    raise ValueError(f"goal must be 'maximize' or 'minimize', not {goal!r}")


def policy_to_proto(
    policy: EarlyTerminationPolicy,
    primary_metric: str,
    goal: PrimaryMetricGoal | str,
    labels: Mapping[str, str] | None = None,
) -> rs.EarlyTerminationPolicy:
    p = rs.EarlyTerminationPolicy(
        primary_metric=primary_metric,
        primary_metric_labels=dict(labels or {}),
        goal=goal_to_proto(goal),
        evaluation_interval=policy.evaluation_interval,
        delay_evaluation=policy.delay_evaluation,
    )
    policy._fill(p)
    return p


@dataclass(frozen=True)
class AttachedPolicy:
    """A parent run's policy as the service stores it."""

    policy: EarlyTerminationPolicy
    primary_metric: str
    goal: PrimaryMetricGoal
    labels: Mapping[str, str]


def policy_from_proto(p: rs.EarlyTerminationPolicy) -> AttachedPolicy:
    which = p.WhichOneof("policy")
    policy: EarlyTerminationPolicy
    if which == "bandit":
        if p.bandit.WhichOneof("slack") == "slack_factor":
            policy = BanditPolicy(
                p.evaluation_interval, slack_factor=p.bandit.slack_factor,
                delay_evaluation=p.delay_evaluation,
            )  # fmt: skip
        else:
            policy = BanditPolicy(
                p.evaluation_interval, slack_amount=p.bandit.slack_amount,
                delay_evaluation=p.delay_evaluation,
            )  # fmt: skip
    elif which == "median_stopping":
        policy = MedianStoppingPolicy(p.evaluation_interval, p.delay_evaluation)
    else:
        policy = TruncationSelectionPolicy(
            p.truncation_selection.truncation_percentage, p.evaluation_interval, p.delay_evaluation
        )
    goal = (
        PrimaryMetricGoal.MINIMIZE
        if p.goal == rs.METRIC_GOAL_MINIMIZE
        else PrimaryMetricGoal.MAXIMIZE
    )
    return AttachedPolicy(policy, p.primary_metric, goal, dict(p.primary_metric_labels))
