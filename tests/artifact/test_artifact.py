import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

import packer
from packer.artifact import write_manifest
from packer.errors import ArtifactError
from tests.conftest import token_batch


@pytest.fixture()
def artifact(bert_qa_packed, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(bert_qa_packed, copy)
    return copy


def rewrite_consistently(path, mutate):
    """Change the weights and re-record checksums: the artifact is internally consistent but wrong."""
    state = load_file(str(path / "model.safetensors"))
    mutate(state)
    save_file(state, str(path / "model.safetensors"))
    manifest = json.loads((path / "pack.json").read_text())
    write_manifest(path, manifest)


def test_flipped_byte_is_refused_naming_the_file(artifact):
    weights = artifact / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"model\.safetensors: sha256 .* does not match pack\.json"):
        packer.load(artifact)


def test_edited_config_is_refused(artifact):
    config = json.loads((artifact / "config.json").read_text())
    config["prune_serve"]["num_heads"][0] = 4
    (artifact / "config.json").write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match=r"config\.json: sha256"):
        packer.load(artifact)


def test_missing_tensor_is_named(artifact):
    rewrite_consistently(artifact, lambda s: s.pop("layers.1.attention.value.bias"))
    with pytest.raises(ArtifactError, match=r"missing tensor layers\.1\.attention\.value\.bias"):
        packer.load(artifact)


def test_wrong_shape_is_named(artifact):
    def mutate(state):
        state["layers.0.ffn.intermediate.weight"] = state["layers.0.ffn.intermediate.weight"][
            :50
        ].contiguous()

    rewrite_consistently(artifact, mutate)
    with pytest.raises(
        ArtifactError, match=r"layers\.0\.ffn\.intermediate\.weight has shape \(50, 32\), expected \(54, 32\)"
    ):
        packer.load(artifact)


def test_unexpected_tensor_is_named(artifact):
    rewrite_consistently(artifact, lambda s: s.update(extra=s["qa_outputs.bias"].clone()))
    with pytest.raises(ArtifactError, match="unexpected tensor extra"):
        packer.load(artifact)


def test_missing_file_and_manifest(artifact, tmp_path):
    (artifact / "tokenizer.json").unlink()
    with pytest.raises(ArtifactError, match=r"tokenizer\.json: missing"):
        packer.load(artifact)
    (artifact / "pack.json").unlink()
    with pytest.raises(ArtifactError, match="not a packed artifact"):
        packer.load(artifact)
    with pytest.raises(ArtifactError, match="no such artifact"):
        packer.load(tmp_path / "nowhere")


def test_load_is_built_from_the_artifact_alone(bert_qa_packed, bert_qa_src, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(bert_qa_packed, moved)
    loaded = packer.load(moved)  # the source directory plays no part
    enc = token_batch(loaded.tokenizer, ["When did the bridge open?"], ["It opened in 1883."])
    out = loaded.model(**enc)
    assert out.start_logits.shape == enc["input_ids"].shape
    assert out.end_logits.shape == enc["input_ids"].shape
