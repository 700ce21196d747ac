"""A seeded generator of bad HTTP requests for every endpoint and content type.

Each case is ``(name, method, path, headers, body, must_fail)``. ``must_fail`` cases are
structurally invalid and must get a 4xx; the others are random mutations of valid files that
may still decode (a flipped byte inside JPEG data often does), so they may get a 200 — but
never a 5xx.
"""

from __future__ import annotations

import base64
import io
import json
import random
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import soundfile as sf

Case = tuple[str, str, str, dict[str, str], bytes, bool]
JSON = {"content-type": "application/json"}
NPY = {"content-type": "application/x-npy"}


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _png_header_claiming(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims a huge size, with a tiny (invalid) body: a decompression-bomb probe."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    body = struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    idat = zlib.compress(b"\x00" * 64)
    body += struct.pack(">I", len(idat)) + b"IDAT" + idat + struct.pack(">I", zlib.crc32(b"IDAT" + idat))
    return b"\x89PNG\r\n\x1a\n" + body


def _wav(samples: np.ndarray, rate: int = 44100) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def _mutate(data: bytes, rng: random.Random) -> bytes:
    kind = rng.choice(["truncate", "flip", "zero_run", "shuffle_head", "magic"])
    buf = bytearray(data)
    if kind == "truncate":
        return bytes(buf[: rng.randrange(1, max(2, len(buf) // 2))])
    if kind == "flip":
        for _ in range(rng.randint(1, 20)):
            buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
    elif kind == "zero_run":
        start, length = rng.randrange(len(buf)), rng.randint(16, 4096)
        buf[start : start + length] = bytes(len(buf[start : start + length]))
    elif kind == "shuffle_head":
        head = buf[:64]
        rng.shuffle(head)
        buf[:64] = head
    else:
        buf[:4] = rng.choice([b"GIF8", b"RIFF", b"\x89PNG", b"%PDF", b"\xff\xd8\xff\xe0"])
    return bytes(buf)


def structural_cases(inputs: Path) -> Iterator[Case]:
    """Invalid by construction: every one must be refused with a 4xx."""
    jpeg = (inputs / "rocket.jpg").read_bytes()
    text, image, audio = "/v1/embed/text", "/v1/embed/image", "/v1/embed/audio"
    yield "zero-length wav", "POST", audio, {"content-type": "audio/wav"}, _wav(np.zeros(0, np.int16)), True
    yield (  # more than two channels are mixed to mono, but not 65: no recording has that many
        "65-channel wav",
        "POST",
        audio,
        {"content-type": "audio/wav"},
        _wav(np.zeros((441, 65), np.int16)),
        True,
    )
    yield "empty body image", "POST", image, {"content-type": "image/png"}, b"", True
    yield "empty body audio", "POST", audio, {"content-type": "audio/wav"}, b"", True
    yield (
        "png bomb header",
        "POST",
        image,
        {"content-type": "image/png"},
        _png_header_claiming(60000, 60000),
        True,
    )
    yield (
        "npy NaN audio",
        "POST",
        audio + "?sample_rate=16000",
        NPY,
        _npy(np.full(1600, np.nan, np.float32)),
        True,
    )
    yield (
        "npy inf audio",
        "POST",
        audio + "?sample_rate=16000",
        NPY,
        _npy(np.full((1, 160), np.inf, np.float32)),
        True,
    )
    yield (
        "npy 65ch audio",
        "POST",
        audio + "?sample_rate=16000",
        NPY,
        _npy(np.zeros((65, 1600), np.float32)),
        True,
    )
    yield "npy no rate", "POST", audio, NPY, _npy(np.zeros(1600, np.float32)), True
    yield (
        "npy rank-4 audio",
        "POST",
        audio + "?sample_rate=8000",
        NPY,
        _npy(np.zeros((1, 1, 1, 9), np.float32)),
        True,
    )
    yield "npy complex audio", "POST", audio + "?sample_rate=8000", NPY, _npy(np.zeros(9, np.complex64)), True
    yield (
        "npy object",
        "POST",
        image,
        NPY,
        b"\x93NUMPY\x01\x00v\x00{'descr': '|O', 'fortran_order': False, 'shape': (1,), }" + b" " * 60 + b"\n",
        True,
    )
    yield "npy float image", "POST", image, NPY, _npy(np.zeros((8, 8, 3), np.float64)), True
    yield "npy 4-channel image", "POST", image, NPY, _npy(np.zeros((8, 8, 4), np.uint8)), True
    yield "npy rank-2 image", "POST", image, NPY, _npy(np.zeros((8, 8), np.uint8)), True
    yield (
        "npy nan pixels",
        "POST",
        image + "?preprocess=false",
        NPY,
        _npy(np.full((1, 3, 224, 224), np.nan, np.float32)),
        True,
    )
    yield (
        "npy wrong pixels",
        "POST",
        image + "?preprocess=false",
        NPY,
        _npy(np.zeros((1, 3, 100, 100), np.float32)),
        True,
    )
    yield "npy truncated", "POST", image, NPY, _npy(np.zeros((8, 8, 3), np.uint8))[:90], True
    for value in [
        "%%%",
        "data:image/png,notbase64",
        "data:;base64,@@@",
        "data:image/png;base64,",
        "",
        7,
        None,
        {"x": 1},
        "http://127.0.0.1/cat.jpg",
        "file:///etc/passwd",
    ]:
        body = json.dumps({"images": [value]}).encode()
        yield f"image item {value!r:.30}", "POST", image, JSON, body, True
    yield "audio item b64 garbage", "POST", audio, JSON, json.dumps({"audio": ["AAAA"]}).encode(), True
    yield "non-utf8 json", "POST", text, JSON, b'{"texts": ["\xff\xfe"]}', True
    yield "deeply nested", "POST", text, JSON, b'{"texts": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", True
    yield "huge string", "POST", text, JSON, json.dumps({"texts": ["a" * 50_000]}).encode(), True
    yield "missing field", "POST", text, JSON, b"{}", True
    yield "extra field", "POST", text, JSON, json.dumps({"texts": ["a"], "colour": "red"}).encode(), True
    yield "wrong type field", "POST", text, JSON, json.dumps({"texts": {"a": 1}}).encode(), True
    yield "bool as text", "POST", text, JSON, json.dumps({"texts": [True]}).encode(), True
    yield "null body", "POST", text, JSON, b"null", True
    yield "json scalar", "POST", image, JSON, b"3", True
    yield "bad truncate flag", "POST", text, JSON, json.dumps({"texts": ["a"], "truncate": 1}).encode(), True
    yield "text/plain", "POST", text, {"content-type": "text/plain"}, b"a dog", True
    yield "no content type, not an image", "POST", image, {}, b"neither a picture nor anything", True
    yield (
        "multipart no files",
        "POST",
        image,
        {"content-type": "multipart/form-data; boundary=xyz"},
        b"--xyz--\r\n",
        True,
    )
    yield (
        "multipart broken",
        "POST",
        audio,
        {"content-type": "multipart/form-data; boundary=xyz"},
        b"--xyz\r\ngarbage",
        True,
    )
    yield "bad query flag", "POST", image + "?normalize=maybe", {"content-type": "image/jpeg"}, jpeg, True
    yield "too many items", "POST", text, JSON, json.dumps({"texts": ["a"] * 1000}).encode(), True
    yield (
        "rank bad",
        "POST",
        "/v1/rank",
        JSON,
        json.dumps({"query": {"smell": "x"}, "candidates": []}).encode(),
        True,
    )
    yield (
        "openai bad model",
        "POST",
        "/v1/embeddings",
        JSON,
        json.dumps({"model": "gpt", "input": "x"}).encode(),
        True,
    )
    yield (
        "openai bad dims",
        "POST",
        "/v1/embeddings",
        JSON,
        json.dumps({"model": "audioclip-test", "input": "x", "dimensions": 12}).encode(),
        True,
    )
    yield "get on post route", "GET", text, {}, b"", True


def random_cases(inputs: Path, count: int, seed: int = 1234) -> Iterator[Case]:
    """Mutations of valid files and bodies; any outcome but a 5xx is acceptable."""
    rng = random.Random(seed)
    files = {
        "image": [(inputs / n).read_bytes() for n in ("rocket.jpg", "coffee.png")],
        "audio": [(inputs / n).read_bytes() for n in ("chord_44k.wav", "speech_rain_22k.wav")],
    }
    for i in range(count):
        modality = rng.choice(["image", "audio", "text"])
        if modality == "text":
            body = json.dumps(
                {"texts": ["".join(chr(rng.randrange(1, 0x2FFF)) for _ in range(rng.randrange(40)))]}
            )
            raw = _mutate(body.encode(), rng) if rng.random() < 0.5 else body.encode()
            yield f"text #{i}", "POST", "/v1/embed/text", JSON, raw, False
            continue
        data = _mutate(rng.choice(files[modality]), rng)
        path = f"/v1/embed/{modality}"
        if rng.random() < 0.5:
            kind = {"image": "image/jpeg", "audio": "audio/wav"}[modality]
            yield f"{modality} raw #{i}", "POST", path, {"content-type": kind}, data, False
        else:
            field = "images" if modality == "image" else "audio"
            body = json.dumps({field: [base64.b64encode(data).decode()]}).encode()
            yield f"{modality} json #{i}", "POST", path, JSON, body, False
