"""Tokenization for serving, through the `tokenizers` library alone (no transformers, no torch).

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
from dataclasses import dataclass
from pathlib import Path

from packer.artifact import TOKENIZER, PackedConfig
from packer.errors import ArtifactError


@dataclass(frozen=True)
class Encoded:
    """One encoding (a whole text, or one window of a long one)."""

    ids: list[int]
    type_ids: list[int]
    offsets: list[tuple[int, int]]
    sequence_ids: list[int | None]
    word_ids: list[int | None]


class TextTokenizer:
    """The narrow tokenizer interface the tasks use: counting, QA windows, single texts or pairs."""

    def __init__(self, backend, pad_token_id: int, token_types: bool):
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
        return [len(e.ids) for e in self._backend(None).encode_batch(texts, add_special_tokens=False)]


def _encoded(encoding) -> Encoded:
    return Encoded(
        ids=encoding.ids,
        type_ids=encoding.type_ids,
        offsets=encoding.offsets,
        sequence_ids=encoding.sequence_ids,
        word_ids=encoding.word_ids,
    )


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


def load_tokenizer(path: str | Path, config: PackedConfig) -> TextTokenizer:
    """The artifact's tokenizer.json, read with the `tokenizers` library."""
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
    return TextTokenizer(backend, config.pad_token_id if pad is None else pad, config.uses_token_types)
