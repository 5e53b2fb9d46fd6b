"""`prune-pack prune SRC OUT`: importance, a structure for a FLOP target, recovery, a zero-format checkpoint.

OUT holds the pruned model in full shapes with the pruned heads and FFN dims at exactly zero
(config.json, model.safetensors, tokenizer), its masks file (masks.json) and prune.json (method,
importance per head and dim, target and FLOP ratio reached, steps, losses, data used, articles held
out). `prune-pack pack OUT PACKED` then proves and packs it like any pruned checkpoint.
"""

from __future__ import annotations

import copy
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from packer import __version__
from packer.artifact.writing import atomic_directory
from packer.build.checkpoint import read_source
from packer.build.gates import magnitude_scores
from packer.build.prune import importance as imp
from packer.build.prune.data import batches, read_training_data
from packer.build.prune.gates import Cost, GateHooks
from packer.build.prune.recover import apply_zeros, pruned_slices, recover
from packer.build.prune.select import choose
from packer.build.verify import reference_model
from packer.errors import PackerError

log = logging.getLogger(__name__)
METHODS = ("l0", "gain", "magnitude")
MASKS_FILE, REPORT_FILE = "masks.json", "prune.json"


@dataclass
class PruneOptions:
    data: list[str]
    target_speedup: float
    method: str = "l0"
    exclude_articles: list[str] | None = None
    rows: tuple[int, int] | None = None  # classification TSV rows to train on (1-based, inclusive)
    time_budget: float | None = None  # seconds for importance + recovery
    steps: int | None = None  # recovery steps (0: no recovery)
    importance_steps: int | None = None  # gain / l0 batches (default: 64 / 200)
    teacher: str | None = None
    device: str = "auto"
    batch_size: int = 16
    lr: float = 5e-5
    max_length: int = 256
    stride: int = 128
    seed: int = 0
    force: bool = False
    progress: bool = True


def pick_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise PackerError("--device cuda: torch sees no CUDA device here; use --device cpu or auto")
    if requested not in ("cpu", "cuda"):
        raise PackerError(f"--device {requested!r} is not one of auto, cpu, cuda")
    return requested


def progress_bar(enabled: bool):
    from tqdm.auto import tqdm

    # A log file (not a terminal) gets a line every 30 s rather than every step.
    interval = 0.1 if sys.stderr.isatty() else 30.0

    def wrap(iterable, desc):
        return tqdm(iterable, desc=desc, unit="step", disable=not enabled, leave=False, mininterval=interval)

    return wrap


DEFAULT_IMPORTANCE_STEPS = {"l0": 200, "gain": 64}


def prune(src: str, out: str | Path, options: PruneOptions) -> dict:
    if options.method not in METHODS:
        raise PackerError(f"--method {options.method!r} is not one of {', '.join(METHODS)}")
    if options.target_speedup < 1:
        raise PackerError(f"--target-speedup {options.target_speedup} must be at least 1 (a FLOP ratio)")
    if Path(out).exists() and not options.force:
        raise PackerError(f"{out} already exists; pass --force to overwrite it")
    started = time.perf_counter()
    device = pick_device(options.device)
    torch.manual_seed(options.seed)
    bar = progress_bar(options.progress)
    source = read_source(src, progress=options.progress)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(source.path))
    data = read_training_data(
        tokenizer,
        source.task,
        options.data,
        options.exclude_articles,
        options.rows,
        options.max_length,
        options.stride,
    )
    stream = batches(data.features, options.batch_size, tokenizer.pad_token_id or 0, options.seed)
    model = reference_model(source, attn_implementation="sdpa").to(device)
    dims = (source.num_layers, source.num_heads, source.head_dim, source.intermediate_size)
    cost = Cost(
        source.hidden_size, source.head_dim, source.num_layers, source.num_heads, source.intermediate_size
    )
    importance_steps = options.importance_steps
    if importance_steps is None:
        importance_steps = DEFAULT_IMPORTANCE_STEPS.get(options.method, 0)
    recovery_steps, budget = options.steps, options.time_budget

    if options.method == "magnitude":
        heads, ffn = magnitude_scores(source)
        scores = imp.Importance("magnitude", torch.stack(heads), torch.stack(ffn))
    else:
        hooks = GateHooks(model, source.spec, dims[0], dims[1], dims[2], dims[3])
        try:
            if options.method == "gain":
                scores = imp.gain(model, hooks, stream, importance_steps, source.task, device, bar)
            else:
                scores = imp.l0(
                    model,
                    hooks,
                    stream,
                    importance_steps,
                    source.task,
                    device,
                    cost,
                    options.target_speedup,
                    bar,
                )
        finally:
            hooks.remove()
    structure = choose(scores.heads, scores.ffn, cost, options.target_speedup)

    teacher = (
        reference_model(read_source(options.teacher, progress=False))
        if options.teacher
        else copy.deepcopy(model)
    )
    slices = pruned_slices(model, source.spec, structure, source.head_dim)
    apply_zeros(slices)
    recovery = None
    if recovery_steps != 0 and (recovery_steps or budget):
        remaining = budget - (time.perf_counter() - started) if budget else None
        if remaining is not None and remaining <= 0:
            log.warning("the time budget was spent before recovery; writing the pruned model unrecovered")
        else:
            recovery = recover(
                model,
                teacher,
                slices,
                stream,
                source.task,
                device,
                recovery_steps,
                remaining,
                bar,
                lr=options.lr,
                batch_size=options.batch_size,
            )
    model.to("cpu")
    report = {
        "format": 1,
        "packer_version": __version__,
        "source": str(src),
        "teacher": options.teacher or str(src),
        "task": source.task,
        "arch": source.spec.model_type,
        "method": options.method,
        "target_speedup": options.target_speedup,
        "flop_ratio": round(structure.flop_ratio, 4),
        "flop_ratio_measured_at": f"1x{cost.seq} (the packer's encoder FLOP count)",
        "keep_fraction": round(structure.keep_fraction, 4),
        "heads_kept": int(structure.heads.sum()),
        "heads_total": int(structure.heads.numel()),
        "ffn_kept": int(structure.ffn.sum()),
        "ffn_total": int(structure.ffn.numel()),
        "heads_per_layer": [int(x) for x in structure.heads.sum(1)],
        "ffn_per_layer": [int(x) for x in structure.ffn.sum(1)],
        "layers_without_heads": structure.layers_without_heads(),
        "layers_without_ffn": structure.layers_without_ffn(),
        "importance": {
            "steps": scores.steps,
            "seconds": round(scores.seconds, 1),
            "losses": [round(x, 5) for x in scores.losses],
            "heads": [[round(float(x), 6) for x in row] for row in scores.heads],
            "ffn": [[round(float(x), 6) for x in row] for row in scores.ffn],
        },
        "recovery": recovery.to_dict() if recovery else None,
        "data": data.describe() | {"max_length": options.max_length, "stride": options.stride},
        "device": device,
        "seconds": round(time.perf_counter() - started, 1),
    }
    with atomic_directory(Path(out), force=options.force) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / MASKS_FILE).write_text(json.dumps(structure.masks()) + "\n")
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=1) + "\n")
    return report
