#!/usr/bin/env bash
# The embedded local stack (PostgreSQL+TimescaleDB and SeaweedFS S3 under .steplog/).
#   deploy/local/stack.sh start|stop|status|env [--root DIR] [--pg-port N] [--s3-port N]
#   eval "$(deploy/local/stack.sh env)"    # exports STEPLOG_DATABASE_URL, STEPLOG_S3_*
# A thin wrapper over `python -m ingest.devstack`, run with the project's venv from the
# repository root (so the default --root is <repo>/.steplog).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
python=${PYTHON:-$repo/.venv/bin/python}
[ -x "$python" ] || python=python3
cd "$repo"
exec "$python" -m ingest.devstack "$@"
