"""The HTTP bodies: one parser per body (pydantic), its errors, and the OpenAPI description."""

from __future__ import annotations

import json

import pytest

from audioclip.errors import InvalidInputError
from deployments.errors import BadRequest
from deployments.http_api import api
from deployments.schemas import OpenAIEmbeddingsRequest, RankRequest, TextRequest, parse_body


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b"{not json", "not valid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"text": ["typo"]}', "unknown field 'text'"),
        (b"{}", "missing field 'texts'"),
        (b'{"texts": "one string"}', "field 'texts'"),
        (b'{"texts": ["x"], "normalize": "yes"}', "field 'normalize'"),
    ],
)
def test_malformed_bodies_are_bad_requests_that_say_why(body, says):
    with pytest.raises(BadRequest, match=says):
        parse_body(TextRequest, body)


def test_a_wrong_item_is_that_items_error():
    with pytest.raises(InvalidInputError) as info:
        parse_body(TextRequest, b'{"texts": ["ok", "fine", 7, null]}')
    assert (info.value.index, info.value.reason) == (2, "not_a_string")  # the first by position
    with pytest.raises(InvalidInputError) as info:
        parse_body(OpenAIEmbeddingsRequest, b'{"model": "m", "input": ["a", 3]}')
    assert (info.value.index, info.value.reason) == (1, "not_a_string")
    bad_candidate = {"query": {"text": "q"}, "candidates": [{"text": "a"}, {"text": "b", "image": "c"}]}
    with pytest.raises(InvalidInputError) as info:
        parse_body(RankRequest, json.dumps(bad_candidate).encode())
    assert (info.value.index, info.value.reason) == (1, "bad_item")
    with pytest.raises(InvalidInputError) as info:
        parse_body(RankRequest, json.dumps({"query": {"video": "q"}, "candidates": []}).encode())
    assert (info.value.index, info.value.reason) == (None, "bad_item")
    ranked = parse_body(
        RankRequest, json.dumps({"query": {"audio": "QQ=="}, "candidates": [{"text": "a"}]}).encode()
    )
    assert ranked.query.item() == {"audio": "QQ=="} and ranked.candidates[0].item() == {"text": "a"}


def test_openapi_describes_every_body_content_type_and_error_status():
    spec = api.openapi()
    schemas = spec["components"]["schemas"]
    posts = {path: ops["post"] for path, ops in spec["paths"].items() if "post" in ops}
    assert set(posts) == {
        "/v1/embed/text",
        "/v1/embed/image",
        "/v1/embed/audio",
        "/v1/embeddings",
        "/v1/rank",
    }
    for path, op in posts.items():
        content = op["requestBody"]["content"]
        for media in content.values():
            ref = media["schema"].get("$ref")
            assert ref is None or ref.removeprefix("#/components/schemas/") in schemas, (path, ref)
        statuses = {int(code) for code in op["responses"]}
        assert {200, 400, 413, 415, 422, 503} <= statuses, (path, statuses)
        assert op["responses"]["422"]["content"]["application/json"]["schema"]["$ref"].endswith(
            "ErrorResponse"
        )
    assert set(posts["/v1/embed/image"]["requestBody"]["content"]) == {
        "application/json",
        "multipart/form-data",
        "image/*",
        "application/octet-stream",
        "application/x-npy",
    }
    assert set(posts["/v1/embed/audio"]["requestBody"]["content"]) >= {
        "audio/*",
        "video/*",
        "application/octet-stream",
        "application/x-npy",
    }
    assert schemas["TextRequest"]["properties"]["texts"]["items"]["type"] == "string"
    assert "query" in schemas["RankRequest"]["required"]
    assert {p["name"] for p in posts["/v1/embed/audio"]["parameters"]} == {
        "normalize",
        "embedding_dtype",
        "sample_rate",
        "window_s",
        "hop_s",
        "pool",
    }
    assert {"window_s", "hop_s", "pool"} <= set(schemas["AudioJSONRequest"]["properties"])
    assert {"window_s", "hop_s"} <= set(schemas["RankRequest"]["properties"])
    assert "timeline" in schemas["RankResponse"]["properties"]
    dtypes = schemas["TextRequest"]["properties"]["embedding_dtype"]["enum"]
    assert dtypes == ["float32", "float16", "int8", "uint8", "binary", "ubinary"]
