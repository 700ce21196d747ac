"""The ingress deployment: wires the embedding core to the towers' handles and serves the HTTP
layer (``http_api``) and the handle API (the methods below) over it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve import metrics
from ray.serve.grpc_util import RayServegRPCContext
from ray.serve.handle import DeploymentHandle

from audioclip.errors import InvalidInputError
from audioclip.pipeline import Options, Prepared
from audioclip.windows import Pool, WindowSpec

from . import grpc_api, http_api
from .coalesce import Coalescer
from .core import EMBED_DIM, EmbeddingCore, MixedCheckpoints, TowerAnswer, WindowRow
from .errors import ITEM_ERRORS
from .gate import Gate
from .logs import quiet_client_errors
from .readiness import TowerWatch
from .settings import AppArgs

logger = logging.getLogger("ray.serve")
REPLICA_RETRIES = 3


class HandleTowers:
    """The core's ``TowerClient`` over Serve handles."""

    def __init__(self, handles: dict[str, DeploymentHandle]) -> None:
        self.handles = handles

    async def embed_prepared(self, modality: str, items: list[Prepared]) -> TowerAnswer:
        """Embedding is idempotent, so a call whose replica died (killed, node lost) is sent again,
        to a live replica, before the client hears of it."""
        for attempt in range(REPLICA_RETRIES):
            try:
                return await self.handles[modality].embed_prepared.remote(items)
            except (RayActorError, ActorUnavailableError):
                if attempt == REPLICA_RETRIES - 1:
                    raise
                await asyncio.sleep(0.5 * (attempt + 1))
        raise AssertionError("unreachable")


@dataclass(frozen=True)
class Embeddings:
    """What the handle API's ``embed`` answers."""

    vectors: np.ndarray  # float32 [N, 1024]
    checkpoint_sha256: str  # the weights that made every row
    usage_tokens: int = 0  # text: the tokens embedded
    windows: list[WindowRow] | None = None  # windowed audio: each row's item and span


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
        batch_sizes = {name: args.tower(name).max_batch_size for name in towers}
        self.coalescer = Coalescer(
            HandleTowers(towers).embed_prepared, args.router.coalesce_calls, batch_sizes
        )
        self.core = EmbeddingCore(
            self.coalescer,
            served=list(towers),
            pipelines=args.pipelines(),
            limits=args.limits.items,
            chunk_sizes=batch_sizes,
            pool=self.pool,
            on_decoded=self.metrics.decoded,
            chunks_in_flight=args.router.chunks_in_flight,
        )
        if "text" in towers:  # the BPE vocabulary loads now, not on the loop in the first request
            await asyncio.to_thread(self.core.pipelines["text"].warmup_item)
        self.gate = Gate(args.router)
        deployments = {name: handle.deployment_name for name, handle in towers.items()}
        can_sleep = [name for name in towers if args.tower(name).min_replicas == 0]
        self.watch = TowerWatch(serve.get_replica_context().app_name, deployments, can_sleep)
        self.watch.start()
        self._scales: dict[str, dict[str, float]] = {}  # by checkpoint sha256
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

    async def embed_audio(
        self,
        clips: Sequence[Any],
        normalize: bool = False,
        window_s: float | None = None,
        hop_s: float | None = None,
        pool: Pool = "mean",
    ) -> np.ndarray:
        """Clips as encoded bytes or ``(array, sample_rate)`` pairs -> ``[N, 1024]`` float32; with
        ``window_s`` each clip is cut into windows and pooled (``pool="none"``: a row per window;
        ``embed`` also says which window each row is)."""
        with self._counted():
            options = Options(windows=WindowSpec(window_s, hop_s, pool) if window_s else None)
            return (await self.core.embed("audio", clips, normalize=normalize, options=options)).embeddings

    async def rank(self, query: dict, candidates: Sequence[dict], top_k: int | None = None) -> list[dict]:
        """``query`` and ``candidates`` are ``{"text": str}``, ``{"image": bytes}`` or ``{"audio": bytes}``.
        Returns candidates sorted by probability, each with ``index``, ``cosine`` and ``probability``
        (softmax of the checkpoint's logit scale for the pair times the cosine)."""
        with self._counted():
            return (await self.core.rank(query, candidates, self.scales, top_k)).results

    async def timeline(
        self,
        query: dict,
        candidates: Sequence[dict],
        window_s: float,
        hop_s: float | None = None,
        top_k: int | None = None,
    ) -> list[dict]:
        """An audio query's windows, each with ``start_s``, ``end_s`` and the candidates ranked against
        it (as ``rank``): zero-shot sound-event detection."""
        with self._counted():
            windows = WindowSpec(window_s, hop_s)
            return (await self.core.rank(query, candidates, self.scales, top_k, windows)).timeline or []

    async def embed(
        self,
        modality: str,
        items: Sequence[Any],
        normalize: bool = False,
        truncate: bool = False,
        windows: WindowSpec | None = None,
    ) -> Embeddings:
        """Items of any modality -> ``Embeddings``: rows and the sha256 of the checkpoint that made
        them (windowed audio: and what each row covers)."""
        with self._counted():
            options = Options(truncate, windows)
            result = await self.core.embed(modality, items, normalize=normalize, options=options)
        return Embeddings(result.embeddings, result.checkpoint, result.usage_tokens, result.windows)

    # ------------------------------------------------------------------ gRPC API (audioclip.v1.AudioClip)
    # Named as the RPCs of audioclip_serve/protos/audioclip.proto: Serve's gRPC ingress calls them.
    async def EmbedText(self, request: Any, grpc_context: RayServegRPCContext) -> Any:
        return await grpc_api.answer(self, request, grpc_context, grpc_api.text(self, request))

    async def EmbedImage(self, request: Any, grpc_context: RayServegRPCContext) -> Any:
        return await grpc_api.answer(self, request, grpc_context, grpc_api.image(self, request))

    async def EmbedAudio(self, request: Any, grpc_context: RayServegRPCContext) -> Any:
        return await grpc_api.answer(self, request, grpc_context, grpc_api.audio(self, request))

    def stats(self) -> dict:
        """Requests in progress in this router replica (0 when idle: nothing leaked), and the tower
        requests and handle calls it made (fewer calls than requests: router-side batching)."""
        stats = self.coalescer.stats
        return {
            "inflight": self.gate.inflight,
            "pid": os.getpid(),
            "requests": stats.requests,
            "calls": stats.calls,
        }

    # ------------------------------------------------------------------ for the HTTP layer
    def rejected(self, error_type: str) -> None:
        self.metrics.rejected.inc(tags={"type": error_type})

    async def scales(self, sha256: str) -> dict[str, float]:
        """The logit scales of checkpoint ``sha256``; ``MixedCheckpoints`` if the store now holds
        another (a rollout in progress)."""
        if sha256 not in self._scales:
            info = await self.store.info.remote()
            self._scales[info["sha256"]] = info["logit_scales"]
            if sha256 not in self._scales:
                raise MixedCheckpoints(f"vectors of {sha256[:12]}, weights now {info['sha256'][:12]}")
        return self._scales[sha256]

    async def models(self) -> dict[str, Any]:
        self.watch.touch()
        info = await self.store.info.remote()
        towers = {}
        for name, handle in self.tower_handles.items():
            live = self.watch.running.get(name, 0)
            tower = self.args.tower(name)
            scaling = {
                "replicas": live,
                "min_replicas": tower.min_replicas,
                "max_replicas": tower.max_replicas,
            }
            # A tower scaled to zero is not woken up to describe itself.
            towers[name] = {
                **(await handle.describe.remote() if live else {"state": "scaled_to_zero"}),
                **scaling,
            }
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
