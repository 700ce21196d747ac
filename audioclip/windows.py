"""Long recordings as repeatable windows: where each window lies, its samples, and how windows pool.

AudioCLIP was trained on 5-second ESC-50 clips, so a long recording is embedded window by window.
Windows start at ``0, hop, 2*hop, ...``; there are ``1 + ceil((N - W - T) / hop)`` of them (one for
a clip no longer than a window), so the last one reaches the end but for a tail under ``T`` = 0.1 s
(a window of a few milliseconds of sound and the rest silence would be noise), and a short last
window is centre-padded with zeros to the window's length, the reference's test-time rule for
short clips (``RandomPadding`` in test mode). Everything is a function of the samples and the two lengths: the
same file always gives the same windows and vectors (no random crop), and a window's vector is the
vector of its samples sent alone. Windows are views of the decoded clip, never copies.

Pooling (``mean`` / ``max``) combines a clip's L2-normalised window vectors, so a loud window does
not outweigh a quiet one; ``none`` keeps one vector per window.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np

from audioclip.errors import InvalidInputError, Reason

Pool = Literal["mean", "max", "none"]
POOLS: tuple[str, ...] = get_args(Pool)
MIN_WINDOW_S = 0.1  # the audio tower's front end needs a few frames (a frame is 1654 samples)
MAX_WINDOW_S = 600.0  # longer is no window: 120x the 5-s clips AudioCLIP was trained on


def fit_length(clip: np.ndarray, length: int) -> np.ndarray:
    """Centre zero-pad or centre crop ``[C, N]`` to ``length`` samples (the reference's test-time rule)."""
    n = clip.shape[1]
    if n == length:
        return clip
    if n > length:
        start = (n - length) // 2
        return clip[:, start : start + length]
    left = (length - n) // 2
    return np.pad(clip, ((0, 0), (left, length - n - left)))


@dataclass(frozen=True)
class WindowSpec:
    """How to cut clips: ``window_s`` long, every ``hop_s`` (default: ``window_s``, no overlap),
    pooled by ``pool``."""

    window_s: float
    hop_s: float | None = None
    pool: Pool = "mean"

    def __post_init__(self) -> None:
        for name, value in (("window_s", self.window_s), ("hop_s", self.hop)):
            if not (isinstance(value, int | float) and MIN_WINDOW_S <= value <= MAX_WINDOW_S):
                raise _bad(f"{name} must be {MIN_WINDOW_S} to {MAX_WINDOW_S:g} s, got {value!r}")
        if self.pool not in POOLS:
            raise _bad(f"pool must be one of {list(POOLS)}, got {self.pool!r}")

    @property
    def hop(self) -> float:
        return self.window_s if self.hop_s is None else self.hop_s

    def lengths(self, rate: int) -> tuple[int, int]:
        """(window, hop) in samples at ``rate``."""
        return round(self.window_s * rate), round(self.hop * rate)

    def count(self, samples: int, rate: int) -> int:
        """How many windows a clip of ``samples`` makes."""
        window, hop = self.lengths(rate)
        ignored_tail = round(MIN_WINDOW_S * rate)
        return 1 + max(0, math.ceil((samples - window - ignored_tail) / hop))

    def max_seconds(self, max_windows: int) -> float:
        """The longest clip that makes at most ``max_windows`` windows."""
        return (max_windows - 1) * self.hop + self.window_s


@dataclass(frozen=True)
class Window:
    """Where one window lies in its clip, in seconds (``end_s`` is where its samples end)."""

    start_s: float
    end_s: float


def _bad(message: str) -> InvalidInputError:
    return InvalidInputError(message, reason=Reason.BAD_WINDOW)


def cut(clip: np.ndarray, spec: WindowSpec, rate: int) -> tuple[list[np.ndarray], list[Window]]:
    """``[C, N]`` -> the windows' ``[C, W]`` samples (views, but a padded last one) and their times."""
    window, hop = spec.lengths(rate)
    samples = clip.shape[1]
    parts, times = [], []
    for index in range(spec.count(samples, rate)):
        start = index * hop
        end = min(start + window, samples)
        parts.append(fit_length(clip[:, start:end], window))
        times.append(Window(start / rate, end / rate))
    return parts, times


def pooled(rows: np.ndarray, counts: Sequence[int], pool: Pool) -> np.ndarray:
    """Window rows ``[sum(counts), D]`` -> one row per clip (``mean`` / ``max`` of the normalised
    rows), or the rows themselves for ``none``."""
    if pool == "none":
        return rows
    if not counts:  # a request of no clips
        return rows[:0]
    unit = rows / np.maximum(np.linalg.norm(rows, axis=-1, keepdims=True), 1e-12)
    bounds = np.cumsum([0, *counts])
    reduce = np.mean if pool == "mean" else np.max
    return np.stack([reduce(unit[a:b], axis=0) for a, b in itertools.pairwise(bounds)])
