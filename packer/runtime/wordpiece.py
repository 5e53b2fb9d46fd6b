"""BERT's WordPiece tokenization with a fast path: the same ids, offsets, word ids and word spans as the
`tokenizers` library gives, several times faster.

Why: the library costs ~0.6 us per character on one core here, so a 780-character SQuAD paragraph
takes ~0.45 ms to encode and ~0.2 ms more to read back into Python: the CPU side of QA could not feed
a GPU on two cores (issue 16). BERT's pipeline splits text at ASCII whitespace and at every ASCII
punctuation character whatever surrounds them (its normalizer never changes them), so a text is a
sequence of independent segments. A segment of ASCII letters and digits (nearly all of English) is
done here: lowercased, looked up whole, or cut into the longest vocabulary pieces first. Any other
segment (accents, CJK, control characters, other scripts) is encoded by the library alone, and
remembered: the library's normalizer works character by character, so a segment encodes the same
alone as in its text. A text holding an added token (such as "[SEP]", which spans segments) is left
to the library whole. The tokenizer checks this path against the library on sample texts when it is
loaded; tests compare both on every SQuAD v2 dev paragraph and question and on random Unicode text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from functools import lru_cache
from itertools import repeat

import numpy as np

# BERT's pre-tokenizer boundaries that no normalization moves: each ASCII punctuation character is a
# segment of its own, and runs of anything but those and ASCII whitespace are the others. Splitting
# with a capturing group gives [gap, segment, gap, segment, ..., gap]: the lengths of all parts,
# summed, place every segment without a Python loop.
_SEGMENTS = re.compile(r"([!-/:-@\[-`{-~]|[^\t\n\r !-/:-@\[-`{-~]+)")
_OTHER = re.compile(r"[^\t\n\r\x20-\x7e]")  # outside printable ASCII

# A segment's tokens relative to its start: (id, start, end, word start, word end, word) per token,
# and how many words the segment holds.
Pieces = tuple[tuple[tuple[int, int, int, int, int, int], ...], int]
# What the library gives for one text: ids, offsets, word ids and word spans, as arrays.
Encoder = Callable[[str], tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]


class WordPieceFastPath:
    """The fast path of one BERT-style tokenizer (see the module's docstring)."""

    def __init__(
        self,
        vocab: dict[str, int],
        unk: str,
        prefix: str,
        max_chars: int,
        lowercase: bool,
        added: list[str],
        library: Encoder,
    ):
        self.vocab = vocab
        # A word is one token only when it is a vocabulary entry short enough to be looked up at all.
        self.whole = {word: i for word, i in vocab.items() if len(word) <= max_chars}
        self.unk_id = vocab[unk]
        self.prefix = prefix
        self.max_chars = max_chars
        self.lowercase = lowercase
        # Added tokens are matched in the raw text (and, when normalized, in the lowercased text)
        # before anything else: a text holding one takes the library's path.
        self.added = tuple(added)
        self.library = library
        self.ascii_pieces = lru_cache(maxsize=1 << 16)(self._ascii_pieces)
        self.library_pieces = lru_cache(maxsize=1 << 14)(self._library_pieces)

    @classmethod
    def from_json(cls, text: str, library: Encoder) -> WordPieceFastPath | None:
        """The fast path for a tokenizer.json, or None when it is not BERT's pipeline."""
        spec = json.loads(text)
        normalizer, pre, model = spec.get("normalizer") or {}, spec.get("pre_tokenizer") or {}, spec["model"]
        if (
            normalizer.get("type") != "BertNormalizer"
            or pre.get("type") != "BertPreTokenizer"
            or model.get("type") != "WordPiece"
            or model.get("unk_token") not in model.get("vocab", {})
        ):
            return None
        return cls(
            model["vocab"],
            model["unk_token"],
            model.get("continuing_subword_prefix") or "##",
            int(model.get("max_input_chars_per_word", 100)),
            bool(normalizer.get("lowercase", True)),
            [t["content"] for t in spec.get("added_tokens", []) if t.get("content")],
            library,
        )

    def _ascii_pieces(self, word: str) -> Pieces:
        """WordPiece of one (lowercased) ASCII word: longest vocabulary match first; the whole word as
        the unknown token when it is too long or some part of it matches nothing."""
        n = len(word)
        unknown = (((self.unk_id, 0, n, 0, n, 0),), 1)
        if n > self.max_chars:
            return unknown
        pieces, start = [], 0
        while start < n:
            end = n
            while end > start:
                piece = word[start:end] if start == 0 else self.prefix + word[start:end]
                found = self.vocab.get(piece)
                if found is not None:
                    pieces.append((found, start, end, 0, n, 0))
                    break
                end -= 1
            else:
                return unknown
            start = end
        return tuple(pieces), 1

    def _library_pieces(self, segment: str) -> Pieces | None:
        """A segment the fast path does not read, encoded by the library alone (None when some token
        belongs to no word: its words could not be numbered within the text)."""
        ids, offsets, words, spans = self.library(segment)
        if (words < 0).any():
            return None
        rows = np.column_stack([ids, offsets, spans, words]).tolist()
        return tuple(map(tuple, rows)), int(words.max()) + 1 if len(words) else 0

    def plain_many(self, texts: list[str]) -> list:
        """`plain` of each text, worked as one: the texts joined by newlines (a boundary whatever is
        around it) are encoded in one pass and cut apart again, so a request's short questions share
        the fixed cost of the array work."""
        if len(texts) < 2:
            return [self.plain(t) for t in texts]
        joined = self.plain("\n".join(texts))
        if joined is None:
            return [self.plain(t) for t in texts]
        ids, offsets, words, spans = joined
        lengths = np.fromiter(map(len, texts), np.int64, len(texts)) + 1
        begins = np.cumsum(lengths) - lengths
        cuts = [*np.searchsorted(offsets[:, 0], begins).tolist(), len(ids)]
        out = []
        for a, b, begin in zip(cuts[:-1], cuts[1:], begins.tolist(), strict=True):
            first_word = words[a] if b > a else 0
            # copies, not views: a cached text must not keep the whole joined batch alive
            out.append((ids[a:b].copy(), offsets[a:b] - begin, words[a:b] - first_word, spans[a:b] - begin))
        return out

    def plain(self, text: str):
        """`text` encoded without special tokens as (ids, offsets, word_ids, word_spans) arrays, or None
        when the library must encode it whole."""
        low = text.lower() if self.lowercase else text
        if len(low) != len(text) or any(token in text or token in low for token in self.added):
            return None  # a character lowercasing to several (rare) moves offsets: the library's
        parts = _SEGMENTS.split(low)
        bounds = np.cumsum(np.fromiter(map(len, parts), np.int64, len(parts)))
        starts, ends = bounds[0:-1:2], bounds[1::2]
        segments = parts[1::2]
        ids = np.fromiter(map(self.whole.get, segments, repeat(-1)), np.int64, len(segments))
        library = set()
        if not (text.isascii() and text.isprintable()):
            # Segments holding a character outside printable ASCII are the library's, read from the
            # text itself (such characters are never ASCII whitespace, so always inside a segment).
            odd = np.fromiter((m.start() for m in _OTHER.finditer(text)), np.int64)
            library = set(np.searchsorted(ends, odd, side="right").tolist())
            ids[list(library)] = -1
        missing = np.flatnonzero(ids < 0).tolist()
        if not missing:  # every word is one vocabulary entry (most of English)
            offsets = np.stack([starts, ends], axis=1)
            return ids, offsets, np.arange(len(segments), dtype=np.int64), offsets.copy()
        pieces = [
            self.library_pieces(text[starts[s] : ends[s]]) if s in library else self.ascii_pieces(segments[s])
            for s in missing
        ]
        if None in pieces:
            return None
        return _assemble(ids, starts, ends, missing, pieces)


def _assemble(ids: np.ndarray, starts, ends, missing: list[int], pieces: list[Pieces]):
    """Every segment one token (its id, its span, its own word) except the `missing` ones, whose pieces
    replace them; word ids count on through the words of each segment."""
    counts = np.ones(len(ids), np.int64)
    counts[missing] = [len(p) for p, _ in pieces]
    words = np.ones(len(ids), np.int64)
    words[missing] = [n for _, n in pieces]
    segment = np.repeat(np.arange(len(ids)), counts)
    token_ids = ids[segment]
    word_ids = (np.cumsum(words) - words)[segment]
    offsets = np.stack([starts[segment], ends[segment]], axis=1)
    spans = offsets.copy()
    first = (np.cumsum(counts) - counts)[missing].tolist()
    for at, (segment_pieces, _), start in zip(first, pieces, starts[missing].tolist(), strict=True):
        for k, (piece, a, b, span_a, span_b, word) in enumerate(segment_pieces):  # a few per paragraph
            token_ids[at + k] = piece
            offsets[at + k] = start + a, start + b
            spans[at + k] = start + span_a, start + span_b
            word_ids[at + k] += word
    return token_ids, offsets.reshape(-1, 2), word_ids, spans.reshape(-1, 2)
