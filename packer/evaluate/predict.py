"""Predictions for evaluation: in process through a backend, or over HTTP through a running service.

Both paths use packer.runtime.tasks (the same windows and post-processing as the service), so on the same
artifact they give the same predictions.
"""

from __future__ import annotations

import asyncio
import csv
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from packer.errors import PackerError
from packer.evaluate.squad import questions
from packer.runtime.tasks import classify, qa
from packer.runtime.tasks.padding import MAX_BATCH_SIZE, batch_tokens, pad


@dataclass
class QAPredictions:
    answers: dict[str, str]  # qid -> text, "" for no answer
    na_probs: dict[str, float]  # qid -> null_score_diff


def _batches(windows: list, pad_id: int):
    """Windows sorted by length, cut into batches under a token budget: (indices, padded arrays)."""
    order = sorted(range(len(windows)), key=lambda i: windows[i].length)
    batch: list[int] = []
    for i in [*order, None]:
        if i is not None:
            longest = max([windows[j].length for j in batch] + [windows[i].length])
            if not batch or (
                len(batch) < MAX_BATCH_SIZE and longest * (len(batch) + 1) <= batch_tokens("cpu")
            ):
                batch.append(i)
                continue
        if batch:
            ids, mask, types, _ = pad([windows[j] for j in batch], pad_id)
            yield list(batch), (ids, mask, types)
        batch = [i] if i is not None else []


def predict_squad(
    backend, tokenizer, dataset: list[dict], options: qa.QAOptions, progress=True
) -> QAPredictions:
    items = [(q["id"], q["question"], p["context"]) for _, p, q in questions(dataset)]
    windows, owner = [], []
    for n, (_, question, context) in enumerate(tqdm(items, desc="tokenizing", disable=not progress)):
        for w in qa.make_windows(tokenizer, question, context, options):
            windows.append(w)
            owner.append(n)
    logits: list = [None] * len(windows)
    pad_id = tokenizer.pad_token_id or 0
    bar = tqdm(total=len(windows), desc="inference", unit="window", disable=not progress)
    for indices, (ids, mask, types) in _batches(windows, pad_id):
        out = backend.run(ids, mask, types)
        for row, j in enumerate(indices):
            n = windows[j].length
            logits[j] = (out["start_logits"][row, :n], out["end_logits"][row, :n])
        bar.update(len(indices))
    bar.close()
    per_item: dict[int, list[int]] = {}
    for j, n in enumerate(owner):
        per_item.setdefault(n, []).append(j)
    answers, na_probs = {}, {}
    for n, (qid, _, context) in enumerate(items):
        js = per_item[n]
        result = qa.answer(context, [windows[j] for j in js], [logits[j] for j in js], options)
        answers[qid] = "" if result.is_impossible or not result.answers else result.answers[0].answer
        na_probs[qid] = float(result.null_score_diff)
    return QAPredictions(answers, na_probs)


async def _post_all(
    url: str, path: str, bodies: list[dict], api_key: str | None, concurrency: int, progress: bool
):
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    results: list = [None] * len(bodies)
    bar = tqdm(total=len(bodies), desc="requests", disable=not progress)
    queue = list(range(len(bodies)))[::-1]

    async def worker(client):
        while queue:
            i = queue.pop()
            while True:
                r = await client.post(path, json=bodies[i])
                if r.status_code in (429, 503):  # back off as the server asks
                    await asyncio.sleep(float(r.headers.get("retry-after", "1")))
                    continue
                if r.status_code != 200:
                    raise PackerError(f"{url}{path} answered {r.status_code}: {r.text[:300]}")
                results[i] = r.json()
                bar.update(1)
                break

    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=300) as client:
        await asyncio.gather(*[worker(client) for _ in range(concurrency)])
    bar.close()
    return results


def predict_squad_http(
    url: str,
    model: str,
    dataset: list[dict],
    options: qa.QAOptions,
    api_key=None,
    concurrency=8,
    progress=True,
) -> QAPredictions:
    items = [(q["id"], q["question"], p["context"]) for _, p, q in questions(dataset)]
    opts = {
        "top_k": 1,
        "max_answer_len": options.max_answer_len,
        "align_to_words": options.align_to_words,
        "max_seq_len": options.max_seq_len,
        "doc_stride": options.doc_stride,
        "handle_impossible_answer": options.handle_impossible_answer,
        "null_threshold": options.null_threshold,
    }
    bodies = [{"question": q, "context": c, **opts} for _, q, c in items]
    replies = asyncio.run(
        _post_all(url.rstrip("/"), f"/v1/models/{model}/qa", bodies, api_key, concurrency, progress)
    )
    answers, na_probs = {}, {}
    for (qid, _, _), reply in zip(items, replies, strict=True):
        (result,) = reply["results"]
        answers[qid] = (
            "" if result["is_impossible"] or not result["answers"] else result["answers"][0]["answer"]
        )
        na_probs[qid] = float(result["null_score_diff"])
    return QAPredictions(answers, na_probs)


def read_sst2(path: str | Path, rows: tuple[int, int] | None = None, limit: int | None = None):
    """(sentence, label) pairs; `rows` is 1-based and inclusive over the data rows (no header)."""
    with open(path, newline="") as f:
        table = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if not table or not {"sentence", "label"} <= table[0].keys():
        raise PackerError(f"{path}: a classification TSV needs 'sentence' and 'label' columns")
    data = [(r["sentence"], int(r["label"])) for r in table]
    if rows:
        data = data[rows[0] - 1 : rows[1]]
    return data[:limit] if limit else data


def predict_labels(
    backend, tokenizer, id2label: dict[int, str], texts: list[str], progress=True
) -> list[str]:
    encoded = [classify.encode(tokenizer, t, None, 512) for t in texts]
    labels: list = [None] * len(encoded)
    for indices, (ids, mask, types) in tqdm(
        list(_batches(encoded, tokenizer.pad_token_id or 0)), desc="inference", disable=not progress
    ):
        out = backend.run(ids, mask, types)
        for row, j in enumerate(indices):
            labels[j] = classify.classify(out["logits"][row], id2label).label
    return labels


def served_labels(url: str, model: str, api_key=None) -> list[str]:
    """The model's labels in id order, as the service lists them."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    listing = httpx.get(url.rstrip("/") + "/v1/models", headers=headers, timeout=30)
    listing.raise_for_status()
    for entry in listing.json()["models"]:
        if entry["name"] == model:
            return entry["labels"] or []
    raise PackerError(f"{url} serves no model named {model}")


def predict_labels_http(url: str, model: str, texts: list[str], api_key=None, concurrency=8, progress=True):
    bodies = [{"text": t} for t in texts]
    replies = asyncio.run(
        _post_all(url.rstrip("/"), f"/v1/models/{model}/classify", bodies, api_key, concurrency, progress)
    )
    return [reply["results"][0]["label"] for reply in replies]
