"""Serve's gRPC ingress (``audioclip.v1.AudioClip``) on a real local Ray cluster, with the generated
stubs as a client would use them: the same vectors as HTTP, the same error bodies under gRPC codes,
API keys as metadata, and no alarm in the replicas' logs for a client's mistake."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import ray
import soundfile as sf
from conftest import INPUTS, row_cosines
from media_files import tone_scene
from ray import serve
from serve_support import ALARMS, TEST_ARGS, LogWatch, free_port, wait_ready

from audioclip.errors import Reason
from audioclip_serve.protos import audioclip_pb2 as pb
from audioclip_serve.protos import audioclip_pb2_grpc as pb_grpc
from deployments.app import build_app
from deployments.errors import ERROR_STATUSES, ITEM_ERRORS, InternalError, Overloaded, Unavailable
from deployments.grpc_api import GRPC_CODES, refuse

ROOT = Path(__file__).resolve().parents[1]
SERVICER = "audioclip_serve.protos.audioclip_pb2_grpc.add_AudioClipServicer_to_server"
KEY = "grpc-s3cret"


def test_generated_modules_are_current():
    done = subprocess.run(
        [sys.executable, "scripts/gen_protos.py", "--check"], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr


def test_every_error_status_has_a_grpc_code():
    assert set(GRPC_CODES) == set(ERROR_STATUSES) | {InternalError.status}
    assert {status.code for status in ITEM_ERRORS.values()} <= set(GRPC_CODES)
    assert set(ITEM_ERRORS) == set(Reason)


class FakeContext:
    """What ``refuse`` writes on a Serve gRPC context (code, details, trailing metadata)."""

    def set_code(self, code):
        self.code = code

    def set_details(self, details):
        self.details = details

    def set_trailing_metadata(self, metadata):
        self.trailing = metadata


def test_overload_and_restart_keep_their_meaning():
    busy, restarting = FakeContext(), FakeContext()
    refuse(busy, Overloaded("at capacity", headers={"Retry-After": "2"}))
    refuse(restarting, Unavailable("a replica restarted"))
    assert busy.code == grpc.StatusCode.RESOURCE_EXHAUSTED and busy.trailing == [("retry-after", "2")]
    assert restarting.code == grpc.StatusCode.UNAVAILABLE
    assert json.loads(busy.details)["error"]["type"] == "overloaded"


def test_an_internal_error_is_internal_and_tells_nothing_more():
    ours = FakeContext()
    refuse(ours, InternalError())
    assert ours.code == grpc.StatusCode.INTERNAL
    assert json.loads(ours.details)["error"] == {
        "type": "internal_error",
        "message": "internal error; see the server log",
        "index": None,
    }


@pytest.fixture(scope="module")
def app():
    """The app with the gRPC ingress, and a second one (text only) that wants an API key."""
    ray.init("local", num_cpus=4, include_dashboard=False, log_to_driver=False, namespace="audioclip-grpc")
    port, grpc_port = free_port(), free_port()
    serve.start(
        http_options={"host": "127.0.0.1", "port": port},
        grpc_options={"port": grpc_port, "grpc_servicer_functions": [SERVICER]},
    )
    serve.run(build_app(TEST_ARGS), name="audioclip", route_prefix="/")
    keyed = {**TEST_ARGS, "model_name": "audioclip-keyed", "towers": ["text"], "router": {"api_keys": [KEY]}}
    serve.run(build_app(keyed), name="keyed", route_prefix="/keyed")
    url = f"http://127.0.0.1:{port}"
    wait_ready(url)
    wait_ready(f"{url}/keyed")
    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
    yield url, pb_grpc.AudioClipStub(channel)
    channel.close()
    serve.shutdown()
    ray.shutdown()


def vectors(reply: pb.EmbedReply) -> np.ndarray:
    assert reply.dim == 1024
    return np.frombuffer(reply.vectors, "<f4").reshape(reply.rows, reply.dim)


def refused(
    call, request, app_name: str = "audioclip", key: str | None = None
) -> tuple[grpc.StatusCode, dict]:
    metadata = [("application", app_name)] + ([("authorization", f"Bearer {key}")] if key else [])
    with pytest.raises(grpc.RpcError) as raised:
        call(request, metadata=metadata, timeout=120)
    return raised.value.code(), json.loads(raised.value.details())["error"]


def wav_bytes(samples: np.ndarray, rate: int) -> bytes:
    import io

    buffer = io.BytesIO()
    sf.write(buffer, samples.T, rate, format="WAV")
    return buffer.getvalue()


APP = [("application", "audioclip")]


def test_text_and_image_match_http(app):
    url, stub = app
    texts = ["a dog barking", "rain on a tin roof", "a rocket lifting off"]
    reply = stub.EmbedText(pb.TextRequest(texts=texts, normalize=True), metadata=APP, timeout=120)
    over_http = httpx.post(f"{url}/v1/embed/text", json={"texts": texts, "normalize": True}, timeout=120)
    assert reply.model == "audioclip-test" and reply.usage_tokens > len(texts)
    assert reply.checkpoint_sha256 == over_http.headers["x-checkpoint-sha256"]
    np.testing.assert_allclose(vectors(reply), np.asarray(over_http.json()["embeddings"]), rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(vectors(reply), axis=1), 1.0, atol=1e-5)

    photos = [(INPUTS / name).read_bytes() for name in ("rocket.jpg", "coffee.png")]
    reply = stub.EmbedImage(pb.ImageRequest(images=photos), metadata=APP, timeout=120)
    body = {"images": [base64.b64encode(p).decode() for p in photos]}
    over_http = httpx.post(f"{url}/v1/embed/image", json=body, timeout=120).json()["embeddings"]
    assert row_cosines(vectors(reply), np.asarray(over_http, dtype=np.float32)).min() > 0.99999


def test_windowed_audio_matches_http(app):
    url, stub = app
    wav = wav_bytes(tone_scene(44100, 7.0), 44100)
    request = pb.AudioRequest(clips=[wav], window_s=2.0, hop_s=1.5, pool="none")
    reply = stub.EmbedAudio(request, metadata=APP, timeout=120)
    over_http = httpx.post(
        f"{url}/v1/embed/audio?window_s=2&hop_s=1.5&pool=none",
        content=wav,
        headers={"content-type": "audio/wav"},
        timeout=120,
    ).json()
    assert [(w.item, w.start_s, w.end_s) for w in reply.windows] == [
        (w["item"], w["start_s"], w["end_s"]) for w in over_http["windows"]
    ]
    assert row_cosines(vectors(reply), np.asarray(over_http["embeddings"], dtype=np.float32)).min() > 0.99999
    pooled = stub.EmbedAudio(pb.AudioRequest(clips=[wav, wav], window_s=2.0), metadata=APP, timeout=120)
    assert pooled.rows == 2 and [w.windows for w in pooled.windows] == [4, 4]


def test_bad_input_is_refused_by_item_without_alarms(app):
    _, stub = app
    logs = LogWatch()
    jpeg = (INPUTS / "rocket.jpg").read_bytes()
    code, error = refused(stub.EmbedImage, pb.ImageRequest(images=[jpeg, b"not an image"]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and error["index"] == 1 and error["type"] == "undecodable"
    code, error = refused(stub.EmbedText, pb.TextRequest(texts=["fine", "word " * 100]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and (error["index"], error["type"]) == (
        1,
        "text_too_long",
    )
    assert stub.EmbedText(pb.TextRequest(texts=["word " * 100], truncate=True), metadata=APP).rows == 1
    code, error = refused(stub.EmbedText, pb.TextRequest(texts=["x"] * 65))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and error["type"] == "payload_too_large"
    wav = wav_bytes(tone_scene(44100, 1.0), 44100)
    code, error = refused(stub.EmbedAudio, pb.AudioRequest(clips=[wav], window_s=0.01))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and error["type"] == "bad_window"
    code, error = refused(stub.EmbedAudio, pb.AudioRequest(clips=[wav], pool="max"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "window_s" in error["message"]
    code, error = refused(stub.EmbedAudio, pb.AudioRequest(clips=[jpeg]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and (error["index"], error["type"]) == (0, "undecodable")
    big = pb.ImageRequest(images=[bytes(9 * 1024 * 1024)])  # over the test app's 8 MiB body limit
    code, error = refused(stub.EmbedImage, big)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and error["type"] == "payload_too_large"
    # the same stub still answers, and nothing above was logged as an alarm
    assert stub.EmbedText(pb.TextRequest(texts=["still fine"]), metadata=APP).rows == 1
    alarms = [line for line in logs.new_lines() if ALARMS.search(line)]
    assert not alarms, alarms[:5]


def test_api_key_as_metadata(app):
    _, stub = app
    request = pb.TextRequest(texts=["a key"])
    code, error = refused(stub.EmbedText, request, "keyed")
    assert code == grpc.StatusCode.UNAUTHENTICATED and error["type"] == "unauthorized"
    code, _ = refused(stub.EmbedText, request, "keyed", key="wrong")
    assert code == grpc.StatusCode.UNAUTHENTICATED
    metadata = [("application", "keyed"), ("authorization", f"Bearer {KEY}")]
    assert stub.EmbedText(request, metadata=metadata, timeout=120).model == "audioclip-keyed"
    code, error = refused(stub.EmbedImage, pb.ImageRequest(images=[b"x"]), "keyed", key=KEY)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and error["type"] == "tower_not_served"
