"""Gates on every head and FFN dim of a transformers model, and what each one costs.

A head gate scales the head's context before the attention output projection, an FFN gate the
activation before the second linear (McCarley et al., section 3): exactly what a masks file means
to the packer. Gates are read at call time, so a training loop may swap in sampled (L0) gates per
step. `HardConcrete` is Louizos et al.'s relaxation of L0 with McCarley's constants.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from packer.build.arch import ArchSpec
from packer.evaluate.model_bench import encoder_flops


class GateHooks:
    def __init__(self, model: nn.Module, spec: ArchSpec, layers: int, heads: int, head_dim: int, ffn: int):
        self.head_dim = head_dim
        self.head = torch.ones(layers, heads)
        self.ffn = torch.ones(layers, ffn)
        self.handles = []
        for i in range(layers):
            attn_out = model.get_submodule(spec.layer(i, "attn_out"))
            ffn_out = model.get_submodule(spec.layer(i, "ffn_out"))
            self.handles.append(attn_out.register_forward_pre_hook(self._head_hook(i)))
            self.handles.append(ffn_out.register_forward_pre_hook(self._ffn_hook(i)))

    def _head_hook(self, i: int):
        def hook(module, args):
            scale = self.head[i].to(args[0].dtype).repeat_interleave(self.head_dim)
            return (args[0] * scale,)

        return hook

    def _ffn_hook(self, i: int):
        def hook(module, args):
            return (args[0] * self.ffn[i].to(args[0].dtype),)

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


class Cost:
    """Encoder FLOPs at one shape, linear in the kept heads and FFN dims (the packer's FLOP count)."""

    def __init__(self, hidden: int, head_dim: int, layers: int, heads: int, ffn: int, seq: int = 384):
        self.hidden, self.head_dim, self.seq = hidden, head_dim, seq
        self.full = encoder_flops(hidden, head_dim, [heads] * layers, [ffn] * layers, 1, seq)
        self.per_head = encoder_flops(hidden, head_dim, [1], [0], 1, seq)
        self.per_ffn = encoder_flops(hidden, head_dim, [0], [1], 1, seq)

    def of(self, heads: torch.Tensor, ffn: torch.Tensor) -> torch.Tensor:
        """FLOPs of (expected) gate counts; differentiable in them."""
        return heads.sum() * self.per_head + ffn.sum() * self.per_ffn

    def ratio(self, head_mask: torch.Tensor, ffn_mask: torch.Tensor) -> float:
        """The packer's FLOP ratio: full model over the kept structure."""
        kept = encoder_flops(
            self.hidden,
            self.head_dim,
            [int(x) for x in head_mask.sum(1)],
            [int(x) for x in ffn_mask.sum(1)],
            1,
            self.seq,
        )
        return self.full / max(kept, 1.0)


class HardConcrete(nn.Module):
    """Stretched hard-concrete gates: log_alpha per gate, samples in [0, 1] with exact zeros and ones."""

    BETA, GAMMA, ZETA = 2 / 3, -0.1, 1.1

    def __init__(self, shape: tuple[int, ...], init: float = 3.0):
        super().__init__()
        self.log_alpha = nn.Parameter(torch.full(shape, init))

    def forward(self) -> torch.Tensor:
        if self.training:
            u = torch.rand_like(self.log_alpha).clamp(1e-6, 1 - 1e-6)
            s = torch.sigmoid((torch.log(u) - torch.log(1 - u) + self.log_alpha) / self.BETA)
        else:
            s = torch.sigmoid(self.log_alpha)
        return (s * (self.ZETA - self.GAMMA) + self.GAMMA).clamp(0, 1)

    def open_probability(self) -> torch.Tensor:
        """P(gate != 0): the expected L0 norm per gate."""
        return torch.sigmoid(self.log_alpha - self.BETA * math.log(-self.GAMMA / self.ZETA))
