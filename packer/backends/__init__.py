"""Backends: one interface (base.Backend) over torch and ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

from packer.backends.base import Backend, BackendError


def open_backend(
    artifact: str | Path,
    variant: str = "torch",
    device: str = "auto",
    strict: bool = False,
    threads: int | None = None,
    spinning: bool = True,
) -> Backend:
    """Load one variant of an artifact on a device ('auto', 'cpu', 'cuda')."""
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
    return OrtBackend(
        Path(artifact), variant, device=device, strict=strict, threads=threads, spinning=spinning
    )


__all__ = ["Backend", "BackendError", "open_backend"]
