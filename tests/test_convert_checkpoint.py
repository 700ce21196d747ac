"""scripts/convert_checkpoint.py run as a user runs it, on the synthetic checkpoint in release format."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from conftest import INPUTS, max_rel

import audioclip
from audioclip.checkpoint import LOGIT_SCALE_KEYS, file_sha256, tower_of
from audioclip_serve import convert

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "convert_checkpoint.py"
TEXTS = ["a dog barking", "rain on a tin roof", ""]


def run_script(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=600
    )


class Converted(NamedTuple):
    files: dict[str, Path]  # "all", "image", "text", "audio"
    stdout: str


@pytest.fixture(scope="module")
def converted(shared_checkpoint, tmp_path_factory) -> Converted:
    """The shared synthetic checkpoint converted once, with per-tower files."""
    out = tmp_path_factory.mktemp("converted") / "audioclip.safetensors"
    result = run_script(shared_checkpoint, out, "--per-tower")
    assert result.returncode == 0, result.stderr
    towers = {t: out.with_name(f"audioclip-{t}.safetensors") for t in ("image", "text", "audio")}
    return Converted({"all": out, **towers}, result.stdout)


@pytest.fixture(scope="module")
def reference(model) -> dict[str, torch.Tensor]:
    """Inputs and the ``.pt`` model's embeddings of them, computed once (the audio tower is slow)."""
    clip = audioclip.load_audio(INPUTS / "chord_44k.wav")[:, : audioclip.SAMPLE_RATE // 2]
    inputs = {
        "clip": torch.from_numpy(clip)[None],
        "pixels": audioclip.preprocess_image((INPUTS / "rocket.jpg").read_bytes())[None],
    }
    return {
        **inputs,
        "text": model.encode_text(TEXTS),
        "audio": model.encode_audio(inputs["clip"]),
        "image": model.encode_image(inputs["pixels"]),
    }


def test_prints_the_sha256_of_every_file_written(converted):
    lines = converted.stdout.strip().splitlines()
    paths = [converted.files[k] for k in ("all", "image", "text", "audio")]
    assert lines == [f"{file_sha256(p)}  {p}" for p in paths]
    assert not list(paths[0].parent.glob(".*partial*")), "temporary files were left behind"


def test_keys_and_tensors_are_the_checkpoints(converted, shared_checkpoint):
    source = audioclip.read_state_dict(shared_checkpoint)
    written = audioclip.read_state_dict(converted.files["all"])
    assert set(written) == set(source)
    assert all(torch.equal(written[k], source[k]) and written[k].dtype == source[k].dtype for k in source)
    for tower in ("image", "text", "audio"):
        part = audioclip.read_state_dict(converted.files[tower])
        assert set(part) == {k for k in source if tower_of(k) in (tower, "scales")}
        assert set(LOGIT_SCALE_KEYS) <= set(part)


def embeddings(model: audioclip.AudioCLIP, reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The reference inputs through every tower the model has."""
    run = {
        "text": lambda: model.encode_text(TEXTS),
        "image": lambda: model.encode_image(reference["pixels"]),
        "audio": lambda: model.encode_audio(reference["clip"]),
    }
    return {tower: run[tower]() for tower in model.towers}


def aligned_copy(path: Path, towers: tuple[str, ...]) -> audioclip.AudioCLIP:
    """The file's weights copied into fresh (64-byte aligned) memory."""
    weights = {k: v.clone() for k, v in audioclip.read_state_dict(path).items()}
    return audioclip.AudioCLIP.from_state_dict(weights, towers=towers)


def assert_embeds_like_the_pt_model(path: Path, towers: tuple[str, ...], reference: dict) -> None:
    """Loaded as users load it, the file embeds like the ``.pt``; on aligned copies, bit for bit.

    oneDNN picks kernels by memory alignment. Tensors memory-mapped from a ``.safetensors`` are
    only 4-byte aligned in the file (torch.load's are 64-byte aligned), so the convolution towers
    can differ in the last bits; the same weights copied to aligned memory must give identical
    outputs, which is the check that the conversion changed no weight.
    """
    for tower, out in embeddings(audioclip.AudioCLIP.from_checkpoint(path, towers=towers), reference).items():
        assert max_rel(out.numpy(), reference[tower].numpy()) < 1e-5, tower
    for tower, out in embeddings(aligned_copy(path, towers), reference).items():
        assert torch.equal(out, reference[tower]), tower


def test_safetensors_model_embeds_like_the_pt_model(converted, reference):
    assert_embeds_like_the_pt_model(converted.files["all"], ("image", "text", "audio"), reference)


def test_per_tower_file_builds_its_tower_only(converted, reference):
    assert_embeds_like_the_pt_model(converted.files["text"], ("text",), reference)
    with pytest.raises(audioclip.CheckpointError, match="missing keys"):
        audioclip.AudioCLIP.from_checkpoint(converted.files["text"], towers=("image",))


def test_a_checkpoint_missing_a_key_is_refused_by_name(shared_checkpoint, tmp_path):
    state_dict = torch.load(shared_checkpoint, map_location="cpu", weights_only=True, mmap=True)
    del state_dict["visual.layer2.0.conv1.weight"]
    broken = tmp_path / "broken.pt"
    torch.save(state_dict, broken)
    out = tmp_path / "broken.safetensors"
    result = run_script(broken, out, "--per-tower")
    assert result.returncode == 1
    assert "does not load strictly" in result.stderr and "visual.layer2.0.conv1.weight" in result.stderr
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.glob("*.safetensors")) and not list(tmp_path.glob(".*"))


def test_verification_catches_a_single_changed_bit(tmp_path):
    """The verifier itself must be able to fail: one flipped bit, a NaN payload, -0.0 vs 0.0."""
    source = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "scale": torch.tensor(0.0)}
    path = tmp_path / "ok.safetensors"
    convert.write_verified(source, path, {})
    convert.verify(path, source)  # identical: passes
    flipped = source["a"].clone()
    flipped.view(torch.int32)[1, 2] ^= 1
    with pytest.raises(convert.ConversionError, match="a: values differ"):
        convert.verify(path, {**source, "a": flipped})
    with pytest.raises(convert.ConversionError, match="scale: values differ"):
        convert.verify(path, {**source, "scale": torch.tensor(-0.0)})
    with pytest.raises(convert.ConversionError, match="missing key extra"):
        convert.verify(path, {**source, "extra": torch.zeros(1)})
    nan_a = torch.tensor([float("nan")])
    nan_b = nan_a.clone()
    nan_b.view(torch.int32)[0] ^= 1
    assert convert.bits_equal(nan_a, nan_a.clone()) and not convert.bits_equal(nan_a, nan_b)
