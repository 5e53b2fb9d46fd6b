"""prune-pack: the argument parser and main(); what each subcommand does is in packer/commands.py."""

from __future__ import annotations

import argparse
import logging
import sys

from packer import commands
from packer.artifact import Variant
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


def build_parser() -> argparse.ArgumentParser:
    from packer.runtime.tasks.qa import QAOptions

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
        help=f"tokens shared by consecutive windows (default: {QA_DEFAULTS.doc_stride}, or a third of a "
        "shorter window, as the service does)",
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
        "--int8",
        nargs="?",
        const="dynamic",
        choices=["dynamic", "static"],
        help="also write model.int8.onnx (the fp32 model.onnx it is made from is kept only with --onnx)",
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
    p.add_argument(
        "--dtype",
        default="fp32",
        choices=["fp32", "fp16"],
        help="storage of model.safetensors: fp16 halves it (upcast to fp32 at load on CPU; the change in "
        "logits is recorded in pack.json) (default: %(default)s)",
    )
    p.set_defaults(func=commands.cmd_pack)

    p = sub.add_parser("inspect", parents=[common], help="per-layer structure of a checkpoint or an artifact")
    p.add_argument("path", help="checkpoint directory, hub id, or packed artifact")
    p.add_argument("--masks", help="gates file to apply first (checkpoints only)")
    p.add_argument(
        "--task", choices=["qa", "classification"], help="override the task read from the checkpoint"
    )
    p.add_argument("--plot", metavar="FILE.png", help="also draw the per-layer structure")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=commands.cmd_inspect)

    p = sub.add_parser("bench", parents=[common], help="latency of source vs packed, side by side")
    p.add_argument("src", help="the source checkpoint")
    p.add_argument("out", help="its packed artifact")
    p.add_argument(
        "--shape", action="append", metavar="BATCHxSEQ", help="repeatable; default 1x384 and 8x128"
    )
    p.add_argument("--warmup", type=int, default=3, help="untimed runs first (default: %(default)s)")
    p.add_argument("--runs", type=int, default=10, help="timed runs per shape (default: %(default)s)")
    p.add_argument("--threads", type=int, help="compute threads (default: all cores)")
    p.add_argument("--variants", help=f"comma list of source,{','.join(Variant)} (default: all present)")
    p.add_argument("--masks", help="gates file the artifact was packed with")
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    p.add_argument(
        "--profile",
        action="store_true",
        help="time per operator type at the last shape (ORT / torch profiler)",
    )
    p.add_argument(
        "--device", default="cpu", choices=["cpu", "cuda", "auto"], help="where to run (default: %(default)s)"
    )
    p.set_defaults(func=commands.cmd_bench)

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
    target.add_argument(
        "--device", default="cpu", choices=["cpu", "cuda", "auto"], help="where to run (default: %(default)s)"
    )
    target.add_argument("--output", metavar="METRICS.json", help="write the metrics JSON")
    target.add_argument("--report-json", help=argparse.SUPPRESS)
    for version, about in (
        ("squad2", "EM/F1 with the official SQuAD v2 metric"),
        ("squad1", "EM/F1 with the official SQuAD 1.1 metric (every question answerable, no null answer)"),
    ):
        q = tasks.add_parser(version, parents=[common, target, windows], help=about)
        q.add_argument(
            "--predictions", metavar="PRED.json", help="score a {id: answer} file instead of a model"
        )
        if version == "squad2":
            q.add_argument(
                "--na-probs", metavar="NA.json", help="with --predictions: {id: null score} for best_*"
            )
        q.add_argument("--articles", help="comma-separated article titles (e.g. a held-out split)")
        q.add_argument(
            "--save-predictions", metavar="PRED.json", help="write {id: answer} (and its na_probs)"
        )
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
        q.set_defaults(func=commands.cmd_eval_squad2)
    c = tasks.add_parser("sst2", parents=[common, target], help="accuracy on SST-2 dev.tsv")
    c.add_argument("--rows", help="FIRST-LAST data rows, 1-based (e.g. 601-872, a held-out split)")
    c.set_defaults(func=commands.cmd_eval_sst2)

    p = sub.add_parser("report", parents=[common, windows], help="accuracy vs speed table and chart")
    p.add_argument("task", choices=["squad2", "squad1", "sst2"], help="which evaluation")
    p.add_argument("--data", required=True, help="SQuAD v2 JSON / SST-2 dev.tsv")
    p.add_argument("--source", required=True, help="the unpacked source checkpoint (the speedup baseline)")
    p.add_argument("--artifact", action="append", default=[], help="repeatable")
    p.add_argument("--variants", help="comma list (default: every variant each artifact has)")
    p.add_argument("--out", required=True, help="directory for report.md and report.png")
    p.add_argument("--limit", type=int, help="only the first N questions / rows")
    p.add_argument("--articles", help="comma-separated article titles (squad2: a held-out split)")
    p.add_argument("--rows", help="FIRST-LAST data rows, 1-based (sst2: a held-out split)")
    p.add_argument("--threads", type=int, help="compute threads (default: all cores)")
    p.add_argument(
        "--device", default="cpu", choices=["cpu", "cuda", "auto"], help="where to run (default: %(default)s)"
    )
    p.set_defaults(func=commands.cmd_report)

    p = sub.add_parser("gates", parents=[common], help="a masks file closing the weakest heads / FFN dims")
    p.add_argument("src", help="checkpoint directory or hub id")
    p.add_argument("out", metavar="MASKS.json", help="gates file to write")
    p.add_argument(
        "--heads", type=fraction, default=0.25, help="fraction of heads to close, in [0, 1) (0.25)"
    )
    p.add_argument("--ffn", type=fraction, default=0.5, help="fraction of FFN dims to close, in [0, 1) (0.5)")
    p.add_argument(
        "--allow-empty-layers",
        action="store_true",
        help="write the gates even when a layer would lose every head or FFN dim (refused otherwise)",
    )
    p.set_defaults(func=commands.cmd_gates)

    p = sub.add_parser(
        "prune",
        parents=[common],
        help="prune a dense fine-tuned model: gates, a FLOP target, distillation recovery",
        description="Writes OUT: the pruned checkpoint (full shapes, zeros), masks.json and prune.json; "
        "then `prune-pack pack OUT PACKED`.",
    )
    p.add_argument("src", help="the dense fine-tuned checkpoint (directory or hub id)")
    p.add_argument("out", help="directory to write the pruned checkpoint to")
    p.add_argument("--data", action="append", required=True, help="training data: SQuAD JSON (QA) or TSV")
    p.add_argument("--exclude-articles", help="comma-separated SQuAD article titles to leave out (held out)")
    p.add_argument("--rows", help="TSV rows to train on, 1-based inclusive, e.g. 1-600")
    p.add_argument("--target-speedup", type=float, required=True, help="FLOP ratio to reach, e.g. 2.0")
    p.add_argument("--time-budget", type=float, help="seconds for importance and recovery together")
    p.add_argument("--steps", type=int, help="recovery steps (0: no recovery)")
    p.add_argument("--importance-steps", type=int, help="batches for gain / l0 (default 64 / 200)")
    p.add_argument(
        "--method", default="l0", choices=["l0", "gain", "magnitude"], help="importance (default l0)"
    )
    p.add_argument("--teacher", help="distillation teacher (default: SRC itself)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-5, help="recovery peak learning rate")
    p.add_argument("--max-length", type=int, default=256, help="tokens per training window")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="overwrite OUT")
    p.set_defaults(func=commands.cmd_prune)

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
    p.add_argument(
        "--nn-pruning",
        metavar="RESULTS.json",
        help="rebuild a structure of nn_pruning's results file (BERT-base QA) instead of --profile",
    )
    p.add_argument(
        "--checkpoint",
        type=int,
        default=0,
        help="with --nn-pruning: which of its checkpoints, 0-based (sorted)",
    )
    p.set_defaults(func=commands.cmd_synth)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "verbose", False):
        from packer.build import onnx_export

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
