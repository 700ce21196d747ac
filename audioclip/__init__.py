"""AudioCLIP (arXiv 2106.13043) as a library: image, text and audio towers in one 1024-d space.

No serving code lives here; ``deployments/`` builds on this package.
"""

from .audio_input import SAMPLE_RATE, load_audio
from .checkpoint import read_state_dict
from .config import TOWERS, AudioCLIPConfig
from .errors import AudioCLIPError, CheckpointError, InvalidInputError, Reason, TextTooLongError
from .factory import TowerBuild, WeightsInfo, build_tower, load_weights
from .image_input import crop_to_uint8, normalize_pixels, preprocess_image, preprocess_images_torch
from .model import AudioCLIP, LogitScales
from .pipeline import (
    AudioItem,
    AudioPipeline,
    ImageItem,
    ImagePipeline,
    Limits,
    Options,
    Pipeline,
    TextItem,
    TextPipeline,
    pipelines,
)
from .synthetic import synthetic_state_dict
from .tokenizer import tokenize, tokenize_to_ids

__all__ = [
    "SAMPLE_RATE",
    "TOWERS",
    "AudioCLIP",
    "AudioCLIPConfig",
    "AudioCLIPError",
    "AudioItem",
    "AudioPipeline",
    "CheckpointError",
    "ImageItem",
    "ImagePipeline",
    "InvalidInputError",
    "Limits",
    "LogitScales",
    "Options",
    "Pipeline",
    "Reason",
    "TextItem",
    "TextPipeline",
    "TextTooLongError",
    "TowerBuild",
    "WeightsInfo",
    "build_tower",
    "crop_to_uint8",
    "load_audio",
    "load_weights",
    "normalize_pixels",
    "pipelines",
    "preprocess_image",
    "preprocess_images_torch",
    "read_state_dict",
    "synthetic_state_dict",
    "tokenize",
    "tokenize_to_ids",
]
