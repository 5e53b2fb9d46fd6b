"""Latency of the source against each variant of its artifact, measured side by side in one run.

Each variant is timed in its own process, one after the other: two compute pools in one
process (torch and ONNX Runtime) compete for the same cores and slow each other down, so no
measurement ever overlaps another.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from packer.artifact import Variant

VARIANTS = ("source", *Variant)


# A timing whose runs vary more than this (coefficient of variation) is flagged: the machine had other
# work, or the runs were too few.
NOISY_CV = 0.10


@dataclass
class VariantTiming:
    variant: str
    backend: str
    ms: dict[str, float] = field(default_factory=dict)  # "BxS" -> median ms
    spread: dict[str, list[float]] = field(default_factory=dict)  # "BxS" -> [min, max] ms
    cv: dict[str, float] = field(default_factory=dict)  # "BxS" -> stdev / mean of the runs
    runs: int = 0
    profile: dict[str, float] = field(default_factory=dict)  # op type -> share of time (--profile)

    def to_dict(self) -> dict:
        return asdict(self)

    def noisy(self) -> list[str]:
        return [shape for shape, cv in self.cv.items() if cv > NOISY_CV]


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


def timed_ms(run, inputs: dict, warmup: int, runs: int) -> list[float]:
    for _ in range(warmup):
        run(**inputs)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run(**inputs)
        times.append((time.perf_counter() - start) * 1000)
    return times


def load_warning(threads: int) -> str | None:
    """Other work on the machine makes every timing slow and noisy: say so before measuring."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return None
    cores = os.cpu_count() or 1
    if load > max(0.5, cores - threads) + 0.5:
        return (
            f"load average {load:.1f} on {cores} cores before measuring: other work is running, "
            "timings will be slow and noisy (run benchmarks alone)"
        )
    return None


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
    p.add_argument("--profile", action="store_true")
    args = p.parse_args(argv)

    from packer.artifact import read_packed_config

    config = read_packed_config(args.artifact)
    if args.variant == "source":
        from packer.build.source_backend import SourceBackend

        source = SourceBackend(
            args.src, task=config.task, masks=args.masks, threads=args.threads, device=args.device
        )
        run, backend, model = source.run, source.name, source.model
    else:
        from packer.runtime.backends import open_backend

        opened = open_backend(args.artifact, args.variant, device=args.device, threads=args.threads)
        run, backend, model = opened.run, opened.name, getattr(opened, "model", None)
    timing = VariantTiming(args.variant, backend, runs=args.runs)
    for text in args.shape:
        batch, seq = parse_shape(text)
        inputs = make_inputs(config.vocab_size, config.pad_token_id, batch, seq)
        times = timed_ms(run, inputs, args.warmup, args.runs)
        timing.ms[text] = statistics.median(times)
        timing.spread[text] = [min(times), max(times)]
        mean = statistics.fmean(times)
        timing.cv[text] = statistics.pstdev(times) / mean if mean else 0.0
    if args.profile:  # at the last shape, after the timings (profiling slows what it watches)
        from packer.evaluate import op_profile

        if model is not None:
            timing.profile = op_profile.torch_profile(model, inputs, args.runs)
        else:
            from packer.artifact import VARIANT_FILES

            graph = Path(args.artifact) / VARIANT_FILES[args.variant]
            timing.profile = op_profile.ort_profile(graph, inputs, args.threads, args.runs)
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
    profile: bool = False,
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
        cmd += ["--profile"] if profile else []
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
        f"  {s + ' ms (min-max)':>24}  {'seq/s':>7}  {'vs ' + base.variant:>10}" for s in shapes
    )
    lines = [header, "-" * len(header)]
    for r in results:
        cells = ""
        for s in shapes:
            batch = parse_shape(s)[0]
            low, high = r.spread.get(s, [r.ms[s], r.ms[s]])
            timing = f"{r.ms[s]:.1f} ({low:.1f}-{high:.1f})"
            cells += f"  {timing:>24}  {batch * 1000 / r.ms[s]:>7.1f}  {base.ms[s] / r.ms[s]:>9.2f}x"
        lines.append(f"{r.variant:<10}  {r.backend:<22}{cells}")
    for r in results:
        for s in r.noisy():
            lines.append(
                f"warning: {r.variant} at {s} varied {100 * r.cv[s]:.0f}% (coefficient of variation) over "
                f"{r.runs} runs: other work on the machine, or too few runs; rerun before trusting it"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    worker(sys.argv[1:])
