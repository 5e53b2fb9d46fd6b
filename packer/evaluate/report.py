"""Accuracy against speed for a source and its artifacts: one markdown table and one PNG chart,
in the seeds' Table 2 style. Each row is evaluated in its own process (thread pools never overlap)."""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from packer.artifact import Variant
from packer.errors import PackerError

log = logging.getLogger(__name__)


@dataclass
class Row:
    name: str
    backend: str
    accuracy: float  # F1 (squad2) or accuracy (sst2)
    exact: float | None
    best: float | None  # best_f1 over no-answer thresholds (squad2)
    seconds: float
    examples: int
    params: int
    size_bytes: int

    def ms_per_example(self) -> float:
        return 1000 * self.seconds / self.examples


def _eval(task: str, data: str, target: list[str], common: list[str]) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    cmd = [
        sys.executable,
        "-m",
        "packer.cli",
        "eval",
        task,
        "-q",
        "--data",
        data,
        *target,
        *common,
        "--report-json",
        out,
    ]
    log.info("evaluating %s ...", " ".join(target))  # each row takes tens of seconds: say what runs
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    log.info("  done in %.0f s", time.perf_counter() - start)
    try:
        if done.returncode != 0:
            raise PackerError(
                f"evaluating {' '.join(target)} failed: {done.stderr.strip().splitlines()[-1:]}"
            )
        return json.loads(Path(out).read_text())
    finally:
        os.unlink(out)


def _row(name: str, result: dict, task: str, params: int, size: int) -> Row:
    m = result["metrics"]
    accuracy = m["accuracy"] if task == "sst2" else m["f1"]
    exact = {"squad2": m.get("exact"), "squad1": m.get("exact_match")}.get(task)
    best = m.get("best_f1") if task == "squad2" else None
    return Row(
        name, result["backend"], accuracy, exact, best, result["seconds"], result["questions"], params, size
    )


def render_markdown(rows: list[Row], task: str, settings: str) -> str:
    source = rows[0]
    metric = "accuracy" if task == "sst2" else "F1"
    lines = [
        f"| model | backend | {metric} | Δ {metric} | EM | best F1 | Δ best F1 | ms / example | speedup "
        "| params | size (MB) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r.name} | {r.backend} | {r.accuracy:.2f} | {r.accuracy - source.accuracy:+.2f} | "
            f"{'' if r.exact is None else f'{r.exact:.2f}'} | {'' if r.best is None else f'{r.best:.2f}'} | "
            f"{'' if r.best is None else f'{r.best - source.best:+.2f}'} | {r.ms_per_example():.1f} | "
            f"{source.seconds / r.seconds:.2f}x | {r.params / 1e6:.1f}M | {r.size_bytes / 1e6:.0f} |"
        )
    return "\n".join(lines) + "\n\n" + settings + "\n"


def render_chart(rows: list[Row], task: str, file: Path, settings: str) -> Path:
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    source = rows[0]
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for r in rows:
        speedup = source.seconds / r.seconds
        label = f"{r.name} ({r.backend}, {r.params / 1e6:.1f}M params)"
        points = ax.scatter(speedup, r.accuracy, s=60, alpha=0.85, label=label)
        if r.best is not None:  # best F1 over no-answer thresholds, hollow, same colour
            ax.scatter(speedup, r.best, s=60, facecolors="none", edgecolors=points.get_facecolor())
    ax.set_xlabel("speedup vs source (same machine, same data, tokenization included)")
    ax.set_ylabel({"squad2": "F1 (filled) and best F1 (hollow)", "squad1": "F1"}.get(task, "accuracy (%)"))
    ax.set_title("accuracy vs speed", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.text(0.01, 0.01, "\n".join(textwrap.wrap(settings, 170)), fontsize=6, va="bottom")
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(file, dpi=120)
    plt.close(fig)
    return file


def build_report(
    task: str,
    data: str,
    source: str,
    artifacts: list[str],
    out: Path,
    variants: list[str] | None = None,
    limit: int | None = None,
    articles: str | None = None,
    rows: str | None = None,
    threads: int | None = None,
    extra: list[str] | None = None,
    device: str = "cpu",
) -> tuple[Path, Path]:
    import torch

    from packer.artifact import VARIANT_FILES, read_manifest
    from packer.build.checkpoint import resolve
    from packer.runtime.backends import present_variants

    if not artifacts:
        raise PackerError("report needs at least one --artifact")
    from packer.evaluate.model_bench import load_warning

    busy = load_warning(threads or os.cpu_count() or 1)
    if busy:
        log.warning("%s", busy)
    common = []
    if limit:
        common += ["--limit", str(limit)]
    if threads:
        common += ["--threads", str(threads)]
    common += ["--device", device]
    if task in ("squad2", "squad1"):
        common += ["--articles", articles] if articles else []
        common += extra or []
    elif rows:
        common += ["--rows", rows]

    first = read_manifest(Path(artifacts[0]))
    source_dir = resolve(source)
    source_size = sum(f.stat().st_size for f in source_dir.iterdir() if f.suffix in (".safetensors", ".bin"))
    table_rows = [
        _row(
            "source",
            _eval(task, data, ["--source", source], common),
            task,
            first["params"]["before"],
            source_size,
        )
    ]
    for artifact in artifacts:
        manifest = read_manifest(Path(artifact))
        for variant in variants or present_variants(artifact):
            if variant not in present_variants(artifact):
                continue
            if variant == Variant.ONNX_FP16 and device == "cpu":
                continue  # fp16 graphs are for GPUs; a CPU timing of them means nothing
            if variant == Variant.ONNX_INT8 and device == "cuda":
                continue  # dynamic int8 does not run on ONNX Runtime's CUDA provider
            result = _eval(task, data, ["--artifact", artifact, "--variant", variant], common)
            size = (Path(artifact) / VARIANT_FILES[variant]).stat().st_size
            table_rows.append(
                _row(f"{Path(artifact).name} {variant}", result, task, manifest["params"]["after"], size)
            )
    settings = (
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}; "
        f"torch {torch.__version__}; threads {threads or os.cpu_count()}; each row in its own process. "
        f"Data: {Path(data).name}"
        + (f", articles {articles}" if articles else "")
        + (f", rows {rows}" if rows else "")
        + (f", first {limit}" if limit else "")
        + f"; {table_rows[0].examples} examples. Speedup: source time / row time, tokenization included; "
        "times start after each model is loaded and warmed up." + (f" Warning: {busy}." if busy else "")
    )
    out.mkdir(parents=True, exist_ok=True)
    table = out / "report.md"
    table.write_text(render_markdown(table_rows, task, settings))
    chart = render_chart(table_rows, task, out / "report.png", settings)
    (out / "report.json").write_text(json.dumps([r.__dict__ for r in table_rows], indent=2) + "\n")
    return table, chart
