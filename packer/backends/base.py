"""The one small interface the service runs models through, and device resolution."""

from __future__ import annotations

import logging
import os
from typing import Protocol

import numpy as np

from packer.errors import PackerError

log = logging.getLogger(__name__)


class BackendError(PackerError):
    """A backend cannot run this variant on this device."""


class Backend(Protocol):
    name: str  # {engine}-{device}-{dtype}, e.g. ort-cpu-int8
    device: str  # cpu | cuda
    dtype: str  # fp32 | fp16 | int8

    def run(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray | None = None
    ) -> dict[str, np.ndarray]:
        """A padded batch in, float32 logits out (start_logits/end_logits or logits)."""
        ...


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def resolve_device(requested: str, cuda_available: bool, strict: bool, what: str) -> str:
    """auto -> cuda when there is one; cuda without one -> cpu with a warning, or an error if strict."""
    if requested not in ("auto", "cpu", "cuda"):
        raise BackendError(f"device {requested!r} is not one of auto, cpu, cuda")
    if requested == "auto":
        return "cuda" if cuda_available else "cpu"
    if requested == "cuda" and not cuda_available:
        if strict:
            raise BackendError(
                f"device cuda was asked for, but {what} sees no CUDA device (strict device setting)"
            )
        log.warning("device cuda was asked for, but %s sees no CUDA device: running on cpu", what)
        return "cpu"
    return requested
