"""Real text for calibration and agreement checks: SQuAD JSON, TSV with a text column, or plain lines."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from packer.artifact import QA
from packer.errors import PackerError

Example = tuple[str, str | None]  # (text or question, context or None)


def read_examples(path: str | Path, task: str, limit: int = 64) -> list[Example]:
    path = Path(path)
    if not path.is_file():
        raise PackerError(f"{path}: no such text file")
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text())
            examples = [
                (qa["question"], paragraph["context"])
                for article in data["data"]
                for paragraph in article["paragraphs"]
                for qa in paragraph["qas"][:1]
            ]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise PackerError(f"{path}: not a SQuAD-format JSON file ({exc!r})") from exc
    elif path.suffix == ".tsv":
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
        column = next((c for c in ("sentence", "text", "question") if rows and c in rows[0]), None)
        if column is None:
            raise PackerError(f"{path}: a TSV needs a header with a 'sentence' or 'text' column")
        examples = [(row[column], row.get("context")) for row in rows]
    else:
        examples = []
        for line in path.read_text().splitlines():
            if line.strip():
                first, _, second = line.partition("\t")
                examples.append((first, second or None))
    if task == QA:
        examples = [e for e in examples if e[1]]
        if not examples:
            raise PackerError(f"{path}: question answering needs question/context pairs (SQuAD JSON or TAB)")
    else:
        examples = [(text, None) for text, _ in examples]
    if not examples:
        raise PackerError(f"{path}: holds no text")
    # Spread over the file rather than its first article.
    step = max(1, len(examples) // limit)
    return examples[::step][:limit]


def encode(
    tokenizer, examples: list[Example], task: str, max_length: int = 384, batch_size: int = 8
) -> list[dict]:
    batches = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        if task == QA:
            enc = tokenizer(
                [q for q, _ in chunk],
                [c for _, c in chunk],
                truncation="only_second",
                max_length=max_length,
                padding=True,
                return_tensors="pt",
            )
        else:
            enc = tokenizer(
                [t for t, _ in chunk],
                truncation=True,
                max_length=max_length,
                padding=True,
                return_tensors="pt",
            )
        batches.append(dict(enc))
    return batches
