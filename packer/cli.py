"""prune-pack: pack | inspect | bench | synth."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from packer.errors import PackerError

log = logging.getLogger("prune-pack")


def fraction(text: str) -> float:
    """argparse type: a fraction in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a fraction in [0, 1)")
    return value


def cmd_pack(args) -> int:
    from packer.pack import PackOptions, pack

    manifest = pack(
        args.src,
        args.out,
        PackOptions(
            task=args.task,
            masks=args.masks,
            tokenizer=args.tokenizer,
            revision=args.revision,
            tolerance=args.tolerance,
            force=args.force,
            progress=not args.quiet,
            onnx=args.onnx,
            int8=args.int8,
            fp16=args.fp16,
            per_channel=not args.no_per_channel,
            calibration=args.calibration,
            check_data=args.check_data,
            sparse_storage=args.sparse_storage,
        ),
    )
    s, eq, p = manifest["structure"], manifest["equivalence"], manifest["params"]
    print(
        f"packed {args.src} -> {args.out}\n"
        f"  heads {s['heads_after']}/{s['heads_before']}, FFN dims {s['ffn_after']}/{s['ffn_before']}, "
        f"encoder linear weights kept {s['encoder_linear_fraction_kept']:.1%}\n"
        f"  parameters {p['before']:,} -> {p['after']:,}\n"
        f"  equivalence: max abs logit diff {eq['max_abs_diff']:.2e} (tolerance {eq['tolerance']:g})\n"
        f"  took {manifest['timings']['total_s']:.1f} s"
    )
    for name, entry in manifest["variants"].items():
        line = f"  variant {name}: {entry['file']}"
        if "fusion" in entry:
            f = entry["fusion"]
            line += f", attention fused {f['attention_nodes']}/{f['expected_attention_nodes']}"
        if "equivalence" in entry:
            line += f", max abs diff vs torch {entry['equivalence']['max_abs_diff']:.2e}"
        if "agreement_with_fp32" in entry:
            a = entry["agreement_with_fp32"]
            line += f", argmax agreement {a['argmax_agreement']:.1%}, correlation {a['correlation']:.4f}"
        print(line)
    storage = manifest["storage"]
    if storage["sparse_tensors"]:
        print(
            f"  sparse storage: {storage['sparse_tensors']} matrices as CSR, "
            f"{storage['dense_bytes'] / storage['stored_bytes']:.1f}x smaller than dense"
        )
    return 0


def cmd_inspect(args) -> int:
    from packer.artifact import MANIFEST, read_manifest
    from packer.inspection import plot_structure, render_table

    path = Path(args.path)
    if (path / MANIFEST).is_file():
        manifest = read_manifest(path)
        layers, params, title = manifest["layers"], manifest["params"], f"{path.name} (packed)"
        summary = manifest["structure"]
    else:
        from packer.pack import PackOptions, layer_report, prepare
        from packer.structure import summarize

        prepared = prepare(args.path, PackOptions(masks=args.masks, task=args.task, progress=not args.quiet))
        layers = [layer_report(ls) for ls in prepared.layers]
        params, title = None, f"{args.path} (source)"
        summary = summarize(prepared.layers, prepared.source.hidden_size)
    if args.json:
        print(json.dumps({"layers": layers, "structure": summary, "params": params}, indent=2))
    else:
        print(render_table(layers, params))
        print(
            f"encoder linear weights kept: {summary['encoder_linear_fraction_kept']:.1%}; "
            f"density of what packing keeps: {summary['kept_weights_density']:.1%}"
        )
    if args.plot:
        print(f"wrote {plot_structure(layers, args.plot, title)}", file=sys.stderr)
    return 0


def cmd_bench(args) -> int:
    import torch

    from packer.artifact import read_manifest, read_packed_config
    from packer.backends.base import default_threads
    from packer.evaluate.bench import encoder_flops, format_table, parse_shape, run_bench

    shapes = args.shape or ["1x384", "8x128"]
    try:
        parsed = [parse_shape(s) for s in shapes]
    except ValueError as exc:
        raise PackerError(str(exc)) from None
    manifest = read_manifest(Path(args.out))
    variants = args.variants.split(",") if args.variants else ["source", *manifest["variants"]]
    threads = args.threads or default_threads()
    results = run_bench(args.src, args.out, shapes, variants, threads, args.warmup, args.runs, args.masks)
    print(
        f"torch {torch.__version__}, CPU, {threads} threads, median of {args.runs} runs, "
        "one process per variant"
    )
    print(format_table(results, shapes))
    config = read_packed_config(Path(args.out))
    full_heads = [e["heads"]["before"] for e in manifest["layers"]]
    full_ffn = [e["ffn_dims"]["before"] for e in manifest["layers"]]
    for shape, (batch, seq) in zip(shapes, parsed, strict=True):
        ratio = encoder_flops(config.hidden_size, config.head_dim, full_heads, full_ffn, batch, seq) / max(
            encoder_flops(
                config.hidden_size, config.head_dim, config.num_heads, config.intermediate_sizes, batch, seq
            ),
            1.0,
        )
        print(f"FLOP ratio source/packed at {shape}: {ratio:.2f}x (the limit packing alone can reach)")
    if args.json:
        Path(args.json).write_text(json.dumps([r.to_dict() for r in results], indent=2) + "\n")
    return 0


def _target(args):
    from packer.evaluate.run import Target

    return Target(
        artifact=args.artifact,
        variant=args.variant,
        source=args.source,
        url=args.url,
        model=args.model,
        api_key=args.api_key,
        predictions=getattr(args, "predictions", None),
        na_probs=getattr(args, "na_probs", None),
        threads=args.threads,
    )


def _write_eval(args, result: dict) -> None:
    print(json.dumps(result["metrics"], indent=2))
    if args.output:
        Path(args.output).write_text(json.dumps(result["metrics"], indent=2) + "\n")
    if getattr(args, "save_predictions", None) and "predictions" in result:
        Path(args.save_predictions).write_text(json.dumps(result["predictions"], indent=1) + "\n")
        Path(args.save_predictions).with_suffix(".na_probs.json").write_text(
            json.dumps(result["na_probs"]) + "\n"
        )
    if args.report_json:
        keep = {k: v for k, v in result.items() if k not in ("predictions", "na_probs")}
        Path(args.report_json).write_text(json.dumps(keep, indent=2) + "\n")


def cmd_eval_squad2(args) -> int:
    from packer.evaluate.run import eval_squad2
    from packer.tasks.qa import QAOptions

    options = QAOptions(
        max_seq_len=args.max_seq_len,
        doc_stride=args.doc_stride,
        max_answer_len=args.max_answer_len,
        align_to_words=args.align_to_words,
    )
    articles = [a for a in (args.articles or "").split(",") if a] or None
    result = eval_squad2(_target(args), args.data, options, articles, args.limit, progress=not args.quiet)
    _write_eval(args, result)
    return 0


def cmd_eval_sst2(args) -> int:
    from packer.evaluate.run import eval_sst2

    _write_eval(args, eval_sst2(_target(args), args.data, args.rows, args.limit, progress=not args.quiet))
    return 0


def cmd_report(args) -> int:
    from packer.evaluate.report import build_report

    table, chart = build_report(
        task=args.task,
        data=args.data,
        source=args.source,
        artifacts=args.artifact,
        variants=args.variants.split(",") if args.variants else None,
        out=Path(args.out),
        limit=args.limit,
        articles=args.articles,
        rows=args.rows,
        threads=args.threads,
        extra=["--max-seq-len", str(args.max_seq_len), "--doc-stride", str(args.doc_stride)],
    )
    print(table.read_text())
    print(f"wrote {table} and {chart}", file=sys.stderr)
    return 0


def cmd_gates(args) -> int:
    from packer.checkpoint import read_source
    from packer.gates import magnitude_gates

    if not Path(args.out).parent.is_dir():
        raise PackerError(
            f"{Path(args.out).parent} does not exist; create it or write the gates file elsewhere"
        )
    source = read_source(args.src, progress=not args.quiet)
    masks = magnitude_gates(source, args.heads, args.ffn)
    Path(args.out).write_text(json.dumps(masks) + "\n")
    closed_heads = sum(g.count(0) for g in masks["heads"].values())
    closed_ffn = sum(g.count(0) for g in masks["ffn"].values())
    print(
        f"wrote {args.out}: {closed_heads} heads and {closed_ffn} FFN dims closed (lowest weight magnitude)"
    )
    return 0


def cmd_synth(args) -> int:
    from packer.synthetic import build_profile

    if Path(args.out).exists() and not args.force:
        raise PackerError(f"{args.out} already exists; pass --force to overwrite it")
    out = build_profile(args.out, args.profile, task=args.task, seed=args.seed, tokenizer_from=args.tokenizer)
    print(f"wrote a random {args.profile} checkpoint to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from packer.tasks.qa import QAOptions

    QA_DEFAULTS = QAOptions()  # the QA defaults live in one place (packer/tasks/qa.py)
    windows = argparse.ArgumentParser(add_help=False)  # how QA contexts are windowed (eval and report)
    windows.add_argument(
        "--max-seq-len",
        type=int,
        default=QA_DEFAULTS.max_seq_len,
        help="tokens per window (default: %(default)s)",
    )
    windows.add_argument(
        "--doc-stride",
        type=int,
        default=QA_DEFAULTS.doc_stride,
        help="tokens shared by consecutive windows (default: %(default)s)",
    )
    from packer import __version__

    parser = argparse.ArgumentParser(prog="prune-pack", description=__doc__)
    parser.add_argument("--version", action="version", version=f"prune-pack {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars or info logs")
    common.add_argument(
        "-v", "--verbose", action="store_true", help="also show ONNX Runtime's optimizer and quantizer output"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "pack", parents=[common], help="pack a pruned checkpoint into a dense resized artifact"
    )
    p.add_argument("src", help="checkpoint directory or hub id")
    p.add_argument("out", help="artifact directory to write (its name is the model's name when served)")
    p.add_argument("--masks", help="JSON gates file: {heads: {layer: [0/1,...]}, ffn: {layer: [...]}}")
    p.add_argument(
        "--task", choices=["qa", "classification"], help="override the task read from the checkpoint"
    )
    p.add_argument("--tokenizer", help="tokenizer directory or hub id when SRC has none")
    p.add_argument("--revision", help="hub revision (branch, tag or commit)")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max abs logit difference allowed (1e-4)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--onnx", action="store_true", help="also write model.onnx (fp32, fused by ONNX Runtime)")
    p.add_argument(
        "--int8", nargs="?", const="dynamic", choices=["dynamic", "static"], help="also write model.int8.onnx"
    )
    p.add_argument(
        "--no-per-channel", action="store_true", help="per-tensor instead of per-channel int8 weights"
    )
    p.add_argument(
        "--calibration", metavar="FILE", help="real text for --int8 static (SQuAD JSON, TSV, lines)"
    )
    p.add_argument("--fp16", action="store_true", help="also write model.fp16.onnx for GPUs")
    p.add_argument("--check-data", metavar="FILE", help="real text on which int8/fp16 agreement is measured")
    p.add_argument("--sparse-storage", action="store_true", help="store sparse matrices compressed (CSR)")
    p.set_defaults(func=cmd_pack)

    p = sub.add_parser("inspect", parents=[common], help="per-layer structure of a checkpoint or an artifact")
    p.add_argument("path", help="checkpoint directory, hub id, or packed artifact")
    p.add_argument("--masks", help="gates file to apply first (checkpoints only)")
    p.add_argument(
        "--task", choices=["qa", "classification"], help="override the task read from the checkpoint"
    )
    p.add_argument("--plot", metavar="FILE.png", help="also draw the per-layer structure")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("bench", parents=[common], help="latency of source vs packed, side by side")
    p.add_argument("src", help="the source checkpoint")
    p.add_argument("out", help="its packed artifact")
    p.add_argument(
        "--shape", action="append", metavar="BATCHxSEQ", help="repeatable; default 1x384 and 8x128"
    )
    p.add_argument("--warmup", type=int, default=3, help="untimed runs first (default: %(default)s)")
    p.add_argument("--runs", type=int, default=10, help="timed runs per shape (default: %(default)s)")
    p.add_argument("--threads", type=int, help="compute threads (default: all cores)")
    p.add_argument(
        "--variants", help="comma list of source,torch,onnx,onnx-int8,onnx-fp16 (default: all present)"
    )
    p.add_argument("--masks", help="gates file the artifact was packed with")
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("eval", help="accuracy: SQuAD v2 (official metric) or SST-2")
    tasks = p.add_subparsers(dest="eval_task", required=True)
    target = argparse.ArgumentParser(add_help=False)
    target.add_argument("--data", required=True, help="SQuAD v2 JSON / SST-2 dev.tsv")
    target.add_argument("--artifact", help="packed artifact, evaluated in process")
    target.add_argument("--variant", default="auto", help="artifact variant (auto: the CPU default)")
    target.add_argument("--source", help="the unpacked source checkpoint, through transformers")
    target.add_argument("--url", help="a running prune-serve, e.g. http://127.0.0.1:8000")
    target.add_argument("--model", help="the served model's name (with --url)")
    target.add_argument("--api-key", help="with --url, when the service wants one")
    target.add_argument("--limit", type=int, help="only the first N questions / rows")
    target.add_argument("--threads", type=int, help="compute threads (default: all cores)")
    target.add_argument("--output", metavar="METRICS.json", help="write the metrics JSON")
    target.add_argument("--report-json", help=argparse.SUPPRESS)
    q = tasks.add_parser(
        "squad2", parents=[common, target, windows], help="EM/F1 with the official SQuAD v2 metric"
    )
    q.add_argument("--predictions", metavar="PRED.json", help="score a {id: answer} file instead of a model")
    q.add_argument("--na-probs", metavar="NA.json", help="with --predictions: {id: null score} for best_*")
    q.add_argument("--articles", help="comma-separated article titles (e.g. a held-out split)")
    q.add_argument("--save-predictions", metavar="PRED.json", help="write {id: answer} (and its na_probs)")
    q.add_argument(
        "--max-answer-len",
        type=int,
        default=QA_DEFAULTS.max_answer_len,
        help="answer tokens at most (default: %(default)s)",
    )
    q.add_argument(
        "--align-to-words",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="widen answers to whole words of the context (the HF pipeline's default)",
    )
    q.set_defaults(func=cmd_eval_squad2)
    c = tasks.add_parser("sst2", parents=[common, target], help="accuracy on SST-2 dev.tsv")
    c.add_argument("--rows", help="FIRST-LAST data rows, 1-based (e.g. 601-872, a held-out split)")
    c.set_defaults(func=cmd_eval_sst2)

    p = sub.add_parser("report", parents=[common, windows], help="accuracy vs speed table and chart")
    p.add_argument("task", choices=["squad2", "sst2"], help="which evaluation")
    p.add_argument("--data", required=True, help="SQuAD v2 JSON / SST-2 dev.tsv")
    p.add_argument("--source", required=True, help="the unpacked source checkpoint (the speedup baseline)")
    p.add_argument("--artifact", action="append", default=[], help="repeatable")
    p.add_argument("--variants", help="comma list (default: every variant each artifact has)")
    p.add_argument("--out", required=True, help="directory for report.md and report.png")
    p.add_argument("--limit", type=int, help="only the first N questions / rows")
    p.add_argument("--articles", help="comma-separated article titles (squad2: a held-out split)")
    p.add_argument("--rows", help="FIRST-LAST data rows, 1-based (sst2: a held-out split)")
    p.add_argument("--threads", type=int, help="compute threads (default: all cores)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("gates", parents=[common], help="a masks file closing the weakest heads / FFN dims")
    p.add_argument("src", help="checkpoint directory or hub id")
    p.add_argument("out", metavar="MASKS.json", help="gates file to write")
    p.add_argument(
        "--heads", type=fraction, default=0.25, help="fraction of heads to close, in [0, 1) (0.25)"
    )
    p.add_argument("--ffn", type=fraction, default=0.5, help="fraction of FFN dims to close, in [0, 1) (0.5)")
    p.set_defaults(func=cmd_gates)

    p = sub.add_parser(
        "synth", parents=[common], help="write a random pruned checkpoint (tests and benchmarks)"
    )
    p.add_argument("out", help="checkpoint directory to write")
    p.add_argument(
        "--profile",
        default="tiny",
        choices=["tiny", "bert-base-40h-70f", "bert-large-seed"],
        help="shape and pruning profile (default: %(default)s)",
    )
    p.add_argument(
        "--task", default="qa", choices=["qa", "classification"], help="head (default: %(default)s)"
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    p.add_argument("--tokenizer", help="copy this real tokenizer (directory or hub id) instead of a toy one")
    p.set_defaults(func=cmd_synth)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "verbose", False):
        from packer import onnx_export

        onnx_export.VERBOSE = True
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except PackerError as exc:
        print(f"prune-pack: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # unreadable input, unwritable output, full disk: say which file, no traceback
        print(f"prune-pack: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
