"""What each prune-pack subcommand does (the parser and main() are in packer/cli.py)."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from packer.errors import PackerError

log = logging.getLogger("prune-pack")


def cmd_pack(args) -> int:
    from packer.build.pack import PackOptions, pack

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
            dtype=args.dtype,
        ),
    )
    s, eq, p = manifest["structure"], manifest["equivalence"], manifest["params"]
    print(
        f"packed {args.src} -> {args.out}\n"
        f"  heads {s['heads_after']}/{s['heads_before']}, FFN dims {s['ffn_after']}/{s['ffn_before']}, "
        f"encoder linear weights kept {s['encoder_linear_fraction_kept']:.1%}\n"
        f"  parameters {p['before']:,} -> {p['after']:,}\n"
        f"  equivalence: max abs logit diff {eq['max_abs_diff']:.2e} (tolerance {eq['tolerance']:g})\n"
        f"  took {manifest['timings']['total_s']:.1f} s; "
        f"artifact {sum(manifest['sizes'].values()) / 1e6:.1f} MB"
    )
    for name, entry in manifest["variants"].items():
        line = f"  variant {name}: {entry['file']} ({manifest['sizes'][entry['file']] / 1e6:.1f} MB)"
        if "fusion" in entry:
            f = entry["fusion"]
            line += f", attention fused {f['attention_nodes']}/{f['expected_attention_nodes']}"
        if "equivalence" in entry:
            line += f", max abs diff vs torch {entry['equivalence']['max_abs_diff']:.2e}"
        if "agreement_with_fp32" in entry:
            a = entry["agreement_with_fp32"]
            line += f", argmax agreement {a['argmax_agreement']:.1%}, correlation {a['correlation']:.4f}"
        print(line)
    for warning in empty_layer_warnings(manifest["layers"]):
        print(f"  warning: {warning}")
    storage = manifest["storage"]
    if storage["sparse_tensors"]:
        print(
            f"  sparse storage: {storage['sparse_tensors']} matrices as CSR, "
            f"{storage['dense_bytes'] / storage['stored_bytes']:.1f}x smaller than dense"
        )
    return 0


def empty_layer_warnings(layers: list[dict]) -> list[str]:
    """Layers left with no heads or no FFN dims: legitimate when pruning chose it, fatal when a gate
    file closed a layer by accident (the README's gates example once closed all of layer 0's heads)."""
    no_heads = [str(layer["layer"]) for layer in layers if not layer["heads"]["after"]]
    no_ffn = [str(layer["layer"]) for layer in layers if not layer["ffn_dims"]["after"]]
    out = []
    if no_heads:
        out.append(f"layer(s) {', '.join(no_heads)} lost every attention head (attention is bias-only there)")
    if no_ffn:
        out.append(f"layer(s) {', '.join(no_ffn)} lost every FFN dim (the FFN is bias-only there)")
    return out


def cmd_inspect(args) -> int:
    from packer.artifact import MANIFEST, read_manifest
    from packer.build.inspection import plot_structure, render_table

    path = Path(args.path)
    if (path / MANIFEST).is_file():
        manifest = read_manifest(path)
        layers, params, title = manifest["layers"], manifest["params"], f"{path.name} (packed)"
        summary, arch, task = manifest["structure"], manifest.get("arch"), manifest.get("task")
    else:
        from packer.build.pack import PackOptions, layer_report, prepare
        from packer.build.structure import summarize

        prepared = prepare(args.path, PackOptions(masks=args.masks, task=args.task, progress=not args.quiet))
        layers = [layer_report(ls) for ls in prepared.layers]
        params, title = None, f"{args.path} (source)"
        summary = summarize(prepared.layers, prepared.source.hidden_size)
        arch, task = prepared.source.spec.model_type, prepared.source.task
    if args.json:
        report = {"arch": arch, "task": task, "layers": layers, "structure": summary, "params": params}
        print(json.dumps(report, indent=2))
    else:
        print(f"{arch} {task}")
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
    from packer.evaluate.model_bench import encoder_flops, format_table, load_warning, parse_shape, run_bench
    from packer.runtime.backends.base import default_threads

    shapes = args.shape or ["1x384", "8x128"]
    try:
        parsed = [parse_shape(s) for s in shapes]
    except ValueError as exc:
        raise PackerError(str(exc)) from None
    manifest = read_manifest(Path(args.out))
    variants = args.variants.split(",") if args.variants else ["source", *manifest["variants"]]
    threads = args.threads or default_threads()
    busy = load_warning(threads)
    if busy:
        print(f"warning: {busy}")
    results = run_bench(
        args.src,
        args.out,
        shapes,
        variants,
        threads,
        args.warmup,
        args.runs,
        args.masks,
        args.device,
        args.profile,
    )
    print(
        f"torch {torch.__version__}, {args.device}, {threads} threads, median of {args.runs} runs, "
        "one process per variant (each row names the device it ran on)"
    )
    print(format_table(results, shapes))
    for r in results:
        if r.profile:
            top = ", ".join(f"{op} {100 * share:.0f}%" for op, share in r.profile.items())
            print(f"profile {r.variant} at {shapes[-1]}: {top}")
    config = read_packed_config(Path(args.out))
    full_heads = [e["heads"]["before"] for e in manifest["layers"]]
    full_ffn = [e["ffn_dims"]["before"] for e in manifest["layers"]]
    h, d = config.hidden_size, config.head_dim
    flops = {
        shape: {
            "source": encoder_flops(h, d, full_heads, full_ffn, batch, seq),
            "packed": encoder_flops(h, d, config.num_heads, config.intermediate_sizes, batch, seq),
        }
        for shape, (batch, seq) in zip(shapes, parsed, strict=True)
    }
    for shape, f in flops.items():
        ratio = f["source"] / max(f["packed"], 1.0)
        print(f"FLOP ratio source/packed at {shape}: {ratio:.2f}x (the limit packing alone can reach)")
    roofline = None
    if args.device == "cpu":
        from packer.evaluate.roofline import gemm_rates, number_format

        tokens = max(batch * seq for batch, seq in parsed)
        rates = gemm_rates(tokens, h, 4 * h, threads)
        print(
            f"GEMM rate here ({tokens}x{h}x{4 * h}, {threads} threads, ONNX Runtime): "
            f"fp32 {rates['fp32'] / 1e9:.0f} GFLOP/s, int8 {rates['int8'] / 1e9:.0f} GOP/s"
        )
        roofline = {"gemm_rates": rates, "fraction_of_limit": {}}
        for r in results:
            kind = "source" if r.variant == "source" else "packed"
            fractions = {
                shape: flops[shape][kind] / rates[number_format(r.variant)] / (r.ms[shape] / 1000)
                for shape in shapes
            }
            roofline["fraction_of_limit"][r.variant] = fractions
            cells = ", ".join(f"{shape} {100 * value:.0f}%" for shape, value in fractions.items())
            print(f"GEMM limit reached by {r.variant} ({number_format(r.variant)}): {cells}")
    if args.json:
        rows = [r.to_dict() for r in results]
        if roofline:
            for row in rows:
                row["fraction_of_limit"] = roofline["fraction_of_limit"][row["variant"]]
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
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
        device=args.device,
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
    from packer.runtime.tasks.qa import QAInputError, QAOptions, doc_stride_for

    options = QAOptions(
        max_seq_len=args.max_seq_len,
        doc_stride=doc_stride_for(args.max_seq_len) if args.doc_stride is None else args.doc_stride,
        max_answer_len=args.max_answer_len,
        align_to_words=args.align_to_words,
    )
    articles = [a for a in (args.articles or "").split(",") if a] or None
    version = 1 if args.eval_task == "squad1" else 2
    try:
        result = eval_squad2(
            _target(args), args.data, options, articles, args.limit, progress=not args.quiet, version=version
        )
    except QAInputError as exc:  # windows that cannot be made: the options are wrong, say which
        raise PackerError(f"--max-seq-len / --doc-stride: {exc}") from None
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
        device=args.device,
        extra=["--max-seq-len", str(args.max_seq_len)]
        + ([] if args.doc_stride is None else ["--doc-stride", str(args.doc_stride)]),
    )
    print(table.read_text())
    print(f"wrote {table} and {chart}", file=sys.stderr)
    return 0


def cmd_gates(args) -> int:
    from packer.build.checkpoint import read_source
    from packer.build.gates import magnitude_gates

    if not Path(args.out).parent.is_dir():
        raise PackerError(
            f"{Path(args.out).parent} does not exist; create it or write the gates file elsewhere"
        )
    source = read_source(args.src, progress=not args.quiet)
    masks = magnitude_gates(source, args.heads, args.ffn)
    closed = [
        f"layer {i} would lose every {'head' if section == 'heads' else 'FFN dim'}"
        for section in ("heads", "ffn")
        for i, gates in masks[section].items()
        if not any(gates)
    ]
    if closed and not args.allow_empty_layers:
        raise PackerError(
            f"{'; '.join(closed)} (magnitude ranks globally); such a model usually answers nothing. "
            "Close a smaller fraction, use `prune-pack prune` (importance from data, with recovery), or "
            "pass --allow-empty-layers if this is what you want"
        )
    for message in closed:
        print(f"warning: {message} (--allow-empty-layers)", file=sys.stderr)
    Path(args.out).write_text(json.dumps(masks) + "\n")
    closed_heads = sum(g.count(0) for g in masks["heads"].values())
    closed_ffn = sum(g.count(0) for g in masks["ffn"].values())
    print(
        f"wrote {args.out}: {closed_heads} heads and {closed_ffn} FFN dims closed (lowest weight magnitude)"
    )
    return 0


def cmd_prune(args) -> int:
    from packer.build.prune.run import PruneOptions, prune
    from packer.evaluate.run import parse_rows

    if args.steps is None and args.time_budget is None:
        raise PackerError("prune needs --steps N or --time-budget SECONDS (--steps 0: no recovery)")
    options = PruneOptions(
        data=args.data,
        target_speedup=args.target_speedup,
        method=args.method,
        exclude_articles=args.exclude_articles.split(",") if args.exclude_articles else None,
        rows=parse_rows(args.rows),
        time_budget=args.time_budget,
        steps=args.steps,
        importance_steps=args.importance_steps,
        teacher=args.teacher,
        device=args.device,
        batch_size=args.batch_size,
        lr=args.lr,
        max_length=args.max_length,
        seed=args.seed,
        force=args.force,
        progress=not args.quiet,
    )
    report = prune(args.src, args.out, options)
    recovery = report["recovery"]
    print(
        f"wrote {args.out}: {report['method']} kept {report['heads_kept']}/{report['heads_total']} heads and "
        f"{report['ffn_kept']}/{report['ffn_total']} FFN dims; FLOP ratio {report['flop_ratio']:.2f} "
        f"(target {report['target_speedup']:g}, encoder FLOPs at {report['flop_ratio_measured_at']})"
    )
    for key, what in (("layers_without_heads", "every head"), ("layers_without_ffn", "every FFN dim")):
        if report[key]:
            print(f"layers {report[key]} lost {what} (their importance ranked lowest)")
    if recovery:
        print(
            f"recovery: {recovery['steps']} steps in {recovery['seconds']:.0f} s, loss "
            f"{recovery['first_loss']:.4f} -> {recovery['last_loss']:.4f}"
        )
    else:
        print("no recovery (--steps 0)")
    print(f"next: prune-pack pack {args.out} PACKED")
    return 0


def cmd_synth(args) -> int:
    from packer.synth.checkpoints import build_profile

    if Path(args.out).exists() and not args.force:
        raise PackerError(f"{args.out} already exists; pass --force to overwrite it")
    if args.nn_pruning:
        from packer.synth.checkpoints import build_checkpoint
        from packer.synth.nn_pruning import plan_for, read_references

        references = read_references(args.nn_pruning)
        if not 0 <= args.checkpoint < len(references):
            raise PackerError(
                f"--checkpoint {args.checkpoint}: {args.nn_pruning} has 0..{len(references) - 1}"
            )
        ref = references[args.checkpoint]
        out = build_checkpoint(
            args.out,
            shape=ref.shape,
            plan=plan_for(ref, args.seed),
            seed=args.seed,
            tokenizer_from=args.tokenizer,
        )
        density = sum(ref.attention_density) / len(ref.attention_density)
        print(
            f"wrote nn_pruning checkpoint {args.checkpoint} ({ref.name.rsplit('/', 1)[-1]}) to {out}: "
            f"{sum(map(len, ref.pruned_heads.values()))} heads removed, FFN dims kept {sum(ref.ffn_kept)}, "
            f"attention density in kept heads {density:.0%} (not rebuilt); their F1 {ref.f1:.2f}, "
            f"speedup {ref.speedup:.2f}x"
        )
        return 0
    out = build_profile(args.out, args.profile, task=args.task, seed=args.seed, tokenizer_from=args.tokenizer)
    print(f"wrote a random {args.profile} checkpoint to {out}")
    return 0
