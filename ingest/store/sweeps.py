"""Early-termination policies in the database (migration 009): a parent
run's policy, the children's primary-metric curves, and the move of a child
to CancelRequested with its reason (ingest/write/sweeps.py decides when)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import asyncpg

from ingest.core.decode import labels_key
from ingest.core.early_termination import Goal, Policy, PolicyKind
from ingest.core.errors import not_found
from ingest.store.db import acquire

__all__ = ["INTERVAL_KEY", "REASON_KEY", "SweepStore", "policy_from_json", "policy_to_json"]

# The child's properties that say why the policy cancelled it.
REASON_KEY = "steplog.early_termination.reason"
INTERVAL_KEY = "steplog.early_termination.interval"

MIN_STEP = -(2**63)


def policy_to_json(policy: Policy) -> dict[str, Any]:
    """The policy as the jsonb column holds it (the pool's codec encodes)."""
    return dict(
        {
            "kind": str(policy.kind),
            "primary_metric": policy.primary_metric,
            "labels": dict(policy.labels),
            "goal": str(policy.goal),
            "evaluation_interval": policy.evaluation_interval,
            "delay_evaluation": policy.delay_evaluation,
            "slack_factor": policy.slack_factor,
            "slack_amount": policy.slack_amount,
            "truncation_percentage": policy.truncation_percentage,
        }
    )


def policy_from_json(text: str | Mapping[str, Any]) -> Policy:
    d = json.loads(text) if isinstance(text, str) else dict(text)
    return Policy(
        kind=PolicyKind(d["kind"]),
        primary_metric=d["primary_metric"],
        goal=Goal(d["goal"]),
        evaluation_interval=int(d["evaluation_interval"]),
        delay_evaluation=int(d["delay_evaluation"]),
        slack_factor=d.get("slack_factor"),
        slack_amount=d.get("slack_amount"),
        truncation_percentage=int(d.get("truncation_percentage") or 0),
        labels=dict(d.get("labels") or {}),
    )


class SweepStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def _require_run(self, conn: asyncpg.Connection, workspace: str, run_id: str) -> None:
        found = await conn.fetchval(
            "SELECT 1 FROM runs WHERE workspace = $1 AND run_id = $2", workspace, run_id
        )
        if found is None:
            raise not_found("run_id", f"run {run_id!r} does not exist in workspace {workspace!r}")

    async def set_policy(self, workspace: str, run_id: str, policy: Policy | None) -> None:
        """Attach, replace or (None) remove the run's policy."""
        async with acquire(self.pool, transaction=True) as conn:
            await self._require_run(conn, workspace, run_id)
            if policy is None:
                await conn.execute(
                    "DELETE FROM early_termination_policies WHERE workspace = $1 AND run_id = $2",
                    workspace,
                    run_id,
                )
                return
            await conn.execute(
                "INSERT INTO early_termination_policies (workspace, run_id, policy, labels_key)"
                " VALUES ($1, $2, $3, $4)"
                " ON CONFLICT (workspace, run_id) DO UPDATE"
                " SET policy = EXCLUDED.policy, labels_key = EXCLUDED.labels_key,"
                " updated_at = now()",
                workspace,
                run_id,
                policy_to_json(policy),
                labels_key(dict(policy.labels)),
            )

    async def get_policy(self, workspace: str, run_id: str) -> Policy | None:
        async with acquire(self.pool) as conn:
            await self._require_run(conn, workspace, run_id)
            text = await conn.fetchval(
                "SELECT policy FROM early_termination_policies"
                " WHERE workspace = $1 AND run_id = $2",
                workspace,
                run_id,
            )
        return None if text is None else policy_from_json(text)

    async def metric_names(self) -> frozenset[str]:
        """The primary metrics of every policy (what a commit is checked for)."""
        async with acquire(self.pool) as conn:
            rows = await conn.fetch(
                "SELECT DISTINCT policy->>'primary_metric' AS name FROM early_termination_policies"
            )
        return frozenset(r["name"] for r in rows)

    async def parent_policy(self, workspace: str, run_id: str) -> tuple[str, Policy] | None:
        """(parent id, policy) when the run's parent carries a policy."""
        async with acquire(self.pool) as conn:
            row = await conn.fetchrow(
                "SELECT r.parent_run_id, p.policy FROM runs r"
                " JOIN early_termination_policies p"
                " ON p.workspace = r.workspace AND p.run_id = r.parent_run_id"
                " WHERE r.workspace = $1 AND r.run_id = $2",
                workspace,
                run_id,
            )
        if row is None:
            return None
        return row["parent_run_id"], policy_from_json(row["policy"])

    async def point_count(self, workspace: str, run_id: str, name: str, key: str) -> int:
        """How many visible points the series has (0: no such series)."""
        async with acquire(self.pool) as conn:
            n = await conn.fetchval(
                "SELECT point_count FROM series"
                " WHERE workspace = $1 AND run_id = $2 AND name = $3 AND labels_key = $4",
                workspace,
                run_id,
                name,
                key,
            )
        return int(n or 0)

    async def curves_after(
        self,
        workspace: str,
        parent_id: str,
        name: str,
        key: str,
        last_steps: Mapping[str, int],
        limit: int,
    ) -> dict[str, list[tuple[int, float]]] | None:
        """The children's visible points of the series (name, labels key),
        in step order, after each child's `last_steps` entry (all of a
        child not in it): child id -> [(step, value), ...]; None when there
        are more than `limit` (the caller's memory bound)."""
        ids: Sequence[str] = list(last_steps)
        async with acquire(self.pool) as conn:
            rows = await conn.fetch(
                "SELECT s.run_id, p.step, p.value FROM runs r"
                " JOIN series s ON s.workspace = r.workspace AND s.run_id = r.run_id"
                "  AND s.name = $3 AND s.labels_key = $4"
                " LEFT JOIN unnest($5::text[], $6::bigint[]) AS k(run_id, last_step)"
                "  ON k.run_id = s.run_id"
                # Only the blocks past each child's last step are read (migration 010).
                " JOIN LATERAL scalar_points_in(ARRAY[s.series_id], coalesce(k.last_step, $7),"
                "  9223372036854775807) p ON NOT p.hidden AND p.step > coalesce(k.last_step, $7)"
                " WHERE r.workspace = $1 AND r.parent_run_id = $2"
                " ORDER BY s.run_id, p.step LIMIT $8",
                workspace,
                parent_id,
                name,
                key,
                ids,
                [last_steps[i] for i in ids],
                MIN_STEP,
                max(0, limit) + 1,
            )
        if len(rows) > limit:
            return None
        out: dict[str, list[tuple[int, float]]] = {}
        for r in rows:
            out.setdefault(r["run_id"], []).append((int(r["step"]), float(r["value"])))
        return out

    async def request_cancel(self, workspace: str, run_id: str, reason: str, interval: int) -> bool:
        """Move the child to CancelRequested with its reason (properties),
        unless it has moved on already (CancelRequested, Finalizing or a
        terminal status). True when it moved."""
        async with acquire(self.pool, transaction=True) as conn:
            row = await conn.fetchrow(
                "UPDATE runs SET status = 'CancelRequested',"
                " properties = properties || jsonb_build_object($3::text, $4::text,"
                "  $5::text, $6::text)"
                " WHERE workspace = $1 AND run_id = $2"
                " AND status IN ('NotStarted', 'Queued', 'Running')"
                " AND NOT properties ? $3"
                " RETURNING run_id",
                workspace,
                run_id,
                REASON_KEY,
                reason,
                INTERVAL_KEY,
                str(interval),
            )
        return row is not None
