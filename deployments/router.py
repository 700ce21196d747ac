"""The ingress: HTTP routes and handle methods over the three tower deployments.

The router decodes and validates input in a thread pool (image: decode, EXIF, resize,
crop to 224x224 uint8; audio: decode, resample to 44.1 kHz), splits requests into chunks
of at most a tower's batch size, and calls the towers through handles.
"""

import asyncio
import contextlib
import contextvars
import hmac
import io
import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve import metrics
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

from audioclip.audio_input import load_audio
from audioclip.errors import InvalidInputError
from audioclip.image_input import IMAGE_SIZE, crop_to_uint8
from audioclip.model import l2_normalized
from audioclip.tokenizer import tokenize_to_ids

from . import http_input as hi
from . import openai_compat, ranking
from .http_errors import (
    BadRequest,
    Overloaded,
    PayloadTooLarge,
    ServiceError,
    Unauthorized,
    Unavailable,
    Unprocessable,
    from_invalid_input,
)
from .settings import AppArgs, Limits

logger = logging.getLogger("ray.serve")
# Process state created on first use inside the replica: Serve pickles this module's functions
# with the ASGI app, and a ContextVar or a metric object cannot be pickled.
_LAZY: dict[str, Any] = {}


def _timings_var() -> contextvars.ContextVar:
    """Per-request timings (ms) for the x-*-time headers; tasks spawned by gather share the dict."""
    if "timings" not in _LAZY:
        _LAZY["timings"] = contextvars.ContextVar("audioclip_timings", default=None)
    return _LAZY["timings"]


def _record(key: str, ms: float) -> None:
    """Keep the longest: a request's chunks run concurrently, so their times overlap."""
    timings = _timings_var().get()
    if timings is not None:
        timings[key] = max(timings.get(key, 0.0), ms)


EMBED_DIM = 1024
api = FastAPI(title="audioclip-serve", docs_url="/docs", redoc_url=None)


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


@api.exception_handler(ServiceError)
async def _service_error(_: Request, err: ServiceError) -> Response:
    return err.response()


@api.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, err: StarletteHTTPException) -> Response:
    kind = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code, "http_error")
    body = {"error": {"type": kind, "message": str(err.detail), "index": None}}
    return JSONResponse(body, status_code=err.status_code, headers=getattr(err, "headers", None))


@api.exception_handler(RequestValidationError)
async def _validation_error(_: Request, err: RequestValidationError) -> Response:
    return BadRequest(f"invalid request: {len(err.errors())} problem(s)").response()


@api.exception_handler(Exception)
async def _internal_error(_: Request, err: Exception) -> Response:
    logger.exception("internal error")
    body = {
        "error": {"type": "internal_error", "message": "internal error; see the server log", "index": None}
    }
    return JSONResponse(body, status_code=500)


def _unwrap(err: InvalidInputError) -> InvalidInputError:
    """The library error itself, not Ray's wrapper around it (whose text holds a traceback)."""
    cause = getattr(err, "cause", None)
    return cause if isinstance(cause, InvalidInputError) else err


class FastJSONResponse(JSONResponse):
    """JSON through orjson, which writes numpy float32 arrays directly: 32x1024 floats take ~1 ms
    instead of ~20 ms with ``tolist()`` + the standard library."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


def _timing_headers() -> dict[str, str]:
    """``x-total-time`` (in the router), ``x-preprocess-time`` (decoding), ``x-queue-time`` (waiting
    for a batch) and ``x-inference-time`` (the batch's forward), in milliseconds. The proxy adds
    ``x-request-id``."""
    timings = _timings_var().get() or {}
    headers = {
        f"x-{key}-time": f"{timings.get(key, 0.0):.2f}" for key in ("preprocess", "queue", "inference")
    }
    if "start" in timings:
        headers["x-total-time"] = f"{(time.perf_counter() - timings['start']) * 1000:.2f}"
    return headers


def _count_tokens(texts: list[str]) -> int:
    return sum(len(ids) for ids in tokenize_to_ids(texts, truncate=True))


def _modality_of(item: Any, index: int | None) -> str:
    if not isinstance(item, dict) or len(item) != 1 or next(iter(item)) not in ranking.MODALITIES:
        raise InvalidInputError(
            "each query/candidate must be an object with exactly one of 'text', 'image', 'audio'",
            index=index,
            reason="bad_item",
        )
    return next(iter(item))


def _parse_rank(body: bytes, limits: Limits) -> tuple[Any, list, int | None]:
    data = hi.load_json_object(body)
    if set(data) - {"query", "candidates", "top_k"}:
        raise BadRequest("body must be an object with 'query', 'candidates' and optional 'top_k'")
    if "query" not in data or not isinstance(data.get("candidates"), list):
        raise BadRequest("'query' and a 'candidates' list are required")
    top_k = data.get("top_k")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise BadRequest("top_k must be a positive integer")
    return data["query"], hi.check_count(data["candidates"], limits), top_k


def _decode_rank_item(item: Any, index: int | None) -> dict:
    """HTTP form of a rank item: text as is, image/audio as base64 or data URI strings."""
    kind = _modality_of(item, index)
    if kind == "text":
        return item
    return {kind: hi.decode_base64(item[kind], -1 if index is None else index)}


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class Router:
    def __init__(
        self,
        store: DeploymentHandle,
        towers: dict[str, DeploymentHandle],
        args: dict,
    ) -> None:
        self.args = AppArgs.model_validate(args)
        self.limits = self.args.limits
        self.store = store
        self.tower_handles = towers
        self.pool = ThreadPoolExecutor(self.args.router.decode_threads, thread_name_prefix="decode")
        self.inflight = 0
        self.metrics = RouterMetrics()
        self._scales: dict[str, float] | None = None
        keys = list(self.args.router.api_keys)
        if self.args.router.api_key_env and os.environ.get(self.args.router.api_key_env):
            keys.append(os.environ[self.args.router.api_key_env])
        self.api_keys = [k.encode() for k in keys if k]

    def authorize(self, request: Request) -> None:
        """With API keys configured, every /v1 route needs ``Authorization: Bearer <key>``."""
        if not self.api_keys:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = token.strip().encode()
        if scheme.lower() != "bearer" or not any(hmac.compare_digest(given, key) for key in self.api_keys):
            raise Unauthorized(
                "missing or invalid API key (send 'Authorization: Bearer <key>')",
                headers={"WWW-Authenticate": "Bearer"},
            )

    @contextlib.contextmanager
    def admitted(self, request: Request):
        """Every embedding route runs inside this: the API key check (401), admission control (past
        ``max_inflight`` requests, 503 with Retry-After at once instead of queueing without bound; a
        JSON body, unlike the proxy's own backpressure), the rejected-requests metric, and the
        per-request timings behind the x-*-time headers."""
        try:
            self.authorize(request)
            if self.inflight >= self.args.router.max_inflight:
                retry = str(self.args.router.retry_after_s)
                raise Overloaded("the service is at capacity; retry later", headers={"Retry-After": retry})
        except ServiceError as err:
            self.metrics.rejected.inc(tags={"type": err.type})
            raise
        self.inflight += 1
        token = _timings_var().set({"start": time.perf_counter()})
        try:
            yield
        except ServiceError as err:
            self.metrics.rejected.inc(tags={"type": err.type})
            raise
        finally:
            self.inflight -= 1
            _timings_var().reset(token)

    # ------------------------------------------------------------------ handle API
    async def embed_text(
        self, texts: Sequence[str], normalize: bool = False, truncate: bool = False
    ) -> np.ndarray:
        """``[N, 1024]`` float32 for N strings; raises ``InvalidInputError`` naming a bad item."""
        texts = self._check_texts(texts)
        return await self._embed("text", texts, {"truncate": truncate}, normalize)

    async def embed_image(self, images: Sequence[Any], normalize: bool = False) -> np.ndarray:
        """Images as encoded bytes or HWC uint8 arrays -> ``[N, 1024]`` float32."""
        crops = await self._decode_all(self._decode_image, list(images), "image")
        return await self._embed("image", crops, {}, normalize)

    async def embed_audio(self, clips: Sequence[Any], normalize: bool = False) -> np.ndarray:
        """Clips as encoded bytes or ``(array, sample_rate)`` pairs -> ``[N, 1024]`` float32."""
        decoded = await self._decode_all(self._decode_audio, list(clips), "audio")
        return await self._embed("audio", decoded, {}, normalize)

    def stats(self) -> dict:
        """Requests in progress in this router replica (0 when idle: nothing leaked)."""
        return {"inflight": self.inflight, "pid": os.getpid()}

    # ------------------------------------------------------------------ HTTP routes
    @api.get("/healthz")
    async def http_healthz(self) -> dict:
        return {"status": "ok"}

    @api.get("/readyz")
    async def http_readyz(self) -> Response:
        try:
            await asyncio.wait_for(
                asyncio.gather(*(h.ready.remote() for h in self.tower_handles.values())), timeout=5.0
            )
        except Exception as err:  # noqa: BLE001 - any failure means not ready
            body = {"status": "not_ready", "reason": type(err).__name__}
            return JSONResponse(body, status_code=503, headers={"Retry-After": "1"})
        return JSONResponse({"status": "ready", "towers": list(self.tower_handles)})

    @api.get("/v1/models")
    async def http_models(self, request: Request) -> dict:
        """Our description, in OpenAI's model-list shape as well (``object``/``data``)."""
        self.authorize(request)
        info = await self.store.info.remote()
        towers = {}
        for name, handle in self.tower_handles.items():
            desc = await handle.describe.remote()
            towers[name] = {**desc, "replicas": self.args.tower(name).num_replicas}
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

    @api.post("/v1/embeddings")
    async def http_openai_embeddings(self, request: Request) -> Response:
        """OpenAI-compatible embeddings (normalised); ``modality`` selects image or audio inputs."""
        with self.admitted(request):
            body = await hi.read_json_body(request, "embeddings", self.limits)
            req = openai_compat.parse_embeddings_request(body, self.args.model_name, EMBED_DIM, self.limits)
            tokens = 0
            if req.modality == "text":
                embeddings = await self._http(self.embed_text(req.inputs, normalize=True))
                tokens = await asyncio.get_running_loop().run_in_executor(
                    self.pool, _count_tokens, req.inputs
                )
            else:
                items = [hi.decode_base64(v, i) for i, v in enumerate(req.inputs)]
                embed = self.embed_image if req.modality == "image" else self.embed_audio
                embeddings = await self._http(embed(items, normalize=True))
            body = openai_compat.embeddings_response(req, embeddings, tokens)
            return FastJSONResponse(body, headers=_timing_headers())

    @api.post("/v1/rank")
    async def http_rank(self, request: Request) -> Response:
        """Rank candidates of any modality against a query; see ``rank``."""
        with self.admitted(request):
            body = await hi.read_json_body(request, "rank", self.limits)
            query, candidates, top_k = _parse_rank(body, self.limits)

            async def work() -> list[dict]:
                decoded = [_decode_rank_item(c, i) for i, c in enumerate(candidates)]
                return await self.rank(_decode_rank_item(query, None), decoded, top_k)

            results = await self._http(work())
            return JSONResponse(
                {"model": self.args.model_name, "results": results}, headers=_timing_headers()
            )

    async def rank(self, query: dict, candidates: Sequence[dict], top_k: int | None = None) -> list[dict]:
        """``query`` and ``candidates`` are ``{"text": str}``, ``{"image": bytes}`` or ``{"audio": bytes}``.
        Returns candidates sorted by probability, each with ``index``, ``cosine`` and ``probability``
        (softmax of the checkpoint's logit scale for the pair times the cosine)."""
        items = [query, *candidates]
        kinds = [_modality_of(item, i - 1 if i else None) for i, item in enumerate(items)]
        vectors = np.zeros((len(items), EMBED_DIM), dtype=np.float32)
        embedders = {"text": self.embed_text, "image": self.embed_image, "audio": self.embed_audio}

        async def embed_group(kind: str) -> None:
            positions = [i for i, k in enumerate(kinds) if k == kind]
            if not positions:
                return
            try:
                out = await embedders[kind]([items[i][kind] for i in positions])  # ranking normalises
            except InvalidInputError as err:
                err = _unwrap(err)
                at = positions[err.index] - 1 if err.index is not None else None
                raise (err.at_index(at) if at is not None and at >= 0 else err) from None
            vectors[positions] = out

        await asyncio.gather(*(embed_group(k) for k in ranking.MODALITIES))
        if self._scales is None:
            self._scales = (await self.store.info.remote())["logit_scales"]
        return ranking.rank(vectors[0], kinds[0], vectors[1:], kinds[1:], self._scales, top_k)

    @api.post("/v1/embed/text")
    async def http_embed_text(self, request: Request) -> Response:
        with self.admitted(request):
            return await self._http_embed_text(request)

    async def _http_embed_text(self, request: Request) -> Response:
        body = await hi.read_json_body(request, "text", self.limits)
        texts, options = hi.parse_json(body, "texts", ("normalize", "truncate"), self.limits)
        embeddings = await self._http(self.embed_text(texts, options["normalize"], options["truncate"]))
        return self._respond(request, "text", embeddings, options["normalize"])

    @api.post("/v1/embed/image")
    async def http_embed_image(self, request: Request) -> Response:
        with self.admitted(request):
            return await self._http_embed_image(request)

    async def _http_embed_image(self, request: Request) -> Response:
        def from_npy(array: np.ndarray) -> list:
            return self._npy_images(array, hi.query_flag(request, "preprocess", True))

        items, normalize = await self._media_items(request, "images", "image/", from_npy)
        if items and isinstance(items[0], np.ndarray) and items[0].dtype == np.float32:
            embeddings = await self._http(self._embed("image", items, {}, normalize))  # preprocess=false
        else:
            embeddings = await self._http(self.embed_image(items, normalize))
        return self._respond(request, "image", embeddings, normalize)

    @api.post("/v1/embed/audio")
    async def http_embed_audio(self, request: Request) -> Response:
        with self.admitted(request):
            return await self._http_embed_audio(request)

    async def _http_embed_audio(self, request: Request) -> Response:
        def from_npy(array: np.ndarray) -> list:
            rate = request.query_params.get("sample_rate")
            if rate is None or not rate.isdigit() or int(rate) <= 0:
                raise BadRequest("an npy audio body needs ?sample_rate=<positive integer Hz>")
            return [(array, int(rate))]

        items, normalize = await self._media_items(request, "audio", "audio/", from_npy)
        embeddings = await self._http(self.embed_audio(items, normalize))
        return self._respond(request, "audio", embeddings, normalize)

    # ------------------------------------------------------------------ internals
    async def _media_items(
        self, request: Request, field: str, raw_prefix: str, from_npy: Callable[[np.ndarray], list]
    ) -> tuple[list, bool]:
        """Items and the normalize flag of an image or audio request, whatever its content type."""
        kind = hi.media_type(request)
        normalize = hi.query_flag(request, "normalize", False)
        if kind == "multipart/form-data":
            return await hi.multipart_files(request, self.limits), normalize
        body = await hi.read_body(request, self.limits)
        if kind == "application/json":
            raw, options = hi.parse_json(body, field, ("normalize",), self.limits)
            return [hi.decode_base64(v, i) for i, v in enumerate(raw)], options["normalize"]
        if kind.startswith(raw_prefix):
            return [body], normalize
        if kind == hi.NPY:
            return from_npy(hi.load_npy(body)), normalize
        accepted = ("application/json", "multipart/form-data", f"{raw_prefix}*", hi.NPY)
        raise hi.unsupported(field, kind, accepted)

    def _check_texts(self, texts: Any) -> list[str]:
        if isinstance(texts, str) or not isinstance(texts, Sequence):
            raise InvalidInputError("texts must be a list of strings", reason="bad_type")
        if len(texts) > self.limits.max_items:
            raise InvalidInputError(
                f"{len(texts)} items is over the limit of {self.limits.max_items}", reason="too_many_items"
            )
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise InvalidInputError("text must be a string", index=i, reason="not_a_string")
            if len(text) > self.limits.max_text_chars:
                raise InvalidInputError(
                    f"text has {len(text)} characters, over the limit of {self.limits.max_text_chars}",
                    index=i,
                    reason="too_long",
                )
        return list(texts)

    def _npy_images(self, array: np.ndarray, preprocess: bool) -> list[np.ndarray]:
        if not preprocess:
            if array.dtype != np.float32 or array.ndim != 4 or array.shape[1:] != (3, IMAGE_SIZE, IMAGE_SIZE):
                raise BadRequest(
                    f"with preprocess=false the body must be float32 [N,3,224,224], got "
                    f"{array.dtype} {list(array.shape)}"
                )
            if not np.isfinite(array).all():
                raise Unprocessable("pixels contain NaN or inf")
            return hi.check_count(list(array), self.limits)
        if array.dtype != np.uint8 or array.ndim not in (3, 4) or array.shape[-1] != 3:
            raise BadRequest(
                f"an npy image body must be uint8 [H,W,3] or [N,H,W,3], got {array.dtype} {list(array.shape)}"
            )
        return hi.check_count(list(array) if array.ndim == 4 else [array], self.limits)

    def _decode_image(self, item: Any) -> np.ndarray:
        return crop_to_uint8(
            item, max_pixels=self.limits.max_pixels, fast_decode=self.args.router.fast_decode
        )

    def _decode_audio(self, item: Any) -> np.ndarray:
        if isinstance(item, tuple) and len(item) == 2:
            return load_audio(item[0], sample_rate=item[1], max_seconds=self.limits.max_audio_seconds)
        return load_audio(item, max_seconds=self.limits.max_audio_seconds)

    async def _decode_all(
        self, decode: Callable[[Any], np.ndarray], items: list, modality: str
    ) -> list[np.ndarray]:
        if len(items) > self.limits.max_items:
            raise InvalidInputError(
                f"{len(items)} items is over the limit of {self.limits.max_items}", reason="too_many_items"
            )
        loop = asyncio.get_running_loop()

        async def one(index: int, item: Any) -> np.ndarray:
            try:
                return await loop.run_in_executor(self.pool, decode, item)
            except InvalidInputError as err:
                raise err.at_index(index) from None

        started = time.perf_counter()
        decoded = list(await asyncio.gather(*(one(i, item) for i, item in enumerate(items))))
        elapsed_ms = (time.perf_counter() - started) * 1000
        _record("preprocess", elapsed_ms)
        self.metrics.preprocess_ms.observe(elapsed_ms, tags={"modality": modality})
        return decoded

    async def _embed(self, tower: str, items: list, options: dict, normalize: bool) -> np.ndarray:
        if tower not in self.tower_handles:
            raise InvalidInputError(
                f"this deployment does not serve the {tower} tower", reason="tower_not_served"
            )
        if not items:
            return np.zeros((0, EMBED_DIM), dtype=np.float32)
        chunk = self.args.tower(tower).max_batch_size
        handle = self.tower_handles[tower]
        starts = range(0, len(items), chunk)

        async def call(start: int) -> np.ndarray:
            try:
                embeddings, timings = await handle.embed_timed.remote(items[start : start + chunk], options)
                _record("queue", timings["queue_ms"])
                _record("inference", timings["inference_ms"])
                return embeddings
            except InvalidInputError as err:
                err = _unwrap(err)
                raise err.at_index(start + (err.index or 0)) from None

        parts = await asyncio.gather(*(call(s) for s in starts))
        embeddings = np.concatenate(parts) if len(parts) > 1 else np.asarray(parts[0])
        return l2_normalized(embeddings) if normalize else embeddings

    async def _http(self, work) -> np.ndarray:
        """Await embedding work, turning library and backpressure errors into HTTP errors."""
        try:
            return await work
        except InvalidInputError as err:
            err = _unwrap(err)
            if err.reason == "too_many_items":
                raise PayloadTooLarge(str(err)) from None
            if err.reason == "tower_not_served":
                raise ServiceError(str(err)) from None
            raise from_invalid_input(err) from None
        except BackPressureError:
            retry = str(self.args.router.retry_after_s)
            raise Overloaded(
                "the service is at capacity; retry later", headers={"Retry-After": retry}
            ) from None
        except (RayActorError, ActorUnavailableError):
            # A tower replica died mid-request; Serve is replacing it.
            retry = str(self.args.router.retry_after_s)
            raise Unavailable("a model replica restarted; retry", headers={"Retry-After": retry}) from None

    def _respond(self, request: Request, modality: str, embeddings: np.ndarray, normalize: bool) -> Response:
        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        if hi.NPY in request.headers.get("accept", ""):
            buf = io.BytesIO()
            np.save(buf, embeddings, allow_pickle=False)
            return Response(buf.getvalue(), media_type=hi.NPY, headers=_timing_headers())
        body = {
            "model": self.args.model_name,
            "modality": modality,
            "dim": EMBED_DIM,
            "normalized": normalize,
            "embeddings": embeddings,
        }
        return FastJSONResponse(body, headers=_timing_headers())
