"""The embedded local stack: PostgreSQL with TimescaleDB and a SeaweedFS S3 server.

Both run as plain processes under one folder (default ``.steplog``) on free
loopback ports, so a developer machine or CI needs no system service and two
stacks never collide. It sits outside the service's layers (it imports none
of them, and only the `dev` command imports it); besides the standard library
it needs botocore, to sign its bucket requests.

    python -m ingest.devstack start|stop|status|env|remove [--root .steplog]

Modules: `state` (stack.json: ports, keys, the lock, the folders), `processes`
(liveness, termination, free ports), `postgres`, `seaweed` (S3), `stack`
(LocalStack, both together), `__main__` (the command line).
"""

from ingest.devstack.postgres import DATABASE, PG_SUPERUSER, find_pg_bindir
from ingest.devstack.processes import free_port
from ingest.devstack.seaweed import WEED_PORTS, find_weed
from ingest.devstack.stack import LocalStack
from ingest.devstack.state import PG_OUTSIDE_BASE, S3_REGION, StackError, StackInfo

__all__ = [
    "DATABASE",
    "PG_OUTSIDE_BASE",
    "PG_SUPERUSER",
    "S3_REGION",
    "WEED_PORTS",
    "LocalStack",
    "StackError",
    "StackInfo",
    "find_pg_bindir",
    "find_weed",
    "free_port",
]
