import fcntl
import json
import os
import subprocess
import sys

import pytest

from packer.build.structure import encoder_linear_params
from packer.cli import main
from packer.errors import PackerError
from packer.evaluate.model_bench import encoder_flops, parse_shape
from packer.synth.checkpoints import PROFILES, profile_plan


def test_inspect_source_table(bert_qa_src, capsys):
    assert main(["inspect", "-q", str(bert_qa_src)]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [r[1] for r in rows] == ["3/4", "2/4", "0/4", "4/4"]
    assert [r[2] for r in rows] == ["54/64", "61/64", "62/64", "0/64"]
    assert "uniform heads kept [1]" in out


def test_inspect_artifact_json_and_plot(bert_qa_packed, tmp_path, capsys):
    plot = tmp_path / "structure.png"
    assert main(["inspect", "-q", str(bert_qa_packed), "--json", "--plot", str(plot)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [e["heads"]["after"] for e in data["layers"]] == [3, 2, 0, 4]
    assert data["params"]["after"] < data["params"]["before"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 5000


def test_bench_prints_side_by_side_ratio(bert_qa_src, bert_onnx, tmp_path, capsys):
    rows_file = tmp_path / "bench.json"
    argv = [
        "bench",
        "-q",
        str(bert_qa_src),
        str(bert_onnx),
        "--shape",
        "2x32",
        "--runs",
        "3",
        "--warmup",
        "1",
        "--threads",
        "1",
        "--variants",
        "source,torch,onnx-int8",
        "--json",
        str(rows_file),
        "--profile",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.split()}
    assert "transformers-cpu-fp32" in lines["source"] and "1.00x" in lines["source"]
    assert "torch-cpu-fp32" in lines["torch"] and "ort-cpu-int8" in lines["onnx-int8"]
    assert "FLOP ratio source/packed at 2x32" in out
    assert "profile onnx-int8 at 2x32: " in out and "profile torch at 2x32: " in out
    assert "(min-max)" in out
    assert "GEMM rate here (64x" in out and "GEMM limit reached by onnx-int8 (int8): 2x32" in out
    rows = json.loads(rows_file.read_text())
    assert [r["variant"] for r in rows] == ["source", "torch", "onnx-int8"]
    for r in rows:  # median, spread and run count, and the fraction of this machine's GEMM limit
        low, high = r["spread"]["2x32"]
        assert 0 < low <= r["ms"]["2x32"] <= high and r["runs"] == 3 and r["cv"]["2x32"] >= 0
        assert 0 < r["fraction_of_limit"]["2x32"] < 1.5


def test_bench_unknown_variant(bert_qa_src, bert_qa_packed, capsys):
    assert main(["bench", "-q", str(bert_qa_src), str(bert_qa_packed), "--variants", "source,tensorrt"]) == 2
    assert "variant 'tensorrt' is not one of" in capsys.readouterr().err


def test_bench_rejects_bad_shape(bert_qa_src, bert_qa_packed, capsys):
    assert main(["bench", "-q", str(bert_qa_src), str(bert_qa_packed), "--shape", "8by128"]) == 2
    assert "BATCHxSEQ" in capsys.readouterr().err


def test_flops_of_a_layer():
    # One layer, hidden 4, 1 head of 4, FFN 8, batch 1, seq 2.
    assert encoder_flops(4, 4, [1], [8], 1, 2) == 2 * 2 * (4 * 4 * 4 + 2 * 4 * 8) + 4 * 1 * 2 * 2 * 4
    assert parse_shape("8x128") == (8, 128)


def test_seed_profile_matches_the_seed_model():
    shape = PROFILES["bert-large"]
    plan = profile_plan(shape, heads_removed=155, linear_fraction=0.25)
    heads = [shape.heads - len(plan.heads[i]) for i in range(shape.layers)]
    ffn = [shape.intermediate - len(plan.ffn[i]) for i in range(shape.layers)]
    assert sum(heads) == 384 - 155
    full = encoder_linear_params(1024, [16] * 24, 64, [4096] * 24)
    assert encoder_linear_params(1024, heads, 64, ffn) / full == pytest.approx(0.25, abs=1e-3)


def test_synth_then_pack_roundtrip(tmp_path, capsys):
    assert main(["synth", "-q", str(tmp_path / "src"), "--task", "classification"]) == 0
    assert main(["pack", "-q", str(tmp_path / "src"), str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "heads 11/16" in out and "equivalence: max abs logit diff" in out


def test_gates_close_the_weakest_and_pack(tmp_path, capsys):
    from packer.synth.checkpoints import PrunePlan, build_checkpoint

    src = build_checkpoint(tmp_path / "src", plan=PrunePlan(), seed=11)
    # Make one head and ten FFN dims clearly the weakest.
    from safetensors.torch import load_file, save_file

    state = load_file(str(src / "model.safetensors"))
    state["bert.encoder.layer.1.attention.self.value.weight"][16:24] *= 1e-3
    state["bert.encoder.layer.2.intermediate.dense.weight"][:10] *= 1e-3
    save_file(state, str(src / "model.safetensors"))
    masks = tmp_path / "masks.json"
    assert main(["gates", "-q", str(src), str(masks), "--heads", str(1 / 16), "--ffn", str(10 / 256)]) == 0
    gates = json.loads(masks.read_text())
    assert sum(g.count(0) for g in gates["heads"].values()) == 1 and gates["heads"]["1"][2] == 0
    assert gates["ffn"]["2"][:10] == [0] * 10 and sum(g.count(0) for g in gates["ffn"].values()) == 10
    assert main(["pack", "-q", str(src), str(tmp_path / "out"), "--masks", str(masks)]) == 0
    out = capsys.readouterr().out
    assert "heads 15/16" in out and "lost every" not in out


def test_gates_refuse_to_close_a_whole_layer_and_pack_says_so(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from packer.synth.checkpoints import PrunePlan, build_checkpoint

    src = build_checkpoint(tmp_path / "src", plan=PrunePlan(), seed=12)
    state = load_file(str(src / "model.safetensors"))
    state["bert.encoder.layer.0.attention.output.dense.weight"] *= 1e-3  # layer 0's heads all weakest
    save_file(state, str(src / "model.safetensors"))
    masks = tmp_path / "masks.json"
    assert main(["gates", "-q", str(src), str(masks), "--heads", "0.25", "--ffn", "0.1"]) == 2
    err = capsys.readouterr().err
    assert "layer 0 would lose every head" in err and "--allow-empty-layers" in err
    assert not masks.exists()
    argv = ["gates", "-q", str(src), str(masks), "--heads", "0.25", "--ffn", "0.1", "--allow-empty-layers"]
    assert main(argv) == 0
    assert "warning: layer 0 would lose every head" in capsys.readouterr().err
    assert main(["pack", "-q", str(src), str(tmp_path / "out"), "--masks", str(masks)]) == 0
    assert "warning: layer(s) 0 lost every attention head" in capsys.readouterr().out


# -- packer hygiene --------------------------------------------------------------------------------


def prune_pack(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "packer.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_pack_checks_out_first_and_sweeps_killed_packs_leftovers(bert_qa_src, bert_qa_packed, tmp_path):
    done = prune_pack("pack", "/nonexistent/checkpoint", str(bert_qa_packed))
    assert done.returncode == 2 and "already exists" in done.stderr  # OUT refused before SRC is read
    out = tmp_path / "art"
    leftover = tmp_path / ".art.tmp-killed1"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"x" * 1000)
    running = tmp_path / ".art.tmp-running"
    running.mkdir()
    fd = os.open(running, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a pack that is still running holds its lock
    try:
        done = prune_pack("pack", str(bert_qa_src), str(out), "-q")
        assert done.returncode == 0, done.stderr
        assert not leftover.exists() and running.exists()
        assert "left by a pack that was killed" in done.stderr
    finally:
        os.close(fd)


def test_cli_mistakes_are_messages_with_exit_2(bert_qa_src, tmp_path):
    bad = prune_pack("gates", str(bert_qa_src), str(tmp_path / "m.json"), "--heads", "1.5")
    assert bad.returncode == 2 and "fraction" in bad.stderr and "Traceback" not in bad.stderr
    missing = prune_pack("gates", str(bert_qa_src), str(tmp_path / "no" / "such" / "m.json"))
    assert (
        missing.returncode == 2 and "does not exist" in missing.stderr and "Traceback" not in missing.stderr
    )
    assert prune_pack("synth", str(tmp_path / "s"), "-q").returncode == 0
    again = prune_pack("synth", str(tmp_path / "s"), "-q")
    assert again.returncode == 2 and "--force" in again.stderr
    assert prune_pack("synth", str(tmp_path / "s"), "-q", "--force").returncode == 0


def nn_pruning_results(path, heads_layer0, ffn_kept_layer0) -> None:
    """A results file in nn_pruning's format (two checkpoints, BERT-base layer sizes)."""
    layer = {"linear_attention_nnz": 4 * 768 * 64 * 6, "linear_dense_nnz": 2 * 768 * 3072}
    first = {str(i): dict(layer) for i in range(12)}
    first["0"] = {"linear_attention_nnz": 4 * 768 * 64 * 5, "linear_dense_nnz": 2 * 768 * ffn_kept_layer0}
    checkpoints = {
        name: {
            "config": {
                "num_hidden_layers": 12,
                "hidden_size": 768,
                "num_attention_heads": 12,
                "intermediate_size": 3072,
            },
            "stats": {"pruned_heads": {"0": heads_layer0} if name == "a" else {}, "layers": first},
            "eval_metrics": {"f1": 75.5},
            "speedup": 1.7,
        }
        for name in ("b", "a")
    }
    path.write_text(json.dumps({"base_speed_report": {}, "checkpoints": checkpoints}))


def test_nn_pruning_structures_are_read_exactly(tmp_path):
    from packer.synth.nn_pruning import plan_for, read_references

    nn_pruning_results(tmp_path / "r.json", [1, 4, 7], 853)
    a, b = read_references(tmp_path / "r.json")  # sorted by name
    assert a.name == "a" and a.pruned_heads == {0: [1, 4, 7]} and a.ffn_kept[0] == 853 and a.ffn_whole_dims
    assert a.attention_density[0] == pytest.approx(5 / 9) and a.attention_density[1] == pytest.approx(0.5)
    plan = plan_for(a)
    assert plan.heads[0] == [1, 4, 7] and len(plan.ffn[0]) == 3072 - 853 and plan.ffn[1] == []
    assert b.pruned_heads == {} and (a.f1, a.speedup) == (75.5, 1.7)
    with pytest.raises(PackerError, match="not nn_pruning's results file"):
        read_references(tmp_path / "missing.json")


def test_the_published_nn_pruning_table_is_structured_as_read():
    """In the real file every layer's FFN non-zeros are whole dims (1d_alt): 2 x 768 per dim."""
    from tests.conftest import SHARED_DATA

    path = SHARED_DATA / "nn_pruning_reference" / "results_squadv2.json"
    if not path.is_file():
        pytest.skip(f"{path} is absent (../shared/data is not part of the repository)")
    from packer.synth.nn_pruning import read_references

    references = read_references(path)
    assert len(references) == 35
    large = [r for r in references if r.shape.layers == 24]
    # 33 BERT-base and 2 BERT-large (slower than BERT-base, so their own "speedup" is below 1)
    assert len(large) == 2 and all(r.shape.hidden == 1024 and r.speedup < 1 for r in large)
    for ref in references:
        assert ref.ffn_whole_dims and all(0 <= d <= 1 for d in ref.attention_density + ref.ffn_density)
        assert sum(ref.ffn_kept) == round(sum(ref.ffn_density) * ref.shape.intermediate)
