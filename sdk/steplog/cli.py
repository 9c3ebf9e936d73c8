"""The `steplog` command: `steplog sync <spool>` replays an offline spool."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from steplog._channel import ChannelSettings


def _settings(ns: argparse.Namespace) -> ChannelSettings:
    """The connection settings from the flags, else STEPLOG_* (as the client)."""
    from steplog._channel import ChannelSettings
    from steplog.client import resolve_url

    token = None
    if ns.token_file:
        token = Path(ns.token_file).read_text().strip()
    return ChannelSettings.resolve(
        resolve_url(ns.url),
        token=token,
        tls=True if ns.tls else None,
        tls_ca=ns.tls_ca,
        tls_cert=ns.tls_cert,
        tls_key=ns.tls_key,
        allow_insecure_token=True if ns.allow_insecure_token else None,
    )


def _sync(ns: argparse.Namespace) -> int:
    from steplog._writer.replay import replay_spool
    from steplog._writer.transport import GrpcTransport
    from steplog.errors import InvalidArgumentError

    spool = Path(ns.spool)
    if not spool.is_dir():
        print(f"steplog sync: {spool} is not a directory", file=sys.stderr)
        return 2
    try:
        settings = _settings(ns)
    except (InvalidArgumentError, OSError) as exc:
        print(f"steplog sync: {exc}", file=sys.stderr)
        return 2
    with settings.open() as channel:
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
    sync.add_argument(
        "--token-file", default=None, help="file holding the token (default STEPLOG_TOKEN)"
    )
    sync.add_argument(
        "--tls", action="store_true", help="TLS with the system CAs (default STEPLOG_TLS)"
    )
    sync.add_argument("--tls-ca", default=None, help="CA bundle, PEM (default STEPLOG_TLS_CA)")
    sync.add_argument(
        "--tls-cert", default=None, help="client certificate, PEM (default STEPLOG_TLS_CERT)"
    )
    sync.add_argument("--tls-key", default=None, help="client key, PEM (default STEPLOG_TLS_KEY)")
    sync.add_argument(
        "--allow-insecure-token",
        action="store_true",
        help="send the token in plaintext to a host that is not loopback "
        "(default STEPLOG_ALLOW_INSECURE_TOKEN)",
    )
    sync.add_argument("--remove", action="store_true", help="delete files fully acknowledged")
    sync.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    ns = parser.parse_args(argv)
    if ns.command == "sync":
        return _sync(ns)
    return 2


if __name__ == "__main__":
    sys.exit(main())
