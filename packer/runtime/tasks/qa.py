"""Extractive QA: split (question, context) into windows, and turn window logits into answers.

Shared by the service and in-process evaluation, so both give the same predictions. SQuAD v2
conventions: the null score is the [CLS] start+end logit sum (the lowest over windows), the best
span is the highest start+end logit sum over all windows, and `null_score_diff` = null - best
span is the `na_prob` that the evaluation thresholds on.
"""

from __future__ import annotations

import math
import unicodedata
from dataclasses import dataclass, field

import numpy as np

from packer.runtime.tokenizer import Plain, TextTokenizer, word_spans

N_BEST = 20


class QAInputError(ValueError):
    """The request cannot be windowed (the message says what to change)."""


@dataclass(frozen=True)
class QAOptions:
    top_k: int = 1
    max_answer_len: int = 30  # tokens
    max_seq_len: int = 384
    doc_stride: int = 128  # tokens shared by consecutive windows (HF semantics)
    handle_impossible_answer: bool = True
    null_threshold: float = 0.0
    align_to_words: bool = True  # widen spans to whole words of the context, as the HF pipeline does


def doc_stride_for(max_seq_len: int) -> int:
    """The default overlap for a window length: 128 tokens, or a third of a short window."""
    return min(QAOptions.doc_stride, max_seq_len // 3)


@dataclass
class Window:
    input_ids: np.ndarray
    attention_mask: np.ndarray
    token_type_ids: np.ndarray | None
    # (tokens, 2) character spans in the context, -1 outside it (numpy: post-processing indexes them in bulk)
    offsets: np.ndarray
    word_spans: np.ndarray  # the span of the token's whole word (as far as this window holds it)
    context_start: int  # first context token
    context_end: int  # last context token (inclusive)

    @property
    def length(self) -> int:
        return len(self.input_ids)


@dataclass
class Answer:
    answer: str
    score: float
    start: int
    end: int
    logit_sum: float = field(repr=False, default=0.0)


@dataclass
class QAResult:
    answers: list[Answer]
    is_impossible: bool
    null_score_diff: float


def make_windows(tokenizer: TextTokenizer, question: str, context: str, options: QAOptions) -> list[Window]:
    return make_windows_batch(tokenizer, [(question, context)], options)[0]


def make_windows_batch(
    tokenizer: TextTokenizer, pairs: list[tuple[str, str]], options: QAOptions
) -> list[list[Window]]:
    """Windows of each (question, context) pair of a request.

    Questions and contexts are encoded alone in two batched calls (contexts seen recently come from the
    tokenizer's cache) and windows are assembled from them with the post-processor's template, as the
    tokenizers library's only_second truncation with stride cuts them (tests compare the two). A
    tokenizer whose template cannot be read encodes each pair whole instead."""
    if tokenizer.template is None:
        for question_tokens in tokenizer.count_batch([question for question, _ in pairs]):
            _context_room(tokenizer, question_tokens, options)
        encoded = tokenizer.windows_batch(pairs, options.max_seq_len, options.doc_stride)
        return [_windows(tokenizer, encodings) for encodings in encoded]
    questions = tokenizer.ids_batch([question for question, _ in pairs])
    rooms = [_context_room(tokenizer, len(q), options) for q in questions]
    contexts = tokenizer.plain_batch([context for _, context in pairs], cached=True)
    return [
        _assemble(tokenizer, q, c, room, options.doc_stride)
        for q, c, room in zip(questions, contexts, rooms, strict=True)
    ]


def _context_room(tokenizer: TextTokenizer, question_tokens: int, options: QAOptions) -> int:
    """Context tokens a window holds beside this question; refused when none, or no stride fits."""
    room = options.max_seq_len - question_tokens - tokenizer.num_special_tokens(pair=True)
    if room < 1:
        raise QAInputError(
            f"the question is {question_tokens} tokens: with max_seq_len {options.max_seq_len} no room "
            "is left for the context; shorten the question or raise max_seq_len"
        )
    if options.doc_stride >= room:
        raise QAInputError(
            f"doc_stride {options.doc_stride} must be smaller than the context room of a window "
            f"({room} tokens with this question and max_seq_len {options.max_seq_len})"
        )
    return room


def _parts(tokens: int, room: int, stride: int) -> list[tuple[int, int]]:
    """Context token ranges of the windows: `room` long, each starting room - stride after the last,
    until one reaches the end (the tokenizers library's truncation with stride)."""
    parts = []
    for start in range(0, max(tokens, 1), room - stride):
        parts.append((start, min(start + room, tokens)))
        if start + room >= tokens:
            break
    return parts


def _assemble(
    tokenizer: TextTokenizer, question: np.ndarray, context: Plain, room: int, stride: int
) -> list[Window]:
    """The windows of one pair: the template's specials around the question and each context part."""
    t = tokenizer.template
    head = np.concatenate([t.prefix, question, t.middle])
    head_types = None
    if tokenizer.token_types:  # models without token types (RoBERTa, DistilBERT) never need them
        head_types = np.concatenate([t.prefix_types, np.full(len(question), t.first_type), t.middle_types])
    first = len(head)
    windows = []
    for start, stop in _parts(len(context), room, stride):
        m = stop - start
        if m == 0:
            continue
        ids = np.concatenate([head, context.ids[start:stop], t.suffix])
        offsets = np.full((len(ids), 2), -1, dtype=np.int64)
        offsets[first : first + m] = context.offsets[start:stop]
        # Words wholly inside the window span as in the whole context; a word cut by the window's edge
        # spans only the part the window holds (what per-window encoding gives).
        spans = offsets.copy()
        spans[first : first + m] = context.word_spans[start:stop]
        words = context.word_ids
        cut = set()
        if start > 0 and words[start] >= 0 and words[start - 1] == words[start]:
            cut.add(words[start])
        if stop < len(context) and words[stop - 1] >= 0 and words[stop] == words[stop - 1]:
            cut.add(words[stop - 1])
        for word in cut:
            inside = first + np.flatnonzero(words[start:stop] == word)
            spans[inside, 0], spans[inside, 1] = offsets[inside, 0].min(), offsets[inside, 1].max()
        types = None
        if head_types is not None:
            types = np.concatenate([head_types, np.full(m, t.second_type), t.suffix_types])
        windows.append(
            Window(
                input_ids=ids,
                attention_mask=np.ones(len(ids), dtype=np.int64),
                token_type_ids=types,
                offsets=offsets,
                word_spans=spans,
                context_start=first,
                context_end=first + m - 1,
            )
        )
    if not windows:
        raise QAInputError("the context is empty after tokenization")
    return windows


def _windows(tokenizer: TextTokenizer, encodings) -> list[Window]:
    windows = []
    for enc in encodings:
        n = len(enc.ids)
        sequence = np.fromiter((-1 if q is None else q for q in enc.sequence_ids), np.int64, n)
        context = np.flatnonzero(sequence == 1)
        if not len(context):
            continue
        offsets = np.full((n, 2), -1, dtype=np.int64)
        offsets[context] = np.asarray(enc.offsets, dtype=np.int64)[context]
        words = np.fromiter((-1 if w is None else w for w in enc.word_ids), np.int64, n)
        windows.append(
            Window(
                input_ids=np.asarray(enc.ids, dtype=np.int64),
                attention_mask=np.ones(n, dtype=np.int64),
                token_type_ids=np.asarray(enc.type_ids, dtype=np.int64) if tokenizer.token_types else None,
                offsets=offsets,
                word_spans=_word_spans(offsets, words, context),
                context_start=int(context[0]),
                context_end=int(context[-1]),
            )
        )
    if not windows:
        raise QAInputError("the context is empty after tokenization")
    return windows


def _word_spans(offsets: np.ndarray, words: np.ndarray, context: np.ndarray) -> np.ndarray:
    """For each context token, the character span of its word as far as this window holds it."""
    spans = offsets.copy()
    spans[context] = word_spans(offsets[context], words[context])
    return spans


def _through_marks(context: str, end: int) -> int:
    """Move `end` past combining marks that belong to the span's last character (NFD accents)."""
    while end < len(context) and unicodedata.category(context[end]) in ("Mn", "Mc", "Me"):
        end += 1
    return end


def char_span(context: str, window: Window, s: int, e: int, align_to_words: bool) -> tuple[int, int]:
    """Character span of tokens s..e; whole words when aligning, never ending inside a character."""
    spans = window.word_spans if align_to_words else window.offsets
    return int(spans[s, 0]), _through_marks(context, int(spans[e, 1]))


def null_probability(null_score_diff: float) -> float:
    """The no-answer score the HF-shaped and v2 routes report: a sigmoid of null_score_diff."""
    return 1 / (1 + math.exp(-max(min(null_score_diff, 50), -50)))


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


class NonFiniteLogits(ArithmeticError):
    """The model produced NaN or infinite logits (a broken variant or device): never an answer."""


def _window_candidates(context: str, window: Window, start_logits, end_logits, options: QAOptions):
    """The window's candidate (start, end) token pairs over the N_BEST x N_BEST grid, in the loop order of
    the per-pair code this replaces (start rank, then end rank), valid ones only: their logit sums,
    span probabilities (softmax over [CLS] and the context tokens) and character spans."""
    first, last = window.context_start, window.context_end + 1
    ctx_start, ctx_end = start_logits[first:last], end_logits[first:last]
    starts = np.argsort(-ctx_start)[:N_BEST]
    ends = np.argsort(-ctx_end)[:N_BEST]
    length = ends[None, :] - starts[:, None] + 1
    rows, cols = np.nonzero((length >= 1) & (length <= options.max_answer_len))
    s, e = starts[rows], ends[cols]  # context-relative token positions
    pair_sums = ctx_start[s] + ctx_end[e]
    probs = _softmax_at(start_logits[0], ctx_start, s) * _softmax_at(end_logits[0], ctx_end, e)
    spans = window.word_spans if options.align_to_words else window.offsets
    start_chars = spans[first + starts, 0]
    end_chars = spans[first + ends, 1]
    if not context.isascii():  # ASCII has no combining marks to step over
        end_chars = np.array([_through_marks(context, int(end)) for end in end_chars], dtype=np.int64)
    return pair_sums, probs, np.stack([start_chars[rows], end_chars[cols]], axis=1)


def _softmax_at(cls: float, ctx: np.ndarray, at: np.ndarray) -> np.ndarray:
    """softmax over [CLS] and the context logits (in that order), at context positions `at`."""
    return _softmax(np.concatenate(([cls], ctx)))[1 + at]


def answer(
    context: str, windows: list[Window], logits: list[tuple[np.ndarray, np.ndarray]], options: QAOptions
) -> QAResult:
    """Reconcile the windows' start/end logits into top_k answers and the no-answer decision.

    Candidates are ranked by start+end logit sum; a character span found by several pairs (several
    windows, or tokens of one word) counts once, with its best pair. All in numpy: per-window work is a
    few array operations whatever the number of pairs, so post-processing keeps up with a GPU.
    """
    min_null = float("inf")
    sums, probs, chars = [], [], []
    for w, (window, (start_logits, end_logits)) in enumerate(zip(windows, logits, strict=True)):
        n = window.length
        start_logits, end_logits = start_logits[:n].astype(np.float64), end_logits[:n].astype(np.float64)
        if not math.isfinite(float(start_logits.sum() + end_logits.sum())):
            raise NonFiniteLogits(f"window {w}: the model produced non-finite logits")
        min_null = min(min_null, float(start_logits[0] + end_logits[0]))
        pair_sums, pair_probs, pair_chars = _window_candidates(
            context, window, start_logits, end_logits, options
        )
        sums.append(pair_sums)
        probs.append(pair_probs)
        chars.append(pair_chars)
    ranked: list[Answer] = []
    best = float("-inf")
    total = sum(len(x) for x in sums)
    if total:
        sums_all, probs_all, chars_all = np.concatenate(sums), np.concatenate(probs), np.concatenate(chars)
        keys = chars_all[:, 0] * (len(context) + 2) + chars_all[:, 1]
        loop = np.arange(total)  # position in the per-pair loop order (window, start rank, end rank)
        best = float(sums_all.max())
        # Group pairs by character span; in each, the best pair first (earliest on equal sums).
        order = np.lexsort((loop, -sums_all, keys))
        sorted_keys = keys[order]
        first = np.flatnonzero(np.concatenate(([True], sorted_keys[1:] != sorted_keys[:-1])))
        kept = order[first]
        # A span's place among equal sums: where it first appeared in the loop (a stable sort of spans).
        appeared = np.minimum.reduceat(loop[order], first)
        for i in kept[np.lexsort((appeared, -sums_all[kept]))][: options.top_k]:
            start, end = int(chars_all[i, 0]), int(chars_all[i, 1])
            ranked.append(
                Answer(context[start:end], float(probs_all[i]), start, end, logit_sum=float(sums_all[i]))
            )
    null_score_diff = min_null - best
    is_impossible = options.handle_impossible_answer and (
        not ranked or null_score_diff > options.null_threshold
    )
    return QAResult(answers=ranked, is_impossible=bool(is_impossible), null_score_diff=null_score_diff)
