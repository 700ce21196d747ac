"""Deterministic synthetic AudioCLIP weights (rule "synthetic-v1").

The released checkpoints are not downloadable everywhere, so the offline demo and the
tests run on weights made by a fixed rule from each key's name. The reference code loaded
with the same rule produced the golden vectors the tests compare against.

Per key: ``z = PCG64(seed).standard_normal(shape)`` with ``seed`` the first 8 bytes
(little endian) of ``sha256(f"{set_name}/{key}")``, then a per-kind transform (below).
"""

from __future__ import annotations

import hashlib
import math

import numpy as np

from .config import AudioCLIPConfig
from .model import checkpoint_layout


def blackman_harris(length: int) -> np.ndarray:
    """Periodic 4-term Blackman-Harris window (scipy's ``get_window('blackmanharris', n)``)."""
    a0, a1, a2, a3 = 0.35875, 0.48829, 0.14128, 0.01168
    phase = 2.0 * math.pi * np.arange(length) / length
    return a0 - a1 * np.cos(phase) + a2 * np.cos(2 * phase) - a3 * np.cos(3 * phase)


def _normal(set_name: str, key: str, shape: tuple[int, ...]) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(f"{set_name}/{key}".encode()).digest()[:8], "little")
    return np.random.Generator(np.random.PCG64(seed)).standard_normal(shape)


def _synthetic_value(key: str, shape: tuple[int, ...], keys: set[str], z: np.ndarray) -> np.ndarray:
    module, _, leaf = key.rpartition(".")
    if key == "audio.window":
        return blackman_harris(shape[0])
    if key == "audio.fbsp.m":
        return 0.1 * np.abs(z)
    if key == "audio.fbsp.fb":
        return np.exp(0.1 * z)
    if key == "audio.fbsp.fc":
        return np.arange(shape[0]) + 0.1 * z
    if key == "audio.fbsp.bias":
        return np.zeros(shape)
    if key.startswith("logit_scale"):
        return np.full(shape, math.log(100.0))
    if f"{module}.running_var" in keys:  # a BatchNorm
        return {
            "weight": 1 + 0.1 * z,
            "bias": 0.1 * z,
            "running_mean": 0.1 * z,
            "running_var": np.exp(0.2 * z),
        }[leaf]
    if module.rpartition(".")[2].startswith("ln_"):  # a LayerNorm
        return 1 + 0.1 * z if leaf == "weight" else 0.1 * z
    if key == "token_embedding.weight":
        return 0.02 * z
    if key == "positional_embedding":
        return 0.01 * z
    if key == "visual.attnpool.positional_embedding":
        return z / math.sqrt(shape[1])
    if key == "text_projection":
        return z / math.sqrt(shape[0])
    if len(shape) >= 2:
        return z / math.sqrt(int(np.prod(shape[1:])))
    return 0.02 * z


def synthetic_state_dict(
    set_name: str = "shared", config: AudioCLIPConfig | None = None
) -> dict[str, np.ndarray]:
    """The full checkpoint-named state_dict of synthetic-v1 weights for ``set_name``, as numpy arrays."""
    layout = checkpoint_layout(config or AudioCLIPConfig())
    keys = set(layout)
    out: dict[str, np.ndarray] = {}
    for key, (shape, is_float) in layout.items():
        if key.endswith("num_batches_tracked"):
            out[key] = np.zeros(shape, dtype=np.int64)
            continue
        if not is_float:
            raise ValueError(f"synthetic-v1 has no rule for integer key {key}")
        value = _synthetic_value(key, shape, keys, _normal(set_name, key, shape))
        out[key] = np.asarray(value, dtype=np.float32).reshape(shape)
    return out
