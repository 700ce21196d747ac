"""Reading AudioCLIP checkpoints strictly.

The released ``AudioCLIP-*.pt`` files are flat state_dicts with the reference key names:
image keys under ``visual.``, audio keys under ``audio.``, text keys at the top level
(``transformer.*``, ``token_embedding.weight``, ...), plus three logit scales. The model
keeps its text tower under ``text.``; this module maps between the two namings and checks
a state_dict against the architecture, listing every missing, unexpected or mis-shaped key.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import torch

from .errors import CheckpointError

LOGIT_SCALE_KEYS = ("logit_scale", "logit_scale_ai", "logit_scale_at")
_TEXT_TOP_LEVEL = ("positional_embedding", "text_projection")
_TEXT_PREFIXES = ("transformer.", "token_embedding.", "ln_final.")
_STRIP_PREFIXES = ("module.",)
_SHOWN_KEYS = 12


def tower_of(key: str) -> str | None:
    """Which part a checkpoint key belongs to: ``image``, ``text``, ``audio``, ``scales`` or None."""
    if key.startswith("visual."):
        return "image"
    if key.startswith("audio."):
        return "audio"
    if key in LOGIT_SCALE_KEYS:
        return "scales"
    if key in _TEXT_TOP_LEVEL or key.startswith(_TEXT_PREFIXES):
        return "text"
    return None


def tower_part(state_dict: Mapping[str, object], tower: str) -> dict[str, object]:
    """One tower's keys plus the logit scales: what a model built with ``towers=(tower,)`` needs."""
    return {k: v for k, v in state_dict.items() if tower_of(k.removeprefix("module.")) in (tower, "scales")}


def to_module_key(key: str) -> str:
    """Checkpoint key -> the model's parameter name (the text tower lives under ``text.``)."""
    return f"text.{key}" if tower_of(key) == "text" else key


def to_checkpoint_key(key: str) -> str:
    """The model's parameter name -> the reference checkpoint key."""
    return key.removeprefix("text.")


def strip_wrappers(state_dict: Mapping[str, object]) -> dict[str, object]:
    """Drop the ``module.`` prefix that DataParallel-trained checkpoints carry."""
    out: dict[str, object] = {}
    for key, value in state_dict.items():
        for prefix in _STRIP_PREFIXES:
            key = key.removeprefix(prefix)
        out[key] = value
    return out


def as_tensor(value: object, key: str) -> torch.Tensor:
    """A tensor view of a tensor or numpy array, without copying (read-only arrays included)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray | np.generic):
        array = np.asarray(value)
        with warnings.catch_warnings():
            # Shared-memory arrays from Ray's object store are read-only; the model never writes them.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return torch.from_numpy(array)
    raise CheckpointError(f"value of {key!r} is a {type(value).__name__}, not a tensor or numpy array")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a ``.pt``/``.pth`` (``weights_only``, memory-mapped) or ``.safetensors`` state_dict."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            loaded: object = load_file(str(path), device="cpu")
        else:
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # torch/safetensors raise many types for a bad file
        raise CheckpointError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from exc
    if isinstance(loaded, Mapping) and set(loaded) == {"state_dict"}:
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping):
        raise CheckpointError(f"checkpoint {path} holds a {type(loaded).__name__}, not a state_dict")
    return {str(k): as_tensor(v, str(k)) for k, v in loaded.items()}


def _listing(title: str, keys: Iterable[str]) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:_SHOWN_KEYS])
    more = f" (+{len(keys) - _SHOWN_KEYS} more)" if len(keys) > _SHOWN_KEYS else ""
    return f"{len(keys)} {title}: {shown}{more}"


def select_for_model(
    state_dict: Mapping[str, object], expected: Mapping[str, torch.Tensor], towers: Iterable[str]
) -> dict[str, torch.Tensor]:
    """Check a checkpoint-named state_dict against ``expected`` (module-named) and rename it.

    Keys of towers that were not asked for are skipped; keys that belong to no tower,
    keys missing for a requested tower and shape or kind mismatches raise one
    ``CheckpointError`` naming them all.
    """
    wanted = set(towers) | {"scales"}
    selected: dict[str, torch.Tensor] = {}
    given: set[str] = set()
    unexpected: list[str] = []
    mismatched: list[str] = []
    for key, value in strip_wrappers(state_dict).items():
        part = tower_of(key)
        if part is None:
            unexpected.append(key)
            continue
        if part not in wanted:
            continue
        name = to_module_key(key)
        if name not in expected:
            unexpected.append(key)
            continue
        given.add(name)
        tensor = as_tensor(value, key)
        want = expected[name]
        if tuple(tensor.shape) != tuple(want.shape):
            mismatched.append(f"{key} {list(tensor.shape)} (expected {list(want.shape)})")
            continue
        if tensor.is_floating_point() != want.is_floating_point():
            mismatched.append(f"{key} dtype {tensor.dtype} (expected {want.dtype})")
            continue
        if tensor.is_floating_point() and tensor.dtype != want.dtype:
            tensor = tensor.to(want.dtype)
        selected[name] = tensor
    missing = [to_checkpoint_key(k) for k in expected if k not in given]
    problems = []
    if missing:
        problems.append(_listing("missing keys", missing))
    if unexpected:
        problems.append(_listing("unexpected keys", unexpected))
    if mismatched:
        problems.append(_listing("mis-shaped keys", mismatched))
    if problems:
        raise CheckpointError("checkpoint does not match AudioCLIP: " + "; ".join(problems))
    return selected


# sha256 of the AudioCLIP v0.1 release files; a file with one of these names must match.
KNOWN_CHECKPOINTS = {
    "AudioCLIP-Full-Training.pt": "2441d35b353352c8b1bbfb8f7c687f46314c3d2909e940eaf763b8c17f632c44",
    "AudioCLIP-Partial-Training.pt": "1921885b6c3b5de0619f2ef4a9700ecbade758a398b34eb064230c30baef0c75",
}


def file_sha256(path: str | os.PathLike, chunk_bytes: int = 8 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def verify_known_checkpoint(path: str | os.PathLike) -> str:
    """The file's sha256; for a released checkpoint's name, it must be the released file's."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    sha256 = file_sha256(path)
    expected = KNOWN_CHECKPOINTS.get(path.name)
    if expected is not None and sha256 != expected:
        raise CheckpointError(
            f"{path.name} has sha256 {sha256}, not the released {expected}: the file is corrupt or "
            "incomplete; download it again"
        )
    return sha256
