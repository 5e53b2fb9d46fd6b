"""The packed model: a BERT-family encoder whose layers have their own head counts and FFN sizes.

Self-contained (torch and transformers only): pack copies this file into every artifact, where
transformers' custom-code loader runs it (modeling_prune_serve.py). `config` is anything with
PackedConfig's fields: the artifact's PackedConfig here, transformers' PruneServeConfig there.

Each attention layer reshapes with its explicit head count (never -1): ONNX Runtime's attention
fusion recognises pruned layers only that way. A layer with no heads or no FFN dims keeps only
its output bias (never a zero-width Linear), so the sublayer reduces to bias, residual, LayerNorm.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_outputs import QuestionAnsweringModelOutput, SequenceClassifierOutput

QA = "question-answering"  # packer.artifact.QA, spelled out so that this file stands alone
AFTER_PADDING = "after-padding"  # packer.artifact.config.AFTER_PADDING, likewise


class OutputProjection(nn.Module):
    """Linear map back to the hidden size; with no inputs left it is its bias alone."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features = in_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features)) if in_features else None
        self.bias = nn.Parameter(torch.zeros(out_features))

    def forward(self, x: torch.Tensor | None) -> torch.Tensor:
        if self.weight is None:
            return self.bias
        return F.linear(x, self.weight, self.bias)


class PackedAttention(nn.Module):
    def __init__(self, hidden: int, num_heads: int, head_dim: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.all_head_size = num_heads * head_dim
        self.implementation = "sdpa"
        if num_heads:
            self.query = nn.Linear(hidden, self.all_head_size)
            self.key = nn.Linear(hidden, self.all_head_size)
            self.value = nn.Linear(hidden, self.all_head_size)
        self.output = OutputProjection(self.all_head_size, hidden)
        self.norm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if not self.num_heads:
            return self.norm(x + self.output(None))
        b, s = x.shape[0], x.shape[1]
        q = self.query(x).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.key(x).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.value(x).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        if self.implementation == "sdpa":
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            # The plain pattern ONNX Runtime's fusion recognises: MatMul, Div, Add mask, Softmax, MatMul.
            scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)
            if mask is not None:
                scores = scores + mask
            context = torch.matmul(torch.softmax(scores, dim=-1), v)
        context = context.transpose(1, 2).reshape(b, s, self.all_head_size)
        return self.norm(x + self.output(context))


class PackedFeedForward(nn.Module):
    def __init__(self, hidden: int, intermediate: int, act: str, eps: float):
        super().__init__()
        self.intermediate_size = intermediate
        if intermediate:
            self.intermediate = nn.Linear(hidden, intermediate)
            self.act = ACT2FN[act]
        self.output = OutputProjection(intermediate, hidden)
        self.norm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.intermediate_size:
            return self.norm(x + self.output(None))
        return self.norm(x + self.output(self.act(self.intermediate(x))))


class PackedLayer(nn.Module):
    def __init__(self, config, i: int):
        super().__init__()
        eps = config.layer_norm_eps
        self.attention = PackedAttention(config.hidden_size, config.num_heads[i], config.head_dim, eps)
        self.ffn = PackedFeedForward(config.hidden_size, config.intermediate_sizes[i], config.hidden_act, eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.ffn(self.attention(x, mask))


class Embeddings(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.positions_after_padding = config.positions == AFTER_PADDING
        self.pad_token_id = config.pad_token_id
        width = config.embedding_size or config.hidden_size
        self.word = nn.Embedding(config.vocab_size, width)
        self.position = nn.Embedding(config.max_position_embeddings, width)
        self.token_type = nn.Embedding(config.type_vocab_size, width) if config.type_vocab_size else None
        self.norm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        # ELECTRA's small embeddings are projected up to the encoder's width after their LayerNorm.
        self.projection = nn.Linear(width, config.hidden_size) if width != config.hidden_size else None

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        if self.positions_after_padding:
            # RoBERTa numbers positions from pad+1 and gives padding the pad position.
            not_pad = input_ids.ne(self.pad_token_id).long()
            positions = torch.cumsum(not_pad, dim=1) * not_pad + self.pad_token_id
        else:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        x = self.word(input_ids) + self.position(positions)
        if self.token_type is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros_like(input_ids)
            x = x + self.token_type(token_type_ids)
        x = self.norm(x)
        return self.projection(x) if self.projection is not None else x


class PackedEncoder:
    """The packed model's modules and forward, mixed into nn.Module (PackedModel) or transformers'
    PreTrainedModel (the artifact's modeling_prune_serve.py), so that both hold the same weight names."""

    def build(self, config) -> None:
        self.packed_config = config
        self.embeddings = Embeddings(config)
        self.layers = nn.ModuleList(PackedLayer(config, i) for i in range(len(config.num_heads)))
        hidden = config.hidden_size
        if config.task == QA:
            self.qa_outputs = nn.Linear(hidden, 2)
        else:
            self.pooler = nn.Linear(hidden, hidden)
            self.pooler_act = ACT2FN[getattr(config, "pooler_act", "tanh")]
            self.classifier = nn.Linear(hidden, len(config.id2label))

    def set_attention_implementation(self, name: str) -> None:
        """'sdpa' (fast in torch) or 'eager' (the graph ONNX Runtime fuses)."""
        if name not in ("sdpa", "eager"):
            raise ValueError(f"attention implementation {name!r} is not sdpa or eager")
        for layer in self.layers:
            layer.attention.implementation = name

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ):
        x = self.embeddings(input_ids, token_type_ids)
        sdpa = bool(self.layers) and self.layers[0].attention.implementation == "sdpa"
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
            if sdpa:  # no padding: SDPA's unmasked kernel (callers on CUDA pass None rather than ones)
                attention_mask = None
        # Additive mask (batch, 1, 1, seq): 0 where attended, the dtype's minimum where padded.
        mask = None
        if attention_mask is not None:
            mask = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
            # An all-ones mask lets SDPA take its unmasked kernel; asked only on the CPU, where it costs no
            # device sync. The exported (eager) graph always masks.
            if sdpa and attention_mask.device.type == "cpu" and bool(attention_mask.all()):
                mask = None
        for layer in self.layers:
            x = layer(x, mask)
        if self.packed_config.task == QA:
            start, end = self.qa_outputs(x).split(1, dim=-1)
            return QuestionAnsweringModelOutput(
                start_logits=start.squeeze(-1).contiguous(), end_logits=end.squeeze(-1).contiguous()
            )
        pooled = self.pooler_act(self.pooler(x[:, 0]))
        return SequenceClassifierOutput(logits=self.classifier(pooled))


class PackedModel(PackedEncoder, nn.Module):
    def __init__(self, config):
        nn.Module.__init__(self)
        self.config = config
        self.build(config)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
