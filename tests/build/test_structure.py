import pytest
import torch

from packer.build.checkpoint import read_source
from packer.build.structure import analyze, summarize
from packer.synth.checkpoints import PrunePlan, build_checkpoint
from tests.conftest import EXPECTED_FFN, EXPECTED_HEADS


@pytest.fixture(scope="module")
def layers(bert_qa_src):
    return analyze(read_source(str(bert_qa_src), progress=False))


def test_heads_removed_for_each_reason(layers):
    assert [len(ls.kept_heads) for ls in layers] == EXPECTED_HEADS
    assert layers[0].heads_output_zero == [1]
    assert layers[1].heads_value_zero == [2]  # V rows zero, W_o live: removable, b_v folded
    assert layers[1].heads_output_zero == [0]
    assert layers[2].kept_heads == []


def test_query_zero_head_is_kept_and_reported(layers):
    assert layers[3].kept_heads == [0, 1, 2, 3]
    assert layers[3].uniform_heads == [1]


def test_ffn_dims_removed_for_each_reason(layers):
    assert [len(ls.kept_ffn) for ls in layers] == EXPECTED_FFN
    assert layers[1].ffn_input_zero == 3
    assert layers[2].ffn_output_zero == 2
    assert layers[3].kept_ffn == []


def test_detection_is_exact_not_approximate(tmp_path):
    """One 1e-30 weight keeps a head: nn_pruning's thresholds would drop it."""
    src = build_checkpoint(tmp_path / "src", plan=PrunePlan(heads={0: [2]}), seed=3)
    source = read_source(str(src), progress=False)
    key = "bert.encoder.layer.0.attention.self.value.weight"
    source.state_dict[key][2 * 8 + 5, 7] = 1e-30
    ls = analyze(source)[0]
    assert 2 not in ls.heads_value_zero
    assert ls.kept_heads == [0, 1, 3]  # still removed: its W_o columns are zero too
    source.state_dict["bert.encoder.layer.0.attention.output.dense.weight"][0, 2 * 8] = 1e-30
    assert analyze(source)[0].kept_heads == [0, 1, 2, 3]


def test_unstructured_sparsity_is_measured_not_packed(tmp_path):
    src = build_checkpoint(tmp_path / "sparse", plan=PrunePlan(unstructured=0.6), seed=4)
    source = read_source(str(src), progress=False)
    layers = analyze(source)
    summary = summarize(layers, source.hidden_size)
    assert summary["heads_after"] == summary["heads_before"] == 16
    assert summary["ffn_after"] == summary["ffn_before"]
    assert 0.35 < layers[0].density["ffn_in"] < 0.45
    assert 0.35 < summary["kept_weights_density"] < 0.45
    assert summary["encoder_linear_fraction_kept"] == 1.0


def test_summary_counts_encoder_linear_weights(layers):
    summary = summarize(layers, 32)
    before = 4 * (4 * 32 * 32 + 2 * 32 * 64)
    after = sum(4 * 32 * h * 8 + 2 * 32 * f for h, f in zip(EXPECTED_HEADS, EXPECTED_FFN, strict=True))
    assert summary["encoder_linear_weights_before"] == before
    assert summary["encoder_linear_weights_after"] == after
    assert summary["uniform_heads"] == 1
    assert torch.isclose(torch.tensor(summary["encoder_linear_fraction_kept"]), torch.tensor(after / before))
