"""Build the ONNX variants inside an artifact being written, and check each against torch fp32."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from packer.artifact import VARIANT_FILES, Variant
from packer.build.onnx_export import (
    export,
    feeds,
    input_names,
    optimize,
    quantize_int8_dynamic,
    quantize_int8_static,
)
from packer.build.verify import agreement, logits
from packer.errors import PackerError, VerificationError
from packer.runtime.backends import engine_sees_cuda
from packer.runtime.modeling import PackedModel
from packer.runtime.ort_session import session

log = logging.getLogger(__name__)


@dataclass
class VariantOptions:
    onnx: bool = False
    int8: str | None = None  # "dynamic" | "static"
    fp16: bool = False
    per_channel: bool = True
    tolerance: float = 1e-4

    @property
    def any(self) -> bool:
        return self.onnx or bool(self.int8) or self.fp16

    def validate(self, calibration: list) -> None:
        if self.int8 not in (None, "dynamic", "static"):
            raise PackerError(f"--int8 {self.int8!r} is not dynamic or static")
        if self.int8 == "static" and not calibration:
            raise PackerError("--int8 static needs --calibration FILE (real text to calibrate on)")


def torch_outputs(model: PackedModel, batches: list[dict]) -> list[list[np.ndarray]]:
    with torch.inference_mode():
        return [[t.float().numpy() for t in logits(model(**batch))] for batch in batches]


def ort_outputs(
    path: Path, names: list[str], batches: list[dict], providers: list[str] | None = None
) -> tuple[list[list[np.ndarray]], list[str]]:
    """The graph's outputs per batch, and the providers that really ran it (the session says)."""
    sess = session(path, providers=providers)
    return [list(sess.run(None, feed)) for feed in feeds(batches, names)], sess.get_providers()


def build_variants(
    model: PackedModel,
    directory: Path,
    options: VariantOptions,
    exact_batches: list[dict],
    text_batches: list[dict],
    calibration_batches: list[dict],
) -> dict[str, dict]:
    """Write model.onnx (+ int8, fp16) into `directory`; return pack.json's variants entries."""
    config = model.config
    names = input_names(config)
    variants: dict[str, dict] = {}
    raw = directory / "model.raw.onnx"
    start = time.perf_counter()
    log.info("exporting ONNX (opset 17) ...")
    export(model, raw)
    masks = [b["attention_mask"].numpy() for b in text_batches]
    reference_text = torch_outputs(model, text_batches)
    try:
        fp32 = directory / VARIANT_FILES[Variant.ONNX]
        log.info("optimizing the ONNX graph (fusion) and checking it against torch ...")
        fusion = optimize(raw, fp32, config)
        exact_diff = max(
            float(np.abs(a - b).max())
            for ref, out in zip(
                torch_outputs(model, exact_batches + text_batches),
                ort_outputs(fp32, names, exact_batches + text_batches)[0],
                strict=True,
            )
            for a, b in zip(ref, out, strict=True)
        )
        if not exact_diff <= options.tolerance:
            raise VerificationError(
                f"ONNX fp32 graph differs from the torch model: max abs logit diff {exact_diff:.3g} > "
                f"tolerance {options.tolerance:g}; nothing was written"
            )
        variants[Variant.ONNX] = {
            "file": fp32.name,
            "dtype": "fp32",
            "opset": 17,
            "fusion": fusion.to_dict(),
            "equivalence": {"max_abs_diff": exact_diff, "tolerance": options.tolerance, "passed": True},
            "seconds": round(time.perf_counter() - start, 3),
        }
        if options.int8:
            start = time.perf_counter()
            int8 = directory / VARIANT_FILES[Variant.ONNX_INT8]
            log.info("quantizing to int8 (%s) ...", options.int8)
            if options.int8 == "static":
                quantize_int8_static(fp32, int8, list(feeds(calibration_batches, names)))
            else:
                quantize_int8_dynamic(fp32, int8, per_channel=options.per_channel)
            int8_outputs, int8_providers = ort_outputs(int8, names, text_batches)
            variants[Variant.ONNX_INT8] = {
                "file": int8.name,
                "dtype": "int8",
                "quantization": options.int8,
                "per_channel": options.per_channel if options.int8 == "dynamic" else True,
                "calibration_examples": sum(b["input_ids"].shape[0] for b in calibration_batches)
                if options.int8 == "static"
                else 0,
                "agreement_with_fp32": agreement(reference_text, int8_outputs, masks).to_dict(),
                "seconds": round(time.perf_counter() - start, 3),
                "providers": int8_providers,
            }
        if options.fp16:
            start = time.perf_counter()
            fp16 = directory / VARIANT_FILES[Variant.ONNX_FP16]
            log.info("converting to fp16 ...")
            fusion16 = optimize(raw, fp16, config, for_gpu=True, fp16=True)
            # Checked on the GPU where ONNX Runtime has one; else on the CPU provider (which computes
            # fp16 nodes in fp32), and "providers" says so: serving checks again at warm-up on CUDA.
            on_gpu = ["CUDAExecutionProvider", "CPUExecutionProvider"]
            fp16_outputs, fp16_providers = ort_outputs(
                fp16, names, text_batches, providers=on_gpu if engine_sees_cuda("onnxruntime") else None
            )
            variants[Variant.ONNX_FP16] = {
                "file": fp16.name,
                "dtype": "fp16",
                "fusion": fusion16.to_dict(),
                "agreement_with_fp32": agreement(reference_text, fp16_outputs, masks).to_dict(),
                "seconds": round(time.perf_counter() - start, 3),
                "providers": fp16_providers[:1],
            }
    finally:
        raw.unlink(missing_ok=True)
    for name, entry in variants.items():
        if "agreement_with_fp32" in entry and entry["agreement_with_fp32"]["argmax_agreement"] < 0.9:
            log.warning(
                "%s agrees with fp32 on only %.0f%% of argmaxes",
                name,
                100 * entry["agreement_with_fp32"]["argmax_agreement"],
            )
    return variants
