"""Where each architecture keeps its tensors and config values: the only place that knows HF key names.

Adding an encoder family is one `ArchSpec` entry in SUPPORTED: its key prefix, where its layers live, the
names of its six matrices and three LayerNorms, its config.json names for the canonical ones, how it
numbers positions and what its classification head looks like. Everything downstream (structure
detection, bias folding, resizing, masks, gates, verification) reads the canonical names only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import torch

from packer.artifact import CLASSIFICATION, QA, TASK_ALIASES
from packer.artifact.config import ABSOLUTE, AFTER_PADDING
from packer.errors import CheckpointError

BERT_LAYER = MappingProxyType(
    {
        "query": "attention.self.query",
        "key": "attention.self.key",
        "value": "attention.self.value",
        "attn_out": "attention.output.dense",
        "attn_norm": "attention.output.LayerNorm",
        "ffn_in": "intermediate.dense",
        "ffn_out": "output.dense",
        "ffn_norm": "output.LayerNorm",
    }
)
BERT_EMBEDDINGS = MappingProxyType(
    {
        "word": "word_embeddings",
        "position": "position_embeddings",
        "token_type": "token_type_embeddings",
        "norm": "LayerNorm",
    }
)
# The config.json values the packer reads, under BERT's names.
CANONICAL_CONFIG = (
    "hidden_size",
    "num_attention_heads",
    "num_hidden_layers",
    "intermediate_size",
    "vocab_size",
    "max_position_embeddings",
    "type_vocab_size",
    "layer_norm_eps",
    "hidden_act",
    "pad_token_id",
    "embedding_size",
)


@dataclass(frozen=True)
class ArchSpec:
    """One HF encoder family, declared."""

    model_type: str
    prefix: str  # the base model's key prefix ("bert" in bert.encoder.layer.0...)
    hf_family: str  # transformers' class-name prefix ("Bert" in BertForQuestionAnswering)
    layer_root: str = "encoder.layer"
    layer_parts: Mapping[str, str] = field(default_factory=lambda: BERT_LAYER)
    embedding_parts: Mapping[str, str] = field(default_factory=lambda: BERT_EMBEDDINGS)
    config_names: Mapping[str, str] = field(default_factory=dict)  # canonical -> this family's key
    config_fixed: Mapping[str, object] = field(default_factory=dict)  # values its code hard-codes
    positions: str = ABSOLUTE
    # Classification head: (dense, output) module names and the dense layer's activation.
    classifier: tuple[str, str] = ("{prefix}.pooler.dense", "classifier")
    pooler_act: str = "tanh"
    embedding_projection: str = ""  # a Linear from embedding_size to hidden_size, when they differ

    def layer(self, i: int, part: str) -> str:
        return f"{self.prefix}.{self.layer_root}.{i}.{self.layer_parts[part]}"

    def embedding(self, part: str) -> str:
        return f"{self.prefix}.embeddings.{self.embedding_parts[part]}"

    def projection(self, config: dict) -> str:
        """The embedding projection's module name, or "" when this model has none."""
        if self.embedding_projection and config["embedding_size"] != config["hidden_size"]:
            return self.embedding_projection.format(prefix=self.prefix)
        return ""

    def head_keys(self, task: str) -> dict[str, str]:
        """Packed head name -> source module name, for the task."""
        if task == QA:
            return {"qa_outputs": "qa_outputs"}
        dense, out = (name.format(prefix=self.prefix) for name in self.classifier)
        return {"pooler": dense, "classifier": out}

    def canonical_config(self, config: dict) -> dict:
        """config.json with the canonical values filled in under BERT's names."""
        out = dict(config)
        for name, key in self.config_names.items():
            if key in config:
                out[name] = config[key]
        out.update(self.config_fixed)
        if "hidden_size" in out:
            out["embedding_size"] = int(out.get("embedding_size") or out["hidden_size"])
        out.setdefault("type_vocab_size", 0)
        return out


_ROBERTA_FAMILY = dict(
    prefix="roberta",
    positions=AFTER_PADDING,
    classifier=("classifier.dense", "classifier.out_proj"),
)

SUPPORTED = {
    spec.model_type: spec
    for spec in (
        ArchSpec("bert", "bert", "Bert"),
        ArchSpec("roberta", hf_family="Roberta", **_ROBERTA_FAMILY),
        ArchSpec("xlm-roberta", hf_family="XLMRoberta", **_ROBERTA_FAMILY),
        ArchSpec("camembert", hf_family="Camembert", **_ROBERTA_FAMILY),
        ArchSpec(
            "distilbert",
            "distilbert",
            "DistilBert",
            layer_root="transformer.layer",
            layer_parts=MappingProxyType(
                {
                    "query": "attention.q_lin",
                    "key": "attention.k_lin",
                    "value": "attention.v_lin",
                    "attn_out": "attention.out_lin",
                    "attn_norm": "sa_layer_norm",
                    "ffn_in": "ffn.lin1",
                    "ffn_out": "ffn.lin2",
                    "ffn_norm": "output_layer_norm",
                }
            ),
            config_names=MappingProxyType(
                {
                    "hidden_size": "dim",
                    "num_attention_heads": "n_heads",
                    "num_hidden_layers": "n_layers",
                    "intermediate_size": "hidden_dim",
                    "hidden_act": "activation",
                }
            ),
            # DistilBERT's code fixes its LayerNorm eps and has no token types.
            config_fixed=MappingProxyType({"layer_norm_eps": 1e-12, "type_vocab_size": 0}),
            classifier=("pre_classifier", "classifier"),
            pooler_act="relu",
        ),
        ArchSpec(
            "electra",
            "electra",
            "Electra",
            classifier=("classifier.dense", "classifier.out_proj"),
            pooler_act="gelu",  # ElectraClassificationHead: gelu where BERT's pooler has tanh
            embedding_projection="{prefix}.embeddings_project",
        ),
    )
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
