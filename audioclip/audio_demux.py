"""Audio in the containers libsndfile lacks, decoded with PyAV (FFmpeg's demuxers and decoders).

What phones and browsers record: M4A/AAC and ALAC (iPhone voice memos, Android recorders), ADTS AAC,
WebM/Opus (every browser's ``MediaRecorder``), Matroska, and the audio track of MP4/MOV/WebM/MKV
video. libsndfile stays the fast path for what it reads; this is its fallback, under the same limits:
the channel count, and the duration where the container's header gives it, are checked before any
packet is decoded, and decoding stops one frame past the limit (a ``MediaRecorder`` WebM has no
duration in its header, so there the limit is enforced while decoding). Decoded frames go straight
to the caller's sink (resampled there as they come), so a long recording is not held twice.
PyAV's FFmpeg logging is off by default, so a corrupt upload writes nothing to the server's log.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from fractions import Fraction
from typing import Protocol, TypeVar

import av
import numpy as np

from audioclip.audio_checks import check_channels, check_duration, frame_limit
from audioclip.errors import InvalidInputError, Reason, describe

_HEADROOM_S = 1.0  # buffer beyond the header's duration, which codecs' priming can overshoot


S = TypeVar("S", bound="Sink")


class NotRecognised(Exception):
    """No FFmpeg demuxer recognises the bytes: not a container at all."""


def _header_seconds(container: av.container.InputContainer, stream: av.AudioStream) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return float(Fraction(container.duration, av.time_base))
    return None


class Sink(Protocol):
    """Where decoded chunks go (``audio_sink.ModelRateSink``)."""

    frames_in: int

    def write(self, unit: np.ndarray) -> None: ...


def decode_container(
    data: bytes | bytearray | memoryview | str | os.PathLike,
    max_seconds: float,
    open_sink: Callable[[int, int, int], S],
) -> tuple[S, int]:
    """The first audio stream's ``[n, C]`` float32 chunks into ``open_sink(rate, channels,
    expected_frames)``; returns the sink and the stream's rate. Raises ``NotRecognised`` when FFmpeg
    knows no such format, ``InvalidInputError`` for a corrupt or silent one, or one past the limit."""
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
        sink = open_sink(rate, channels, min(limit, round(((seconds or 10.0) + _HEADROOM_S) * rate)))
        # Packed float32 at the stream's own rate and layout: FFmpeg converts the sample format only.
        packed = av.AudioResampler(format="flt", layout=stream.codec_context.layout, rate=rate)
        try:
            for frame in container.decode(stream):
                for out in packed.resample(frame):
                    sink.write(out.to_ndarray().reshape(-1, channels)[: limit - sink.frames_in])
                if sink.frames_in >= limit:
                    break  # one frame past the limit: too long, and nothing more is decoded
            else:
                for out in packed.resample(None):
                    sink.write(out.to_ndarray().reshape(-1, channels)[: limit - sink.frames_in])
        except (av.FFmpegError, ValueError) as err:
            message = f"cannot decode audio: {describe(err)}"
            raise InvalidInputError(message, reason=Reason.UNDECODABLE) from err
    check_duration(sink.frames_in, rate, max_seconds)
    return sink, rate
