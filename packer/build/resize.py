"""Slice weights down to the kept heads and FFN dims, folding constant contributions into biases."""

from __future__ import annotations

import torch
from transformers.activations import ACT2FN

from packer.artifact import PackedConfig
from packer.build.checkpoint import Source
from packer.build.structure import LayerStructure


def _rows(heads: list[int], head_dim: int) -> torch.Tensor:
    return torch.tensor([h * head_dim + j for h in heads for j in range(head_dim)], dtype=torch.long)


def packed_config(source: Source, layers: list[LayerStructure]) -> PackedConfig:
    c = source.config
    id2label = {int(k): str(v) for k, v in (c.get("id2label") or {}).items()}
    if source.task != "question-answering" and not id2label:
        id2label = {i: f"LABEL_{i}" for i in range(int(c.get("num_labels", 2)))}
    return PackedConfig(
        arch=source.spec.model_type,
        task=source.task,
        vocab_size=int(c["vocab_size"]),
        hidden_size=source.hidden_size,
        max_position_embeddings=int(c["max_position_embeddings"]),
        type_vocab_size=int(c.get("type_vocab_size", 0) or 0),
        embedding_size=int(c["embedding_size"]),
        positions=source.spec.positions,
        pooler_act=source.spec.pooler_act,
        layer_norm_eps=float(c.get("layer_norm_eps", 1e-12)),
        hidden_act=str(c.get("hidden_act", "gelu")),
        pad_token_id=int(c.get("pad_token_id", 0) or 0),
        head_dim=source.head_dim,
        num_heads=[len(ls.kept_heads) for ls in layers],
        intermediate_sizes=[len(ls.kept_ffn) for ls in layers],
        id2label=id2label if source.task != "question-answering" else {},
    )


def resize_layer(source: Source, ls: LayerStructure) -> dict[str, torch.Tensor]:
    spec, state, i = source.spec, source.state_dict, ls.index
    get = lambda part, suffix: state[f"{spec.layer(i, part)}.{suffix}"]  # noqa: E731
    out: dict[str, torch.Tensor] = {}
    prefix = f"layers.{i}."

    # Attention: value-zero heads still add W_o[:, h] @ b_v,h to every position.
    attn_bias = get("attn_out", "bias").double()
    if ls.heads_value_zero:
        rows = _rows(ls.heads_value_zero, ls.head_dim)
        attn_bias = (
            attn_bias + get("attn_out", "weight")[:, rows].double() @ get("value", "bias")[rows].double()
        )
    out[prefix + "attention.output.bias"] = attn_bias.float()
    if ls.kept_heads:
        rows = _rows(ls.kept_heads, ls.head_dim)
        for part in ("query", "key", "value"):
            out[prefix + f"attention.{part}.weight"] = get(part, "weight")[rows].clone()
            out[prefix + f"attention.{part}.bias"] = get(part, "bias")[rows].clone()
        out[prefix + "attention.output.weight"] = get("attn_out", "weight")[:, rows].clone()
    out[prefix + "attention.norm.weight"] = get("attn_norm", "weight").clone()
    out[prefix + "attention.norm.bias"] = get("attn_norm", "bias").clone()

    # FFN: a dim whose input row is zero outputs act(b1_i) everywhere.
    w_in, b_in, w_out = get("ffn_in", "weight"), get("ffn_in", "bias"), get("ffn_out", "weight")
    ffn_bias = get("ffn_out", "bias").double()
    in_zero = ~(w_in != 0).any(dim=1)
    out_live = (w_out != 0).any(dim=0)
    folded = (in_zero & out_live).nonzero().flatten()
    if folded.numel():
        constant = ACT2FN[source.config.get("hidden_act", "gelu")](b_in[folded])
        ffn_bias = ffn_bias + w_out[:, folded].double() @ constant.double()
    out[prefix + "ffn.output.bias"] = ffn_bias.float()
    if ls.kept_ffn:
        idx = torch.tensor(ls.kept_ffn, dtype=torch.long)
        out[prefix + "ffn.intermediate.weight"] = w_in[idx].clone()
        out[prefix + "ffn.intermediate.bias"] = b_in[idx].clone()
        out[prefix + "ffn.output.weight"] = w_out[:, idx].clone()
    out[prefix + "ffn.norm.weight"] = get("ffn_norm", "weight").clone()
    out[prefix + "ffn.norm.bias"] = get("ffn_norm", "bias").clone()
    return out


def resize(source: Source, layers: list[LayerStructure], progress: bool = False) -> dict[str, torch.Tensor]:
    from tqdm.auto import tqdm

    spec, state = source.spec, source.state_dict
    packed: dict[str, torch.Tensor] = {}
    for part in ("word", "position", "token_type"):
        key = spec.embedding(part) + ".weight"
        if key in state and (part != "token_type" or int(source.config.get("type_vocab_size", 0) or 0)):
            packed[f"embeddings.{part}.weight"] = state[key].clone()
    packed["embeddings.norm.weight"] = state[spec.embedding("norm") + ".weight"].clone()
    packed["embeddings.norm.bias"] = state[spec.embedding("norm") + ".bias"].clone()
    projection = spec.projection(source.config)
    if projection:
        packed["embeddings.projection.weight"] = state[projection + ".weight"].clone()
        packed["embeddings.projection.bias"] = state[projection + ".bias"].clone()
    for ls in tqdm(layers, desc="resizing", unit="layer", disable=not progress):
        packed.update(resize_layer(source, ls))
    for packed_name, source_name in spec.head_keys(source.task).items():
        packed[f"{packed_name}.weight"] = state[f"{source_name}.weight"].clone()
        packed[f"{packed_name}.bias"] = state[f"{source_name}.bias"].clone()
    return packed
