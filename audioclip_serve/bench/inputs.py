"""Deterministic benchmark inputs: text pools, photo-like JPEGs, WAV clips, and their description."""

from __future__ import annotations

import io
import random
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .common import log

SAMPLE_RATE = 44100


@dataclass(frozen=True)
class Kind:
    """One kind of input: which tower it goes to and how it is described."""

    name: str
    modality: str
    label: str


KINDS = {
    k.name: k
    for k in (
        Kind("queries", "text", "short queries, 5-15 tokens"),
        Kind("sentences", "text", "sentences, 30-60 tokens"),
        Kind("photo", "image", "640x480 JPEG q90"),
        Kind("large", "image", "4000x3000 JPEG q90"),
        Kind("clip5", "audio", "5 s WAV 44.1 kHz int16"),
        Kind("clip30", "audio", "30 s WAV 44.1 kHz int16"),
    )
}
POOL_SIZES = {"queries": 64, "sentences": 64, "photo": 32, "large": 2, "clip5": 8, "clip30": 2}


_SOURCES = (
    "dog barking", "church bells", "heavy rain", "diesel engine", "children laughing", "campfire",
    "footsteps on gravel", "old telephone", "waves on rocks", "cat purring", "helicopter", "glass breaking",
    "violin melody", "wind in pine trees", "cheering crowd", "kettle whistling", "thunderstorm", "train horn",
)  # fmt: skip
_ADJECTIVES = ("loud", "distant", "soft", "muffled", "sharp", "quiet", "echoing", "steady", "sudden")
_PLACES = (
    "in the distance", "at night", "in a busy street", "inside a small kitchen", "near the sea",
    "in an empty hall", "during a storm", "in the early morning", "on a crowded platform", "in a forest",
)  # fmt: skip
_DETAILS = (
    "recorded with a cheap phone microphone", "with a lot of echo from the surrounding walls",
    "partly drowned out by traffic noise", "close to the microphone and slightly distorted",
    "fading in and out as the wind changes direction", "with birds singing softly in the background",
    "while the recorder is carried slowly along a gravel path", "with a faint electrical hum underneath",
)  # fmt: skip
_BACKGROUNDS = (
    "someone is talking quietly on the phone", "a radio plays old pop songs in another room",
    "cars keep passing by on the wet road outside", "a clock ticks loudly on the wall nearby",
    "a dog answers from a neighbouring garden", "people are chatting at a table close by",
)  # fmt: skip


def token_count(text: str) -> int:
    """CLIP BPE tokens of ``text`` including SOT and EOT (what the text tower runs over)."""
    from audioclip.tokenizer import tokenize_to_ids

    return len(tokenize_to_ids([text], 77, truncate=True)[0])


def _query(rng: random.Random) -> str:
    words = [rng.choice(_ADJECTIVES)] if rng.random() < 0.5 else []
    words.append(rng.choice(_SOURCES))
    if rng.random() < 0.7:
        words.append(rng.choice(_PLACES))
    return " ".join(words)


def _a(word: str) -> str:
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def _sentence(rng: random.Random) -> str:
    text = (
        f"{_a(rng.choice(_ADJECTIVES)).capitalize()} {rng.choice(_SOURCES)} {rng.choice(_PLACES)}, "
        f"{rng.choice(_DETAILS)}, while {rng.choice(_BACKGROUNDS)}"
    )
    if rng.random() < 0.6:
        text += f" and {_a(rng.choice(_SOURCES))} can be heard {rng.choice(_PLACES)}"
    if rng.random() < 0.5:
        text += f", {rng.choice(_DETAILS)}"
    return text + "."


def text_pool(n: int, seed: int, make: Callable[[random.Random], str], lo: int, hi: int) -> list[str]:
    """``n`` distinct texts from ``make`` whose token count (with SOT/EOT) lies in ``[lo, hi]``."""
    rng, out = random.Random(seed), []
    for _ in range(100 * n):
        text = make(rng)
        if text not in out and lo <= token_count(text) <= hi:
            out.append(text)
        if len(out) == n:
            return out
    raise RuntimeError(f"could not make {n} texts of {lo}-{hi} tokens")


def photo_jpeg(width: int, height: int, seed: int, quality: int = 90) -> bytes:
    """A photo-like JPEG: a smooth three-colour gradient, one soft blob, and sensor-like noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    x = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :, None]
    left, right, bottom = (rng.uniform(20, 235, 3).astype(np.float32) for _ in range(3))
    img = (1 - y) * ((1 - x) * left + x * right) + y * bottom
    cy, cx, radius = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.1, 0.3)
    blob = np.exp(-((y - cy) ** 2 + ((x - cx) * width / height) ** 2) / (2 * radius**2))
    img = img + blob * rng.uniform(-80, 80, 3).astype(np.float32)
    img += rng.standard_normal(img.shape, dtype=np.float32) * 6.0
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def wav_clip(seconds: float, seed: int) -> bytes:
    """A WAV clip (44.1 kHz, mono int16): a harmonic tone with a slow tremolo, plus noise."""
    import soundfile as sf

    rng = np.random.default_rng(seed)
    t = np.arange(round(SAMPLE_RATE * seconds)) / SAMPLE_RATE
    f0 = 110.0 * 2 ** (rng.integers(0, 24) / 12)
    tone = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in (1, 2, 3)) * (0.6 + 0.4 * np.sin(np.pi * t))
    wave = 0.35 * tone + 0.05 * rng.standard_normal(t.size)
    buf = io.BytesIO()
    sf.write(buf, np.clip(wave * 32767, -32768, 32767).astype(np.int16), SAMPLE_RATE, "PCM_16", format="WAV")
    return buf.getvalue()


def make_inputs(kinds: Sequence[str]) -> dict[str, list]:
    """Every input pool, deterministic (fixed seeds)."""
    makers: dict[str, Callable[[int], list]] = {
        "queries": lambda n: text_pool(n, 1, _query, 5, 15),
        "sentences": lambda n: text_pool(n, 2, _sentence, 30, 60),
        "photo": lambda n: [photo_jpeg(640, 480, 100 + i) for i in range(n)],
        "large": lambda n: [photo_jpeg(4000, 3000, 200 + i) for i in range(n)],
        "clip5": lambda n: [wav_clip(5.0, 300 + i) for i in range(n)],
        "clip30": lambda n: [wav_clip(30.0, 400 + i) for i in range(n)],
    }
    inputs = {}
    for name in kinds:
        log(f"inputs: {name} ({POOL_SIZES[name]} distinct)")
        inputs[name] = makers[name](POOL_SIZES[name])
    return inputs


def describe_inputs(inputs: dict[str, list]) -> dict[str, dict]:
    """Sizes of the pools, for the report."""
    out: dict[str, dict] = {}
    for name, pool in inputs.items():
        if KINDS[name].modality == "text":
            tokens = [token_count(t) for t in pool]
            out[name] = {"count": len(pool), "tokens_min": min(tokens), "tokens_max": max(tokens)}
        else:
            sizes = [len(b) for b in pool]
            out[name] = {"count": len(pool), "bytes_mean": round(statistics.mean(sizes))}
    return out


def batch_of(pool: list, start: int, n: int) -> list:
    """``n`` items of ``pool`` from ``start``, wrapping around."""
    return [pool[(start + j) % len(pool)] for j in range(n)]
