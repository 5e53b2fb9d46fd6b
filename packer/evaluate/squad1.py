"""The SQuAD 1.1 metric, as the official evaluate-v1.1.py computes it: every question answerable, the
best score over the gold answers, no null threshold; a question without a prediction scores 0 and still
counts in the total (the official script prints "Unanswered question ... will receive score 0")."""

from __future__ import annotations

import collections

from packer.evaluate.squad import normalize_answer, questions


def f1(gold: str, pred: str) -> float:
    """v1.1's token F1: no special case for empty strings (an empty prediction scores 0)."""
    pred_tokens, gold_tokens = normalize_answer(pred).split(), normalize_answer(gold).split()
    same = sum((collections.Counter(pred_tokens) & collections.Counter(gold_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def exact(gold: str, pred: str) -> float:
    return float(normalize_answer(pred) == normalize_answer(gold))


def evaluate(dataset: list[dict], preds: dict[str, str]) -> dict:
    total = answered = 0
    exact_sum = f1_sum = 0.0
    for _, _, qa in questions(dataset):
        total += 1
        if qa["id"] not in preds:
            continue
        answered += 1
        golds = [a["text"] for a in qa["answers"]]
        exact_sum += max(exact(g, preds[qa["id"]]) for g in golds)
        f1_sum += max(f1(g, preds[qa["id"]]) for g in golds)
    return {
        "exact_match": 100.0 * exact_sum / max(total, 1),
        "f1": 100.0 * f1_sum / max(total, 1),
        "total": total,
        "answered": answered,
    }
