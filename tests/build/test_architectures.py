"""DistilBERT, ELECTRA (with its embedding projection), XLM-RoBERTa and CamemBERT: each packed from a tiny
random checkpoint pruned every way the BERT fixtures are, and checked against transformers' own class;
masks files and old `pruned_heads` checkpoints for every architecture, BERT included."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import packer
from packer.artifact import CLASSIFICATION, QA
from packer.build.arch import spec_for
from packer.build.checkpoint import read_source
from packer.build.pack import PackOptions, pack
from packer.build.structure import analyze
from packer.synth.checkpoints import PrunePlan, build_checkpoint
from tests.conftest import (
    EXPECTED_FFN,
    EXPECTED_HEADS,
    HEAD_DIM,
    MORE_ARCHS,
    gate_hooks,
    hf_model,
    max_diff,
    sample_inputs,
)


def manifest_of(artifact) -> dict:
    return json.loads((artifact / "pack.json").read_text())


CASES = [(arch, task) for arch in MORE_ARCHS for task in (QA, CLASSIFICATION)]


def batches_for(loaded):
    c = loaded.config
    return sample_inputs(loaded.tokenizer, c.task, c.vocab_size, pad=c.pad_token_id)


@pytest.mark.parametrize(("arch", "task"), CASES)
def test_packed_equals_transformers_own_class(arch_artifact, arch, task):
    src, out, manifest = arch_artifact(arch, task)
    loaded = packer.load(out)
    assert loaded.config.arch == arch and manifest["arch"] == arch
    assert loaded.config.num_heads == EXPECTED_HEADS  # one layer without heads, per-layer head counts
    assert loaded.config.intermediate_sizes == EXPECTED_FFN  # one layer without FFN dims
    reference = hf_model(src)
    assert type(reference).__name__.startswith(spec_for(arch).hf_family)
    batches = batches_for(loaded)
    assert max_diff(reference, loaded.model, batches) < 1e-5
    loaded.model.set_attention_implementation("eager")  # the path exported to ONNX
    assert max_diff(reference, loaded.model, batches) < 1e-5
    # The packer's own proof ran against the same class and the ONNX graph against torch.
    assert manifest["equivalence"]["passed"] is True
    assert manifest["variants"]["onnx"]["equivalence"]["passed"] is True
    assert "onnx-int8" in manifest["variants"]


@pytest.mark.parametrize("arch", MORE_ARCHS)
def test_structure_is_found_exactly_and_biases_folded(arch_artifact, arch):
    src, out, _ = arch_artifact(arch, QA)
    layers = analyze(read_source(str(src), progress=False))
    assert layers[1].heads_value_zero == [2]  # V rows zero: b_v folded into the output bias
    assert layers[1].heads_output_zero == [0]
    assert layers[3].uniform_heads == [1]  # Q rows zero: attends uniformly, kept
    assert layers[1].ffn_input_zero == 3  # W1 rows zero: act(b1) folded
    assert layers[2].ffn_output_zero == 2
    state = load_file(str(out / "model.safetensors"))
    assert "layers.2.attention.query.weight" not in state and "layers.3.ffn.intermediate.weight" not in state


def test_fusion_is_reported_per_architecture(arch_artifact):
    for arch in MORE_ARCHS:
        fusion = arch_artifact(arch, QA)[2]["variants"]["onnx"]["fusion"]
        if arch == "electra":
            # ORT's optimizer cannot match the attention fed by the embedding projection: pack.json
            # says so, the other layers stay fused and the graph was checked against torch.
            assert fusion["fused"] is False and fusion["attention_nodes"] == 2
            assert "2 of 3 attention layers fused" in fusion["note"]
        else:
            assert fusion["fused"] is True and fusion["attention_nodes"] == 3


def test_electra_keeps_its_embedding_projection(arch_artifact):
    src, out, _ = arch_artifact("electra", CLASSIFICATION)
    config = json.loads((src / "config.json").read_text())
    assert config["embedding_size"] == 16 and config["hidden_size"] == 32
    state = load_file(str(out / "model.safetensors"))
    assert state["embeddings.word.weight"].shape[1] == 16
    assert state["embeddings.projection.weight"].shape == (32, 16)


@pytest.mark.parametrize("arch", ("bert", *MORE_ARCHS))
def test_masks_file_and_old_pruned_heads(arch, tmp_path):
    dense = build_checkpoint(tmp_path / "dense", arch=arch, task=QA, plan=PrunePlan(), seed=8)
    masks = {
        "heads": {"0": [1, 0, 1, 1], "2": [0, 0, 0, 0]},
        "ffn": {"1": [0] * 20 + [1] * 44, "3": [0] * 64},
    }
    (tmp_path / "masks.json").write_text(json.dumps(masks))
    pack(str(dense), tmp_path / "gated", PackOptions(masks=str(tmp_path / "masks.json"), progress=False))
    gated = packer.load(tmp_path / "gated")
    assert manifest_of(tmp_path / "gated")["source"]["masks"]["heads_off"] == 5
    assert gated.config.num_heads == [3, 4, 0, 4] and gated.config.intermediate_sizes == [64, 44, 64, 0]
    reference = hf_model(dense)
    gate_hooks(reference, masks, HEAD_DIM, arch)
    assert max_diff(reference, gated.model, batches_for(gated)) < 1e-5

    # An old checkpoint made with prune_heads: smaller q/k/v/out, pruned_heads in its config.
    spec, pruned = spec_for(arch), {1: [0, 3], 2: [1]}
    full = build_checkpoint(tmp_path / "full", arch=arch, task=QA, plan=PrunePlan(heads=pruned), seed=9)
    old = tmp_path / "old"
    old.mkdir()
    for f in full.iterdir():
        if f.name != "model.safetensors":
            (old / f.name).write_bytes(f.read_bytes())
    state = load_file(str(full / "model.safetensors"))
    for layer, heads in pruned.items():
        keep = torch.tensor([h * HEAD_DIM + j for h in range(4) if h not in heads for j in range(HEAD_DIM)])
        for part in ("query", "key", "value"):
            for suffix in ("weight", "bias"):
                key = f"{spec.layer(layer, part)}.{suffix}"
                state[key] = state[key][keep].contiguous()
        key = f"{spec.layer(layer, 'attn_out')}.weight"
        state[key] = state[key][:, keep].contiguous()
    save_file(state, str(old / "model.safetensors"))
    config = json.loads((full / "config.json").read_text())
    config["pruned_heads"] = {str(k): v for k, v in pruned.items()}
    (old / "config.json").write_text(json.dumps(config))
    manifest = pack(str(old), tmp_path / "old-packed", PackOptions(progress=False))
    assert manifest["source"]["expanded_pruned_heads"] == {"1": [0, 3], "2": [1]}
    loaded = packer.load(tmp_path / "old-packed")
    assert loaded.config.num_heads == [4, 2, 3, 4]
    assert max_diff(hf_model(full), loaded.model, batches_for(loaded)) < 1e-5


def test_distilbert_config_names_are_read(arch_artifact):
    src, out, _ = arch_artifact("distilbert", QA)
    raw = json.loads((src / "config.json").read_text())
    assert {"dim", "n_layers", "n_heads", "hidden_dim"} <= raw.keys()
    config = packer.load(out).config
    assert (config.hidden_size, config.num_layers, config.type_vocab_size) == (raw["dim"], raw["n_layers"], 0)
    assert config.uses_token_types is False
