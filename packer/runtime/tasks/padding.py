"""Right-padding of token windows into one batch (shared by the service's batcher and evaluation)."""

from __future__ import annotations

import numpy as np

# The one home of batch budgets, for the service's batcher and for evaluation alike. Tokens are padded
# tokens per batch (batch x longest window): on CPU a big batch of long windows gains nothing and its
# padding costs, a GPU needs many tokens in flight.
MAX_BATCH_SIZE = 32
BATCH_TOKENS = {"cpu": 1024, "cuda": 16384}


def batch_tokens(device: str) -> int:
    return BATCH_TOKENS["cuda" if device == "cuda" else "cpu"]


def pad(items: list, pad_id: int, multiple: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int]:
    """Right-pad windows (anything with input_ids, token_type_ids, length) into one batch, to the longest
    rounded up to `multiple` (8 on CUDA: tensor cores and fused attention want aligned lengths)."""
    longest = -(-max(it.length for it in items) // multiple) * multiple
    ids = np.full((len(items), longest), pad_id, dtype=np.int64)
    mask = np.zeros((len(items), longest), dtype=np.int64)
    types = np.zeros((len(items), longest), dtype=np.int64) if items[0].token_type_ids is not None else None
    for row, it in enumerate(items):
        ids[row, : it.length] = it.input_ids
        mask[row, : it.length] = 1
        if types is not None and it.token_type_ids is not None:
            types[row, : it.length] = it.token_type_ids
    return ids, mask, types, longest
