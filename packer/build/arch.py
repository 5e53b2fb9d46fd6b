"""Where each architecture keeps its tensors: the only place that knows HF state-dict key names."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from packer.artifact import CLASSIFICATION, QA, TASK_ALIASES
from packer.errors import CheckpointError



@dataclass(frozen=True)
class ArchSpec:
    """Key names of one HF encoder family (BERT and RoBERTa share the layer layout)."""

    model_type: str
    prefix: str

    def layer(self, i: int, part: str) -> str:
        base = f"{self.prefix}.encoder.layer.{i}."
        return (
            base
            + {
                "query": "attention.self.query",
                "key": "attention.self.key",
                "value": "attention.self.value",
                "attn_out": "attention.output.dense",
                "attn_norm": "attention.output.LayerNorm",
                "ffn_in": "intermediate.dense",
                "ffn_out": "output.dense",
                "ffn_norm": "output.LayerNorm",
            }[part]
        )

    def embedding(self, part: str) -> str:
        return (
            f"{self.prefix}.embeddings."
            + {
                "word": "word_embeddings",
                "position": "position_embeddings",
                "token_type": "token_type_embeddings",
                "norm": "LayerNorm",
            }[part]
        )

    def head_keys(self, task: str) -> dict[str, str]:
        """Packed head name -> source module name, for the task."""
        if task == QA:
            return {"qa_outputs": "qa_outputs"}
        if self.model_type == "roberta":
            return {"pooler": "classifier.dense", "classifier": "classifier.out_proj"}
        return {"pooler": f"{self.prefix}.pooler.dense", "classifier": "classifier"}


SUPPORTED = {
    "bert": ArchSpec("bert", "bert"),
    "roberta": ArchSpec("roberta", "roberta"),
}


def spec_for(model_type: str | None) -> ArchSpec:
    if model_type not in SUPPORTED:
        raise CheckpointError(
            f"model_type {model_type!r} is not supported; prune-serve packs {', '.join(sorted(SUPPORTED))} "
            "encoders (config.json 'model_type')"
        )
    return SUPPORTED[model_type]


def detect_task(config: dict, state_dict: dict[str, torch.Tensor], override: str | None) -> str:
    """The task from --task, else from config.architectures, else from the head tensors present."""
    if override is not None:
        if override not in TASK_ALIASES:
            raise CheckpointError(f"--task {override!r} is not one of qa, classification")
        return TASK_ALIASES[override]
    for name in config.get("architectures") or []:
        if name.endswith("ForQuestionAnswering"):
            return QA
        if name.endswith("ForSequenceClassification"):
            return CLASSIFICATION
    if "qa_outputs.weight" in state_dict:
        return QA
    if "classifier.weight" in state_dict or "classifier.out_proj.weight" in state_dict:
        return CLASSIFICATION
    raise CheckpointError(
        "cannot tell the task: config.json names no *ForQuestionAnswering/*ForSequenceClassification "
        "architecture and the weights have no qa_outputs or classifier tensor; pass --task qa|classification"
    )
