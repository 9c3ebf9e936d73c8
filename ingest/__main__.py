"""`python -m ingest` / `steplog-ingest`: serve, or bring up the local stack (dev)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ingest import config as config_mod


def _serve(ns: argparse.Namespace) -> int:
    try:
        cfg = config_mod.from_sources(ns)
    except config_mod.ConfigError as exc:
        print(f"steplog-ingest: configuration error: {exc}", file=sys.stderr)
        return 2
    from ingest.server import serve

    asyncio.run(serve(cfg))
    return 0


def _dev(ns: argparse.Namespace) -> int:
    """The embedded default: local PostgreSQL+TimescaleDB and SeaweedFS S3 as
    plain processes under --root, then the service (several processes sharing
    one port when --processes > 1), then optionally the example script."""
    from ingest.devstack import LocalStack
    from ingest.healthcheck import wait_healthy

    root = Path(ns.root).resolve()
    stack = LocalStack(root)
    info = stack.start()
    env = dict(os.environ)
    env.update(info.env())
    listen = ns.listen or env.get("STEPLOG_LISTEN") or "127.0.0.1:50051"
    env["STEPLOG_LISTEN"] = listen
    procs: list[subprocess.Popen[bytes]] = []
    base_metrics = int(env.get("STEPLOG_METRICS_PORT", "9464"))
    try:
        for i in range(ns.processes):
            penv = dict(env)
            penv["STEPLOG_METRICS_PORT"] = str(base_metrics + i) if base_metrics else "0"
            procs.append(subprocess.Popen([sys.executable, "-m", "ingest", "serve"], env=penv))
        try:
            wait_healthy(listen, 60, procs[0])
        except (RuntimeError, TimeoutError) as exc:
            raise SystemExit(f"steplog: {exc}") from None
        print(f"steplog: serving on {listen} ({ns.processes} process(es)); stack under {root}")
        print(f"steplog: export STEPLOG_URL={listen}")
        if ns.example:
            cenv = dict(env)
            cenv["STEPLOG_URL"] = listen
            rc = subprocess.call([sys.executable, "-m", "steplog.example"], env=cenv)
            if rc != 0:
                print(f"steplog: the example failed with code {rc}", file=sys.stderr)
        if ns.exit_after_example:
            return 0
        print("steplog: Ctrl-C stops the service and the stack")
        stop = False

        def _on_signal(signum: int, frame: object) -> None:
            nonlocal stop
            stop = True

        signal.signal(signal.SIGINT, _on_signal)
        signal.signal(signal.SIGTERM, _on_signal)
        while not stop and all(p.poll() is None for p in procs):
            time.sleep(0.5)
        return 0
    finally:
        print("steplog: stopping the service" + ("" if ns.keep_stack else " and the stack"))
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        if not ns.keep_stack:
            stack.stop()
        print("steplog: stopped")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="steplog-ingest", description=__doc__)
    parser.add_argument("--log-level", default=os.environ.get("STEPLOG_LOG_LEVEL", "INFO"))
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="run the ingest service")
    config_mod.add_arguments(serve)
    dev = sub.add_parser("dev", help="start the local stack and the service")
    dev.add_argument("--root", default=".steplog", help="folder for the stack's data")
    dev.add_argument("--listen", default=None, help="gRPC address (default 127.0.0.1:50051)")
    dev.add_argument("--processes", type=int, default=1, help="service processes (one per core)")
    dev.add_argument("--example", action="store_true", help="run the example script once healthy")
    dev.add_argument("--exit-after-example", action="store_true", help=argparse.SUPPRESS)
    dev.add_argument("--keep-stack", action="store_true", help="leave the stack running on exit")
    args = sys.argv[1:] if argv is None else argv
    if not args or (args[0].startswith("--") and "dev" not in args and "serve" not in args):
        args = ["serve", *args]
    ns = parser.parse_args(args)
    logging.basicConfig(
        level=ns.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if ns.command == "dev":
        return _dev(ns)
    return _serve(ns)


if __name__ == "__main__":
    sys.exit(main())
