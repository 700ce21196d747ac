"""Audio decoding to the model's input convention: float32 ``[C, N]``, int16 range, 44.1 kHz.

AudioCLIP was trained on ``librosa.load(sr=44100) * 32768`` (AUDIOCLIP.md section 6), so every input
is brought to 44100 Hz and scaled so that full scale is +-32768. Mono (C=1) and stereo (C=2) are
kept as they are (the audio tower handles both); more channels (5.1 ...) are mixed to mono by their
mean, as the reference's ESC-50 loader did.

Decoding uses ``soundfile`` (libsndfile) where it reads the format: WAV/RF64/W64, FLAC, AIFF, CAF,
OGG/Vorbis, Ogg Opus and MP3. What it lacks (M4A/AAC, WebM/Opus, Matroska, the audio track of
MP4/MOV video) goes to FFmpeg through PyAV (``audio_demux``). Either way the format is recognised by
the bytes, not by a name or a content type; header fields (channels, frames, rate) are checked
before any sample is decoded, and at most ``max_seconds`` worth of frames is ever read, so a lying
header cannot make us allocate more.

Resampling uses ``soxr`` (libsoxr, ``quality="VHQ"``, its 28-bit-precision recipe): a band-limited
resampler with a flat passband and very high stopband rejection, for any ratio (22050, 48000, 32000,
8000, even non-integer rates -> 44100) without the caller choosing up/down factors or a filter. It
is about as fast as scipy's ``resample_poly`` with that function's much shorter default filter
(30 s of 48 kHz stereo: 79 ms vs 64 ms; 22.05 kHz -> 44.1 kHz: 26 ms vs 55 ms, on the dev CPU), and
it is a small self-contained wheel, while scipy would be a large dependency for one function.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import soundfile as sf

from audioclip.audio_checks import check_channels, check_duration, check_finite, check_rate, frame_limit
from audioclip.audio_demux import NotRecognised, decode_container
from audioclip.audio_sink import INT16_SCALE, SAMPLE_RATE, ModelRateSink
from audioclip.errors import InvalidInputError, Reason, describe

DEFAULT_MAX_SECONDS = 300.0
_BLOCK_FRAMES = 1 << 16  # libsndfile reads this many frames at a time into the sink
__all__ = ["DEFAULT_MAX_SECONDS", "INT16_SCALE", "SAMPLE_RATE", "load_audio"]

AudioLike = bytes | bytearray | memoryview | str | os.PathLike | np.ndarray

# Integer PCM -> [-1, 1]: the factor that maps the type's full scale onto 1.0.
_PCM_SCALES = {np.dtype(np.int8): 2.0**-7, np.dtype(np.int16): 2.0**-15, np.dtype(np.int32): 2.0**-31}


def _fail(message: str, reason: Reason) -> InvalidInputError:
    return InvalidInputError(message, reason=reason)


def _check_file_rate(file_rate: int, sample_rate: int | None) -> None:
    """A file knows its rate; a caller's different claim means the caller is confused."""
    if sample_rate is not None and check_rate(sample_rate) != file_rate:
        raise _fail(
            f"sample_rate={sample_rate} was given but the file is {file_rate} Hz; omit sample_rate for files",
            Reason.SAMPLE_RATE_MISMATCH,
        )


def _decode_sndfile(source: io.BytesIO | str | os.PathLike, max_seconds: float) -> tuple[ModelRateSink, int]:
    """libsndfile's blocks into the model's clip; header checks come first."""
    with sf.SoundFile(source) as handle:
        check_channels(handle.channels)
        check_duration(handle.frames, handle.samplerate, max_seconds)
        sink = ModelRateSink(handle.samplerate, handle.channels, handle.frames)
        limit = frame_limit(max_seconds, handle.samplerate)
        for block in handle.blocks(_BLOCK_FRAMES, dtype="float32", always_2d=True, frames=limit):
            sink.write(block)
        return sink, handle.samplerate


def _decode(
    data: bytes | bytearray | memoryview | str | os.PathLike, sample_rate: int | None, max_seconds: float
) -> np.ndarray:
    """An encoded file -> the model's clip: libsndfile where it reads the format, FFmpeg
    (``audio_demux``) for the containers it lacks (M4A, WebM, video tracks ...)."""
    if isinstance(data, str | os.PathLike) and not Path(data).is_file():
        raise _fail(f"audio file {os.fspath(data)!r} does not exist", Reason.NOT_FOUND)
    source = io.BytesIO(bytes(data)) if isinstance(data, bytes | bytearray | memoryview) else data
    try:
        sink, rate = _decode_sndfile(source, max_seconds)
    except InvalidInputError:
        raise
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as sndfile_err:
        try:
            sink, rate = decode_container(data, max_seconds, ModelRateSink)
        except NotRecognised:
            raise _fail(
                f"cannot decode audio: {describe(sndfile_err)} (neither libsndfile nor FFmpeg reads it)",
                Reason.UNDECODABLE,
            ) from None
    _check_file_rate(rate, sample_rate)
    check_duration(sink.frames_in, rate, max_seconds)  # the header's frame count may have lied
    return sink.finish()


def _channels_first(array: np.ndarray) -> np.ndarray:
    """``[N]`` -> ``[1, N]``; ``[C, N]`` kept. ``[N, C]`` is refused rather than guessed."""
    if array.ndim == 1:
        return array[None, :]
    if array.ndim != 2:
        raise _fail(
            f"audio array has shape {array.shape}; expected [N] or channels-first [C, N]", Reason.BAD_SHAPE
        )
    if array.shape[0] > 2 and array.shape[1] <= 2:
        raise _fail(
            f"audio array has shape {array.shape}, which looks like [N, C]; pass channels-first [C, N] "
            "(e.g. array.T)",
            Reason.BAD_SHAPE,
        )
    check_channels(array.shape[0])
    return array


def _array_to_unit(array: np.ndarray) -> np.ndarray:
    """Float in [-1, 1] or integer PCM -> float32 in [-1, 1], same layout."""
    if np.issubdtype(array.dtype, np.floating):
        check_finite(array)
        low, high = float(array.min()), float(array.max())
        if low < -1.0 or high > 1.0:
            raise _fail(f"float audio must lie in [-1, 1], got [{low:g}, {high:g}]", Reason.BAD_RANGE)
        return array.astype(np.float32)
    if array.dtype == np.uint8:  # 8-bit PCM is unsigned with silence at 128
        return ((array.astype(np.float32) - 128.0) * 2.0**-7).astype(np.float32)
    if array.dtype in _PCM_SCALES:
        return (array.astype(np.float64) * _PCM_SCALES[array.dtype]).astype(np.float32)
    raise _fail(
        f"audio array has dtype {array.dtype}; expected float in [-1, 1] or int8/uint8/int16/int32 PCM",
        Reason.BAD_DTYPE,
    )


def _from_array(array: np.ndarray, sample_rate: int | None, max_seconds: float) -> np.ndarray:
    """Validate a raw sample array and bring it to the model's clip."""
    planar = _channels_first(array)
    if sample_rate is None:
        raise _fail(
            "the sample rate is not given: raw sample arrays need sample_rate=... (Hz)",
            Reason.MISSING_SAMPLE_RATE,
        )
    rate = check_rate(sample_rate)
    if planar.shape[0] == 0:
        raise _fail("audio has no channels", Reason.EMPTY)
    check_duration(planar.shape[1], rate, max_seconds)
    sink = ModelRateSink(rate, planar.shape[0], planar.shape[1])
    sink.write(np.ascontiguousarray(_array_to_unit(planar).T))
    return sink.finish()


def load_audio(
    data: AudioLike, sample_rate: int | None = None, max_seconds: float = DEFAULT_MAX_SECONDS
) -> np.ndarray:
    """Decode or validate one clip; returns float32 ``[C, N]`` (C in 1, 2) in int16 range at 44.1 kHz.

    ``data`` is an encoded file (bytes-like or a path), whose own rate is used (a different
    ``sample_rate`` is an error), or a sample array ``[N]`` / channels-first ``[C, N]`` that needs
    ``sample_rate``: float in [-1, 1], or int16 (as is), int32 (scaled by 2**-16), int8 (by 2**8)
    or uint8 (8-bit PCM, offset 128).
    """
    if isinstance(data, np.ndarray):
        return _from_array(data, sample_rate, max_seconds)
    if isinstance(data, bytes | bytearray | memoryview | str | os.PathLike):
        return _decode(data, sample_rate, max_seconds)
    raise _fail(
        f"unsupported audio type {type(data).__name__}; pass encoded bytes, a path or a numpy array",
        Reason.UNSUPPORTED_TYPE,
    )
