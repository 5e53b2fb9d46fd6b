"""The packer on the real fine-tuned models in ../shared/data, with real SQuAD v2 / SST-2 text."""

import csv
import json

import pytest
import torch

import packer
from packer.build.pack import PackOptions, pack
from tests.conftest import SHARED_DATA, gate_hooks, hf_model, max_diff, token_batch

QA_MODEL = SHARED_DATA / "models" / "minilm-l6-squad2"
SST_MODEL = SHARED_DATA / "models" / "minilm-l6-sst2"
pytestmark = pytest.mark.skipif(
    not QA_MODEL.is_dir(),
    reason=f"real models not present at {SHARED_DATA}/models (see shared/data/SOURCES.md)",
)


def weakest_gates(layers: int, heads: int, ffn: int, seed: int) -> dict:
    """A deterministic gate pattern: 5 of 12 heads and 70% of FFN dims off in every other layer."""
    gen = torch.Generator().manual_seed(seed)
    masks = {"heads": {}, "ffn": {}}
    for layer in range(0, layers, 2):
        head_gates = [1] * heads
        for h in torch.randperm(heads, generator=gen)[:5].tolist():
            head_gates[h] = 0
        ffn_gates = (torch.rand(ffn, generator=gen) > 0.7).long().tolist()
        masks["heads"][str(layer)] = head_gates
        masks["ffn"][str(layer)] = ffn_gates
    return masks


def squad_heldout_pairs(n: int) -> list[tuple[str, str]]:
    data = json.loads((SHARED_DATA / "squad_v2" / "dev-v2.0.json").read_text())
    held_out = set(json.loads((QA_MODEL / "training.json").read_text())["held_out_v2_dev_articles"])
    pairs = []
    for article in data["data"]:
        if article["title"] in held_out:
            for paragraph in article["paragraphs"]:
                pairs.append((paragraph["qas"][0]["question"], paragraph["context"]))
    return pairs[:n]


def pack_gated(src, tmp_path, seed: int):
    """Pack a real model with gates; return it and transformers' own model with the same gates hooked in."""
    masks = weakest_gates(6, 12, 1536, seed=seed)
    (tmp_path / "masks.json").write_text(json.dumps(masks))
    out = tmp_path / src.name
    manifest = pack(str(src), out, PackOptions(masks=str(tmp_path / "masks.json"), progress=False))
    assert manifest["structure"]["heads_after"] == 72 - 15
    reference = hf_model(src)
    gate_hooks(reference, masks, head_dim=32)
    return packer.load(out), reference


def test_gated_real_qa_model_packs_exactly(tmp_path):
    loaded, reference = pack_gated(QA_MODEL, tmp_path, seed=0)
    questions, contexts = zip(*squad_heldout_pairs(8), strict=True)
    enc = token_batch(loaded.tokenizer, list(questions), list(contexts), max_length=384)
    assert max_diff(reference, loaded.model, [enc]) < 1e-4


def test_gated_real_classifier_packs_exactly(tmp_path):
    loaded, reference = pack_gated(SST_MODEL, tmp_path, seed=1)
    assert loaded.config.id2label == {0: "negative", 1: "positive"}
    with open(SHARED_DATA / "sst2" / "dev.tsv") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))[600:632]  # the held-out rows
    enc = token_batch(loaded.tokenizer, [r["sentence"] for r in rows])
    assert max_diff(reference, loaded.model, [enc]) < 1e-4


def test_served_answers_equal_the_reference_predictions(tmp_path):
    """QA through the real HTTP service against predictions made with transformers and standard
    post-processing (windows 256/96, no word alignment: `reference_predictions_heldout.json`)."""
    import httpx

    from tests.serving import Server

    reference = json.loads((QA_MODEL / "reference_predictions_heldout.json").read_text())
    data = json.loads((SHARED_DATA / "squad_v2" / "dev-v2.0.json").read_text())
    questions = [
        (qa["id"], qa["question"], p["context"])
        for article in data["data"]
        for p in article["paragraphs"]
        for qa in p["qas"]
        if qa["id"] in reference
    ][:120]
    pack(str(QA_MODEL), tmp_path / "models" / "minilm", PackOptions(progress=False))
    srv = Server(tmp_path / "models", tmp_path / "serve.log", variant="torch")
    try:
        got = {}
        with httpx.Client(base_url=srv.url, timeout=60) as http:
            for qid, question, context in questions:
                body = {
                    "question": question,
                    "context": context,
                    "max_seq_len": 256,
                    "doc_stride": 96,
                    "align_to_words": False,
                }
                result = http.post("/v1/models/minilm/qa", json=body).json()["results"][0]
                got[qid] = "" if result["is_impossible"] else result["answers"][0]["answer"]
    finally:
        srv.stop()
    wrong = {qid: (got[qid], reference[qid]) for qid in got if got[qid] != reference[qid]}
    assert not wrong, f"{len(wrong)} of {len(got)} differ: {list(wrong.items())[:5]}"
    assert sum(1 for v in got.values() if v) > 30  # answers, not only abstentions
