"""Shared fixtures: golden data, synthetic-v1 checkpoints and one model per test session."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

# Token auth for every cluster the tests start or join, set before anything imports Ray: Ray reads the
# mode once per process, so a driver joining a `ray start --head` cluster (test_elastic) must not
# depend on an earlier module's local `ray.init()` having switched it on.
os.environ["RAY_AUTH_MODE"] = "token"

DATA = Path(__file__).parent / "data"
GOLDEN = DATA / "golden"
INPUTS = GOLDEN / "inputs"
SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str) -> ModuleType:
    """``scripts/<name>.py`` as a module (the scripts are not a package), for tests of their parts."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pytest_collection_modifyitems(config, items):
    """GPU tests run only where CUDA is present."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def one_torch_thread():
    """Forwards on one intra-op thread for this test. Two threads split a batch-1 forward inside the
    sample and a larger batch across samples, and that rounding differs by ~3e-4 relative for the
    audio tower on some CPUs (an Intel Xeon with AVX-512 here; 2e-7 on one thread): a test that
    compares one item alone with the same item among batch-mates compares only the batch-mates so."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def golden() -> dict[str, np.ndarray]:
    with np.load(GOLDEN / "golden.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="session")
def manifest() -> dict:
    return json.loads((GOLDEN / "manifest.json").read_text())


@pytest.fixture(scope="session")
def shared_weights() -> dict[str, np.ndarray]:
    """synthetic-v1 weights of the set the golden vectors were made with."""
    from audioclip import synthetic_state_dict

    return synthetic_state_dict("shared")


@pytest.fixture(scope="session")
def shared_checkpoint(shared_weights, tmp_path_factory) -> Path:
    """The shared weights saved in the released checkpoint format (flat state_dict, torch.save)."""
    path = tmp_path_factory.mktemp("ckpt") / "AudioCLIP-synthetic-shared.pt"
    torch.save({k: torch.from_numpy(v) for k, v in shared_weights.items()}, path)
    return path


@pytest.fixture(scope="session")
def model(shared_checkpoint):
    from audioclip import AudioCLIP

    return AudioCLIP.from_checkpoint(shared_checkpoint)


def max_rel(ours: np.ndarray, ref: np.ndarray) -> float:
    """max |ours - ref| / max |ref|, the golden README's relative error."""
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.atleast_2d(a).astype(np.float64), np.atleast_2d(b).astype(np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def assert_matches(served: np.ndarray, local: torch.Tensor | np.ndarray, min_cos: float) -> None:
    """What the service answered is the in-process model's embedding: float32, same shape, each row
    within ``min_cos`` cosine."""
    local = np.asarray(local)
    assert served.dtype == np.float32 and served.shape == local.shape
    assert row_cosines(served, local).min() >= min_cos
