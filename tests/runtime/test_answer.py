"""Span selection, numpy over the start/end grid, gives exactly the answers of the per-pair loop it
replaced (kept here as the oracle), on random logits and on a real model's logits."""

from __future__ import annotations

import json
import unicodedata

import numpy as np
import pytest

from packer.runtime.tasks import qa
from tests.conftest import SHARED_DATA

QA_MODEL = SHARED_DATA / "models" / "minilm-l6-squad2"


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def per_pair_answer(context, windows, logits, options: qa.QAOptions) -> qa.QAResult:
    """The earlier implementation, verbatim in behaviour: every (start, end) pair in Python."""
    candidates: dict[tuple[int, int], qa.Answer] = {}
    min_null = float("inf")
    for window, (start_logits, end_logits) in zip(windows, logits, strict=True):
        n = window.length
        start_logits, end_logits = start_logits[:n].astype(np.float64), end_logits[:n].astype(np.float64)
        min_null = min(min_null, float(start_logits[0] + end_logits[0]))
        allowed = np.zeros(n, dtype=bool)
        allowed[0] = True
        allowed[window.context_start : window.context_end + 1] = True
        p_start, p_end = np.zeros(n), np.zeros(n)
        p_start[allowed] = softmax(start_logits[allowed])
        p_end[allowed] = softmax(end_logits[allowed])
        ctx = np.arange(window.context_start, window.context_end + 1)
        starts = ctx[np.argsort(-start_logits[ctx], kind="stable")[: qa.N_BEST]]
        ends = ctx[np.argsort(-end_logits[ctx], kind="stable")[: qa.N_BEST]]
        for s in starts:
            for e in ends:
                if e < s or e - s + 1 > options.max_answer_len:
                    continue
                char_start, char_end = qa.char_span(context, window, s, e, options.align_to_words)
                logit_sum = float(start_logits[s] + end_logits[e])
                key = (char_start, char_end)
                if key not in candidates or candidates[key].logit_sum < logit_sum:
                    candidates[key] = qa.Answer(
                        context[char_start:char_end],
                        float(p_start[s] * p_end[e]),
                        char_start,
                        char_end,
                        logit_sum,
                    )
    ranked = sorted(candidates.values(), key=lambda a: a.logit_sum, reverse=True)
    best = ranked[0].logit_sum if ranked else float("-inf")
    diff = min_null - best
    impossible = options.handle_impossible_answer and (not ranked or diff > options.null_threshold)
    return qa.QAResult(ranked[: options.top_k], bool(impossible), diff)


def same(a: qa.QAResult, b: qa.QAResult) -> bool:
    key = [(x.answer, x.start, x.end, x.score, x.logit_sum) for x in a.answers]
    return key == [(x.answer, x.start, x.end, x.score, x.logit_sum) for x in b.answers] and (
        a.is_impossible,
        a.null_score_diff,
    ) == (b.is_impossible, b.null_score_diff)


CONTEXT = (
    "The Brooklyn Bridge opened on May 24, 1883, after fourteen years of work. Its designer, John A. "
    "Roebling, died before construction began; his son Washington took over and, when he fell ill, "
    "Emily Warren Roebling carried the work through. The café at its foot served crêpes. "
) * 4


def test_equal_to_the_per_pair_loop_on_random_logits(bert_qa_packed):
    import packer

    tokenizer = packer.load(bert_qa_packed).tokenizer
    rng = np.random.default_rng(0)
    for max_len, stride in [(64, 16), (128, 32)]:
        windows = qa.make_windows(
            tokenizer, "Who carried the work through?", CONTEXT, qa.QAOptions(max_len, 30, max_len, stride)
        )
        for trial in range(40):
            logits = [
                (rng.normal(0, 3, w.length).astype(np.float32), rng.normal(0, 3, w.length).astype(np.float32))
                for w in windows
            ]
            if trial % 5 == 0:  # exact ties: quantized logits
                logits = [(np.round(s), np.round(e)) for s, e in logits]
            for top_k in (1, 3, 20):
                for align in (True, False):
                    options = qa.QAOptions(
                        top_k=top_k, max_answer_len=[30, 5][trial % 2], align_to_words=align
                    )
                    assert same(
                        qa.answer(CONTEXT, windows, logits, options),
                        per_pair_answer(CONTEXT, windows, logits, options),
                    )


def test_a_request_answered_as_one_batch_equals_each_question_alone(bert_qa_packed):
    """answer_batch pads a request's windows into one matrix: windows of different lengths, items with
    several windows, ASCII and non-ASCII contexts, ties, and top_k must come out as item by item."""
    import packer

    tokenizer = packer.load(bert_qa_packed).tokenizer
    contexts = [
        CONTEXT,
        "It opened in 1883.",
        CONTEXT[:300].encode("ascii", "ignore").decode(),
        unicodedata.normalize("NFD", CONTEXT),  # combining accents: spans must end past them
    ]
    options_of = [
        qa.QAOptions(top_k=k, max_seq_len=96, doc_stride=32, align_to_words=align)
        for k in (1, 4)
        for align in (True, False)
    ]
    rng = np.random.default_rng(1)
    for options in options_of:
        windows = [qa.make_windows(tokenizer, "Who built it?", c, options) for c in contexts]
        assert max(map(len, windows)) > 1 and min(map(len, windows)) == 1
        for trial in range(10):
            logits = [
                [(rng.normal(0, 3, w.length).astype(np.float32), rng.normal(0, 3, w.length)) for w in ws]
                for ws in windows
            ]
            if trial % 3 == 0:
                logits = [[(np.round(s), np.round(e)) for s, e in ls] for ls in logits]
            together = qa.answer_batch(contexts, windows, logits, options)
            for c, ws, ls, result in zip(contexts, windows, logits, together, strict=True):
                assert same(result, per_pair_answer(c, ws, ls, options))
                assert same(result, qa.answer(c, ws, ls, options))


def test_a_non_finite_window_fails_the_batch_and_names_the_window(bert_qa_packed):
    import packer

    tokenizer = packer.load(bert_qa_packed).tokenizer
    options = qa.QAOptions(max_seq_len=96, doc_stride=32)
    windows = [qa.make_windows(tokenizer, "When?", c, options) for c in ("It opened in 1883.", CONTEXT)]
    logits = [[(np.zeros(w.length, np.float32),) * 2 for w in ws] for ws in windows]
    assert [
        r.is_impossible for r in qa.answer_batch(["It opened in 1883.", CONTEXT], windows, logits, options)
    ]
    broken = np.zeros(windows[1][2].length, np.float32)
    broken[1] = np.inf  # a question token: never read for an answer, still a broken model
    logits[1][2] = (np.zeros_like(broken), broken)
    with pytest.raises(qa.NonFiniteLogits, match="window 2"):
        qa.answer_batch(["It opened in 1883.", CONTEXT], windows, logits, options)


def test_non_finite_logits_are_an_error_not_an_answer(bert_qa_packed):
    import packer

    tokenizer = packer.load(bert_qa_packed).tokenizer
    (window,) = qa.make_windows(tokenizer, "When?", "It opened in 1883.", qa.QAOptions())
    start = np.zeros(window.length, dtype=np.float32)
    bad = start.copy()
    bad[window.context_start] = np.nan
    with pytest.raises(qa.NonFiniteLogits, match="non-finite"):
        qa.answer("It opened in 1883.", [window], [(bad, start)], qa.QAOptions())


def test_equal_to_the_per_pair_loop_on_the_real_model():
    """50 held-out SQuAD v2 questions through the real MiniLM (transformers, fp32 on CPU)."""
    if not QA_MODEL.is_dir():
        pytest.skip(f"{QA_MODEL} is absent (../shared/data is not part of the repository)")
    from packer.build.pack import load_source_tokenizer
    from packer.build.source_backend import SourceBackend
    from packer.runtime.tokenizer import TextTokenizer

    backend = SourceBackend(str(QA_MODEL), threads=2)
    tokenizer = TextTokenizer.from_transformers(load_source_tokenizer(backend.source, None))
    data = json.loads((SHARED_DATA / "squad_v2" / "dev-v2.0.json").read_text())
    held_out = set(json.loads((QA_MODEL / "training.json").read_text())["held_out_v2_dev_articles"])
    pairs = [
        (q["question"], p["context"])
        for a in data["data"]
        if a["title"] in held_out
        for p in a["paragraphs"]
        for q in p["qas"][:1]
    ][:50]
    compared = 0
    for question, context in pairs:
        windows = qa.make_windows(tokenizer, question, context, qa.QAOptions(max_seq_len=256, doc_stride=96))
        logits = []
        for w in windows:
            out = backend.run(w.input_ids[None], w.attention_mask[None], w.token_type_ids[None])
            logits.append((out["start_logits"][0], out["end_logits"][0]))
        for options in (qa.QAOptions(), qa.QAOptions(top_k=5, align_to_words=False)):
            assert same(
                qa.answer(context, windows, logits, options),
                per_pair_answer(context, windows, logits, options),
            )
            compared += 1
    assert compared == 100
