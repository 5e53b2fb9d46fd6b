"""nn_pruning's table, side by side with ours: each published structure rebuilt (random weights), packed
and benchmarked (torch fp32, ORT fp32, ORT int8 at 1x384 and 8x128), one structure after another.

python -m packer.evaluate.nn_pruning_table --reference results_squadv2.json --work DIR [--only 0,5,9]
    [--runs 10] [--markdown OUT.md] [--keep]

Their speedup is their measured eval time against BERT-base on a GPU; ours are CPU latencies against
the unpacked source in the same run. "torch / FLOP" is the packed torch speedup over the FLOP ratio
(the target: >= 90%). Each checkpoint takes minutes on 2 cores: run it alone.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

SHAPES = ("1x384", "8x128")
VARIANTS = ("torch", "onnx", "onnx-int8")


def prune_pack(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "packer.cli", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"prune-pack {args[0]} failed: {done.stderr.strip().splitlines()[-1:]}")
    return done.stdout


def row(reference: str, index: int, work: Path, runs: int, keep: bool = False) -> dict:
    from packer.evaluate.model_bench import encoder_flops, parse_shape
    from packer.synth.nn_pruning import read_references

    ref = read_references(reference)[index]
    src, out, bench = work / f"src{index}", work / f"out{index}", work / f"bench{index}.json"
    prune_pack("synth", str(src), "--nn-pruning", reference, "--checkpoint", str(index), "--force")
    prune_pack("pack", "-q", str(src), str(out), "--onnx", "--int8", "--force")
    args = ["bench", "-q", str(src), str(out), "--runs", str(runs), "--json", str(bench)]
    prune_pack(
        *args, "--variants", "source," + ",".join(VARIANTS), *[a for s in SHAPES for a in ("--shape", s)]
    )
    timings = {r["variant"]: r for r in json.loads(bench.read_text())}
    manifest = json.loads((out / "pack.json").read_text())
    if not keep:  # ~1.5 GB per BERT-base row: the whole table would not fit most disks
        shutil.rmtree(src)
        shutil.rmtree(out)
    shape = ref.shape
    full_heads, full_ffn = [shape.heads] * shape.layers, [shape.intermediate] * shape.layers
    kept_heads = [shape.heads - len(ref.pruned_heads.get(i, [])) for i in range(shape.layers)]
    d = shape.hidden // shape.heads
    result = {
        "checkpoint": index,
        "model": f"{shape.layers}x{shape.hidden}",
        "their_f1": round(ref.f1, 2),
        "their_speedup": round(ref.speedup, 2),
        "attention_density": round(sum(ref.attention_density) / shape.layers, 3),
        "params_after": manifest["params"]["after"],
    }
    for s in SHAPES:
        b, n = parse_shape(s)
        flops = encoder_flops(shape.hidden, d, full_heads, full_ffn, b, n) / encoder_flops(
            shape.hidden, d, kept_heads, ref.ffn_kept, b, n
        )
        result[f"flop_ratio_{s}"] = round(flops, 2)
        base = timings["source"]["ms"][s]
        for v in VARIANTS:
            result[f"{v}_{s}"] = round(base / timings[v]["ms"][s], 2)
            result[f"{v}_{s}_cv"] = round(timings[v]["cv"][s], 3)
        result[f"torch_over_flop_{s}"] = round(result[f"torch_{s}"] / flops, 2)
    return result


def markdown(rows: list[dict]) -> str:
    """The table; the last column is the largest coefficient of variation of the row's timings (its
    cells are medians of `--runs` runs; above 10% the bench warned that other work was running)."""
    head = "| # | model | their F1 | their speedup | attn density |"
    head += "".join(f" FLOP {s} | torch {s} | ORT fp32 {s} | ORT int8 {s} | torch/FLOP {s} |" for s in SHAPES)
    lines = [head + " max CV |", "|" + " --- |" * (6 + 5 * len(SHAPES))]
    for r in rows:
        cells = f"| {r['checkpoint']} | {r['model']} | {r['their_f1']} | {r['their_speedup']}x |"
        cells += f" {r['attention_density']:.0%} |"
        for s in SHAPES:
            cells += f" {r[f'flop_ratio_{s}']}x | {r[f'torch_{s}']}x | {r[f'onnx_{s}']}x |"
            cells += f" {r[f'onnx-int8_{s}']}x | {r[f'torch_over_flop_{s}']:.0%} |"
        worst = max(v for k, v in r.items() if k.endswith("_cv"))
        lines.append(cells + f" {worst:.0%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference", required=True, help="nn_pruning's results_squadv2.json")
    p.add_argument("--work", required=True, help="directory for the checkpoints, artifacts and timings")
    p.add_argument("--only", help="comma list of checkpoint indices (default: all)")
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--markdown", help="also write the table here")
    p.add_argument("--keep", action="store_true", help="keep each row's checkpoint and artifact")
    args = p.parse_args(argv)
    from packer.synth.nn_pruning import read_references

    count = len(read_references(args.reference))
    indices = [int(i) for i in args.only.split(",")] if args.only else list(range(count))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in indices:
        rows.append(row(args.reference, i, work, args.runs, args.keep))
        print(json.dumps(rows[-1]), flush=True)
    table = markdown(rows)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
