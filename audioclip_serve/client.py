"""A small synchronous HTTP client for audioclip-serve.

Why a client and not raw HTTP: it splits large inputs into requests the server accepts
(``batch_size`` items each, which must not exceed the server's ``limits.max_items``), asks for npy
responses so embeddings travel as float32 bytes rather than JSON floats, retries on 429/503
(honouring ``Retry-After``) and on connection errors a bounded number of times, and turns the
service's JSON error body into :class:`AudioCLIPHTTPError` whose ``index`` is the failing item's
position in the caller's whole input, not in the request that carried it.

One client may be shared by threads (``httpx.Client`` is thread-safe); the counters are too.
"""

from __future__ import annotations

import base64
import email.utils
import io
import os
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from tqdm.auto import tqdm

EMBED_DIM = 1024
NPY = "application/x-npy"
RETRY_STATUSES = frozenset({429, 503})

MediaInput = str | os.PathLike[str] | bytes | bytearray | memoryview
"""An image or audio item: a path to a file (``str`` or ``Path``), or the encoded file's bytes."""
_MEDIA_TYPES = (str, os.PathLike, bytes, bytearray, memoryview)


class AudioCLIPClientError(Exception):
    """Base class of the client's errors."""


class AudioCLIPConnectionError(AudioCLIPClientError):
    """The server could not be reached, even after the allowed retries."""


class AudioCLIPHTTPError(AudioCLIPClientError):
    """The service answered with an error status.

    ``type`` and ``message`` come from its JSON body (``{"error": {"type", "message", "index"}}``);
    ``index`` is the failing item's position in the caller's whole input (None if no item is to
    blame).
    """

    def __init__(self, status: int, type: str, message: str, index: int | None = None) -> None:
        self.status = status
        self.type = type
        self.message = message
        self.index = index
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f" (item {self.index})" if self.index is not None else ""
        return f"HTTP {self.status} {self.type}{where}: {self.message}"

    def at_offset(self, offset: int) -> AudioCLIPHTTPError:
        """The same error with ``index`` moved from a request's position to the caller's input."""
        index = None if self.index is None else self.index + offset
        return AudioCLIPHTTPError(self.status, self.type, self.message, index)

    @classmethod
    def from_response(cls, response: httpx.Response) -> AudioCLIPHTTPError:
        """Parse the service's error body; a proxy's plain-text error is kept as the message."""
        try:
            error = response.json()["error"]
            index = error.get("index")
            return cls(
                response.status_code,
                str(error.get("type") or "http_error"),
                str(error.get("message") or ""),
                index if isinstance(index, int) and not isinstance(index, bool) else None,
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            return cls(response.status_code, "http_error", response.text[:500] or response.reason_phrase)


@dataclass(frozen=True)
class RankResult:
    """One ranked candidate: its position in ``candidates``, cosine and softmax probability."""

    index: int
    modality: str
    cosine: float
    probability: float


@dataclass(frozen=True)
class AudioWindow:
    """Where one row of a windowed answer lies: its clip's position in the request and the span."""

    item: int
    start_s: float
    end_s: float


@dataclass(frozen=True)
class TimelineEntry:
    """One window of a windowed rank query and the candidates ranked against it."""

    start_s: float
    end_s: float
    results: list[RankResult]


def _ranked(results: list[dict]) -> list[RankResult]:
    return [RankResult(r["index"], r["modality"], r["cosine"], r["probability"]) for r in results]


def read_media(item: MediaInput) -> bytes:
    """A path's contents, or the bytes themselves."""
    if isinstance(item, bytes | bytearray | memoryview):
        return bytes(item)
    if isinstance(item, str | os.PathLike):
        return Path(item).read_bytes()
    raise TypeError(f"an image or audio item must be a path or bytes, got {type(item).__name__}")


def encode_media(item: MediaInput) -> str:
    """Base64 text of a file, the JSON form the service accepts for images and audio."""
    return base64.b64encode(read_media(item)).decode("ascii")


def as_item_list(items: Any, what: str, item_types: type | tuple[type, ...]) -> list:
    """The caller's items as a list, refusing a bare string/bytes (which would iterate by character)."""
    if isinstance(items, str | bytes | bytearray | memoryview | os.PathLike) or not isinstance(
        items, Sequence
    ):
        raise TypeError(f"{what} must be a list, got {type(items).__name__}; wrap a single item in a list")
    for i, item in enumerate(items):
        if not isinstance(item, item_types):
            raise TypeError(f"{what}[{i}] is a {type(item).__name__}")
    return list(items)


def retry_after_seconds(value: str | None) -> float | None:
    """``Retry-After`` as seconds: delta-seconds or an HTTP date; None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


# The server's embedding_dtype codes (audioclip.quantize, which this light client does not import).
EMBEDDING_DTYPES = {
    "float32": (np.dtype("<f4"), EMBED_DIM),
    "float16": (np.dtype("<f2"), EMBED_DIM),
    "int8": (np.dtype("i1"), EMBED_DIM),
    "uint8": (np.dtype("u1"), EMBED_DIM),
    "binary": (np.dtype("i1"), EMBED_DIM // 8),
    "ubinary": (np.dtype("u1"), EMBED_DIM // 8),
}


def parse_embeddings(
    response: httpx.Response, expected_rows: int, embedding_dtype: str = "float32"
) -> np.ndarray:
    """``[N, 1024]`` rows of the dtype (``[N, 128]`` for packed bits) from an npy body (asked for)
    or, from a server that ignored that, JSON."""
    dtype, width = EMBEDDING_DTYPES[embedding_dtype]
    if response.headers.get("content-type", "").startswith(NPY):
        array = np.load(io.BytesIO(response.content), allow_pickle=False)
    else:
        array = np.asarray(response.json()["embeddings"], dtype=dtype).reshape(-1, width)
    if array.shape != (expected_rows, width) or array.dtype != dtype:
        raise AudioCLIPClientError(
            f"expected {embedding_dtype} [{expected_rows}, {width}] embeddings, "
            f"got {array.dtype} {list(array.shape)}"
        )
    return np.ascontiguousarray(array)


def rank_item(item: Mapping[str, Any]) -> dict[str, str]:
    """The JSON form of a rank query or candidate: text as is, image/audio base64-encoded."""
    if len(item) != 1:
        raise ValueError(f"a rank item has exactly one of 'text', 'image', 'audio', got {sorted(item)}")
    ((kind, value),) = item.items()
    if kind == "text":
        return {"text": value}
    if kind in ("image", "audio"):
        return {kind: encode_media(value)}
    raise ValueError(f"unknown rank item kind {kind!r}; expected 'text', 'image' or 'audio'")


class AudioCLIPClient:
    """Embeddings, ranking and status of an audioclip-serve deployment over HTTP.

    ``base_url`` is the application's root (e.g. ``http://127.0.0.1:8000``, ``localhost:8000`` or
    ``.../full``);
    ``api_key`` is sent as ``Authorization: Bearer``. A request is tried at most ``1 + max_retries``
    times; between tries the client waits ``Retry-After`` (at most ``max_wait_s``) or an
    exponential backoff from ``backoff_s``, plus jitter so that rejected callers do not return
    in lockstep. ``requests`` and ``retries`` count HTTP attempts and retries since creation.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        timeout: float = 120.0,
        max_retries: int = 5,
        *,
        backoff_s: float = 0.5,
        max_wait_s: float = 30.0,
    ) -> None:
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        if "://" not in base_url:  # "localhost:8000", as curl takes it
            base_url = f"http://{base_url}"
        self._http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout)
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_wait_s = max_wait_s
        self._lock = threading.Lock()
        self.requests = 0
        self.retries = 0

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> AudioCLIPClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------ embeddings
    def embed_text(
        self,
        texts: Sequence[str],
        normalize: bool = False,
        truncate: bool = False,
        batch_size: int = 64,
        progress: bool = False,
        embedding_dtype: str = "float32",
    ) -> np.ndarray:
        """``[N, 1024]`` float32 (or the ``embedding_dtype``'s codes), one row per text in order.
        ``truncate`` cuts texts over 77 tokens instead of failing them (422 ``text_too_long``)."""
        items = as_item_list(texts, "texts", str)
        options = {"normalize": normalize, "truncate": truncate, "embedding_dtype": embedding_dtype}
        return self._embed("/v1/embed/text", "texts", items, str, options, batch_size, progress)

    def embed_images(
        self,
        images: Sequence[MediaInput],
        normalize: bool = False,
        batch_size: int = 16,
        progress: bool = False,
        embedding_dtype: str = "float32",
    ) -> np.ndarray:
        """``[N, 1024]`` float32 (or the ``embedding_dtype``'s codes) for image files (paths or
        encoded bytes); paths are read per batch."""
        items = as_item_list(images, "images", _MEDIA_TYPES)
        options = {"normalize": normalize, "embedding_dtype": embedding_dtype}
        return self._embed("/v1/embed/image", "images", items, encode_media, options, batch_size, progress)

    def embed_audio(
        self,
        clips: Sequence[MediaInput],
        normalize: bool = False,
        batch_size: int = 8,
        progress: bool = False,
        embedding_dtype: str = "float32",
    ) -> np.ndarray:
        """``[N, 1024]`` float32 (or the ``embedding_dtype``'s codes) for audio files (WAV, FLAC,
        OGG, MP3, M4A, WebM, video ... as paths or bytes); long recordings: ``embed_audio_windows``."""
        items = as_item_list(clips, "clips", _MEDIA_TYPES)
        options = {"normalize": normalize, "embedding_dtype": embedding_dtype}
        return self._embed("/v1/embed/audio", "audio", items, encode_media, options, batch_size, progress)

    def embed_audio_windows(
        self,
        clips: Sequence[MediaInput],
        window_s: float,
        hop_s: float | None = None,
        normalize: bool = False,
        batch_size: int = 8,
        embedding_dtype: str = "float32",
    ) -> tuple[np.ndarray, list[AudioWindow]]:
        """Each clip cut into windows of ``window_s`` (every ``hop_s``, default ``window_s``): a row
        per window and where it lies (``AudioWindow``), the clips' positions counted over all
        ``clips``. The service's rule: windows start at 0, hop, ...; the last reaches the clip's end."""
        items = as_item_list(clips, "clips", _MEDIA_TYPES)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        dtype, width = EMBEDDING_DTYPES[embedding_dtype]
        parts, spans = [np.zeros((0, width), dtype=dtype)], []
        options = {"window_s": window_s, "pool": "none", "normalize": normalize}
        for start in range(0, len(items), batch_size):
            body = {
                "audio": [encode_media(item) for item in items[start : start + batch_size]],
                "embedding_dtype": embedding_dtype,
                **options,
                **({"hop_s": hop_s} if hop_s is not None else {}),
            }
            try:
                answer = self._request("POST", "/v1/embed/audio", json=body).json()
            except AudioCLIPHTTPError as err:
                raise err.at_offset(start) from None
            parts.append(np.asarray(answer["embeddings"], dtype=dtype).reshape(-1, width))
            spans += [AudioWindow(w["item"] + start, w["start_s"], w["end_s"]) for w in answer["windows"]]
        return np.concatenate(parts), spans

    def timeline(
        self,
        query: MediaInput,
        candidates: Sequence[Mapping[str, Any]],
        window_s: float,
        hop_s: float | None = None,
        top_k: int | None = None,
    ) -> list[TimelineEntry]:
        """Zero-shot sound-event detection: the audio ``query`` cut into windows, each ranked
        against ``candidates`` (labels as ``{"text": ...}``, or images), in time order."""
        body: dict[str, Any] = {
            "query": rank_item({"audio": query}),
            "candidates": [rank_item(c) for c in as_item_list(candidates, "candidates", Mapping)],
            "window_s": window_s,
        }
        body.update({k: v for k, v in (("hop_s", hop_s), ("top_k", top_k)) if v is not None})
        timeline = self._request("POST", "/v1/rank", json=body).json()["timeline"]
        return [TimelineEntry(e["start_s"], e["end_s"], _ranked(e["results"])) for e in timeline]

    def rank(
        self,
        query: Mapping[str, Any],
        candidates: Sequence[Mapping[str, Any]],
        top_k: int | None = None,
    ) -> list[RankResult]:
        """Rank ``candidates`` against ``query``, best first (one request; no batching, since the
        probabilities are a softmax over all candidates). Each item is ``{"text": str}``,
        ``{"image": path or bytes}`` or ``{"audio": path or bytes}``."""
        body: dict[str, Any] = {
            "query": rank_item(query),
            "candidates": [rank_item(c) for c in as_item_list(candidates, "candidates", Mapping)],
        }
        if top_k is not None:
            body["top_k"] = top_k
        return _ranked(self._request("POST", "/v1/rank", json=body).json()["results"])

    # ------------------------------------------------------------------ status
    def models(self) -> dict[str, Any]:
        """``/v1/models``: model name, checkpoint sha256, weights kind, towers and their devices."""
        return self._request("GET", "/v1/models").json()

    def ready(self) -> bool:
        """Whether every tower has loaded (``/readyz`` is 200); a probe, so it never retries."""
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False

    # ------------------------------------------------------------------ internals
    def _embed(
        self,
        path: str,
        field: str,
        items: list,
        encode: Callable[[Any], Any],
        options: dict[str, Any],
        batch_size: int,
        progress: bool,
    ) -> np.ndarray:
        """Send ``items`` in requests of ``batch_size`` and stack the answers in input order."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        dtype_name = options["embedding_dtype"]
        if dtype_name not in EMBEDDING_DTYPES:
            raise ValueError(f"embedding_dtype must be one of {list(EMBEDDING_DTYPES)}, got {dtype_name!r}")
        dtype, width = EMBEDDING_DTYPES[dtype_name]
        parts = [np.zeros((0, width), dtype=dtype)]
        with tqdm(total=len(items), unit="item", desc=field, disable=not progress) as bar:
            for start in range(0, len(items), batch_size):
                chunk = items[start : start + batch_size]
                body = {field: [encode(item) for item in chunk], **options}
                try:
                    response = self._request("POST", path, json=body, headers={"accept": NPY})
                except AudioCLIPHTTPError as err:
                    raise err.at_offset(start) from None
                parts.append(parse_embeddings(response, len(chunk), dtype_name))
                bar.update(len(chunk))
        return np.concatenate(parts)

    def _count(self, retry: bool) -> None:
        with self._lock:
            self.requests += 1
            self.retries += int(retry)

    def _wait(self, attempt: int, retry_after: float | None) -> None:
        """Sleep before retry number ``attempt`` (1-based): the server's hint, else backoff; + jitter."""
        base = retry_after if retry_after is not None else self.backoff_s * 2 ** (attempt - 1)
        time.sleep(min(base, self.max_wait_s) + random.uniform(0, self.backoff_s))

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One call with bounded retries on 429/503 and connection errors; other errors raise at once."""
        retry_hint: float | None = None
        for attempt in range(self.max_retries + 1):
            if attempt:
                self._wait(attempt, retry_hint)
            self._count(retry=attempt > 0)
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.TransportError as err:
                if isinstance(err, httpx.ReadTimeout) or attempt == self.max_retries:
                    raise AudioCLIPConnectionError(f"{method} {path}: {type(err).__name__}: {err}") from err
                retry_hint = None
                continue
            if response.status_code < 400:
                return response
            if response.status_code not in RETRY_STATUSES or attempt == self.max_retries:
                raise AudioCLIPHTTPError.from_response(response)
            retry_hint = retry_after_seconds(response.headers.get("retry-after"))
        raise AssertionError("unreachable: the last attempt returns or raises")
