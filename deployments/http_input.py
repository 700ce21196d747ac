"""Turning HTTP requests into items: JSON (base64 / data URIs), multipart, raw bodies and npy arrays.

Everything here only parses and checks the body's size; pixels and samples are decoded later, by
the core in the router's thread pool. Request problems are ``ServiceError``s; an item's problem is
the library's ``InvalidInputError`` naming its index.
"""

from __future__ import annotations

import base64
import binascii
import io

import numpy as np
from starlette.datastructures import UploadFile
from starlette.requests import Request

from audioclip.errors import InvalidInputError, Reason
from audioclip.pipeline import Limits, count_check

from .errors import BadRequest, PayloadTooLarge, UnsupportedMediaType
from .settings import LimitSettings

NPY = "application/x-npy"
OCTETS = "application/octet-stream"
# Content types of a raw body holding one file; the decoders recognise the format by its bytes, so a
# generic type (or none, as many HTTP clients send for a file) is as good as an exact one.
RAW_TYPES = {"image": ("image/*",), "audio": ("audio/*", "video/*")}


def is_raw(kind: str, raw_types: tuple[str, ...]) -> bool:
    """One encoded file in the body: a type of ``raw_types`` (``x/*``), octet-stream, or none."""
    return kind in (OCTETS, "") or any(kind.startswith(t.removesuffix("*")) for t in raw_types)


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def read_body(request: Request, limits: LimitSettings) -> bytes:
    """The body, refused with 413 as soon as it passes the byte limit (declared or streamed)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise PayloadTooLarge(f"body of {declared} bytes is over the limit of {limits.max_body_bytes}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limits.max_body_bytes:
            raise PayloadTooLarge(f"body is over the limit of {limits.max_body_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _not_base64(message: str, index: int | None) -> InvalidInputError:
    return InvalidInputError(message, index=index, reason=Reason.NOT_BASE64)


def decode_base64(value: str, index: int | None) -> bytes:
    """A base64 string or a ``data:<type>;base64,<payload>`` URI -> bytes. No URLs are fetched."""
    payload = value
    if value.startswith("data:"):
        header, sep, payload = value.partition(",")
        if not sep or not header.endswith(";base64"):
            raise _not_base64("data URI must be base64 encoded (data:<type>;base64,...)", index)
    elif value.startswith(("http://", "https://", "file:", "s3:", "gs:")):
        raise _not_base64("URLs are not fetched; send the bytes (base64 or data URI)", index)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise _not_base64("item is not valid base64", index) from None
    if not data:
        raise InvalidInputError("item is empty", index=index, reason=Reason.EMPTY)
    return data


def decode_all_base64(values: list[str], limits: Limits) -> list[bytes]:
    """Every item decoded, once the item count is within the limit (413 before any work)."""
    count_check(values, limits)
    return [decode_base64(value, index) for index, value in enumerate(values)]


async def multipart_files(request: Request, limits: LimitSettings) -> list[bytes]:
    """The files of a multipart/form-data body, in order."""
    try:
        form = await request.form(max_files=limits.max_items, max_fields=limits.max_items)
    except Exception as err:  # noqa: BLE001 - starlette raises several types for a bad form
        raise BadRequest(f"malformed multipart body: {type(err).__name__}") from None
    files = []
    for _, value in form.multi_items():
        if isinstance(value, UploadFile):
            files.append(await value.read())
    await form.close()
    if not files:
        raise BadRequest("multipart body has no files")
    return files


def load_npy(body: bytes) -> np.ndarray:
    try:
        return np.load(io.BytesIO(body), allow_pickle=False)
    except Exception as err:  # noqa: BLE001 - numpy raises ValueError, EOFError, OSError...
        raise BadRequest(f"body is not a valid .npy array: {type(err).__name__}") from None


async def read_json_body(request: Request, kind: str, limits: LimitSettings) -> bytes:
    """The body of a JSON-only route: 415 for any other content type, 413 past the byte limit."""
    if media_type(request) != "application/json":
        raise unsupported(kind, media_type(request), ("application/json",))
    return await read_body(request, limits)


def unsupported(kind: str, got: str, accepted: tuple[str, ...]) -> UnsupportedMediaType:
    return UnsupportedMediaType(
        f"content type {got or '(none)'!r} is not accepted for {kind}; use one of {accepted}"
    )
