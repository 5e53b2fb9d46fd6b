"""A variant's outputs against the CPU fp32 reference of the same artifact (warm-up and doctor)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from packer.artifact import Variant
from packer.runtime.backends import Backend, open_backend, present_variants

# Two positions whose reference logits differ by less than this share of the row's range are a tie: any
# rounding (fp16, int8) may pick either. A random-weight model's flat logits are full of them (the
# BERT-large seed profile in fp16 on an H100: 10 of 12 argmaxes equal, one more a tie), a real model's few.
TIE = 0.01


def argmax_agrees(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Per row (last axis): the candidate's argmax is the reference's, or ties with it in the reference.

    Masked positions may be -inf in both; a NaN in the candidate never agrees."""
    reference = reference.astype(np.float64)
    picked = np.take_along_axis(reference, candidate.argmax(-1)[..., None], -1)[..., 0]
    finite = np.where(np.isfinite(reference), reference, np.nan)
    span = np.nanmax(finite, -1) - np.nanmin(finite, -1)
    best = reference.max(-1)
    return (picked == best) | (picked >= best - TIE * span)


# Logits this close to the fp32 reference everywhere are the same model, whatever the argmaxes say: a
# random-weight BERT-large's logits are so flat that fp16 rounding (max diff 0.004 on an H100) reorders
# them. A broken variant is off by far more (the fp16 overflow tests: thousands).
CLOSE = {"fp32": 1e-3, "fp16": 2e-2, "int8": 0.0}


@dataclass
class Agreement:
    max_abs_diff: float
    agree: int  # windows (per output) whose argmax matches the reference's (ties included)
    total: int
    finite: bool

    @property
    def fraction(self) -> float:
        return self.agree / self.total if self.total else 1.0

    def acceptable(self, dtype: str, min_fraction: float) -> bool:
        """Finite, and argmaxes agree on at least `min_fraction` of windows or every logit is CLOSE."""
        return self.finite and (self.fraction >= min_fraction or self.max_abs_diff <= CLOSE[dtype])


def cpu_reference(artifact: Path, **options) -> Backend:
    """The fp32 graph on the CPU, or the torch variant where the artifact has no fp32 graph."""
    variant = Variant.ONNX if Variant.ONNX in present_variants(artifact) else Variant.TORCH
    return open_backend(artifact, variant, device="cpu", **options)


def compare(
    reference: dict[str, np.ndarray], outputs: dict[str, np.ndarray], lengths: list[int]
) -> Agreement:
    """Per window (cut to its length) and output: max |diff|, argmax agreement (ties at TIE), all finite."""
    diff, agree, total, finite = 0.0, 0, 0, True
    for name, want in reference.items():
        got = outputs[name]
        finite &= bool(np.isfinite(got).all())
        for row, n in enumerate(lengths):
            w, g = (want[row, :n], got[row, :n]) if name != "logits" else (want[row], got[row])
            diff = max(diff, float(np.abs(w - g).max()))
            agree += int(argmax_agrees(w, g))
            total += 1
    return Agreement(diff, agree, total, finite)
