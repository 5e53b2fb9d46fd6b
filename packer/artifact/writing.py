"""Writing an artifact directory atomically, and clearing what killed packs left behind.

The directory is built under a temporary name beside OUT and renamed into place at the end.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from packer.errors import ArtifactError

log = logging.getLogger(__name__)


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
