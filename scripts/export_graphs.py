"""Export the towers' runtime graphs for a checkpoint ahead of serving (replicas then only load them).

Replicas export a missing graph themselves at start-up (a few seconds per tower) and cache it under
``--cache / <checkpoint sha256> /``; this script fills that cache beforehand, e.g. in an image build
or on a volume shared by the nodes. It prints each graph's path and how long it took.

    .venv/bin/python scripts/export_graphs.py --checkpoint .cache/AudioCLIP-Full-Training.pt
    .venv/bin/python scripts/export_graphs.py --checkpoint synthetic:demo --cache /models/graphs \\
        --tower text=onnxruntime --tower text=onnxruntime:int8 --tower audio=openvino
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from audioclip.backends import DEFAULT_CACHE_DIR, check_backend, runtime_label
from audioclip.factory import TowerBuild, build_tower, load_weights

DEFAULTS = ("text=onnxruntime", "image=onnxruntime", "audio=openvino")  # the CPU configs' choices


def parse_tower(spec: str) -> tuple[str, str, bool]:
    """``tower=backend[:int8]`` -> (tower, backend, int8), refused when the backend cannot run it.
    (A bf16 OpenVINO tower loads the fp32 graph: its precision is chosen when it is compiled.)"""
    tower, _, backend = spec.partition("=")
    backend, _, precision = backend.partition(":")
    if precision not in ("", "int8"):
        raise argparse.ArgumentTypeError(f"{spec}: the precision after ':' can only be int8")
    try:
        check_backend(tower, backend, "int8" if precision else "fp32")
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{spec}: {error}") from None
    return tower, backend, precision == "int8"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a .pt/.safetensors path, or synthetic:NAME")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE_DIR, help=f"default {DEFAULT_CACHE_DIR}")
    p.add_argument(
        "--tower",
        type=parse_tower,
        action="append",
        help=f"tower=backend[:int8] (default {' '.join(DEFAULTS)})",
    )
    args = p.parse_args(argv)
    state, info = load_weights(args.checkpoint)
    for tower, backend, int8 in args.tower or [parse_tower(spec) for spec in DEFAULTS]:
        started = time.perf_counter()
        build = TowerBuild(backend=backend, int8=int8, graph_cache=str(args.cache))
        model = build_tower(state, tower, build, weights_sha256=info.sha256)
        print(f"{tower}\t{runtime_label(model, tower)}\t{time.perf_counter() - started:.1f} s")
    print(f"cache: {args.cache / info.sha256[:32]}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
