"""`prune-serve doctor [ARTIFACT ...]`: what this machine can run, checked by running it.

Versions (python, numpy, tokenizers, onnxruntime and its providers, torch with its CUDA and cuDNN,
the NVIDIA driver); whether ONNX Runtime's CUDA provider really runs a tiny graph and torch really
computes on the GPU; then every variant of each artifact once on each device that can run it, against
the CPU fp32 reference (max |diff|, argmax agreement, finite). Exit 1 on any failure or mismatch.
"""

from __future__ import annotations

import argparse
import base64
import importlib.metadata
import importlib.util
import json
import platform
import sys
from pathlib import Path

import numpy as np

from packer.artifact import QA, Variant, read_packed_config
from packer.errors import PackerError
from packer.runtime.agreement import Agreement, compare, cpu_reference
from packer.runtime.backends import (
    ENGINE,
    NVIDIA_DRIVER_SIGNS,
    engine_sees_cuda,
    open_backend,
    present_variants,
)
from packer.runtime.samples import QA_PAIRS, SENTENCES
from packer.runtime.tasks import classify, qa
from packer.runtime.tasks.padding import pad
from packer.runtime.tokenizer import load_tokenizer

# y = x @ x on a 2x2 float tensor (opset 13): small enough to embed, real enough to need the provider.
TINY_GRAPH = base64.b64decode(
    "CAg6RQoRCgF4CgF4EgF5IgZNYXRNdWwSBmRvY3RvcloTCgF4Eg4KDAgBEggKAggCCgIIAmITCgF5Eg4KDAgBEggKAggCCgIIAkIECgAQDQ=="
)
# Argmax agreement with the CPU fp32 reference below these is a mismatch. A broken device or variant
# agrees on next to nothing; dynamic int8 legitimately moves some argmaxes of a short sample.
MIN_AGREEMENT = {"fp32": 0.99, "fp16": 0.9, "int8": 0.5}


def version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def driver() -> str | None:
    try:
        return Path(NVIDIA_DRIVER_SIGNS[0]).read_text().splitlines()[0].strip()
    except OSError:
        return None


def environment() -> dict:
    info: dict = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "tokenizers": version("tokenizers"),
        "onnxruntime": version("onnxruntime") or version("onnxruntime-gpu"),
        "torch": version("torch"),
        "nvidia_driver": driver(),
    }
    if importlib.util.find_spec("onnxruntime"):
        import onnxruntime as ort

        info["onnxruntime_providers"] = ort.get_available_providers()
    if info["torch"] and engine_sees_cuda("torch"):
        from packer.runtime.backends.torch import cuda_info

        info |= cuda_info()
    return info


def gpu_checks() -> list[dict]:
    """Each engine that says it sees CUDA, asked to compute something there."""
    checks = []
    if importlib.util.find_spec("onnxruntime"):
        import onnxruntime as ort

        if "CUDAExecutionProvider" in ort.get_available_providers():
            check = {"check": "onnxruntime CUDA provider runs a graph"}
            try:
                session = ort.InferenceSession(TINY_GRAPH, providers=["CUDAExecutionProvider"])
                x = np.array([[1, 2], [3, 4]], dtype=np.float32)
                (y,) = session.run(None, {"x": x})
                used = session.get_providers()
                check["ok"] = used[0] == "CUDAExecutionProvider" and np.allclose(y, x @ x)
                check["detail"] = f"session providers {used}"
            except Exception as exc:
                check.update(ok=False, detail=str(exc).splitlines()[0])
            checks.append(check)
    if version("torch") and any(Path(p).exists() for p in NVIDIA_DRIVER_SIGNS):
        check = {"check": "torch computes on the GPU"}
        try:
            from packer.runtime.backends.torch import computes_on_gpu

            check["ok"], check["detail"] = computes_on_gpu()
        except Exception as exc:
            check.update(ok=False, detail=str(exc).splitlines()[0])
        checks.append(check)
    return checks


def sample_batch(artifact: Path):
    config = read_packed_config(artifact)
    tokenizer = load_tokenizer(artifact, config)
    if config.task == QA:
        longest = min(256, config.max_position_embeddings - 2)
        options = qa.QAOptions(max_seq_len=longest, doc_stride=qa.doc_stride_for(longest))
        windows = [w for q, c in QA_PAIRS for w in qa.make_windows(tokenizer, q, c, options)]
    else:
        windows = [classify.encode(tokenizer, s, None, 128) for s in SENTENCES]
    return pad(windows, tokenizer.pad_token_id)[:3], [w.length for w in windows]


def figures(result: Agreement) -> dict:
    return {
        "max_abs_diff": round(result.max_abs_diff, 5),
        "argmax_agreement": round(result.fraction, 3),
        "finite": result.finite,
    }


def check_artifact(artifact: Path) -> list[dict]:
    present = present_variants(artifact)
    batch, lengths = sample_batch(artifact)
    rows = []
    try:
        reference = cpu_reference(artifact, strict=True).run(*batch)
    except PackerError as exc:
        return [{"artifact": str(artifact), "variant": "reference", "ok": False, "detail": str(exc)}]
    devices = ["cpu"] + (["cuda"] if engine_sees_cuda("onnxruntime") or engine_sees_cuda("torch") else [])
    for variant in present:
        for device in devices:
            if (variant == Variant.ONNX_INT8 and device == "cuda") or (
                variant == Variant.ONNX_FP16 and device == "cpu" and "cuda" in devices
            ):
                continue  # int8 does not run on CUDA; fp16 is checked where it is meant to run
            row = {"artifact": str(artifact), "variant": variant.value, "device": device}
            if device == "cuda" and not engine_sees_cuda(ENGINE[variant]):
                # CUDA torch beside CPU onnxruntime (or the reverse): nothing to check, nothing broken
                rows.append(row | {"ok": True, "skipped": f"{ENGINE[variant]} sees no CUDA device here"})
                continue
            try:
                backend = open_backend(artifact, variant, device=device, strict=True)
                row["backend"] = backend.name
                result = compare(reference, backend.run(*batch), lengths)
                row |= figures(result)
                row["ok"] = result.acceptable(backend.dtype, MIN_AGREEMENT[backend.dtype])
            except PackerError as exc:
                row.update(ok=False, detail=str(exc))
            rows.append(row)
    return rows


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="prune-serve doctor", description=__doc__)
    p.add_argument("artifacts", nargs="*", help="packed artifacts to run on every device here")
    p.add_argument("--json", action="store_true", help="one JSON document instead of lines")
    args = p.parse_args(argv)
    report = {"environment": environment(), "gpu": gpu_checks(), "artifacts": []}
    for artifact in args.artifacts:
        if not (Path(artifact) / "pack.json").is_file():
            print(
                f"prune-serve doctor: error: {artifact} is not a packed artifact (no pack.json)",
                file=sys.stderr,
            )
            return 2
        report["artifacts"] += check_artifact(Path(artifact))
    ok = all(c["ok"] for c in report["gpu"]) and all(r["ok"] for r in report["artifacts"])
    if args.json:
        print(json.dumps(report | {"ok": ok}, indent=2))
    else:
        for key, value in report["environment"].items():
            missing = "none" if key == "nvidia_driver" else "not installed"
            print(f"{key:<24} {value if value is not None else missing}")
        if not report["gpu"]:
            print("gpu                      none seen (no NVIDIA driver, or no CUDA-capable engine)")
        for check in report["gpu"]:
            print(f"{'ok  ' if check['ok'] else 'FAIL'} {check['check']}: {check.get('detail', '')}")
        for row in report["artifacts"]:
            figures = ", ".join(
                f"{k} {row[k]}" for k in ("max_abs_diff", "argmax_agreement", "finite") if k in row
            )
            where = f"{row.get('backend', row.get('device', ''))}"
            status = "skip" if "skipped" in row else "ok  " if row["ok"] else "FAIL"
            print(
                f"{status} {row['artifact']} {row['variant']} on {where}: "
                f"{figures or row.get('detail') or row.get('skipped', '')}"
            )
        print("all checks passed" if ok else "some checks FAILED")
    return 0 if ok else 1
