"""Calling audioclip-serve over HTTP with httpx: text, an image file, an audio file, npy output.

.venv/bin/python examples/http_client.py [http://127.0.0.1:8000]
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import httpx
import numpy as np

INPUTS = Path(__file__).resolve().parents[1] / "tests" / "data" / "golden" / "inputs"


def main(base_url: str) -> None:
    with httpx.Client(base_url=base_url, timeout=60) as client:
        texts = client.post("/v1/embed/text", json={"texts": ["a rocket launch", "rain"], "normalize": True})
        text_emb = np.asarray(texts.json()["embeddings"], dtype=np.float32)
        image = client.post(
            "/v1/embed/image?normalize=true",
            content=(INPUTS / "rocket.jpg").read_bytes(),
            headers={"content-type": "image/jpeg", "accept": "application/x-npy"},
        )
        image_emb = np.load(io.BytesIO(image.content))
        audio = client.post(
            "/v1/embed/audio?normalize=true",
            files=[("file", ("rain.wav", (INPUTS / "speech_rain_22k.wav").read_bytes(), "audio/wav"))],
        )
        audio_emb = np.asarray(audio.json()["embeddings"], dtype=np.float32)
        print("image . texts:", image_emb @ text_emb.T)
        print("audio . texts:", audio_emb @ text_emb.T)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8000")
