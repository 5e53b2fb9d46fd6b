"""The one small interface the service runs models through, and device resolution."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from packer.errors import PackerError

log = logging.getLogger(__name__)


class BackendError(PackerError):
    """A backend cannot run this variant on this device."""


class Backend(Protocol):
    name: str  # {engine}-{device}-{dtype}, e.g. ort-cpu-int8
    # What really runs it: ONNX Runtime's providers as the session reports them, or torch's device.
    providers: list[str]
    device: str  # cpu | cuda
    dtype: str  # fp32 | fp16 | int8
    # Whether a window's logits are independent of what shares its batch (padding, other windows).
    batch_invariant: bool
    # True when run() executes each window alone (the batcher then forms batches of one).
    per_window: bool

    def run(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray | None = None
    ) -> dict[str, np.ndarray]:
        """A padded batch in, float32 logits out (start_logits/end_logits or logits)."""
        ...


@dataclass(frozen=True)
class CudaOptions:
    """GPU memory bounds (settings PRUNE_SERVE_CUDA_*). ORT's arena otherwise grows by powers of two and
    never shrinks, so every new shape can raise the high-water mark."""

    memory_limit_mb: int = 0  # 0: no limit
    arena_extend_strategy: str = "kSameAsRequested"  # or kNextPowerOfTwo (ORT's default)
    arena_shrinkage: bool = False  # return unused arena memory after each run
    device_id: int = 0

    def provider_options(self) -> dict[str, str]:
        options = {"device_id": str(self.device_id), "arena_extend_strategy": self.arena_extend_strategy}
        if self.memory_limit_mb:
            options["gpu_mem_limit"] = str(self.memory_limit_mb * 1024 * 1024)
        return options


def run_per_window(run, input_ids, attention_mask, token_type_ids) -> dict[str, np.ndarray]:
    """Run each row alone, cut to its own length, and pad the outputs back (batch invariance for graphs
    whose numerics depend on the whole batch, such as dynamic int8's per-tensor activation scales)."""
    rows = []
    for r in range(input_ids.shape[0]):
        n = int(attention_mask[r].sum()) or input_ids.shape[1]
        types = None if token_type_ids is None else token_type_ids[r : r + 1, :n]
        rows.append(run(input_ids[r : r + 1, :n], attention_mask[r : r + 1, :n], types))
    out = {}
    for name in rows[0]:
        values = [row[name] for row in rows]
        if values[0].ndim == 2 and name in ("start_logits", "end_logits"):
            full = np.full((len(values), input_ids.shape[1]), -1e4, dtype=np.float32)  # padding never wins
            for r, v in enumerate(values):
                full[r, : v.shape[1]] = v[0]
            out[name] = full
        else:
            out[name] = np.concatenate(values, axis=0)
    return out


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
