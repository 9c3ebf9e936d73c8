"""The one place the client meets interpreter exit and fork().

Every background worker of the client (the writer's sender, the file
uploaders, the heartbeat) registers here. At interpreter exit ONE atexit
handler closes them in registration order under ONE deadline,
STEPLOG_EXIT_TIMEOUT seconds (30) from the moment exit began: each worker
gets what is left of it, so two workers never wait 30 s each. In a forked
child ONE at-fork hook resets every registered worker and runs every
registered lock reset (a lock held by another thread at fork() would stay
held forever in the child): the parent's data stays the parent's and each
worker starts again lazily in the child.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import weakref
from collections.abc import Callable
from time import monotonic
from typing import Protocol

from steplog import _settings


class Worker(Protocol):
    """A background worker: closed at exit within what is left of the shared
    deadline, reset in a forked child."""

    def close_at_exit(self, timeout: float) -> None:
        """Deliver what is pending within `timeout` seconds, then stop."""
        ...

    def after_fork_in_child(self) -> None:
        """Forget the parent's threads, locks, streams and data."""
        ...


_workers: weakref.WeakKeyDictionary[Worker, int] = weakref.WeakKeyDictionary()
_resets: list[Callable[[], None]] = []
_order = 0
_lock = threading.Lock()


def register(worker: Worker) -> None:
    """Close `worker` at exit and reset it after fork (held weakly)."""
    global _order
    with _lock:
        _order += 1
        _workers.setdefault(worker, _order)


def unregister(worker: Worker) -> None:
    with _lock:
        _workers.pop(worker, None)


def on_fork(reset: Callable[[], None]) -> None:
    """Run `reset` in every forked child (module-level locks and caches)."""
    _resets.append(reset)


def _live() -> list[Worker]:
    with _lock:
        return [w for w, _ in sorted(_workers.items(), key=lambda kv: kv[1])]


def close_all(timeout: float) -> None:
    """Close every registered worker within one deadline of `timeout` s."""
    deadline = monotonic() + timeout
    for worker in _live():
        try:
            worker.close_at_exit(max(0.0, deadline - monotonic()))
        except Exception as exc:  # strict-mode errors at exit: say so, do not traceback
            print(f"steplog: {exc}", file=sys.stderr)


def _at_exit() -> None:
    try:
        timeout = _settings.exit_timeout()
    except ValueError as exc:
        print(f"steplog: {exc}; using 30 s", file=sys.stderr)
        timeout = 30.0
    close_all(timeout)


def _after_fork_in_child() -> None:
    global _lock
    _lock = threading.Lock()
    for reset in list(_resets):
        reset()
    for worker in list(_workers):
        worker.after_fork_in_child()


atexit.register(_at_exit)
os.register_at_fork(after_in_child=_after_fork_in_child)
