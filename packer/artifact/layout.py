"""Names in the artifact contract: its files, its variants, its tasks (one home for each spelling)."""

from __future__ import annotations

from enum import StrEnum

MANIFEST = "pack.json"
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
TOKENIZER = "tokenizer.json"

QA = "question-answering"
CLASSIFICATION = "text-classification"
TASK_ALIASES = {"qa": QA, QA: QA, "classification": CLASSIFICATION, CLASSIFICATION: CLASSIFICATION}


class Variant(StrEnum):
    """One runnable form of a packed model. A StrEnum: members compare equal to their JSON spelling."""

    TORCH = "torch"
    ONNX = "onnx"
    ONNX_INT8 = "onnx-int8"
    ONNX_FP16 = "onnx-fp16"

    @property
    def file(self) -> str:
        return VARIANT_FILES[self]

    @property
    def pack_flag(self) -> str:
        """The `prune-pack pack` option that writes this variant."""
        return {"torch": "(always written)", "onnx": "--onnx", "onnx-int8": "--int8", "onnx-fp16": "--fp16"}[
            self.value
        ]

    @property
    def is_onnx(self) -> bool:
        return self is not Variant.TORCH


VARIANT_FILES = {
    Variant.TORCH: WEIGHTS,
    Variant.ONNX: "model.onnx",
    Variant.ONNX_INT8: "model.int8.onnx",
    Variant.ONNX_FP16: "model.fp16.onnx",
}


def parse_variant(name: str) -> Variant:
    try:
        return Variant(name)
    except ValueError:
        raise ValueError(f"variant {name!r} is not one of {', '.join(Variant)}") from None
