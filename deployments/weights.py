"""The weight store: the checkpoint is read once per cluster and shared through Ray's object store.

It must ``ray.put`` in its own long-lived process: objects are owned by the process that
puts them, and the app builder's process exits right after building (``serve deploy``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict

import ray
from ray import serve

from audioclip.checkpoint import tower_part
from audioclip.factory import load_weights
from audioclip.model import LogitScales

logger = logging.getLogger("ray.serve")


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64)
class WeightStore:
    """Holds one object-store reference per tower; towers borrow them at start-up."""

    def __init__(self, checkpoint: str, towers: list[str]) -> None:
        arrays, weights = load_weights(checkpoint)
        self._info = asdict(weights)
        # one dict per tower, each with the logit scales, so a tower can load strictly on its own
        self._refs = {tower: ray.put(tower_part(arrays, tower)) for tower in towers}
        self._info["towers"] = list(towers)
        self._info["logit_scales"] = LogitScales.of(arrays)._asdict()
        self._info["loads"] = 1  # this process read the checkpoint once; towers only borrow refs
        self._info["pid"] = os.getpid()
        self._info["node_id"] = ray.get_runtime_context().get_node_id()  # where the refs' owner lives
        self._refs_given = dict.fromkeys(towers, 0)
        logger.info(
            "weights %s (%s, sha256 %s) shared for %s",
            checkpoint,
            self._info["kind"],
            self._info["sha256"][:12],
            towers,
        )

    def get(self, tower: str) -> tuple[list[ray.ObjectRef], dict]:
        """The tower's weights as a one-element list (so the caller borrows the reference instead of
        resolving it here) and ``info()``, from the same store replica."""
        if tower not in self._refs:
            raise KeyError(f"tower {tower!r} is not served (towers: {sorted(self._refs)})")
        self._refs_given[tower] += 1
        return [self._refs[tower]], self.info()

    def info(self) -> dict:
        """What the weights are, and how often each tower's replicas took them (``refs_given``)."""
        return {**self._info, "refs_given": dict(self._refs_given)}

    def check_health(self) -> None:
        if not self._refs:
            raise RuntimeError("no weights held")
