#!/usr/bin/env python3
"""Generates the gRPC modules from ``audioclip_serve/protos/*.proto`` (grpcio-tools' protoc).

The generated ``*_pb2.py`` / ``*_pb2_grpc.py`` are committed, so serving needs only the protobuf and
grpcio runtimes Ray already brings; ``--check`` (run by the tests) fails when they are stale.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTOS = ROOT / "audioclip_serve" / "protos"


def generate(out: Path) -> list[Path]:
    """Every proto compiled into ``out`` (laid out as the repository); the generated files."""
    from grpc_tools import protoc

    sources = sorted(PROTOS.glob("*.proto"))
    for source in sources:
        relative = source.relative_to(ROOT)
        code = protoc.main(
            ["protoc", f"-I{ROOT}", f"--python_out={out}", f"--grpc_python_out={out}", str(relative)]
        )
        if code != 0:
            raise SystemExit(f"protoc failed on {relative} (exit {code})")
    return sorted((out / PROTOS.relative_to(ROOT)).glob("*_pb2*.py"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the committed modules differ")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        stale = []
        for made in generate(Path(tmp)):
            committed = PROTOS / made.name
            if args.check:
                if not committed.exists() or committed.read_text() != made.read_text():
                    stale.append(committed.name)
            else:
                committed.write_text(made.read_text())
                print(f"wrote {committed.relative_to(ROOT)}")
    if stale:
        print(f"stale generated modules: {', '.join(stale)}; run scripts/gen_protos.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
