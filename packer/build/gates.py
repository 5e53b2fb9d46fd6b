"""Magnitude gates: a masks file that closes the weakest heads and FFN dims of a checkpoint.

A quick way to make a pruned model from a dense one (no data needed): a head scores the product
of the norms of its value rows and attention-output columns, an FFN dim that of its input row and
output column. The lowest-scoring fraction of each is closed, globally across layers.
"""

from __future__ import annotations

import torch

from packer.build.checkpoint import Source


def magnitude_scores(source: Source) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer: each head's and each FFN dim's weight-magnitude score."""
    spec, state, d = source.spec, source.state_dict, source.head_dim
    head_scores, ffn_scores = [], []
    for i in range(source.num_layers):
        v = state[spec.layer(i, "value") + ".weight"].reshape(source.num_heads, d, -1)
        o = state[spec.layer(i, "attn_out") + ".weight"].reshape(-1, source.num_heads, d)
        head_scores.append(v.norm(dim=(1, 2)) * o.norm(dim=(0, 2)))
        w1 = state[spec.layer(i, "ffn_in") + ".weight"]
        w2 = state[spec.layer(i, "ffn_out") + ".weight"]
        ffn_scores.append(w1.norm(dim=1) * w2.norm(dim=0))
    return head_scores, ffn_scores


def magnitude_gates(source: Source, heads_fraction: float, ffn_fraction: float) -> dict:
    if not (0 <= heads_fraction < 1 and 0 <= ffn_fraction < 1):
        raise ValueError("fractions must be in [0, 1)")
    head_scores, ffn_scores = magnitude_scores(source)
    masks: dict = {"heads": {}, "ffn": {}}
    for section, scores, fraction in (
        ("heads", head_scores, heads_fraction),
        ("ffn", ffn_scores, ffn_fraction),
    ):
        flat = torch.cat(scores)
        closed = int(fraction * flat.numel())
        cut = flat.sort().values[closed - 1] if closed else -1.0
        for i, layer_scores in enumerate(scores):
            masks[section][str(i)] = (layer_scores > cut).long().tolist()
    return masks
