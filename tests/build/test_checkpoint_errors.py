"""Bad checkpoints and masks: a clear message naming the file or tensor, and exit code 2."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from packer.cli import main


@pytest.fixture()
def src(bert_qa_src, tmp_path):
    copy = tmp_path / "src"
    shutil.copytree(bert_qa_src, copy)
    return copy


def run(capsys, *args) -> tuple[int, str]:
    code = main(["pack", "-q", *map(str, args)])
    return code, capsys.readouterr().err


def edit_weights(path, mutate):
    state = load_file(str(path / "model.safetensors"))
    mutate(state)
    save_file(state, str(path / "model.safetensors"))


def test_missing_weights(src, tmp_path, capsys):
    (src / "model.safetensors").unlink()
    code, err = run(capsys, src, tmp_path / "out")
    assert code == 2 and "no weights found" in err and not (tmp_path / "out").exists()


def test_truncated_safetensors(src, tmp_path, capsys):
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) // 2])
    code, err = run(capsys, src, tmp_path / "out")
    assert code == 2 and "model.safetensors: cannot be read as safetensors" in err


def test_wrong_shape_names_tensor(src, tmp_path, capsys):
    key = "bert.encoder.layer.2.attention.self.value.weight"
    edit_weights(src, lambda s: s.update({key: s[key][:16].contiguous()}))
    code, err = run(capsys, src, tmp_path / "out")
    assert code == 2 and f"{key} has shape (16, 32), expected (32, 32)" in err


def test_missing_tensor_names_it(src, tmp_path, capsys):
    key = "bert.encoder.layer.1.intermediate.dense.bias"
    edit_weights(src, lambda s: s.pop(key))
    code, err = run(capsys, src, tmp_path / "out")
    assert code == 2 and f"missing tensor {key}" in err


def test_nan_weights_name_tensor(src, tmp_path, capsys):
    key = "bert.encoder.layer.0.output.dense.weight"

    def mutate(state):
        state[key][0, 0] = float("nan")

    edit_weights(src, mutate)
    code, err = run(capsys, src, tmp_path / "out")
    assert code == 2 and f"{key} holds NaN" in err


def test_unsupported_architecture(src, tmp_path, capsys):
    config = json.loads((src / "config.json").read_text())
    config["model_type"] = "gpt2"
    (src / "config.json").write_text(json.dumps(config))
    code, err = run(capsys, src, tmp_path / "out")
    assert code == 2 and "model_type 'gpt2' is not supported" in err


def test_unknown_task_is_asked_for(src, tmp_path, capsys):
    config = json.loads((src / "config.json").read_text())
    config["architectures"] = ["BertModel"]
    (src / "config.json").write_text(json.dumps(config))
    edit_weights(src, lambda s: [s.pop("qa_outputs.weight"), s.pop("qa_outputs.bias")])
    code, err = run(capsys, src, tmp_path / "out")
    assert code == 2 and "pass --task" in err
    code, err = run(capsys, src, tmp_path / "out", "--task", "qa")
    assert code == 2 and "missing tensor qa_outputs.weight" in err


def test_no_tokenizer(src, tmp_path, capsys):
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json"):
        (src / name).unlink()
    code, err = run(capsys, src, tmp_path / "out")
    assert code == 2 and "--tokenizer" in err
    code, _ = run(capsys, src, tmp_path / "out", "--tokenizer", tmp_path.parent / "nowhere-tokenizer")
    assert code == 2


def test_not_a_directory_and_unreachable_hub(tmp_path, capsys, monkeypatch):
    code, err = run(capsys, tmp_path / "does-not-exist", tmp_path / "out")
    assert code == 2 and "no such directory" in err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, err = run(capsys, "someone/some-model", tmp_path / "out")
    assert code == 2 and "could not be downloaded from the Hugging Face hub" in err


@pytest.mark.parametrize(
    ("masks", "message"),
    [
        ({"heads": {"0": [1, 0, 1]}}, "heads.0 has 3 gates, the model has 4 heads"),
        ({"heads": {"0": [1, 0.5, 1, 1]}}, "heads.0[1] = 0.5: gates must be 0 or 1"),
        ({"ffn": {"9": [1] * 64}}, "ffn.9: the model has layers 0..3"),
        ({"ffn": {"x": [1] * 64}}, "layer key 'x' is not an integer"),
        ({"layers": {}}, "a masks file is a JSON object"),
    ],
)
def test_bad_masks(src, tmp_path, capsys, masks, message):
    (tmp_path / "m.json").write_text(json.dumps(masks))
    code, err = run(capsys, src, tmp_path / "out", "--masks", tmp_path / "m.json")
    assert code == 2 and message in err


def test_masks_file_not_json(src, tmp_path, capsys):
    (tmp_path / "m.json").write_text("{heads")
    code, err = run(capsys, src, tmp_path / "out", "--masks", tmp_path / "m.json")
    assert code == 2 and "m.json: not valid JSON" in err


def test_bin_with_a_non_tensor(src, tmp_path, capsys):
    state = load_file(str(src / "model.safetensors"))
    state["bert.embeddings.LayerNorm.weight"] = [1.0, 2.0]
    (src / "model.safetensors").unlink()
    torch.save(state, src / "pytorch_model.bin")
    code, err = run(capsys, src, tmp_path / "out")
    assert code == 2 and "bert.embeddings.LayerNorm.weight" in err
