"""Sentence-pair classification (MNLI-style, 3 labels) through /classify and the HF route, against
transformers' own model on the same pairs."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import torch

from packer.artifact import CLASSIFICATION
from packer.build.pack import PackOptions, pack
from packer.synth.checkpoints import build_checkpoint
from tests.conftest import every_case_plan, hf_model
from tests.serving import Server

PAIRS = [
    ("A man is playing a guitar on stage.", "Someone is making music."),
    ("The bridge opened in 1883.", "The bridge is still being built."),
    ("Two dogs run in the snow.", "Animals are outside."),
]


@pytest.fixture(scope="module")
def nli(tmp_path_factory):
    root = tmp_path_factory.mktemp("nli")
    src = build_checkpoint(root / "src", task=CLASSIFICATION, plan=every_case_plan(), num_labels=3, seed=3)
    pack(str(src), root / "models" / "nli", PackOptions(progress=False, onnx=True))
    return src, root / "models"


def reference_scores(src, premise: str, hypothesis: str) -> dict[str, float]:
    from transformers import AutoTokenizer

    model, tokenizer = hf_model(src), AutoTokenizer.from_pretrained(str(src))
    with torch.inference_mode():
        logits = model(**tokenizer(premise, hypothesis, return_tensors="pt")).logits[0].double().numpy()
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    return {model.config.id2label[i]: float(p) for i, p in enumerate(probs)}


def test_pairs_are_classified_as_transformers_does(nli, tmp_path):
    src, models = nli
    server = Server(models, tmp_path / "server.log", variant="onnx")
    try:
        info = httpx.get(server.url + "/v1/models", timeout=10).json()["models"][0]
        assert info["labels"] == ["negative", "positive", "neutral"]
        items = [{"text": p, "text_pair": h} for p, h in PAIRS]
        r = httpx.post(
            server.url + "/v1/models/nli/classify",
            json={"items": items, "return_all_scores": True},
            timeout=30,
        )
        assert r.status_code == 200, r.text
        hf = httpx.post(server.url + "/models/nli", json={"inputs": items}, timeout=30)
        assert hf.status_code == 200, hf.text
        for (premise, hypothesis), result, ranked in zip(PAIRS, r.json()["results"], hf.json(), strict=True):
            expected = reference_scores(src, premise, hypothesis)
            assert set(result["scores"]) == set(expected)
            for label, p in expected.items():
                assert result["scores"][label] == pytest.approx(p, abs=1e-4)
            assert result["label"] == max(expected, key=expected.get)
            assert [x["label"] for x in ranked] == sorted(expected, key=expected.get, reverse=True)
        # the pair matters: the same premise with another hypothesis scores differently
        alone = httpx.post(server.url + "/v1/models/nli/classify", json={"text": PAIRS[0][0]}, timeout=30)
        assert alone.json()["results"][0]["score"] != r.json()["results"][0]["score"]
    finally:
        server.stop()
