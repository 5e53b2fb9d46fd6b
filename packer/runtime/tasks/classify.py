"""Text classification: encode text (or a pair) and turn logits into labels."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from packer.runtime.tokenizer import TextTokenizer


@dataclass
class Encoded:
    input_ids: np.ndarray
    attention_mask: np.ndarray
    token_type_ids: np.ndarray | None

    @property
    def length(self) -> int:
        return len(self.input_ids)


@dataclass
class Classification:
    label: str
    score: float
    scores: dict[str, float]


def encode(tokenizer: TextTokenizer, text: str, text_pair: str | None, max_seq_len: int) -> Encoded:
    enc = tokenizer.encode(text, text_pair, max_length=max_seq_len)
    return Encoded(
        input_ids=np.asarray(enc.ids, dtype=np.int64),
        attention_mask=np.ones(len(enc.ids), dtype=np.int64),
        token_type_ids=np.asarray(enc.type_ids, dtype=np.int64) if tokenizer.token_types else None,
    )


def classify(logits: np.ndarray, id2label: dict[int, str]) -> Classification:
    logits = logits.astype(np.float64)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    labels = [id2label.get(i, f"LABEL_{i}") for i in range(len(probs))]
    best = int(probs.argmax())
    return Classification(
        label=labels[best], score=float(probs[best]), scores=dict(zip(labels, map(float, probs), strict=True))
    )
