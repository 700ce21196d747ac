"""Compact embeddings: one rule per ``embedding_dtype``, applied to each vector on its own.

Vector stores charge by the byte; a 1024-d float32 vector is 4 KiB. Every rule here depends on
the vector alone (never on the other vectors of a batch or a calibration set), so a vector
quantised today equals the same vector quantised tomorrow in any batch.

==========  ==============  =====  ==========================================================
dtype       numpy, shape    bytes  rule
==========  ==============  =====  ==========================================================
float32     float32 [1024]  4096   the model's output
float16     float16 [1024]  2048   IEEE half precision, round to nearest
int8        int8 [1024]     1024   ``round(127 * x / max|x|)``: symmetric, the scale is the
                                   vector's own largest component (cosine is unchanged by a
                                   per-vector scale; compare int8 vectors by cosine)
uint8       uint8 [1024]    1024   the int8 code plus 128 (subtract 128 before comparing)
binary      int8 [128]      128    the sign bits (``x > 0``) packed 8 per byte, big-endian
                                   within a byte, minus 128 (as sentence-transformers packs)
ubinary     uint8 [128]     128    the same packed bits as unsigned bytes (compare by Hamming
                                   distance)
==========  ==============  =====  ==========================================================
"""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np

EmbeddingDtype = Literal["float32", "float16", "int8", "uint8", "binary", "ubinary"]
EMBEDDING_DTYPES: tuple[str, ...] = get_args(EmbeddingDtype)
NUMPY_DTYPE = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "int8": np.dtype("i1"),
    "uint8": np.dtype("u1"),
    "binary": np.dtype("i1"),
    "ubinary": np.dtype("u1"),
}
PACKED = frozenset({"binary", "ubinary"})


def row_length(dim: int, dtype: str) -> int:
    """Values per vector: ``dim``, or ``dim / 8`` bytes of packed bits."""
    return dim // 8 if dtype in PACKED else dim


def quantize(rows: np.ndarray, dtype: str) -> np.ndarray:
    """float ``[N, D]`` -> ``[N, row_length(D, dtype)]`` of ``NUMPY_DTYPE[dtype]`` by the rule above."""
    if dtype not in NUMPY_DTYPE:
        raise ValueError(f"embedding_dtype must be one of {', '.join(EMBEDDING_DTYPES)}, not {dtype!r}")
    rows = np.asarray(rows, dtype=np.float32)
    if dtype == "float32":
        return np.ascontiguousarray(rows, dtype=NUMPY_DTYPE[dtype])
    if dtype == "float16":
        return rows.astype(NUMPY_DTYPE[dtype])
    if dtype in PACKED:
        packed = np.packbits(rows > 0, axis=-1)
        return packed if dtype == "ubinary" else (packed.astype(np.int16) - 128).astype(np.int8)
    peak = np.abs(rows).max(axis=-1, keepdims=True)
    scale = np.divide(127.0, peak, out=np.zeros_like(peak), where=peak > 0)  # an all-zero row stays 0
    code = np.clip(np.rint(rows * scale), -127, 127).astype(np.int8)
    return code if dtype == "int8" else (code.astype(np.int16) + 128).astype(np.uint8)


def comparable(codes: np.ndarray, dtype: str) -> np.ndarray:
    """What to compare, as float32 vectors: the float and integer codes (uint8 re-centred), or for the
    packed dtypes the bits unpacked to +1/-1, whose dot product is ``D - 2 * Hamming distance``."""
    if dtype in PACKED:
        as_bytes = codes.astype(np.int16) + 128 if dtype == "binary" else codes
        return np.unpackbits(as_bytes.astype(np.uint8), axis=-1).astype(np.float32) * 2.0 - 1.0
    values = codes.astype(np.float32)
    return values - 128.0 if dtype == "uint8" else values
