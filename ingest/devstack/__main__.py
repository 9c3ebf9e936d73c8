"""python -m ingest.devstack start|stop|status|env|remove [--root .steplog]"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from ingest.devstack import __doc__ as _about
from ingest.devstack.stack import LocalStack
from ingest.devstack.state import StackError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ingest.devstack", description=_about)
    parser.add_argument("command", choices=["start", "stop", "status", "env", "remove"])
    default_root = os.environ.get("STEPLOG_STACK_ROOT", ".steplog")
    parser.add_argument("--root", type=Path, default=Path(default_root))
    parser.add_argument("--pg-port", type=int)
    parser.add_argument("--s3-port", type=int)
    parser.add_argument("--bucket", default="steplog")
    args = parser.parse_args(argv)
    stack = LocalStack(args.root, args.pg_port, args.s3_port, args.bucket)
    try:
        if args.command == "start":
            env = stack.start(detach=True).env()
            print(f"local stack running under {stack.root} (`env` prints the secret key too)")
            shown = {k: "***" if "SECRET" in k else v for k, v in env.items()}
            print("".join(f"  {k}={v}\n" for k, v in shown.items()), end="")
        elif args.command == "stop":
            stack.stop()
            print(f"local stack under {stack.root} stopped")
        elif args.command == "remove":
            stack.remove()
            print(f"local stack under {stack.root} stopped and its data deleted")
        elif args.command == "status":
            status = stack.status()
            print(
                "".join(f"{k}: {'running' if up else 'stopped'}\n" for k, up in status.items()),
                end="",
            )
            return 0 if all(status.values()) else 1
        else:
            for k, v in stack.info().env().items():
                print(f"export {k}={shlex.quote(v)}")
    except StackError as e:
        print(f"devstack: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
