"""`prune-pack prune` on tiny models: importance finds planted heads, the FLOP target is met, pruned
weights stay zero through recovery, the output packs and is equivalent, recovery lowers the loss."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import packer
from packer.build.arch import spec_for
from packer.build.checkpoint import read_source
from packer.build.pack import PackOptions, pack
from packer.build.prune.data import batches, read_training_data
from packer.build.prune.gates import Cost
from packer.build.prune.losses import distill_loss, outputs_of
from packer.build.prune.recover import pruned_slices, recover
from packer.build.prune.run import PruneOptions, prune
from packer.build.prune.select import Structure
from packer.build.verify import reference_model
from packer.cli import main
from packer.synth.checkpoints import PrunePlan, build_checkpoint
from tests.conftest import HEAD_DIM
from tests.evaluate.test_evaluate import squad_file

USELESS, VITAL = (1, 2), (0, 1)  # (layer, head)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A dense tiny QA model where one head barely reaches the output and one dominates it."""
    root = tmp_path_factory.mktemp("prune")
    src = build_checkpoint(root / "dense", plan=PrunePlan(), seed=11)
    state = load_file(str(src / "model.safetensors"))
    spec = spec_for("bert")
    for (layer, head), scale in ((USELESS, 1e-3), (VITAL, 6.0)):
        cols = slice(head * HEAD_DIM, (head + 1) * HEAD_DIM)
        state[f"{spec.layer(layer, 'attn_out')}.weight"][:, cols] *= scale
    save_file(state, str(src / "model.safetensors"))
    return src, squad_file(root, 48)


def options(data, **kw) -> PruneOptions:
    base = dict(data=[str(data)], target_speedup=2.0, steps=0, importance_steps=12, max_length=64, stride=24)
    base.update(progress=False, batch_size=8)
    return PruneOptions(**(base | kw))


@pytest.mark.parametrize("method", ["magnitude", "gain", "l0"])
def test_planted_useless_head_goes_first_and_vital_head_stays(planted, tmp_path, method):
    src, data = planted
    steps = 150 if method == "l0" else 30
    report = prune(str(src), tmp_path / method, options(data, method=method, importance_steps=steps))
    heads = torch.tensor(report["importance"]["heads"])
    rank = heads.flatten().argsort().tolist()  # lowest first: the pruning order
    # Gain and magnitude rank it last; L0's sampled gates leave it among the first three of 16 (the
    # random model has other nearly idle heads), always pruned.
    assert rank.index(USELESS[0] * 4 + USELESS[1]) <= (2 if method == "l0" else 0)
    assert heads[VITAL] == heads.max()
    masks = json.loads((tmp_path / method / "masks.json").read_text())
    assert masks["heads"][str(USELESS[0])][USELESS[1]] == 0
    assert masks["heads"][str(VITAL[0])][VITAL[1]] == 1
    # The target is met, measured as the packer counts FLOPs, and not overshot by much.
    assert 2.0 <= report["flop_ratio"] < 2.2
    assert report["heads_kept"] < 16 and report["ffn_kept"] < 256


def test_recovered_output_keeps_zeros_packs_and_is_equivalent(planted, tmp_path):
    src, data = planted
    out = tmp_path / "pruned"
    report = prune(str(src), out, options(data, method="gain", steps=8, lr=1e-3))
    assert report["recovery"]["steps"] == 8
    masks = json.loads((out / "masks.json").read_text())
    state = load_file(str(out / "model.safetensors"))
    spec = spec_for("bert")
    for layer, gates in masks["heads"].items():
        for head, gate in enumerate(gates):
            rows = slice(head * HEAD_DIM, (head + 1) * HEAD_DIM)
            if gate == 0:  # exactly zero after 8 AdamW steps at a high learning rate
                for part in ("query", "key", "value"):
                    assert not state[f"{spec.layer(int(layer), part)}.weight"][rows].any()
                    assert not state[f"{spec.layer(int(layer), part)}.bias"][rows].any()
                assert not state[f"{spec.layer(int(layer), 'attn_out')}.weight"][:, rows].any()
    for layer, gates in masks["ffn"].items():
        closed = torch.tensor(gates) == 0
        assert not state[f"{spec.layer(int(layer), 'ffn_in')}.weight"][closed].any()
        assert not state[f"{spec.layer(int(layer), 'ffn_out')}.weight"][:, closed].any()
    dense = load_file(str(src / "model.safetensors"))
    key = f"{spec.layer(0, 'ffn_in')}.weight"
    kept = torch.tensor(masks["ffn"]["0"]) == 1
    assert not torch.equal(state[key][kept], dense[key][kept])  # the kept weights did train

    manifest = pack(str(out), tmp_path / "packed", PackOptions(progress=False))
    assert manifest["equivalence"]["passed"] is True
    loaded = packer.load(tmp_path / "packed")
    assert loaded.config.num_heads == report["heads_per_layer"]
    assert loaded.config.intermediate_sizes == report["ffn_per_layer"]


def test_short_recovery_lowers_the_distillation_loss(planted):
    src, data = planted
    source = read_source(str(src), progress=False)
    teacher = reference_model(source)
    student = reference_model(source)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(src))
    features = read_training_data(tokenizer, source.task, [str(data)], max_length=64, stride=24).features
    fixed = next(batches(features, 16, 0, seed=5))
    heads = torch.ones(4, 4)
    heads[0, :2] = 0
    ffn = torch.ones(4, 64)
    ffn[:, :32] = 0
    structure = Structure(heads, ffn, 0.5, Cost(32, 8, 4, 4, 64).ratio(heads, ffn))
    slices = pruned_slices(student, source.spec, structure, HEAD_DIM)

    def kd() -> float:
        inputs = {k: v for k, v in fixed.items() if k != "labels"}
        with torch.no_grad():
            t = outputs_of(teacher(**inputs), source.task, fixed["attention_mask"])
            s = outputs_of(student.eval()(**inputs), source.task, fixed["attention_mask"])
        return float(distill_loss(s, t, 2.0))

    from packer.build.prune.recover import apply_zeros

    apply_zeros(slices)
    before = kd()
    result = recover(
        student,
        teacher,
        slices,
        batches(features, 16, 0, seed=1),
        source.task,
        "cpu",
        40,
        None,
        lambda it, _: it,
        lr=2e-3,
        alpha=1.0,
    )
    assert result.steps == 40
    assert kd() < 0.7 * before


def test_cli_mistakes_exit_2_with_a_message(planted, tmp_path, capsys):
    src, data = planted
    argv = ["prune", "-q", str(src), str(tmp_path / "o"), "--data", str(data), "--target-speedup", "2"]
    assert main(argv) == 2
    assert "--steps N or --time-budget" in capsys.readouterr().err
    assert main([*argv, "--steps", "0", "--exclude-articles", "Nowhere"]) == 2
    assert "Nowhere" in capsys.readouterr().err
    assert main([*argv, "--steps", "0", "--target-speedup", "0.5"]) == 2
    assert "at least 1" in capsys.readouterr().err


def test_classification_from_tsv_rows_prunes_recovers_and_packs(tmp_path):
    """A RoBERTa classifier trained on TSV rows 1-20 only (rows 21+ held out), gain + 4 recovery steps."""
    from packer.runtime.samples import SENTENCES

    src = build_checkpoint(tmp_path / "cls", arch="roberta", task="classification", plan=PrunePlan(), seed=4)
    rows = [f"{SENTENCES[i % len(SENTENCES)]}\t{i % 2}" for i in range(30)]
    data = tmp_path / "train.tsv"
    data.write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    report = prune(
        str(src),
        tmp_path / "out",
        options(data, method="gain", steps=4, rows=(1, 20), importance_steps=3),
    )
    assert report["data"]["examples"] == 20 and report["task"] == "text-classification"
    assert report["recovery"]["steps"] == 4 and report["flop_ratio"] >= 2.0
    manifest = pack(str(tmp_path / "out"), tmp_path / "packed", PackOptions(progress=False))
    assert manifest["equivalence"]["passed"] is True
