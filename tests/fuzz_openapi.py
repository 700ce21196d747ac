"""Generated requests at scale: schemathesis reads ``/openapi.json`` and makes bodies, queries and
content types that fit the schema of every operation and ones that break it; hypothesis adds
arbitrary bytes under every content type the routes know. Cases are generated first (seeded, so a
failure reproduces) and sent afterwards, so the sending can be concurrent."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import httpx
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

ROUTES = ("/v1/embed/text", "/v1/embed/image", "/v1/embed/audio", "/v1/embeddings", "/v1/rank")
CONTENT_TYPES = (
    "application/json",
    "application/x-npy",
    "application/octet-stream",
    "multipart/form-data; boundary=x",
    "image/jpeg",
    "image/heic",
    "audio/wav",
    "audio/webm;codecs=opus",
    "video/mp4",
    "text/plain",
    "",
)


def _collect(strategy: st.SearchStrategy, count: int) -> list:
    """Up to ``count`` examples of ``strategy``, reproducibly (a fixed seed, no example database)."""
    found: list = []

    @settings(
        max_examples=count,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def run(example) -> None:
        found.append(example)

    with contextlib.suppress(Unsatisfiable):  # no request breaks a schema without parameters
        run()
    return found


@dataclass(frozen=True)
class Answer:
    status: int
    content_type: str
    text: str


def _answer(status: int, headers: Mapping, text: str) -> Answer:
    """One shape for httpx's and schemathesis's responses (whose header values are lists)."""
    kind = next((value for key, value in headers.items() if key.lower() == "content-type"), "")
    return Answer(status, kind[0] if isinstance(kind, list) and kind else str(kind or ""), text)


@dataclass(frozen=True)
class Generated:
    name: str
    send: Callable[[str], Answer]  # base URL -> the answer


def schema_cases(openapi: dict, per_operation_and_mode: int) -> list[Generated]:
    """Schemathesis cases of every operation, schema-valid (positive) and schema-violating (negative)."""
    schema = schemathesis.openapi.from_dict(openapi)
    cases = []
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            for case in _collect(operation.as_strategy(generation_mode=mode), per_operation_and_mode):
                name = f"{operation.method.upper()} {operation.path} ({mode.value})"
                cases.append(Generated(name, lambda url, case=case: _call(case, url)))
    return cases


_PER_THREAD = threading.local()  # one connection pool per sending thread


def _session() -> requests.Session:
    if not hasattr(_PER_THREAD, "session"):
        _PER_THREAD.session = requests.Session()
    return _PER_THREAD.session


def _client() -> httpx.Client:
    if not hasattr(_PER_THREAD, "client"):
        _PER_THREAD.client = httpx.Client(timeout=120)
    return _PER_THREAD.client


def _call(case: schemathesis.Case, url: str) -> Answer:
    response = case.call(base_url=url, session=_session(), timeout=120)
    return _answer(response.status_code, response.headers, response.text)


def raw_cases(count: int) -> list[Generated]:
    """Arbitrary bytes (or JSON-looking text) under every content type, on every embedding route."""
    body = st.one_of(
        st.binary(max_size=4096),
        st.text(max_size=512).map(str.encode),
        st.recursive(
            st.none()
            | st.booleans()
            | st.floats(allow_nan=False, allow_infinity=False)
            | st.text(max_size=20),
            lambda inner: (
                st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
            ),
        ).map(lambda value: httpx.Request("POST", "http://x", json=value).content),
    )
    strategy = st.tuples(st.sampled_from(ROUTES), st.sampled_from(CONTENT_TYPES), body)
    cases = []
    for path, kind, content in _collect(strategy, count):
        headers = {"content-type": kind} if kind else {}

        def send(url: str, path=path, headers=headers, content=content) -> Answer:
            response = _client().post(f"{url}{path}", headers=headers, content=content)
            return _answer(response.status_code, response.headers, response.text)

        cases.append(Generated(f"POST {path} ({kind or 'no content type'}, {len(content)} bytes)", send))
    return cases
