"""The formats phones, browsers and cameras record, decoded through FFmpeg (PyAV) where libsndfile
has no such container: each one's samples against the same sound sent as WAV, within the codec's
loss, and every failure a clear item error. HEIC photos through pillow-heif."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf
from media_files import AUDIO_CONTAINERS, VIDEO_CONTAINERS, encode_audio, encode_video, heic_photo, tone_scene
from PIL import Image

from audioclip import audio_demux
from audioclip.audio_input import load_audio
from audioclip.errors import InvalidInputError
from audioclip.image_input import crop_to_uint8

RATE = 48000
LOSSLESS = {"m4a_alac"}
# Minimum correlation with the WAV after aligning the codec's delay: AAC/Opus at default rates keep
# a tone scene nearly intact; raw ADTS AAC has no edit list, so its priming stays in and its frame
# edges smear the tone changes a little more.
MIN_CORRELATION = {"adts_aac": 0.9}


def _aligned_correlation(reference: np.ndarray, decoded: np.ndarray, max_lag: int = 4000) -> float:
    """The best correlation of two ``[N]`` signals over shifts of up to ``max_lag`` samples."""

    def corr(lag: int) -> float:
        a, b = (reference[lag:], decoded) if lag >= 0 else (reference, decoded[-lag:])
        n = min(a.size, b.size)
        return float(np.corrcoef(a[:n], b[:n])[0, 1])

    coarse = max(range(-max_lag, max_lag + 1, 16), key=corr)
    return max(corr(lag) for lag in range(coarse - 16, coarse + 17))


@pytest.fixture(scope="module")
def scene() -> np.ndarray:
    return tone_scene(RATE, 2.0, channels=2)


@pytest.fixture(scope="module")
def as_wav(scene) -> np.ndarray:
    buffer = io.BytesIO()
    sf.write(buffer, scene.T, RATE, format="WAV", subtype="FLOAT")
    return load_audio(buffer.getvalue())


@pytest.mark.parametrize("name", sorted(AUDIO_CONTAINERS))
def test_recording_formats_decode_like_the_same_sound_as_wav(name, scene, as_wav):
    data = encode_audio(scene, RATE, name)
    with pytest.raises(sf.LibsndfileError):
        sf.info(io.BytesIO(data))  # libsndfile has no such container: FFmpeg's path is what is tested
    decoded = load_audio(data)
    assert decoded.dtype == np.float32 and decoded.shape[0] == 2
    assert abs(decoded.shape[1] - as_wav.shape[1]) < 0.05 * 44100  # the codec's padding at most
    if name in LOSSLESS:
        np.testing.assert_allclose(decoded, as_wav, atol=2.0)  # 16-bit ALAC: within 2 int16 steps
    else:
        for channel in range(2):
            correlation = _aligned_correlation(as_wav[channel], decoded[channel])
            assert correlation > MIN_CORRELATION.get(name, 0.99), (name, correlation)
    np.testing.assert_array_equal(load_audio(data), decoded)  # deterministic


@pytest.mark.parametrize("name", sorted(VIDEO_CONTAINERS))
def test_the_audio_track_of_a_video_is_decoded(name, scene, as_wav):
    decoded = load_audio(encode_video(scene, RATE, name))
    assert decoded.shape[0] == 2
    assert _aligned_correlation(as_wav[0], decoded[0]) > 0.99


def test_a_path_decodes_like_its_bytes(tmp_path, scene):
    data = encode_audio(scene, RATE, "webm_opus")
    path = tmp_path / "memo.webm"
    path.write_bytes(data)
    np.testing.assert_array_equal(load_audio(path), load_audio(data))


def _reason(data: bytes, **kwargs) -> InvalidInputError:
    with pytest.raises(InvalidInputError) as info:
        load_audio(data, **kwargs)
    return info.value


def test_corrupt_silent_and_unknown_streams_are_clear_item_errors(scene, monkeypatch):
    data = encode_audio(scene, RATE, "m4a_aac")
    truncated = _reason(data[: len(data) // 3])
    assert truncated.reason == "undecodable", truncated
    assert _reason(b"\x00\x00\x00\x1cftypM4A " + b"\x00" * 64).reason == "undecodable"
    assert "neither libsndfile nor FFmpeg" in str(_reason(b"certainly not a sound file"))
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    picture = _reason(buffer.getvalue())
    assert picture.reason == "undecodable" and "no audio stream" in str(picture)

    # over the limit: refused from the container's header, before any packet is decoded
    def no_decoding(*args, **kwargs):
        raise AssertionError("packets were decoded")

    monkeypatch.setattr(audio_demux.av.container.InputContainer, "decode", no_decoding)
    too_long = _reason(data, max_seconds=1.0)
    assert too_long.reason == "audio_too_long" and "2.0 s" in str(too_long)


def test_a_stream_without_a_header_duration_stops_at_the_limit(scene, monkeypatch):
    data = encode_audio(scene, RATE, "webm_opus")
    monkeypatch.setattr(audio_demux, "_header_seconds", lambda container, stream: None)
    assert load_audio(data, max_seconds=3.0).shape[0] == 2
    assert _reason(data, max_seconds=1.0).reason == "audio_too_long"


def test_heic_photos_decode_like_the_same_picture():
    y, x = np.mgrid[0:300, 0:400]
    smooth = np.stack([x * 255 // 400, y * 255 // 300, (x + y) * 255 // 700], axis=-1).astype(np.uint8)
    picture = Image.fromarray(smooth)
    crop = crop_to_uint8(heic_photo(picture))
    reference = crop_to_uint8(smooth)
    assert crop.shape == (224, 224, 3)
    assert np.abs(crop.astype(int) - reference).mean() < 3.0  # HEVC's loss on a smooth picture
