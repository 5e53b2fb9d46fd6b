"""pack: checkpoint -> structure -> resize -> verify -> artifact."""

from __future__ import annotations

import json
import logging
import platform
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch

from packer import __version__
from packer.artifact import (
    TOKENIZER,
    VARIANT_FILES,
    WEIGHTS,
    Variant,
    atomic_directory,
    check_out,
    remove_leftovers,
    write_manifest,
)
from packer.build.checkpoint import Source, has_tokenizer, read_source
from packer.build.interop import copy_code, transformers_config
from packer.build.masks import Masks, apply_masks, read_masks
from packer.build.resize import packed_config, resize
from packer.build.structure import LayerStructure, analyze, summarize
from packer.build.textdata import encode, read_examples
from packer.build.variants import VariantOptions, build_variants
from packer.build.verify import check_equivalence, random_batches, reference_model, text_batches
from packer.errors import CheckpointError, VerificationError
from packer.runtime import sparse
from packer.runtime.loading import build_model
from packer.runtime.modeling import count_parameters

log = logging.getLogger(__name__)


@dataclass
class PackOptions:
    task: str | None = None
    masks: str | None = None
    tokenizer: str | None = None
    revision: str | None = None
    tolerance: float = 1e-4
    force: bool = False
    seed: int = 0
    progress: bool = True
    onnx: bool = False
    int8: str | None = None  # dynamic | static (implies onnx)
    fp16: bool = False  # implies onnx
    per_channel: bool = True
    calibration: str | None = None  # real text for static int8
    check_data: str | None = None  # real text for variant agreement (SQuAD JSON, TSV, lines)
    sparse_storage: bool = False
    dtype: str = "fp32"  # storage of model.safetensors: fp32, or fp16 (half the size; upcast at load)


@dataclass
class Prepared:
    """A source with masks applied and its structure found: what inspect shows and pack packs."""

    source: Source
    masks: Masks | None
    layers: list[LayerStructure]
    seconds: float


def prepare(src: str, options: PackOptions) -> Prepared:
    start = time.perf_counter()
    source = read_source(src, task=options.task, revision=options.revision, progress=options.progress)
    masks = read_masks(options.masks) if options.masks else None
    if masks:
        apply_masks(source, masks)
    return Prepared(source, masks, analyze(source), time.perf_counter() - start)


def load_source_tokenizer(source: Source, override: str | None):
    from transformers import AutoTokenizer

    location = override or str(source.path)
    if override is None and not has_tokenizer(source.path):
        raise CheckpointError(
            f"{source.path} has no tokenizer files (tokenizer.json, vocab.txt or vocab.json); "
            "pass --tokenizer PATH_OR_HUB_ID"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(location)
    except Exception as exc:
        raise CheckpointError(f"cannot load the tokenizer from {location}: {exc}") from exc
    if not getattr(tokenizer, "is_fast", False):
        raise CheckpointError(f"the tokenizer at {location} has no fast version; character offsets need one")
    rows = int(source.config["vocab_size"])
    if len(tokenizer) > rows:
        # Served, such a token would index past the embedding table and fail every window batched with it.
        raise CheckpointError(
            f"the tokenizer at {location} has {len(tokenizer)} tokens (ids up to {len(tokenizer) - 1}), "
            f"but the model's embedding table has {rows} rows (vocab_size); use the model's own tokenizer "
            "(--tokenizer)"
        )
    return tokenizer


def stored_dtype(tensor: torch.Tensor, dtype: str) -> torch.Tensor:
    return tensor.half() if dtype == "fp16" and tensor.is_floating_point() else tensor


def torch_variant_entry(model, weights: dict, options: PackOptions, source) -> dict:
    """The torch variant's pack.json entry; with fp16 storage, how far the upcast model moves."""
    entry = {"file": WEIGHTS, "dtype": "float32"}
    if options.dtype == "fp32":
        return entry
    if options.dtype != "fp16":
        raise CheckpointError(f"--dtype {options.dtype!r} is not one of fp32, fp16")
    upcast = build_model(model.config)
    upcast.load_state_dict({k: stored_dtype(v, "fp16").to(v.dtype) for k, v in weights.items()})
    upcast.eval()
    diff = 0.0
    with torch.inference_mode():
        for batch in random_batches(source, options.seed):
            for a, b in zip(model(**batch).values(), upcast(**batch).values(), strict=True):
                diff = max(diff, float((a - b).abs().max()))
    entry |= {"storage_dtype": "float16", "storage_max_abs_diff_vs_fp32": diff}
    return entry


def layer_report(ls: LayerStructure) -> dict:
    return {
        "layer": ls.index,
        "heads": {"before": ls.num_heads, "after": len(ls.kept_heads)},
        "ffn_dims": {"before": ls.intermediate_size, "after": len(ls.kept_ffn)},
        "kept_heads": ls.kept_heads,
        "removed_heads": {"value_zero_folded": ls.heads_value_zero, "output_zero": ls.heads_output_zero},
        "uniform_attention_heads_kept": ls.uniform_heads,
        "removed_ffn_dims": {"input_zero_folded": ls.ffn_input_zero, "output_zero": ls.ffn_output_zero},
        "density": ls.density,
        "kept_density": ls.kept_density,
    }


def pack(src: str, out: str | Path, options: PackOptions | None = None) -> dict:
    """Pack `src` into the artifact directory `out`; returns the manifest (pack.json)."""
    options = options or PackOptions()
    check_out(Path(out), options.force)  # before seconds of reading and resizing, not after
    remove_leftovers(Path(out))
    t0 = time.perf_counter()
    prepared = prepare(src, options)
    source, layers = prepared.source, prepared.layers
    tokenizer = load_source_tokenizer(source, options.tokenizer)
    for ls in layers:
        if ls.uniform_heads:
            log.warning(
                "layer %d: heads %s have zero query or key weights but a live value path; they attend "
                "uniformly and are kept",
                ls.index,
                ls.uniform_heads,
            )

    t1 = time.perf_counter()
    config = packed_config(source, layers)
    weights = resize(source, layers, progress=options.progress)
    model = build_model(config)
    model.load_state_dict(weights, strict=True)
    model.eval()
    t2 = time.perf_counter()

    reference = reference_model(source)
    equivalence = check_equivalence(
        reference, model, tokenizer, source, options.tolerance, options.seed, options.progress
    )
    params_before = count_parameters(reference)
    del reference
    t3 = time.perf_counter()
    if not equivalence.passed:
        raise VerificationError(
            f"packed model differs from the source: max abs logit diff {equivalence.max_abs_diff:.3g} "
            f"(random ids {equivalence.random_max_abs_diff:.3g}, text {equivalence.text_max_abs_diff:.3g}) "
            f"> tolerance {options.tolerance:g}; nothing was written"
        )

    summary = summarize(layers, source.hidden_size)
    if summary["kept_weights_density"] < 0.9:
        log.warning(
            "%.0f%% of the weights left after packing are zeros (unstructured sparsity): packing cannot "
            "remove them; they are reported in pack.json",
            100 * (1 - summary["kept_weights_density"]),
        )
    manifest = {
        "format": 1,
        "packer_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "source": {
            "ref": source.ref,
            "path": str(source.path),
            "revision": options.revision,
            "weights": source.weight_files,
            "expanded_pruned_heads": {str(k): v for k, v in source.expanded_pruned_heads.items()},
            "masks": prepared.masks.describe() if prepared.masks else None,
        },
        "task": source.task,
        "arch": source.spec.model_type,
        "variants": {Variant.TORCH: torch_variant_entry(model, weights, options, source)},
        "params": {"before": params_before, "after": count_parameters(model)},
        "structure": summary,
        "layers": [layer_report(ls) for ls in layers],
        "equivalence": equivalence.to_dict(),
        "environment": {"torch": torch.__version__, "python": platform.python_version()},
    }

    variant_options = VariantOptions(
        onnx=options.onnx or bool(options.int8) or options.fp16,
        int8=options.int8,
        fp16=options.fp16,
        per_channel=options.per_channel,
        tolerance=options.tolerance,
    )
    calibration = read_examples(options.calibration, source.task, limit=128) if options.calibration else []
    variant_options.validate(calibration)

    with atomic_directory(Path(out), force=options.force) as tmp:
        hf_config = transformers_config(config, source.raw_config)
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        copy_code(tmp)
        stored = {k: stored_dtype(v, options.dtype) for k, v in weights.items()}
        manifest["storage"] = sparse.save(stored, tmp / WEIGHTS, sparse=options.sparse_storage)
        tokenizer.save_pretrained(str(tmp))
        if not (tmp / TOKENIZER).is_file():  # serving reads tokenizer.json with the tokenizers library
            tokenizer.backend_tokenizer.save(str(tmp / TOKENIZER))
        t4 = time.perf_counter()
        if variant_options.any:
            text = text_batches(tokenizer, source)
            if options.check_data:
                text += encode(tokenizer, read_examples(options.check_data, source.task), source.task)
            manifest["variants"].update(
                build_variants(
                    model,
                    tmp,
                    variant_options,
                    exact_batches=random_batches(source, options.seed),
                    text_batches=text,
                    calibration_batches=encode(tokenizer, calibration, source.task),
                )
            )
            if options.int8 and not options.onnx:
                # The fp32 graph was only the quantizer's input: not kept unless --onnx asked for it.
                (tmp / VARIANT_FILES[Variant.ONNX]).unlink()
                fp32_entry = manifest["variants"].pop(Variant.ONNX)
                manifest["variants"][Variant.ONNX_INT8]["quantized_from"] = {
                    "fusion": fp32_entry.get("fusion"),
                    "equivalence": fp32_entry.get("equivalence"),
                    "kept": False,
                }
        t5 = time.perf_counter()
        manifest["sizes"] = {
            p.relative_to(tmp).as_posix(): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()
        }
        manifest["timings"] = {
            "read_and_analyze_s": round(prepared.seconds, 3),
            "resize_s": round(t2 - t1, 3),
            "verify_s": round(t3 - t2, 3),
            "write_s": round(t4 - t3, 3),
            "variants_s": round(t5 - t4, 3),
            "total_s": round(t5 - t0, 3),
        }
        manifest = write_manifest(tmp, manifest)
    return manifest
