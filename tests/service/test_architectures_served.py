"""Every added architecture served by a real prune-serve (ONNX Runtime) and evaluated, answering as
transformers' own class does on the unpacked source."""

from __future__ import annotations

import json
import shutil

import httpx
import numpy as np
import pytest
import torch

from packer.artifact import CLASSIFICATION, QA
from packer.cli import main
from packer.runtime.samples import SENTENCES
from tests.conftest import MORE_ARCHS, hf_model
from tests.evaluate.test_evaluate import squad_file
from tests.serving import Server


@pytest.fixture(scope="module")
def served(arch_artifact, tmp_path_factory):
    root = tmp_path_factory.mktemp("arch-served")
    for arch in MORE_ARCHS:
        for task, short in ((QA, "qa"), (CLASSIFICATION, "cls")):
            shutil.copytree(arch_artifact(arch, task)[1], root / "models" / f"{arch}-{short}")
    server = Server(root / "models", root / "serve.log", variant="onnx")
    yield server
    server.stop()


def transformers_scores(src, text: str) -> dict[str, float]:
    from transformers import AutoTokenizer

    model, tokenizer = hf_model(src), AutoTokenizer.from_pretrained(str(src))
    with torch.inference_mode():
        logits = model(**tokenizer(text, return_tensors="pt")).logits[0].double().numpy()
    probs = np.exp(logits - logits.max())
    return {model.config.id2label[i]: float(p) for i, p in enumerate(probs / probs.sum())}


def test_models_are_listed_with_their_architecture(served):
    models = {m["name"]: m for m in httpx.get(served.url + "/v1/models", timeout=10).json()["models"]}
    assert set(models) == {f"{a}-{t}" for a in MORE_ARCHS for t in ("qa", "cls")}
    assert {m["variant"] for m in models.values()} == {"onnx"}


@pytest.mark.parametrize("arch", MORE_ARCHS)
def test_classification_scores_equal_transformers(served, arch_artifact, arch):
    src = arch_artifact(arch, CLASSIFICATION)[0]
    r = httpx.post(
        served.url + f"/v1/models/{arch}-cls/classify",
        json={"items": [{"text": t} for t in SENTENCES[:3]], "return_all_scores": True},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    for text, result in zip(SENTENCES[:3], r.json()["results"], strict=True):
        expected = transformers_scores(src, text)
        assert set(result["scores"]) == set(expected)
        for label, p in expected.items():
            assert result["scores"][label] == pytest.approx(p, abs=1e-4)


@pytest.mark.parametrize("arch", MORE_ARCHS)
def test_qa_over_http_answers_as_transformers_does(served, arch_artifact, arch, tmp_path, capsys):
    """`eval squad2 --url` (the service) and `--source` (transformers' class on the unpacked checkpoint)
    give the same answers, question by question, with windows of 64 tokens and stride 16."""
    src = arch_artifact(arch, QA)[0]
    data = squad_file(tmp_path, 12)
    common = ["eval", "squad2", "-q", "--data", str(data), "--max-seq-len", "64", "--doc-stride", "16"]
    predictions = {}
    for name, target in (
        ("url", ["--url", served.url, "--model", f"{arch}-qa"]),
        ("source", ["--source", str(src)]),
    ):
        out = tmp_path / f"{name}.json"
        assert main([*common, *target, "--save-predictions", str(out)]) == 0, capsys.readouterr().err
        predictions[name] = json.loads(out.read_text())
    assert len(predictions["url"]) == 12
    assert predictions["url"] == predictions["source"]


@pytest.mark.parametrize("arch", MORE_ARCHS)
def test_inspect_reads_each_architecture(arch_artifact, arch, capsys):
    src, out, _ = arch_artifact(arch, QA)
    assert main(["inspect", "-q", str(src)]) == 0
    table = capsys.readouterr().out
    assert table.startswith(f"{arch} question-answering") and "uniform heads kept [1]" in table
    assert "9/16" in table
    assert main(["inspect", "-q", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["arch"] == arch
