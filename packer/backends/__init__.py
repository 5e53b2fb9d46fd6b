"""Backends: one interface (base.Backend) over torch and ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

from packer.backends.base import Backend, BackendError

CPU_PREFERENCE = ("onnx-int8", "onnx", "torch")
CUDA_PREFERENCE = ("onnx-fp16", "torch")
INT8_BATCHING = ("per-window", "batched")


def choose_variant(requested: str, present: list[str], on_cuda: bool) -> str:
    """`auto`: on CPU the first present of onnx-int8, onnx, torch; on CUDA onnx-fp16, then torch."""
    if requested != "auto":
        if requested not in present:
            raise BackendError(f"variant {requested} is not packed (present: {', '.join(present)})")
        return requested
    for variant in CUDA_PREFERENCE if on_cuda else CPU_PREFERENCE:
        if variant in present:
            return variant
    raise BackendError(f"no variant usable on {'cuda' if on_cuda else 'cpu'} (present: {', '.join(present)})")


def present_variants(artifact: str | Path) -> list[str]:
    from packer.artifact import VARIANT_FILES, read_manifest

    files = read_manifest(Path(artifact)).get("files") or {}
    return [v for v, f in VARIANT_FILES.items() if f in files]


def open_backend(
    artifact: str | Path,
    variant: str = "torch",
    device: str = "auto",
    strict: bool = False,
    threads: int | None = None,
    spinning: bool = True,
    memory_arena: bool = True,
    int8_batching: str = "per-window",
) -> Backend:
    """Load one variant of an artifact on a device ('auto', 'cpu', 'cuda').

    int8_batching: `per-window` (default) runs a dynamically quantized graph one window at a time, which
    makes its answers independent of the batch; `batched` runs padded batches (not batch-invariant).
    """
    if int8_batching not in INT8_BATCHING:
        raise BackendError(f"int8 batching {int8_batching!r} is not one of {', '.join(INT8_BATCHING)}")
    if variant == "torch":
        from packer.artifact import load
        from packer.backends.torch import TorchBackend

        return TorchBackend(load(artifact), device=device, strict=strict, threads=threads)
    from packer.artifact import VARIANT_FILES, read_manifest, verify_checksums
    from packer.backends.onnxruntime import OrtBackend

    if variant not in VARIANT_FILES:
        raise BackendError(f"variant {variant!r} is not one of {', '.join(VARIANT_FILES)}")
    manifest = read_manifest(Path(artifact))
    if VARIANT_FILES[variant] not in (manifest.get("files") or {}):
        raise BackendError(
            f"{artifact} has no {variant} variant ({VARIANT_FILES[variant]}); pack it with "
            f"--{'onnx' if variant == 'onnx' else variant.split('-')[1]}"
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
    )


__all__ = ["Backend", "BackendError", "choose_variant", "open_backend", "present_variants"]
