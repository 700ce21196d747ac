"""Compact embeddings: each dtype's rule (audioclip.quantize) on vectors of the real model's kind."""

from __future__ import annotations

import numpy as np
import pytest

from audioclip.quantize import EMBEDDING_DTYPES, NUMPY_DTYPE, comparable, quantize, row_length


@pytest.fixture(scope="module")
def rows() -> np.ndarray:
    rng = np.random.default_rng(7)
    return (rng.standard_normal((64, 1024)) * rng.uniform(0.1, 30, (64, 1))).astype(np.float32)


@pytest.mark.parametrize("dtype", EMBEDDING_DTYPES)
def test_shape_dtype_and_batch_independence(rows, dtype):
    codes = quantize(rows, dtype)
    assert codes.dtype == NUMPY_DTYPE[dtype] and codes.shape == (64, row_length(1024, dtype))
    one_by_one = np.concatenate([quantize(row[None], dtype) for row in rows])
    assert np.array_equal(codes, one_by_one)  # a vector's code never depends on its batch


def test_float16_rounds_to_nearest(rows):
    assert np.array_equal(quantize(rows, "float16"), rows.astype(np.float16))


def test_int8_is_symmetric_per_vector_absmax(rows):
    codes = quantize(rows, "int8")
    assert (np.abs(codes).max(axis=1) == 127).all()
    assert np.array_equal(quantize(rows * 5.0, "int8"), codes)  # scale-free: normalise or not
    expected = np.rint(rows / np.abs(rows).max(axis=1, keepdims=True) * 127)
    assert np.array_equal(codes, expected.astype(np.int8))
    cosine = (comparable(codes, "int8") * rows).sum(1) / (
        np.linalg.norm(comparable(codes, "int8"), axis=1) * np.linalg.norm(rows, axis=1)
    )
    assert cosine.min() > 0.999


def test_uint8_is_int8_offset_by_128(rows):
    assert np.array_equal(quantize(rows, "uint8").astype(int) - 128, quantize(rows, "int8").astype(int))
    assert np.array_equal(
        comparable(quantize(rows, "uint8"), "uint8"), comparable(quantize(rows, "int8"), "int8")
    )


def test_binary_packs_sign_bits_big_endian(rows):
    bits = rows > 0
    ubinary = quantize(rows, "ubinary")
    assert np.array_equal(np.unpackbits(ubinary, axis=1).astype(bool), bits)
    assert ubinary[0, 0] == sum(int(bits[0, i]) << (7 - i) for i in range(8))  # first bit is the MSB
    assert np.array_equal(quantize(rows, "binary").astype(int), ubinary.astype(int) - 128)
    a, b = comparable(ubinary[:2], "ubinary"), comparable(quantize(rows[:2], "binary"), "binary")
    assert np.array_equal(a, b) and set(np.unique(a)) == {-1.0, 1.0}
    hamming = int((bits[0] != bits[1]).sum())
    assert a[0] @ a[1] == 1024 - 2 * hamming  # +1/-1 dot product ranks as Hamming distance does


def test_zero_vector_and_unknown_dtype():
    assert not quantize(np.zeros((1, 1024), np.float32), "int8").any()
    with pytest.raises(ValueError, match="embedding_dtype must be one of"):
        quantize(np.zeros((1, 1024), np.float32), "int4")


def test_recall_of_each_dtype_on_the_models_embeddings():
    """The loss measure of docs/BENCHMARKS.md on a small varied set: float32 keeps every neighbour,
    the byte codes nearly all, the 128-byte sign codes far more than chance but not all."""
    from audioclip_serve.bench.quantization import embed_varied, recall_at_k

    rows = embed_varied("synthetic:shared", texts=150, images=12, clips=12)
    recall = {dtype: recall_at_k(rows, dtype) for dtype in EMBEDDING_DTYPES}
    assert recall["float32"] == 1.0 and recall["float16"] >= 0.99
    assert recall["int8"] == recall["uint8"] >= 0.95 and recall["binary"] == recall["ubinary"]
    chance = 10 / (len(rows) - 1)
    assert 5 * chance < recall["binary"] < 1.0
