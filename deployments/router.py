"""The ingress: HTTP routes and handle methods over the three tower deployments.

The router decodes and validates input in a thread pool (image: decode, EXIF, resize,
crop to 224x224 uint8; audio: decode, resample to 44.1 kHz), splits requests into chunks
of at most a tower's batch size, and calls the towers through handles.
"""

import asyncio
import contextlib
import io
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

from audioclip.audio_input import load_audio
from audioclip.errors import InvalidInputError
from audioclip.image_input import IMAGE_SIZE, crop_to_uint8

from . import http_input as hi
from .http_errors import (
    BadRequest,
    Overloaded,
    PayloadTooLarge,
    ServiceError,
    Unprocessable,
    from_invalid_input,
)
from .settings import AppArgs

logger = logging.getLogger("ray.serve")
EMBED_DIM = 1024
api = FastAPI(title="audioclip-serve", docs_url="/docs", redoc_url=None)


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


def _normalized(embeddings: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    return embeddings / np.maximum(norms, 1e-12)


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

    @contextlib.contextmanager
    def admitted(self):
        """Admission control: past ``max_inflight`` requests, answer 503 with Retry-After at once
        instead of queueing without bound (a JSON body, unlike the proxy's own backpressure)."""
        if self.inflight >= self.args.router.max_inflight:
            retry = str(self.args.router.retry_after_s)
            raise Overloaded("the service is at capacity; retry later", headers={"Retry-After": retry})
        self.inflight += 1
        try:
            yield
        finally:
            self.inflight -= 1

    # ------------------------------------------------------------------ handle API
    async def embed_text(
        self, texts: Sequence[str], normalize: bool = False, truncate: bool = False
    ) -> np.ndarray:
        """``[N, 1024]`` float32 for N strings; raises ``InvalidInputError`` naming a bad item."""
        texts = self._check_texts(texts)
        return await self._embed("text", texts, {"truncate": truncate}, normalize)

    async def embed_image(self, images: Sequence[Any], normalize: bool = False) -> np.ndarray:
        """Images as encoded bytes or HWC uint8 arrays -> ``[N, 1024]`` float32."""
        crops = await self._decode_all(self._decode_image, list(images))
        return await self._embed("image", crops, {}, normalize)

    async def embed_audio(self, clips: Sequence[Any], normalize: bool = False) -> np.ndarray:
        """Clips as encoded bytes or ``(array, sample_rate)`` pairs -> ``[N, 1024]`` float32."""
        decoded = await self._decode_all(self._decode_audio, list(clips))
        return await self._embed("audio", decoded, {}, normalize)

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
    async def http_models(self) -> dict:
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
        }

    @api.post("/v1/embed/text")
    async def http_embed_text(self, request: Request) -> Response:
        with self.admitted():
            return await self._http_embed_text(request)

    async def _http_embed_text(self, request: Request) -> Response:
        if hi.media_type(request) != "application/json":
            raise hi.unsupported("text", hi.media_type(request), ("application/json",))
        body = await hi.read_body(request, self.limits)
        texts, options = hi.parse_json(body, "texts", ("normalize", "truncate"), self.limits)
        embeddings = await self._http(self.embed_text(texts, options["normalize"], options["truncate"]))
        return self._respond(request, "text", embeddings, options["normalize"])

    @api.post("/v1/embed/image")
    async def http_embed_image(self, request: Request) -> Response:
        with self.admitted():
            return await self._http_embed_image(request)

    async def _http_embed_image(self, request: Request) -> Response:
        kind = hi.media_type(request)
        normalize = hi.query_flag(request, "normalize", False)
        if kind == "multipart/form-data":
            items: list[Any] = await hi.multipart_files(request, self.limits)
        else:
            body = await hi.read_body(request, self.limits)
            if kind == "application/json":
                raw, options = hi.parse_json(body, "images", ("normalize",), self.limits)
                normalize = options["normalize"]
                items = [hi.decode_base64(v, i) for i, v in enumerate(raw)]
            elif kind.startswith("image/"):
                items = [body]
            elif kind == hi.NPY:
                items = self._npy_images(hi.load_npy(body), hi.query_flag(request, "preprocess", True))
            else:
                raise hi.unsupported(
                    "images", kind, ("application/json", "multipart/form-data", "image/*", hi.NPY)
                )
        if items and isinstance(items[0], np.ndarray) and items[0].dtype == np.float32:
            embeddings = await self._http(self._embed("image", items, {}, normalize))
        else:
            embeddings = await self._http(self.embed_image(items, normalize))
        return self._respond(request, "image", embeddings, normalize)

    @api.post("/v1/embed/audio")
    async def http_embed_audio(self, request: Request) -> Response:
        with self.admitted():
            return await self._http_embed_audio(request)

    async def _http_embed_audio(self, request: Request) -> Response:
        kind = hi.media_type(request)
        normalize = hi.query_flag(request, "normalize", False)
        if kind == "multipart/form-data":
            items: list[Any] = await hi.multipart_files(request, self.limits)
        else:
            body = await hi.read_body(request, self.limits)
            if kind == "application/json":
                raw, options = hi.parse_json(body, "audio", ("normalize",), self.limits)
                normalize = options["normalize"]
                items = [hi.decode_base64(v, i) for i, v in enumerate(raw)]
            elif kind.startswith("audio/"):
                items = [body]
            elif kind == hi.NPY:
                rate = request.query_params.get("sample_rate")
                if rate is None or not rate.isdigit() or int(rate) <= 0:
                    raise BadRequest("an npy audio body needs ?sample_rate=<positive integer Hz>")
                items = [(hi.load_npy(body), int(rate))]
            else:
                raise hi.unsupported(
                    "audio", kind, ("application/json", "multipart/form-data", "audio/*", hi.NPY)
                )
        embeddings = await self._http(self.embed_audio(items, normalize))
        return self._respond(request, "audio", embeddings, normalize)

    # ------------------------------------------------------------------ internals
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
        return crop_to_uint8(item, max_pixels=self.limits.max_pixels)

    def _decode_audio(self, item: Any) -> np.ndarray:
        if isinstance(item, tuple) and len(item) == 2:
            return load_audio(item[0], sample_rate=item[1], max_seconds=self.limits.max_audio_seconds)
        return load_audio(item, max_seconds=self.limits.max_audio_seconds)

    async def _decode_all(self, decode: Callable[[Any], np.ndarray], items: list) -> list[np.ndarray]:
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

        return list(await asyncio.gather(*(one(i, item) for i, item in enumerate(items))))

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
                return await handle.embed.remote(items[start : start + chunk], options)
            except InvalidInputError as err:
                err = _unwrap(err)
                raise err.at_index(start + (err.index or 0)) from None

        parts = await asyncio.gather(*(call(s) for s in starts))
        embeddings = np.concatenate(parts) if len(parts) > 1 else np.asarray(parts[0])
        return _normalized(embeddings) if normalize else embeddings

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

    def _respond(self, request: Request, modality: str, embeddings: np.ndarray, normalize: bool) -> Response:
        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        if hi.NPY in request.headers.get("accept", ""):
            buf = io.BytesIO()
            np.save(buf, embeddings, allow_pickle=False)
            return Response(buf.getvalue(), media_type=hi.NPY)
        body = {
            "model": self.args.model_name,
            "modality": modality,
            "dim": EMBED_DIM,
            "normalized": normalize,
            "embeddings": embeddings.tolist(),
        }
        return JSONResponse(body)
