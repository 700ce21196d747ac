"""The application builder: ``import_path: deployments.app:build_app`` in a serve config.

It only wires deployments together (no loading, no ``ray.put``): under ``serve deploy`` it
runs in a short-lived build task whose objects would die with it.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from ray.serve import Application
from ray.serve.config import BackpressureConfig

from .router import Router
from .settings import AppArgs, Batching
from .towers import TOWER_DEPLOYMENTS
from .weights import WeightStore


def build_app(args: dict[str, Any] | None = None) -> Application:
    """Weight store -> one deployment per requested tower -> router (the ingress)."""
    settings = AppArgs.model_validate(args or {})
    store = WeightStore.bind(settings.checkpoint, settings.towers)
    towers = {}
    for name in settings.towers:
        tower = settings.tower(name)
        deployment = TOWER_DEPLOYMENTS[name].options(
            **tower.replica_options(),
            max_ongoing_requests=tower.ongoing_limit,
            ray_actor_options={
                "num_cpus": tower.num_cpus,
                "num_gpus": tower.num_gpus,
                "resources": tower.resources,
            },
            user_config=asdict(Batching.of(tower)),
        )
        towers[name] = deployment.bind(store, settings.tower_args(name))
    router = settings.router
    return Router.options(
        **router.replica_options(),
        max_ongoing_requests=router.max_ongoing_requests,
        max_queued_requests=router.max_queued_requests,
        backpressure_config=BackpressureConfig(status_code=503, retry_after_s=router.retry_after_s),
        ray_actor_options={"num_cpus": router.num_cpus, "resources": router.resources},
        graceful_shutdown_timeout_s=router.graceful_shutdown_timeout_s,
    ).bind(store, towers, settings)
