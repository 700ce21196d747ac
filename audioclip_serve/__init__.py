"""Tools around the audioclip-serve service: a typed HTTP client and the ``audioclip-embed`` CLI.

The client needs only httpx, numpy and tqdm (no torch, no Ray), so it can run on machines that
just call the service.
"""

from .client import (
    AudioCLIPClient,
    AudioCLIPClientError,
    AudioCLIPConnectionError,
    AudioCLIPHTTPError,
    MediaInput,
    RankResult,
)

__all__ = [
    "AudioCLIPClient",
    "AudioCLIPClientError",
    "AudioCLIPConnectionError",
    "AudioCLIPHTTPError",
    "MediaInput",
    "RankResult",
]
