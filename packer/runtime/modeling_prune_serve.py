"""transformers' view of a packed artifact: copied into every artifact beside modeling.py.

    AutoModelForQuestionAnswering.from_pretrained(ARTIFACT, trust_remote_code=True)

gives the packed model with the packed weights (config.json's `auto_map` names the classes below).
Without trust_remote_code transformers refuses `model_type: prune_serve` and says to pass it; it never
builds a model with fresh weights. Loading is strict: a missing or unexpected tensor (for example an
artifact packed with --sparse-storage, whose CSR tensors transformers cannot read) is an error.
"""

from __future__ import annotations

from types import SimpleNamespace

from transformers import PretrainedConfig, PreTrainedModel

from .modeling import PackedEncoder


class PruneServeConfig(PretrainedConfig):
    model_type = "prune_serve"

    def __init__(self, prune_serve: dict | None = None, **kwargs):
        self.prune_serve = dict(prune_serve or {})
        super().__init__(**kwargs)


def packed_shape(config: PruneServeConfig) -> SimpleNamespace:
    """The `prune_serve` section as the attributes PackedEncoder reads (complete: only artifacts packed
    with every field carry this file)."""
    section = dict(config.prune_serve)
    section["id2label"] = {int(k): v for k, v in (section.get("id2label") or {}).items()}
    return SimpleNamespace(**section)


class PruneServePreTrainedModel(PreTrainedModel):
    config_class = PruneServeConfig
    base_model_prefix = "prune_serve"
    _supports_sdpa = True

    def _init_weights(self, module):
        """Every weight comes from the artifact (strict loading below), none from an initializer."""

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        wants_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        wrong = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys") and v}
        if wrong:
            raise ValueError(
                f"{args[0] if args else ''}: the weights do not match the packed model ({wrong}); an "
                "artifact packed with --sparse-storage loads only with prune-serve: packer.load(ARTIFACT)"
            )
        return (model, info) if wants_info else model


class _PrunedModel(PackedEncoder, PruneServePreTrainedModel):
    def __init__(self, config: PruneServeConfig):
        PruneServePreTrainedModel.__init__(self, config)
        self.build(packed_shape(config))
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, **kwargs):
        return PackedEncoder.forward(self, input_ids, attention_mask, token_type_ids)


class PruneServeForQuestionAnswering(_PrunedModel):
    """start_logits / end_logits, as BertForQuestionAnswering returns them."""


class PruneServeForSequenceClassification(_PrunedModel):
    """logits over config.id2label, as BertForSequenceClassification returns them."""
