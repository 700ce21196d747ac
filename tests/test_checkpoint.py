"""Strict checkpoint loading: the released format, its variants, and every way a file can be wrong."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch
from conftest import GOLDEN

import audioclip
from audioclip import AudioCLIP, CheckpointError
from audioclip.model import checkpoint_layout


def _reference_keys() -> list[tuple[str, list[int], str]]:
    rows = []
    for line in (GOLDEN / "keys.tsv").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, shape, dtype = line.split("\t")[:3]
            rows.append((key, [int(d) for d in shape.strip("[]").split(",") if d.strip()], dtype))
    return rows


def test_layout_equals_the_reference_state_dict():
    rows = _reference_keys()
    layout = checkpoint_layout()
    assert len(rows) == 861
    assert set(layout) == {k for k, _, _ in rows}
    for key, shape, dtype in rows:
        assert list(layout[key][0]) == shape, key
        assert layout[key][1] == (dtype == "float32"), key


def test_synthetic_weights_match_the_reference_dtypes(shared_weights):
    for key, _, dtype in _reference_keys():
        assert shared_weights[key].dtype == np.dtype(dtype), key
    assert shared_weights["audio.fbsp.bias"].shape == (0,)
    assert math.isclose(float(shared_weights["audio.window"].sum()), 593.3725, abs_tol=1e-3)


def test_synthetic_weights_are_deterministic_and_set_dependent(shared_weights):
    again = audioclip.synthetic_state_dict("shared")
    assert np.array_equal(again["visual.conv1.weight"], shared_weights["visual.conv1.weight"])
    other = audioclip.synthetic_state_dict("other")
    assert not np.array_equal(other["visual.conv1.weight"], shared_weights["visual.conv1.weight"])


def _tensors(weights):
    return {k: torch.from_numpy(v) for k, v in weights.items()}


def test_missing_key_is_named(shared_weights):
    sd = _tensors(shared_weights)
    del sd["visual.layer1.0.conv1.weight"], sd["ln_final.bias"]
    with pytest.raises(CheckpointError) as err:
        AudioCLIP.from_state_dict(sd)
    assert "2 missing keys" in str(err.value)
    assert "visual.layer1.0.conv1.weight" in str(err.value) and "ln_final.bias" in str(err.value)


def test_unexpected_key_is_named(shared_weights):
    sd = _tensors(shared_weights)
    sd["visual.layer9.0.conv1.weight"] = torch.zeros(1)
    sd["classifier.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as err:
        AudioCLIP.from_state_dict(sd)
    assert "2 unexpected keys" in str(err.value)
    assert "classifier.weight" in str(err.value) and "visual.layer9.0.conv1.weight" in str(err.value)


def test_wrong_shape_is_named(shared_weights):
    sd = _tensors(shared_weights)
    sd["audio.fc.weight"] = torch.zeros(527, 2048)  # the AudioSet head of ESRNXFBSP.pt
    with pytest.raises(CheckpointError) as err:
        AudioCLIP.from_state_dict(sd)
    assert "audio.fc.weight [527, 2048] (expected [1024, 2048])" in str(err.value)
    assert "missing" not in str(err.value)


def test_module_prefix_is_stripped(shared_weights, golden):
    sd = {f"module.{k}": torch.from_numpy(v) for k, v in shared_weights.items()}
    model = AudioCLIP.from_state_dict(sd, towers=("text",))
    emb = model.encode_tokens(torch.from_numpy(golden["text_tokens"][:1])).numpy()
    assert np.allclose(emb, golden["text_embedding"][:1], rtol=0, atol=1e-4 * np.abs(emb).max())


def test_safetensors_checkpoint(shared_weights, golden, tmp_path):
    from safetensors.numpy import save_file

    path = tmp_path / "audioclip.safetensors"
    save_file(dict(shared_weights), str(path))
    model = AudioCLIP.from_checkpoint(path, towers=("image",))
    emb = model.encode_image(torch.from_numpy(golden["image_input"][:1])).numpy()
    assert np.abs(emb - golden["image_embedding"][:1]).max() <= 1e-4 * np.abs(golden["image_embedding"]).max()


def test_tower_subset_builds_only_that_tower(shared_weights):
    only_text = {k: v for k, v in shared_weights.items() if not k.startswith(("visual.", "audio."))}
    model = AudioCLIP.from_state_dict(only_text, towers=("text",))
    assert model.towers == ("text",)
    assert not hasattr(model, "visual") and not hasattr(model, "audio")
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == 63_690_240 + 3  # text tower + the three logit scales
    with pytest.raises(RuntimeError, match="without the image tower"):
        model.encode_image(torch.zeros(1, 3, 224, 224))
    with pytest.raises(CheckpointError, match="missing keys"):
        AudioCLIP.from_state_dict(only_text, towers=("text", "audio"))


def test_numpy_weights_are_used_in_place_not_copied(shared_weights):
    arrays = {k: v.copy() for k, v in shared_weights.items() if not k.startswith(("visual.", "audio."))}
    for array in arrays.values():
        array.flags.writeable = False  # as Ray's shared-memory object store hands them out
    model = AudioCLIP.from_state_dict(arrays, towers=("text",))
    weight = model.text.token_embedding.weight
    assert weight.data_ptr() == arrays["token_embedding.weight"].ctypes.data


def test_logit_scales_are_exp_and_clamped(shared_weights):
    sd = dict(shared_weights)
    sd["logit_scale"] = np.array(1.0, dtype=np.float32)  # CLIP init in this fork: e
    sd["logit_scale_ai"] = np.array(7.0, dtype=np.float32)  # exp(7) = 1096 -> clamped
    sd["logit_scale_at"] = np.array(-1.0, dtype=np.float32)  # exp(-1) < 1 -> clamped
    model = AudioCLIP.from_state_dict(sd, towers=("text",))
    assert model.logit_scales == audioclip.LogitScales(pytest.approx(math.e), 100.0, 1.0)
    # the weight store reads them straight from the arrays (DataParallel prefix included)
    wrapped = {f"module.{k}": v for k, v in sd.items()}
    assert audioclip.LogitScales.of(wrapped) == audioclip.LogitScales(pytest.approx(math.e), 100.0, 1.0)


def test_unreadable_and_unsafe_files(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        AudioCLIP.from_checkpoint(garbage)
    with pytest.raises(CheckpointError, match="not found"):
        AudioCLIP.from_checkpoint(tmp_path / "absent.pt")
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"visual.conv1.weight": torch.zeros(1), "payload": _Payload()}, unsafe)
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):  # weights_only refuses classes
        AudioCLIP.from_checkpoint(unsafe)
    listing = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], listing)
    with pytest.raises(CheckpointError, match="not a state_dict"):
        AudioCLIP.from_checkpoint(listing)


class _Payload:
    def __reduce__(self):
        return (pickle.loads, (b"N.",))


def test_reduced_precision_towers(shared_checkpoint, golden):
    model = AudioCLIP.from_checkpoint(shared_checkpoint, towers=("image", "audio"), dtype="bf16")
    assert model.visual.conv1.weight.dtype == torch.bfloat16
    assert model.audio.conv1.weight.dtype == torch.float32  # the audio tower stays fp32
    emb = model.encode_image(torch.from_numpy(golden["image_input"][:1])).numpy()
    ref = golden["image_embedding"][:1]
    cos = (emb * ref).sum(-1) / np.linalg.norm(emb, axis=-1) / np.linalg.norm(ref, axis=-1)
    assert emb.dtype == np.float32 and cos.min() > 0.99
    with pytest.raises(ValueError, match="dtype"):
        AudioCLIP.from_checkpoint(shared_checkpoint, towers=("text",), dtype="int8")


def test_a_released_checkpoint_name_with_other_bytes_is_refused_before_loading(shared_checkpoint, tmp_path):
    from audioclip.factory import load_weights

    impostor = tmp_path / "AudioCLIP-Full-Training.pt"
    impostor.write_bytes(shared_checkpoint.read_bytes())  # loadable, but not the released file
    with pytest.raises(CheckpointError, match="not the released"):
        load_weights(impostor)
    arrays, info = load_weights(shared_checkpoint)  # any other name loads, its sha256 reported
    assert info.kind == "real" and len(info.sha256) == 64 and "logit_scale" in arrays
