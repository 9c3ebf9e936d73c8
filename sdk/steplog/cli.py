"""The `steplog` command: `steplog sync <spool>` replays an offline spool."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc


def _sync(ns: argparse.Namespace) -> int:
    from steplog._spool import replay_spool
    from steplog._transport import GrpcTransport
    from steplog.client import resolve_url

    url = resolve_url(ns.url)
    spool = Path(ns.spool)
    if not spool.is_dir():
        print(f"steplog sync: {spool} is not a directory", file=sys.stderr)
        return 2
    with grpc.insecure_channel(url) as channel:
        transport = GrpcTransport(channel)
        report = replay_spool(
            spool,
            transport,
            remove=ns.remove,
            timeout=ns.timeout,
            apply_operation=lambda kind, payload: transport.apply_operation(
                kind, payload, ns.timeout
            ),
        )
    print(f"steplog sync: {report}")
    for r in report.rejections[:20]:
        print(f"  rejected: {r}")
    if not report.ok:
        print(
            f"steplog sync: not everything was stored: {report.rejected} point(s) rejected, "
            f"{report.refused_points} refused, {report.unsent_points} not sent",
            file=sys.stderr,
        )
    return 0 if report.ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="steplog", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sync = sub.add_parser(
        "sync",
        help="replay a spool directory to the service; safe to run any number of times",
    )
    sync.add_argument("spool", help="the spool directory (STEPLOG_SPOOL_DIR of the offline run)")
    sync.add_argument("--url", default=None, help="service address (default STEPLOG_URL)")
    sync.add_argument("--remove", action="store_true", help="delete files fully acknowledged")
    sync.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    ns = parser.parse_args(argv)
    if ns.command == "sync":
        return _sync(ns)
    return 2


if __name__ == "__main__":
    sys.exit(main())
