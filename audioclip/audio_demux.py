"""Audio in the containers libsndfile lacks, decoded with PyAV (FFmpeg's demuxers and decoders).

What phones and browsers record: M4A/AAC and ALAC (iPhone voice memos, Android recorders), ADTS AAC,
WebM/Opus (every browser's ``MediaRecorder``), Matroska, and the audio track of MP4/MOV/WebM/MKV
video. libsndfile stays the fast path for what it reads; this is its fallback, under the same limits:
the channel count, and the duration where the container's header gives it, are checked before any
packet is decoded, and decoding stops one frame past the limit (a ``MediaRecorder`` WebM has no
duration in its header, so there the limit is enforced while decoding). Samples land in one buffer
sized from the header, so a long recording is not held twice. PyAV's FFmpeg logging is off by default,
so a corrupt upload writes nothing to the server's log.
"""

from __future__ import annotations

import io
import os
from fractions import Fraction

import av
import numpy as np

from audioclip.audio_checks import check_channels, check_duration, check_finite, frame_limit
from audioclip.errors import InvalidInputError, Reason, describe

_HEADROOM_S = 1.0  # buffer beyond the header's duration, which codecs' priming can overshoot


class NotRecognised(Exception):
    """No FFmpeg demuxer recognises the bytes: not a container at all."""


def _header_seconds(container: av.container.InputContainer, stream: av.AudioStream) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return float(Fraction(container.duration, av.time_base))
    return None


class _Samples:
    """A growing ``[N, C]`` float32 buffer: sized once from the header, grown in place otherwise."""

    def __init__(self, capacity: int, channels: int, limit: int) -> None:
        self.array = np.empty((max(capacity, 1), channels), dtype=np.float32)
        self.size = 0
        self.limit = limit

    def append(self, frames: np.ndarray) -> bool:
        """Adds ``[n, C]`` frames; False once the limit is passed (the rest is not decoded)."""
        end = min(self.size + frames.shape[0], self.limit)
        if end > self.array.shape[0]:
            grown = min(max(end, int(self.array.shape[0] * 1.5)), self.limit)
            self.array.resize((grown, self.array.shape[1]), refcheck=False)
        self.array[self.size : end] = frames[: end - self.size]
        self.size = end
        return end < self.limit

    def result(self) -> np.ndarray:
        self.array.resize((self.size, self.array.shape[1]), refcheck=False)
        return self.array


def decode_container(
    data: bytes | bytearray | memoryview | str | os.PathLike, max_seconds: float
) -> tuple[np.ndarray, int]:
    """The first audio stream as ``[N, C]`` float32 in [-1, 1] and its rate. Raises ``NotRecognised``
    when FFmpeg knows no such format, ``InvalidInputError`` for a corrupt, silent or too long one."""
    source = io.BytesIO(bytes(data)) if isinstance(data, bytes | bytearray | memoryview) else os.fspath(data)
    try:
        container = av.open(source, mode="r", metadata_errors="ignore")
    except (av.FFmpegError, ValueError, OSError) as err:
        raise NotRecognised(describe(err)) from err
    with container:
        if not container.streams.audio:
            raise InvalidInputError(
                f"the {container.format.name} file has no audio stream", reason=Reason.UNDECODABLE
            )
        stream = container.streams.audio[0]
        rate, channels = stream.codec_context.sample_rate, stream.codec_context.channels
        if not rate or not channels:
            raise InvalidInputError(
                "the audio stream has no sample rate or channels", reason=Reason.UNDECODABLE
            )
        check_channels(channels)
        seconds = _header_seconds(container, stream)
        limit = frame_limit(max_seconds, rate)
        if seconds is not None:
            check_duration(max(1, round(seconds * rate)), rate, max_seconds)
        capacity = min(limit, round(((seconds or 10.0) + _HEADROOM_S) * rate))
        samples = _Samples(capacity, channels, limit)
        # Packed float32 at the stream's own rate and layout: FFmpeg converts the sample format only.
        packed = av.AudioResampler(format="flt", layout=stream.codec_context.layout, rate=rate)
        try:
            for frame in container.decode(stream):
                if not all(samples.append(_frames(out, channels)) for out in packed.resample(frame)):
                    break
            else:
                for out in packed.resample(None):
                    samples.append(_frames(out, channels))
        except (av.FFmpegError, ValueError) as err:
            message = f"cannot decode audio: {describe(err)}"
            raise InvalidInputError(message, reason=Reason.UNDECODABLE) from err
    unit = samples.result()
    check_duration(unit.shape[0], rate, max_seconds)
    check_finite(unit)
    return unit, rate


def _frames(frame: av.AudioFrame, channels: int) -> np.ndarray:
    return frame.to_ndarray().reshape(-1, channels)
