"""OpenAI-compatible embeddings: request parsing and the response shape of ``POST /v1/embeddings``.

Text by default; images and audio through an extra ``modality`` field with base64 or data-URI
inputs (the convention infinity uses; the OpenAI SDK sends it via ``extra_body``). Embeddings are
L2-normalised, as OpenAI's are.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

import numpy as np

from .http_errors import BadRequest, ServiceError
from .http_input import check_count, load_json_object
from .settings import Limits

_FIELDS = {"model", "input", "encoding_format", "dimensions", "user", "modality"}


class ModelNotFound(ServiceError):
    status, type = 404, "model_not_found"


@dataclass(frozen=True)
class EmbeddingsRequest:
    model: str
    inputs: list
    modality: str
    encoding_format: str


def parse_embeddings_request(body: bytes, served_model: str, dim: int, limits: Limits) -> EmbeddingsRequest:
    data = load_json_object(body)
    unknown = sorted(set(data) - _FIELDS)
    if unknown:
        raise BadRequest(f"unknown field(s) {unknown}")
    model = data.get("model")
    if not isinstance(model, str):
        raise BadRequest("field 'model' is required and must be a string")
    if model != served_model:
        raise ModelNotFound(f"model {model!r} is not served here; this endpoint serves {served_model!r}")
    raw = data.get("input")
    inputs = [raw] if isinstance(raw, str) else raw
    if not isinstance(inputs, list):
        raise BadRequest("field 'input' must be a string or a list of strings")
    check_count(inputs, limits)
    encoding = data.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise BadRequest("encoding_format must be 'float' or 'base64'")
    dimensions = data.get("dimensions")
    if dimensions is not None and dimensions != dim:
        raise BadRequest(f"dimensions must be {dim}: AudioCLIP embeddings cannot be shortened meaningfully")
    modality = data.get("modality", "text")
    if modality not in ("text", "image", "audio"):
        raise BadRequest("modality must be 'text', 'image' or 'audio'")
    if data.get("user") is not None and not isinstance(data["user"], str):
        raise BadRequest("field 'user' must be a string")
    return EmbeddingsRequest(model, inputs, modality, encoding)


def embeddings_response(request: EmbeddingsRequest, embeddings: np.ndarray, prompt_tokens: int) -> dict:
    """OpenAI's list shape; base64 is the raw little-endian float32 bytes, as OpenAI sends it."""
    data = []
    for index, row in enumerate(np.asarray(embeddings, dtype="<f4")):
        value = base64.b64encode(row.tobytes()).decode() if request.encoding_format == "base64" else row
        data.append({"object": "embedding", "index": index, "embedding": value})
    return {
        "object": "list",
        "data": data,
        "model": request.model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }
