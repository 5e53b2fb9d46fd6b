"""The WordPiece fast path (packer/runtime/wordpiece.py) encodes exactly as the `tokenizers` library:
ids, offsets, word ids and word spans, text by text and joined in batches, on real SQuAD text and on
random text built to hit every boundary the path relies on."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from packer.runtime import tokenizer as tokenizer_module
from packer.runtime import wordpiece
from packer.runtime.tokenizer import load_tokenizer
from tests.conftest import SHARED_DATA
from tests.runtime.test_tokenizer import config_of

REAL = SHARED_DATA / "models" / "minilm-l6-squad2"
DEV = SHARED_DATA / "squad_v2" / "dev-v2.0.json"

# Pieces of text at the edges of the fast path: accents precomposed and decomposed, CJK, Cyrillic,
# Unicode spaces, a character lowercasing to ASCII (Kelvin sign) or to two characters (dotted I),
# control characters (dropped by the normalizer), a non-ASCII character decomposing to ASCII
# punctuation (Greek question mark), added tokens whole and in part, over-long words.
ALPHABET = [*"abcXYZ019 ,.;'-\t\n\r", "é", "e\u0301", "ü", "東", "京", "Москва", "\u00a0", "\u212a", "İ"]
ALPHABET += ["\x01", "\x0b", "\x7f", "\u037e", "ß", "Σ", "ς", "\u200b", "\ufeff", "🌉", "ﬁ", "Ｋ", "\u3000"]
ALPHABET += ["[SEP]", "[", "]", "##", "a" * 120, "\u0300", "\ufffd", "\x00", "hyperparameterization"]


def same(tok, text: str, got) -> bool:
    return all(map(np.array_equal, got, tok._library_plain(text)))


def random_texts(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 40))) for _ in range(count)]


@pytest.fixture(scope="module")
def bert_tokenizer(bert_qa_packed):
    tok = load_tokenizer(bert_qa_packed, config_of(bert_qa_packed))
    assert tok.fast_path, "a BERT WordPiece tokenizer gets the fast path"
    return tok


# BertNormalizer's options as BERT-family checkpoints set them: cased, accents stripped or kept,
# control characters kept, CJK not split.
NORMALIZERS = [
    {},
    {"lowercase": False},
    {"strip_accents": True},
    {"lowercase": False, "strip_accents": False},
    {"clean_text": False},
    {"handle_chinese_chars": False},
]


@pytest.mark.parametrize("normalizer", NORMALIZERS, ids=lambda n: ",".join(f"{k}={v}" for k, v in n.items()))
def test_random_text_encodes_as_the_library(bert_tokenizer, normalizer):
    from tokenizers import Tokenizer

    from packer.runtime.tokenizer import TextTokenizer

    spec = json.loads(bert_tokenizer._json)
    spec["normalizer"].update(normalizer)
    tok = TextTokenizer(Tokenizer.from_str(json.dumps(spec)), 0, True)
    assert tok.fast_path
    texts = random_texts(1500 if normalizer else 4000)
    answered = [(t, tok._fast.plain(t)) for t in texts]
    handled = [(t, got) for t, got in answered if got is not None]
    assert len(handled) > len(texts) / 3  # texts with "[SEP]" or a dotted I go to the library whole
    assert all(same(tok, t, got) for t, got in handled)
    for i in range(0, 600, 6):  # joined in batches of 1-9 and cut apart again
        group = texts[i : i + 1 + i % 9]
        for t, got in zip(group, tok._fast.plain_many(group), strict=True):
            assert got is None or same(tok, t, got), repr(t)


def test_the_tasks_tokenizer_gives_the_library_encodings_for_all_texts(bert_tokenizer):
    """What QA reads (plain_batch, ids_batch) equals the library whatever path each text took."""
    texts = [*random_texts(300, seed=1), "", "[SEP] inside", "İstanbul"]
    plains = bert_tokenizer.plain_batch(texts)
    for text, plain in zip(texts, plains, strict=True):
        assert same(bert_tokenizer, text, (plain.ids, plain.offsets, plain.word_ids, plain.word_spans))
        assert not plain.ids.flags.writeable  # shared through the context cache
    for text, ids in zip(texts, bert_tokenizer.ids_batch(texts), strict=True):
        assert np.array_equal(ids, bert_tokenizer._library_plain(text)[0])


def test_other_tokenizers_have_no_fast_path(request, bert_tokenizer):
    roberta = request.getfixturevalue("roberta_cls_packed")
    assert not load_tokenizer(roberta, config_of(roberta)).fast_path  # byte-level BPE
    spec = json.loads(bert_tokenizer._json)
    spec["pre_tokenizer"] = {"type": "Whitespace"}
    assert wordpiece.WordPieceFastPath.from_json(json.dumps(spec), bert_tokenizer._library_plain) is None


def test_a_fast_path_that_disagrees_with_the_library_is_not_used(bert_qa_packed, monkeypatch):
    real_plain = wordpiece.WordPieceFastPath.plain

    def off_by_one(self, text):
        got = real_plain(self, text)
        return None if got is None else (got[0], got[1] + 1, got[2], got[3])

    monkeypatch.setattr(wordpiece.WordPieceFastPath, "plain", off_by_one)
    tok = load_tokenizer(bert_qa_packed, config_of(bert_qa_packed))
    assert not tok.fast_path
    text = tokenizer_module.FAST_PATH_CHECKS[2]
    plain = tok.plain_batch([text])[0]
    assert same(tok, text, (plain.ids, plain.offsets, plain.word_ids, plain.word_spans))


@pytest.mark.skipif(not (REAL.is_dir() and DEV.is_file()), reason="../shared/data (MiniLM, SQuAD v2) absent")
def test_every_squad_v2_dev_text_encodes_as_the_library():
    """A real uncased BERT vocabulary on every dev paragraph and question: equal, and nearly all of
    them on the fast path."""
    tok = load_tokenizer(REAL, config_of(REAL))
    assert tok.fast_path
    squad = json.loads(DEV.read_text())["data"]
    paragraphs = [p for article in squad for p in article["paragraphs"]]
    texts = [p["context"] for p in paragraphs] + [q["question"] for p in paragraphs for q in p["qas"]]
    answered = [(t, tok._fast.plain(t)) for t in texts]
    handled = [(t, got) for t, got in answered if got is not None]
    assert len(handled) > 0.99 * len(texts)
    mismatched = [t[:60] for t, got in handled if not same(tok, t, got)]
    assert not mismatched
