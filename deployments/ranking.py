"""Cross-modal ranking and zero-shot classification, scored the way AudioCLIP computes its logits.

``probability`` is the softmax over candidates of ``scale * cosine``, with the checkpoint's own
logit scale for the modality pair (image-text, audio-image, audio-text). Same-modality pairs have
no trained scale; they use the image-text one.
"""

from __future__ import annotations

import numpy as np

from audioclip.model import l2_normalized

MODALITIES = ("text", "image", "audio")


def pair_scale(a: str, b: str, scales: dict[str, float]) -> float:
    pair = frozenset((a, b))
    if pair == frozenset(("audio", "image")):
        return scales["audio_image"]
    if pair == frozenset(("audio", "text")):
        return scales["audio_text"]
    return scales["image_text"]


def rank(
    query: np.ndarray,
    query_modality: str,
    candidates: np.ndarray,
    candidate_modalities: list[str],
    scales: dict[str, float],
    top_k: int | None = None,
) -> list[dict]:
    """Candidates sorted by score, each with its input index, cosine and probability."""
    cosine = l2_normalized(candidates) @ l2_normalized(query)
    logits = np.array([pair_scale(query_modality, m, scales) for m in candidate_modalities]) * cosine
    logits -= logits.max()
    weights = np.exp(logits)
    probability = weights / weights.sum()
    order = np.argsort(-logits, kind="stable")[: top_k or len(cosine)]
    return [
        {
            "index": int(i),
            "modality": candidate_modalities[i],
            "cosine": float(cosine[i]),
            "probability": float(probability[i]),
        }
        for i in order
    ]
