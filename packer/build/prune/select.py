"""Choose the structure: the most important heads and FFN dims that meet a target FLOP ratio.

Heads and FFN dims are ranked globally (across layers), each within its own kind, and the same
fraction of each kind is kept; the fraction is the largest whose structure meets the target (by
bisection on the packer's FLOP count). A layer loses all its heads only when its heads rank lowest,
and the summary names such layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from packer.build.prune.gates import Cost


@dataclass
class Structure:
    heads: torch.Tensor  # (layers, heads) 0/1
    ffn: torch.Tensor  # (layers, intermediate) 0/1
    keep_fraction: float
    flop_ratio: float

    def masks(self) -> dict:
        """The packer's masks file."""
        return {
            "heads": {str(i): row.long().tolist() for i, row in enumerate(self.heads)},
            "ffn": {str(i): row.long().tolist() for i, row in enumerate(self.ffn)},
        }

    def layers_without_heads(self) -> list[int]:
        return [i for i, row in enumerate(self.heads) if not row.any()]

    def layers_without_ffn(self) -> list[int]:
        return [i for i, row in enumerate(self.ffn) if not row.any()]


def top_fraction(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """0/1 mask keeping round(fraction * n) of the highest scores (ties broken by position)."""
    flat = scores.flatten()
    keep = round(fraction * flat.numel())
    mask = torch.zeros_like(flat)
    if keep:
        mask[torch.argsort(flat, descending=True, stable=True)[:keep]] = 1.0
    return mask.reshape(scores.shape)


def choose(heads: torch.Tensor, ffn: torch.Tensor, cost: Cost, target_ratio: float) -> Structure:
    if target_ratio < 1:
        raise ValueError(f"--target-speedup {target_ratio} must be at least 1")
    low, high = 0.0, 1.0
    for _ in range(40):
        mid = (low + high) / 2
        if cost.ratio(top_fraction(heads, mid), top_fraction(ffn, mid)) >= target_ratio:
            low = mid
        else:
            high = mid
    head_mask, ffn_mask = top_fraction(heads, low), top_fraction(ffn, low)
    return Structure(head_mask, ffn_mask, low, cost.ratio(head_mask, ffn_mask))
