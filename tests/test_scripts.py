"""The scripts a user runs, run as a user runs them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import audioclip

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_make_synthetic_checkpoint_loads_strictly(tmp_path, shared_weights, suffix):
    out = tmp_path / f"synthetic{suffix}"
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make_synthetic_checkpoint.py"), str(out), "--set", "shared"],
        check=True,
        capture_output=True,
    )
    model = audioclip.AudioCLIP.from_checkpoint(out, towers=("text",))
    expected = torch.from_numpy(shared_weights["token_embedding.weight"])
    assert torch.equal(model.text.token_embedding.weight, expected)


def test_download_script_fails_clearly_offline(tmp_path):
    """No network here: the script must exit non-zero with a message, not leave a bad file."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "https_proxy": "http://127.0.0.1:9"}
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "download_checkpoint.sh"), "no-such-file.pt", "0" * 64],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode != 0
    assert "could not download no-such-file.pt" in result.stderr
    assert not (ROOT / ".cache" / "no-such-file.pt").exists()


def test_fit_length_centres_like_the_reference():
    from audioclip.pipeline import fit_length

    clip = np.arange(10, dtype=np.float32)[None]
    assert fit_length(clip, 10) is clip
    assert fit_length(clip, 6).tolist() == [[2, 3, 4, 5, 6, 7]]
    padded = fit_length(clip, 14)
    assert (
        padded.shape == (1, 14)
        and padded[0, :2].tolist() == [0, 0]
        and padded[0, 2:12].tolist() == list(range(10))
    )
