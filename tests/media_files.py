"""Recordings and photos in the formats people have, made here with PyAV's FFmpeg encoders and
pillow-heif, from sounds whose samples the tests know."""

from __future__ import annotations

import io
import os
from fractions import Fraction

import av
import numpy as np
import pillow_heif
from PIL import Image

# (container format, audio codec, content type) of each recording format the audio route takes
AUDIO_CONTAINERS = {
    "m4a_aac": ("ipod", "aac", "audio/mp4"),
    "m4a_alac": ("ipod", "alac", "audio/mp4"),
    "adts_aac": ("adts", "aac", "audio/aac"),
    "webm_opus": ("webm", "libopus", "audio/webm"),
    "mkv_opus": ("matroska", "libopus", "audio/x-matroska"),
}
# (container, video codec) of the video formats whose audio track is embedded
VIDEO_CONTAINERS = {
    "mp4_h264_aac": ("mp4", "libx264", "aac", "video/mp4"),
    "mov_h264_aac": ("mov", "libx264", "aac", "video/quicktime"),
    "webm_vp8_opus": ("webm", "libvpx", "libopus", "video/webm"),
}


def tone_scene(rate: int = 48000, seconds: float = 3.0, channels: int = 1) -> np.ndarray:
    """``[C, N]`` float32 in [-1, 1]: a 440 Hz tone, then a 1 kHz tone, then a 3 kHz tone (a sound
    whose parts differ), with a 1/f stereo offset when stereo."""
    t = np.arange(int(rate * seconds)) / rate
    third = t.size // 3
    freq = np.where(t < t[third], 440.0, np.where(t < t[2 * third], 1000.0, 3000.0))
    mono = 0.4 * np.sin(2 * np.pi * np.cumsum(freq) / rate)
    return np.stack([mono * (0.9 + 0.1 * c) for c in range(channels)]).astype(np.float32)


def _encode_audio(stream: av.AudioStream, samples: np.ndarray, rate: int, out: av.container.OutputContainer):
    layout = "mono" if samples.shape[0] == 1 else "stereo"
    step = 4096
    for start in range(0, samples.shape[1], step):
        chunk = np.ascontiguousarray(samples[:, start : start + step])
        fmt = stream.codec_context.format.name
        frame = av.AudioFrame.from_ndarray(_as_format(chunk, fmt), format=fmt, layout=layout)
        frame.sample_rate = rate
        frame.pts = start
        frame.time_base = Fraction(1, rate)
        for packet in stream.encode(frame):
            out.mux(packet)
    for packet in stream.encode(None):
        out.mux(packet)


def _as_format(chunk: np.ndarray, fmt: str) -> np.ndarray:
    """Planar float, or the integer PCM an encoder wants (ALAC takes s16p/s32p)."""
    if fmt.startswith("s16"):
        chunk = (chunk * 32767).astype(np.int16)
    elif fmt.startswith("s32"):
        chunk = (chunk * 2147483647).astype(np.int32)
    return chunk if fmt.endswith("p") else chunk.T.reshape(1, -1)


def encode_audio(samples: np.ndarray, rate: int, name: str) -> bytes:
    """``samples`` ``[C, N]`` float32 as one of ``AUDIO_CONTAINERS``."""
    container, codec, _ = AUDIO_CONTAINERS[name]
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=container) as out:
        layout = "mono" if samples.shape[0] == 1 else "stereo"
        stream = out.add_stream(codec, rate=rate, layout=layout)
        _encode_audio(stream, samples, rate, out)
    return buffer.getvalue()


def encode_video(samples: np.ndarray, rate: int, name: str, fps: int = 10) -> bytes:
    """A small moving picture with ``samples`` as its audio track, as one of ``VIDEO_CONTAINERS``."""
    container, video_codec, audio_codec, _ = VIDEO_CONTAINERS[name]
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=container) as out:
        video = out.add_stream(video_codec, rate=fps)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        layout = "mono" if samples.shape[0] == 1 else "stereo"
        audio = out.add_stream(audio_codec, rate=rate, layout=layout)
        for index in range(int(samples.shape[1] / rate * fps)):
            picture = np.full((48, 64, 3), (index * 9) % 256, dtype=np.uint8)
            for packet in video.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")):
                out.mux(packet)
        for packet in video.encode(None):
            out.mux(packet)
        _encode_audio(audio, samples, rate, out)
    return buffer.getvalue()


def heic_photo(image: Image.Image, quality: int = 95) -> bytes:
    """``image`` as an iPhone-style HEIC file."""
    buffer = io.BytesIO()
    pillow_heif.from_pillow(image).save(buffer, quality=quality)
    return buffer.getvalue()


def write_scene(path: str, seconds: float = 12.0) -> None:
    """The tests' tone scene as a file whose suffix names the format (.wav .m4a .webm .mkv .mp4 .mov)."""
    import soundfile as sf

    scene = tone_scene(48000, seconds, channels=1)
    suffix = path.rsplit(".", 1)[-1].lower()
    audio = {"m4a": "m4a_aac", "aac": "adts_aac", "webm": "webm_opus", "mkv": "mkv_opus"}
    video = {"mp4": "mp4_h264_aac", "mov": "mov_h264_aac"}
    if suffix in audio:
        data = encode_audio(scene, 48000, audio[suffix])
    elif suffix in video:
        data = encode_video(scene, 48000, video[suffix])
    else:
        buffer = io.BytesIO()
        sf.write(buffer, scene.T, 48000, format=suffix.upper())
        data = buffer.getvalue()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as out:
        out.write(data)


if __name__ == "__main__":
    import sys

    for target in sys.argv[1:]:
        write_scene(target)
