"""How a batch of items is cut into forwards: texts by length, clips by shape.

Pure functions over lengths and shapes (no model, no tensors of weights), shared by the text and
audio pipelines and ``AudioCLIP.encode_text``.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

# A text forward's fixed cost in padded tokens (rows x length), below which splitting a batch by
# length does not pay. On CPU (2-core AVX2) a forward costs ~48 ms + ~1.7 ms per padded token row,
# so ~28 rows; 64 keeps a margin. On a GPU a forward's kernel launches cost about as much as
# thousands of tokens (an estimate, not yet measured here).
SPLIT_OVERHEAD_TOKENS = {"cpu": 64, "cuda": 4096}


def split_overhead_tokens(device: torch.device | str) -> int:
    return SPLIT_OVERHEAD_TOKENS.get(torch.device(device).type, SPLIT_OVERHEAD_TOKENS["cuda"])


def length_groups(lengths: Sequence[int], overhead_tokens: int) -> list[list[int]]:
    """Split a text batch into forwards by length, where that costs fewer padded tokens.

    A forward pads every text to its longest, so a batch mixing short queries with long sentences
    spends most of its work on padding. The batch's indices, sorted by length, are split at the
    point that most lowers ``rows x longest`` summed over the parts, each part counting
    ``overhead_tokens`` more for its fixed per-forward cost; each part is split again the same
    way. Returns index lists (ascending length); a uniform batch stays one group.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    pending = [order] if order else []
    while pending:
        part = pending.pop()
        sizes = [lengths[i] for i in part]
        best_cost, best_at = len(part) * sizes[-1], 0
        for k in range(1, len(part)):
            cost = k * sizes[k - 1] + (len(part) - k) * sizes[-1] + overhead_tokens
            if cost < best_cost:
                best_cost, best_at = cost, k
        if best_at:
            pending += [part[best_at:], part[:best_at]]
        else:
            groups.append(part)
    return sorted(groups, key=lambda g: lengths[g[0]])


def equal_groups(keys: Sequence[Hashable]) -> list[list[int]]:
    """Indices grouped by equal key, in first-seen order (clips of one shape run together: padding
    would change their embeddings)."""
    groups: dict[Hashable, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def pad_token_ids(ids: Sequence[Sequence[int]]) -> torch.Tensor:
    """Zero-pad token id lists to the longest one: ``[B, L_max]`` int64."""
    length = max((len(x) for x in ids), default=1)
    out = torch.zeros(len(ids), length, dtype=torch.long)
    for row, seq in enumerate(ids):
        out[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    return out
