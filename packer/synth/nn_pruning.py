"""nn_pruning's own structures: the 35 SQuAD v2 checkpoints of its published results file
(`results_squadv2.json`: each checkpoint's config, per-layer pruned heads and linear non-zeros, the
authors' F1 and speedup against BERT-base), rebuilt with random weights so that packing and
benchmarking them can be compared with their figures. 33 are BERT-base, 2 BERT-large (their config
says so; their own "speedup" against BERT-base is below 1).

FFN: nn_pruning's "1d_alt" and "topK" dense pruning remove whole FFN dims (rows of the first matrix,
columns of the second), so a layer keeps `linear_dense_nnz / (2 * hidden)` dims; `ffn_whole_dims`
says whether the counts are whole dims. Attention: heads in `pruned_heads` go; inside the kept heads
nn_pruning zeroes 32x32 blocks, which packing cannot remove: their density is reported
(`attention_density`), not rebuilt (zeros cost the same as other weights in dense kernels).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from packer.errors import PackerError
from packer.synth.checkpoints import PrunePlan, Shape


@dataclass
class Reference:
    """One published checkpoint: its structure and the authors' figures."""

    name: str
    shape: Shape
    pruned_heads: dict[int, list[int]]
    ffn_kept: list[int]
    attention_density: list[float]  # non-zeros / weights of the kept heads' Q, K, V and output rows
    ffn_whole_dims: bool  # the FFN non-zeros are whole dims (a structure packing can remove)
    ffn_density: list[float]
    f1: float
    speedup: float  # the authors' measured eval-time ratio against BERT-base


def read_references(path: str | Path) -> list[Reference]:
    try:
        checkpoints = json.loads(Path(path).read_text())["checkpoints"]
    except (OSError, ValueError, KeyError) as exc:
        raise PackerError(f"{path}: not nn_pruning's results file ({exc})") from exc
    references = []
    for name in sorted(checkpoints):
        entry = checkpoints[name]
        stats, config = entry["stats"], entry["config"]
        shape = Shape(
            layers=config["num_hidden_layers"],
            hidden=config["hidden_size"],
            heads=config["num_attention_heads"],
            intermediate=config["intermediate_size"],
            vocab_size=config.get("vocab_size", 30522),
        )
        h, d = shape.hidden, shape.hidden // shape.heads
        heads = {int(k): sorted(v) for k, v in stats["pruned_heads"].items()}
        layers = [stats["layers"][str(i)] for i in range(shape.layers)]
        whole = all(x["linear_dense_nnz"] % (2 * h) == 0 for x in layers)
        ffn_density = [x["linear_dense_nnz"] / (2 * h * shape.intermediate) for x in layers]
        ffn_kept = [x["linear_dense_nnz"] // (2 * h) if whole else shape.intermediate for x in layers]
        density = []
        for i, x in enumerate(layers):
            kept = shape.heads - len(heads.get(i, []))
            density.append(x["linear_attention_nnz"] / (4 * h * d * kept) if kept else 0.0)
        references.append(
            Reference(
                name,
                shape,
                heads,
                ffn_kept,
                density,
                whole,
                ffn_density,
                entry["eval_metrics"]["f1"],
                entry["speedup"],
            )
        )
    return references


def plan_for(reference: Reference, seed: int = 0) -> PrunePlan:
    shape = reference.shape
    gen = torch.Generator().manual_seed(seed)
    plan = PrunePlan()
    for layer in range(shape.layers):
        plan.heads[layer] = list(reference.pruned_heads.get(layer, []))
        removed = shape.intermediate - reference.ffn_kept[layer]
        plan.ffn[layer] = sorted(torch.randperm(shape.intermediate, generator=gen)[:removed].tolist())
    return plan
