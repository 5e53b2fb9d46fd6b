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
    has_ans: float | None = None  # F1 on answerable questions (squad2)
    no_ans: float | None = None  # accuracy on unanswerable ones (squad2)
    artifact: str = "source"
    variant: str = "source"

    def ms_per_example(self) -> float:
        return 1000 * self.seconds / self.examples

    def collapsed(self, source: Row) -> bool:
        """HasAns F1 fell below half the source's: a model answering "no answer" to everything scores
        SQuAD v2's NoAns share in F1 (about half) and can look fine, even best, on F1 alone."""
        return (
            self.has_ans is not None
            and source.has_ans is not None
            and source.has_ans >= 10
            and self.has_ans < 0.5 * source.has_ans
        )


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


def _row(
    name: str,
    result: dict,
    task: str,
    params: int,
    size: int,
    artifact: str = "source",
    variant: str = "source",
) -> Row:
    m = result["metrics"]
    accuracy = m["accuracy"] if task == "sst2" else m["f1"]
    exact = {"squad2": m.get("exact"), "squad1": m.get("exact_match")}.get(task)
    best = m.get("best_f1") if task == "squad2" else None
    return Row(
        name,
        result["backend"],
        accuracy,
        exact,
        best,
        result["seconds"],
        result["questions"],
        params,
        size,
        has_ans=m.get("HasAns_f1") if task == "squad2" else None,
        no_ans=m.get("NoAns_f1") if task == "squad2" else None,
        artifact=artifact,
        variant=variant,
    )


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None:
        return ""
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def render_markdown(rows: list[Row], task: str, settings: str) -> str:
    source = rows[0]
    metric = "accuracy" if task == "sst2" else "F1"
    lines = [
        f"| model | backend | {metric} | Δ {metric} | EM | best F1 | Δ best F1 | HasAns F1 | NoAns | "
        "ms / example | speedup | params | size (MB) | check |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    collapsed = [r for r in rows[1:] if r.collapsed(source)]
    for r in rows:
        best_delta = None if r.best is None or source.best is None else r.best - source.best
        lines.append(
            f"| {r.name} | {r.backend} | {r.accuracy:.2f} | {r.accuracy - source.accuracy:+.2f} | "
            f"{_fmt(r.exact)} | {_fmt(r.best)} | {_fmt(best_delta, signed=True)} | {_fmt(r.has_ans)} | "
            f"{_fmt(r.no_ans)} | {r.ms_per_example():.1f} | {source.seconds / r.seconds:.2f}x | "
            f"{r.params / 1e6:.1f}M | {r.size_bytes / 1e6:.0f} | "
            f"{'**HasAns collapsed**' if r in collapsed else ''} |"
        )
    notes = ""
    if collapsed:
        notes = (
            "\n**Warning:** HasAns F1 collapsed (below half the source's) for "
            + ", ".join(r.name for r in collapsed)
            + ': these models mostly answer "no answer"; their F1 reflects the data\'s share of '
            "unanswerable questions, not reading. Do not ship them on F1 alone.\n"
        )
    return "\n".join(lines) + "\n" + notes + "\n" + settings + "\n"


MARKERS = {"source": "*", "torch": "o", "onnx": "s", "onnx-int8": "^", "onnx-fp16": "D"}


def render_chart(rows: list[Row], task: str, file: Path, settings: str, title: str = "") -> Path:
    """Accuracy change against latency: the source is the reference (its point and a line at 0);
    colour per artifact, marker per variant, every point labelled; collapsed models drawn with a red ring."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    source = rows[0]
    metric = {"squad2": "F1", "squad1": "F1"}.get(task, "accuracy")
    artifacts = list(dict.fromkeys(r.artifact for r in rows))
    colours = {a: plt.get_cmap("tab10")(i % 10) for i, a in enumerate(artifacts)}
    fig, ax = plt.subplots(figsize=(10, 6.2))
    ax.axhline(0, color="grey", linewidth=1, linestyle="--", label=f"source {metric} ({source.accuracy:.2f})")
    for r in rows:
        x, y = r.ms_per_example(), r.accuracy - source.accuracy
        marker = MARKERS.get(r.variant, "o")
        ax.scatter(x, y, s=110 if r is source else 70, marker=marker, color=colours[r.artifact], zorder=3)
        if r.collapsed(source):
            ax.scatter(x, y, s=260, facecolors="none", edgecolors="red", linewidths=1.5, zorder=2)
        label = r.name + (" (HasAns collapsed)" if r.collapsed(source) else "")
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(6, 5), fontsize=8)
    for variant, marker in MARKERS.items():
        if any(r.variant == variant for r in rows):
            ax.scatter([], [], marker=marker, color="black", label=variant)
    ax.set_xlabel("latency, ms per example (same machine, same data, tokenization included)")
    ax.set_ylabel(f"Δ {metric} vs source (points)")
    ax.set_title(title or f"Δ {metric} against latency", fontsize=10)
    ax.margins(x=0.18, y=0.15)  # room for the labels
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best", title="marker: variant; colour: artifact", title_fontsize=8)
    fig.text(0.01, 0.01, "\n".join(textwrap.wrap(settings, 150)), fontsize=7, va="bottom")
    fig.tight_layout(rect=(0, 0.12, 1, 1))
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
            name = Path(artifact).name
            table_rows.append(
                _row(f"{name} {variant}", result, task, manifest["params"]["after"], size, name, str(variant))
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
    for row in table_rows[1:]:
        if row.collapsed(table_rows[0]):
            log.warning(
                "%s: HasAns F1 %.2f collapsed (source %.2f)", row.name, row.has_ans, table_rows[0].has_ans
            )
    title = (
        f"{Path(source).name} and its artifacts on {Path(data).name}"
        + (f" ({articles.count(',') + 1} articles)" if articles else "")
        + f", n={table_rows[0].examples}"
    )
    chart = render_chart(table_rows, task, out / "report.png", settings, title)
    (out / "report.json").write_text(json.dumps([r.__dict__ for r in table_rows], indent=2) + "\n")
    return table, chart
