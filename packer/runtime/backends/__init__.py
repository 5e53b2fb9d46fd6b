"""Backends: one interface (base.Backend) over torch and ONNX Runtime."""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path

from packer.artifact import Variant
from packer.runtime.backends.base import Backend, BackendError, CudaOptions

CPU_PREFERENCE = (Variant.ONNX_INT8, Variant.ONNX, Variant.TORCH)
CUDA_PREFERENCE = (Variant.ONNX_FP16, Variant.TORCH)
INT8_BATCHING = ("per-window", "batched")
ENGINE = {Variant.TORCH: "torch", Variant.ONNX: "onnxruntime"}
ENGINE |= {Variant.ONNX_INT8: "onnxruntime", Variant.ONNX_FP16: "onnxruntime"}


# Where an NVIDIA driver shows itself (Linux; WSL2 exposes /dev/dxg). Without one no engine can see a
# GPU, and asking torch would cost its import (~250 MB of RSS, seconds) for nothing.
NVIDIA_DRIVER_SIGNS = ("/proc/driver/nvidia/version", "/dev/nvidiactl", "/dev/dxg")


def nvidia_driver_present() -> bool:
    return any(os.path.exists(sign) for sign in NVIDIA_DRIVER_SIGNS)


@functools.cache
def engine_sees_cuda(engine: str) -> bool:
    """Whether one engine can run on a CUDA device here. Each engine is asked on its own: CUDA torch beside
    CPU onnxruntime (or the reverse) is common. Nothing is imported on a machine with no NVIDIA driver."""
    if not nvidia_driver_present() or importlib.util.find_spec(engine) is None:
        return False
    try:
        if engine == "onnxruntime":
            from packer.runtime.backends.onnxruntime import sees_cuda
        else:
            from packer.runtime.backends.torch import sees_cuda
    except ImportError:
        return False
    return sees_cuda()


def choose_variant(
    requested: str, present: list[str], device: str = "cpu", sees_cuda=engine_sees_cuda
) -> Variant:
    """`auto`: unless the device is cpu, the first of onnx-fp16, torch whose engine sees a CUDA device;
    otherwise the first present of onnx-int8, onnx, torch (on the CPU)."""
    if requested != "auto":
        if requested not in present:
            raise BackendError(f"variant {requested} is not packed (present: {', '.join(present)})")
        return Variant(requested)
    if device != "cpu":
        for variant in CUDA_PREFERENCE:
            if variant in present and sees_cuda(ENGINE[variant]):
                return variant
    for variant in CPU_PREFERENCE:
        if variant in present:
            return variant
    raise BackendError(f"no variant usable on the cpu (present: {', '.join(present)})")


def present_variants(artifact: str | Path) -> list[str]:
    from packer.artifact import VARIANT_FILES, read_manifest

    files = read_manifest(Path(artifact)).get("files") or {}
    return [v for v, f in VARIANT_FILES.items() if f in files]


def open_backend(
    artifact: str | Path,
    variant: str = Variant.TORCH,
    device: str = "auto",
    strict: bool = False,
    threads: int | None = None,
    spinning: bool = True,
    memory_arena: bool = True,
    int8_batching: str = "per-window",
    cuda: CudaOptions | None = None,
) -> Backend:
    """Load one variant of an artifact on a device ('auto', 'cpu', 'cuda').

    int8_batching: `per-window` (default) runs a dynamically quantized graph one window at a time, which
    makes its answers independent of the batch; `batched` runs padded batches (not batch-invariant).
    """
    if int8_batching not in INT8_BATCHING:
        raise BackendError(f"int8 batching {int8_batching!r} is not one of {', '.join(INT8_BATCHING)}")
    if variant == "torch":
        from packer.runtime.backends.torch import TorchBackend
        from packer.runtime.loading import load

        return TorchBackend(load(artifact), device=device, strict=strict, threads=threads, cuda=cuda)
    from packer.artifact import VARIANT_FILES, read_manifest, verify_checksums
    from packer.runtime.backends.onnxruntime import OrtBackend

    if variant not in VARIANT_FILES:
        raise BackendError(f"variant {variant!r} is not one of {', '.join(VARIANT_FILES)}")
    manifest = read_manifest(Path(artifact))
    if VARIANT_FILES[variant] not in (manifest.get("files") or {}):
        raise BackendError(
            f"{artifact} has no {variant} variant ({VARIANT_FILES[variant]}); pack it with "
            f"{Variant(variant).pack_flag}"
        )
    verify_checksums(Path(artifact), manifest, [VARIANT_FILES[variant]])
    dynamic = (manifest.get("variants") or {}).get(variant, {}).get("quantization") == "dynamic"
    return OrtBackend(
        Path(artifact),
        variant,
        device=device,
        strict=strict,
        threads=threads,
        spinning=spinning,
        memory_arena=memory_arena,
        per_window=dynamic and int8_batching == "per-window",
        cuda=cuda,
    )


__all__ = ["Backend", "BackendError", "choose_variant", "open_backend", "present_variants"]
