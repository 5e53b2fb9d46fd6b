"""The artifact directory: the contract between packing and serving.

OUT/config.json (HF config + "prune_serve" section), model.safetensors, tokenizer files and
pack.json (provenance, structure, equivalence, sha256 of every file). Writes are atomic: the
directory is built under a temporary name beside OUT and renamed into place at the end.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from packer.checkpoint import sha256_file
from packer.errors import ArtifactError
from packer.modeling import PackedConfig, PackedModel

log = logging.getLogger(__name__)

MANIFEST = "pack.json"
WEIGHTS = "model.safetensors"
VARIANT_FILES = {
    "torch": WEIGHTS,
    "onnx": "model.onnx",
    "onnx-int8": "model.int8.onnx",
    "onnx-fp16": "model.fp16.onnx",
}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    config: PackedConfig
    manifest: dict
    path: Path
    variant: str = "torch"


def check_out(out: Path, force: bool = False) -> None:
    """Refuse an existing OUT before any work is done."""
    if Path(out).exists() and not force:
        raise ArtifactError(f"{out} already exists; pass --force to replace it")


def _locked_elsewhere(directory: Path) -> bool:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)  # closing releases our probe lock


def remove_leftovers(out: Path) -> list[Path]:
    """Temporary directories of killed packs beside `out`: removed when no live pack holds their lock."""
    out = Path(out)
    if not out.parent.is_dir():
        return []
    removed = []
    for leftover in out.parent.glob(f".{out.name}.*-*"):
        if not leftover.is_dir() or not leftover.name.startswith((f".{out.name}.tmp-", f".{out.name}.old-")):
            continue
        if _locked_elsewhere(leftover):
            continue  # a pack that is running now
        shutil.rmtree(leftover, ignore_errors=True)
        log.warning("removed %s, left by a pack that was killed", leftover)
        removed.append(leftover)
    return removed


@contextmanager
def atomic_directory(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `out`; on success it replaces `out`, on error it vanishes.

    The temporary directory is flock()ed while we work: the lock dies with the process however it
    dies, so a later pack can tell a killed pack's leftovers from a running pack's work.
    """
    out = Path(out)
    check_out(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    lock = os.open(tmp, os.O_RDONLY)
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)
        for file in tmp.rglob("*"):
            file.chmod((0o777 if file.is_dir() else 0o666) & ~umask)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        os.close(lock)


def file_checksums(directory: Path) -> dict[str, str]:
    return {
        p.relative_to(directory).as_posix(): sha256_file(p)
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def write_manifest(directory: Path, manifest: dict) -> dict:
    manifest = dict(manifest)
    manifest["files"] = file_checksums(directory)
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_manifest(path: Path) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(f"{path}: no such artifact directory")
    file = path / MANIFEST
    if not file.is_file():
        raise ArtifactError(
            f"{path}: no {MANIFEST}; this is not a packed artifact (pack it with prune-pack pack)"
        )
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{file}: not valid JSON ({exc})") from exc


# sha256 of files already verified, keyed by what any change to a file changes (ctime moves on every
# write and on every metadata change, including an mtime put back by hand).
_verified: dict[tuple, str] = {}


def _stat_key(file: Path) -> tuple:
    st = file.stat()
    return (str(file.resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def verify_checksums(path: Path, manifest: dict, names: list[str] | None = None) -> None:
    """Check files against pack.json's sha256 (all of them by default). A file whose size, mtime, ctime
    and inode are those of an earlier successful check is not read again."""
    recorded = manifest.get("files") or {}
    for name in names if names is not None else sorted(recorded):
        file = path / name
        if name not in recorded:
            raise ArtifactError(f"{file}: not listed in {MANIFEST}; the artifact was changed after packing")
        if not file.is_file():
            raise ArtifactError(f"{file}: missing (listed in {MANIFEST})")
        key = _stat_key(file)
        actual = _verified.get(key) or sha256_file(file)
        if actual != recorded[name]:
            raise ArtifactError(
                f"{file}: sha256 {actual[:12]}… does not match {MANIFEST} ({recorded[name][:12]}…); "
                "the file is corrupted or was modified: pack the model again"
            )
        _verified[key] = actual


def fingerprint(path: Path) -> str:
    """Changes whenever pack.json or any file it lists changes (content or metadata)."""
    digest = hashlib.sha256()
    try:
        manifest_bytes = (path / MANIFEST).read_bytes()
        digest.update(manifest_bytes)
        for name in sorted(json.loads(manifest_bytes).get("files") or {}):
            file = path / name
            digest.update(repr(_stat_key(file) if file.exists() else (name, "missing")).encode())
    except (OSError, ValueError):
        return ""
    return digest.hexdigest()


def read_packed_config(path: Path) -> PackedConfig:
    file = Path(path) / "config.json"
    try:
        section = json.loads(file.read_text())["prune_serve"]
        return PackedConfig.from_section(section)
    except FileNotFoundError:
        raise ArtifactError(f"{file}: missing") from None
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ArtifactError(f"{file}: no valid 'prune_serve' section ({exc!r})") from exc


def load_weights(model: torch.nn.Module, file: Path) -> None:
    """Load safetensors into `model`, naming any missing, unexpected or mis-shaped tensor."""
    from packer import sparse

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


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:
        raise ArtifactError(f"{path}: cannot load the tokenizer ({exc})") from exc
    if not getattr(tokenizer, "is_fast", False):
        raise ArtifactError(f"{path}: the tokenizer is not a fast tokenizer (character offsets need one)")
    return tokenizer


def load(path: str | Path, variant: str = "torch", verify: bool = True) -> LoadedModel:
    """Load a packed artifact from its directory alone, refusing anything that does not check out."""
    path = Path(path)
    manifest = read_manifest(path)
    if variant not in VARIANT_FILES:
        raise ArtifactError(f"variant {variant!r} is not one of {', '.join(VARIANT_FILES)}")
    if variant != "torch":
        raise ArtifactError(f"variant {variant!r} is served by the ONNX Runtime backend, not packer.load")
    if verify:
        verify_checksums(path, manifest)
    config = read_packed_config(path)
    model = build_model(config)
    load_weights(model, path / WEIGHTS)
    model.eval()
    return LoadedModel(
        model=model,
        tokenizer=load_tokenizer(path),
        config=config,
        manifest=manifest,
        path=path,
        variant=variant,
    )
