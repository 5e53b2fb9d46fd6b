"""Latency of the source against each variant of its artifact, measured side by side in one run.

Each variant is timed in its own process, one after the other: two compute pools in one
process (torch and ONNX Runtime) compete for the same cores and slow each other down, so no
measurement ever overlaps another.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from packer.artifact import Variant

VARIANTS = ("source", *Variant)


@dataclass
class VariantTiming:
    variant: str
    backend: str
    ms: dict[str, float] = field(default_factory=dict)  # "BxS" -> median ms

    def to_dict(self) -> dict:
        return asdict(self)


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


def make_inputs(vocab: int, pad: int, batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (batch, seq), dtype=np.int64)
    ids[ids == pad] = (pad + 1) % vocab
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def median_ms(run, inputs: dict, warmup: int, runs: int) -> float:
    for _ in range(warmup):
        run(**inputs)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run(**inputs)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def worker(argv: list[str]) -> None:
    """One variant, timed alone in this process; prints one JSON line."""
    p = argparse.ArgumentParser()
    p.add_argument("--src")
    p.add_argument("--artifact", required=True)
    p.add_argument("--variant", required=True)
    p.add_argument("--shape", action="append", required=True)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--masks")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)

    from packer.artifact import read_packed_config

    config = read_packed_config(args.artifact)
    if args.variant == "source":
        from packer.build.source_backend import SourceBackend

        source = SourceBackend(
            args.src, task=config.task, masks=args.masks, threads=args.threads, device=args.device
        )
        run, backend = source.run, source.name
    else:
        from packer.runtime.backends import open_backend

        opened = open_backend(args.artifact, args.variant, device=args.device, threads=args.threads)
        run, backend = opened.run, opened.name
    timing = VariantTiming(args.variant, backend)
    for text in args.shape:
        batch, seq = parse_shape(text)
        inputs = make_inputs(config.vocab_size, config.pad_token_id, batch, seq)
        timing.ms[text] = median_ms(run, inputs, args.warmup, args.runs)
    print(json.dumps(timing.to_dict()))


def run_bench(
    src: str,
    artifact: str,
    shapes: list[str],
    variants: list[str],
    threads: int,
    warmup: int = 3,
    runs: int = 10,
    masks: str | None = None,
    device: str = "cpu",
) -> list[VariantTiming]:
    from packer.errors import PackerError

    results = []
    for variant in variants:
        if variant not in VARIANTS:
            raise PackerError(f"variant {variant!r} is not one of {', '.join(VARIANTS)}")
        cmd = [
            sys.executable,
            "-m",
            "packer.evaluate.model_bench",
            "--artifact",
            str(artifact),
            "--variant",
            variant,
            "--threads",
            str(threads),
            "--warmup",
            str(warmup),
            "--runs",
            str(runs),
            "--device",
            device,
        ]
        cmd += [a for s in shapes for a in ("--shape", s)]
        cmd += ["--src", str(src)] + (["--masks", masks] if masks else [])
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
            raise PackerError(f"benchmarking {variant} failed: {lines[-1] if lines else 'no output'}")
        results.append(VariantTiming(**json.loads(done.stdout.strip().splitlines()[-1])))
    return results


def format_table(results: list[VariantTiming], shapes: list[str]) -> str:
    base = next((r for r in results if r.variant == "source"), results[0])
    header = f"{'variant':<10}  {'backend':<22}" + "".join(
        f"  {s + ' ms':>11}  {'seq/s':>7}  {'vs ' + base.variant:>10}" for s in shapes
    )
    lines = [header, "-" * len(header)]
    for r in results:
        cells = ""
        for s in shapes:
            batch = parse_shape(s)[0]
            cells += f"  {r.ms[s]:>11.1f}  {batch * 1000 / r.ms[s]:>7.1f}  {base.ms[s] / r.ms[s]:>9.2f}x"
        lines.append(f"{r.variant:<10}  {r.backend:<22}{cells}")
    return "\n".join(lines)


if __name__ == "__main__":
    worker(sys.argv[1:])
