"""A packed artifact in transformers: the packed model's logits with trust_remote_code, a refusal naming
the flag without it, and never a model with freshly initialised weights."""

from __future__ import annotations

import json

import pytest
import torch

import packer
from packer.artifact import CLASSIFICATION, QA
from packer.build.pack import PackOptions, pack
from packer.synth.checkpoints import PrunePlan, build_checkpoint
from tests.conftest import hf_model, max_diff, sample_inputs


def auto_class(task: str):
    from transformers import AutoModelForQuestionAnswering, AutoModelForSequenceClassification

    return AutoModelForQuestionAnswering if task == QA else AutoModelForSequenceClassification


def batches_for(loaded):
    c = loaded.config
    return sample_inputs(loaded.tokenizer, c.task, c.vocab_size, pad=c.pad_token_id)


@pytest.mark.parametrize(
    ("arch", "task"),
    [("bert", QA), ("roberta", CLASSIFICATION), ("electra", CLASSIFICATION), ("distilbert", QA)],
)
def test_trust_remote_code_gives_the_packed_logits(request, arch_artifact, arch, task):
    if arch == "bert":
        src, out = request.getfixturevalue("bert_qa_src"), request.getfixturevalue("bert_qa_packed")
    elif arch == "roberta":
        src, out = request.getfixturevalue("roberta_cls_src"), request.getfixturevalue("roberta_cls_packed")
    else:
        src, out = arch_artifact(arch, task)[:2]
    model = auto_class(task).from_pretrained(out, trust_remote_code=True).eval()
    assert type(model).__name__ == (
        "PruneServeForQuestionAnswering" if task == QA else "PruneServeForSequenceClassification"
    )
    loaded = packer.load(out)
    batches = batches_for(loaded)
    assert max_diff(model, loaded.model, batches) == 0.0
    assert max_diff(model, hf_model(src), batches) < 1e-5  # and so the source's function
    if task == CLASSIFICATION:
        assert model.config.id2label == loaded.config.id2label


def test_without_remote_code_loading_fails_and_says_how(bert_qa_packed, roberta_cls_packed):
    from transformers import AutoModel

    for out, task in ((bert_qa_packed, QA), (roberta_cls_packed, CLASSIFICATION)):
        for loader in (auto_class(task), AutoModel):
            with pytest.raises(ValueError, match="trust_remote_code=True"):
                loader.from_pretrained(out)
    config = json.loads((bert_qa_packed / "config.json").read_text())
    assert config["model_type"] == "prune_serve" and config["source_model_type"] == "bert"


def test_the_wrong_task_head_is_refused_not_initialised(bert_qa_packed):
    with pytest.raises(ValueError, match="PruneServeConfig"):
        auto_class(CLASSIFICATION).from_pretrained(bert_qa_packed, trust_remote_code=True)


def test_fp16_storage_loads_and_sparse_storage_is_refused_by_name(bert_qa_src, tmp_path):
    pack(str(bert_qa_src), tmp_path / "fp16", PackOptions(progress=False, dtype="fp16"))
    model = auto_class(QA).from_pretrained(tmp_path / "fp16", trust_remote_code=True, dtype=torch.float32)
    loaded = packer.load(tmp_path / "fp16")
    assert max_diff(model.eval(), loaded.model, batches_for(loaded)) < 1e-6

    # Prune-OFA style: 70% of the weights zero, stored as CSR tensors transformers cannot read.
    sparse_src = build_checkpoint(tmp_path / "sparse-src", plan=PrunePlan(unstructured=0.7), seed=3)
    pack(str(sparse_src), tmp_path / "sparse", PackOptions(progress=False, sparse_storage=True))
    with pytest.raises(ValueError, match=r"sparse-storage .* packer\.load"):
        auto_class(QA).from_pretrained(tmp_path / "sparse", trust_remote_code=True)
