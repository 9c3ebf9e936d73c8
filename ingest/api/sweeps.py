"""RunService's early-termination RPCs (SetEarlyTerminationPolicy,
GetEarlyTerminationPolicy) and the proto <-> domain conversion of a policy.
`SweepRunServicer` is the RunService with them (server.py registers it)."""

from __future__ import annotations

from typing import Any

import grpc

from ingest.api.common import handle_errors
from ingest.api.metadata import RunServicer
from ingest.core import model
from ingest.core.early_termination import Goal, Policy, PolicyError, PolicyKind
from ingest.core.errors import invalid
from ingest.store.metadata import MetadataStore
from ingest.store.sweeps import SweepStore
from ingest.write.sweeps import EarlyTermination
from steplog.v1 import run_service_pb2 as rs

Ctx = grpc.aio.ServicerContext[Any, Any]

__all__ = ["SweepRunServicer", "policy_from_proto", "policy_to_proto"]

_GOALS = {rs.METRIC_GOAL_MAXIMIZE: Goal.MAXIMIZE, rs.METRIC_GOAL_MINIMIZE: Goal.MINIMIZE}
_GOALS_BACK = {v: k for k, v in _GOALS.items()}
MAX_METRIC_CHARS = 255


def policy_from_proto(p: rs.EarlyTerminationPolicy) -> Policy:
    """A valid domain policy, or INVALID_ARGUMENT naming the field
    (policy.<field>)."""
    name = p.primary_metric
    if not name or len(name) > MAX_METRIC_CHARS:
        raise invalid("policy.primary_metric", f"is required, 1..{MAX_METRIC_CHARS} characters")
    goal = _GOALS.get(p.goal)
    if goal is None:
        raise invalid("policy.goal", "must be METRIC_GOAL_MAXIMIZE or METRIC_GOAL_MINIMIZE")
    which = p.WhichOneof("policy")
    slack_factor = slack_amount = None
    truncation = 0
    if which == "bandit":
        slack = p.bandit.WhichOneof("slack")
        if slack is None:
            raise invalid(
                "policy.bandit.slack_factor", "one of slack_factor, slack_amount is required"
            )
        if slack == "slack_factor":
            slack_factor = p.bandit.slack_factor
        else:
            slack_amount = p.bandit.slack_amount
        kind = PolicyKind.BANDIT
    elif which == "median_stopping":
        kind = PolicyKind.MEDIAN_STOPPING
    elif which == "truncation_selection":
        kind = PolicyKind.TRUNCATION_SELECTION
        truncation = p.truncation_selection.truncation_percentage
    else:
        raise invalid(
            "policy.policy", "one of bandit, median_stopping, truncation_selection is required"
        )
    try:
        return Policy(
            kind=kind,
            primary_metric=name,
            goal=goal,
            evaluation_interval=p.evaluation_interval or 1,
            delay_evaluation=p.delay_evaluation,
            slack_factor=slack_factor,
            slack_amount=slack_amount,
            truncation_percentage=truncation,
            labels=dict(p.primary_metric_labels),
        )
    except PolicyError as exc:
        prefix = {
            "slack_factor": "policy.bandit.",
            "slack_amount": "policy.bandit.",
            "truncation_percentage": "policy.truncation_selection.",
        }.get(exc.field, "policy.")
        raise invalid(prefix + exc.field, exc.message) from None


def policy_to_proto(policy: Policy) -> rs.EarlyTerminationPolicy:
    p = rs.EarlyTerminationPolicy(
        primary_metric=policy.primary_metric,
        primary_metric_labels=dict(policy.labels),
        goal=_GOALS_BACK[policy.goal],
        evaluation_interval=policy.evaluation_interval,
        delay_evaluation=policy.delay_evaluation,
    )
    if policy.kind is PolicyKind.BANDIT:
        if policy.slack_factor is not None:
            p.bandit.slack_factor = policy.slack_factor
        else:
            p.bandit.slack_amount = policy.slack_amount or 0.0
    elif policy.kind is PolicyKind.MEDIAN_STOPPING:
        p.median_stopping.SetInParent()
    else:
        p.truncation_selection.truncation_percentage = policy.truncation_percentage
    return p


class SweepRunServicer(RunServicer):
    """RunService, with the early-termination policy of a parent run."""

    def __init__(
        self, store: MetadataStore, sweeps: SweepStore, evaluator: EarlyTermination | None
    ) -> None:
        super().__init__(store)
        self.sweeps = sweeps
        self.evaluator = evaluator

    @handle_errors
    async def SetEarlyTerminationPolicy(
        self, request: rs.SetEarlyTerminationPolicyRequest, context: Ctx
    ) -> rs.SetEarlyTerminationPolicyResponse:
        workspace = model.workspace_name(request.workspace)
        run_id = model.run_id(request.run_id)
        policy = policy_from_proto(request.policy) if request.HasField("policy") else None
        await self.sweeps.set_policy(workspace, run_id, policy)
        if self.evaluator is not None:
            self.evaluator.policy_changed(workspace, run_id, policy)
        if policy is None:
            return rs.SetEarlyTerminationPolicyResponse()
        return rs.SetEarlyTerminationPolicyResponse(policy=policy_to_proto(policy))

    @handle_errors
    async def GetEarlyTerminationPolicy(
        self, request: rs.GetEarlyTerminationPolicyRequest, context: Ctx
    ) -> rs.GetEarlyTerminationPolicyResponse:
        workspace = model.workspace_name(request.workspace)
        policy = await self.sweeps.get_policy(workspace, model.run_id(request.run_id))
        if policy is None:
            return rs.GetEarlyTerminationPolicyResponse()
        return rs.GetEarlyTerminationPolicyResponse(policy=policy_to_proto(policy))
