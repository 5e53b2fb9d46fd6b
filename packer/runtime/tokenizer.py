"""Tokenization for serving, through the `tokenizers` library (no transformers, no torch), and for BERT
tokenizers a fast path exact to it (packer/runtime/wordpiece.py).

An artifact's tokenizer.json is the same Rust tokenizer transformers' fast tokenizers wrap; calling it
the way transformers does (truncation and stride on the backend, overflowing encodings after the first)
gives the same windows, offsets and sequence ids, which tests/runtime/test_tokenizer.py checks.

transformers configures truncation on its one backend tokenizer before every call, so two threads can
swap each other's settings between configuring and encoding. Here each setting has its own configured
copy, made once: encoding never mutates shared state and threads may tokenize at once.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from packer.artifact import TOKENIZER, PackedConfig
from packer.errors import ArtifactError
from packer.runtime.wordpiece import WordPieceFastPath

# Texts the fast path must encode exactly as the library before a tokenizer uses it: punctuation of
# every kind, digits, case, words cut into pieces or unknown, runs of whitespace, an over-long word.
FAST_PATH_CHECKS = (
    "Where is it?",
    "It is in the old town, by the river.",
    "The Normans (Norman: Nourmands) gave their name to Normandy in the 10th and 11th centuries!",
    "e-mail me@example.org: $1,595.50 (~20%) +/- 3;\t[x]{y}<z> `q` ^_^ |a|b\\c \"d\" 'e'\n\r\n",
    "Supercalifragilisticexpialidocious hyperparameterization XQZJVK qzxv 3.14159265358979",
    "Café owners in Zürich (東京, Москва) — naïve cafe\u0301s; Istanbul\u00a0Kelvin \u212a ok\x01ay\x0b.",
    "x" * 120 + " " + "ab" * 60,
    "   ",
    "",
)


@dataclass(frozen=True)
class Encoded:
    """One encoding (a whole text, or one window of a long one)."""

    ids: list[int]
    type_ids: list[int]
    offsets: list[tuple[int, int]]
    sequence_ids: list[int | None]
    word_ids: list[int | None]


@dataclass(frozen=True)
class Plain:
    """A text encoded alone, without special tokens, as arrays (QA assembles windows from these)."""

    ids: np.ndarray  # int64
    offsets: np.ndarray  # (tokens, 2) int64 character spans
    word_ids: np.ndarray  # int64, -1 where a token belongs to no word
    word_spans: np.ndarray  # (tokens, 2) each token's whole word (its own span where it has no word)

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class PairTemplate:
    """Where the post-processor puts its special tokens around a pair: prefix, first, middle, second,
    suffix, with the type id of each part. Read off the tokenizer's own output, checked at load."""

    prefix: np.ndarray
    middle: np.ndarray
    suffix: np.ndarray
    prefix_types: np.ndarray
    middle_types: np.ndarray
    suffix_types: np.ndarray
    first_type: int
    second_type: int


@dataclass(frozen=True)
class TokenizerSpec:
    """What rebuilds a TextTokenizer in another process (the service's tokenization workers)."""

    json: str
    pad_token_id: int
    token_types: bool
    cache_tokens: int


class PlainCache:
    """Recently seen texts' encodings (SQuAD-style traffic asks many questions of one context), bounded
    by the tokens it holds; least recently used first out. Thread-safe."""

    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens
        self._items: OrderedDict[str, Plain] = OrderedDict()
        self._tokens = 0
        self._lock = threading.Lock()

    def get(self, text: str) -> Plain | None:
        with self._lock:
            found = self._items.get(text)
            if found is not None:
                self._items.move_to_end(text)
            return found

    def put(self, text: str, plain: Plain) -> None:
        if len(plain) > self.max_tokens:
            return
        with self._lock:
            if text in self._items:
                return
            self._items[text] = plain
            self._tokens += len(plain)
            while self._tokens > self.max_tokens:
                _, old = self._items.popitem(last=False)
                self._tokens -= len(old)


class TextTokenizer:
    """The narrow tokenizer interface the tasks use: counting, QA windows, single texts or pairs."""

    def __init__(self, backend, pad_token_id: int, token_types: bool, cache_tokens: int = 0):
        self._json = backend.to_str()
        self._configured: dict[tuple, object] = {}
        self._lock = threading.Lock()
        self.pad_token_id = pad_token_id
        self.token_types = token_types  # whether the model takes token_type_ids
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        processor = backend.post_processor
        self._specials = {
            pair: processor.num_special_tokens_to_add(pair) if processor is not None else 0
            for pair in (False, True)
        }
        self._cache = PlainCache(cache_tokens) if cache_tokens > 0 else None
        self._fast = self._checked_fast_path()
        self.template = self._pair_template()

    @classmethod
    def from_transformers(cls, tokenizer) -> TextTokenizer:
        """Wrap a transformers fast tokenizer (the build side reads sources through transformers)."""
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise ArtifactError(f"{type(tokenizer).__name__} is not a fast tokenizer (offsets need one)")
        return cls(
            backend,
            tokenizer.pad_token_id or 0,
            "token_type_ids" in getattr(tokenizer, "model_input_names", ["token_type_ids"]),
        )

    def spec(self) -> TokenizerSpec:
        cache_tokens = self._cache.max_tokens if self._cache is not None else 0
        return TokenizerSpec(self._json, self.pad_token_id, self.token_types, cache_tokens)

    @classmethod
    def from_spec(cls, spec: TokenizerSpec) -> TextTokenizer:
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_str(spec.json), spec.pad_token_id, spec.token_types, spec.cache_tokens)

    def num_special_tokens(self, pair: bool) -> int:
        return self._specials[pair]

    def _backend(self, max_length: int | None, stride: int = 0, strategy: str = "longest_first"):
        key = (max_length, stride, strategy)
        backend = self._configured.get(key)
        if backend is None:
            from tokenizers import Tokenizer

            backend = Tokenizer.from_str(self._json)
            backend.no_padding()
            if max_length is None:
                backend.no_truncation()
            else:
                backend.enable_truncation(max_length, stride=stride, strategy=strategy, direction="right")
            with self._lock:
                if len(self._configured) > 32:  # request options vary; keep the set of settings bounded
                    self._configured.clear()
                backend = self._configured.setdefault(key, backend)
        return backend

    def tokens(self, ids: list[int]) -> list[str]:
        """The token strings of `ids` (for logs and tests)."""
        backend = self._backend(None)
        return [backend.id_to_token(int(i)) for i in ids]

    def count(self, text: str) -> int:
        """Tokens in `text`, without special tokens."""
        return len(self._backend(None).encode(text, add_special_tokens=False).ids)

    def encode(self, text: str, text_pair: str | None = None, max_length: int | None = None) -> Encoded:
        """One text or pair, truncated longest-first to `max_length` (transformers' truncation=True)."""
        encoding = self._backend(max_length).encode(text, text_pair)
        return _encoded(encoding)

    def windows(self, question: str, context: str, max_length: int, stride: int) -> list[Encoded]:
        """(question, context) cut into windows that overlap by `stride` context tokens."""
        return self.windows_batch([(question, context)], max_length, stride)[0]

    def windows_batch(
        self, pairs: list[tuple[str, str]], max_length: int, stride: int
    ) -> list[list[Encoded]]:
        """Windows of many (question, context) pairs in one call (the library runs it without the GIL)."""
        encodings = self._backend(max_length, stride, "only_second").encode_batch(pairs)
        return [[_encoded(e) for e in [first, *first.overflowing]] for first in encodings]

    def count_batch(self, texts: list[str]) -> list[int]:
        return [len(ids) for ids in self.ids_batch(texts)]

    def ids_batch(self, texts: list[str]) -> list[np.ndarray]:
        """Each text's token ids without special tokens."""
        return self._encode_all(texts, lambda found: found[0], lambda e: np.asarray(e.ids, dtype=np.int64))

    @property
    def fast_path(self) -> bool:
        """Whether text is encoded by packer/runtime/wordpiece.py's fast path (BERT tokenizers)."""
        return self._fast is not None

    def _plains(self, texts: list[str]) -> list[Plain]:
        """Each text encoded alone: through the fast path where the tokenizer has one, the rest in one
        batched call of the library (which runs it without the GIL)."""
        return self._encode_all(texts, lambda found: _frozen(*found), _plain)

    def _encode_all(self, texts: list[str], from_fast, from_library) -> list:
        found = self._fast.plain_many(texts) if self._fast is not None else [None] * len(texts)
        rest = [t for t, f in zip(texts, found, strict=True) if f is None]
        encoded = iter(self._backend(None).encode_batch(rest, add_special_tokens=False) if rest else ())
        return [from_fast(f) if f is not None else from_library(next(encoded)) for f in found]

    def _library_plain(self, text: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        plain = _plain(self._backend(None).encode(text, add_special_tokens=False))
        return plain.ids, plain.offsets, plain.word_ids, plain.word_spans

    def _checked_fast_path(self) -> WordPieceFastPath | None:
        """The fast path, if this tokenizer has one and it encodes the check texts as the library does."""
        fast = WordPieceFastPath.from_json(self._json, self._library_plain)
        if fast is None:
            return None
        for text in FAST_PATH_CHECKS:
            mine = fast.plain(text)
            if mine is None or not all(map(np.array_equal, mine, self._library_plain(text))):
                return None
        return fast

    def plain_batch(self, texts: list[str], cached: bool = False) -> list[Plain]:
        """Each text encoded alone without special tokens; with `cached`, texts seen recently are not
        encoded again."""
        cache = self._cache if cached else None
        found = [cache.get(t) if cache else None for t in texts]
        missing = list(dict.fromkeys(t for t, f in zip(texts, found, strict=True) if f is None))
        fresh: dict[str, Plain] = {}
        if missing:  # all cached (the common case of many questions about one context): nothing to encode
            fresh = dict(zip(missing, self._plains(missing), strict=True))
        if cache:
            for text, plain in fresh.items():
                cache.put(text, plain)
        return [f if f is not None else fresh[t] for t, f in zip(texts, found, strict=True)]

    def _pair_template(self) -> PairTemplate | None:
        """The special tokens around a pair, read off the post-processor's output for a sample pair and
        checked by rebuilding that output; None (QA then encodes pairs whole) if it cannot be."""
        question, context = "Where is it?", "It is in the old town, by the river."
        encoded = self._backend(None).encode(question, context)
        seq = [-1 if s is None else s for s in encoded.sequence_ids]
        ids, types = np.asarray(encoded.ids, np.int64), np.asarray(encoded.type_ids, np.int64)
        if 0 not in seq or 1 not in seq:
            return None
        a0, a1 = seq.index(0), len(seq) - seq[::-1].index(0)
        b0, b1 = seq.index(1), len(seq) - seq[::-1].index(1)
        template = PairTemplate(
            prefix=ids[:a0],
            middle=ids[a1:b0],
            suffix=ids[b1:],
            prefix_types=types[:a0],
            middle_types=types[a1:b0],
            suffix_types=types[b1:],
            first_type=int(types[a0]),
            second_type=int(types[b0]),
        )
        q, c = self.ids_batch([question, context])
        rebuilt = np.concatenate([template.prefix, q, template.middle, c, template.suffix])
        rebuilt_types = np.concatenate(
            [
                template.prefix_types,
                np.full(len(q), template.first_type),
                template.middle_types,
                np.full(len(c), template.second_type),
                template.suffix_types,
            ]
        )
        specials = len(template.prefix) + len(template.middle) + len(template.suffix)
        if (
            not np.array_equal(rebuilt, ids)
            or not np.array_equal(rebuilt_types, types)
            or specials != self.num_special_tokens(pair=True)
        ):
            return None
        return template


def _encoded(encoding) -> Encoded:
    return Encoded(
        ids=encoding.ids,
        type_ids=encoding.type_ids,
        offsets=encoding.offsets,
        sequence_ids=encoding.sequence_ids,
        word_ids=encoding.word_ids,
    )


def _plain(encoding) -> Plain:
    offsets = np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2)
    words = np.array([-1 if w is None else w for w in encoding.word_ids], dtype=np.int64)
    return _frozen(np.asarray(encoding.ids, dtype=np.int64), offsets, words, word_spans(offsets, words))


def _frozen(ids: np.ndarray, offsets: np.ndarray, words: np.ndarray, spans: np.ndarray) -> Plain:
    plain = Plain(ids=ids, offsets=offsets, word_ids=words, word_spans=spans)
    for array in (plain.ids, plain.offsets, plain.word_ids, plain.word_spans):
        array.flags.writeable = False  # cached and shared by every request that sends this text
    return plain


def word_spans(offsets: np.ndarray, words: np.ndarray) -> np.ndarray:
    """Each token's word as a character span: the smallest start and largest end over the tokens of its
    word (as the tokenizer's pre-tokenizer splits); tokens of no word (-1) keep their own span."""
    spans = offsets.copy()
    tokens = np.flatnonzero(words >= 0)
    if not len(tokens):
        return spans
    w = words[tokens]
    change = np.empty(len(w), dtype=bool)
    change[0] = True
    np.not_equal(w[1:], w[:-1], out=change[1:])
    if (w[1:] >= w[:-1]).all():  # words in order (every tokenizer here): each word's tokens contiguous
        starts = np.flatnonzero(change)
        group = np.cumsum(change) - 1
        low = np.minimum.reduceat(offsets[tokens, 0], starts)
        high = np.maximum.reduceat(offsets[tokens, 1], starts)
    else:
        ids, group = np.unique(w, return_inverse=True)
        low = np.full(len(ids), np.iinfo(np.int64).max)
        high = np.full(len(ids), -1)
        np.minimum.at(low, group, offsets[tokens, 0])
        np.maximum.at(high, group, offsets[tokens, 1])
    spans[tokens, 0], spans[tokens, 1] = low[group], high[group]
    return spans


def _pad_token(path: Path, backend) -> int | None:
    """The pad token named in tokenizer_config.json or special_tokens_map.json, as an id."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        try:
            pad = json.loads((path / name).read_text()).get("pad_token")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(pad, dict):
            pad = pad.get("content")
        if isinstance(pad, str) and backend.token_to_id(pad) is not None:
            return backend.token_to_id(pad)
    return None


def load_tokenizer(path: str | Path, config: PackedConfig, cache_tokens: int = 0) -> TextTokenizer:
    """The artifact's tokenizer.json, read with the `tokenizers` library; `cache_tokens` bounds the cache
    of recent QA contexts (0: none)."""
    from tokenizers import Tokenizer

    file = Path(path) / TOKENIZER
    if not file.is_file():
        raise ArtifactError(
            f"{file}: missing; serving reads the fast tokenizer's {TOKENIZER} (pack the model again)"
        )
    try:
        backend = Tokenizer.from_file(str(file))
    except Exception as exc:
        raise ArtifactError(f"{file}: cannot be read as a tokenizer ({str(exc).splitlines()[0]})") from exc
    pad = _pad_token(Path(path), backend)
    pad_id = config.pad_token_id if pad is None else pad
    return TextTokenizer(backend, pad_id, config.uses_token_types, cache_tokens)
