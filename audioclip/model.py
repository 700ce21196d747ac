"""The AudioCLIP model: any subset of the three towers plus the checkpoint's logit scales.

Construction goes through ``from_checkpoint`` / ``from_state_dict``: modules are built on
the meta device and the weights are *assigned*, never copied on CPU, so replicas that map
the same memory (an mmap'd file, Ray's shared object store) share it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Literal, NamedTuple

import numpy as np
import torch
from torch import nn

from . import checkpoint as ckpt
from .audio import ESResNeXtFBSP
from .batching import length_groups, pad_token_ids, split_overhead_tokens
from .config import TOWERS, AudioCLIPConfig
from .errors import CheckpointError, InvalidInputError, Reason
from .fusion import fold_batchnorms
from .image import ModifiedResNet
from .text import TextTower
from .tokenizer import tokenize_to_ids

AudioNorm = Literal["running", "per_clip"]
_DTYPES = {
    None: None,
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}
LOGIT_SCALE_MAX = 100.0


class LogitScales(NamedTuple):
    """exp(logit scale) of each modality pair, clamped to [1, 100] as AudioCLIP does."""

    image_text: float
    audio_image: float
    audio_text: float

    @classmethod
    def of(cls, state_dict: Mapping[str, object]) -> LogitScales:
        """From a checkpoint's three ``logit_scale*`` entries (tensors or numpy arrays)."""
        state = ckpt.strip_wrappers(state_dict)
        return cls(*(_scale(ckpt.as_tensor(state[key], key)) for key in ckpt.LOGIT_SCALE_KEYS))


def _scale(logit_scale: torch.Tensor) -> float:
    return float(logit_scale.detach().float().exp().clamp(1.0, LOGIT_SCALE_MAX))


def _resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of fp32, fp16, bf16, got {dtype!r}")
    return _DTYPES[dtype]


def _check_towers(towers: Sequence[str]) -> tuple[str, ...]:
    if isinstance(towers, str):
        towers = (towers,)
    unknown = set(towers) - set(TOWERS)
    if unknown or not towers:
        raise ValueError(f"towers must be a non-empty subset of {TOWERS}, got {tuple(towers)}")
    return tuple(t for t in TOWERS if t in towers)


def l2_normalized(rows: np.ndarray) -> np.ndarray:
    """Unit-length rows (all-zero rows stay zero)."""
    return rows / np.maximum(np.linalg.norm(rows, axis=-1, keepdims=True), 1e-12)


class AudioCLIP(nn.Module):
    """Image, text and audio towers mapping into one ``embed_dim`` space (unnormalised outputs)."""

    def __init__(self, config: AudioCLIPConfig | None = None, towers: Sequence[str] = TOWERS) -> None:
        super().__init__()
        self.config = config = config or AudioCLIPConfig()
        self.towers = _check_towers(towers)
        if "image" in self.towers:
            self.visual = ModifiedResNet(
                config.vision_layers,
                config.embed_dim,
                config.vision_heads,
                config.image_resolution,
                config.vision_width,
            )
        if "text" in self.towers:
            self.text = TextTower(
                config.context_length,
                config.vocab_size,
                config.transformer_width,
                config.transformer_heads,
                config.transformer_layers,
                config.embed_dim,
            )
        if "audio" in self.towers:
            self.audio = ESResNeXtFBSP(
                config.audio_layers, config.embed_dim, config.n_fft, config.hop_length, config.win_length
            )
        self.logit_scale = nn.Parameter(torch.ones([]))
        self.logit_scale_ai = nn.Parameter(torch.full([], math.log(100.0)))
        self.logit_scale_at = nn.Parameter(torch.full([], math.log(100.0)))
        self.audio_norm: AudioNorm = "running"
        self.channels_last = False
        self.batchnorm_folded = False

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        device: str | torch.device = "cpu",
        towers: Sequence[str] = TOWERS,
        *,
        dtype: str | torch.dtype | None = None,
        audio_norm: AudioNorm = "running",
        config: AudioCLIPConfig | None = None,
    ) -> AudioCLIP:
        """Load a released ``.pt`` (weights_only, mmap) or ``.safetensors`` checkpoint strictly."""
        state_dict = ckpt.read_state_dict(path)
        return cls.from_state_dict(
            state_dict, device, towers, dtype=dtype, audio_norm=audio_norm, config=config
        )

    @classmethod
    def from_state_dict(
        cls,
        state_dict: Mapping[str, object],
        device: str | torch.device = "cpu",
        towers: Sequence[str] = TOWERS,
        *,
        dtype: str | torch.dtype | None = None,
        audio_norm: AudioNorm = "running",
        config: AudioCLIPConfig | None = None,
    ) -> AudioCLIP:
        """Build the requested towers from checkpoint-named tensors or numpy arrays, without copying on CPU.

        ``dtype`` (fp16/bf16) applies to the image and text towers; the audio tower stays fp32
        because its log-spectrogram front end is rounding-sensitive.
        """
        device = torch.device(device)
        half = _resolve_dtype(dtype)
        with torch.device("meta"):
            model = cls(config, towers)
        selected = ckpt.select_for_model(state_dict, model.state_dict(keep_vars=True), model.towers)
        model.load_state_dict(selected, strict=True, assign=True)
        leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if leftover:
            raise CheckpointError(f"tensors left unloaded: {leftover}")
        model.to(device)
        if half is not None and half != torch.float32:
            for name in ("visual", "text"):
                if hasattr(model, name):
                    getattr(model, name).to(half)
        model.set_audio_norm(audio_norm)
        return model.eval().requires_grad_(False)

    def set_audio_norm(self, mode: AudioNorm) -> None:
        """``running``: BatchNorm running statistics (reference eval mode). ``per_clip``: each clip's own."""
        if mode not in ("running", "per_clip"):
            raise ValueError(f"audio_norm must be 'running' or 'per_clip', got {mode!r}")
        if self.batchnorm_folded and mode != "running":
            raise ValueError("the audio tower's BatchNorm was folded into its convs; per_clip needs it")
        self.audio_norm = mode
        if hasattr(self, "audio"):
            self.audio.set_per_sample_norm(mode == "per_clip")

    def use_channels_last(self, enabled: bool = True) -> AudioCLIP:
        """Store the convolution towers' weights NHWC, the layout oneDNN and cuDNN run fastest.

        On CPU this copies the conv weights, so replicas stop sharing that memory.
        """
        fmt = torch.channels_last if enabled else torch.contiguous_format
        for name in ("visual", "audio"):
            if hasattr(self, name):
                getattr(self, name).to(memory_format=fmt)
        self.channels_last = enabled
        return self

    def fold_batchnorm(self) -> AudioCLIP:
        """Fold the convolution towers' BatchNorms into the convs before them (inference only;
        ``audio_norm`` must be ``running``). Like channels_last, this copies the conv weights."""
        if hasattr(self, "audio") and self.audio_norm != "running":
            raise ValueError("audio_norm per_clip uses each clip's own statistics: BatchNorm cannot fold")
        for name in ("visual", "audio"):
            if hasattr(self, name):
                fold_batchnorms(getattr(self, name))
        self.batchnorm_folded = True  # the folded conv weights keep their memory format (NHWC stays NHWC)
        return self

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    @property
    def logit_scales(self) -> LogitScales:
        return LogitScales(_scale(self.logit_scale), _scale(self.logit_scale_ai), _scale(self.logit_scale_at))

    def _tower(self, name: str, attr: str) -> nn.Module:
        if name not in self.towers:
            raise RuntimeError(f"this model was built without the {name} tower (towers={self.towers})")
        return getattr(self, attr)

    # ------------------------------------------------------------------ encoders
    @torch.inference_mode()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, 3, R, R]`` CLIP-normalised pixels -> ``[B, embed_dim]`` float32 features."""
        visual = self._tower("image", "visual")
        size = self.config.image_resolution
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, size, size):
            raise InvalidInputError(
                f"pixels must be [B, 3, {size}, {size}], got {list(pixels.shape)}", reason=Reason.BAD_SHAPE
            )
        pixels = pixels.to(self.device)
        if self.channels_last:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        return visual(pixels).float()

    @torch.inference_mode()
    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, L]`` BPE ids (SOT ... EOT, zero padded) -> ``[B, embed_dim]`` float32 features."""
        text = self._tower("text", "text")
        return text(tokens.to(self.device)).float()

    def encode_token_ids(
        self, ids: Sequence[Sequence[int]], overhead_tokens: int | None = None
    ) -> torch.Tensor:
        """Unpadded token id lists -> ``[B, embed_dim]`` float32 on the model's device; texts of very
        different lengths run in separate forwards (``batching.length_groups``; ``overhead_tokens``
        defaults to the device's), each only as long as its longest text."""
        if overhead_tokens is None:
            overhead_tokens = split_overhead_tokens(self.device)
        out = torch.empty(len(ids), self.config.embed_dim, device=self.device)
        for group in length_groups([len(x) for x in ids], overhead_tokens):
            out[group] = self.encode_tokens(pad_token_ids([ids[i] for i in group]))
        return out

    def encode_text(self, texts: Sequence[str], truncate: bool = False) -> torch.Tensor:
        """One string per item -> ``[B, embed_dim]`` (``encode_token_ids`` of the BPE ids)."""
        return self.encode_token_ids(tokenize_to_ids(texts, self.config.context_length, truncate=truncate))

    @torch.inference_mode()
    def encode_audio(self, waveform: torch.Tensor) -> torch.Tensor:
        """``[B, C, N]`` 44.1 kHz int16-range audio, C = 1 or 2 -> ``[B, embed_dim]`` float32 features."""
        audio = self._tower("audio", "audio")
        if waveform.ndim != 3 or waveform.shape[1] not in (1, 2) or waveform.shape[2] == 0:
            raise InvalidInputError(
                f"waveform must be [B, C in (1, 2), N > 0], got {list(waveform.shape)}",
                reason=Reason.BAD_SHAPE,
            )
        return audio(waveform.to(self.device, torch.float32))


def checkpoint_layout(config: AudioCLIPConfig | None = None) -> dict[str, tuple[tuple[int, ...], bool]]:
    """Every checkpoint key of the full model with its shape and whether it is floating point."""
    with torch.device("meta"):
        model = AudioCLIP(config)
    return {
        ckpt.to_checkpoint_key(name): (tuple(t.shape), t.is_floating_point())
        for name, t in model.state_dict(keep_vars=True).items()
    }
