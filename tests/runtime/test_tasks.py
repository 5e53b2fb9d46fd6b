import numpy as np
import pytest

import packer
from packer.runtime.tasks import classify, qa
from packer.runtime.tasks.padding import pad
from service.batching import BatchLimits, FairQueue, WorkItem


@pytest.fixture(scope="module")
def tokenizer(bert_qa_packed):
    return packer.load(bert_qa_packed).tokenizer


def test_windows_overlap_by_doc_stride_and_cover_the_context(tokenizer):
    context = "the bridge was designed by a local engineer and opened to traffic " * 12
    options = qa.QAOptions(max_seq_len=48, doc_stride=12)
    windows = qa.make_windows(tokenizer, "when did it open?", context, options)
    assert len(windows) > 3 and all(w.length <= 48 for w in windows)
    spans = [(w.offsets[w.context_start][0], w.offsets[w.context_end][1]) for w in windows]
    assert spans[0][0] == 0 and spans[-1][1] == len(context.rstrip())
    first_ids = windows[0].input_ids[windows[0].context_start : windows[0].context_end + 1]
    second_ids = windows[1].input_ids[windows[1].context_start : windows[1].context_end + 1]
    assert list(first_ids[-12:]) == list(second_ids[:12])  # 12 shared tokens


def fake_logits(window: qa.Window, start: int, end: int, null: float) -> tuple[np.ndarray, np.ndarray]:
    s = np.full(window.length, -5.0)
    e = np.full(window.length, -5.0)
    s[0] = e[0] = null / 2
    s[start], e[end] = 3.0, 3.0
    return s, e


def test_best_span_across_windows_and_null_decision(tokenizer):
    context = "alpha beta gamma delta epsilon zeta eta theta iota kappa " * 6
    options = qa.QAOptions(max_seq_len=32, doc_stride=8, top_k=2)
    windows = qa.make_windows(tokenizer, "which?", context, options)
    assert len(windows) >= 3
    logits = [fake_logits(w, w.context_start, w.context_start, null=-10) for w in windows]
    target = windows[2]
    logits[2] = fake_logits(target, target.context_start + 1, target.context_start + 3, null=-10)
    logits[2][0][target.context_start + 1] = 9.0  # the strongest span lives in window 2
    result = qa.answer(context, windows, logits, options)
    best = result.answers[0]
    assert context[best.start : best.end] == best.answer
    # Whole words by default (the span widens to the words its first and last tokens are in) ...
    assert (best.start, best.end) == (
        target.word_spans[target.context_start + 1][0],
        target.word_spans[target.context_start + 3][1],
    )
    assert context[best.start - 1] == " " and context[best.end] == " "
    # ... exactly the tokens' characters without alignment.
    raw = qa.answer(
        context, windows, logits, qa.QAOptions(max_seq_len=32, doc_stride=8, align_to_words=False)
    )
    assert (raw.answers[0].start, raw.answers[0].end) == (
        target.offsets[target.context_start + 1][0],
        target.offsets[target.context_start + 3][1],
    )
    assert not result.is_impossible and result.null_score_diff == pytest.approx(-10 - 12.0)
    # Raise every window's null score above the best span: SQuAD v2 says no answer.
    logits = [(s.copy(), e.copy()) for s, e in logits]
    for s, e in logits:
        s[0] = e[0] = 20.0
    result = qa.answer(context, windows, logits, options)
    assert result.is_impossible and result.null_score_diff == pytest.approx(40 - 12.0)
    assert result.answers  # the best span is still given
    never = qa.answer(context, windows, logits, qa.QAOptions(handle_impossible_answer=False))
    assert not never.is_impossible


def test_max_answer_len_is_respected(tokenizer):
    context = "one two three four five six seven eight nine ten"
    options = qa.QAOptions(max_answer_len=2)
    (window,) = qa.make_windows(tokenizer, "q", context, options)
    s, e = fake_logits(window, window.context_start, window.context_end, null=-10)
    result = qa.answer(context, [window], [(s, e)], options)
    # The strongest start ("one") with an end within two tokens: never the 10-token span, never empty.
    assert result.answers[0].answer in ("one", "one two")
    assert all(0 < len(a.answer.split()) <= 2 for a in result.answers)


def test_classify_softmax_and_labels():
    c = classify.classify(np.array([0.0, 2.0, 1.0]), {0: "neg", 1: "pos", 2: "neu"})
    assert c.label == "pos" and c.score == pytest.approx(np.exp(2) / (1 + np.exp(2) + np.exp(1)))
    assert sum(c.scores.values()) == pytest.approx(1.0)


def item(length: int, flow: int = 0) -> WorkItem:
    return WorkItem(np.arange(length), np.ones(length, dtype=np.int64), None, deadline=1e18, flow=flow)


def select(items, limits: BatchLimits) -> list[WorkItem]:
    queue = FairQueue(limits)
    queue.add(list(items))
    return queue.take()


def test_batches_take_the_oldest_then_similar_lengths():
    from collections import deque

    queue = deque([item(100), item(10), item(98), item(12), item(101)])
    batch = select(queue, BatchLimits(max_batch_size=3, max_batch_tokens=10_000))
    assert [it.length for it in batch] == [100, 101, 98]
    fifo = select(queue, BatchLimits(max_batch_size=3, max_batch_tokens=10_000, length_grouping=False))
    assert [it.length for it in fifo] == [100, 10, 98]


def test_token_budget_counts_padding():
    from collections import deque

    queue = deque([item(100), item(100), item(100), item(100)])
    batch = select(queue, BatchLimits(max_batch_size=32, max_batch_tokens=300))
    assert len(batch) == 3
    alone = select(deque([item(500)]), BatchLimits(max_batch_tokens=300))
    assert len(alone) == 1  # a window longer than the budget still runs, alone
    ids, mask, types, longest = pad([item(3), item(5)], pad_id=0)
    assert ids.shape == (2, 5) and mask.sum() == 8 and longest == 5 and types is None
