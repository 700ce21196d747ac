"""The ingress deployment: wires the embedding core to the towers' handles and serves the HTTP
layer (``http_api``) and the handle API (the methods below) over it."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from ray import serve
from ray.serve import metrics
from ray.serve.handle import DeploymentHandle

from audioclip.errors import InvalidInputError
from audioclip.pipeline import Options, Prepared

from . import http_api
from .core import EMBED_DIM, EmbeddingCore, TowerAnswer
from .errors import ITEM_ERRORS
from .gate import Gate
from .logs import quiet_client_errors
from .readiness import TowerWatch
from .settings import AppArgs

logger = logging.getLogger("ray.serve")


class HandleTowers:
    """The core's ``TowerClient`` over Serve handles."""

    def __init__(self, handles: dict[str, DeploymentHandle]) -> None:
        self.handles = handles

    async def embed_prepared(self, modality: str, items: list[Prepared]) -> TowerAnswer:
        return await self.handles[modality].embed_prepared.remote(items)


class RouterMetrics:
    """Prometheus metrics of the router (``ray_audioclip_*``), created inside the replica."""

    def __init__(self) -> None:
        self.rejected = metrics.Counter(
            "audioclip_rejected_requests", description="Requests refused, by error type.", tag_keys=("type",)
        )
        self.preprocess_ms = metrics.Histogram(
            "audioclip_preprocess_ms",
            description="Decoding time of a request's items in the router (ms).",
            boundaries=[1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000],
            tag_keys=("modality",),
        )

    def decoded(self, modality: str, milliseconds: float) -> None:
        self.preprocess_ms.observe(milliseconds, tags={"modality": modality})


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress(http_api.api)
class Router:
    async def __init__(
        self, store: DeploymentHandle, towers: dict[str, DeploymentHandle], args: AppArgs
    ) -> None:
        quiet_client_errors()
        self.args = args
        self.store = store
        self.tower_handles = towers
        self.pool = ThreadPoolExecutor(args.router.decode_threads, thread_name_prefix="decode")
        self.metrics = RouterMetrics()
        self.core = EmbeddingCore(
            HandleTowers(towers),
            served=list(towers),
            pipelines=args.pipelines(),
            limits=args.limits.items,
            chunk_sizes={name: args.tower(name).max_batch_size for name in towers},
            pool=self.pool,
            on_decoded=self.metrics.decoded,
        )
        self.gate = Gate(args.router)
        deployments = {name: handle.deployment_name for name, handle in towers.items()}
        self.watch = TowerWatch(serve.get_replica_context().app_name, deployments)
        self.watch.start()
        self._scales: dict[str, float] | None = None
        http_api.bind(self)

    # ------------------------------------------------------------------ handle API
    @contextlib.contextmanager
    def _counted(self) -> Iterator[None]:
        """A handle call refused for its input counts in the rejected metric, as HTTP ones do."""
        try:
            yield
        except InvalidInputError as err:
            self.rejected(ITEM_ERRORS[err.reason].type)
            raise

    async def embed_text(
        self, texts: Sequence[str], normalize: bool = False, truncate: bool = False
    ) -> np.ndarray:
        """``[N, 1024]`` float32 for N strings; raises ``InvalidInputError`` naming a bad item."""
        with self._counted():
            options = Options(truncate=truncate)
            return (await self.core.embed("text", texts, normalize=normalize, options=options)).embeddings

    async def embed_image(self, images: Sequence[Any], normalize: bool = False) -> np.ndarray:
        """Images as encoded bytes or HWC arrays (or prepared ``ImageItem``s) -> ``[N, 1024]`` float32."""
        with self._counted():
            return (await self.core.embed("image", images, normalize=normalize)).embeddings

    async def embed_audio(self, clips: Sequence[Any], normalize: bool = False) -> np.ndarray:
        """Clips as encoded bytes or ``(array, sample_rate)`` pairs -> ``[N, 1024]`` float32."""
        with self._counted():
            return (await self.core.embed("audio", clips, normalize=normalize)).embeddings

    async def rank(self, query: dict, candidates: Sequence[dict], top_k: int | None = None) -> list[dict]:
        """``query`` and ``candidates`` are ``{"text": str}``, ``{"image": bytes}`` or ``{"audio": bytes}``.
        Returns candidates sorted by probability, each with ``index``, ``cosine`` and ``probability``
        (softmax of the checkpoint's logit scale for the pair times the cosine)."""
        with self._counted():
            return (await self.core.rank(query, candidates, await self.scales(), top_k)).results

    def stats(self) -> dict:
        """Requests in progress in this router replica (0 when idle: nothing leaked)."""
        return {"inflight": self.gate.inflight, "pid": os.getpid()}

    # ------------------------------------------------------------------ for the HTTP layer
    def rejected(self, error_type: str) -> None:
        self.metrics.rejected.inc(tags={"type": error_type})

    async def scales(self) -> dict[str, float]:
        if self._scales is None:
            self._scales = (await self.store.info.remote())["logit_scales"]
        return self._scales

    async def models(self) -> dict[str, Any]:
        info = await self.store.info.remote()
        towers = {}
        for name, handle in self.tower_handles.items():
            towers[name] = {**await handle.describe.remote(), "replicas": self.watch.running.get(name, 0)}
        return {
            "name": self.args.model_name,
            "dim": EMBED_DIM,
            "checkpoint_sha256": info["sha256"],
            "weights": info["kind"],
            "checkpoint": info["source"],
            "towers": towers,
            "logit_scales": info["logit_scales"],
            "object": "list",
            "data": [
                {"id": self.args.model_name, "object": "model", "created": 0, "owned_by": "audioclip-serve"}
            ],
        }
