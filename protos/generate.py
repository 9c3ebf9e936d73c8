"""Generate the Python protocol code (sdk/steplog/v1) from protos/steplog/v1.

`make protos` runs it; tests/unit/test_protos_drift.py runs it into a temporary
folder and fails when the committed code differs.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from grpc_tools import protoc

HERE = Path(__file__).resolve().parent


def generate(out_root: Path) -> list[Path]:
    """Write steplog/v1/*_pb2*.py(i) under out_root; return the files written."""
    import grpc_tools

    include = Path(grpc_tools.__file__).parent / "_proto"
    protos = sorted(str(p.relative_to(HERE)) for p in (HERE / "steplog" / "v1").glob("*.proto"))
    out = out_root / "steplog" / "v1"
    out.mkdir(parents=True, exist_ok=True)
    bindir = Path(sys.executable).parent
    args = [
        "protoc",
        f"-I{HERE}",
        f"-I{include}",
        f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--mypy_out=quiet:{out_root}",
        f"--mypy_grpc_out=quiet:{out_root}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    init = out / "__init__.py"
    init.write_text('"""Generated protocol code for steplog.v1 (make protos). Do not edit."""\n')
    return sorted(p for p in out.iterdir() if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", nargs="?", default=str(HERE.parent / "sdk"))
    ns = parser.parse_args()
    out_root = Path(ns.out)
    target = out_root / "steplog" / "v1"
    if target.exists():
        shutil.rmtree(target)
    for path in generate(out_root):
        print(path)


if __name__ == "__main__":
    main()
