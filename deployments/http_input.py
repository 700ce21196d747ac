"""Turning HTTP requests into items: JSON (base64 / data URIs), multipart, raw bodies and npy arrays.

Everything here only parses and checks limits; pixels and samples are decoded later, in
the router's thread pool. Problems become ``ServiceError``s with the right status.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from typing import Any

import numpy as np
from starlette.datastructures import UploadFile
from starlette.requests import Request

from .http_errors import BadRequest, PayloadTooLarge, Unprocessable, UnsupportedMediaType
from .settings import Limits

NPY = "application/x-npy"
_TRUE, _FALSE = {"true", "1", "yes"}, {"false", "0", "no"}


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def read_body(request: Request, limits: Limits) -> bytes:
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


def query_flag(request: Request, name: str, default: bool) -> bool:
    value = request.query_params.get(name)
    if value is None:
        return default
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise BadRequest(f"query parameter {name!r} must be true or false, got {value!r}")


def check_count(items: list, limits: Limits) -> list:
    if len(items) > limits.max_items:
        raise PayloadTooLarge(f"{len(items)} items is over the limit of {limits.max_items} per request")
    return items


def load_json_object(body: bytes) -> dict:
    """A JSON object body; anything else (invalid, too deep, not an object) is a 400."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as err:
        raise BadRequest(f"body is not valid JSON: {type(err).__name__}") from None
    if not isinstance(data, dict):
        raise BadRequest("body must be a JSON object")
    return data


def parse_json(body: bytes, list_field: str, flags: tuple[str, ...], limits: Limits) -> tuple[list, dict]:
    """``{list_field: [...], flag: bool, ...}`` -> (items, flags). Unknown fields are refused (typos)."""
    data = load_json_object(body)
    unknown = sorted(set(data) - {list_field, *flags})
    if unknown:
        raise BadRequest(f"unknown field(s) {unknown}; expected {list_field!r} and optional {list(flags)}")
    if list_field not in data:
        raise BadRequest(f"missing field {list_field!r}")
    items = data[list_field]
    if not isinstance(items, list):
        raise BadRequest(f"field {list_field!r} must be a list")
    options = {}
    for flag in flags:
        value = data.get(flag, False)
        if not isinstance(value, bool):
            raise BadRequest(f"field {flag!r} must be true or false")
        options[flag] = value
    return check_count(items, limits), options


def decode_base64(value: Any, index: int) -> bytes:
    """A base64 string or a ``data:<type>;base64,<payload>`` URI -> bytes. No URLs are fetched."""
    if not isinstance(value, str):
        raise Unprocessable("item must be a base64 string or a data URI", index=index)
    payload = value
    if value.startswith("data:"):
        header, sep, payload = value.partition(",")
        if not sep or not header.endswith(";base64"):
            raise Unprocessable("data URI must be base64 encoded (data:<type>;base64,...)", index=index)
    elif value.startswith(("http://", "https://", "file:", "s3:", "gs:")):
        raise Unprocessable("URLs are not fetched; send the bytes (base64 or data URI)", index=index)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise Unprocessable("item is not valid base64", index=index) from None
    if not data:
        raise Unprocessable("item is empty", index=index)
    return data


async def multipart_files(request: Request, limits: Limits) -> list[bytes]:
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
    return check_count(files, limits)


def load_npy(body: bytes) -> np.ndarray:
    try:
        return np.load(io.BytesIO(body), allow_pickle=False)
    except Exception as err:  # noqa: BLE001 - numpy raises ValueError, EOFError, OSError...
        raise BadRequest(f"body is not a valid .npy array: {type(err).__name__}") from None


async def read_json_body(request: Request, kind: str, limits: Limits) -> bytes:
    """The body of a JSON-only route: 415 for any other content type, 413 past the byte limit."""
    if media_type(request) != "application/json":
        raise unsupported(kind, media_type(request), ("application/json",))
    return await read_body(request, limits)


def unsupported(kind: str, got: str, accepted: tuple[str, ...]) -> UnsupportedMediaType:
    return UnsupportedMediaType(
        f"content type {got or '(none)'!r} is not accepted for {kind}; use one of {accepted}"
    )
