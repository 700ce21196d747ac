"""The JSON bodies of the HTTP API as pydantic models: they validate requests (one parser per body)
and describe every request and response in ``/openapi.json``.

A validation problem inside an item list (``texts[3]`` is a number) is that item's error, a 422
naming its index, like any item the pipeline refuses; anything else about the body is a 400.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, StrictBool, ValidationError, model_validator

from audioclip.errors import InvalidInputError, Reason
from audioclip.quantize import EmbeddingDtype
from audioclip.windows import MAX_WINDOW_S, MIN_WINDOW_S, Pool, WindowSpec

from .errors import BadRequest


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # no "3" for 3, no true for 1


DTYPE_FIELD = Field(
    "float32",
    description="float32, or a compact code: float16, int8, uint8 (per-vector scale), binary, ubinary "
    "(sign bits packed in 128 bytes); the rules are in audioclip.quantize",
)


class TextRequest(Body):
    texts: list[str] = Field(description="one string per item")
    normalize: StrictBool = Field(False, description="L2-normalise the embeddings")
    truncate: StrictBool = Field(False, description="cut texts over 77 tokens instead of refusing them")
    embedding_dtype: EmbeddingDtype = DTYPE_FIELD


class MediaJSONRequest(Body):
    """``normalize`` and ``embedding_dtype``, where given, override the query's."""

    normalize: StrictBool = False
    embedding_dtype: EmbeddingDtype = DTYPE_FIELD


class ImageJSONRequest(MediaJSONRequest):
    items_field: ClassVar[str] = "images"
    images: list[str] = Field(description="base64 or data-URI encoded image files (no URL is fetched)")


WINDOW_S_FIELD = Field(
    None,
    ge=MIN_WINDOW_S,
    le=MAX_WINDOW_S,
    description="cut each clip into windows this long (AudioCLIP was trained on 5 s)",
)
HOP_S_FIELD = Field(
    None, ge=MIN_WINDOW_S, le=MAX_WINDOW_S, description="seconds between window starts; default window_s"
)
WINDOW_FIELDS = frozenset({"window_s", "hop_s", "pool"})
POOL_FIELD = Field("mean", description="mean or max of the normalised windows, or none: a vector per window")


class Windowed(Body):
    """Audio cut into windows: ``window_s`` (and ``hop_s``, ``pool``) turn it on."""

    window_s: float | None = WINDOW_S_FIELD
    hop_s: float | None = HOP_S_FIELD
    pool: Pool = POOL_FIELD

    def windows(self) -> WindowSpec | None:
        return window_spec(self.window_s, self.hop_s, self.pool, given=self.model_fields_set)


def window_spec(
    window_s: float | None, hop_s: float | None, pool: Pool, given: set[str] | None = None
) -> WindowSpec | None:
    """The windows asked for, or None; ``hop_s`` or ``pool`` without ``window_s`` is a 400."""
    if window_s is None:
        if hop_s is not None or "pool" in (given or set()):
            raise BadRequest("hop_s and pool apply to windows: give window_s too")
        return None
    return WindowSpec(window_s, hop_s, pool)


class AudioJSONRequest(MediaJSONRequest, Windowed):
    """Windows, ``normalize`` and ``embedding_dtype``, where given, override the query's."""

    items_field: ClassVar[str] = "audio"
    audio: list[str] = Field(description="base64 or data-URI encoded audio files (no URL is fetched)")


class RankItem(Body):
    """Exactly one of the three: a text, or a base64 / data-URI image or audio file."""

    text: str | None = None
    image: str | None = None
    audio: str | None = None

    @model_validator(mode="after")
    def _one_modality(self) -> RankItem:
        if len(self.model_fields_set) != 1 or getattr(self, next(iter(self.model_fields_set))) is None:
            raise ValueError("exactly one of 'text', 'image', 'audio'")
        return self

    def item(self) -> dict[str, str]:
        [(key, value)] = self.model_dump(exclude_unset=True).items()
        return {key: value}


class RankRequest(Body):
    query: RankItem
    candidates: list[RankItem] = Field(min_length=1)
    top_k: PositiveInt | None = None
    window_s: float | None = Field(
        None,
        ge=MIN_WINDOW_S,
        le=MAX_WINDOW_S,
        description="an audio query: rank each window too (the answer's timeline)",
    )
    hop_s: float | None = HOP_S_FIELD

    def windows(self) -> WindowSpec | None:
        return window_spec(self.window_s, self.hop_s, "mean")


class OpenAIEmbeddingsRequest(Body):
    """OpenAI's embeddings request, plus ``modality`` for image and audio inputs (base64 / data URIs)."""

    model: str
    input: str | list[str]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(
        None, description="only 1024: AudioCLIP was not trained for shorter vectors"
    )
    user: str | None = None
    modality: Literal["text", "image", "audio"] = "text"
    embedding_dtype: EmbeddingDtype = DTYPE_FIELD
    window_s: float | None = WINDOW_S_FIELD
    hop_s: float | None = HOP_S_FIELD
    pool: Pool = POOL_FIELD

    def windows(self) -> WindowSpec | None:
        return window_spec(self.window_s, self.hop_s, self.pool, given=self.model_fields_set)


class ErrorDetail(BaseModel):
    type: str = Field(description="the reason, e.g. undecodable, text_too_long, payload_too_large")
    message: str
    index: int | None = Field(description="the failing item's position in the request, if an item failed")


class ErrorResponse(BaseModel):
    error: ErrorDetail


class WindowSpan(BaseModel):
    item: int = Field(description="the input item the row belongs to")
    start_s: float
    end_s: float
    windows: int = Field(description="windows pooled into the row (1 with pool=none)")


class EmbedResponse(BaseModel):
    model: str
    modality: Literal["text", "image", "audio"]
    dim: int = Field(description="the vectors' dimension (packed dtypes: 8 per value)")
    normalized: bool
    embedding_dtype: EmbeddingDtype
    embeddings: list[list[float]] | list[list[int]]
    windows: list[WindowSpan] | None = Field(None, description="windowed audio: what each row covers")


class OpenAIEmbedding(BaseModel):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | list[int] | str = Field(
        description="numbers, or base64 of the little-endian bytes of the embedding_dtype"
    )
    window: WindowSpan | None = Field(None, description="windowed audio: what the vector covers")


class OpenAIUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class OpenAIEmbeddingsResponse(BaseModel):
    object: Literal["list"]
    data: list[OpenAIEmbedding]
    model: str
    usage: OpenAIUsage


class RankResult(BaseModel):
    index: int
    modality: Literal["text", "image", "audio"]
    cosine: float
    probability: float


class TimelineEntry(BaseModel):
    start_s: float
    end_s: float
    results: list[RankResult] = Field(description="the candidates ranked against this window")


class RankResponse(BaseModel):
    model: str
    checkpoint_sha256: str
    results: list[RankResult] = Field(description="a windowed query: ranked against its mean window")
    timeline: list[TimelineEntry] | None = Field(None, description="a windowed query: each window ranked")


class ReadyResponse(BaseModel):
    status: Literal["ready", "not_ready"]
    towers: list[str] = Field(
        description="ready: the towers served; not ready: those without a running replica"
    )
    scaled_to_zero: list[str] = Field(description="towers with no replica now that start one on demand")


class ModelsResponse(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    dim: int
    checkpoint_sha256: str
    weights: Literal["real", "synthetic"]
    towers: dict[str, dict[str, Any]]
    logit_scales: dict[str, float]
    object: Literal["list"]
    data: list[dict[str, Any]]


# Fields holding item lists, and the reason an item of the wrong type gets.
_ITEM_LISTS = {
    "texts": Reason.NOT_A_STRING,
    "input": Reason.NOT_A_STRING,
    "images": Reason.NOT_BASE64,
    "audio": Reason.NOT_BASE64,
    "candidates": Reason.BAD_ITEM,
}
_ITEM_MESSAGES = {
    Reason.NOT_A_STRING: "text must be a string",
    Reason.NOT_BASE64: "item must be a base64 string or a data URI",
    Reason.BAD_ITEM: "each candidate must be an object with exactly one of 'text', 'image', 'audio'",
}
B = TypeVar("B", bound=Body)


def _item_error(error: dict) -> InvalidInputError | None:
    """The item error a validation problem is, if it lies inside an item list (or the rank query)."""
    loc = error["loc"]
    if loc and loc[0] == "query" and error["type"] != "missing":
        return InvalidInputError(
            _ITEM_MESSAGES[Reason.BAD_ITEM].replace("candidate", "query"), reason=Reason.BAD_ITEM
        )
    index = next((part for part in loc[1:] if isinstance(part, int)), None)
    if not loc or loc[0] not in _ITEM_LISTS or index is None:
        return None
    reason = _ITEM_LISTS[loc[0]]
    return InvalidInputError(_ITEM_MESSAGES[reason], index=index, reason=reason)


def _request_error(error: dict, model: type[Body]) -> BadRequest:
    loc, kind = error["loc"], error["type"]
    if kind == "json_invalid":
        return BadRequest(f"body is not valid JSON: {error['msg'].removeprefix('Invalid JSON: ')}")
    if not loc:
        return BadRequest("body must be a JSON object")
    field = ".".join(str(part) for part in loc)
    if kind == "extra_forbidden":
        return BadRequest(f"unknown field {field!r}; the fields are {list(model.model_fields)}")
    if kind == "missing":
        return BadRequest(f"missing field {field!r}")
    return BadRequest(f"field {field!r}: {error['msg']}")


def parse_body(model: type[B], body: bytes) -> B:
    """The body validated by ``model``; item problems raise ``InvalidInputError`` (the first item by
    position), anything else ``BadRequest``."""
    try:
        return model.model_validate_json(body)
    except ValidationError as err:
        errors = err.errors(include_url=False, include_input=False)
        errors.sort(key=lambda e: e["type"] != "extra_forbidden")  # a typo'd field explains a missing one
        items = [e for e in (_item_error(error) for error in errors) if e is not None]
        if items:
            raise min(items, key=lambda e: -1 if e.index is None else e.index) from None
        raise _request_error(errors[0], model) from None
