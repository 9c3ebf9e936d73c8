"""Session fixtures: the real local stack (TimescaleDB + SeaweedFS S3), a
fresh database for this session, and the service as a real gRPC server."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from ingest.devstack import LocalStack, StackInfo
from tests.support import ROOT, ServiceProcess


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Spools that tests cause without naming a directory (refused batches,
    what close() could not deliver) land in this session's own folder, not in
    ~/.cache/steplog/spool of whoever runs the suite; service subprocesses
    and client subprocesses inherit it."""
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    yield
    if old is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = old


@pytest.fixture(scope="session")
def stack() -> Iterator[LocalStack]:
    root = Path(os.environ.get("STEPLOG_TEST_STACK", ROOT / ".steplog" / "test-stack"))
    s = LocalStack(root)
    s.start()
    yield s
    # Locally the stack stays up between sessions (fast reruns; `make stop`
    # ends it). CI leaves nothing running.
    if os.environ.get("CI"):
        s.stop()


@pytest.fixture(scope="session")
def stack_info(stack: LocalStack) -> StackInfo:
    return stack.info()


@pytest.fixture(scope="session")
def database_url(stack: LocalStack) -> Iterator[str]:
    """A fresh database (with TimescaleDB) for this test session."""
    name = f"steplog_test_{uuid.uuid4().hex[:10]}"
    yield stack.create_database(name)
    # The stack may be down after a fault test; the database goes next time.
    with contextlib.suppress(Exception):
        stack.drop_database(name)


@pytest.fixture(scope="session")
def service_env(stack_info: StackInfo, database_url: str) -> dict[str, str]:
    env = stack_info.env()
    env["STEPLOG_DATABASE_URL"] = database_url
    # No compaction in the session's services, so a test's rows and blocks stay
    # as its commits made them; tests/integration/test_compaction.py runs it.
    env["STEPLOG_COMPACT_INTERVAL_S"] = "0"
    return env


@pytest.fixture
def own_database(stack: LocalStack, service_env: dict[str, str]) -> Iterator[dict[str, str]]:
    """service_env on a database of the test's own, for a test that runs the
    service's compaction sweep: it compacts every series of its database in
    series_id order, and the session's database holds every earlier test's
    rows (the session's services do not compact), more than a sweep gets
    through in a test's minute."""
    name = f"steplog_own_{uuid.uuid4().hex[:10]}"
    url = stack.create_database(name)
    try:
        yield service_env | {"STEPLOG_DATABASE_URL": url}
    finally:
        with contextlib.suppress(Exception):
            stack.drop_database(name)


@pytest.fixture(scope="session")
def service(
    service_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProcess]:
    log = tmp_path_factory.mktemp("service") / "service.log"
    proc = ServiceProcess(service_env, log_path=log).start()
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def url(service: ServiceProcess) -> str:
    return service.address


@pytest.fixture
def experiment_name() -> str:
    return f"exp-{uuid.uuid4().hex[:12]}"
