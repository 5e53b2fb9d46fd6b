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


class NonFiniteLogits(ArithmeticError):
    """The model produced NaN or infinite logits (a broken variant or device): never an answer."""


def answer(
    context: str, windows: list[Window], logits: list[tuple[np.ndarray, np.ndarray]], options: QAOptions
) -> QAResult:
    """One question's answers (see `answer_batch`)."""
    return answer_batch([context], [windows], [logits], options)[0]


def answer_batch(
    contexts: list[str],
    windows: list[list[Window]],
    logits: list[list[tuple[np.ndarray, np.ndarray]]],
    options: QAOptions,
) -> list[QAResult]:
    """Reconcile each question's windows' start/end logits into top_k answers and the no-answer decision.

    Per window, the N_BEST best starts and ends (a stable sort: on equal logits the earlier token) make a
    grid of candidate pairs; valid ones (end after start, at most max_answer_len tokens) are ranked by
    start+end logit sum, with a span probability from softmaxes over [CLS] and the context tokens. A
    character span found by several pairs (several windows, or tokens of one word) counts once, with its
    best pair; on equal sums, the span whose first pair came first (window, start rank, end rank) ranks
    first. A request's windows are worked as one padded matrix, so the cost is a few dozen array
    operations per request, not per window or per pair: post-processing keeps up with a GPU.
    """
    flat = [window for ws in windows for window in ws]
    if not flat:
        return [_result([], float("inf"), float("-inf"), options) for _ in contexts]
    flat_logits = [
        pair for ws, ls in zip(windows, logits, strict=True) for _, pair in zip(ws, ls, strict=True)
    ]
    count = len(flat)
    item = np.repeat(np.arange(len(contexts)), [len(ws) for ws in windows])
    _check_finite(flat, flat_logits, item)
    width = np.fromiter((w.context_end + 1 - w.context_start for w in flat), np.int64, count)
    # Column 0: [CLS]; then the context tokens, padded with -inf (exp(-inf) = 0, sorted last).
    start_grid = np.full((count, 1 + int(width.max())), -np.inf)
    end_grid = start_grid.copy()
    for k, (window, (start_logits, end_logits)) in enumerate(zip(flat, flat_logits, strict=True)):
        lo, hi = window.context_start, window.context_end + 1
        start_grid[k, 0], end_grid[k, 0] = start_logits[0], end_logits[0]
        start_grid[k, 1 : 1 + hi - lo] = start_logits[lo:hi]
        end_grid[k, 1 : 1 + hi - lo] = end_logits[lo:hi]
    null = start_grid[:, 0] + end_grid[:, 0]
    best_n = min(N_BEST, int(width.max()))
    starts = np.argsort(-start_grid[:, 1:], axis=1, kind="stable")[:, :best_n]  # context-relative
    ends = np.argsort(-end_grid[:, 1:], axis=1, kind="stable")[:, :best_n]
    length = ends[:, None, :] - starts[:, :, None] + 1
    valid = (length >= 1) & (length <= options.max_answer_len)
    valid &= (starts < width[:, None])[:, :, None] & (ends < width[:, None])[:, None, :]
    k, rows, cols = np.nonzero(valid)  # the loop order: window, start rank, end rank
    s, e = starts[k, rows], ends[k, cols]
    sums = start_grid[k, 1 + s] + end_grid[k, 1 + e]
    pair_item = item[k]
    chars = _chars(contexts, flat, pair_item, k, s, e, options)
    min_null = np.full(len(contexts), np.inf)
    np.minimum.at(min_null, item, null)
    best = np.full(len(contexts), -np.inf)
    np.maximum.at(best, pair_item, sums)
    ranked = _rank(pair_item, sums, chars, max(len(c) for c in contexts) + 2)
    place = np.arange(len(ranked)) - np.searchsorted(pair_item[ranked], pair_item[ranked])  # rank in item
    chosen = ranked[place < options.top_k]
    # Probabilities only for the pairs answered (each is its own element-wise product).
    start_probs, end_probs = _probabilities(
        np.stack([start_grid, end_grid]), width, k[chosen], s[chosen], e[chosen]
    )
    answers: list[list[Answer]] = [[] for _ in contexts]
    for i, p in zip(chosen.tolist(), (start_probs * end_probs).tolist(), strict=True):
        context, begin, stop = contexts[pair_item[i]], int(chars[i, 0]), int(chars[i, 1])
        answers[pair_item[i]].append(Answer(context[begin:stop], p, begin, stop, logit_sum=float(sums[i])))
    return [_result(a, float(n), float(b), options) for a, n, b in zip(answers, min_null, best, strict=True)]


def _check_finite(
    windows: list[Window], logits: list[tuple[np.ndarray, np.ndarray]], item: np.ndarray
) -> None:
    """Every logit of every window finite (one check for the request; the slow search only on failure,
    naming the window by its place in its question's windows)."""
    every = [x[: w.length] for w, pair in zip(windows, logits, strict=True) for x in pair]
    if np.isfinite(np.concatenate(every)).all():
        return
    for k, (window, pair) in enumerate(zip(windows, logits, strict=True)):
        if not all(np.isfinite(x[: window.length]).all() for x in pair):
            w = k - int(np.searchsorted(item, item[k]))  # windows of earlier questions come first
            raise NonFiniteLogits(f"window {w}: the model produced non-finite logits")


def _probabilities(grids: np.ndarray, width: np.ndarray, k: np.ndarray, s: np.ndarray, e: np.ndarray):
    """softmax over each window's [CLS] and context logits, for the starts (grids[0]) at context positions
    `s` and the ends (grids[1]) at `e` of windows `k`. Each window's sum runs over exactly its own tokens
    (the padding adds nothing, but the order of a pairwise sum depends on the length: the probabilities
    equal the per-window softmax's to the bit)."""
    ex = np.exp(grids - grids.max(axis=2, keepdims=True))
    totals = np.empty((2, len(width)))
    for w, m in enumerate(width.tolist()):
        totals[:, w] = ex[:, w, : 1 + m].sum(axis=1)
    return ex[0, k, 1 + s] / totals[0, k], ex[1, k, 1 + e] / totals[1, k]


def _chars(contexts, windows, item, window, s, e, options: QAOptions) -> np.ndarray:
    """(pairs, 2) character spans of the pairs (`window`: their window; `s`, `e`: their start and end
    token in its context): whole words when aligning, never ending inside a character (past marks)."""
    spans = np.concatenate([w.word_spans if options.align_to_words else w.offsets for w in windows])
    lengths = np.fromiter((w.length for w in windows), np.int64, len(windows))
    firsts = np.fromiter((w.context_start for w in windows), np.int64, len(windows))
    at = (np.cumsum(lengths) - lengths + firsts)[window]  # each pair's window's first context token
    chars = np.stack([spans[at + s, 0], spans[at + e, 1]], axis=1)
    for i, context in enumerate(contexts):
        if context.isascii():  # ASCII has no combining marks to step over
            continue
        # Only an end at a character from U+0300 on (where combining marks start) can move: look those up.
        codes = np.frombuffer(context.encode("utf-32-le"), np.uint32)
        ends = chars[:, 1]
        maybe = np.flatnonzero((item == i) & (ends < len(codes)))
        maybe = maybe[codes[ends[maybe]] >= 0x300]
        chars[maybe, 1] = [_through_marks(context, int(end)) for end in ends[maybe]]
    return chars


def _rank(item: np.ndarray, sums: np.ndarray, chars: np.ndarray, stride: int) -> np.ndarray:
    """Pairs to answer from, item by item, best first: each character span once (its best pair, the
    earliest on equal sums); spans with equal sums in the order they first appeared."""
    if not len(sums):
        return np.empty(0, np.int64)
    span = (item * stride + chars[:, 0]) * stride + chars[:, 1]
    order = np.lexsort((-sums, span))  # stable: equal (span, sum) stay in loop order
    ordered = span[order]
    heads = np.flatnonzero(np.concatenate(([True], ordered[1:] != ordered[:-1])))
    kept = order[heads]
    appeared = np.minimum.reduceat(order, heads)  # where each span first appeared in the loop
    return kept[np.lexsort((appeared, -sums[kept], item[kept]))]


def _result(answers: list[Answer], min_null: float, best: float, options: QAOptions) -> QAResult:
    null_score_diff = min_null - best
    is_impossible = options.handle_impossible_answer and (
        not answers or null_score_diff > options.null_threshold
    )
    return QAResult(answers=answers, is_impossible=bool(is_impossible), null_score_diff=null_score_diff)
