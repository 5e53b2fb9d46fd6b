"""`prune-pack eval`: SQuAD v2 and SST-2 through an artifact, the source, a running service, or a file."""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

from packer.errors import PackerError
from packer.evaluate import predict, squad, squad1
from packer.runtime.tasks import qa


@dataclass
class Target:
    """What produces predictions: exactly one of artifact, source, url (+ model), predictions file."""

    artifact: str | None = None
    variant: str = "auto"
    source: str | None = None
    url: str | None = None
    model: str | None = None
    api_key: str | None = None
    predictions: str | None = None
    na_probs: str | None = None
    threads: int | None = None
    device: str = "cpu"

    def check(self) -> None:
        given = [x for x in (self.artifact, self.source, self.url, self.predictions) if x]
        if len(given) != 1:
            raise PackerError(
                "give exactly one of --artifact, --source, --url (with --model) or --predictions"
            )
        if self.url and not self.model:
            raise PackerError("--url needs --model NAME (the served model's name)")


def open_local(target: Target):
    """(backend, tokenizer, id2label) for an artifact variant or the source checkpoint."""
    if target.artifact:
        from packer.artifact import read_packed_config
        from packer.runtime.backends import choose_variant, open_backend, present_variants
        from packer.runtime.tokenizer import load_tokenizer

        variant = choose_variant(target.variant, present_variants(target.artifact), target.device)
        backend = open_backend(target.artifact, variant, device=target.device, threads=target.threads)
        config = read_packed_config(Path(target.artifact))
        return backend, load_tokenizer(Path(target.artifact), config), config.id2label
    from packer.build.pack import load_source_tokenizer
    from packer.build.source_backend import SourceBackend
    from packer.runtime.tokenizer import TextTokenizer

    backend = SourceBackend(target.source, threads=target.threads, device=target.device)
    labels = {int(k): v for k, v in (backend.source.config.get("id2label") or {}).items()}
    tokenizer = TextTokenizer.from_transformers(load_source_tokenizer(backend.source, None))
    return backend, tokenizer, labels


def open_warm(target: Target):
    """open_local, then two runs of a short input (first runs allocate and pick kernels): the
    evaluation's timer starts after this, so it measures inference, not loading."""
    from packer.runtime.tasks import classify
    from packer.runtime.tasks.padding import pad

    start = time.perf_counter()
    backend, tokenizer, id2label = open_local(target)
    ids, mask, types, _ = pad(
        [classify.encode(tokenizer, "a short warm-up text", None, 32)], tokenizer.pad_token_id
    )
    for _ in range(2):
        backend.run(ids, mask, types)
    return backend, tokenizer, id2label, time.perf_counter() - start


def load_squad(path: str, articles: list[str] | None, limit: int | None) -> list[dict]:
    try:
        data = json.loads(Path(path).read_text())["data"]
    except (OSError, json.JSONDecodeError, KeyError) as exc:
        raise PackerError(f"{path}: not a SQuAD JSON file ({exc})") from exc
    if articles:
        missing = set(articles) - {a["title"] for a in data}
        if missing:
            raise PackerError(f"{path} has no article named {', '.join(sorted(missing))}")
    return squad.restrict(data, articles, limit)


def eval_squad2(
    target: Target,
    data: str,
    options: qa.QAOptions,
    articles: list[str] | None = None,
    limit: int | None = None,
    progress: bool = True,
    version: int = 2,
) -> dict:
    """SQuAD v2 (the official v2 metric) or, with version=1, SQuAD 1.1: every question answerable, so the
    model never answers "no answer", and the official v1.1 metric."""
    target.check()
    if version == 1:
        options = dataclasses.replace(options, handle_impossible_answer=False)
    dataset = load_squad(data, articles, limit)
    backend_name, load_seconds = None, 0.0
    if not (target.predictions or target.url):
        backend, tokenizer, _, load_seconds = open_warm(target)
    start = time.perf_counter()  # after loading and warm-up: the timing is inference alone
    if target.predictions:
        answers = json.loads(Path(target.predictions).read_text())
        na_probs = json.loads(Path(target.na_probs).read_text()) if target.na_probs else None
        if version == 2:  # v1.1's official total counts every question, answered or not
            dataset = squad.restrict_to(dataset, answers)
    elif target.url:
        preds = predict.predict_squad_http(
            target.url, target.model, dataset, options, target.api_key, progress=progress
        )
        answers, na_probs = preds.answers, preds.na_probs
        backend_name = f"http {target.url} {target.model}"
    else:
        preds = predict.predict_squad(backend, tokenizer, dataset, options, progress=progress)
        answers, na_probs = preds.answers, preds.na_probs
        backend_name = backend.name
    seconds = time.perf_counter() - start
    metrics = (
        squad1.evaluate(dataset, answers) if version == 1 else squad.evaluate(dataset, answers, na_probs)
    )
    return {
        "metrics": metrics,
        "predictions": answers,
        "na_probs": na_probs,
        "seconds": seconds,
        "load_seconds": load_seconds,
        "backend": backend_name,
        "questions": len(answers),
    }


def parse_rows(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    try:
        first, last = (int(x) for x in text.split("-"))
    except ValueError:
        raise PackerError(f"--rows {text!r} is not FIRST-LAST, e.g. 601-872") from None
    return first, last


def eval_sst2(
    target: Target, data: str, rows: str | None = None, limit: int | None = None, progress=True
) -> dict:
    target.check()
    if target.predictions:
        raise PackerError("sst2 evaluation runs a model: use --artifact, --source or --url")
    examples = predict.read_sst2(data, parse_rows(rows), limit)
    texts, gold = [t for t, _ in examples], [y for _, y in examples]
    load_seconds = 0.0
    if not target.url:
        backend, tokenizer, id2label, load_seconds = open_warm(target)
    start = time.perf_counter()  # after loading and warm-up: the timing is inference alone
    if target.url:
        labels = predict.predict_labels_http(
            target.url, target.model, texts, target.api_key, progress=progress
        )
        backend_name = f"http {target.url} {target.model}"
        served = predict.served_labels(target.url, target.model, target.api_key)
        label_ids = {name: i for i, name in enumerate(served)}
    else:
        labels = predict.predict_labels(backend, tokenizer, id2label, texts, progress=progress)
        backend_name = backend.name
        label_ids = {v: k for k, v in id2label.items()}
    seconds = time.perf_counter() - start
    predicted = [label_ids.get(label, -1) for label in labels]
    correct = sum(int(p == g) for p, g in zip(predicted, gold, strict=True))
    return {
        "metrics": {"accuracy": 100.0 * correct / len(gold), "total": len(gold)},
        "seconds": seconds,
        "load_seconds": load_seconds,
        "backend": backend_name,
        "questions": len(gold),
    }
