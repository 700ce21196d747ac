"""OpenAI-compatible embeddings: the response shape of ``POST /v1/embeddings``.

Text by default; images and audio through an extra ``modality`` field with base64 or data-URI
inputs (the convention infinity uses; the OpenAI SDK sends it via ``extra_body``). Embeddings are
L2-normalised, as OpenAI's are. The request is ``schemas.OpenAIEmbeddingsRequest``.
"""

from __future__ import annotations

import base64

import numpy as np

from .errors import BadRequest, ModelNotFound
from .schemas import OpenAIEmbeddingsRequest


def check_request(request: OpenAIEmbeddingsRequest, served_model: str, dim: int) -> list[str]:
    """The request's inputs as a list, once its model and dimensions are ours."""
    if request.model != served_model:
        raise ModelNotFound(
            f"model {request.model!r} is not served here; this endpoint serves {served_model!r}"
        )
    if request.dimensions is not None and request.dimensions != dim:
        raise BadRequest(
            f"dimensions must be {dim}: AudioCLIP was not trained for truncated vectors, so a shorter "
            "prefix of its embedding is not a meaningful embedding"
        )
    return [request.input] if isinstance(request.input, str) else request.input


def embeddings_response(
    request: OpenAIEmbeddingsRequest,
    embeddings: np.ndarray,
    prompt_tokens: int,
    windows: list[dict] | None = None,
) -> dict:
    """OpenAI's list shape, for rows already in the request's ``embedding_dtype``; base64 is each
    row's raw little-endian bytes (float32 by default, as OpenAI sends it). Windowed audio rows also
    say what they cover (``window``: the input's index, its span, the windows pooled)."""
    data = []
    for index, row in enumerate(embeddings):
        value = base64.b64encode(row.tobytes()).decode() if request.encoding_format == "base64" else row
        entry = {"object": "embedding", "index": index, "embedding": value}
        if windows is not None:
            entry["window"] = windows[index]
        data.append(entry)
    return {
        "object": "list",
        "data": data,
        "model": request.model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }
