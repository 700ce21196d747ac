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
import soxr

from audioclip.audio_checks import (
    check_channels,
    check_duration,
    check_finite,
    check_rate,
    downmixed,
    frame_limit,
)
from audioclip.audio_demux import NotRecognised, decode_container
from audioclip.errors import InvalidInputError, Reason, describe

SAMPLE_RATE = 44100
DEFAULT_MAX_SECONDS = 300.0
INT16_SCALE = 32768.0

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


def _decode_sndfile(source: io.BytesIO | str | os.PathLike, max_seconds: float) -> tuple[np.ndarray, int]:
    """libsndfile's read into ``[N, C]`` float32; header checks come first."""
    with sf.SoundFile(source) as handle:
        check_channels(handle.channels)
        check_duration(handle.frames, handle.samplerate, max_seconds)
        frames = frame_limit(max_seconds, handle.samplerate)
        unit = handle.read(frames=frames, dtype="float32", always_2d=True)
        return unit, handle.samplerate


def _decode(
    data: bytes | bytearray | memoryview | str | os.PathLike, sample_rate: int | None, max_seconds: float
) -> tuple[np.ndarray, int]:
    """An encoded file -> ``[N, C]`` float32 in [-1, 1] and its rate: libsndfile where it reads the
    format, FFmpeg (``audio_demux``) for the containers it lacks (M4A, WebM, video tracks ...)."""
    if isinstance(data, str | os.PathLike) and not Path(data).is_file():
        raise _fail(f"audio file {os.fspath(data)!r} does not exist", Reason.NOT_FOUND)
    source = io.BytesIO(bytes(data)) if isinstance(data, bytes | bytearray | memoryview) else data
    try:
        unit, rate = _decode_sndfile(source, max_seconds)
    except InvalidInputError:
        raise
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as sndfile_err:
        try:
            unit, rate = decode_container(data, max_seconds)
        except NotRecognised:
            raise _fail(
                f"cannot decode audio: {describe(sndfile_err)} (neither libsndfile nor FFmpeg reads it)",
                Reason.UNDECODABLE,
            ) from None
    _check_file_rate(rate, sample_rate)
    check_duration(unit.shape[0], rate, max_seconds)  # the header's frame count may have lied
    check_finite(unit)
    # Lossy decoders overshoot full scale slightly on loud material; PCM could not exceed it.
    return downmixed(np.clip(unit, -1.0, 1.0, out=unit)), rate


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


def _from_array(array: np.ndarray, sample_rate: int | None, max_seconds: float) -> tuple[np.ndarray, int]:
    """Validate a raw sample array; returns ``[N, C]`` float32 in [-1, 1] and its rate."""
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
    return downmixed(np.ascontiguousarray(_array_to_unit(planar).T)), rate


def _to_model_rate(unit: np.ndarray, rate: int) -> np.ndarray:
    """Resample ``[N, C]`` to 44.1 kHz and return the model's ``[C, N]`` int16-range float32. Scaled
    in place; a mono ``[N, 1]`` transposes without a copy, so a long recording is held once more
    at most (by the resampler's output)."""
    if rate != SAMPLE_RATE:
        unit = soxr.resample(unit, rate, SAMPLE_RATE, quality="VHQ")
    elif not unit.flags.writeable:
        unit = unit.copy()
    unit *= np.float32(INT16_SCALE)
    return np.ascontiguousarray(unit.T, dtype=np.float32)


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
        unit, rate = _from_array(data, sample_rate, max_seconds)
    elif isinstance(data, bytes | bytearray | memoryview | str | os.PathLike):
        unit, rate = _decode(data, sample_rate, max_seconds)
    else:
        raise _fail(
            f"unsupported audio type {type(data).__name__}; pass encoded bytes, a path or a numpy array",
            Reason.UNSUPPORTED_TYPE,
        )
    return _to_model_rate(unit, rate)
