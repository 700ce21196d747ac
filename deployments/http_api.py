"""The HTTP layer: routes, content negotiation, auth and admission as dependencies, and the one
translation of every failure into a status and a JSON body.

Routes parse and answer; the work is the ``EmbeddingCore``'s. The Serve deployment that runs this
app (``router.Router``) binds itself with ``bind`` when its replica starts: one router per process.
Request bodies are read here (streamed, with the byte limit) and validated by ``schemas``, which
also describe every body, content type and error status in ``/openapi.json``.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any, Protocol

import numpy as np
import orjson
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from pydantic.json_schema import models_json_schema
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response
from starlette.staticfiles import StaticFiles

from audioclip.errors import InvalidInputError
from audioclip.pipeline import ImagePipeline, Options, count_check
from audioclip.quantize import EmbeddingDtype, quantize
from audioclip.windows import MAX_WINDOW_S, MIN_WINDOW_S, Pool, WindowSpec

from . import http_input as hi
from . import openai_compat
from .core import EMBED_DIM, Embedded, EmbeddingCore, MixedCheckpoints, Timings, unwrap
from .errors import (
    ERROR_STATUSES,
    BadRequest,
    InternalError,
    ItemError,
    Overloaded,
    ServiceError,
    Unavailable,
)
from .gate import Gate
from .readiness import TowerWatch
from .schemas import (
    HOP_S_FIELD,
    POOL_FIELD,
    WINDOW_FIELDS,
    WINDOW_S_FIELD,
    AudioJSONRequest,
    EmbedResponse,
    ErrorResponse,
    ImageJSONRequest,
    MediaJSONRequest,
    ModelsResponse,
    OpenAIEmbeddingsRequest,
    OpenAIEmbeddingsResponse,
    RankRequest,
    RankResponse,
    ReadyResponse,
    TextRequest,
    Windowed,
    parse_body,
    window_spec,
)
from .settings import AppArgs

logger = logging.getLogger("ray.serve")
api = FastAPI(title="audioclip-serve", docs_url="/docs", redoc_url=None)
PLAYGROUND = Path(__file__).parent / "playground"
# One static page (and its script and style) that calls the public API: no build step, no CDN.
api.mount("/playground", StaticFiles(directory=PLAYGROUND, html=True), name="playground")


class Service(Protocol):
    """What the HTTP layer needs from the deployment that serves it."""

    args: AppArgs
    core: EmbeddingCore
    gate: Gate
    watch: TowerWatch

    def rejected(self, error_type: str) -> None: ...
    async def scales(self, sha256: str) -> dict[str, float]: ...
    async def models(self) -> dict[str, Any]: ...


_BOUND: dict[str, Service] = {}
NormalizeQuery = Annotated[bool, Query(description="L2-normalise (binary bodies)")]
_SECONDS = {"ge": MIN_WINDOW_S, "le": MAX_WINDOW_S}
WindowQuery = Annotated[float | None, Query(**_SECONDS, description=WINDOW_S_FIELD.description)]
HopQuery = Annotated[float | None, Query(**_SECONDS, description=HOP_S_FIELD.description)]
DtypeQuery = Annotated[EmbeddingDtype, Query(description="float32, float16, int8, uint8, binary, ubinary")]


def bind(service: Service) -> None:
    _BOUND["service"] = service


def current() -> Service:
    return _BOUND["service"]


async def guarded(request: Request) -> AsyncIterator[Service]:
    """Every embedding route runs inside this: the API key check (401) and admission (503)."""
    service = current()
    service.gate.authorize(request.headers.get("authorization", ""))
    with service.gate.admit():
        request.state.started = time.perf_counter()
        yield service


def authorized(request: Request) -> Service:
    service = current()
    service.gate.authorize(request.headers.get("authorization", ""))
    return service


Guarded = Annotated[Service, Depends(guarded)]
Authorized = Annotated[Service, Depends(authorized)]


# ---------------------------------------------------------------------------- failures -> answers
def as_service_error(err: Exception) -> ServiceError | None:
    """The one table from what went wrong to what the client is told (None: an internal error)."""
    if isinstance(err, ServiceError):
        return err
    if isinstance(err, InvalidInputError):
        return ItemError(unwrap(err))
    retry = {"Retry-After": str(current().args.router.retry_after_s)} if _BOUND else {}
    if isinstance(err, BackPressureError):
        return Overloaded("the service is at capacity; retry later", headers=retry)
    if isinstance(err, RayActorError | ActorUnavailableError):
        return Unavailable("a model replica restarted; retry", headers=retry)  # Serve replaces it
    if isinstance(err, MixedCheckpoints):
        return Unavailable("a new checkpoint is rolling out; retry", headers=retry)
    if isinstance(err, RequestValidationError):
        problems = err.errors()
        where = ".".join(str(p) for p in problems[0]["loc"]) if problems else "request"
        return BadRequest(f"invalid {where}: {problems[0]['msg'] if problems else 'malformed'}")
    return None


def triaged(err: Exception) -> ServiceError:
    """What the client is told of ``err`` (HTTP and gRPC alike), logged once: an internal error with
    its traceback (the operator's alarm), a refusal at INFO and counted (the client's mistake)."""
    error = as_service_error(err)
    if error is None:
        logger.exception("internal error")
        return InternalError()
    if _BOUND:
        current().rejected(error.type)
    logger.info("refused: %d %s: %s", error.status, error.type, error.message)  # Serve adds the request id
    return error


async def _answer_error(request: Request, err: Exception) -> Response:
    return triaged(err).response()


async def _http_error(request: Request, err: StarletteHTTPException) -> Response:
    kind = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code, "http_error")
    error = ServiceError(str(err.detail), headers=getattr(err, "headers", None))
    error.status, error.type = err.status_code, kind
    return await _answer_error(request, error)


for _type in (
    ServiceError,
    InvalidInputError,
    BackPressureError,
    RayActorError,
    ActorUnavailableError,
    MixedCheckpoints,
):
    api.add_exception_handler(_type, _answer_error)
api.add_exception_handler(RequestValidationError, _answer_error)
api.add_exception_handler(StarletteHTTPException, _http_error)
api.add_exception_handler(Exception, _answer_error)


# ---------------------------------------------------------------------------- answers
class FastJSONResponse(JSONResponse):
    """JSON through orjson, which writes numpy float32 arrays directly: 32x1024 floats take ~1 ms
    instead of ~20 ms with ``tolist()`` + the standard library."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


def answer_headers(request: Request, timings: Timings, checkpoint: str) -> dict[str, str]:
    """``x-checkpoint-sha256`` (the weights that made every vector of the answer), ``x-total-time``
    (in the router), ``x-preprocess-time`` (decoding), ``x-queue-time`` (waiting for a batch) and
    ``x-inference-time`` (the batch's forward), in milliseconds. The proxy adds ``x-request-id``."""
    total = (time.perf_counter() - request.state.started) * 1000
    return {
        "x-checkpoint-sha256": checkpoint,
        "x-preprocess-time": f"{timings.preprocess_ms:.2f}",
        "x-queue-time": f"{timings.queue_ms:.2f}",
        "x-inference-time": f"{timings.inference_ms:.2f}",
        "x-total-time": f"{total:.2f}",
    }


@dataclass(frozen=True)
class AnswerForm:
    """How a request wants its vectors: L2-normalised or not, in which ``embedding_dtype``, and for
    audio the window fields as given (``None``: not given), checked together by ``windows``."""

    normalize: bool = False
    embedding_dtype: str = "float32"
    window_s: float | None = None
    hop_s: float | None = None
    pool: Pool | None = None

    def overridden_by(self, body: MediaJSONRequest) -> AnswerForm:
        """The JSON body's own choices where it makes them, field by field; the query's otherwise."""
        names = ("normalize", "embedding_dtype", *(WINDOW_FIELDS if isinstance(body, Windowed) else ()))
        return replace(self, **{name: getattr(body, name) for name in names if name in body.model_fields_set})

    def windows(self) -> WindowSpec | None:
        given = {"pool"} if self.pool is not None else set()
        return window_spec(self.window_s, self.hop_s, self.pool or "mean", given)


def window_spans(result: Embedded) -> list[dict] | None:
    """What each row of a windowed answer covers, as JSON (None: not windowed)."""
    return None if result.windows is None else [dataclasses.asdict(row) for row in result.windows]


def embed_response(
    request: Request, service: Service, modality: str, result: Embedded, form: AnswerForm
) -> Response:
    """JSON, or an npy ``[N, 1024]`` (``[N, 128]`` packed bits) of the ``embedding_dtype`` with
    ``Accept: application/x-npy`` (windowed: ``x-window-counts``, the windows of each item, whose
    times follow from window_s and hop_s)."""
    embeddings = quantize(result.embeddings, form.embedding_dtype)
    headers = answer_headers(request, result.timings, result.checkpoint)
    spans = window_spans(result)
    if spans is not None:
        per_item: collections.Counter[int] = collections.Counter()
        for span in spans:
            per_item[span["item"]] += span["windows"]
        headers["x-window-counts"] = ",".join(str(per_item[i]) for i in range(len(per_item)))
    if hi.NPY in request.headers.get("accept", ""):
        buf = io.BytesIO()
        np.save(buf, embeddings, allow_pickle=False)
        return Response(buf.getvalue(), media_type=hi.NPY, headers=headers)
    body = {
        "model": service.args.model_name,
        "modality": modality,
        "dim": EMBED_DIM,
        "normalized": form.normalize,
        "embedding_dtype": form.embedding_dtype,
        "embeddings": embeddings,
    }
    if spans is not None:
        body["windows"] = spans
    return FastJSONResponse(body, headers=headers)


# ---------------------------------------------------------------------------- OpenAPI
def _ref(model: type) -> dict:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _errors(*codes: int) -> dict[int | str, dict]:
    return {code: {"model": ErrorResponse, "description": ERROR_STATUSES[code]} for code in codes}


_EMBED_ERRORS = _errors(400, 401, 413, 415, 422, 503)
_BINARY = {"type": "string", "format": "binary"}


def _embed_responses() -> dict[int | str, dict]:
    ok = {"model": EmbedResponse, "content": {hi.NPY: {"schema": _BINARY}}, "description": "embeddings"}
    return {200: ok, **_EMBED_ERRORS}


def _json_body(model: type) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": _ref(model)}}}}


def _media_body(json_model: type, modality: str, npy: str) -> dict:
    files = {"type": "object", "properties": {"file": {"type": "array", "items": _BINARY}}}
    content = {
        "application/json": {"schema": _ref(json_model)},
        "multipart/form-data": {"schema": files},
        **{raw: {"schema": _BINARY} for raw in (*hi.RAW_TYPES[modality], hi.OCTETS)},
        hi.NPY: {"schema": _BINARY, "description": npy},
    }
    return {"requestBody": {"required": True, "content": content}}


_REQUEST_MODELS = (TextRequest, ImageJSONRequest, AudioJSONRequest, RankRequest, OpenAIEmbeddingsRequest)


def openapi() -> dict:
    """FastAPI's schema plus the request bodies, which routes read themselves (streamed, limited)."""
    if api.openapi_schema is None:
        schema = get_openapi(title=api.title, version="1", routes=api.routes)
        _, defs = models_json_schema(
            [(model, "validation") for model in _REQUEST_MODELS], ref_template="#/components/schemas/{model}"
        )
        schema.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
        api.openapi_schema = schema
    return api.openapi_schema


api.openapi = openapi  # type: ignore[method-assign]


# ---------------------------------------------------------------------------- routes
@api.get("/healthz")
async def healthz() -> dict:
    """The process is up."""
    return {"status": "ok"}


@api.get("/readyz", response_model=ReadyResponse, responses={503: {"model": ReadyResponse}})
async def readyz() -> Response:
    """200 once every tower has a running replica (from Serve's controller, refreshed in the
    background, so this answers at once), else 503 naming the towers that have none. A tower that
    autoscales to zero does not make the app unready: it is listed in ``scaled_to_zero`` and its
    next request starts a replica."""
    watch = current().watch
    watch.touch()
    asleep = watch.asleep()
    if watch.ready:
        return JSONResponse({"status": "ready", "towers": list(watch.running), "scaled_to_zero": asleep})
    body = {"status": "not_ready", "towers": watch.not_ready(), "scaled_to_zero": asleep}
    return JSONResponse(body, status_code=503, headers={"Retry-After": "1"})


@api.get("/v1/models", response_model=ModelsResponse, responses=_errors(401))
async def models(service: Authorized) -> dict:
    """The model, its checkpoint and logit scales, and each tower (device, batching, live replicas);
    also in OpenAI's model-list shape (``object`` / ``data``)."""
    return await service.models()


@api.post(
    "/v1/embed/text",
    openapi_extra=_json_body(TextRequest),
    responses=_embed_responses(),
    response_class=FastJSONResponse,
)
async def embed_text(request: Request, service: Guarded) -> Response:
    """Texts -> embeddings; over 77 tokens is a 422 unless ``truncate``."""
    body = parse_body(TextRequest, await hi.read_json_body(request, "text", service.args.limits))
    result = await service.core.embed(
        "text", body.texts, normalize=body.normalize, options=Options(truncate=body.truncate)
    )
    return embed_response(request, service, "text", result, AnswerForm(body.normalize, body.embedding_dtype))


async def _embed_media(
    request: Request,
    service: Service,
    modality: str,
    json_model: type[MediaJSONRequest],
    from_npy: Callable[[np.ndarray], list],
    answer: AnswerForm,
) -> Response:
    """An image or audio request, whatever its content type: multipart files, JSON base64 / data URIs
    (whose ``normalize`` and ``embedding_dtype``, where given, override the query's), an npy array
    (read by ``from_npy``), or one raw file: ``image/*``, ``audio/*`` or ``video/*`` (its audio track),
    ``application/octet-stream`` or no content type, recognised by its bytes, embedded and answered."""
    kind = hi.media_type(request)
    limits = service.args.limits
    raw_types = hi.RAW_TYPES[modality]
    if kind == "multipart/form-data":
        items = await hi.multipart_files(request, limits)
    else:
        body = await hi.read_body(request, limits)
        if kind == "application/json":
            parsed = parse_body(json_model, body)
            items = hi.decode_all_base64(getattr(parsed, json_model.items_field), limits.items)
            answer = answer.overridden_by(parsed)
        elif kind == hi.NPY:
            items = from_npy(hi.load_npy(body))
        elif hi.is_raw(kind, raw_types):
            items = [body]
        else:
            accepted = ("application/json", "multipart/form-data", *raw_types, hi.OCTETS, hi.NPY)
            raise hi.unsupported(modality, kind, accepted)
    options = Options(windows=answer.windows())
    result = await service.core.embed(modality, items, normalize=answer.normalize, options=options)
    return embed_response(request, service, modality, result, answer)


def _npy_images(array: np.ndarray, preprocess: bool) -> list:
    """uint8 ``[H,W,3]`` / ``[N,H,W,3]`` images; with ``preprocess=false`` float32 ``[N,3,224,224]``
    pixels already CLIP-normalised, which skip the crop."""
    if not preprocess:
        if array.dtype != np.float32 or array.ndim != 4:
            raise BadRequest(
                f"with preprocess=false the body must be float32 [N,3,224,224], got "
                f"{array.dtype} {list(array.shape)}"
            )
        items = []
        for index, pixels in enumerate(array):
            try:
                items.append(ImagePipeline.normalized(pixels))
            except InvalidInputError as err:
                raise err.at_index(index) from None
        return items
    if array.dtype != np.uint8 or array.ndim not in (3, 4) or array.shape[-1] != 3:
        raise BadRequest(
            f"an npy image body must be uint8 [H,W,3] or [N,H,W,3], got {array.dtype} {list(array.shape)}"
        )
    return list(array) if array.ndim == 4 else [array]


@api.post(
    "/v1/embed/image",
    openapi_extra=_media_body(
        ImageJSONRequest,
        "image",
        "uint8 [H,W,3] or [N,H,W,3]; with preprocess=false float32 [N,3,224,224] CLIP-normalised",
    ),
    responses=_embed_responses(),
    response_class=FastJSONResponse,
)
async def embed_image(
    request: Request,
    service: Guarded,
    normalize: NormalizeQuery = False,
    embedding_dtype: DtypeQuery = "float32",
    preprocess: Annotated[bool, Query(description="false: an npy body of normalised pixels")] = True,
) -> Response:
    """Images (JPEG, PNG, WebP, GIF, TIFF, BMP ...) -> embeddings: one raw body, multipart files,
    JSON base64 / data URIs, or npy arrays."""
    form = AnswerForm(normalize, embedding_dtype)
    return await _embed_media(
        request, service, "image", ImageJSONRequest, lambda array: _npy_images(array, preprocess), form
    )


@api.post(
    "/v1/embed/audio",
    openapi_extra=_media_body(
        AudioJSONRequest, "audio", "float32 [N] or [C,N] in [-1, 1], with ?sample_rate="
    ),
    responses=_embed_responses(),
    response_class=FastJSONResponse,
)
async def embed_audio(
    request: Request,
    service: Guarded,
    normalize: NormalizeQuery = False,
    embedding_dtype: DtypeQuery = "float32",
    sample_rate: Annotated[int | None, Query(gt=0, description="Hz, for an npy body")] = None,
    window_s: WindowQuery = None,
    hop_s: HopQuery = None,
    pool: Annotated[Pool | None, Query(description=POOL_FIELD.description)] = None,
) -> Response:
    """Audio (WAV, FLAC, MP3, OGG/Vorbis, Opus, M4A/AAC, WebM, the audio track of MP4/MOV/WebM video
    ... at any rate, resampled to 44.1 kHz) -> embeddings; with ``window_s`` each clip is cut into
    windows, pooled (``mean``, ``max``) or one vector each (``none``)."""

    def from_npy(array: np.ndarray) -> list:
        if sample_rate is None:
            raise BadRequest("an npy audio body needs ?sample_rate=<positive integer Hz>")
        return [(array, sample_rate)]

    form = AnswerForm(normalize, embedding_dtype, window_s, hop_s, pool)
    return await _embed_media(request, service, "audio", AudioJSONRequest, from_npy, form)


@api.post(
    "/v1/embeddings",
    openapi_extra=_json_body(OpenAIEmbeddingsRequest),
    responses={200: {"model": OpenAIEmbeddingsResponse}, **_errors(400, 401, 404, 413, 415, 422, 503)},
    response_class=FastJSONResponse,
)
async def openai_embeddings(request: Request, service: Guarded) -> Response:
    """OpenAI-compatible embeddings (L2-normalised); ``modality`` selects image or audio inputs."""
    body = parse_body(
        OpenAIEmbeddingsRequest, await hi.read_json_body(request, "embeddings", service.args.limits)
    )
    inputs: list[Any] = openai_compat.check_request(body, service.args.model_name, EMBED_DIM)
    if body.modality != "text":
        inputs = hi.decode_all_base64(inputs, service.args.limits.items)
    options = Options(windows=body.windows())
    result = await service.core.embed(body.modality, inputs, normalize=True, options=options)
    embeddings = quantize(result.embeddings, body.embedding_dtype)
    answer = openai_compat.embeddings_response(body, embeddings, result.usage_tokens, window_spans(result))
    return FastJSONResponse(answer, headers=answer_headers(request, result.timings, result.checkpoint))


@api.post(
    "/v1/rank",
    openapi_extra=_json_body(RankRequest),
    responses={200: {"model": RankResponse}, **_EMBED_ERRORS},
)
async def rank(request: Request, service: Guarded) -> Response:
    """Rank candidates of any modality against a query, with the checkpoint's logit scale for each
    modality pair: zero-shot classification of a sound against labels, or the image matching it.
    With ``window_s`` an audio query's windows are ranked too: a timeline of which label where."""
    body = parse_body(RankRequest, await hi.read_json_body(request, "rank", service.args.limits))

    def item(parsed: Any, index: int | None) -> dict:
        [(kind, value)] = parsed.item().items()
        return {kind: value if kind == "text" else hi.decode_base64(value, index)}

    count_check(body.candidates, service.args.limits.items)
    query = item(body.query, None)
    candidates = [item(c, i) for i, c in enumerate(body.candidates)]
    ranked = await service.core.rank(query, candidates, service.scales, body.top_k, body.windows())
    answer = {
        "model": service.args.model_name,
        "checkpoint_sha256": ranked.checkpoint,
        "results": ranked.results,
    }
    if ranked.timeline is not None:
        answer["timeline"] = ranked.timeline
    return JSONResponse(answer, headers=answer_headers(request, ranked.timings, ranked.checkpoint))
