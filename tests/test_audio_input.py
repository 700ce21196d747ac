"""Audio decoding: golden wavs, resampling checked against scipy, codecs, arrays and every error."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from audioclip import audio_input as ai
from audioclip.errors import InvalidInputError

INPUTS = Path(__file__).parent / "data" / "golden" / "inputs"
GOLDEN_CLIPS = [("speech_dog_44k.wav", 1), ("chord_44k.wav", 1), ("noise_stereo_44k.wav", 2)]


def _tone(freq: float, rate: int, seconds: float, channels: int = 1, amplitude: float = 0.5) -> np.ndarray:
    """``[N, C]`` float32 sine, the layout soundfile writes."""
    t = np.arange(int(rate * seconds)) / rate
    mono = (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return np.repeat(mono[:, None], channels, axis=1)


def _encode(samples: np.ndarray, rate: int, fmt: str, subtype: str | None = None) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


def _peak_hz(signal: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(signal * np.hanning(signal.size)))
    return float(np.fft.rfftfreq(signal.size, 1 / rate)[np.argmax(spectrum)])


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    n = min(a.size, b.size)
    return float(np.corrcoef(a[:n], b[:n])[0, 1])


def _reason(excinfo: pytest.ExceptionInfo[InvalidInputError]) -> str:
    return excinfo.value.reason


@pytest.mark.parametrize(("name", "channels"), GOLDEN_CLIPS)
def test_golden_wavs_are_int16_samples_exactly(name: str, channels: int) -> None:
    path = INPUTS / name
    expected, rate = sf.read(path, dtype="int16", always_2d=True)
    assert rate == ai.SAMPLE_RATE
    ours = ai.load_audio(path)
    assert ours.dtype == np.float32
    assert ours.shape == (channels, expected.shape[0])
    assert ours.flags.c_contiguous
    np.testing.assert_array_equal(ours, expected.T.astype(np.float32))
    np.testing.assert_array_equal(ai.load_audio(path.read_bytes()), ours)
    np.testing.assert_array_equal(ai.load_audio(str(path)), ours)


@pytest.mark.parametrize("index", range(3))
def test_golden_audio_inputs_differ_only_by_the_dither(index: int) -> None:
    """The stored inputs are the files plus sigma-32 dither: same scale (int16 range), same layout."""
    golden = np.load(INPUTS.parent / "golden.npz")[f"audio_input_{index}"]
    ours = ai.load_audio(INPUTS / GOLDEN_CLIPS[index][0])
    assert ours.shape == golden.shape
    assert 24.0 < float(np.std(golden - ours)) < 40.0


@pytest.mark.parametrize(("name", "up", "down"), [("speech_rain_22k.wav", 2, 1), ("sweep_48k.wav", 147, 160)])
def test_resampled_files_match_scipy(name: str, up: int, down: int) -> None:
    signal = pytest.importorskip("scipy.signal")
    original, rate = sf.read(INPUTS / name, dtype="float64")
    ours = ai.load_audio(INPUTS / name)
    assert ours.shape[0] == 1
    assert abs(ours.shape[1] - round(original.size * 44100 / rate)) <= 1
    independent = signal.resample_poly(original, up, down) * ai.INT16_SCALE
    assert _correlation(ours[0], independent) > 0.99
    assert abs(float(np.std(ours[0])) / float(np.std(independent)) - 1.0) < 0.01


def test_resampling_keeps_a_tone_at_its_frequency() -> None:
    tone = _tone(3000.0, 48000, 1.0)
    ours = ai.load_audio(_encode(tone, 48000, "WAV", "FLOAT"))
    assert ours.shape == (1, 44100)
    assert _peak_hz(ours[0], ai.SAMPLE_RATE) == pytest.approx(3000.0, abs=2.0)
    assert float(np.abs(ours).max()) == pytest.approx(0.5 * 32768, rel=0.01)


def test_mono_and_stereo_float_arrays() -> None:
    stereo = _tone(440.0, 44100, 0.5, channels=2).T.copy()
    stereo[1] *= 0.5
    ours = ai.load_audio(stereo, sample_rate=44100)
    np.testing.assert_array_equal(ours, stereo * 32768.0)
    mono = ai.load_audio(stereo[0].astype(np.float64), sample_rate=44100)
    assert mono.shape == (1, stereo.shape[1])
    np.testing.assert_array_equal(mono[0], ours[0])
    assert ai.load_audio(stereo[:1], sample_rate=44100).shape == (1, stereo.shape[1])


def test_array_at_other_rate_is_resampled() -> None:
    ours = ai.load_audio(_tone(1000.0, 16000, 2.0, channels=2).T, sample_rate=16000)
    assert ours.shape == (2, 88200)
    assert _peak_hz(ours[1], ai.SAMPLE_RATE) == pytest.approx(1000.0, abs=2.0)


@pytest.mark.parametrize(
    ("dtype", "values", "expected"),
    [
        (np.int16, [-32768, -1, 0, 32767], [-32768.0, -1.0, 0.0, 32767.0]),
        (np.int32, [-(2**31), -65536, 65536, 2**31 - 65536], [-32768.0, -1.0, 1.0, 32767.0]),
        (np.int8, [-128, -1, 0, 127], [-32768.0, -256.0, 0.0, 32512.0]),
        (np.uint8, [0, 127, 128, 255], [-32768.0, -256.0, 0.0, 32512.0]),
    ],
)
def test_integer_pcm_arrays_scaled_to_int16_range(
    dtype: type, values: list[int], expected: list[float]
) -> None:
    ours = ai.load_audio(np.array(values, dtype=dtype), sample_rate=44100)
    np.testing.assert_array_equal(ours, np.array([expected], dtype=np.float32))


def test_flac_and_ogg_files_decode(tmp_path: Path) -> None:
    pcm, _ = sf.read(INPUTS / "noise_stereo_44k.wav", dtype="int16")
    flac = tmp_path / "clip.flac"
    sf.write(flac, pcm, 44100, format="FLAC")
    np.testing.assert_array_equal(ai.load_audio(flac), pcm.T.astype(np.float32))
    tone = _tone(880.0, 44100, 1.0, channels=2)
    ogg = tmp_path / "clip.ogg"
    sf.write(ogg, tone, 44100, format="OGG", subtype="VORBIS")
    decoded = ai.load_audio(ogg)
    assert decoded.shape == (2, 44100)
    assert _correlation(decoded[0], tone[:, 0] * 32768) > 0.99


@pytest.mark.parametrize(
    ("fmt", "subtype", "rate"),
    [("MP3", "MPEG_LAYER_III", 44100), ("OGG", "OPUS", 48000)],
    ids=["mp3", "opus"],
)
def test_mp3_and_opus_decode_with_the_bundled_libsndfile(fmt: str, subtype: str, rate: int) -> None:
    if subtype not in sf.available_subtypes(fmt):
        pytest.skip(f"this libsndfile ({sf.__libsndfile_version__}) has no {fmt}/{subtype}")
    ours = ai.load_audio(_encode(_tone(1000.0, rate, 1.0), rate, fmt, subtype))
    assert ours.shape[0] == 1
    assert abs(ours.shape[1] - 44100) < 0.01 * 44100
    assert _peak_hz(ours[0], ai.SAMPLE_RATE) == pytest.approx(1000.0, abs=3.0)


def test_lossy_overshoot_is_clipped_not_rejected() -> None:
    square = np.sign(_tone(100.0, 44100, 1.0, amplitude=1.0)).astype(np.float32)
    data = _encode(square, 44100, "OGG", "VORBIS")
    raw, _ = sf.read(io.BytesIO(data), dtype="float32")
    assert float(np.abs(raw).max()) > 1.0  # the codec really overshoots
    ours = ai.load_audio(data)
    assert float(np.abs(ours).max()) == 32768.0


def _expect(reason: str, data: object, **kwargs: object) -> InvalidInputError:
    with pytest.raises(InvalidInputError) as info:
        ai.load_audio(data, **kwargs)  # type: ignore[arg-type]
    assert _reason(info) == reason, str(info.value)
    assert isinstance(info.value, ValueError)
    return info.value


def test_more_than_two_channels_are_mixed_to_mono_by_their_mean() -> None:
    surround = _tone(440.0, 44100, 0.1, channels=6) * np.linspace(0.2, 1.0, 6, dtype=np.float32)
    mixed = ai.load_audio(_encode(surround, 44100, "WAV", "FLOAT"))
    assert mixed.shape == (1, surround.shape[0])
    np.testing.assert_allclose(mixed[0], surround.mean(axis=1) * 32768.0, rtol=1e-5, atol=1e-3)
    from_array = ai.load_audio(np.ascontiguousarray(surround.T), sample_rate=44100)
    np.testing.assert_allclose(from_array, mixed, rtol=1e-5, atol=1e-3)
    assert ai.load_audio(_encode(_tone(440.0, 44100, 0.1, channels=2), 44100, "WAV")).shape[0] == 2
    _expect("too_many_channels", np.zeros((65, 1000), dtype=np.float32), sample_rate=44100)


def test_empty() -> None:
    _expect("empty", _encode(np.zeros((0, 1), dtype=np.float32), 44100, "WAV"))
    _expect("empty", np.zeros(0, dtype=np.float32), sample_rate=44100)
    _expect("empty", np.zeros((2, 0), dtype=np.int16), sample_rate=44100)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_not_finite(bad: float) -> None:
    array = np.zeros((2, 100), dtype=np.float32)
    array[1, 50] = bad
    _expect("not_finite", array, sample_rate=44100)
    _expect("not_finite", _encode(array.T, 44100, "WAV", "FLOAT"))


def test_too_long_is_refused_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    data = _encode(_tone(440.0, 22050, 2.0), 22050, "WAV")
    assert ai.load_audio(data, max_seconds=2.0).shape == (1, 88200)

    def no_decoding(*args: object, **kwargs: object) -> None:
        raise AssertionError("samples were decoded")

    monkeypatch.setattr(sf.SoundFile, "read", no_decoding)
    error = _expect("audio_too_long", data, max_seconds=1.5)
    assert "2.0 s" in str(error)
    _expect("audio_too_long", np.zeros(44101, dtype=np.float32), sample_rate=44100, max_seconds=1.0)


@pytest.mark.parametrize("bad", [1.0001, -1.5, 1e300])
def test_float_out_of_range(bad: float) -> None:
    array = np.zeros(100, dtype=np.float64)
    array[10] = bad
    _expect("bad_range", array, sample_rate=44100)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(np.random.default_rng(5).bytes(4096), id="random-bytes"),
        pytest.param(b"", id="empty-bytes"),
        pytest.param((INPUTS / "chord_44k.wav").read_bytes()[:30], id="truncated-header"),
        pytest.param((INPUTS.parent.parent / "golden" / "inputs" / "rocket.jpg").read_bytes(), id="a-jpeg"),
    ],
)
def test_undecodable(data: bytes) -> None:
    _expect("undecodable", data)


def test_missing_file() -> None:
    _expect("not_found", INPUTS / "absent.wav")


@pytest.mark.parametrize(
    ("shape", "reason"),
    [((44100, 2), "bad_shape"), ((1000, 1), "bad_shape"), ((2, 10, 10), "bad_shape"), ((), "bad_shape")],
)
def test_bad_shapes(shape: tuple[int, ...], reason: str) -> None:
    error = _expect(reason, np.zeros(shape, dtype=np.float32), sample_rate=44100)
    assert "[C, N]" in str(error)


@pytest.mark.parametrize("dtype", [np.uint16, np.int64, np.complex64, bool])
def test_bad_dtypes(dtype: type) -> None:
    _expect("bad_dtype", np.zeros((1, 100), dtype=dtype), sample_rate=44100)


def test_array_needs_a_sample_rate() -> None:
    error = _expect("missing_sample_rate", np.zeros(100, dtype=np.float32))
    assert "sample rate is not given" in str(error)


@pytest.mark.parametrize("rate", [0, -44100, 22050.0, True])
def test_bad_sample_rate(rate: object) -> None:
    _expect("bad_sample_rate", np.zeros(100, dtype=np.float32), sample_rate=rate)


def test_file_rate_conflicting_with_given_rate() -> None:
    data = (INPUTS / "chord_44k.wav").read_bytes()
    _expect("sample_rate_mismatch", data, sample_rate=48000)
    _expect("bad_sample_rate", data, sample_rate=-1)
    assert ai.load_audio(data, sample_rate=44100).shape == (1, 132300)


@pytest.mark.parametrize("data", [None, [0.0, 0.1], 3.5])
def test_unsupported_types(data: object) -> None:
    _expect("unsupported_type", data, sample_rate=44100)
