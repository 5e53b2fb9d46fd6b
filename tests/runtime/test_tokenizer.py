"""Serving tokenizes with the `tokenizers` library alone: the same windows, offsets, sequence ids and
word ids as transformers' fast tokenizer gives for the same artifact (the reference it replaces)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from packer.artifact import read_packed_config
from packer.runtime.tasks import classify, qa
from packer.runtime.tokenizer import load_tokenizer
from tests.conftest import SHARED_DATA

QUESTION = "When did the Brooklyn Bridge open, and who designed it?"
CONTEXT = (
    "The Brooklyn Bridge opened on May 24, 1883. John A. Roebling designed it; his son Washington "
    "Roebling and Emily Warren Roebling finished it. Café owners in Zürich, Kraków and São Paulo "
    "wrote about it, as did newspapers in 東京 and Moscow (Москва). "
) * 6 + "Its main span is 1,595.5 feet (486.3 m) long — the longest in the world until 1903. 🌉"
NFD = "The cafe\u0301 opened in Malmo\u0308 in 1901; its owner was Jose\u0301 Nun\u0303ez."
TEXTS = ["a fine film", "Not good at all!!", "It's the café's best crêpe, 10/10 — très bien.", "x" * 600]


def hf_windows(hf, question: str, context: str, max_len: int, stride: int) -> list[dict]:
    """What serving computed with transformers before (packer/runtime/tasks/qa.py, earlier version)."""
    enc = hf(
        question,
        context,
        truncation="only_second",
        max_length=max_len,
        stride=stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        padding=False,
    )
    return [
        {
            "ids": list(ids),
            "type_ids": list(enc["token_type_ids"][i]) if "token_type_ids" in enc else None,
            "offsets": [tuple(o) for o in enc["offset_mapping"][i]],
            "sequence_ids": enc.sequence_ids(i),
            "word_ids": enc.word_ids(i),
        }
        for i, ids in enumerate(enc["input_ids"])
    ]


def as_spans(array) -> list:
    return [tuple(row) if row[0] >= 0 else None for row in array.tolist()]


def dict_word_spans(offsets, word_ids) -> list:
    """The per-token loop the numpy version replaced: each context token gets its word's full span."""
    spans = {}
    for off, word in zip(offsets, word_ids, strict=True):
        if off is not None and word is not None:
            start, end = spans.get(word, off)
            spans[word] = (min(start, off[0]), max(end, off[1]))
    return [
        spans[w] if o is not None and w is not None else o for o, w in zip(offsets, word_ids, strict=True)
    ]


def artifacts(request) -> list[Path]:
    paths = [request.getfixturevalue("bert_qa_packed"), request.getfixturevalue("roberta_cls_packed")]
    # SentencePiece (XLM-RoBERTa) and a WordPiece model without token types (DistilBERT)
    arch_artifact = request.getfixturevalue("arch_artifact")
    paths += [arch_artifact("xlm-roberta", "qa")[1], arch_artifact("distilbert", "qa")[1]]
    real = SHARED_DATA / "models" / "minilm-l6-squad2"
    if real.is_dir():
        paths.append(real)  # a real uncased WordPiece tokenizer (its checkpoint holds tokenizer.json)
    return paths


def pair_tokenizers(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path)), load_tokenizer(path, config_of(path))


def config_of(path: Path):
    """The artifact's packed config, or for an unpacked checkpoint one with its token-type rule."""
    config = read_packed_config(path) if (path / "pack.json").is_file() else None
    if config is None:  # an unpacked checkpoint: the packed config's token-type rule from config.json
        import json

        from packer.artifact import PackedConfig

        raw = json.loads((path / "config.json").read_text())
        config = PackedConfig(
            arch=raw["model_type"],
            task="question-answering",
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            max_position_embeddings=raw["max_position_embeddings"],
            type_vocab_size=raw.get("type_vocab_size", 2),
            layer_norm_eps=1e-12,
            hidden_act="gelu",
            pad_token_id=raw.get("pad_token_id", 0),
            head_dim=64,
            num_heads=[],
            intermediate_sizes=[],
        )
    return config


@pytest.mark.parametrize(("max_len", "stride"), [(384, 128), (64, 16), (48, 20)])
def test_windows_equal_transformers(request, max_len, stride):
    for path in artifacts(request):
        hf, ours = pair_tokenizers(path)
        for question, context in [(QUESTION, CONTEXT), ("Who owned it?", NFD), ("Why?", "Because.")]:
            room = max_len - len(hf(question, add_special_tokens=False)["input_ids"]) - 3
            if stride >= room:  # the tokenizers library panics here; make_windows refuses it first
                with pytest.raises(qa.QAInputError, match="doc_stride"):
                    qa.make_windows(
                        ours, question, context, qa.QAOptions(max_seq_len=max_len, doc_stride=stride)
                    )
                continue
            expected = hf_windows(hf, question, context, max_len, stride)
            got = ours.windows(question, context, max_len, stride)
            assert len(got) == len(expected), path
            assert len(expected) > 1 or len(context) < 200
            for want, have in zip(expected, got, strict=True):
                assert have.ids == want["ids"]
                assert [tuple(o) for o in have.offsets] == want["offsets"]
                assert have.sequence_ids == want["sequence_ids"]
                assert have.word_ids == want["word_ids"]
                assert (have.type_ids if ours.token_types else None) == want["type_ids"], path
            assert ours.count(question) == len(hf(question, add_special_tokens=False)["input_ids"])
            assert ours.num_special_tokens(pair=True) == hf.num_special_tokens_to_add(pair=True)
        assert ours.pad_token_id == hf.pad_token_id


def test_qa_windows_and_encodings_equal_transformers(request):
    """The tasks' own structures (what the batcher and the answer code see) match the reference."""
    for path in artifacts(request):
        hf, ours = pair_tokenizers(path)
        options = qa.QAOptions(max_seq_len=96, doc_stride=32)
        windows = qa.make_windows(ours, QUESTION, CONTEXT, options)
        expected = hf_windows(hf, QUESTION, CONTEXT, 96, 32)
        assert [w.input_ids.tolist() for w in windows] == [e["ids"] for e in expected]
        for w, e in zip(windows, expected, strict=True):
            offsets = [o if s == 1 else None for o, s in zip(e["offsets"], e["sequence_ids"], strict=True)]
            assert as_spans(w.offsets) == offsets
            assert as_spans(w.word_spans) == dict_word_spans(offsets, e["word_ids"])
        for text in TEXTS:
            for pair in (None, "a second sentence"):
                enc = classify.encode(ours, text, pair, 128)
                want = hf(text, pair, truncation=True, max_length=128, padding=False)
                assert enc.input_ids.tolist() == want["input_ids"]
                got_types = None if enc.token_type_ids is None else enc.token_type_ids.tolist()
                assert got_types == want.get("token_type_ids")


def test_threads_tokenizing_with_different_settings_do_not_mix(bert_qa_packed):
    """Each truncation setting has its own configured copy: concurrent calls keep their own settings."""
    _, ours = pair_tokenizers(bert_qa_packed)
    settings = [(384, 128), (64, 16), (48, 20), (128, 40)] * 25
    expected = {s: ours.windows(QUESTION, CONTEXT, *s) for s in set(settings)}
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda s: (s, ours.windows(QUESTION, CONTEXT, *s)), settings))
    for s, windows in results:
        assert [w.ids for w in windows] == [w.ids for w in expected[s]]


def test_missing_or_broken_tokenizer_json_names_the_file(bert_qa_packed, tmp_path):
    import shutil

    from packer.errors import ArtifactError

    copy = tmp_path / "a"
    shutil.copytree(bert_qa_packed, copy)
    config = read_packed_config(copy)
    (copy / "tokenizer.json").write_text("{not json")
    with pytest.raises(ArtifactError, match=r"tokenizer\.json: cannot be read as a tokenizer"):
        load_tokenizer(copy, config)
    (copy / "tokenizer.json").unlink()
    with pytest.raises(ArtifactError, match=r"tokenizer\.json: missing"):
        load_tokenizer(copy, config)


def windows_as_lists(windows) -> list[tuple]:
    return [
        (
            w.input_ids.tolist(),
            None if w.token_type_ids is None else w.token_type_ids.tolist(),
            w.offsets.tolist(),
            w.word_spans.tolist(),
            w.context_start,
            w.context_end,
        )
        for w in windows
    ]


def test_windows_assembled_from_a_template_equal_pairs_encoded_whole(request):
    """QA encodes questions and contexts alone (contexts cached) and assembles windows with the
    post-processor's template: the same windows as the library's own pair truncation with stride, for
    every tokenizer family, at window edges (a context that exactly fills the room, one token over,
    one token), with NFD marks and non-ASCII text; an empty context is refused by both."""
    for path in artifacts(request):
        config = config_of(path)
        assembled = load_tokenizer(path, config, cache_tokens=100_000)
        whole = load_tokenizer(path, config)
        whole.template = None  # what a tokenizer without a readable template falls back to
        assert assembled.template is not None, path
        room = 64 - assembled.count(QUESTION) - assembled.num_special_tokens(pair=True)
        words = CONTEXT.split()
        fitting = next(
            " ".join(words[:k])
            for k in range(len(words), 0, -1)
            if assembled.count(" ".join(words[:k])) <= room
        )
        contexts = [CONTEXT, NFD, fitting, fitting + " more words here", "Because.", CONTEXT[:700]]
        pairs = [(QUESTION, c) for c in contexts] + [("Who owned it?", NFD), ("Why?", CONTEXT)]
        for max_len, stride in [(384, 128), (64, 16), (64, 20), (96, 32)]:
            options = qa.QAOptions(max_seq_len=max_len, doc_stride=stride)
            for _ in range(2):  # the second time every context comes from the cache
                got = qa.make_windows_batch(assembled, pairs, options)
                want = qa.make_windows_batch(whole, pairs, options)
                assert [windows_as_lists(g) for g in got] == [windows_as_lists(w) for w in want], path
        for tokenizer in (assembled, whole):
            with pytest.raises(qa.QAInputError, match="context is empty"):
                qa.make_windows_batch(tokenizer, [(QUESTION, "")], qa.QAOptions())


def test_the_context_cache_is_bounded_by_tokens_and_keeps_the_recent(bert_qa_packed):
    from packer.runtime.tokenizer import PlainCache

    ours = load_tokenizer(bert_qa_packed, read_packed_config(bert_qa_packed))
    a, b, c = ours.plain_batch(["one two three", "four five six", "seven eight nine ten eleven"])
    cache = PlainCache(max_tokens=len(a) + len(b) + len(c) - 1)  # room for two of the three
    cache.put("a", a)
    cache.put("b", b)
    assert cache.get("a") is a  # now the most recent
    cache.put("c", c)  # over the bound: the least recently used ("b") goes first
    assert cache.get("b") is None and cache.get("a") is a and cache.get("c") is c
    assert cache._tokens <= cache.max_tokens
    cache.put("huge", ours.plain_batch([CONTEXT])[0])  # bigger than the whole cache: never held
    assert cache.get("huge") is None
