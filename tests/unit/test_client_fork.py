"""fork() while another thread holds a client lock: the child must not
inherit a lock that nobody will ever release (steplog._lifecycle resets the
Client's, the heartbeat's and the client registry's locks in the child)."""

from __future__ import annotations

import os
import threading

import pytest

from steplog import client as client_module
from steplog.client import get_client

WAIT = 10.0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_client_and_heartbeat_locks_are_fresh_in_a_forked_child() -> None:
    client = get_client("127.0.0.1:1", "fork-test")
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with client._lock, client.heartbeat._lock, client_module._clients_lock:
            held.set()
            release.wait(WAIT)

    holder = threading.Thread(target=hold)
    holder.start()
    assert held.wait(WAIT)
    pid = os.fork()
    if pid == 0:  # the child: report through the exit code, never return to pytest
        code = 1
        try:
            checks = [
                client._lock.acquire(timeout=2),
                client.heartbeat._lock.acquire(timeout=2),
                client_module._clients_lock.acquire(timeout=2),
                client.heartbeat._thread is None,
            ]
            code = 0 if all(checks) else 10 + checks.index(False)
        finally:
            os._exit(code)
    release.set()
    holder.join(WAIT)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
