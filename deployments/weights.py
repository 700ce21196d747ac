"""The weight store: the checkpoint is read once per cluster and shared through Ray's object store.

It must ``ray.put`` in its own long-lived process: objects are owned by the process that
puts them, and the app builder's process exits right after building (``serve deploy``).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import ray
from ray import serve

from audioclip.checkpoint import read_state_dict, tower_of, verify_known_checkpoint
from audioclip.synthetic import synthetic_state_dict

logger = logging.getLogger("ray.serve")
SYNTHETIC_PREFIX = "synthetic:"


def digest_arrays(arrays: dict[str, np.ndarray]) -> str:
    """sha256 over the keys and bytes of a state_dict: an identity for in-memory weights."""
    h = hashlib.sha256()
    for key in sorted(arrays):
        h.update(key.encode())
        h.update(np.ascontiguousarray(arrays[key]).view(np.uint8).reshape(-1).data)
    return h.hexdigest()


def load_weights(checkpoint: str) -> tuple[dict[str, np.ndarray], dict]:
    """Checkpoint-named numpy arrays plus a description (kind, sha256, source)."""
    if checkpoint.startswith(SYNTHETIC_PREFIX):
        set_name = checkpoint.removeprefix(SYNTHETIC_PREFIX) or "demo"
        arrays = synthetic_state_dict(set_name)
        return arrays, {"kind": "synthetic", "source": checkpoint, "sha256": digest_arrays(arrays)}
    path = Path(checkpoint).expanduser()
    sha256 = verify_known_checkpoint(path)
    arrays = {key: tensor.numpy() for key, tensor in read_state_dict(path).items()}
    return arrays, {"kind": "real", "source": path.name, "sha256": sha256}


def split_by_tower(arrays: dict[str, np.ndarray], towers: list[str]) -> dict[str, dict[str, np.ndarray]]:
    """One dict per tower, each with the logit scales, so a tower can load strictly on its own."""
    parts: dict[str, dict[str, np.ndarray]] = {t: {} for t in towers}
    for key, value in arrays.items():
        owner = tower_of(key.removeprefix("module."))
        for tower in towers:
            if owner in (tower, "scales"):
                parts[tower][key] = value
    return parts


def logit_scales(arrays: dict[str, np.ndarray]) -> dict[str, float]:
    """exp(logit scale) of each modality pair, clamped to [1, 100] as AudioCLIP does."""

    def scale(key: str) -> float:
        value = arrays.get(key, arrays.get(f"module.{key}"))
        return float(np.clip(np.exp(np.float64(value)), 1.0, 100.0)) if value is not None else 100.0

    return {
        "image_text": scale("logit_scale"),
        "audio_image": scale("logit_scale_ai"),
        "audio_text": scale("logit_scale_at"),
    }


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64)
class WeightStore:
    """Holds one object-store reference per tower; towers borrow them at start-up."""

    def __init__(self, checkpoint: str, towers: list[str]) -> None:
        arrays, self._info = load_weights(checkpoint)
        self._refs = {tower: ray.put(part) for tower, part in split_by_tower(arrays, towers).items()}
        self._info["towers"] = list(towers)
        self._info["logit_scales"] = logit_scales(arrays)
        logger.info(
            "weights %s (%s, sha256 %s) shared for %s",
            checkpoint,
            self._info["kind"],
            self._info["sha256"][:12],
            towers,
        )

    def get(self, tower: str) -> list[ray.ObjectRef]:
        """A one-element list, so the caller borrows the reference instead of resolving it here."""
        if tower not in self._refs:
            raise KeyError(f"tower {tower!r} is not served (towers: {sorted(self._refs)})")
        return [self._refs[tower]]

    def info(self) -> dict:
        return dict(self._info)

    def check_health(self) -> None:
        if not self._refs:
            raise RuntimeError("no weights held")
