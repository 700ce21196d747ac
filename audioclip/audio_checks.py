"""The checks every audio decoder applies, from the header where it tells, before decoding more.

Shared by libsndfile's path (``audio_input``) and FFmpeg's (``audio_demux``) so that both refuse
the same inputs with the same reasons.
"""

from __future__ import annotations

import numbers

import numpy as np

from audioclip.errors import InvalidInputError, Reason

MAX_CHANNELS = 64  # more is no recording but a lying header; up to this, channels are downmixed


def check_rate(sample_rate: object) -> int:
    """A sample rate must be a positive integer number of Hz."""
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, numbers.Integral) or sample_rate <= 0:
        raise InvalidInputError(
            f"sample_rate must be a positive integer (Hz), got {sample_rate!r}", reason=Reason.BAD_SAMPLE_RATE
        )
    return int(sample_rate)


def check_channels(channels: int) -> None:
    if not 1 <= channels <= MAX_CHANNELS:
        raise InvalidInputError(
            f"audio has {channels} channels; 1 to {MAX_CHANNELS} are accepted (over 2 are mixed to mono)",
            reason=Reason.TOO_MANY_CHANNELS,
        )


def check_duration(frames: int, rate: int, max_seconds: float) -> None:
    """Refuse before decoding or resampling: cost grows with length."""
    if frames == 0:
        raise InvalidInputError("audio has no samples", reason=Reason.EMPTY)
    if frames / rate > max_seconds:
        raise InvalidInputError(
            f"audio is {frames / rate:.1f} s long, more than the limit {max_seconds:g} s",
            reason=Reason.AUDIO_TOO_LONG,
        )


def check_finite(samples: np.ndarray) -> None:
    if not np.isfinite(samples).all():
        raise InvalidInputError("audio contains NaN or infinity", reason=Reason.NOT_FINITE)


def frame_limit(max_seconds: float, rate: int) -> int:
    """Frames to read at most: one past the limit, so a longer stream is seen to be too long."""
    return int(max_seconds * rate) + 1


def downmixed(unit: np.ndarray) -> np.ndarray:
    """``[N, C]``: mono and stereo kept (the audio tower takes both), more channels averaged to
    mono, as the reference's ESC-50 loader (``librosa.load(mono=True)``) did."""
    if unit.shape[1] <= 2:
        return unit
    return unit.mean(axis=1, keepdims=True, dtype=np.float32)
