"""The engine in process, without HTTP: which model is wired to the batcher with what limits, domain
errors, and how a reload swaps one model while the others keep serving."""

from __future__ import annotations

import asyncio
import json
import shutil
import time

import pytest

from packer.artifact import QA
from packer.runtime.tasks import qa
from service.batching import WorkItem, new_flow
from service.engine import Engine
from service.errors import BadRequest, ModelNotFound, ModelUnavailable
from service.metrics import Metrics
from service.settings import Settings


@pytest.fixture()
def engine(models_dir, tmp_path):
    served = tmp_path / "models"
    for name in ("qa", "qa-torch", "cls"):
        shutil.copytree(models_dir / name, served / name)
    engine = Engine(Settings(models_dir=served, device="cpu", threads=1), Metrics())
    engine.start()
    yield engine
    engine.stop()


def ask(engine: Engine, name: str) -> dict:
    """One question through the engine's batcher: windows in, logits out, as the handlers do."""
    model = engine.model(name, QA)
    options = qa.QAOptions(max_seq_len=model.default_max_seq_len, doc_stride=16)
    windows = qa.make_windows(model.tokenizer, "When did it open?", "The bridge opened in 1883.", options)
    flow = new_flow()
    deadline = time.monotonic() + 30
    items = [WorkItem(w.input_ids, w.attention_mask, w.token_type_ids, deadline, flow) for w in windows]
    engine.batcher.submit(model.key, items)
    return {k: v.tolist() for k, v in items[0].future.result(timeout=30).items()}


def test_each_model_is_registered_with_its_own_limits(engine):
    int8, torch_qa, cls = engine.model("qa"), engine.model("qa-torch"), engine.model("cls")
    assert (int8.variant, torch_qa.variant, cls.variant) == ("onnx-int8", "torch", "onnx")
    assert engine.limits_for(int8).max_batch_size == 1  # per-window int8: batches of one
    assert engine.limits_for(torch_qa).max_batch_size == engine.settings.max_batch_size
    assert {engine.limits_for(m).max_batch_tokens for m in (int8, torch_qa, cls)} == {1024}
    assert engine.is_ready and [m["name"] for m in engine.describe()] == ["cls", "qa", "qa-torch"]
    assert ask(engine, "qa")["start_logits"] and ask(engine, "qa-torch")["start_logits"]


def test_lookups_raise_domain_errors_with_what_to_do(engine):
    with pytest.raises(ModelNotFound, match="GET /v1/models"):
        engine.model("nope")
    with pytest.raises(BadRequest, match="/v1/models/cls/classify"):
        engine.model("cls", QA)


def test_reload_swaps_a_changed_model_and_leaves_the_others(engine):
    before = {name: m.key for name, m in engine.models.items()}
    old = engine.model("qa-torch")
    manifest = engine.settings.models_dir / "qa-torch" / "pack.json"
    manifest.write_text(json.dumps(json.loads(manifest.read_text()), indent=1))  # same content, new file
    result = asyncio.run(engine.reload())
    assert result.loaded == ["qa-torch"] and sorted(result.unchanged) == ["cls", "qa"]
    assert engine.model("qa-torch").key != before["qa-torch"]
    assert {n: engine.models[n].key for n in ("qa", "cls")} == {n: before[n] for n in ("qa", "cls")}
    assert ask(engine, "qa-torch")["start_logits"]  # the new load serves
    with pytest.raises(ModelUnavailable):  # the old load drained and left the batcher
        engine.batcher.submit(old.key, [])


def test_reload_keeps_serving_a_model_whose_new_files_are_broken(engine):
    key = engine.model("cls").key
    (engine.settings.models_dir / "cls" / "model.onnx").write_bytes(b"broken")
    result = asyncio.run(engine.reload())
    assert "cls" in result.failed and engine.model("cls").key == key
