"""The Python client and the ``audioclip-embed`` CLI against the real app on a local Ray cluster.

The server runs with ``max_items: 8`` so that the client's batching is exercised; its embeddings
are compared with the in-process model on the same synthetic weights.
"""

from __future__ import annotations

import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import ray
import soundfile as sf
import torch
from conftest import INPUTS, assert_matches, row_cosines
from ray import serve
from ray.serve import RunTarget
from safetensors.numpy import save_file
from serve_support import TEST_ARGS, free_port, wait_ready

import audioclip
from audioclip.checkpoint import tower_of
from audioclip_serve import AudioCLIPClient, AudioCLIPConnectionError, AudioCLIPHTTPError
from audioclip_serve.cli import LocalEmbedder
from deployments.app import build_app

pytestmark = [pytest.mark.serve, pytest.mark.slow]

BUSY_KEY = "busy-test-key"
TOO_LONG = "word " * 100  # 102 tokens: over the context length of 77


def busy_args(checkpoint: Path) -> dict:
    """One request in flight at a time, each held 0.3 s by the batcher: concurrent callers get 503."""
    return {
        **TEST_ARGS,
        "checkpoint": str(checkpoint),
        "model_name": "audioclip-busy",
        "towers": ["text"],
        "text": {"num_cpus": 0, "max_batch_size": 4, "batch_wait_timeout_s": 0.3},
        "router": {"num_cpus": 0, "max_inflight": 1, "api_keys": [BUSY_KEY]},
    }


def bf16_args(checkpoint: Path) -> dict:
    """The text tower on OpenVINO in bf16 (the fp32 graph where this CPU has no bf16)."""
    text = {"num_cpus": 0, "threads": 1, "backend": "openvino", "dtype": "bf16", "batch_wait_timeout_s": 0.0}
    return {
        **TEST_ARGS,
        "checkpoint": str(checkpoint),
        "model_name": "audioclip-bf16",
        "towers": ["text"],
        "text": text,
    }


@pytest.fixture(scope="module")
def server(request, shared_weights, tmp_path_factory):
    """The app with ``max_items: 8`` at ``/`` and the busy one at ``/busy``, deployed together so that
    their replicas start while this process builds the in-process model (the budget is ~3 min on 2
    cores). The busy app reads a text-only file of the same weights: no synthetic generation."""
    text_only = tmp_path_factory.mktemp("busy") / "text.safetensors"
    save_file({k: v for k, v in shared_weights.items() if tower_of(k) in ("text", "scales")}, str(text_only))
    ray.init(
        "local", num_cpus=4, include_dashboard=False, log_to_driver=False, namespace="audioclip-client-tests"
    )
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    started = time.monotonic()
    args = {**TEST_ARGS, "limits": {**TEST_ARGS["limits"], "max_items": 8}}
    targets = [
        RunTarget(build_app(args), name="audioclip", route_prefix="/"),
        RunTarget(build_app(busy_args(text_only)), name="busy", route_prefix="/busy"),
        RunTarget(build_app(bf16_args(text_only)), name="bf16", route_prefix="/bf16"),
    ]
    serve.run_many(targets, wait_for_applications_running=False)
    request.getfixturevalue("model")
    url = f"http://127.0.0.1:{port}"
    wait_ready(url)
    wait_ready(f"{url}/busy")
    wait_ready(f"{url}/bf16")
    print(f"\napps ready {time.monotonic() - started:.1f} s after serve.run_many")
    yield url
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def client(server):
    with AudioCLIPClient(server, timeout=120) as c:
        yield c


def local_images(model, files: list[Path]) -> torch.Tensor:
    return model.encode_image(torch.stack([audioclip.preprocess_image(f.read_bytes()) for f in files]))


def local_audio(model, files: list[Path]) -> np.ndarray:
    """One clip at a time, as clips of different lengths are run by the service."""
    clips = [torch.from_numpy(audioclip.load_audio(f.read_bytes()))[None] for f in files]
    return np.concatenate([model.encode_audio(c).numpy() for c in clips])


# ---------------------------------------------------------------------------- parity
def test_text_equals_the_model(client, model):
    texts = ["a photo of an astronaut", "dog", "", "The sound of a Thunderstorm &amp; heavy RAIN!!"]
    assert_matches(client.embed_text(texts), model.encode_text(texts), 0.99999)
    normalized = client.embed_text(texts, normalize=True)
    assert np.allclose(np.linalg.norm(normalized, axis=1), 1.0, atol=1e-5)
    assert client.embed_text([]).shape == (0, 1024)


def test_images_as_paths_and_bytes_equal_the_model(client, model):
    files = [INPUTS / "rocket.jpg", INPUTS / "coffee.png", INPUTS / "astronaut.png"]
    served = client.embed_images([str(files[0]), files[1].read_bytes(), files[2]], batch_size=2)
    assert_matches(served, local_images(model, files), 0.99999)


def test_audio_equals_the_model(client, model):
    files = [INPUTS / "speech_dog_44k.wav", INPUTS / "speech_rain_22k.wav"]
    served = client.embed_audio([files[0], files[1].read_bytes()])
    assert_matches(served, local_audio(model, files), 0.9999)


# ---------------------------------------------------------------------------- batching and errors
def test_batches_past_max_items_keep_order(client, model, capsys):
    texts = [f"text number {i}: a {w}" for i, w in enumerate(["dog", "cat", "car", "bell", "rain"] * 4)]
    with pytest.raises(AudioCLIPHTTPError) as refused:  # one request of 20: the server's limit is 8
        client.embed_text(texts)
    assert refused.value.status == 413 and refused.value.index is None
    before = client.requests
    served = client.embed_text(texts, batch_size=8, progress=True)
    assert client.requests - before == 3  # 8 + 8 + 4
    assert_matches(served, model.encode_text(texts), 0.99999)
    assert "20/20" in capsys.readouterr().err  # the tqdm bar ran to the end


def test_a_bad_item_is_reported_at_its_overall_position(client, tmp_path):
    texts = [f"fine text {i}" for i in range(20)]
    texts[13] = TOO_LONG
    with pytest.raises(AudioCLIPHTTPError) as err:
        client.embed_text(texts, batch_size=8)  # item 13 is item 5 of the second request
    assert (err.value.status, err.value.type, err.value.index) == (422, "text_too_long", 13)
    assert "more than the context length" in err.value.message
    broken = tmp_path / "broken.png"
    broken.write_bytes((INPUTS / "coffee.png").read_bytes()[:2000])
    images = [INPUTS / "rocket.jpg"] * 3 + [broken]
    with pytest.raises(AudioCLIPHTTPError) as err:
        client.embed_images(images, batch_size=2)
    assert (err.value.status, err.value.type, err.value.index) == (422, "undecodable", 3)
    assert client.embed_text(texts, batch_size=8, truncate=True).shape == (20, 1024)


# ---------------------------------------------------------------------------- other endpoints
def test_rank_models_and_ready(client, model):
    labels = ["a dog barking", "rain on a roof", "a church bell"]
    wav = INPUTS / "speech_dog_44k.wav"
    results = client.rank({"audio": wav}, [{"text": t} for t in labels])
    cos = row_cosines(local_audio(model, [wav]).repeat(3, axis=0), model.encode_text(labels).numpy())
    assert [r.index for r in results] == list(np.argsort(-cos))
    assert all(abs(r.cosine - cos[r.index]) < 1e-4 and r.modality == "text" for r in results)
    assert abs(sum(r.probability for r in results) - 1.0) < 1e-5
    assert len(client.rank({"text": "a dog"}, [{"text": t} for t in labels], top_k=1)) == 1
    info = client.models()
    assert info["name"] == "audioclip-test" and set(info["towers"]) == {"image", "text", "audio"}
    assert client.ready()
    with AudioCLIPClient(f"http://127.0.0.1:{free_port()}", timeout=5) as nobody:
        assert not nobody.ready()


def test_connection_errors_are_retried_a_bounded_number_of_times():
    with AudioCLIPClient(f"http://127.0.0.1:{free_port()}", max_retries=2, backoff_s=0.01) as nobody:
        with pytest.raises(AudioCLIPConnectionError):
            nobody.embed_text(["anyone there?"])
        assert (nobody.requests, nobody.retries) == (3, 2)


def test_503_is_retried_until_it_succeeds(server, model):
    """Concurrent callers of the busy app get 503 + Retry-After, wait, and all get through."""
    texts = [f"busy caller {i}" for i in range(4)]
    with AudioCLIPClient(f"{server}/busy", api_key=BUSY_KEY, max_retries=10) as busy:
        with ThreadPoolExecutor(len(texts)) as pool:
            served = list(pool.map(lambda t: busy.embed_text([t]), texts))
        print(f"\n{len(texts)} concurrent callers: {busy.requests} requests, {busy.retries} retries")
        assert busy.retries >= 1
        assert_matches(np.concatenate(served), model.encode_text(texts), 0.99999)
    with AudioCLIPClient(f"{server}/busy", api_key="wrong") as intruder:
        with pytest.raises(AudioCLIPHTTPError) as err:
            intruder.embed_text(["let me in"])
        assert (err.value.status, err.value.type, intruder.retries) == (401, "unauthorized", 0)


def test_a_bf16_text_tower_serves_the_bf16_graph(server, model, shared_weights):
    """``dtype: bf16`` on OpenVINO, served: ``/v1/models`` names what runs, and the answers are the
    library's own build of that tower (where this CPU has bf16: within cosine 0.99 of fp32 yet not the
    fp32 numbers; elsewhere the fp32 graph at fp32 parity)."""
    from audioclip.backends import cpu_has_bf16
    from audioclip.factory import TowerBuild, build_tower

    texts = ["a dog barking", "rain on a tin roof", "a church bell", "an engine starting on a cold morning"]
    with AudioCLIPClient(f"{server}/bf16", timeout=120) as bf16:
        runtime = bf16.models()["towers"]["text"]["runtime"]
        served = bf16.embed_text(texts)
    fp32 = model.encode_text(texts).numpy()
    local = build_tower(shared_weights, "text", TowerBuild(backend="openvino", dtype="bf16", threads=1))
    assert_matches(served, local.encode_text(texts), 0.9999)
    if cpu_has_bf16():
        assert runtime.startswith("openvino bf16: ")
        assert row_cosines(served, fp32).min() >= 0.99
        assert np.abs(served - fp32).max() / np.abs(fp32).max() > 1e-4  # not the fp32 graph
    else:
        assert runtime.startswith("openvino fp32 (bf16 asked; this CPU has no bf16 instructions): ")
        assert_matches(served, fp32, 0.99999)


# ---------------------------------------------------------------------------- the CLI
def run_cli(*args: object) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "audioclip_serve.cli", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def test_cli_in_process_skips_an_undecodable_image(tmp_path, model):
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    (folder / "rocket.jpg").write_bytes((INPUTS / "rocket.jpg").read_bytes())
    (folder / "sub" / "coffee.png").write_bytes((INPUTS / "coffee.png").read_bytes())
    (folder / "broken.png").write_bytes((INPUTS / "coffee.png").read_bytes()[:3000])
    (folder / "notes.md").write_text("not an image, not listed")
    out = tmp_path / "out" / "images.npy"
    result = run_cli("images", folder, "-o", out, "--checkpoint", "synthetic:shared")
    assert result.returncode == 1, result.stderr
    assert "skipped broken.png" in result.stderr and "100%" in result.stderr  # reported; tqdm bar
    rows = np.load(out)
    assert (out.parent / "images.txt").read_text().splitlines() == ["rocket.jpg", "sub/coffee.png"]
    assert_matches(rows, local_images(model, [INPUTS / "rocket.jpg", INPUTS / "coffee.png"]), 0.99999)
    errors = (out.parent / "images.errors.txt").read_text().splitlines()
    assert len(errors) == 1 and errors[0].startswith("broken.png\t")


def test_cli_in_process_audio_runs_equal_shapes_together(tmp_path, model):
    """The CLI's in-process audio path: clips of one shape share a forward pass, others run alone,
    a file that does not decode is skipped; rows come back in input order."""
    samples, rate = sf.read(INPUTS / "speech_dog_44k.wav", dtype="float32")
    clips = {"a.wav": samples[: rate // 2], "b.wav": samples[:rate], "c.wav": samples[rate // 2 : rate]}
    for name, clip in clips.items():
        sf.write(tmp_path / name, clip, rate)
    (tmp_path / "broken.wav").write_bytes(b"RIFF....WAVEfmt ")
    paths = [tmp_path / n for n in ("a.wav", "b.wav", "broken.wav", "c.wav")]
    result = LocalEmbedder(model, "audio", normalize=True, truncate=False).embed(paths)
    assert result.kept == [0, 1, 3] and [i for i, _ in result.failed] == [2]
    assert_matches(result.rows, local_audio(model, [paths[i] for i in result.kept]), 0.9999)
    assert np.allclose(np.linalg.norm(result.rows, axis=1), 1.0, atol=1e-5)


def test_cli_through_the_server_on_a_text_file(server, tmp_path, model):
    lines = [f"line {i} about a {w}" for i, w in enumerate(["dog", "cat", "car", "bell", "rain"] * 2)]
    lines[3], lines[6] = "", TOO_LONG  # a blank line is skipped; a too-long one is reported
    source = tmp_path / "texts.txt"
    source.write_text("\n".join(lines) + "\n")
    clash = run_cli("text", source, "-o", tmp_path / "texts.npy", "--server", server)
    assert clash.returncode == 2 and "would overwrite the input" in clash.stderr  # texts.txt is the input
    assert source.read_text() == "\n".join(lines) + "\n"
    out = tmp_path / "emb.npy"
    result = run_cli("text", source, "-o", out, "--server", server, "--batch-size", "4", "--normalize")
    assert result.returncode == 1, result.stderr
    kept = [i for i, line in enumerate(lines) if line and line != TOO_LONG]
    assert (tmp_path / "emb.txt").read_text().splitlines() == [f"texts.txt:{i + 1}" for i in kept]
    rows = np.load(out)
    assert_matches(rows, model.encode_text([lines[i] for i in kept]), 0.99999)
    assert np.allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-5)
    errors = (tmp_path / "emb.errors.txt").read_text().splitlines()
    assert len(errors) == 1 and errors[0].startswith("texts.txt:7\ttext_too_long: text has 102 tokens")
