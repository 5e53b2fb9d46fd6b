"""Find what can be removed exactly: whole heads and FFN dims whose contribution is constant.

Pure tensor logic on a normalized full-size state dict. Exactness rules:
- head h is removable when its value rows are all zero (its output is then the constant
  W_o[:, h] @ b_v,h, since attention rows sum to one: folded into the output bias) or its
  columns of the attention output weight are all zero (no contribution at all);
- a head whose query or key rows are zero but whose value path is live is NOT removable:
  it attends uniformly, which is not zero. It is kept and reported;
- FFN dim i is removable when its row of the first linear is zero (contribution
  act(b1_i) * W2[:, i], folded into the second bias) or its column of the second linear is zero.
Unstructured zeros inside kept slices are measured, never "packed".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from packer.build.checkpoint import Source

MATRICES = ("query", "key", "value", "attn_out", "ffn_in", "ffn_out")


@dataclass
class LayerStructure:
    index: int
    num_heads: int
    head_dim: int
    intermediate_size: int
    kept_heads: list[int]
    heads_value_zero: list[int]  # removed; b_v contribution folded into the output bias
    heads_output_zero: list[int]  # removed; contributed nothing
    uniform_heads: list[int]  # Q or K rows zero, value path live: kept
    kept_ffn: list[int]
    ffn_input_zero: int  # removed; act(b1) * W2 column folded into the output bias
    ffn_output_zero: int  # removed; contributed nothing
    density: dict[str, float] = field(default_factory=dict)  # nnz / numel of the full matrix
    kept_density: dict[str, float] = field(default_factory=dict)  # nnz / numel of what packing keeps

    @property
    def removed_heads(self) -> list[int]:
        return sorted(self.heads_value_zero + self.heads_output_zero)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["kept_ffn"] = len(self.kept_ffn)
        data["removed_heads"] = self.removed_heads
        return data


def _zero_groups(matrix: torch.Tensor, groups: int, dim: int) -> torch.Tensor:
    """For each of `groups` equal slices along `dim`, whether the slice is all zero."""
    nonzero = matrix != 0
    if dim == 0:
        return ~nonzero.reshape(groups, -1).any(dim=1)
    return ~nonzero.t().reshape(groups, -1).any(dim=1)


def _density(t: torch.Tensor) -> float:
    return float((t != 0).sum()) / t.numel() if t.numel() else 1.0


def analyze_layer(source: Source, i: int) -> LayerStructure:
    spec, state = source.spec, source.state_dict
    heads, d = source.num_heads, source.head_dim
    w = {part: state[spec.layer(i, part) + ".weight"] for part in MATRICES}

    q_zero = _zero_groups(w["query"], heads, dim=0)
    k_zero = _zero_groups(w["key"], heads, dim=0)
    v_zero = _zero_groups(w["value"], heads, dim=0)
    o_zero = _zero_groups(w["attn_out"], heads, dim=1)
    heads_output_zero = [h for h in range(heads) if o_zero[h]]
    heads_value_zero = [h for h in range(heads) if v_zero[h] and not o_zero[h]]
    kept_heads = [h for h in range(heads) if not (v_zero[h] or o_zero[h])]
    uniform = [h for h in kept_heads if q_zero[h] or k_zero[h]]

    in_zero = _zero_groups(w["ffn_in"], w["ffn_in"].shape[0], dim=0)
    out_zero = _zero_groups(w["ffn_out"], w["ffn_out"].shape[1], dim=1)
    kept_ffn = (~(in_zero | out_zero)).nonzero().flatten().tolist()

    head_rows = torch.tensor([h * d + j for h in kept_heads for j in range(d)], dtype=torch.long)
    ffn_idx = torch.tensor(kept_ffn, dtype=torch.long)
    kept_slices = {
        "query": w["query"][head_rows],
        "key": w["key"][head_rows],
        "value": w["value"][head_rows],
        "attn_out": w["attn_out"][:, head_rows],
        "ffn_in": w["ffn_in"][ffn_idx],
        "ffn_out": w["ffn_out"][:, ffn_idx],
    }
    return LayerStructure(
        index=i,
        num_heads=heads,
        head_dim=d,
        intermediate_size=w["ffn_in"].shape[0],
        kept_heads=kept_heads,
        heads_value_zero=heads_value_zero,
        heads_output_zero=heads_output_zero,
        uniform_heads=uniform,
        kept_ffn=kept_ffn,
        ffn_input_zero=int((in_zero & ~out_zero).sum()),
        ffn_output_zero=int(out_zero.sum()),
        density={part: round(_density(t), 6) for part, t in w.items()},
        kept_density={part: round(_density(t), 6) for part, t in kept_slices.items()},
    )


def analyze(source: Source) -> list[LayerStructure]:
    return [analyze_layer(source, i) for i in range(source.num_layers)]


def encoder_linear_params(hidden: int, heads: list[int], head_dim: int, ffn: list[int]) -> int:
    """Weights of the encoder's linear layers (biases excluded): the figure the seeds' '25%' refers to."""
    return sum(4 * hidden * h * head_dim + 2 * hidden * f for h, f in zip(heads, ffn, strict=True))


def summarize(layers: list[LayerStructure], hidden: int) -> dict:
    head_dim = layers[0].head_dim if layers else 0
    before = encoder_linear_params(
        hidden, [ls.num_heads for ls in layers], head_dim, [ls.intermediate_size for ls in layers]
    )
    after = encoder_linear_params(
        hidden, [len(ls.kept_heads) for ls in layers], head_dim, [len(ls.kept_ffn) for ls in layers]
    )
    nnz_kept = 0.0
    for ls in layers:
        sizes = {
            "query": len(ls.kept_heads) * head_dim * hidden,
            "key": len(ls.kept_heads) * head_dim * hidden,
            "value": len(ls.kept_heads) * head_dim * hidden,
            "attn_out": len(ls.kept_heads) * head_dim * hidden,
            "ffn_in": len(ls.kept_ffn) * hidden,
            "ffn_out": len(ls.kept_ffn) * hidden,
        }
        nnz_kept += sum(ls.kept_density[p] * n for p, n in sizes.items())
    return {
        "heads_before": sum(ls.num_heads for ls in layers),
        "heads_after": sum(len(ls.kept_heads) for ls in layers),
        "ffn_before": sum(ls.intermediate_size for ls in layers),
        "ffn_after": sum(len(ls.kept_ffn) for ls in layers),
        "uniform_heads": sum(len(ls.uniform_heads) for ls in layers),
        "encoder_linear_weights_before": before,
        "encoder_linear_weights_after": after,
        "encoder_linear_fraction_kept": round(after / before, 6) if before else 1.0,
        # Unstructured sparsity that survives packing: zeros inside kept heads / dims.
        "kept_weights_density": round(nnz_kept / after, 6) if after else 1.0,
    }
