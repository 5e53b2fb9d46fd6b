"""Artifacts on disk -> served models: name, task, variant, backend, tokenizer."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

from packer.arch import QA
from packer.artifact import load_tokenizer, read_manifest, read_packed_config
from packer.backends import Backend, choose_variant, open_backend, present_variants
from packer.errors import PackerError
from packer.modeling import PackedConfig
from packer.samples import QA_PAIRS, SENTENCES
from packer.tasks import classify, qa
from packer.tasks.padding import pad
from service.settings import Settings

log = logging.getLogger(__name__)


class RegistryError(PackerError):
    """The models directory cannot be served (the message says how to fix it)."""


@dataclass
class ServedModel:
    name: str
    path: Path
    task: str
    variant: str
    backend: Backend
    tokenizer: object
    config: PackedConfig
    params: int
    fingerprint: str = ""  # sha256 of pack.json, which holds the sha256 of every other file

    @property
    def pad_id(self) -> int:
        pad = getattr(self.tokenizer, "pad_token_id", None)
        return self.config.pad_token_id if pad is None else int(pad)

    def describe(self) -> dict:
        return {
            "name": self.name,
            "task": self.task,
            "variant": self.variant,
            "backend": self.backend.name,
            "device": self.backend.device,
            "dtype": self.backend.dtype,
            "params": self.params,
            "batch_invariant": self.backend.batch_invariant,
            "labels": [self.config.id2label[i] for i in sorted(self.config.id2label)]
            if self.task != QA
            else None,
        }


def cuda_available() -> bool:
    try:
        import torch

        if torch.cuda.is_available():
            return True
    except ImportError:
        pass
    try:
        import onnxruntime

        return "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    except ImportError:
        return False


def discover(models_dir: Path) -> list[Path]:
    if not models_dir.is_dir():
        raise RegistryError(
            f"models directory {models_dir} does not exist; pack a model into it with "
            f"`prune-pack pack SRC {models_dir}/NAME` or set PRUNE_SERVE_MODELS_DIR"
        )
    found = sorted(p for p in models_dir.iterdir() if p.is_dir() and (p / "pack.json").is_file())
    if not found:
        raise RegistryError(
            f"no packed models under {models_dir}: pack one with `prune-pack pack SRC {models_dir}/NAME` "
            "(SRC: a checkpoint directory or hub id), or set PRUNE_SERVE_MODELS_DIR"
        )
    return found


def warm_up(model: ServedModel) -> None:
    """Run real text through every path once (first runs allocate and pick kernels)."""
    if model.task == QA:
        windows = [w for q, c in QA_PAIRS[:4] for w in qa.make_windows(model.tokenizer, q, c, qa.QAOptions())]
    else:
        windows = [classify.encode(model.tokenizer, s, None, 128) for s in SENTENCES[:4]]
    ids, mask, types, _ = pad(windows, model.pad_id)
    for _ in range(2):
        model.backend.run(ids, mask, types)


def load_model(path: Path, settings: Settings, on_cuda: bool) -> ServedModel:
    try:
        manifest = read_manifest(path)
        variant = choose_variant(settings.variant_for(path.name), present_variants(path), on_cuda)
        config = read_packed_config(path)
        backend = open_backend(
            path,
            variant,
            device=settings.device,
            strict=settings.strict_device,
            threads=settings.threads,
            spinning=settings.ort_spinning,
            memory_arena=settings.ort_memory_arena,
            int8_batching=settings.int8_batching,
        )
        model = ServedModel(
            name=path.name,
            path=path,
            task=config.task,
            variant=variant,
            backend=backend,
            tokenizer=load_tokenizer(path),
            config=config,
            params=int(manifest.get("params", {}).get("after", 0)),
            fingerprint=fingerprint(path),
        )
        warm_up(model)
    except PackerError as exc:
        raise RegistryError(f"model {path.name} ({path}): {exc}") from exc
    log.info("serving %s: %s, %s variant on %s", model.name, model.task, variant, backend.name)
    return model


def fingerprint(path: Path) -> str:
    try:
        return hashlib.sha256((path / "pack.json").read_bytes()).hexdigest()
    except OSError:
        return ""


def load_models(settings: Settings) -> dict[str, ServedModel]:
    on_cuda = settings.device in ("auto", "cuda") and cuda_available()
    return {p.name: load_model(p, settings, on_cuda) for p in discover(settings.models_dir)}


@dataclass
class Reload:
    loaded: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # name -> why; the old model (if any) stays
    models: dict[str, ServedModel] = field(default_factory=dict)


def reload_models(settings: Settings, current: dict[str, ServedModel]) -> Reload:
    """New and changed artifacts are loaded and warmed up; one that fails leaves the old model serving."""
    result = Reload(models=dict(current))
    try:
        paths = discover(settings.models_dir)
    except RegistryError as exc:
        result.failed["*"] = f"{exc}; every model stays as it was"
        return result
    on_cuda = settings.device in ("auto", "cuda") and cuda_available()
    for path in paths:
        old = current.get(path.name)
        if old is not None and old.fingerprint == fingerprint(path):
            result.unchanged.append(path.name)
            continue
        try:
            result.models[path.name] = load_model(path, settings, on_cuda)
            result.loaded.append(path.name)
        except RegistryError as exc:
            kept = "keeping the old model" if old else "not served"
            log.error("reload of %s failed, %s: %s", path.name, kept, exc)
            result.failed[path.name] = str(exc)
    on_disk = {p.name for p in paths}
    for name in list(result.models):
        if name not in on_disk:
            del result.models[name]
            result.removed.append(name)
    return result
