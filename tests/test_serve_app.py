"""The served application on a real local Ray cluster, over real HTTP and real handles.

Served embeddings are compared with the in-process model on the same synthetic weights.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import io
import json
import os
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import ray
import soundfile as sf
import torch
from conftest import INPUTS, assert_matches, row_cosines
from media_files import encode_audio, encode_video, heic_photo, tone_scene
from PIL import Image
from ray import serve
from serve_support import ENV_KEY_VAR, TEST_ARGS, free_port, wait_ready

import audioclip
from audioclip.quantize import EMBEDDING_DTYPES, NUMPY_DTYPE, quantize
from audioclip.windows import fit_length
from deployments.app import build_app
from deployments.http_input import OCTETS

pytestmark = [pytest.mark.serve, pytest.mark.slow]


@pytest.fixture(scope="module")
def app_url():
    ray.init("local", num_cpus=4, include_dashboard=False, log_to_driver=False, namespace="audioclip-tests")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    started = time.monotonic()
    serve.run(build_app(TEST_ARGS), name="audioclip", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    wait_ready(url)
    print(f"\napp ready {time.monotonic() - started:.1f} s after serve.run")
    yield url
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def client(app_url):
    with httpx.Client(base_url=app_url, timeout=120) as c:
        yield c


def _embeddings(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["dim"] == 1024 and body["model"] == "audioclip-test"
    return np.asarray(body["embeddings"], dtype=np.float32)


# ---------------------------------------------------------------------------- parity
def test_text_over_http_equals_the_model(client, model):
    texts = ["a photo of an astronaut", "dog", "", "The sound of a Thunderstorm &amp; heavy RAIN!!"]
    served = _embeddings(client.post("/v1/embed/text", json={"texts": texts}))
    assert_matches(served, model.encode_text(texts), 0.99999)
    normalized = _embeddings(client.post("/v1/embed/text", json={"texts": texts, "normalize": True}))
    assert np.allclose(np.linalg.norm(normalized, axis=1), 1.0, atol=1e-5)


def test_npy_response(client, model):
    r = client.post("/v1/embed/text", json={"texts": ["a dog"]}, headers={"accept": "application/x-npy"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-npy"
    array = np.load(io.BytesIO(r.content))
    assert array.dtype == np.float32 and array.shape == (1, 1024)
    assert_matches(array, model.encode_text(["a dog"]), 0.99999)


def test_empty_list_gives_empty_result(client):
    for path, field in (
        ("/v1/embed/text", "texts"),
        ("/v1/embed/image", "images"),
        ("/v1/embed/audio", "audio"),
    ):
        r = client.post(path, json={field: []})
        assert r.status_code == 200 and r.json()["embeddings"] == [], path


@pytest.mark.parametrize("name", ["rocket.jpg", "coffee.png"])
def test_image_raw_body_equals_the_model(client, model, name):
    data = (INPUTS / name).read_bytes()
    kind = "image/jpeg" if name.endswith("jpg") else "image/png"
    served = _embeddings(client.post("/v1/embed/image", content=data, headers={"content-type": kind}))
    assert_matches(served, model.encode_image(audioclip.preprocess_image(data)[None]), 0.99999)


def test_image_json_multipart_and_npy(client, model):
    files = [(INPUTS / n).read_bytes() for n in ("rocket.jpg", "coffee.png")]
    local = model.encode_image(torch.stack([audioclip.preprocess_image(f) for f in files]))
    as_b64 = [
        base64.b64encode(files[0]).decode(),
        "data:image/png;base64," + base64.b64encode(files[1]).decode(),
    ]
    assert_matches(_embeddings(client.post("/v1/embed/image", json={"images": as_b64})), local, 0.99999)
    multipart = [("file", ("a.jpg", files[0], "image/jpeg")), ("file", ("b.png", files[1], "image/png"))]
    assert_matches(_embeddings(client.post("/v1/embed/image", files=multipart)), local, 0.99999)
    pixels = np.asarray(Image.open(io.BytesIO(files[0])).convert("RGB"))
    buf = io.BytesIO()
    np.save(buf, pixels)
    served = _embeddings(
        client.post("/v1/embed/image", content=buf.getvalue(), headers={"content-type": "application/x-npy"})
    )
    assert_matches(served, local[:1], 0.99999)


def test_image_preprocess_false_takes_normalised_pixels(client, model, golden):
    buf = io.BytesIO()
    np.save(buf, golden["image_input"])
    r = client.post(
        "/v1/embed/image?preprocess=false",
        content=buf.getvalue(),
        headers={"content-type": "application/x-npy"},
    )
    assert_matches(_embeddings(r), model.encode_image(torch.from_numpy(golden["image_input"])), 0.99999)


@pytest.mark.parametrize("name", ["speech_dog_44k.wav", "speech_rain_22k.wav", "noise_stereo_44k.wav"])
def test_audio_equals_the_model(client, model, name):
    data = (INPUTS / name).read_bytes()
    served = _embeddings(client.post("/v1/embed/audio", content=data, headers={"content-type": "audio/wav"}))
    local = model.encode_audio(torch.from_numpy(audioclip.load_audio(data))[None])
    assert_matches(served, local, 0.9999)


def test_audio_json_and_npy(client, model):
    data = (INPUTS / "chord_44k.wav").read_bytes()
    local = model.encode_audio(torch.from_numpy(audioclip.load_audio(data))[None])
    served = _embeddings(client.post("/v1/embed/audio", json={"audio": [base64.b64encode(data).decode()]}))
    assert_matches(served, local, 0.9999)
    samples, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    buf = io.BytesIO()
    np.save(buf, samples.T.copy())
    r = client.post(
        f"/v1/embed/audio?sample_rate={rate}",
        content=buf.getvalue(),
        headers={"content-type": "application/x-npy"},
    )
    assert_matches(_embeddings(r), local, 0.9999)


# ---------------------------------------------------------------------------- handles
@serve.deployment(ray_actor_options={"num_cpus": 0})
class Caller:
    """Another team's deployment, in its own application, using ours through an app handle."""

    async def __call__(self, texts: list[str]) -> np.ndarray:
        return await serve.get_app_handle("audioclip").embed_text.remote(texts)

    async def bad_text(self) -> dict:
        try:
            await serve.get_app_handle("audioclip").embed_text.remote(["fine", "word " * 100])
        except audioclip.InvalidInputError as err:
            return {"type": type(err).__name__, "index": err.index, "reason": err.reason}
        return {}


def test_handle_from_another_application(app_url, model):
    caller = serve.run(Caller.bind(), name="caller", route_prefix=None)
    texts = ["a cat", "an engine starting"]
    served = caller.remote(texts).result(timeout_s=120)
    assert isinstance(served, np.ndarray) and served.dtype == np.float32
    assert_matches(served, model.encode_text(texts), 0.99999)
    error = caller.bad_text.remote().result(timeout_s=120)
    assert error["index"] == 1 and error["reason"] == "text_too_long"
    serve.delete("caller")


def test_handle_api_for_images_and_audio(app_url, model):
    handle = serve.get_app_handle("audioclip")
    image = (INPUTS / "rocket.jpg").read_bytes()
    served = handle.embed_image.remote([image]).result(timeout_s=120)
    assert_matches(served, model.encode_image(audioclip.preprocess_image(image)[None]), 0.99999)
    samples, rate = sf.read(INPUTS / "sweep_48k.wav", dtype="float32", always_2d=True)
    served = handle.embed_audio.remote([(samples.T.copy(), rate)]).result(timeout_s=120)
    local = model.encode_audio(torch.from_numpy(audioclip.load_audio(samples.T.copy(), rate))[None])
    assert_matches(served, local, 0.9999)
    tower = serve.get_deployment_handle("TextEncoder", "audioclip")
    direct = tower.embed.remote(["a cat"], {}).result(timeout_s=120)
    assert_matches(direct, model.encode_text(["a cat"]), 0.99999)
    ranked = handle.rank.remote({"image": image}, [{"text": "a cat"}, {"text": "a rocket"}]).result(
        timeout_s=120
    )
    assert (
        sorted(r["index"] for r in ranked) == [0, 1] and abs(sum(r["probability"] for r in ranked) - 1) < 1e-5
    )


# ---------------------------------------------------------------------------- batching
def test_concurrent_requests_batch_and_stay_isolated(app_url, model):
    texts = [f"request number {i} about a {w}" for i, w in enumerate(["dog", "cat", "car", "bird"] * 8)]
    texts[13] = "word " * 100  # too long: must fail alone
    tower = serve.get_deployment_handle("TextEncoder", "audioclip")
    before = len(tower.stats.remote().result(timeout_s=60)["batch_sizes"])

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=app_url, timeout=120) as c:
            return await asyncio.gather(*(c.post("/v1/embed/text", json={"texts": [t]}) for t in texts))

    responses = asyncio.run(run())
    good = [i for i in range(32) if i != 13]
    local = model.encode_text([texts[i] for i in good]).numpy()
    for row, i in enumerate(good):
        served = _embeddings(responses[i])
        assert row_cosines(served, local[row : row + 1]).min() >= 0.99999, (
            f"request {i} got another embedding"
        )
    bad = responses[13]
    assert bad.status_code == 422 and bad.json()["error"]["type"] == "text_too_long"
    sizes = tower.stats.remote().result(timeout_s=60)["batch_sizes"][before:]
    print(f"\nbatch sizes formed for 32 concurrent requests: {sizes}")
    assert sum(sizes) >= 31 and max(sizes) > 1, sizes


# ---------------------------------------------------------------------------- errors
def _error(r: httpx.Response, status: int, index: int | None = None) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"type", "message", "index"} and error["index"] == index
    assert "Traceback" not in error["message"] and "/work" not in error["message"]
    return error


def test_400_malformed_bodies(client):
    _error(
        client.post("/v1/embed/text", content=b"{not json", headers={"content-type": "application/json"}), 400
    )
    _error(client.post("/v1/embed/text", json={"text": ["typo in field"]}), 400)
    _error(client.post("/v1/embed/text", json={"texts": "not a list"}), 400)
    _error(client.post("/v1/embed/text", json={"texts": ["x"], "normalize": "yes"}), 400)
    _error(client.post("/v1/embed/text", json=[1, 2]), 400)
    deep = b"[" * 100_000 + b"]" * 100_000
    _error(client.post("/v1/embed/text", content=deep, headers={"content-type": "application/json"}), 400)
    _error(
        client.post("/v1/embed/audio", content=b"\x93NUMPY", headers={"content-type": "application/x-npy"}),
        400,
    )


def test_413_limits(client):
    _error(client.post("/v1/embed/text", json={"texts": ["a"] * 65}), 413)
    _error(
        client.post(
            "/v1/embed/image", content=b"0" * (9 * 1024 * 1024), headers={"content-type": "image/png"}
        ),
        413,
    )
    big = io.BytesIO()
    Image.new("L", (5000, 5000)).save(big, format="PNG")  # 25 MP, a few KB on the wire
    _error(
        client.post("/v1/embed/image", content=big.getvalue(), headers={"content-type": "image/png"}), 413, 0
    )
    long_audio = io.BytesIO()
    sf.write(long_audio, np.zeros(61 * 8000, dtype=np.int16), 8000, format="FLAC")
    r = client.post("/v1/embed/audio", content=long_audio.getvalue(), headers={"content-type": "audio/flac"})
    _error(r, 413, 0)


def test_415_and_422(client):
    _error(client.post("/v1/embed/text", content=b"a dog", headers={"content-type": "text/plain"}), 415)
    _error(client.post("/v1/embed/image", content=b"x", headers={"content-type": "application/pdf"}), 415)
    error = _error(client.post("/v1/embed/text", json={"texts": ["ok", "word " * 100]}), 422, 1)
    assert error["type"] == "text_too_long"
    truncated = client.post("/v1/embed/text", json={"texts": ["ok", "word " * 100], "truncate": True})
    assert truncated.status_code == 200
    png = (INPUTS / "coffee.png").read_bytes()
    images = [base64.b64encode(png).decode(), base64.b64encode(png[: len(png) // 3]).decode()]
    assert _error(client.post("/v1/embed/image", json={"images": images}), 422, 1)["type"] == "undecodable"
    assert _error(client.post("/v1/embed/image", json={"images": ["@@not base64@@"]}), 422, 0)
    _error(client.post("/v1/embed/image", json={"images": ["https://example.com/cat.jpg"]}), 422, 0)
    _error(
        client.post("/v1/embed/audio", content=b"RIFF....WAVEfmt ", headers={"content-type": "audio/wav"}),
        422,
        0,
    )
    _error(client.post("/v1/embed/text", json={"texts": ["ok", 7]}), 422, 1)


def test_readiness_counts_replicas_as_serve_status_does(client):
    """The routers' replica count (the controller's details read unparsed, ~100x less CPU than
    serve.status()) agrees with serve.status() on every deployment, and finds none where none is."""
    from deployments.readiness import _running_from_status, running_replicas

    names = {name: name for name in serve.status().applications["audioclip"].deployments}
    counted = running_replicas("audioclip", names)
    assert counted == _running_from_status("audioclip", names)
    assert set(counted) == set(names) and min(counted.values()) >= 1
    assert running_replicas("audioclip", {"x": "NoSuchDeployment"}) == {"x": 0}
    assert running_replicas("no-such-app", names) == dict.fromkeys(names, 0)


def test_health_readiness_and_models(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200
    info = client.get("/v1/models").json()
    assert info["weights"] == "synthetic" and len(info["checkpoint_sha256"]) == 64 and info["dim"] == 1024
    assert set(info["towers"]) == {"image", "text", "audio"}
    assert all(t["device"] == "cpu" and t["replicas"] == 1 for t in info["towers"].values())
    assert {t["checkpoint_sha256"] for t in info["towers"].values()} == {info["checkpoint_sha256"]}
    _error(client.get("/v1/nothing-here"), 404)


# ---------------------------------------------------------------------------- weights
def test_replicas_share_weight_memory(app_url):
    stats = serve.get_deployment_handle("TextEncoder", "audioclip").stats.remote().result(timeout_s=60)
    mapping = stats["weights_mapping"]
    print(f"\ntext tower memory: {stats['memory_mib']}, weights mapping: {mapping}")
    # The token embedding (96 MiB) lives in a shared object-store mapping, not in private memory.
    assert (
        mapping["shared_clean_mib"] + mapping["shared_dirty_mib"] > 0
        or mapping["pss_mib"] < mapping["rss_mib"]
    )
    assert mapping["path"] != "[anonymous]"


def _kill_replica(deployment: str) -> int:
    """Kill the (single) replica of ``deployment`` the way a crash would; returns its pid."""
    old_pid = serve.get_deployment_handle(deployment, "audioclip").stats.remote().result(timeout_s=60)["pid"]
    name = next(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if deployment in a["name"])
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    return old_pid


def _wait_replaced(deployment: str, old_pid: int, timeout_s: float = 180) -> None:
    """Until a replica with another pid answers (Serve replaced the killed one)."""
    tower = serve.get_deployment_handle(deployment, "audioclip")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if tower.stats.remote().result(timeout_s=30)["pid"] != old_pid:
                return
        except Exception:  # noqa: BLE001 - the replica is being replaced
            pass
        time.sleep(1)
    pytest.fail(f"the killed {deployment} replica was not replaced in {timeout_s} s")


def test_killed_tower_replica_reloads_from_the_store(client, model):
    _wait_replaced("TextEncoder", _kill_replica("TextEncoder"))
    wait = time.monotonic()
    while client.get("/readyz").status_code != 200 and time.monotonic() - wait < 60:
        time.sleep(0.5)
    served = _embeddings(client.post("/v1/embed/text", json={"texts": ["after the restart"]}))
    assert_matches(served, model.encode_text(["after the restart"]), 0.99999)


# ---------------------------------------------------------------------------- live config
def test_batch_settings_change_live_without_restart(app_url):
    """``reconfigure`` is what Serve calls when only ``user_config`` changes (``serve deploy`` of an
    edited config); it must retune the batcher in the running replica."""
    tower = serve.get_deployment_handle("AudioEncoder", "audioclip")
    before = tower.describe.remote().result(timeout_s=60)
    assert before["channels_last"] and before["batchnorm_folded"]  # the audio tower's CPU defaults
    tower.reconfigure.remote({"max_batch_size": 3, "batch_wait_timeout_s": 0.07}).result(timeout_s=60)
    after = tower.describe.remote().result(timeout_s=60)
    assert (after["max_batch_size"], after["batch_wait_timeout_s"]) == (3, 0.07)
    assert after["pid"] == before["pid"]
    original = {k: TEST_ARGS["audio"][k] for k in ("max_batch_size", "batch_wait_timeout_s")}
    tower.reconfigure.remote(original).result(timeout_s=60)
    assert tower.describe.remote().result(timeout_s=60)["max_batch_size"] == original["max_batch_size"]


# ---------------------------------------------------------------------------- overload
@pytest.fixture(scope="module")
def guarded_url(app_url):
    """A second, text-only application with an API key and a tiny admission limit."""
    args = {
        **TEST_ARGS,
        "model_name": "audioclip-guarded",
        "towers": ["text"],
        "text": {"num_cpus": 0, "max_batch_size": 4, "batch_wait_timeout_s": 0.5},
        "router": {"num_cpus": 0, "max_inflight": 2, "api_keys": ["s3cret-key"], "api_key_env": ENV_KEY_VAR},
    }
    serve.run(build_app(args), name="guarded", route_prefix="/guarded")
    url = f"{app_url}/guarded"
    wait_ready(url)
    yield url
    serve.delete("guarded")


AUTH = {"authorization": "Bearer s3cret-key"}


def test_overload_gets_503_with_retry_after_and_recovers(guarded_url):
    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=guarded_url, timeout=120, headers=AUTH) as c:
            calls = [c.post("/v1/embed/text", json={"texts": [f"text {i}"]}) for i in range(16)]
            return await asyncio.gather(*calls)

    responses = asyncio.run(burst())
    statuses = sorted(r.status_code for r in responses)
    print(f"\nstatuses of a 16-request burst at max_inflight=2: {statuses}")
    rejected = [r for r in responses if r.status_code == 503]
    assert rejected and all(r.status_code in (200, 503) for r in responses), statuses
    for r in rejected:
        assert r.headers["retry-after"] == "1" and r.json()["error"]["type"] == "overloaded"
    after = httpx.post(f"{guarded_url}/v1/embed/text", json={"texts": ["calm"]}, headers=AUTH, timeout=60)
    assert after.status_code == 200


def test_api_key_authentication(guarded_url):
    assert httpx.get(f"{guarded_url}/readyz", timeout=60).status_code == 200  # probes stay open
    assert httpx.get(f"{guarded_url}/healthz", timeout=60).status_code == 200
    body = {"texts": ["hello"]}
    assert httpx.post(f"{guarded_url}/v1/embed/text", json=body, timeout=60).status_code == 401
    wrong = httpx.post(
        f"{guarded_url}/v1/embed/text", json=body, headers={"authorization": "Bearer nope"}, timeout=60
    )
    assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "unauthorized"
    assert "s3cret" not in wrong.text
    assert httpx.post(f"{guarded_url}/v1/embed/text", json=body, headers=AUTH, timeout=60).status_code == 200
    assert httpx.get(f"{guarded_url}/v1/models", timeout=60).status_code == 401
    # the key named by api_key_env, read from the router replica's environment
    from_env = {"authorization": f"Bearer {os.environ[ENV_KEY_VAR]}"}
    assert (
        httpx.post(f"{guarded_url}/v1/embed/text", json=body, headers=from_env, timeout=60).status_code == 200
    )


# ---------------------------------------------------------------------------- OpenAI API and ranking
def _from_b64(value: str | list) -> np.ndarray:
    return (
        np.frombuffer(base64.b64decode(value), dtype="<f4") if isinstance(value, str) else np.asarray(value)
    )


def test_openai_client_text_image_audio(app_url, model):
    from openai import OpenAI

    client = OpenAI(base_url=f"{app_url}/v1", api_key="unused", max_retries=0)
    texts = ["a dog barking", "a rocket launch"]
    result = client.embeddings.create(model="audioclip-test", input=texts)
    served = np.asarray([d.embedding for d in result.data], dtype=np.float32)
    assert [d.index for d in result.data] == [0, 1] and result.usage.prompt_tokens > 4
    assert np.allclose(np.linalg.norm(served, axis=1), 1.0, atol=1e-5)
    assert_matches(served, model.encode_text(texts), 0.99999)
    # base64: little-endian float32 bytes, as OpenAI sends them
    as_b64 = client.embeddings.create(model="audioclip-test", input="a dog barking", encoding_format="base64")
    assert np.allclose(_from_b64(as_b64.data[0].embedding), served[0], atol=1e-6)
    image = (INPUTS / "rocket.jpg").read_bytes()
    uri = "data:image/jpeg;base64," + base64.b64encode(image).decode()
    result = client.embeddings.create(model="audioclip-test", input=[uri], extra_body={"modality": "image"})
    assert_matches(
        np.asarray([result.data[0].embedding], dtype=np.float32),  # JSON floats, as the text ones above
        model.encode_image(audioclip.preprocess_image(image)[None]),
        0.99999,
    )
    wav = (INPUTS / "chord_44k.wav").read_bytes()
    result = client.embeddings.create(
        model="audioclip-test",
        input=[base64.b64encode(wav).decode()],
        extra_body={"modality": "audio"},
        encoding_format="base64",
    )
    local = model.encode_audio(torch.from_numpy(audioclip.load_audio(wav))[None])
    assert_matches(_from_b64(result.data[0].embedding)[None], local, 0.9999)
    from openai import NotFoundError

    with pytest.raises(NotFoundError):
        client.embeddings.create(model="text-embedding-3-small", input="x")


# ---------------------------------------------------------------------------- compact vectors
def test_embedding_dtypes_on_every_native_answer(client):
    """Each dtype's codes equal the library's rule applied to the served float32 rows, in JSON and
    in npy, for text (body field) and image (query, and a JSON field overriding it)."""
    texts = ["a dog barking", "rain on a tin roof"]
    base = _embeddings(client.post("/v1/embed/text", json={"texts": texts, "normalize": True}))
    image = (INPUTS / "rocket.jpg").read_bytes()
    image_base = _embeddings(
        client.post("/v1/embed/image", content=image, headers={"content-type": "image/jpeg"})
    )
    for dtype in EMBEDDING_DTYPES:
        expected = quantize(base, dtype)
        body = {"texts": texts, "normalize": True, "embedding_dtype": dtype}
        r = client.post("/v1/embed/text", json=body)
        assert r.status_code == 200 and r.json()["embedding_dtype"] == dtype and r.json()["dim"] == 1024
        codes = np.asarray(r.json()["embeddings"], dtype=NUMPY_DTYPE[dtype])
        close = 1 if dtype == "float16" else 0  # float16 JSON numbers round-trip through float32
        assert codes.shape == expected.shape and _code_distance(codes, expected, dtype) <= close
        npy = client.post("/v1/embed/text", json=body, headers={"accept": "application/x-npy"})
        array = np.load(io.BytesIO(npy.content))
        assert array.dtype == NUMPY_DTYPE[dtype] and _code_distance(array, expected, dtype) <= close
        raw = client.post(
            f"/v1/embed/image?embedding_dtype={dtype}", content=image, headers={"content-type": "image/jpeg"}
        )
        assert (
            _code_distance(np.asarray(raw.json()["embeddings"]), quantize(image_base, dtype), dtype) <= close
        )
    data_uri = "data:image/jpeg;base64," + base64.b64encode(image).decode()
    overridden = client.post(
        "/v1/embed/image?embedding_dtype=int8", json={"images": [data_uri], "embedding_dtype": "ubinary"}
    )
    assert (
        overridden.json()["embedding_dtype"] == "ubinary" and len(overridden.json()["embeddings"][0]) == 128
    )
    kept = client.post("/v1/embed/image?embedding_dtype=int8", json={"images": [data_uri]})
    assert kept.json()["embedding_dtype"] == "int8"  # the query's choice where the body makes none


def _code_distance(a: np.ndarray, b: np.ndarray, dtype: str) -> float:
    """Largest difference of two code arrays (float16: in units of the last place)."""
    if dtype == "float16":
        return float(
            np.abs(a.astype(np.float16).view(np.int16).astype(int) - b.view(np.int16).astype(int)).max()
        )
    if dtype == "float32":
        return float(np.abs(a.astype(np.float32) - b).max() > 1e-6)
    return float(np.abs(a.astype(int) - b.astype(int)).max())


def test_openai_embedding_dtype_and_dimensions(app_url):
    from openai import BadRequestError, OpenAI

    client = OpenAI(base_url=f"{app_url}/v1", api_key="unused", max_retries=0)
    texts = ["a dog barking", "a rocket launch"]
    floats = np.asarray(
        [
            d.embedding
            for d in client.embeddings.create(
                model="audioclip-test", input=texts, encoding_format="float"
            ).data
        ],
        dtype=np.float32,
    )
    as_ints = client.embeddings.create(
        model="audioclip-test", input=texts, encoding_format="float", extra_body={"embedding_dtype": "int8"}
    )
    assert np.array_equal(np.asarray([d.embedding for d in as_ints.data]), quantize(floats, "int8"))
    packed = client.embeddings.create(
        model="audioclip-test",
        input=texts,
        encoding_format="base64",
        extra_body={"embedding_dtype": "ubinary"},
    )
    rows = np.stack([np.frombuffer(base64.b64decode(d.embedding), dtype=np.uint8) for d in packed.data])
    assert np.array_equal(rows, quantize(floats, "ubinary"))  # 128 raw bytes per vector
    with pytest.raises(BadRequestError) as refused:
        client.embeddings.create(model="audioclip-test", input="x", dimensions=512)
    assert refused.value.status_code == 400 and "not trained for truncated vectors" in str(refused.value)
    bad = httpx.post(f"{app_url}/v1/embed/text", json={"texts": ["x"], "embedding_dtype": "int4"}, timeout=60)
    assert bad.status_code == 400 and "embedding_dtype" in bad.json()["error"]["message"]


def test_models_in_openai_list_shape(app_url):
    from openai import OpenAI

    models = OpenAI(base_url=f"{app_url}/v1", api_key="unused").models.list()
    assert [m.id for m in models.data] == ["audioclip-test"]


def test_rank_sound_against_labels_and_images(client, model):
    labels = ["a dog barking", "rain on a roof", "a church bell"]
    wav = (INPUTS / "speech_dog_44k.wav").read_bytes()
    body = {"query": {"audio": base64.b64encode(wav).decode()}, "candidates": [{"text": t} for t in labels]}
    r = client.post("/v1/rank", json=body)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    audio = model.encode_audio(torch.from_numpy(audioclip.load_audio(wav))[None])
    text = model.encode_text(labels)
    cos = torch.nn.functional.cosine_similarity(audio, text).numpy()
    scale = model.logit_scales.audio_text
    prob = torch.softmax(torch.from_numpy(cos) * scale, 0).numpy()
    assert [x["index"] for x in results] == list(np.argsort(-cos))
    for x in results:
        assert abs(x["cosine"] - cos[x["index"]]) < 1e-4 and abs(x["probability"] - prob[x["index"]]) < 1e-3
    images = [base64.b64encode((INPUTS / n).read_bytes()).decode() for n in ("rocket.jpg", "coffee.png")]
    body = {
        "query": {"audio": base64.b64encode(wav).decode()},
        "candidates": [{"image": i} for i in images],
        "top_k": 1,
    }
    assert len(client.post("/v1/rank", json=body).json()["results"]) == 1
    bad = {"query": {"text": "x"}, "candidates": [{"text": "ok"}, {"video": "no"}]}
    _error(client.post("/v1/rank", json=bad), 422, 1)


# ---------------------------------------------------------------------------- fuzzing
def test_fuzzed_requests_never_get_a_5xx(client):
    from fuzz_cases import random_cases, structural_cases

    tried, statuses = 0, collections.Counter()
    cases = [*structural_cases(INPUTS), *random_cases(INPUTS, count=240)]
    for n, (name, method, path, headers, body, must_fail) in enumerate(cases):
        r = client.request(method, path, headers=headers, content=body)
        tried += 1
        statuses[r.status_code] += 1
        assert r.status_code < 500, f"{name}: {r.status_code} {r.text[:300]}"
        if r.status_code != 200:
            error = r.json()["error"]
            assert error["message"] and "Traceback" not in error["message"], name
        if must_fail:
            assert 400 <= r.status_code < 500, f"{name}: got {r.status_code}"
        if n % 50 == 0:
            assert client.get("/readyz").status_code == 200, f"not ready after {name}"
    print(f"\nfuzzed {tried} requests: statuses {dict(sorted(statuses.items()))}")
    assert client.get("/readyz").status_code == 200


def test_bad_images_and_clips_among_concurrent_good_ones(app_url, model):
    png = (INPUTS / "coffee.png").read_bytes()
    jpeg = (INPUTS / "rocket.jpg").read_bytes()
    wav = (INPUTS / "chord_44k.wav").read_bytes()
    requests = []  # (path, body, content type, expected index in the local results or None)
    for i in range(32):
        if i % 8 == 3:
            requests.append(("/v1/embed/image", png[: len(png) // 4], "image/png", None))
        elif i % 8 == 5:
            requests.append(("/v1/embed/audio", b"RIFF\x00\x00\x00\x00WAVEjunk", "audio/wav", None))
        elif i % 2:
            requests.append(("/v1/embed/audio", wav, "audio/wav", "audio"))
        else:
            requests.append(
                (
                    "/v1/embed/image",
                    jpeg if i % 4 else png,
                    "image/jpeg" if i % 4 else "image/png",
                    "jpeg" if i % 4 else "png",
                )
            )
    expected = {
        "jpeg": model.encode_image(audioclip.preprocess_image(jpeg)[None]).numpy(),
        "png": model.encode_image(audioclip.preprocess_image(png)[None]).numpy(),
        "audio": model.encode_audio(torch.from_numpy(audioclip.load_audio(wav))[None]).numpy(),
    }

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=app_url, timeout=120) as c:
            return await asyncio.gather(
                *(c.post(p, content=b, headers={"content-type": t}) for p, b, t, _ in requests)
            )

    for (path, _, _, key), r in zip(requests, asyncio.run(run()), strict=True):
        if key is None:
            assert r.status_code == 422 and r.json()["error"]["index"] == 0, (path, r.text)
        else:
            min_cos = 0.9999 if key == "audio" else 0.99999
            assert row_cosines(_embeddings(r), expected[key]).min() >= min_cos, (path, key)


def test_client_disconnects_do_not_leak(app_url, client):
    async def impatient() -> int:
        async with httpx.AsyncClient(base_url=app_url, timeout=0.05) as c:
            calls = [
                c.post(
                    "/v1/embed/audio",
                    content=(INPUTS / "chord_44k.wav").read_bytes(),
                    headers={"content-type": "audio/wav"},
                )
                for _ in range(12)
            ]
            results = await asyncio.gather(*calls, return_exceptions=True)
            return sum(isinstance(r, httpx.TimeoutException) for r in results)

    timed_out = asyncio.run(impatient())
    assert timed_out > 0
    router = serve.get_app_handle("audioclip")
    deadline = time.monotonic() + 60
    while router.stats.remote().result(timeout_s=30)["inflight"] != 0 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert router.stats.remote().result(timeout_s=30)["inflight"] == 0
    assert client.post("/v1/embed/text", json={"texts": ["still fine"]}).status_code == 200


# ---------------------------------------------------------------------------- faults
def test_tower_killed_under_load_recovers_and_never_mixes_answers(app_url, client, model):
    texts = [f"steady load text number {i}" for i in range(400)]
    expected = model.encode_text(texts[:120]).numpy()
    outcome = collections.Counter()
    ready_states = collections.Counter()

    async def load(stop_at: float) -> None:
        async with httpx.AsyncClient(base_url=app_url, timeout=60) as c:

            async def worker(w: int) -> None:
                i = w
                while time.monotonic() < stop_at:
                    k = i % 120
                    try:
                        r = await c.post("/v1/embed/text", json={"texts": [texts[k]]})
                    except httpx.HTTPError:
                        outcome["transport_error"] += 1
                        continue
                    finally:
                        i += 4
                    if r.status_code == 200:
                        got = np.asarray(r.json()["embeddings"], dtype=np.float32)
                        assert row_cosines(got, expected[k : k + 1]).min() >= 0.99999, (
                            "another request's answer"
                        )
                        outcome["ok"] += 1
                    else:
                        outcome[r.status_code] += 1

            async def probe() -> None:
                while time.monotonic() < stop_at:
                    ready_states[(await c.get("/readyz")).status_code] += 1
                    await asyncio.sleep(0.25)

            await asyncio.gather(*(worker(w) for w in range(4)), probe())

    def kill_text_tower() -> None:
        time.sleep(3)
        _kill_replica("TextEncoder")

    import threading

    killer = threading.Thread(target=kill_text_tower)
    killer.start()
    asyncio.run(load(time.monotonic() + 25))
    killer.join()
    failed = sum(v for k, v in outcome.items() if k != "ok")
    print(f"\nkill under load: {dict(outcome)}; readyz answers {dict(ready_states)}")
    assert outcome["ok"] > 0 and failed <= outcome["ok"]
    assert set(outcome) <= {"ok", 503}, "a dying replica must give 503 + Retry-After, not a 500"
    wait_ready(app_url, timeout_s=120)


def test_weight_store_killed_towers_keep_serving_and_reload(app_url, client, model):
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
    store = next(n for n in names if "WeightStore" in n)
    ray.kill(ray.get_actor(store, namespace="serve"), no_restart=True)
    served = _embeddings(client.post("/v1/embed/text", json={"texts": ["store is down"]}))
    assert_matches(served, model.encode_text(["store is down"]), 0.99999)
    # A new tower replica started now must get its weights from the restarted store.
    _wait_replaced("ImageEncoder", _kill_replica("ImageEncoder"))
    wait_ready(app_url, timeout_s=120)
    jpeg = (INPUTS / "rocket.jpg").read_bytes()
    served = _embeddings(client.post("/v1/embed/image", content=jpeg, headers={"content-type": "image/jpeg"}))
    assert_matches(served, model.encode_image(audioclip.preprocess_image(jpeg)[None]), 0.99999)


# ---------------------------------------------------------------------------- observability
def test_timing_headers_and_request_id(client):
    r = client.post(
        "/v1/embed/image",
        content=(INPUTS / "rocket.jpg").read_bytes(),
        headers={"content-type": "image/jpeg", "x-request-id": "trace-me-42"},
    )
    assert r.status_code == 200
    assert r.headers["x-request-id"] == "trace-me-42"
    timings = {k: float(r.headers[f"x-{k}-time"]) for k in ("total", "preprocess", "queue", "inference")}
    assert timings["inference"] > 0 and timings["preprocess"] > 0
    assert timings["total"] >= timings["inference"] + timings["queue"]


def test_prometheus_metrics_are_exported(client):
    for _ in range(3):
        client.post("/v1/embed/text", json={"texts": ["metrics please"]})
    assert client.post("/v1/embed/text", json={"texts": "not a list"}).status_code == 400
    ports = {n["MetricsExportPort"] for n in ray.nodes() if n["Alive"]}
    wanted = (
        "ray_audioclip_items_embedded",
        "ray_audioclip_batch_size_bucket",
        "ray_audioclip_forward_ms_bucket",
        "ray_audioclip_rejected_requests",
        "ray_audioclip_preprocess_ms_bucket",
    )
    found: set[str] = set()
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and len(found) < len(wanted):
        for port in ports:
            try:
                text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
            except httpx.HTTPError:
                continue
            found |= {name for name in wanted if name in text}
        time.sleep(3)
    assert found == set(wanted), f"missing: {set(wanted) - found}"


# ---------------------------------------------------------------------------- recordings and windows
def _local_audio(model, data) -> torch.Tensor:
    return model.encode_audio(torch.from_numpy(audioclip.load_audio(data))[None])


def _wav_bytes(samples: np.ndarray, rate: int, subtype: str = "PCM_16") -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, samples.T, rate, format="WAV", subtype=subtype)
    return buffer.getvalue()


def test_phone_browser_and_video_recordings_over_http(client, model):
    scene = tone_scene(48000, 2.0, channels=2)
    wav = _wav_bytes(scene, 48000)
    surround = _wav_bytes(np.concatenate([scene, scene, scene]) * 0.5, 48000, "FLOAT")  # 6 channels
    cases = [
        (encode_audio(scene, 48000, "m4a_aac"), "audio/mp4"),
        (encode_audio(scene, 48000, "webm_opus"), "audio/webm;codecs=opus"),  # MediaRecorder's type
        (encode_video(scene, 48000, "mp4_h264_aac"), "video/mp4"),
        (wav, "application/octet-stream"),
        (wav, None),
        (surround, "audio/wav"),
    ]
    for data, kind in cases:
        headers = {"content-type": kind} if kind else {}
        served = _embeddings(client.post("/v1/embed/audio", content=data, headers=headers))
        assert_matches(served, _local_audio(model, data), 0.9999)
    y, x = np.mgrid[0:240, 0:320]
    picture = Image.fromarray(np.stack([x % 256, y % 256, (x + y) % 256], -1).astype(np.uint8))
    photo = heic_photo(picture)
    for kind in ("image/heic", "application/octet-stream"):
        served = _embeddings(client.post("/v1/embed/image", content=photo, headers={"content-type": kind}))
        assert_matches(served, model.encode_image(audioclip.preprocess_image(photo)[None]), 0.9999)
    jpeg = (INPUTS / "rocket.jpg").read_bytes()
    served = _embeddings(client.post("/v1/embed/image", content=jpeg))  # no content type at all
    assert_matches(served, model.encode_image(audioclip.preprocess_image(jpeg)[None]), 0.9999)
    wrong = _error(client.post("/v1/embed/audio", content=jpeg, headers={"content-type": OCTETS}), 422, 0)
    assert wrong["type"] == "undecodable"
    _error(client.post("/v1/embed/image", content=wav, headers={"content-type": "audio/wav"}), 415)


def test_windows_over_http_npy_openai_and_handles(app_url, client, model):
    from openai import OpenAI

    clip = tone_scene(44100, 7.0)
    wav = _wav_bytes(clip, 44100)
    r = client.post(
        "/v1/embed/audio?window_s=2&hop_s=1.5&pool=none", content=wav, headers={"content-type": "audio/wav"}
    )
    rows, windows = _embeddings(r), r.json()["windows"]
    spans = [(w["start_s"], w["end_s"]) for w in windows]
    assert spans == [(0.0, 2.0), (1.5, 3.5), (3.0, 5.0), (4.5, 6.5), (6.0, 7.0)]
    samples = audioclip.load_audio(wav)
    alone = np.stack(
        [fit_length(samples[:, round(a * 44100) : round(b * 44100)], 2 * 44100) for a, b in spans]
    )
    assert_matches(rows, model.encode_audio(torch.from_numpy(alone)), 0.9999)
    npy = client.post(
        "/v1/embed/audio?window_s=2&hop_s=1.5&pool=none",
        content=wav,
        headers={"content-type": "audio/wav", "accept": "application/x-npy"},
    )
    assert npy.headers["x-window-counts"] == "5"
    np.testing.assert_allclose(np.load(io.BytesIO(npy.content)), rows, rtol=1e-4, atol=1e-4)
    short = _wav_bytes(clip[:, : 3 * 44100], 44100)
    body = {"audio": [base64.b64encode(x).decode() for x in (wav, short)], "window_s": 2.0, "hop_s": 1.5}
    r = client.post("/v1/embed/audio?pool=none&window_s=3", json=body)  # the body's window, the query's pool
    assert [(w["item"], w["windows"]) for w in r.json()["windows"]] == [(0, 1)] * 5 + [(1, 1)] * 2
    r = client.post("/v1/embed/audio", json={**body, "pool": "max"})
    assert [(w["item"], w["windows"]) for w in r.json()["windows"]] == [(0, 5), (1, 2)]
    assert _embeddings(r).shape == (2, 1024)
    openai = OpenAI(base_url=f"{app_url}/v1", api_key="unused", max_retries=0)
    result = openai.embeddings.create(
        model="audioclip-test",
        input=[base64.b64encode(wav).decode()],
        extra_body={"modality": "audio", "window_s": 2.0, "hop_s": 1.5, "pool": "none"},
    )
    served = np.asarray([d.embedding for d in result.data], dtype=np.float32)
    assert [d.index for d in result.data] == list(range(5))
    assert result.data[4].model_extra["window"] == {"item": 0, "start_s": 6.0, "end_s": 7.0, "windows": 1}
    assert row_cosines(served, rows).min() > 0.99999
    handle = serve.get_app_handle("audioclip")
    by_handle = handle.embed_audio.remote([wav], window_s=2.0, hop_s=1.5, pool="none").result(timeout_s=120)
    assert row_cosines(by_handle, rows).min() > 0.99999
    labels = [{"text": "a high tone"}, {"text": "a low tone"}]
    timeline = handle.timeline.remote({"audio": wav}, labels, 2.0, 1.5).result(timeout_s=120)
    assert [(e["start_s"], e["end_s"]) for e in timeline] == spans
    for query, reason in [
        ("window_s=0.01", "window_s"),
        ("pool=none", "window_s"),
        ("window_s=2&pool=median", "pool"),
        ("window_s=abc", "window_s"),
    ]:
        error = _error(
            client.post(f"/v1/embed/audio?{query}", content=wav, headers={"content-type": "audio/wav"}), 400
        )
        assert reason in error["message"], (query, error)
    _error(client.post("/v1/embed/image", json={"images": [], "window_s": 2.0}), 400)


def test_a_rank_timeline_says_which_label_where(client, model):
    clip = tone_scene(44100, 6.0)
    wav = base64.b64encode(_wav_bytes(clip, 44100)).decode()
    labels = ["a dog barking", "a siren", "birdsong"]
    body = {"query": {"audio": wav}, "candidates": [{"text": t} for t in labels], "window_s": 2.0}
    r = client.post("/v1/rank", json=body)
    assert r.status_code == 200, r.text
    timeline = r.json()["timeline"]
    assert [(e["start_s"], e["end_s"]) for e in timeline] == [(0.0, 2.0), (2.0, 4.0), (4.0, 6.0)]
    samples = audioclip.load_audio(base64.b64decode(wav))
    text = torch.nn.functional.normalize(model.encode_text(labels), dim=-1)
    for entry in timeline:
        part = samples[:, round(entry["start_s"] * 44100) : round(entry["end_s"] * 44100)]
        window = torch.nn.functional.normalize(model.encode_audio(torch.from_numpy(part)[None]), dim=-1)
        cos = (text @ window[0]).numpy()
        prob = torch.softmax(torch.from_numpy(cos) * model.logit_scales.audio_text, 0).numpy()
        assert [x["index"] for x in entry["results"]] == list(np.argsort(-cos))
        assert all(abs(x["probability"] - prob[x["index"]]) < 1e-3 for x in entry["results"])
    assert len(r.json()["results"]) == 3  # and the whole recording ranked
    not_audio = {**body, "query": {"text": "a tone"}}
    assert _error(client.post("/v1/rank", json=not_audio), 400)["type"] == "bad_window"


# ---------------------------------------------------------------------------- the playground page
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
SCREENSHOTS = Path(__file__).resolve().parents[1] / "build" / "playground"


def _browser(fake_microphone: Path):
    """Debian's headless Chromium through its chromedriver, its microphone fed from a WAV file."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("the playground test needs Debian's browser: apt-get install chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1200,1100",
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={fake_microphone}",
    ):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


def test_playground_ranks_a_picked_photo_and_a_microphone_recording(app_url, client, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    microphone = tmp_path / "microphone.wav"
    sf.write(microphone, tone_scene(48000, 8.0).T, 48000, subtype="PCM_16")
    photo = tmp_path / "rocket.jpg"
    photo.write_bytes((INPUTS / "rocket.jpg").read_bytes())
    labels = ["a rocket", "a cup of coffee", "a dog barking"]
    for asset in ("", "playground.js", "playground.css"):  # the app serves every file itself
        assert client.get(f"/playground/{asset}").status_code == 200
    driver = _browser(microphone)
    try:
        wait = WebDriverWait(driver, 90)
        driver.get(f"{app_url}/playground/")
        field = driver.find_element(By.ID, "labels")
        field.clear()
        field.send_keys("\n".join(labels))
        driver.find_element(By.ID, "file").send_keys(str(photo))
        wait.until(lambda d: d.find_element(By.ID, "rank").is_enabled())
        driver.find_element(By.ID, "rank").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results li")) == len(labels))
        shown = [
            (li.get_attribute("data-label"), float(li.get_attribute("data-probability")))
            for li in driver.find_elements(By.CSS_SELECTOR, "#results li")
        ]
        body = {
            "query": {"image": base64.b64encode(photo.read_bytes()).decode()},
            "candidates": [{"text": t} for t in labels],
        }
        expected = client.post("/v1/rank", json=body).json()["results"]
        assert [label for label, _ in shown] == [labels[r["index"]] for r in expected]
        assert all(abs(p - r["probability"]) < 1e-4 for (_, p), r in zip(shown, expected, strict=True))
        # the browser's own recorder (WebM/Opus) through the audio route, windowed into a timeline
        driver.find_element(By.ID, "record").click()
        wait.until(lambda d: "recording" in d.find_element(By.ID, "recording-state").text)
        time.sleep(3.5)
        driver.find_element(By.ID, "stop").click()
        wait.until(lambda d: "recording (audio/webm" in d.find_element(By.ID, "status").text)
        for field_id, value in (("window", "1"), ("hop", "1")):
            driver.find_element(By.ID, field_id).clear()
            driver.find_element(By.ID, field_id).send_keys(value)
        driver.find_element(By.ID, "rank").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#timeline-list li")) >= 3)
        windows = driver.find_elements(By.CSS_SELECTOR, "#timeline-list li")
        assert {li.get_attribute("data-label") for li in windows} <= set(labels)
        starts = [float(li.get_attribute("data-start")) for li in windows]
        assert starts == sorted(starts) and starts[0] == 0.0
        assert "error" not in driver.find_element(By.ID, "status").get_attribute("class")
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shot = SCREENSHOTS / "playground-recording.png"
        assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
        print(f"\nplayground screenshot: {shot} ({len(windows)} windows)")
    finally:
        driver.quit()


# ---------------------------------------------------------------------------- bad input at scale
def test_ten_thousand_generated_requests_get_no_5xx_and_the_app_stays_ready(app_url, client):
    """schemathesis from /openapi.json (every operation, schema-valid and schema-violating) and
    hypothesis (arbitrary bytes under every content type), sent 8 at a time: no 5xx, every refusal
    the JSON error body, /readyz 200 after every 500."""
    from concurrent.futures import ThreadPoolExecutor

    from fuzz_openapi import raw_cases, schema_cases

    cases = [*schema_cases(client.get("/openapi.json").json(), 600), *raw_cases(4200)]
    statuses: collections.Counter = collections.Counter()
    problems = []

    def check(case) -> None:
        answer = case.send(app_url)
        statuses[answer.status] += 1
        if answer.status >= 500:
            problems.append(f"{case.name}: {answer.status} {answer.text[:200]}")
        elif answer.status >= 400:
            body = json.loads(answer.text) if answer.content_type.startswith("application/json") else {}
            error = body.get("error", {}) if isinstance(body, dict) else {}
            if not (error.get("type") and error.get("message")) or "Traceback" in error["message"]:
                problems.append(f"{case.name}: {answer.status} without the error body: {answer.text[:80]}")

    not_ready = 0
    with ThreadPoolExecutor(8) as pool:
        for start in range(0, len(cases), 500):
            list(pool.map(check, cases[start : start + 500]))
            not_ready += client.get("/readyz").status_code != 200
    total = sum(statuses.values())
    print(f"\n{total} generated requests: statuses {dict(sorted(statuses.items()))}; not ready {not_ready}x")
    assert total >= 10_000 and not problems, problems[:10]
    assert (
        not_ready == 0 and statuses[200] > 0 and sum(n for s, n in statuses.items() if 400 <= s < 500) > 5000
    )
