"""Training data for pruning and recovery: SQuAD JSON windows with start/end labels, TSV sentences.

QA windows follow the fine-tuning recipe the seed models were trained with: question + context split
into windows of `max_length` tokens overlapping by `stride`; a window whose gold answer is absent or
not wholly inside it is labelled with the [CLS] position (SQuAD v2's no-answer convention).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from packer.artifact import QA
from packer.errors import PackerError
from packer.evaluate.predict import read_sst2


@dataclass
class TrainingData:
    task: str
    features: list[dict[str, list[int]]]  # input_ids, attention_mask, (token_type_ids), labels
    files: list[str] = field(default_factory=list)
    examples: int = 0
    excluded_articles: list[str] = field(default_factory=list)
    articles: int = 0

    def describe(self) -> dict:
        return {
            "files": self.files,
            "examples": self.examples,
            "features": len(self.features),
            "articles": self.articles,
            "excluded_articles": self.excluded_articles,
        }


def read_squad(paths: list[str], exclude: set[str]) -> tuple[list[dict], int, list[str]]:
    examples, titles, seen_excluded = [], set(), set()
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
            for article in data["data"]:
                if article.get("title") in exclude:
                    seen_excluded.add(article["title"])
                    continue
                titles.add(article.get("title"))
                for paragraph in article["paragraphs"]:
                    for qa in paragraph["qas"]:
                        answers = [] if qa.get("is_impossible") else qa.get("answers") or []
                        first = answers[0] if answers else None
                        examples.append(
                            {
                                "question": qa["question"],
                                "context": paragraph["context"],
                                "start": first["answer_start"] if first else None,
                                "text": first["text"] if first else "",
                            }
                        )
        except FileNotFoundError:
            raise PackerError(f"{path}: no such data file") from None
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise PackerError(f"{path}: not a SQuAD-format JSON file ({exc!r})") from exc
    missing = sorted(exclude - seen_excluded)
    if missing:
        raise PackerError(f"--exclude-articles names articles no --data file has: {', '.join(missing)}")
    return examples, len(titles), sorted(seen_excluded)


def qa_features(tokenizer, examples: list[dict], max_length: int, stride: int) -> list[dict]:
    features = []
    for start in range(0, len(examples), 256):
        chunk = examples[start : start + 256]
        enc = tokenizer(
            [e["question"].lstrip() for e in chunk],
            [e["context"] for e in chunk],
            truncation="only_second",
            max_length=max_length,
            stride=stride,
            return_overflowing_tokens=True,
            return_offsets_mapping=True,
        )
        for i, ids in enumerate(enc["input_ids"]):
            example = chunk[enc["overflow_to_sample_mapping"][i]]
            sequence = enc.sequence_ids(i)
            offsets = enc["offset_mapping"][i]
            label = (0, 0)
            if example["start"] is not None:
                a, b = example["start"], example["start"] + len(example["text"])
                context = [t for t, s in enumerate(sequence) if s == 1]
                if context and offsets[context[0]][0] <= a and offsets[context[-1]][1] >= b:
                    first = next(t for t in context if offsets[t][1] > a)
                    last = next(t for t in reversed(context) if offsets[t][0] < b)
                    label = (first, last)
            feature = {"input_ids": ids, "attention_mask": enc["attention_mask"][i], "labels": list(label)}
            if "token_type_ids" in enc:
                feature["token_type_ids"] = enc["token_type_ids"][i]
            features.append(feature)
    return features


def read_training_data(
    tokenizer,
    task: str,
    paths: list[str],
    exclude_articles: list[str] | None = None,
    rows: tuple[int, int] | None = None,
    max_length: int = 256,
    stride: int = 128,
) -> TrainingData:
    if not paths:
        raise PackerError("prune needs --data FILE (SQuAD JSON for QA, TSV for classification)")
    if task == QA:
        examples, articles, excluded = read_squad(paths, set(exclude_articles or []))
        features = qa_features(tokenizer, examples, max_length, stride)
        data = TrainingData(task, features, list(paths), len(examples), excluded, articles)
    else:
        pairs = [pair for path in paths for pair in read_sst2(path, rows)]
        enc = tokenizer([s for s, _ in pairs], truncation=True, max_length=max_length)
        features = [
            {k: enc[k][i] for k in enc if k in ("input_ids", "attention_mask", "token_type_ids")}
            | {"labels": [label]}
            for i, (_, label) in enumerate(pairs)
        ]
        data = TrainingData(task, features, list(paths), len(pairs))
    if not data.features:
        raise PackerError(f"{', '.join(paths)}: no training examples left")
    return data


def batches(features: list[dict], batch_size: int, pad_id: int, seed: int, pool: int = 50):
    """Endless shuffled batches, each padded to its longest feature. Batches are cut from pools of
    `pool` batches sorted by length, so little compute goes to padding; their order is shuffled."""
    rng = random.Random(seed)
    order: list[int] = []
    while True:
        if not order:
            order = list(range(len(features)))
            rng.shuffle(order)
        chunk, order = order[: batch_size * pool], order[batch_size * pool :]
        chunk.sort(key=lambda i: len(features[i]["input_ids"]))
        cut = [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
        rng.shuffle(cut)
        for chosen in cut:
            yield collate([features[i] for i in chosen], pad_id)


def collate(chosen: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(f["input_ids"]) for f in chosen)
    out = {}
    for key in chosen[0]:
        if key == "labels":
            out[key] = torch.tensor([f[key] for f in chosen])
            continue
        fill = pad_id if key == "input_ids" else 0
        out[key] = torch.tensor([f[key] + [fill] * (width - len(f[key])) for f in chosen])
    return out
