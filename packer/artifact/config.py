"""The packed model's shape: the `prune_serve` section of the artifact's config.json (no torch needed)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from packer.artifact.layout import CONFIG
from packer.errors import ArtifactError

# How positions are numbered: 0..n-1, or (RoBERTa family) from pad+1 with padding at pad.
ABSOLUTE, AFTER_PADDING = "absolute", "after-padding"


@dataclass
class PackedConfig:
    arch: str
    task: str
    vocab_size: int
    hidden_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    hidden_act: str
    pad_token_id: int
    head_dim: int
    num_heads: list[int]
    intermediate_sizes: list[int]
    id2label: dict[int, str] = field(default_factory=dict)
    # Fields added with more architectures; artifacts packed before them read the BERT/RoBERTa values.
    embedding_size: int = 0  # 0: hidden_size; else ELECTRA-style embeddings projected to hidden_size
    positions: str = ""  # ABSOLUTE or AFTER_PADDING (RoBERTa family)
    pooler_act: str = "tanh"  # the classification head's dense activation (DistilBERT relu, ELECTRA gelu)

    def __post_init__(self):
        if not self.positions:
            self.positions = AFTER_PADDING if self.arch == "roberta" else ABSOLUTE
        self.embedding_size = self.embedding_size or self.hidden_size

    @property
    def num_layers(self) -> int:
        return len(self.num_heads)

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    def section(self) -> dict:
        """The `prune_serve` section of the artifact's config.json."""
        data = asdict(self)
        data["id2label"] = {str(k): v for k, v in self.id2label.items()}
        return data

    @classmethod
    def from_section(cls, data: dict) -> PackedConfig:
        data = dict(data)
        data["id2label"] = {int(k): v for k, v in (data.get("id2label") or {}).items()}
        return cls(**data)

    @property
    def max_window(self) -> int:
        """The longest window the position table allows (RoBERTa's positions start after padding)."""
        offset = self.pad_token_id + 1 if self.positions == AFTER_PADDING else 0
        return self.max_position_embeddings - offset

    @property
    def uses_token_types(self) -> bool:
        """Whether windows carry token type ids (BERT: two segments; RoBERTa-style: one, nothing to feed)."""
        return self.type_vocab_size > 1


def read_packed_config(path: Path) -> PackedConfig:
    file = Path(path) / CONFIG
    try:
        section = json.loads(file.read_text())["prune_serve"]
        return PackedConfig.from_section(section)
    except FileNotFoundError:
        raise ArtifactError(f"{file}: missing") from None
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ArtifactError(f"{file}: no valid 'prune_serve' section ({exc!r})") from exc
