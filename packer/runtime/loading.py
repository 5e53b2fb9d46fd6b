"""Loading a packed artifact's torch variant: the packed modules with the artifact's weights."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from packer.artifact import (
    VARIANT_FILES,
    WEIGHTS,
    PackedConfig,
    Variant,
    read_manifest,
    read_packed_config,
    verify_checksums,
)
from packer.errors import ArtifactError
from packer.runtime.modeling import PackedModel
from packer.runtime.tokenizer import TextTokenizer, load_tokenizer


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: TextTokenizer
    config: PackedConfig
    manifest: dict
    path: Path
    variant: str = Variant.TORCH


def load_weights(model: torch.nn.Module, file: Path) -> None:
    """Load safetensors into `model`, naming any missing, unexpected or mis-shaped tensor."""
    from packer.runtime import sparse

    try:
        tensors = sparse.load(file)
    except Exception as exc:
        raise ArtifactError(f"{file}: cannot be read as safetensors ({exc})") from exc
    expected = model.state_dict()
    for name, param in expected.items():
        if name not in tensors:
            raise ArtifactError(f"{file}: missing tensor {name} (config.json expects it)")
        if tuple(tensors[name].shape) != tuple(param.shape):
            raise ArtifactError(
                f"{file}: tensor {name} has shape {tuple(tensors[name].shape)}, "
                f"expected {tuple(param.shape)} from config.json"
            )
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise ArtifactError(f"{file}: unexpected tensor {unexpected[0]} (config.json has no place for it)")
    model.load_state_dict(tensors, strict=True)


def build_model(config: PackedConfig) -> PackedModel:
    # Skip random initialisation: every parameter is overwritten by the artifact's weights.
    with torch.device("meta"):
        model = PackedModel(config)
    return model.to_empty(device="cpu")


def load(path: str | Path, variant: str = Variant.TORCH, verify: bool = True) -> LoadedModel:
    """Load a packed artifact from its directory alone, refusing anything that does not check out."""
    path = Path(path)
    manifest = read_manifest(path)
    if variant not in VARIANT_FILES:
        raise ArtifactError(f"variant {variant!r} is not one of {', '.join(VARIANT_FILES)}")
    if variant != Variant.TORCH:
        raise ArtifactError(f"variant {variant!r} is served by the ONNX Runtime backend, not packer.load")
    if verify:
        verify_checksums(path, manifest)
    config = read_packed_config(path)
    model = build_model(config)
    load_weights(model, path / WEIGHTS)
    model.eval()
    return LoadedModel(
        model=model,
        tokenizer=load_tokenizer(path, config),
        config=config,
        manifest=manifest,
        path=path,
        variant=variant,
    )
