"""Corpus embedding as a Ray Data job on a local cluster of three nodes: every file exactly once,
embeddings equal to the in-process model's, unusable files listed, resume, compact vectors, the
loss of a worker node mid-job, and the ``audioclip-embed --ray`` command a user runs."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import soundfile as sf
from conftest import INPUTS, assert_matches
from PIL import Image
from ray.cluster_utils import Cluster

from audioclip.pipeline import pipelines
from audioclip.quantize import quantize
from audioclip_serve.cli import AUDIO_SUFFIXES, IMAGE_SUFFIXES
from audioclip_serve.corpus import ERRORS_FILE, CorpusJob, run

pytestmark = [pytest.mark.serve, pytest.mark.slow]
CHECKPOINT = "synthetic:shared"  # the golden weights: the conftest model is the same network
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def cluster():
    """A head that only drives (no CPUs) and two workers, where the towers and the tasks run."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=2) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, namespace="corpus-tests")
    yield cluster, workers
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """The golden photos, 21 generated ones of varied sizes in a subfolder, one broken file, and
    files that are not inputs (hidden, unknown extension)."""
    root = tmp_path_factory.mktemp("photos")
    for path in INPUTS.iterdir():
        if path.suffix in (".jpg", ".png"):
            (root / path.name).write_bytes(path.read_bytes())
    rng = np.random.default_rng(3)
    (root / "generated").mkdir()
    for i in range(21):
        h, w = rng.integers(40, 400, size=2)
        pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "generated" / f"noise_{i:02}.{'png' if i % 2 else 'jpg'}")
    (root / "generated" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (root / ".hidden.png").write_bytes((root / "generated" / "noise_01.png").read_bytes())
    (root / "notes.txt").write_text("not an input")
    return root


def _files(root: Path, suffixes: frozenset[str]) -> list[str]:
    return sorted(str(p) for p in root.rglob("*") if p.suffix in suffixes and not p.name.startswith("."))


def _read(output: Path) -> dict[str, dict]:
    """Rows by source; fails if any source appears twice."""
    table = pq.read_table(output)
    sources = table.column("source").to_pylist()
    twice = [s for s, n in Counter(sources).items() if n > 1]
    assert not twice, f"rows written twice: {twice[:5]}"
    return {row["source"]: row for row in table.to_pylist()}


def _local(modality: str, paths: list[str], model) -> np.ndarray:
    pipeline = pipelines()[modality]
    return pipeline.embed(model, [pipeline.decode(Path(p).read_bytes()) for p in paths])


def test_every_file_once_equal_to_the_model_and_unusable_ones_listed(cluster, photos, model, tmp_path):
    out = tmp_path / "out"
    job = CorpusJob("image", CHECKPOINT, str(out), actors=2, batch_size=4, decode_batch_size=8)
    report = run(job, str(photos), IMAGE_SUFFIXES)
    expected = _files(photos, IMAGE_SUFFIXES)
    rows = _read(out)
    assert sorted(rows) == expected and report.written == len(expected) == report.output_rows
    broken = str(photos / "generated" / "broken.jpg")
    assert rows[broken]["embedding"] is None and "cannot decode" in rows[broken]["error"]
    assert report.unusable == 1 and report.first_errors[0][0] == broken
    assert (out / ERRORS_FILE).read_text().splitlines() == [f"{broken}\t{rows[broken]['error']}"]
    good = [s for s in expected if s != broken]
    served = np.asarray([rows[s]["embedding"] for s in good], dtype=np.float32)
    assert_matches(served, _local("image", good, model), 0.99999)
    [sha] = {row["checkpoint_sha256"] for row in rows.values()}  # one checkpoint made every row
    assert len(sha) == 64 and {row["modality"] for row in rows.values()} == {"image"}


def test_audio_clips_and_compact_vectors(cluster, model, tmp_path):
    clips = tmp_path / "clips"
    clips.mkdir()
    for path in INPUTS.glob("*.wav"):
        (clips / path.name).write_bytes(path.read_bytes())
    sf.write(clips / "short.flac", np.sin(np.arange(4410) / 7).astype(np.float32) * 0.3, 44100)
    (clips / "empty.wav").write_bytes(b"RIFF")
    out = tmp_path / "out"
    job = CorpusJob("audio", CHECKPOINT, str(out), embedding_dtype="int8", normalize=True, batch_size=3)
    report = run(job, str(clips), AUDIO_SUFFIXES)
    rows = _read(out)
    assert report.unusable == 1 and rows[str(clips / "empty.wav")]["embedding"] is None
    good = [s for s in _files(clips, AUDIO_SUFFIXES) if not s.endswith("empty.wav")]
    codes = np.asarray([rows[s]["embedding"] for s in good])
    expected = quantize(_local("audio", good, model), "int8")
    assert codes.shape == (len(good), 1024) and np.abs(codes.astype(int) - expected).max() <= 1
    assert pq.read_schema(next(out.glob("*.parquet"))).field("embedding").type.value_type == "int8"


def test_resume_skips_what_is_written_and_drops_half_written_files(cluster, photos, tmp_path):
    out = tmp_path / "out"
    everything = _files(photos, IMAGE_SUFFIXES)
    manifest = tmp_path / "first_half.txt"  # relative paths, resolved against the manifest's folder
    manifest.write_text("".join(f"{os.path.relpath(s, tmp_path)}\n" for s in everything[::2]) + "\n")
    first = run(CorpusJob("image", CHECKPOINT, str(out), batch_size=8), str(manifest), IMAGE_SUFFIXES)
    assert first.written == len(everything[::2]) and first.skipped == 0
    (out / "zz-interrupted.parquet").write_bytes(b"PAR1 cut short by a killed run")
    second = run(
        CorpusJob("image", CHECKPOINT, str(out), actors=2, batch_size=4), str(photos), IMAGE_SUFFIXES
    )
    assert second.skipped == len(everything[::2]) and second.written == len(everything) - second.skipped
    assert not (out / "zz-interrupted.parquet").exists()
    assert sorted(_read(out)) == everything
    third = run(CorpusJob("image", CHECKPOINT, str(out)), str(photos), IMAGE_SUFFIXES)
    assert third.written == 0 and third.skipped == len(everything) and third.output_rows == len(everything)


def test_a_worker_node_lost_mid_job_loses_and_doubles_nothing(cluster, photos, tmp_path):
    ray_cluster, workers = cluster
    out = tmp_path / "out"
    # small files, so that some are written while the job still runs (the node is lost after the first)
    job = CorpusJob(
        "image", CHECKPOINT, str(out), actors=2, batch_size=2, decode_batch_size=2, rows_per_file=2
    )
    result: dict = {}

    def embed() -> None:
        try:
            result["report"] = run(job, str(photos), IMAGE_SUFFIXES)
        except BaseException as err:  # noqa: BLE001 - re-raised in the test thread below
            result["error"] = err

    thread = threading.Thread(target=embed)
    thread.start()
    deadline = time.monotonic() + 300
    while not list(out.glob("*.parquet")) and time.monotonic() < deadline and thread.is_alive():
        time.sleep(0.2)
    assert thread.is_alive(), f"the job ended before the node could be lost: {result}"
    ray_cluster.remove_node(workers.pop(0))  # a host gone: its raylet, actors and objects with it
    workers.append(ray_cluster.add_node(num_cpus=2))  # and a new one joins, as an autoscaler does
    thread.join(timeout=600)
    assert not thread.is_alive() and "error" not in result, result.get("error")
    assert sorted(_read(out)) == _files(photos, IMAGE_SUFFIXES)
    assert result["report"].output_rows == len(_files(photos, IMAGE_SUFFIXES))


def test_the_command_a_user_runs(cluster, photos, tmp_path):
    ray_cluster, _ = cluster
    out = tmp_path / "embeddings"
    command = [
        str(BIN / "audioclip-embed"), "images", str(photos), "-o", str(out), "--ray", ray_cluster.address,
        "--checkpoint", CHECKPOINT, "--actors", "2", "--batch-size", "4", "--embedding-dtype", "ubinary",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 1, done.stderr[-3000:]  # 1: some files unusable, everything else written
    assert "unusable" in done.stderr and "broken.jpg" in done.stderr
    rows = _read(out)
    assert sorted(rows) == _files(photos, IMAGE_SUFFIXES)
    assert len(next(r["embedding"] for r in rows.values() if r["embedding"] is not None)) == 128
    assert (out / ERRORS_FILE).read_text().count("\n") == 1
    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert "wrote 0 rows" in again.stderr and f"{len(rows)} already there" in again.stderr
    refused = subprocess.run(
        [str(BIN / "audioclip-embed"), "text", str(photos / "notes.txt"), "-o", str(out), "--ray"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode == 2 and "--ray embeds files" in refused.stderr
    starved = subprocess.run([*command, "--actors", "4"], capture_output=True, text=True, timeout=300)
    assert starved.returncode == 2 and "leave none of the cluster's 4 CPUs" in starved.stderr
