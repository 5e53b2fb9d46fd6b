"""Text classification: encode text (or a pair) and turn logits into labels."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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


def encode(tokenizer, text: str, text_pair: str | None, max_seq_len: int) -> Encoded:
    enc = tokenizer(text, text_pair, truncation=True, max_length=max_seq_len, padding=False)
    token_types = enc.get("token_type_ids")
    return Encoded(
        input_ids=np.asarray(enc["input_ids"], dtype=np.int64),
        attention_mask=np.ones(len(enc["input_ids"]), dtype=np.int64),
        token_type_ids=None if token_types is None else np.asarray(token_types, dtype=np.int64),
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
