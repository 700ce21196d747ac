"""AudioCLIP's audio tower: a learnable FBSP spectrogram front end and ESResNeXt-50 with attention gates.

Parameter names follow the reference checkpoint under the ``audio.`` prefix. The front end
(LinearFBSP) depends only on its three parameter vectors, so its filter bank is built once
and cached until the parameters change; the reference rebuilds it on every call.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

INT16_MIN, INT16_MAX = -32768.0, 32767.0
LOG10_EPS = 1e-18
FBSP_EPS = 1e-8


class AudioBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm that can normalise each sample with its own statistics instead of running ones.

    ``per_sample=True`` reproduces what the later Jina audio executor did (batch statistics on
    one clip at a time) while keeping a clip's embedding independent of its batch-mates.
    """

    per_sample: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.per_sample:
            return super().forward(x)
        # Statistics over each sample's own map; a 1x1 map (the last gate) gives var 0 -> output = bias.
        var, mean = torch.var_mean(x, dim=(2, 3), unbiased=False, keepdim=True)
        scale = self.weight.view(1, -1, 1, 1) * torch.rsqrt(var + self.eps)
        return (x - mean) * scale + self.bias.view(1, -1, 1, 1)


class LinearFBSP(nn.Module):
    """Frequency B-spline filter bank: a learnable complex linear map from frames to spectra."""

    def __init__(self, out_features: int, in_features: int, normalized: bool = True) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.normalized = normalized
        self.m = nn.Parameter(torch.zeros(out_features))
        self.fb = nn.Parameter(torch.ones(out_features))
        self.fc = nn.Parameter(torch.arange(out_features, dtype=torch.get_default_dtype()))
        # The reference keeps an empty bias; it is a key of the released checkpoints.
        self.bias = nn.Parameter(torch.empty(0))
        self._cache_key: tuple | None = None
        self._cache: tuple[torch.Tensor, torch.Tensor] | None = None

    def complex_weights(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """The filter bank as (real, imaginary) ``[out, in]`` matrices, computed as the reference does."""
        t = (
            math.pi * torch.linspace(-1.0, 1.0, self.in_features, dtype=dtype, device=self.m.device)
            + FBSP_EPS
        )
        t = t.view(1, -1)
        m = self.m.to(dtype).view(-1, 1)
        fb = self.fb.to(dtype).view(-1, 1)
        fc = self.fc.to(dtype).view(-1, 1)
        kernel_re, kernel_im = torch.cos(fc * t), -torch.sin(fc * t)
        arg = fb * t / (m + FBSP_EPS)
        sinc = torch.where(arg != 0, torch.sin(arg) / arg, torch.ones_like(arg))
        # Complex power (sinc + 0j) ** m: magnitude |sinc|**m, phase m*pi where sinc < 0.
        magnitude = (sinc * sinc) ** (0.5 * m)
        angle = m * torch.where(sinc < 0, torch.full_like(sinc, math.pi), torch.zeros_like(sinc))
        win_re, win_im = magnitude * torch.cos(angle), magnitude * torch.sin(angle)
        scale = fb.sqrt()
        weight_re = scale * (win_re * kernel_re - win_im * kernel_im)
        weight_im = scale * (win_re * kernel_im + win_im * kernel_re)
        if self.normalized:
            weight_re = weight_re / self.in_features**0.5
            weight_im = weight_im / self.in_features**0.5
        return weight_re, weight_im

    def cached_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``complex_weights()``, rebuilt only when m, fb or fc change (new tensor or in-place edit)."""
        if torch.is_grad_enabled() and self.m.requires_grad:  # training: gradients must flow
            return self.complex_weights()
        key = tuple((p.data_ptr(), p._version, p.device, p.dtype) for p in (self.m, self.fb, self.fc))
        if self._cache is None or key != self._cache_key:
            with torch.no_grad():
                self._cache = self.complex_weights()
            self._cache_key = key
        return self._cache

    def forward(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weight_re, weight_im = self.cached_weights()
        return F.linear(frames, weight_re), F.linear(frames, weight_im)


class Attention2d(nn.Module):
    """Attention gate: pooled input -> depthwise conv -> pointwise conv -> BN -> sigmoid."""

    FOLDABLE = (("conv_point", "bn"),)  # BatchNorm right after a conv (audioclip.fusion)

    def __init__(
        self, in_channels: int, out_channels: int, kernel: tuple[int, int], padding: tuple[int, int]
    ):
        super().__init__()
        self.conv_depth = nn.Conv2d(in_channels, in_channels, kernel, padding=padding, groups=in_channels)
        self.conv_point = nn.Conv2d(in_channels, out_channels, 1)
        self.bn = AudioBatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        x = F.adaptive_max_pool2d(x, size)
        return torch.sigmoid(self.bn(self.conv_point(self.conv_depth(x))))


class Bottleneck(nn.Module):
    """torchvision's ResNeXt bottleneck (32 groups x 4 wide), stride on the grouped 3x3 conv."""

    expansion = 4
    FOLDABLE = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))

    def __init__(self, inplanes: int, planes: int, stride: int = 1, groups: int = 32, base_width: int = 4):
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = AudioBatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, groups=groups, bias=False)
        self.bn2 = AudioBatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, 1, bias=False)
        self.bn3 = AudioBatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes * self.expansion:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes * self.expansion, 1, stride=stride, bias=False),
                AudioBatchNorm2d(planes * self.expansion),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


# (in, out, kernel, padding) of the five attention gates.
_GATES = (
    (64, 256, (3, 1), (1, 0)),
    (256, 512, (1, 5), (0, 2)),
    (512, 1024, (3, 1), (1, 0)),
    (1024, 2048, (1, 5), (0, 2)),
    (2048, 2048, (3, 5), (1, 2)),
)


class ESResNeXtFBSP(nn.Module):
    """Waveform ``[B, C, N]`` (int16 range, 44.1 kHz, C = 1 or 2) -> ``[B, embed_dim]``.

    Each channel runs through the CNN on its own; the pooled features are summed over
    channels before the final projection, as in the reference.
    """

    FOLDABLE = (("conv1", "bn1"),)

    def __init__(
        self,
        layers: tuple[int, ...] = (3, 4, 6, 3),
        num_classes: int = 1024,
        n_fft: int = 2048,
        hop_length: int = 561,
        win_length: int = 1654,
    ) -> None:
        super().__init__()
        self.n_fft, self.hop_length, self.win_length = n_fft, hop_length, win_length
        self.register_buffer("window", torch.empty(win_length))
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = AudioBatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self._inplanes = 64
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        self.layer3 = self._make_layer(256, layers[2], stride=2)
        self.layer4 = self._make_layer(512, layers[3], stride=2)
        for i, (cin, cout, kernel, padding) in enumerate(_GATES, start=1):
            self.add_module(f"att{i}", Attention2d(cin, cout, kernel, padding))
        self.fc = nn.Linear(512 * Bottleneck.expansion, num_classes)
        self.fbsp = LinearFBSP(out_features=n_fft // 2 + 1, in_features=n_fft)
        self.frames_runtime: nn.Module | None = None  # embed_frames on another runtime (audioclip.backends)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        layers = [Bottleneck(self._inplanes, planes, stride)]
        self._inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self._inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def set_per_sample_norm(self, per_sample: bool) -> None:
        """Switch every BatchNorm between running statistics and each clip's own statistics."""
        for module in self.modules():
            if isinstance(module, AudioBatchNorm2d):
                module.per_sample = per_sample

    def frames(self, x: torch.Tensor) -> torch.Tensor:
        """``[B*C, N]`` signal in [-1, 1] -> zero-padded, windowed ``[B*C, T, n_fft]`` frames."""
        n = x.shape[-1]
        num_frames = 1 if n <= self.win_length else 1 + math.ceil((n - self.win_length) / self.hop_length)
        pad = (num_frames - 1) * self.hop_length + self.win_length - n
        if pad > 0:
            x = F.pad(x, (pad // 2, pad - pad // 2))
        frames = x.unfold(-1, self.win_length, self.hop_length) * self.window
        fft_pad = self.n_fft - self.win_length
        return F.pad(frames, (fft_pad // 2, fft_pad - fft_pad // 2))

    def waveform_frames(self, waveform: torch.Tensor) -> torch.Tensor:
        """``[B, C, N]`` int16-range audio -> ``[B*C, T, n_fft]`` windowed frames of the [-1, 1] signal."""
        x = waveform.to(torch.float32).flatten(0, 1)
        return self.frames(((x - INT16_MIN) * 2.0) / (INT16_MAX - INT16_MIN) - 1.0)

    def spectrogram(self, frames: torch.Tensor) -> torch.Tensor:
        """``[B*C, T, n_fft]`` frames -> ``[B*C, 3, 341, T]`` dB images (low, mid, high bands)."""
        real, imag = self.fbsp(frames)  # [B*C, T, n_fft//2+1] each
        bins = 3 * ((self.n_fft // 2 + 1) // 3)
        power = real[..., :bins] ** 2 + imag[..., :bins] ** 2
        power = torch.where(power > 0, power, torch.full_like(power, LOG10_EPS))
        db = 10.0 * torch.log10(power)
        return db.transpose(1, 2).reshape(db.shape[0], 3, bins // 3, db.shape[1])

    def log_spectrogram(self, waveform: torch.Tensor) -> torch.Tensor:
        """``[B, C, N]`` int16-range audio -> ``[B*C, 3, 341, T]`` dB images."""
        return self.spectrogram(self.waveform_frames(waveform))

    def embed_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """``[B*C, T, n_fft]`` frames -> ``[B*C, 2048]`` features: nearly all of the tower's FLOPs, one
        float tensor in and out (the part ``audioclip.backends`` hands to another runtime)."""
        return self.features(self.spectrogram(frames))

    def features(self, spec: torch.Tensor) -> torch.Tensor:
        """``[B*C, 3, F, T]`` dB images -> ``[B*C, 2048]`` gated, pooled features."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(spec))))
        for i, layer in enumerate((self.layer1, self.layer2, self.layer3, self.layer4), start=1):
            gate_input = x
            x = layer(x)
            x = x * getattr(self, f"att{i}")(gate_input, x.shape[-2:])
        pooled = F.adaptive_avg_pool2d(x, 1) * self.att5(x, (1, 1))
        return pooled.flatten(1)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        if waveform.ndim == 2:
            waveform = waveform.unsqueeze(1)
        if waveform.ndim != 3:
            raise ValueError(f"audio must be [B, C, N] or [B, N], got {list(waveform.shape)}")
        batch, channels = waveform.shape[:2]
        trunk = self.frames_runtime if self.frames_runtime is not None else self.embed_frames
        feats = trunk(self.waveform_frames(waveform))
        return self.fc(feats.view(batch, channels, -1).sum(dim=1))
