"""The serving guarantees: fair scheduling, batch invariance, failures that stay with their request,
whole-word and whole-character answers (DESIGN.md, "Serving guarantees")."""

from __future__ import annotations

import asyncio
import itertools
import time
import unicodedata

import httpx
import numpy as np
import pytest

import packer
from packer.runtime.backends import open_backend
from packer.runtime.samples import QA_PAIRS
from packer.runtime.tasks import qa
from packer.runtime.tasks.padding import pad
from service.batching import Batcher, BatchLimits, FairQueue, WorkItem
from service.errors import InferenceFailed
from service.metrics import Metrics
from tests.serving import Server


def windows_of(length: int, count: int, flow: int) -> list[WorkItem]:
    return [
        WorkItem(np.arange(length), np.ones(length, dtype=np.int64), None, 1e18, flow) for _ in range(count)
    ]


# -- scheduling order (in process) -------------------------------------------------------------


@pytest.mark.parametrize("grouping", [True, False])
def test_a_small_request_behind_a_big_one_waits_about_one_batch(grouping):
    queue = FairQueue(BatchLimits(max_batch_size=4, max_batch_tokens=1024, length_grouping=grouping))
    queue.add(windows_of(128, 400, flow=1))  # the big request: 100 full batches
    first = queue.take()
    queue.add(windows_of(20, 1, flow=2))  # a short question arrives while the big one runs
    batches = [queue.take() for _ in range(2)]
    assert {it.flow for it in first} == {1}
    assert any(it.flow == 2 for b in batches for it in b)  # within the next two batches, not after 99
    rest = []
    while len(queue):
        rest.extend(queue.take())
    assert len(rest) + len(first) + sum(map(len, batches)) == 401 and len(queue) == 0


def test_no_request_starves_under_a_stream_of_new_ones():
    """A five-window request while a new one-window request arrives before every batch."""
    queue = FairQueue(BatchLimits(max_batch_size=1, max_batch_tokens=1024))
    queue.add(windows_of(100, 5, flow=1))
    served = []
    for new in range(2, 42):
        queue.add(windows_of(100, 1, flow=new))
        served.extend(it.flow for it in queue.take())
    first = [i for i, flow in enumerate(served) if flow == 1]
    assert len(first) == 5 and first[-1] < 15  # it keeps getting turns: no credit lost to newcomers


def test_equal_requests_share_the_model_evenly_and_each_runs_oldest_first():
    queue = FairQueue(BatchLimits(max_batch_size=2, max_batch_tokens=10_000))
    a, b = windows_of(64, 10, flow=1), windows_of(64, 10, flow=2)
    queue.add(a)
    queue.add(b)
    served = {1: 0, 2: 0}
    for _ in range(5):
        for it in queue.take():
            served[it.flow] += 1
        assert abs(served[1] - served[2]) <= 2
    leaders = []
    while len(queue):
        leaders.append(queue.take()[0])
    # A flow's leading window is always its oldest one still waiting.
    assert all(x.enqueued <= y.enqueued for x, y in itertools.pairwise(leaders) if x.flow == y.flow)


def test_a_token_budget_longer_than_one_window_still_runs_it_alone():
    queue = FairQueue(BatchLimits(max_batch_size=32, max_batch_tokens=300))
    queue.add(windows_of(100, 4, flow=1))
    assert len(queue.take()) == 3  # padded tokens count: 3 x 100 fit, a fourth does not
    alone = FairQueue(BatchLimits(max_batch_tokens=300))
    alone.add(windows_of(500, 1, flow=1))
    assert len(alone.take()) == 1


def test_one_models_backlog_does_not_starve_another(bert_onnx, roberta_cls_packed):
    """Two real models on one worker: a question to model B runs within a few batches of model A's backlog."""
    order: list[str] = []
    qa_backend = open_backend(bert_onnx, "onnx", device="cpu", threads=1)
    cls_backend = open_backend(roberta_cls_packed, "torch", device="cpu", threads=1)

    def recording(name, backend):
        def run(ids, mask, types):
            order.append(name)
            return backend.run(ids, mask, types)

        return run

    batcher = Batcher(Metrics())
    limits = BatchLimits(max_batch_size=2, max_batch_tokens=4096, max_wait_ms=0)
    batcher.register("a", recording("a", qa_backend), 0, limits)
    batcher.register("b", recording("b", cls_backend), 1, limits)
    ids = np.full(40, 7, dtype=np.int64)
    big = [WorkItem(ids, np.ones(40, dtype=np.int64), None, 1e18, flow=1) for _ in range(60)]
    batcher.submit("a", big)
    batcher.start()
    while not order:
        time.sleep(0.001)
    small = [WorkItem(ids[:10], np.ones(10, dtype=np.int64), None, 1e18, flow=2)]
    batcher.submit("b", small)
    small[0].future.result(timeout=60)
    for it in big:
        it.future.result(timeout=60)
    batcher.stop(5)
    assert order.count("b") == 1 and order.index("b") <= order.index("a") + 4 < 30


# -- batch invariance --------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["torch", "onnx", "onnx-int8", "onnx-fp16"])
def test_a_windows_answer_does_not_depend_on_its_batch(bert_onnx, variant):
    backend = open_backend(bert_onnx, variant, device="cpu", threads=1)
    assert backend.batch_invariant
    tokenizer = packer.load(bert_onnx).tokenizer
    options = qa.QAOptions(top_k=3)
    long_context = " ".join(c for _, c in QA_PAIRS) * 3
    filler = qa.make_windows(tokenizer, "what is it?", long_context, options)[:2]
    for question, context in QA_PAIRS:
        windows = qa.make_windows(tokenizer, question, context, options)

        def logits(batch, rows):
            ids, mask, types, _ = pad(batch, tokenizer.pad_token_id)
            out = backend.run(ids, mask, types)
            return [(out["start_logits"][r], out["end_logits"][r]) for r in rows]

        alone = [logits([w], [0])[0] for w in windows]
        padded = logits([*windows, *filler], range(len(windows)))  # beside longer windows, padded
        for (s1, e1), (s2, e2), w in zip(alone, padded, windows, strict=True):
            assert np.abs(s1[: w.length] - s2[: w.length]).max() <= 1e-5
            assert np.abs(e1[: w.length] - e2[: w.length]).max() <= 1e-5
        a, b = qa.answer(context, windows, alone, options), qa.answer(context, windows, padded, options)
        assert [x.answer for x in a.answers] == [x.answer for x in b.answers]
        assert a.is_impossible == b.is_impossible
        assert a.null_score_diff == pytest.approx(b.null_score_diff, abs=1e-5)
        for x, y in zip(a.answers, b.answers, strict=True):
            assert x.score == pytest.approx(y.score, abs=1e-5)


def test_batched_int8_is_opt_in_and_says_it_is_not_invariant(bert_onnx):
    default = open_backend(bert_onnx, "onnx-int8", device="cpu", threads=1)
    batched = open_backend(bert_onnx, "onnx-int8", device="cpu", threads=1, int8_batching="batched")
    assert default.per_window and default.batch_invariant
    assert not batched.per_window and not batched.batch_invariant


# -- isolation ---------------------------------------------------------------------------------


def test_a_failing_batch_is_rerun_so_only_the_culprit_fails(bert_onnx):
    """A real backend fault (an id past the embedding table, put in below the service's own check)."""
    backend = open_backend(bert_onnx, "onnx", device="cpu", threads=1)
    tokenizer = packer.load(bert_onnx).tokenizer
    metrics = Metrics()
    batcher = Batcher(metrics)
    batcher.register("m", backend.run, tokenizer.pad_token_id, BatchLimits(max_wait_ms=0))
    flows = {}
    for flow, (question, context) in enumerate(QA_PAIRS[:3], start=1):
        (w,) = qa.make_windows(tokenizer, question, context, qa.QAOptions())[:1]
        flows[flow] = (w, WorkItem(w.input_ids, w.attention_mask, w.token_type_ids, 1e18, flow))
    bad_ids = flows[2][0].input_ids.copy()
    bad_ids[3] = 10**6
    bad = WorkItem(bad_ids, flows[2][0].attention_mask, flows[2][0].token_type_ids, 1e18, 2)
    good = [flows[1][1], flows[3][1]]
    batcher.submit("m", [good[0]])
    batcher.submit("m", [bad])
    batcher.submit("m", [good[1]])
    batcher.start()  # all three are queued: one batch
    with pytest.raises(InferenceFailed):
        bad.future.result(timeout=60)
    for it, (w, _) in zip(good, (flows[1], flows[3]), strict=True):
        alone = backend.run(w.input_ids[None], w.attention_mask[None], w.token_type_ids[None])
        assert np.array_equal(it.future.result(timeout=60)["start_logits"], alone["start_logits"][0])
    batcher.stop(5)
    assert metrics.batch_reruns.labels("m")._value.get() == 1


# -- whole words and characters -----------------------------------------------------------------


def one_token_answer(tokenizer, context: str, token_text: str, options: qa.QAOptions) -> qa.Answer:
    (window,) = qa.make_windows(tokenizer, "which?", context, options)
    tokens = tokenizer.tokens(window.input_ids)
    at = tokens.index(token_text, window.context_start)
    start, end = np.full(window.length, -9.0), np.full(window.length, -9.0)
    start[at], end[at] = 5.0, 5.0
    return qa.answer(context, [window], [(start, end)], options).answers[0]


def test_answers_widen_to_whole_words(bert_qa_packed):
    tokenizer = packer.load(bert_qa_packed).tokenizer
    context = "In 1066, the Normans came."
    words = one_token_answer(tokenizer, context, "##0", qa.QAOptions(max_answer_len=1))
    assert (words.answer, context[words.start : words.end]) == ("1066", "1066")
    raw = one_token_answer(tokenizer, context, "##0", qa.QAOptions(max_answer_len=1, align_to_words=False))
    assert raw.answer == "0"


def test_combining_marks_stay_with_their_character(bert_qa_packed):
    tokenizer = packer.load(bert_qa_packed).tokenizer
    context = unicodedata.normalize("NFD", "Beyoncé sang.")
    for align in (True, False):
        got = one_token_answer(tokenizer, context, "##e", qa.QAOptions(align_to_words=align))
        assert got.answer.endswith("e\u0301") and context[got.start : got.end] == got.answer
        assert unicodedata.normalize("NFC", got.answer) == ("Beyoncé" if align else "é")


# -- through a real server -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fair_server(models_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("fair") / "serve.log"
    srv = Server(models_dir, log, max_windows_per_request=3000, queue_size=4096)
    yield srv
    srv.stop()


def big_request(windows_per_item: int = 40, items: int = 20) -> dict:
    context = " ".join(f"The bridge number {i} opened in {1800 + i}." for i in range(windows_per_item * 2))
    return {
        "items": [{"question": "When did it open?", "context": context} for _ in range(items)],
        "max_seq_len": 32,
        "doc_stride": 4,
    }


def test_a_small_request_is_answered_while_a_big_one_runs(fair_server):
    async def scenario():
        async with httpx.AsyncClient(base_url=fair_server.url, timeout=120) as http:
            # ~2,400 windows: over a second of queue on this machine, against ~30 ms for the two small
            # requests, so a loaded machine's stall does not let the big one finish first.
            big = asyncio.ensure_future(http.post("/v1/models/qa/qa", json=big_request(windows_per_item=80)))
            deadline = time.monotonic() + 60
            while fair_server.metric("prune_serve_queue_depth", model="qa") < 100:
                assert time.monotonic() < deadline and not big.done()
                await asyncio.sleep(0.01)
            small = await http.post("/v1/models/qa/qa", json={"question": "Who?", "context": "Ada wrote it."})
            other_model = await http.post("/v1/models/cls/classify", json={"text": "a fine film"})
            still_queued = fair_server.metric("prune_serve_queue_depth", model="qa")
            big_done_first = big.done()
            return small, other_model, still_queued, big_done_first, await big

    small, other_model, still_queued, big_done_first, big = asyncio.run(scenario())
    assert small.status_code == 200 and other_model.status_code == 200
    assert still_queued > 0 and not big_done_first  # answered while the big request still had windows queued
    assert big.status_code == 200 and len(big.json()["results"]) == 20


def test_a_request_over_the_window_limit_gets_413_naming_both(models_dir, tmp_path):
    srv = Server(models_dir, tmp_path / "serve.log", max_windows_per_request=50)
    try:
        r = httpx.post(srv.url + "/v1/models/qa/qa", json=big_request(items=2), timeout=60)
        assert r.status_code == 413
        message = r.json()["error"]["message"]
        assert "limit of 50" in message and "makes" in message
    finally:
        srv.stop()


def test_an_answer_does_not_change_beside_a_long_context(fair_server):
    question, context = QA_PAIRS[0]
    single = {"question": question, "context": context, "top_k": 3}
    alone = httpx.post(fair_server.url + "/v1/models/qa/qa", json=single, timeout=60).json()["results"][0]
    long_context = " ".join(c for _, c in QA_PAIRS) * 30
    mixed = httpx.post(
        fair_server.url + "/v1/models/qa/qa",
        json={
            "items": [
                {"question": "What?", "context": long_context},
                {"question": question, "context": context},
            ],
            "top_k": 3,
        },
        timeout=60,
    ).json()["results"][1]
    assert [a["answer"] for a in alone["answers"]] == [a["answer"] for a in mixed["answers"]]
    assert alone["is_impossible"] == mixed["is_impossible"]
    assert alone["null_score_diff"] == pytest.approx(mixed["null_score_diff"], abs=1e-5)
    models = httpx.get(fair_server.url + "/v1/models").json()["models"]
    assert all(m["batch_invariant"] for m in models)
