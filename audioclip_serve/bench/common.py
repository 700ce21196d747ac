"""What every part of the benchmark shares: the checkout it runs from, the app's name, logging."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the checkout: configs/, and the git tree benchmarked
APP = "audioclip"


def fmt(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
