"""pack.json: provenance, structure, equivalence and the sha256 of every file; checking files against it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from packer.artifact.layout import MANIFEST
from packer.errors import ArtifactError


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


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
