"""deploy/grafana/steplog.json: every query of the dashboard (variables and
panels) runs against the real database, with Grafana's macros expanded the
way its PostgreSQL data source does with the TimescaleDB option on:

- $__timeGroup(col, $__interval)      -> time_bucket('<seconds>s', col)
- $__timeGroupAlias(col, $__interval) -> time_bucket('<seconds>s', col) AS "time"
- $__timeFilter(col)                  -> col BETWEEN '<from RFC 3339>' AND '<to RFC 3339>'
- $var                                -> its value; a multi-value variable in IN (...) is
                                         each value single-quoted, comma-separated
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np
import pytest

from steplog import Experiment

pytestmark = pytest.mark.integration

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "steplog.json"


def expand(
    sql: str, variables: dict[str, str | list[str]], start: datetime, end: datetime, interval_s: int
) -> str:
    def group(m: re.Match[str], alias: bool) -> str:
        col = m.group(1).split(",")[0].strip()
        return f"time_bucket('{interval_s}s', {col})" + (' AS "time"' if alias else "")

    sql = re.sub(r"\$__timeGroupAlias\(([^)]*)\)", lambda m: group(m, True), sql)
    sql = re.sub(r"\$__timeGroup\(([^)]*)\)", lambda m: group(m, False), sql)
    sql = re.sub(
        r"\$__timeFilter\(([^)]*)\)",
        lambda m: f"{m.group(1)} BETWEEN '{start.isoformat()}' AND '{end.isoformat()}'",
        sql,
    )
    sql = sql.replace("$__interval", f"{interval_s}s")
    for name in sorted(variables, key=len, reverse=True):
        value = variables[name]
        if isinstance(value, list):
            text = ",".join("'" + v.replace("'", "''") + "'" for v in value)
        else:
            text = value.replace("'", "''")
        sql = sql.replace(f"${name}", text)
    assert "$" not in sql.replace("$$", ""), sql
    return sql


async def _run(url: str, sql: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        return list(await conn.fetch(sql))
    finally:
        await conn.close()


def run_sql(url: str, sql: str) -> list[Any]:
    return asyncio.run(_run(url, sql))


def unpacked(plan: dict[str, Any]) -> int:
    """The points a plan unpacked from blocks and rows: what its function
    scans (scalar_points' unnest) produced, before their filters."""
    own = 0
    if plan["Node Type"] == "Function Scan":
        rows = plan["Actual Rows"] + plan.get("Rows Removed by Filter", 0)
        own = int(rows * plan["Actual Loops"])
    return own + sum(unpacked(p) for p in plan.get("Plans", []))


def test_the_dashboard_queries_run_against_the_database(url: str, database_url: str) -> None:
    name = f"grafana-{uuid.uuid4().hex[:8]}"
    exp = Experiment(name, url=url)
    # Another experiment's run, its series in blocks: a panel must not unpack them.
    other = Experiment(f"{name}-other", url=url).start_logging()
    steps = np.arange(64)
    other.log_batch({f"m{k}": steps * 1.0 for k in range(20)} | {"loss": steps * 0.5}, steps=steps)
    other.complete()
    (blocks,) = run_sql(
        database_url,
        "SELECT count(*), sum(b.n) FROM scalar_blocks b JOIN series s USING (series_id)"
        f" WHERE s.run_id = '{other.id}'",
    )
    assert tuple(blocks) == (21, 21 * 64), tuple(blocks)
    run_ids = []
    for i in range(2):
        run = exp.start_logging(display_name=f"g{i}")
        for step in range(50):
            run.log("loss", 1.0 / (step + 1) if step != 20 else float("nan"), step=step)
        run.log("loss", 99.0, step=50)
        run.complete()
        run_ids.append(run.id)
    dash = json.loads(DASHBOARD.read_text())
    now = datetime.now(UTC)
    start, end = now - timedelta(hours=1), now + timedelta(minutes=5)
    variables: dict[str, str | list[str]] = {}
    # The variables, in their order: each query's first value feeds the next.
    for var in dash["templating"]["list"]:
        rows = run_sql(database_url, expand(var["query"], variables, start, end, 60))
        assert rows, var["name"]
        values = [r["__value"] if "__value" in r else r[0] for r in rows]
        if var["name"] == "workspace":
            assert "default" in values
            variables["workspace"] = "default"
        elif var["name"] == "experiment":
            assert name in values
            variables["experiment"] = name
        elif var["name"] == "run":
            assert set(run_ids) <= set(values)
            assert all("__text" in r for r in rows)
            variables["run"] = run_ids
        else:
            assert values == ["loss"]
            variables["metric"] = "loss"
    results = {}
    for panel in dash["panels"]:
        for target in panel["targets"]:
            assert target["rawQuery"] and target["format"] in ("time_series", "table")
            sql = expand(target["rawSql"], variables, start, end, 3600)
            results[panel["id"]] = run_sql(database_url, sql)
            if "scalar_points" in sql:
                # The points of the chosen runs' series only, not every block of
                # the database (as 010's view did in a join: migration 012).
                (row,) = run_sql(database_url, "EXPLAIN (ANALYZE, FORMAT JSON) " + sql)
                plan = json.loads(row[0]) if isinstance(row[0], str) else row[0]
                assert unpacked(plan[0]["Plan"]) <= 102, (panel["id"], plan)
    # 1: mean per bucket, one line per run; 2: the max keeps the spike; 3: NaNs counted.
    assert {r["metric"] for r in results[1]} == {"g0", "g1"}
    assert all(r["value"] is not None and r["value"] == r["value"] for r in results[1])
    assert max(r["value"] for r in results[2]) == 99.0
    assert sum(r["value"] for r in results[3]) == 2
    assert {r["run_id"] for r in results[4]} == set(run_ids)
    assert all(r["last_value"] == 99.0 for r in results[4])
    assert results[5][0]["points"] == 102
