"""Artifacts on disk -> served models: name, task, variant, backend, tokenizer."""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from packer.artifact import (
    QA,
    PackedConfig,
    fingerprint,
    read_manifest,
    read_packed_config,
    verify_checksums,
)
from packer.errors import PackerError
from packer.runtime.agreement import compare, cpu_reference
from packer.runtime.backends import Backend, choose_variant, open_backend, present_variants
from packer.runtime.samples import QA_PAIRS, SENTENCES
from packer.runtime.tasks import classify, qa
from packer.runtime.tasks.padding import pad
from packer.runtime.tokenizer import TextTokenizer, load_tokenizer
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
    tokenizer: TextTokenizer
    config: PackedConfig
    params: int
    fingerprint: str = ""  # changes when pack.json or any file it lists changes
    # Unique per load: the batcher queues windows under it, so a reload never runs a request's windows
    # on a model other than the one that tokenized them.
    key: str = ""
    manifest: dict = field(default_factory=dict, repr=False)

    @property
    def max_window(self) -> int:
        return self.config.max_window

    @property
    def default_max_seq_len(self) -> int:
        return min(qa.QAOptions.max_seq_len, self.max_window)

    @property
    def pad_id(self) -> int:
        pad = getattr(self.tokenizer, "pad_token_id", None)
        return self.config.pad_token_id if pad is None else int(pad)

    def info(self) -> dict:
        """describe() plus where the model came from and what the service enforces for it."""
        source = self.manifest.get("source") or {}
        ref = str(source.get("ref") or "")
        if ref.startswith("/"):  # a local absolute path says nothing to a client and leaks the layout
            ref = Path(ref).name
        return {
            **self.describe(),
            "source": {
                "ref": ref,
                "revision": source.get("revision"),
                "weights": [
                    {"file": w.get("file"), "sha256": w.get("sha256")} for w in source.get("weights", [])
                ],
            },
            "packer_version": self.manifest.get("packer_version"),
            "files": self.manifest.get("files") or {},
            "arch": self.config.arch,
            "max_position_embeddings": self.config.max_position_embeddings,
        }

    def describe(self) -> dict:
        return {
            "name": self.name,
            "task": self.task,
            "variant": self.variant,
            "backend": self.backend.name,
            "device": self.backend.device,
            "providers": list(self.backend.providers),
            "dtype": self.backend.dtype,
            "params": self.params,
            "state": "ready",
            "max_seq_len": self.default_max_seq_len,
            "max_window": self.max_window,
            "batch_invariant": self.backend.batch_invariant,
            "labels": [self.config.id2label[i] for i in sorted(self.config.id2label)]
            if self.task != QA
            else None,
        }


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


def warm_up(model: ServedModel, settings: Settings) -> None:
    """Run real text through the model before it serves: its outputs must be finite, agree with the CPU
    fp32 reference when it runs in fp16 or on a GPU, and the largest batch shape it will see runs once
    (first runs allocate and pick kernels; better here than under live traffic)."""
    longest = model.default_max_seq_len
    options = qa.QAOptions(max_seq_len=longest, doc_stride=qa.doc_stride_for(longest))
    if model.task == QA:
        windows = [w for q, c in QA_PAIRS[:4] for w in qa.make_windows(model.tokenizer, q, c, options)]
        # Long enough for full windows: the largest shape.
        context = " ".join(c for _, c in QA_PAIRS) * (1 + 4 * longest // max(len(QA_PAIRS[0][1]), 1))
        full = qa.make_windows(model.tokenizer, QA_PAIRS[0][0], context, options)[0]
    else:
        windows = [classify.encode(model.tokenizer, s, None, longest) for s in SENTENCES[:4]]
        full = classify.encode(model.tokenizer, " ".join(SENTENCES) * (1 + longest // 8), None, longest)
    outputs = model.backend.run(*pad(windows, model.pad_id)[:3])
    check_finite(model, outputs)
    if model.backend.device == "cuda" or model.backend.dtype == "fp16":
        check_against_cpu_reference(model, windows, outputs)
    device = model.backend.device
    rows = (
        1
        if model.backend.per_window
        else max(1, min(settings.max_batch_size, settings.batch_tokens_for(device) // full.length))
    )
    multiple = 8 if device == "cuda" else 1
    check_finite(model, model.backend.run(*pad([full] * rows, model.pad_id, multiple)[:3]))


def check_finite(model: ServedModel, outputs: dict[str, np.ndarray]) -> None:
    for name, value in outputs.items():
        if not np.isfinite(value).all():
            raise RegistryError(
                f"{model.backend.name} produced non-finite {name} at warm-up; the "
                "variant is broken on this device (fp16 overflow?): serve another variant"
            )


def check_against_cpu_reference(model: ServedModel, windows: list, outputs: dict[str, np.ndarray]) -> None:
    """fp16 and GPU outputs against the fp32 graph (or torch) on the CPU: argmax agreement per window."""
    try:
        reference = cpu_reference(model.path, threads=1)
    except PackerError as exc:  # e.g. the torch variant in an image without torch
        log.warning("model %s: no CPU fp32 reference to check against (%s)", model.name, exc)
        return
    expected = reference.run(*pad(windows, model.pad_id)[:3])
    result = compare(expected, outputs, [w.length for w in windows])
    agree, total = result.agree, result.total
    if not result.acceptable(model.backend.dtype, 0.75):
        raise RegistryError(
            f"{model.backend.name} agrees with the CPU fp32 reference on only {agree} of "
            f"{total} argmaxes at warm-up; the variant is broken on this device: serve another variant"
        )
    log.info(
        "model %s: %s agrees with CPU fp32 on %d/%d argmaxes", model.name, model.backend.name, agree, total
    )


_loads = itertools.count(1)


def public(message: str, path: Path) -> str:
    """An error message fit for an HTTP body: the artifact's directory named by the model, not by path."""
    for prefix in (str(path.resolve()), str(path)):
        message = message.replace(prefix, path.name)
    return message


def load_model(path: Path, settings: Settings) -> ServedModel:
    """Verify every file, open the backend, warm up; any failure is a RegistryError naming the model."""
    try:
        manifest = read_manifest(path)
        verify_checksums(path, manifest)  # every file pack.json lists, not only the served one
        variant = choose_variant(settings.variant_for(path.name), present_variants(path), settings.device)
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
            cuda=settings.cuda_options(),
        )
        model = ServedModel(
            name=path.name,
            path=path,
            task=config.task,
            variant=variant,
            backend=backend,
            tokenizer=load_tokenizer(path, config, settings.context_cache_tokens),
            config=config,
            params=int(manifest.get("params", {}).get("after", 0)),
            fingerprint=fingerprint(path),
            key=f"{path.name}@{next(_loads)}",
            manifest=manifest,
        )
        warm_up(model, settings)
    except PackerError as exc:
        log.error("model %s (%s): %s", path.name, path, exc)
        raise RegistryError(f"model {path.name}: {public(str(exc), path)}") from exc
    except Exception as exc:  # a model that cannot warm up must not take the server down
        log.exception("model %s (%s) failed to load", path.name, path)
        raise RegistryError(f"model {path.name}: failed to load or warm up ({type(exc).__name__})") from exc
    log.info("serving %s: %s, %s variant on %s", model.name, model.task, variant, backend.name)
    return model


def load_models(settings: Settings) -> tuple[dict[str, ServedModel], dict[str, str]]:
    """Every artifact under the models directory: those that load, and why the others did not."""
    models, failed = {}, {}
    for path in discover(settings.models_dir):
        try:
            models[path.name] = load_model(path, settings)
        except RegistryError as exc:
            failed[path.name] = str(exc)
    return models, failed


@dataclass
class Reload:
    loaded: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # name -> why; the old model (if any) stays
    models: dict[str, ServedModel] = field(default_factory=dict)
    still_failed: dict[str, str] = field(default_factory=dict)  # models not serving after this reload


def reload_models(
    settings: Settings, current: dict[str, ServedModel], failed: dict[str, str] | None = None
) -> Reload:
    """New and changed artifacts are loaded and warmed up; one that fails leaves the old model serving."""
    result = Reload(models=dict(current), still_failed=dict(failed or {}))
    try:
        paths = discover(settings.models_dir)
    except RegistryError as exc:
        result.failed["*"] = f"{exc}; every model stays as it was"
        return result
    for path in paths:
        old = current.get(path.name)
        if old is not None and old.fingerprint == fingerprint(path):
            result.unchanged.append(path.name)
            continue
        try:
            result.models[path.name] = load_model(path, settings)
            result.loaded.append(path.name)
            result.still_failed.pop(path.name, None)
        except RegistryError as exc:
            kept = "keeping the old model" if old else "not served"
            log.error("reload of %s failed, %s: %s", path.name, kept, exc)
            result.failed[path.name] = str(exc)
            if old is None:
                result.still_failed[path.name] = str(exc)
    on_disk = {p.name for p in paths}
    for name in list(result.still_failed):
        if name not in on_disk:
            del result.still_failed[name]
    for name in list(result.models):
        if name not in on_disk:
            del result.models[name]
            result.removed.append(name)
    return result
