"""Decoded samples, chunk by chunk, into the model's one array: ``[C, N]`` float32, int16 range, 44.1 kHz.

Every decoder (libsndfile's blocks, FFmpeg's frames, a caller's array) writes native-rate ``[n, C]``
chunks in [-1, 1] here: each chunk is checked (finite), clipped (lossy decoders overshoot full scale
slightly), mixed to mono past two channels, resampled by a streaming ``soxr`` resampler (the same
output as its one-shot ``resample``, bit for bit) and written into one buffer sized from the
header. So an hour-long recording is held once, at the model's rate, not also at its own rate.
"""

from __future__ import annotations

import math

import numpy as np
import soxr

from audioclip.audio_checks import check_finite, downmixed

SAMPLE_RATE = 44100
INT16_SCALE = 32768.0


class ModelRateSink:
    """Native-rate chunks in, the model's clip out (``finish``)."""

    def __init__(self, rate: int, channels: int, expected_frames: int) -> None:
        self.channels = channels if channels <= 2 else 1
        self.resampler = (
            None
            if rate == SAMPLE_RATE
            else soxr.ResampleStream(rate, SAMPLE_RATE, self.channels, dtype="float32", quality="VHQ")
        )
        capacity = math.ceil(max(expected_frames, 1) * SAMPLE_RATE / rate) + 64
        self.out = np.empty((self.channels, capacity), dtype=np.float32)
        self.size = 0
        self.frames_in = 0

    def write(self, unit: np.ndarray) -> None:
        """One ``[n, C]`` float32 chunk (it may be changed in place)."""
        check_finite(unit)
        np.clip(unit, -1.0, 1.0, out=unit)
        unit = downmixed(unit)
        self.frames_in += unit.shape[0]
        self._append(unit if self.resampler is None else self.resampler.resample_chunk(unit))

    def finish(self) -> np.ndarray:
        """The clip: ``[C, N]`` C-contiguous float32 scaled to int16 range."""
        if self.resampler is not None:
            tail = np.zeros((0, self.channels), dtype=np.float32)
            self._append(self.resampler.resample_chunk(tail, last=True))
        clip = self.out[:, : self.size]
        clip *= np.float32(INT16_SCALE)
        return clip if clip.flags.c_contiguous else np.ascontiguousarray(clip)

    def _append(self, chunk: np.ndarray) -> None:
        end = self.size + chunk.shape[0]
        if end > self.out.shape[1]:  # the header's length was short (or absent): grow once by half
            grown = np.empty((self.channels, max(end, self.out.shape[1] * 3 // 2)), dtype=np.float32)
            grown[:, : self.size] = self.out[:, : self.size]
            self.out = grown
        self.out[:, self.size : end] = chunk.T
        self.size = end
