"""The SQuAD v2 metric, written here: the same keys, order and numbers as the official
evaluate-v2.0.py (normalization, max over gold answers, no-answer threshold, best threshold)."""

from __future__ import annotations

import collections
import re
import string
from collections import OrderedDict

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """Lower case, drop punctuation and articles, fold white space."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", s).split())


def _tokens(s: str) -> list[str]:
    return normalize_answer(s).split() if s else []


def exact(gold: str, pred: str) -> int:
    return int(normalize_answer(gold) == normalize_answer(pred))


def f1(gold: str, pred: str) -> float:
    gold_toks, pred_toks = _tokens(gold), _tokens(pred)
    if not gold_toks or not pred_toks:  # no-answer: right only when both are empty
        return float(gold_toks == pred_toks)
    common = collections.Counter(gold_toks) & collections.Counter(pred_toks)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_toks), same / len(gold_toks)
    return (2 * precision * recall) / (precision + recall)


def questions(dataset: list[dict]):
    for article in dataset:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                yield article, paragraph, qa


def raw_scores(dataset: list[dict], preds: dict[str, str]) -> tuple[dict, dict]:
    exact_scores, f1_scores = {}, {}
    for _, _, qa in questions(dataset):
        qid = qa["id"]
        if qid not in preds:
            continue
        golds = [a["text"] for a in qa["answers"] if normalize_answer(a["text"])] or [""]
        exact_scores[qid] = max(exact(g, preds[qid]) for g in golds)
        f1_scores[qid] = max(f1(g, preds[qid]) for g in golds)
    return exact_scores, f1_scores


def _apply_threshold(scores: dict, na_probs: dict, has_ans: dict, thresh: float) -> dict:
    return {q: (float(not has_ans[q]) if na_probs[q] > thresh else s) for q, s in scores.items()}


def _summary(exact_scores: dict, f1_scores: dict, qids: list[str] | None = None) -> OrderedDict:
    qids = qids or list(exact_scores)
    total = len(qids)
    return OrderedDict(
        [
            ("exact", 100.0 * sum(exact_scores[q] for q in qids) / total),
            ("f1", 100.0 * sum(f1_scores[q] for q in qids) / total),
            ("total", total),
        ]
    )


def _best_threshold(preds: dict, scores: dict, na_probs: dict, has_ans: dict) -> tuple[float, float]:
    """Sweep the no-answer threshold over the sorted na_probs, as the official script does."""
    score = best = sum(1 for v in has_ans.values() if not v)
    best_thresh = 0.0
    for qid in sorted(na_probs, key=lambda k: na_probs[k]):
        if qid not in scores:
            continue
        if has_ans[qid]:
            score += scores[qid]
        elif preds[qid]:
            score -= 1
        if score > best:
            best, best_thresh = score, na_probs[qid]
    return 100.0 * best / len(scores), best_thresh


def evaluate(
    dataset: list[dict],
    preds: dict[str, str],
    na_probs: dict[str, float] | None = None,
    na_prob_thresh: float = 1.0,
) -> OrderedDict:
    """`dataset` is the file's "data" list; questions without a prediction are left out (use a
    dataset restricted to the predicted questions, as the official script has no subset mode)."""
    has_ans = {qa["id"]: bool(qa["answers"]) for _, _, qa in questions(dataset)}
    probs = na_probs if na_probs is not None else {k: 0.0 for k in preds}
    exact_raw, f1_raw = raw_scores(dataset, preds)
    exact_thr = _apply_threshold(exact_raw, probs, has_ans, na_prob_thresh)
    f1_thr = _apply_threshold(f1_raw, probs, has_ans, na_prob_thresh)
    out = _summary(exact_thr, f1_thr)
    for prefix, wanted in (("HasAns", True), ("NoAns", False)):
        qids = [q for q, v in has_ans.items() if v is wanted]
        if qids:
            for key, value in _summary(exact_thr, f1_thr, qids).items():
                out[f"{prefix}_{key}"] = value
    if na_probs is not None:
        out["best_exact"], out["best_exact_thresh"] = _best_threshold(preds, exact_raw, probs, has_ans)
        out["best_f1"], out["best_f1_thresh"] = _best_threshold(preds, f1_raw, probs, has_ans)
    return out


def restrict(dataset: list[dict], articles: list[str] | None = None, limit: int | None = None) -> list[dict]:
    """A copy holding only the named articles, then only the first `limit` questions."""
    kept, count = [], 0
    for article in dataset:
        if articles and article["title"] not in articles:
            continue
        paragraphs = []
        for paragraph in article["paragraphs"]:
            qas = []
            for qa in paragraph["qas"]:
                if limit is not None and count >= limit:
                    break
                qas.append(qa)
                count += 1
            if qas:
                paragraphs.append({**paragraph, "qas": qas})
        if paragraphs:
            kept.append({**article, "paragraphs": paragraphs})
    return kept


def restrict_to(dataset: list[dict], preds: dict) -> list[dict]:
    """The dataset cut down to the questions that have a prediction."""
    kept = []
    for article in dataset:
        paragraphs = []
        for paragraph in article["paragraphs"]:
            qas = [qa for qa in paragraph["qas"] if qa["id"] in preds]
            if qas:
                paragraphs.append({**paragraph, "qas": qas})
        if paragraphs:
            kept.append({**article, "paragraphs": paragraphs})
    return kept
