"""A client's mistakes stay out of the operator's alarms, and readiness answers at once.

Malformed requests of every kind, over HTTP and through handles (the router's handle API and calls
straight to a tower), must get their 4xx / InvalidInputError without any replica logging an ERROR
line or a traceback: the replicas' log files are read after the burst. ``/readyz`` must answer at
once while a tower is not up, and a probe must leave nothing in the log.
"""

from __future__ import annotations

import base64
import io
import statistics
import time

import httpx
import numpy as np
import pytest
import ray
import soundfile as sf
from conftest import INPUTS
from media_files import encode_audio, tone_scene
from PIL import Image
from ray import serve
from ray.serve.api import RunTarget
from serve_support import ALARMS, TEST_ARGS, LogWatch, free_port, wait_ready

import audioclip
from audioclip.pipeline import ImageItem, TextItem
from deployments.app import build_app

pytestmark = [pytest.mark.serve, pytest.mark.slow]


@pytest.fixture(scope="module")
def base_url():
    ray.init("local", num_cpus=4, include_dashboard=False, log_to_driver=False, namespace="audioclip-quiet")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


def test_readyz_answers_at_once_while_a_tower_cannot_start(base_url):
    args = {**TEST_ARGS, "towers": ["text", "audio"]}
    args["audio"] = {"num_cpus": 0, "resources": {"a-resource-no-node-has": 1}}  # never scheduled
    logs = LogWatch()
    target = RunTarget(build_app(args), name="loading", route_prefix="/loading")
    serve.run_many([target], wait_for_applications_running=False)  # it never runs: audio cannot start
    url = f"{base_url}/loading/readyz"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:  # until the router answers (the proxy says 404 before)
        try:
            if httpx.get(url, timeout=30).status_code == 503:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    seconds, bodies = [], []
    settled = (503, {"status": "not_ready", "towers": ["audio"], "scaled_to_zero": []}, "1")  # text up
    with httpx.Client(timeout=5) as client:  # while the text tower loads, then with it up
        while time.monotonic() < deadline and bodies[-5:] != [settled] * 5:
            started = time.perf_counter()
            r = client.get(url)
            seconds.append(time.perf_counter() - started)
            bodies.append((r.status_code, r.json(), r.headers.get("retry-after")))
            time.sleep(0.2)
    loading = sum(1 for b in bodies if "text" in b[1]["towers"])
    print(
        f"\n/readyz: median {statistics.median(seconds) * 1000:.1f} ms, max {max(seconds) * 1000:.1f} ms "
        f"over {len(seconds)} probes ({loading} while the text tower loaded)"
    )
    assert bodies[-5:] == [settled] * 5, bodies[-5:]
    assert statistics.median(seconds) < 0.1 and max(seconds) < 1.0, seconds
    time.sleep(2)
    alarms = [line for line in logs.new_lines() if "Router" in line and ALARMS.search(line)]
    assert not alarms, alarms[:5]
    serve.delete("loading")


def _flac(seconds: float, rate: int = 8000) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.zeros(int(seconds * rate), dtype=np.int16), rate, format="FLAC")
    return buf.getvalue()


def _png(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("L", size).save(buf, format="PNG")
    return buf.getvalue()


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _bad_http_requests() -> list[tuple[str, str, dict, bytes]]:
    """(path, content type, query, body) of malformed requests beyond the fuzz cases' structural ones."""
    jpeg = (INPUTS / "rocket.jpg").read_bytes()
    wav = (INPUTS / "chord_44k.wav").read_bytes()
    b64 = base64.b64encode(jpeg[: len(jpeg) // 2]).decode()
    long_text = "word " * 200
    scene = tone_scene(48000, 2.0)
    m4a, webm = encode_audio(scene, 48000, "m4a_aac"), encode_audio(scene, 48000, "webm_opus")
    buffer = io.BytesIO()
    sf.write(buffer, tone_scene(44100, 40.0).T, 44100, format="WAV", subtype="PCM_16")
    wav_long = buffer.getvalue()
    nan_pixels = np.full((1, 3, 224, 224), np.nan, dtype=np.float32)
    return [
        ("/v1/embed/text", "application/json", {}, b'{"texts": ["ok", "%s"]}' % long_text.encode()),
        ("/v1/embed/text", "application/json", {}, b'{"texts": ["%s"]}' % (b"x" * 6000)),
        ("/v1/embed/image", "image/jpeg", {}, jpeg[: len(jpeg) // 2]),
        ("/v1/embed/image", "image/png", {}, _png((5000, 5000))),
        ("/v1/embed/image", "application/json", {}, b'{"images": ["%s"]}' % b64.encode()),
        ("/v1/embed/image", "application/x-npy", {"preprocess": "false"}, _npy(nan_pixels)),
        ("/v1/embed/audio", "audio/wav", {}, wav[:30]),
        ("/v1/embed/audio", "audio/flac", {}, _flac(61)),
        ("/v1/embed/audio", "audio/flac", {}, b"fLaC" + b"\x00" * 200),
        ("/v1/embed/audio", "application/x-npy", {"sample_rate": "0"}, _npy(np.zeros(100, np.float32))),
        ("/v1/rank", "application/json", {}, b'{"query": {"text": "a"}, "candidates": [{"video": "x"}]}'),
        (
            "/v1/rank",
            "application/json",
            {},
            b'{"query": {"audio": "QUFBQQ=="}, "candidates": [{"text": "a"}]}',
        ),
        (
            "/v1/rank",
            "application/json",
            {},
            b'{"query": {"text": "a"}, "candidates": [{"text": "%s"}]}' % long_text.encode(),
        ),
        ("/v1/embeddings", "application/json", {}, b'{"model": "other", "input": "a"}'),
        (
            "/v1/embeddings",
            "application/json",
            {},
            b'{"model": "audioclip-test", "input": ["%s"]}' % long_text.encode(),
        ),
        (
            "/v1/embeddings",
            "application/json",
            {},
            b'{"model": "audioclip-test", "input": ["a"], "dimensions": 8}',
        ),
        ("/v1/no-such-route", "application/json", {}, b"{}"),
        # recordings: a cut-off phone memo, a browser recording's header only, a video without sound
        ("/v1/embed/audio", "audio/mp4", {}, m4a[: len(m4a) // 3]),
        ("/v1/embed/audio", "audio/webm", {}, webm[:200]),
        ("/v1/embed/audio", "video/mp4", {}, b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 100),
        ("/v1/embed/audio", "application/octet-stream", {}, jpeg),
        ("/v1/embed/image", "image/heic", {}, b"\x00\x00\x00\x1cftypheic" + b"\x00" * 50),
        ("/v1/embed/audio", "audio/wav", {"window_s": "0.01"}, wav),
        ("/v1/embed/audio", "audio/wav", {"pool": "none"}, wav),
        ("/v1/embed/audio", "audio/wav", {"window_s": "1", "hop_s": "-1"}, wav),
        ("/v1/embed/audio", "audio/wav", {"window_s": "0.5"}, wav_long),  # over max_windows
        (
            "/v1/rank",
            "application/json",
            {},
            b'{"query": {"text": "a"}, "candidates": [{"text": "b"}], "window_s": 2}',
        ),
    ]


def test_malformed_requests_of_every_kind_leave_no_alarm_in_any_log(base_url):
    from fuzz_cases import structural_cases

    serve.run(build_app(TEST_ARGS), name="audioclip", route_prefix="/")
    wait_ready(base_url)
    logs = LogWatch()
    statuses = []
    with httpx.Client(base_url=base_url, timeout=120) as client:
        for name, method, path, headers, body, must_fail in structural_cases(INPUTS):
            if must_fail:
                r = client.request(method, path, headers=headers, content=body)
                statuses.append((name, r.status_code))
        for path, kind, query, body in _bad_http_requests():
            r = client.post(path, params=query, content=body, headers={"content-type": kind})
            statuses.append((f"{path} {kind} {query} {body[:40]!r}", r.status_code))
    wrong = [(name, status) for name, status in statuses if not 400 <= status < 500]
    assert statuses and not wrong, wrong

    app = serve.get_app_handle("audioclip")
    text_tower = serve.get_deployment_handle("TextEncoder", "audioclip")
    image_tower = serve.get_deployment_handle("ImageEncoder", "audioclip")
    raising_calls = [
        app.embed_text.remote(["fine", "word " * 100]),
        app.embed_text.remote("a string, not a list"),
        app.embed_text.remote(["ok", 7]),
        app.embed_image.remote([b"not an image"]),
        app.embed_audio.remote([b"RIFF....WAVEfmt "]),
        app.embed_audio.remote([(np.zeros(10, np.float32), -5)]),
        app.rank.remote({"text": "q"}, [{"image": b"broken"}]),
        app.rank.remote({"smell": "q"}, [{"text": "a"}]),
        text_tower.embed.remote(["word " * 100], {}),
        image_tower.embed.remote([np.zeros((4, 4, 7), np.uint8)], {}),
    ]
    for call in raising_calls:
        with pytest.raises(audioclip.InvalidInputError):
            call.result(timeout_s=120)
    answer = image_tower.embed_prepared.remote([TextItem((1, 2))]).result(timeout_s=120)
    assert answer.embeddings is None and answer.error.reason == "unsupported_type"  # a value, not raised
    answer = image_tower.embed_prepared.remote([ImageItem(np.zeros((224, 224, 3), np.uint8))]).result(
        timeout_s=120
    )
    assert answer.error is None and answer.embeddings.shape == (1, 1024)

    time.sleep(3)  # replicas flush their log files
    lines = logs.new_lines()
    alarms = [line for line in lines if ALARMS.search(line)]
    refused = [line for line in lines if "refused:" in line and "INFO" in line]
    print(
        f"\n{len(statuses)} bad HTTP requests + {len(raising_calls) + 1} bad handle calls: "
        f"{len(refused)} INFO lines, {len(alarms)} alarms"
    )
    assert not alarms, alarms[:10]
    assert len(refused) >= len(statuses), "each refusal is logged once at INFO (the log files were read)"
    assert wait_ready(base_url, timeout_s=30) >= 0
