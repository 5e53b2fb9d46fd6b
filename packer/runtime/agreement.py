"""A variant's outputs against the CPU fp32 reference of the same artifact (warm-up and doctor)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from packer.artifact import Variant
from packer.runtime.backends import Backend, open_backend, present_variants


@dataclass
class Agreement:
    max_abs_diff: float
    agree: int  # windows (per output) whose argmax matches the reference's
    total: int
    finite: bool

    @property
    def fraction(self) -> float:
        return self.agree / self.total if self.total else 1.0


def cpu_reference(artifact: Path, **options) -> Backend:
    """The fp32 graph on the CPU, or the torch variant where the artifact has no fp32 graph."""
    variant = Variant.ONNX if Variant.ONNX in present_variants(artifact) else Variant.TORCH
    return open_backend(artifact, variant, device="cpu", **options)


def compare(
    reference: dict[str, np.ndarray], outputs: dict[str, np.ndarray], lengths: list[int]
) -> Agreement:
    """Per window (cut to its length) and output: max |diff|, argmax agreement, all finite."""
    diff, agree, total, finite = 0.0, 0, 0, True
    for name, want in reference.items():
        got = outputs[name]
        finite &= bool(np.isfinite(got).all())
        for row, n in enumerate(lengths):
            w, g = (want[row, :n], got[row, :n]) if name != "logits" else (want[row], got[row])
            diff = max(diff, float(np.abs(w - g).max()))
            agree += int(np.argmax(w) == np.argmax(g))
            total += 1
    return Agreement(diff, agree, total, finite)
