"""Architecture hyper-parameters of AudioCLIP, with the reference defaults.

One dataclass drives the factory (`AudioCLIP.__init__`): towers are built from these
numbers, so a checkpoint of another width fails loudly on shapes instead of silently.
"""

from __future__ import annotations

from dataclasses import dataclass

TOWERS: tuple[str, ...] = ("image", "text", "audio")


@dataclass(frozen=True)
class AudioCLIPConfig:
    """Every constructor default of the reference ``AudioCLIP`` class that shapes the weights."""

    embed_dim: int = 1024
    # image tower: CLIP ModifiedResNet (RN50)
    image_resolution: int = 224
    vision_layers: tuple[int, int, int, int] = (3, 4, 6, 3)
    vision_width: int = 64
    # text tower: CLIP transformer
    context_length: int = 77
    vocab_size: int = 49408
    transformer_width: int = 512
    transformer_heads: int = 8
    transformer_layers: int = 12
    # audio tower: ESResNeXt-fbsp
    audio_layers: tuple[int, int, int, int] = (3, 4, 6, 3)
    n_fft: int = 2048
    hop_length: int = 561
    win_length: int = 1654
    sample_rate: int = 44100
    audio_attention: bool = True

    @property
    def vision_heads(self) -> int:
        """RN50 uses 32 heads in its attention pool: width * 32 // 64."""
        return self.vision_width * 32 // 64
