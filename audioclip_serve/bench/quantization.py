"""What each ``embedding_dtype`` loses: recall@k of its nearest neighbours against float32's.

    python -m audioclip_serve.bench.quantization --texts 2000 --images 300 --clips 150

Embeds varied inputs in-process (texts from a word grammar, generated images of several kinds,
synthesised clips), then for every vector as a query ranks all the others by cosine in float32
and in each dtype (packed bits by Hamming distance): recall@k is the share of float32's top k
that the dtype's top k keeps, averaged over the queries.
"""

from __future__ import annotations

import argparse
import io
import sys

import numpy as np

from audioclip.quantize import EMBEDDING_DTYPES, comparable, quantize

WORDS = [
    "dog",
    "cat",
    "bird",
    "rain",
    "thunder",
    "car",
    "engine",
    "piano",
    "guitar",
    "violin",
    "drum",
    "bell",
    "crowd",
    "child",
    "laughter",
    "ocean",
    "wind",
    "fire",
    "train",
    "siren",
    "clock",
    "water",
    "kettle",
    "door",
    "footsteps",
    "keyboard",
    "applause",
    "river",
    "forest",
    "city",
    "night",
    "morning",
    "storm",
    "snow",
    "street",
    "kitchen",
    "church",
    "market",
]
FORMS = ("a {} and a {}", "the sound of {} near {}", "a photo of {} in the {}", "{} {}", "loud {} with {}")


def recall_at_k(reference: np.ndarray, dtype: str, k: int = 10) -> float:
    """Mean over queries of |top-k(dtype) & top-k(float32)| / k, each query against all others."""

    def unit(x: np.ndarray) -> np.ndarray:
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    exact = unit(reference.astype(np.float64))
    coded = unit(comparable(quantize(reference, dtype), dtype).astype(np.float64))
    hits = 0
    for start in range(0, len(reference), 256):
        block = slice(start, start + 256)
        rows = np.arange(start, min(start + 256, len(reference)))
        truth, guess = exact[block] @ exact.T, coded[block] @ coded.T
        truth[np.arange(len(rows)), rows] = guess[np.arange(len(rows)), rows] = -np.inf  # not itself
        top_truth = np.argpartition(-truth, k, axis=1)[:, :k]
        top_guess = np.argpartition(-guess, k, axis=1)[:, :k]
        hits += sum(len(np.intersect1d(a, b)) for a, b in zip(top_truth, top_guess, strict=True))
    return hits / (k * len(reference))


def varied_texts(n: int, rng: np.random.Generator) -> list[str]:
    return [FORMS[i % len(FORMS)].format(*rng.choice(WORDS, 2, replace=False)) for i in range(n)]


def varied_images(n: int, rng: np.random.Generator) -> list[bytes]:
    """PNG bytes: noise, gradients, stripes and blocks of random colours and sizes."""
    from PIL import Image

    out = []
    for i in range(n):
        h, w = (int(v) for v in rng.integers(64, 320, 2))
        y, x = np.mgrid[0:h, 0:w]
        colour = rng.integers(0, 256, 3)
        kind = i % 4
        if kind == 0:
            pixels = rng.integers(0, 256, (h, w, 3))
        elif kind == 1:
            pixels = (x[..., None] / w * colour + y[..., None] / h * (255 - colour)).astype(int)
        elif kind == 2:
            pixels = ((x // rng.integers(4, 40)) % 2)[..., None] * colour
        else:
            pixels = ((x // 32 + y // 32) % 3)[..., None] * colour // 2 + rng.integers(0, 60, (h, w, 3))
        buf = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def varied_clips(n: int, rng: np.random.Generator) -> list[tuple[np.ndarray, int]]:
    """One-second clips: tones, chords, sweeps and noise at random levels."""
    t = np.arange(44100) / 44100
    out = []
    for i in range(n):
        f = rng.uniform(80, 4000)
        kind = i % 4
        if kind == 0:
            wave = np.sin(2 * np.pi * f * t)
        elif kind == 1:
            wave = sum(np.sin(2 * np.pi * f * r * t) for r in (1, 1.25, 1.5))
        elif kind == 2:
            wave = np.sin(2 * np.pi * (f + rng.uniform(100, 3000) * t) * t)
        else:
            wave = rng.standard_normal(t.size)
        out.append(((wave / np.abs(wave).max() * rng.uniform(0.05, 0.9)).astype(np.float32), 44100))
    return out


def embed_varied(checkpoint: str, texts: int, images: int, clips: int, seed: int = 0) -> np.ndarray:
    """float32 rows for the varied inputs, through the library's pipelines."""
    from audioclip import AudioCLIP
    from audioclip.factory import load_weights
    from audioclip.pipeline import pipelines

    weights, _ = load_weights(checkpoint)
    towers = tuple(t for t, n in (("text", texts), ("image", images), ("audio", clips)) if n)
    model = AudioCLIP.from_state_dict(weights, "cpu", towers)
    rng = np.random.default_rng(seed)
    inputs = {
        "text": varied_texts(texts, rng),
        "image": varied_images(images, rng),
        "audio": varied_clips(clips, rng),
    }
    parts = []
    for modality, items in inputs.items():
        pipeline = pipelines()[modality]
        for start in range(0, len(items), 32):
            prepared = [pipeline.decode(item) for item in items[start : start + 32]]
            parts.append(pipeline.embed(model, prepared))
    return np.concatenate(parts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="synthetic:demo")
    p.add_argument("--texts", type=int, default=2000)
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--clips", type=int, default=150)
    p.add_argument("-k", type=int, default=10)
    args = p.parse_args(argv)
    rows = embed_varied(args.checkpoint, args.texts, args.images, args.clips)
    print(
        f"{len(rows)} embeddings ({args.texts} texts, {args.images} images, {args.clips} clips), "
        f"{args.checkpoint}\n\n| embedding_dtype | bytes per vector | recall@{args.k} |\n|---|--:|--:|"
    )
    for dtype in EMBEDDING_DTYPES:
        size = quantize(rows[:1], dtype).nbytes
        print(f"| {dtype} | {size} | {recall_at_k(rows, dtype, args.k):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
