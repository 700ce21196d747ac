"""Where weights come from and how a tower is built to serve: the layer above the model modules.

``load_weights`` reads a checkpoint path (a released name must have its sha256) or makes
``synthetic:NAME`` weights; ``build_tower`` builds one tower on its device, in its dtype, with the
convolution layout rule (``conv_layout``). The serving replicas, the CLI and the benchmarks all build
through here, so they run the same model.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from .backends import Backend, use_backend
from .checkpoint import read_state_dict, verify_known_checkpoint
from .model import AudioCLIP, AudioNorm
from .synthetic import synthetic_state_dict

SYNTHETIC_PREFIX = "synthetic:"


@dataclass(frozen=True)
class WeightsInfo:
    """What a set of weights is: ``kind`` real or synthetic, ``source`` (file name or
    ``synthetic:NAME``) and ``sha256`` (of the file, or of the synthetic arrays)."""

    kind: Literal["real", "synthetic"]
    source: str
    sha256: str


def digest_arrays(arrays: Mapping[str, np.ndarray]) -> str:
    """sha256 over the keys and bytes of a state_dict: an identity for in-memory weights."""
    h = hashlib.sha256()
    for key in sorted(arrays):
        h.update(key.encode())
        h.update(np.ascontiguousarray(arrays[key]).view(np.uint8).reshape(-1).data)
    return h.hexdigest()


def load_weights(checkpoint: str | os.PathLike) -> tuple[dict[str, np.ndarray], WeightsInfo]:
    """Checkpoint-named numpy arrays and their description, from a ``.pt`` / ``.safetensors`` path
    (a released checkpoint's name must have its sha256) or ``synthetic:NAME``."""
    checkpoint = os.fspath(checkpoint)
    if checkpoint.startswith(SYNTHETIC_PREFIX):
        arrays = synthetic_state_dict(checkpoint.removeprefix(SYNTHETIC_PREFIX) or "demo")
        return arrays, WeightsInfo("synthetic", checkpoint, digest_arrays(arrays))
    path = Path(checkpoint).expanduser()
    sha256 = verify_known_checkpoint(path)
    arrays = {key: tensor.numpy() for key, tensor in read_state_dict(path).items()}
    return arrays, WeightsInfo("real", path.name, sha256)


@dataclass(frozen=True)
class TowerBuild:
    """How one tower runs: device, dtype, the convolution layout (None: the measured default), and
    the runtime of its hot part (``audioclip.backends``; ``threads`` None: torch's thread count)."""

    device: str = "cpu"
    dtype: str | None = None  # fp32 / fp16 / bf16 (image and text towers)
    channels_last: bool | None = None
    fold_batchnorm: bool | None = None
    audio_norm: AudioNorm = "running"
    backend: Backend = "eager"
    int8: bool = False
    threads: int | None = None
    graph_cache: str | None = None  # None: audioclip.backends.DEFAULT_CACHE_DIR
    spin_wait: bool | None = None  # onnxruntime's idle threads spin (None: backends.SPIN_BY_TOWER)

    @property
    def precision(self) -> str:
        """What a runtime's graph computes in: ``int8``, else ``dtype`` (None: fp32). ``int8`` with a
        reduced ``dtype`` is two precisions at once, which ``use_backend`` refuses by name."""
        dtype = self.dtype or "fp32"
        if self.int8:
            return "int8" if dtype == "fp32" else f"int8 and {dtype}"
        return dtype


def conv_layout(
    tower: str, device: str, channels_last: bool | None, fold_batchnorm: bool | None, audio_norm: str
) -> tuple[bool, bool]:
    """(NHWC weights, BatchNorm folded) for a tower, from its settings or the measured defaults.

    NHWC: on for audio (1.16-1.26x on CPU) and on GPU; image on CPU gains only 1.08-1.09x at batch
    1-8, not worth a private 90 MiB copy of its conv weights per replica. Folding copies the conv
    weights too, so by default it is on exactly where NHWC is; never with per-clip audio statistics.
    Settings that cannot apply are refused earlier, when the serving settings are validated.
    """
    if tower == "text":
        return False, False
    nhwc = channels_last if channels_last is not None else (tower == "audio" or device == "cuda")
    foldable = not (tower == "audio" and audio_norm != "running")
    fold = foldable and (nhwc if fold_batchnorm is None else fold_batchnorm)
    return nhwc, fold


def resolve_device(wants_gpu: bool) -> str:
    """CUDA where the tower was given GPUs and one is present, else the CPU."""
    return "cuda" if wants_gpu and torch.cuda.is_available() else "cpu"


def build_tower(
    state: Mapping[str, object],
    tower: str,
    build: TowerBuild = TowerBuild(),
    weights_sha256: str | None = None,
) -> AudioCLIP:
    """One tower from checkpoint-named arrays (shared, not copied, on CPU), laid out by ``conv_layout``,
    its hot part on ``build.backend`` (graphs cached under ``weights_sha256``, computed when not given)."""
    device = resolve_device(build.device == "cuda")  # a CUDA build runs on the CPU where no GPU is seen
    runtime = build.backend != "eager"  # a runtime's dtype is its graph's precision; PyTorch keeps fp32
    dtype = None if runtime else build.dtype
    model = AudioCLIP.from_state_dict(state, device, (tower,), dtype=dtype, audio_norm=build.audio_norm)
    if runtime:
        if build.fold_batchnorm:
            model.fold_batchnorm()  # the runtimes fold BatchNorm themselves; unfolded, no private copy
        use_backend(
            model,
            tower,
            build.backend,
            weights_sha256=weights_sha256 or digest_arrays({k: np.asarray(v) for k, v in state.items()}),
            threads=build.threads or torch.get_num_threads(),
            precision=build.precision,
            cache_dir=Path(build.graph_cache).expanduser() if build.graph_cache else None,
            spin=build.spin_wait,
        )
        return model
    nhwc, fold = conv_layout(tower, device, build.channels_last, build.fold_batchnorm, model.audio_norm)
    if nhwc:
        model.use_channels_last(True)
    if fold:
        model.fold_batchnorm()
    return model
