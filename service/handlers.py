"""Run one request against a served model: tokenize off the loop, queue windows, await, post-process.

No HTTP here beyond watching for the client going away; the routes in app.py stay thin.
"""

from __future__ import annotations

import asyncio
import math
import time

from starlette.requests import Request

from packer.runtime.tasks import classify, qa
from service.batching import WorkItem, new_flow
from service.engine import Engine
from service.errors import ClientGone, DeadlineExceeded, InferenceFailed, InvalidInput, PayloadTooLarge
from service.registry import ServedModel
from service.schemas import (
    ClassifyItem,
    ClassifyResultOut,
    QAAnswer,
    QAItem,
    QAResultOut,
)
from service.settings import Settings

DISCONNECT_POLL_S = 0.1


def check_sizes(settings: Settings, count: int, texts: dict[str, str]) -> None:
    if count > settings.max_items:
        raise InvalidInput(f"items: {count} items in one request, at most {settings.max_items}")
    for field, text in texts.items():
        if len(text) > settings.max_context_chars:
            raise InvalidInput(f"{field}: {len(text)} characters, at most {settings.max_context_chars}")


def make_work(rt: Engine, model: ServedModel, windows: list, deadline: float) -> list[WorkItem]:
    """One flow of work items for a request's windows, refused (413/422) when they could never run."""
    settings, count = rt.settings, len(windows)
    # Never admissible (not a 429): more than the whole queue holds, or more than one request may take.
    if count > settings.queue_size:
        raise PayloadTooLarge(
            f"this request makes {count} windows, more than the queue holds ({settings.queue_size}); "
            "send fewer or shorter contexts, or raise PRUNE_SERVE_QUEUE_SIZE"
        )
    if count > settings.max_windows_per_request:
        raise PayloadTooLarge(
            f"this request makes {count} windows, more than the limit of {settings.max_windows_per_request} "
            "per request (PRUNE_SERVE_MAX_WINDOWS_PER_REQUEST); send fewer or shorter contexts, or a larger "
            "max_seq_len or smaller doc_stride"
        )
    rows = model.config.vocab_size
    for i, w in enumerate(windows):
        # Refused here, before batching: an id past the embedding table would fail every window beside it.
        if w.input_ids.size and int(w.input_ids.max()) >= rows:
            raise InvalidInput(
                f"the tokenizer produced token id {int(w.input_ids.max())} (window {i}), but model "
                f"{model.name} has {rows} embedding rows; the artifact's tokenizer does not match its model"
            )
    flow = new_flow()
    return [WorkItem(w.input_ids, w.attention_mask, w.token_type_ids, deadline, flow) for w in windows]


async def _await_all(items: list[WorkItem], request: Request | None, deadline: float) -> list[dict]:
    futures = [asyncio.wrap_future(it.future) for it in items]
    results = asyncio.ensure_future(asyncio.gather(*futures))
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeadlineExceeded("the request did not finish before its deadline")
            done, _ = await asyncio.wait({results}, timeout=min(remaining, DISCONNECT_POLL_S))
            if done:
                return results.result()
            if request is not None and await request.is_disconnected():
                raise ClientGone("the client disconnected")
    except BaseException:
        for it in items:
            it.future.cancel()  # queued windows are skipped by the worker
        results.cancel()
        # Retrieve its outcome so asyncio does not log "exception was never retrieved" for every 504.
        results.add_done_callback(lambda f: f.cancelled() or f.exception())
        raise


def _qa_options(body, model: ServedModel) -> qa.QAOptions:
    """The request's options; unset window sizes follow the model's own limits."""
    max_seq_len = body.max_seq_len or model.default_max_seq_len
    doc_stride = body.doc_stride if body.doc_stride is not None else qa.doc_stride_for(max_seq_len)
    return qa.QAOptions(
        top_k=body.top_k,
        max_answer_len=body.max_answer_len,
        max_seq_len=max_seq_len,
        doc_stride=doc_stride,
        handle_impossible_answer=body.handle_impossible_answer,
        null_threshold=body.null_threshold,
        align_to_words=body.align_to_words,
    )


async def run_qa(
    rt: Engine, model: ServedModel, items: list[QAItem], body, request: Request | None, deadline: float
) -> list[QAResultOut]:
    texts = {f"items[{i}].context": it.context for i, it in enumerate(items)}
    texts.update({f"items[{i}].question": it.question for i, it in enumerate(items)})
    check_sizes(rt.settings, len(items), texts)
    options = _qa_options(body, model)
    if options.max_seq_len > model.max_window:
        raise InvalidInput(
            f"max_seq_len: {options.max_seq_len} is more than model {model.name} supports "
            f"({model.max_window} tokens)"
        )

    start = time.perf_counter()
    pairs = [(it.question, it.context) for it in items]
    try:
        prepared = await rt.cpu.prepare_qa(model.key, model.tokenizer, pairs, options)
    except qa.QAInputError as exc:
        raise InvalidInput(str(exc)) from None
    rt.metrics.tokenize.labels(model.name).observe(time.perf_counter() - start)
    try:
        work = make_work(rt, model, [w for ws in prepared.inputs for w in ws], deadline)
        rt.batcher.submit(model.key, work)
        if request is not None:
            request.scope["windows"] = len(work)  # for the access log
        outputs = await _await_all(work, request, deadline)
    except BaseException:  # refused, timed out, client gone, cancelled: nothing will ask for answers
        rt.cpu.forget(prepared)
        raise
    logits, at = [], 0
    for ws in prepared.inputs:
        logits.append([(o["start_logits"], o["end_logits"]) for o in outputs[at : at + len(ws)]])
        at += len(ws)
    try:
        found = await rt.cpu.answer_qa(prepared, [it.context for it in items], logits, options)
    except qa.NonFiniteLogits as exc:
        raise InferenceFailed(f"model {model.name}: {exc}; the variant or device is broken") from None
    return [
        QAResultOut(
            answers=[QAAnswer(answer=a.answer, score=a.score, start=a.start, end=a.end) for a in r.answers],
            is_impossible=r.is_impossible,
            null_score_diff=r.null_score_diff if math.isfinite(r.null_score_diff) else 0.0,
        )
        for r in found
    ]


async def run_classify(
    rt: Engine,
    model: ServedModel,
    items: list[ClassifyItem],
    max_seq_len: int | None,
    all_scores: bool,
    request: Request | None,
    deadline: float,
) -> list[ClassifyResultOut]:
    texts = {f"items[{i}].text": it.text for i, it in enumerate(items)}
    texts.update({f"items[{i}].text_pair": it.text_pair for i, it in enumerate(items) if it.text_pair})
    check_sizes(rt.settings, len(items), texts)
    max_seq_len = min(max_seq_len or model.max_window, model.max_window)

    start = time.perf_counter()
    pairs = [(it.text, it.text_pair) for it in items]
    encoded = await rt.cpu.classify_inputs(model.key, model.tokenizer, pairs, max_seq_len)
    rt.metrics.tokenize.labels(model.name).observe(time.perf_counter() - start)
    work = make_work(rt, model, encoded, deadline)
    rt.batcher.submit(model.key, work)
    if request is not None:
        request.scope["windows"] = len(work)  # for the access log
    outputs = await _await_all(work, request, deadline)
    results = []
    for out in outputs:
        c = classify.classify(out["logits"], model.config.id2label)
        results.append(
            ClassifyResultOut(label=c.label, score=c.score, scores=c.scores if all_scores else None)
        )
    return results
