"""Latency of the source against the packed artifact, side by side in one process and one run."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch


@dataclass
class BenchRow:
    batch: int
    seq: int
    source_ms: float
    packed_ms: float
    speedup: float
    flop_ratio: float

    @property
    def flop_efficiency(self) -> float:
        """How much of the FLOP ratio (the limit packing can reach) the measured speedup gets."""
        return self.speedup / self.flop_ratio

    def to_dict(self) -> dict:
        return asdict(self) | {"flop_efficiency": self.flop_efficiency}


def encoder_flops(
    hidden: int, head_dim: int, heads: list[int], ffn: list[int], batch: int, seq: int
) -> float:
    """Multiply-adds x2 of the encoder: projections, attention scores and context, FFN."""
    tokens = batch * seq
    total = 0.0
    for h, f in zip(heads, ffn, strict=True):
        total += 2 * tokens * (4 * hidden * h * head_dim + 2 * hidden * f)
        total += 2 * 2 * batch * h * seq * seq * head_dim
    return total


def parse_shape(text: str) -> tuple[int, int]:
    try:
        batch, seq = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"shape {text!r} is not BATCHxSEQ, e.g. 8x128") from None
    if batch < 1 or seq < 2:
        raise ValueError(f"shape {text!r}: batch must be >= 1 and sequence >= 2")
    return batch, seq


def make_inputs(vocab: int, pad: int, batch: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    ids[ids == pad] = (pad + 1) % vocab
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@torch.inference_mode()
def time_pair(source, packed, inputs, warmup: int, runs: int) -> tuple[float, float]:
    """Median ms of each model; runs alternate so that drift hits both alike."""
    for _ in range(warmup):
        source(**inputs)
        packed(**inputs)
    times: dict[str, list[float]] = {"source": [], "packed": []}
    for _ in range(runs):
        for name, model in (("source", source), ("packed", packed)):
            start = time.perf_counter()
            model(**inputs)
            times[name].append((time.perf_counter() - start) * 1000)
    return statistics.median(times["source"]), statistics.median(times["packed"])


def format_rows(rows: list[BenchRow]) -> str:
    header = (
        f"{'shape':>9}  {'source ms':>10}  {'packed ms':>10}  {'speedup':>8}  {'FLOP ratio':>10}  "
        f"{'% of FLOP ratio':>15}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{f'{r.batch}x{r.seq}':>9}  {r.source_ms:>10.1f}  {r.packed_ms:>10.1f}  {r.speedup:>7.2f}x  "
            f"{r.flop_ratio:>9.2f}x  {r.flop_efficiency:>14.0%}"
        )
    return "\n".join(lines)


def run_bench(
    src: str,
    artifact: str,
    shapes: list[tuple[int, int]],
    warmup: int = 3,
    runs: int = 10,
    masks: str | None = None,
    seed: int = 0,
) -> list[BenchRow]:
    """The source as users run it today (transformers, default attention) against the artifact."""
    from packer.artifact import load
    from packer.pack import PackOptions, prepare
    from packer.verify import reference_model

    loaded = load(artifact)
    prepared = prepare(src, PackOptions(masks=masks, task=loaded.config.task, progress=False))
    source = reference_model(prepared.source, attn_implementation="sdpa")
    c = loaded.config
    full_heads = [ls.num_heads for ls in prepared.layers]
    full_ffn = [ls.intermediate_size for ls in prepared.layers]
    rows = []
    for batch, seq in shapes:
        if seq > c.max_position_embeddings - (c.pad_token_id + 1 if c.arch == "roberta" else 0):
            raise ValueError(
                f"sequence {seq} is longer than the model's {c.max_position_embeddings} positions"
            )
        inputs = make_inputs(c.vocab_size, c.pad_token_id, batch, seq, seed)
        source_ms, packed_ms = time_pair(source, loaded.model, inputs, warmup, runs)
        flop_ratio = encoder_flops(c.hidden_size, c.head_dim, full_heads, full_ffn, batch, seq) / max(
            encoder_flops(c.hidden_size, c.head_dim, c.num_heads, c.intermediate_sizes, batch, seq), 1.0
        )
        rows.append(BenchRow(batch, seq, source_ms, packed_ms, source_ms / packed_ms, flop_ratio))
    return rows
