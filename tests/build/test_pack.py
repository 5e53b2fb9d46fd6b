import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import packer
from packer.artifact import sha256_file
from packer.build.pack import PackOptions, pack
from tests.conftest import EXPECTED_FFN, EXPECTED_HEADS, expected_params, hf_model, max_diff, sample_inputs


def test_bert_qa_packed_equals_source(bert_qa_src, bert_qa_packed):
    loaded = packer.load(bert_qa_packed)
    assert loaded.config.num_heads == EXPECTED_HEADS
    assert loaded.config.intermediate_sizes == EXPECTED_FFN
    batches = sample_inputs(loaded.tokenizer, loaded.config.task, loaded.config.vocab_size, 0)
    assert max_diff(hf_model(bert_qa_src), loaded.model, batches) < 1e-5


def test_roberta_classification_from_bin_equals_source(roberta_cls_src, roberta_cls_packed):
    loaded = packer.load(roberta_cls_packed)
    assert loaded.config.arch == "roberta"
    assert loaded.config.num_labels == 3
    batches = sample_inputs(loaded.tokenizer, loaded.config.task, loaded.config.vocab_size, pad=1)
    assert max_diff(hf_model(roberta_cls_src), loaded.model, batches) < 1e-5


def test_eager_attention_path_equals_sdpa(bert_qa_src, bert_qa_packed):
    loaded = packer.load(bert_qa_packed)
    batches = sample_inputs(loaded.tokenizer, loaded.config.task, loaded.config.vocab_size, 0)
    reference = hf_model(bert_qa_src)
    loaded.model.set_attention_implementation("eager")
    assert max_diff(reference, loaded.model, batches) < 1e-5


def test_parameter_counts_are_exact(bert_qa_packed, roberta_cls_packed):
    bert = packer.load(bert_qa_packed)
    c = bert.config
    assert sum(p.numel() for p in bert.model.parameters()) == expected_params(
        c.task, c.vocab_size, c.max_position_embeddings, c.type_vocab_size
    )
    assert bert.manifest["params"]["after"] == expected_params(
        c.task, c.vocab_size, c.max_position_embeddings, c.type_vocab_size
    )
    roberta = packer.load(roberta_cls_packed)
    c = roberta.config
    assert sum(p.numel() for p in roberta.model.parameters()) == expected_params(
        c.task, c.vocab_size, c.max_position_embeddings, c.type_vocab_size, num_labels=3
    )


def test_layer_without_heads_or_ffn_is_bias_only(bert_qa_packed):
    state = load_file(str(bert_qa_packed / "model.safetensors"))
    assert "layers.2.attention.query.weight" not in state
    assert "layers.2.attention.output.weight" not in state
    assert state["layers.2.attention.output.bias"].shape == (32,)
    assert "layers.3.ffn.intermediate.weight" not in state
    assert state["layers.3.ffn.output.bias"].shape == (32,)
    assert state["layers.0.attention.query.weight"].shape == (3 * 8, 32)


def test_manifest_records_provenance_and_proof(bert_qa_src, bert_qa_packed):
    manifest = json.loads((bert_qa_packed / "pack.json").read_text())
    assert manifest["task"] == "question-answering"
    assert manifest["source"]["weights"][0]["sha256"] == sha256_file(bert_qa_src / "model.safetensors")
    assert [entry["heads"] for entry in manifest["layers"]][1] == {"before": 4, "after": 2}
    assert manifest["layers"][1]["removed_heads"]["value_zero_folded"] == [2]
    assert manifest["layers"][3]["uniform_attention_heads_kept"] == [1]
    assert manifest["layers"][3]["ffn_dims"] == {"before": 64, "after": 0}
    eq = manifest["equivalence"]
    assert eq["passed"] and eq["max_abs_diff"] <= 1e-4 and eq["text_inputs"] > 0 and eq["random_inputs"] > 0
    assert set(manifest["files"]) >= {"config.json", "model.safetensors", "tokenizer.json"}
    for name, digest in manifest["files"].items():
        assert sha256_file(bert_qa_packed / name) == digest
    config = json.loads((bert_qa_packed / "config.json").read_text())
    assert config["prune_serve"]["num_heads"] == EXPECTED_HEADS
    assert config["prune_serve"]["intermediate_sizes"] == EXPECTED_FFN


def test_a_wrong_fold_fails_verification_and_writes_nothing(bert_qa_src, tmp_path, monkeypatch):
    """A deliberately broken fold (the constant act(b1) of input-zero FFN dims dropped) at the default
    tolerance: verification catches the genuinely different function, exit 3, nothing written."""
    import packer.build.resize
    from packer.cli import main

    class DropConstants(dict):
        def __getitem__(self, name):
            return lambda x: x * 0

    monkeypatch.setattr(packer.build.resize, "ACT2FN", DropConstants())
    out = tmp_path / "out"
    assert main(["pack", "-q", str(bert_qa_src), str(out)]) == 3
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary directory left behind either
    monkeypatch.undo()
    assert main(["pack", "-q", str(bert_qa_src), str(out)]) == 0  # the real fold passes


def test_existing_output_needs_force(bert_qa_src, tmp_path):
    from packer.errors import ArtifactError

    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    with pytest.raises(ArtifactError, match="already exists"):
        pack(str(bert_qa_src), out, PackOptions(progress=False))
    pack(str(bert_qa_src), out, PackOptions(progress=False, force=True))
    assert not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_sharded_safetensors_checkpoint(bert_qa_src, tmp_path):
    src = tmp_path / "sharded"
    shutil.copytree(bert_qa_src, src)
    state = load_file(str(src / "model.safetensors"))
    (src / "model.safetensors").unlink()
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    weight_map = {}
    for name, names in shards.items():
        save_file({k: state[k] for k in names}, str(src / name))
        weight_map.update(dict.fromkeys(names, name))
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    manifest = pack(str(src), tmp_path / "out", PackOptions(progress=False))
    assert [w["file"] for w in manifest["source"]["weights"]] == list(shards)
    loaded = packer.load(tmp_path / "out")
    assert loaded.config.num_heads == EXPECTED_HEADS
    batches = sample_inputs(loaded.tokenizer, loaded.config.task, loaded.config.vocab_size, 0)
    assert max_diff(hf_model(bert_qa_src), loaded.model, batches) < 1e-5


def test_fp16_storage_halves_the_weights_and_loads_as_fp32(bert_qa_src, bert_qa_packed, tmp_path):
    out = tmp_path / "half"
    manifest = pack(str(bert_qa_src), out, PackOptions(progress=False, dtype="fp16"))
    full = (bert_qa_packed / "model.safetensors").stat().st_size
    assert manifest["sizes"]["model.safetensors"] < 0.6 * full
    entry = manifest["variants"]["torch"]
    assert entry["storage_dtype"] == "float16" and 0 < entry["storage_max_abs_diff_vs_fp32"] < 1e-2
    half, fp32 = packer.load(out), packer.load(bert_qa_packed)
    assert all(p.dtype == torch.float32 for p in half.model.parameters())  # upcast at load
    ids = torch.randint(5, fp32.config.vocab_size, (2, 24))
    with torch.inference_mode():
        diff = (half.model(ids).start_logits - fp32.model(ids).start_logits).abs().max().item()
    assert diff < 1e-2


def test_int8_alone_drops_the_intermediate_fp32_graph(bert_qa_src, tmp_path):
    alone = pack(str(bert_qa_src), tmp_path / "a", PackOptions(progress=False, int8="dynamic"))
    assert "model.onnx" not in alone["files"] and not (tmp_path / "a" / "model.onnx").exists()
    assert set(alone["variants"]) == {"torch", "onnx-int8"}
    assert alone["variants"]["onnx-int8"]["quantized_from"]["equivalence"]["passed"] is True
    kept = pack(str(bert_qa_src), tmp_path / "b", PackOptions(progress=False, onnx=True, int8="dynamic"))
    assert {"model.onnx", "model.int8.onnx"} <= set(kept["files"])
    assert set(kept["sizes"]) == set(kept["files"])  # every file but pack.json, with its size
    assert all(kept["sizes"][f] == (tmp_path / "b" / f).stat().st_size for f in kept["files"])
