"""ONNX variants and the backends: export, fusion, int8, fp16, sparse storage, bad files, devices."""

import json
import logging
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import packer
from packer.artifact import write_manifest
from packer.build.pack import PackOptions, pack
from packer.errors import ArtifactError
from packer.runtime.backends import open_backend
from packer.runtime.backends.base import BackendError
from packer.runtime.samples import QA_PAIRS
from packer.synth.checkpoints import PrunePlan, Shape, build_checkpoint
from tests.conftest import sample_inputs


@pytest.fixture(scope="session")
def roberta_onnx(workdir, roberta_cls_src):
    out = workdir / "roberta-cls-onnx"
    pack(str(roberta_cls_src), out, PackOptions(progress=False, onnx=True, int8="dynamic"))
    return out


def run_all(backend, batches):
    outs = []
    for b in batches:
        tt = b.get("token_type_ids")
        outs.append(
            backend.run(
                b["input_ids"].numpy(), b["attention_mask"].numpy(), None if tt is None else tt.numpy()
            )
        )
    return outs


def masked_diff(a_outs, b_outs, batches) -> float:
    worst = 0.0
    for a, b, batch in zip(a_outs, b_outs, batches, strict=True):
        mask = batch["attention_mask"].numpy() > 0
        for name in a:
            x, y = a[name], b[name]
            if x.shape == mask.shape:
                x, y = x[mask], y[mask]
            worst = max(worst, float(np.abs(x - y).max()))
    return worst


@pytest.mark.parametrize("which", ["bert_onnx", "roberta_onnx"])
def test_fp32_onnx_matches_torch(which, request):
    artifact = request.getfixturevalue(which)
    loaded = packer.load(artifact)
    pad = loaded.config.pad_token_id
    batches = sample_inputs(loaded.tokenizer, loaded.config.task, loaded.config.vocab_size, pad)
    torch_backend = open_backend(artifact, "torch", device="cpu", threads=1)
    ort_backend = open_backend(artifact, "onnx", device="cpu", threads=1)
    assert ort_backend.name == "ort-cpu-fp32" and torch_backend.name == "torch-cpu-fp32"
    assert masked_diff(run_all(torch_backend, batches), run_all(ort_backend, batches), batches) < 1e-4


def op_counts(path) -> dict[str, int]:
    """Operators counted in the ONNX file itself (not in pack.json, the packer's report of itself)."""
    import collections

    import onnx

    return collections.Counter(node.op_type for node in onnx.load(str(path)).graph.node)


def test_every_layer_with_heads_is_fused(bert_onnx, roberta_onnx):
    for artifact, layers_with_heads in ((bert_onnx, 3), (roberta_onnx, 3)):  # layer 2 has no heads
        ops = op_counts(artifact / "model.onnx")
        assert ops["Attention"] == layers_with_heads, ops
        assert ops["Softmax"] == 0  # no unfused attention left beside the fused nodes
        fusion = json.loads((artifact / "pack.json").read_text())["variants"]["onnx"]["fusion"]
        assert fusion["fused"] is True and fusion["attention_nodes"] == ops["Attention"]
    int8 = op_counts(bert_onnx / "model.int8.onnx")
    assert int8["QAttention"] + int8["DynamicQuantizeMatMul"] + int8["MatMulInteger"] > 0, int8


def test_onnx_has_dynamic_batch_and_sequence(bert_onnx):
    import onnx

    graph = onnx.load(str(bert_onnx / "model.onnx")).graph
    names = [i.name for i in graph.input]
    assert names == ["input_ids", "attention_mask", "token_type_ids"]
    for i in graph.input:
        dims = i.type.tensor_type.shape.dim
        assert [d.dim_param for d in dims] == ["batch", "sequence"]
    assert [o.name for o in graph.output] == ["start_logits", "end_logits"]
    model = onnx.load(str(bert_onnx / "model.onnx"))
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17


def test_int8_and_fp16_agree_with_fp32(bert_onnx):
    variants = json.loads((bert_onnx / "pack.json").read_text())["variants"]
    assert variants["onnx-int8"]["quantization"] == "dynamic"
    for name in ("onnx-int8", "onnx-fp16"):
        agreement = variants[name]["agreement_with_fp32"]
        assert agreement["argmax_agreement"] >= 0.5, name
        assert agreement["correlation"] > 0.9, name
    assert variants["onnx-fp16"]["agreement_with_fp32"]["correlation"] > 0.999
    loaded = packer.load(bert_onnx)
    batches = sample_inputs(loaded.tokenizer, loaded.config.task, loaded.config.vocab_size, 0)
    fp32 = run_all(open_backend(bert_onnx, "onnx", device="cpu"), batches)
    int8 = run_all(open_backend(bert_onnx, "onnx-int8", device="cpu"), batches)
    agree = np.mean(
        [(a[k].argmax(-1) == b[k].argmax(-1)).mean() for a, b in zip(fp32, int8, strict=True) for k in a]
    )
    assert agree > 0.5  # most inputs keep their argmax
    assert (bert_onnx / "model.int8.onnx").stat().st_size < (bert_onnx / "model.onnx").stat().st_size
    # The fp16 graph itself runs (ONNX Runtime's CPU provider) and agrees with fp32.
    import onnx

    fp16_graph = onnx.load(str(bert_onnx / "model.fp16.onnx"))
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in fp16_graph.graph.initializer)
    fp16 = run_all(open_backend(bert_onnx, "onnx-fp16", device="cpu"), batches)
    for a, b in zip(fp32, fp16, strict=True):
        for k in a:
            assert np.isfinite(b[k]).all() and np.corrcoef(a[k].ravel(), b[k].ravel())[0, 1] > 0.99


def test_static_int8_calibrated_on_text(bert_qa_src, tmp_path):
    squad = {
        "data": [
            {
                "title": "t",
                "paragraphs": [
                    {"context": c, "qas": [{"question": q, "id": str(i)}]}
                    for i, (q, c) in enumerate(QA_PAIRS)
                ],
            }
        ]
    }
    (tmp_path / "calib.json").write_text(json.dumps(squad))
    out = tmp_path / "out"
    pack(
        str(bert_qa_src),
        out,
        PackOptions(progress=False, int8="static", calibration=str(tmp_path / "calib.json")),
    )
    entry = json.loads((out / "pack.json").read_text())["variants"]["onnx-int8"]
    assert entry["quantization"] == "static" and entry["calibration_examples"] == len(QA_PAIRS)
    assert entry["agreement_with_fp32"]["correlation"] > 0.9
    assert open_backend(out, "onnx-int8", device="cpu").dtype == "int8"
    import onnx

    graph = onnx.load(str(out / "model.int8.onnx")).graph  # static QDQ: int8 weights dequantized in-graph
    ops = op_counts(out / "model.int8.onnx")
    assert ops["DequantizeLinear"] >= ops["MatMul"] > 0, ops
    assert any(t.data_type == onnx.TensorProto.INT8 for t in graph.initializer)


def test_static_int8_without_calibration_is_refused(bert_qa_src, tmp_path, capsys):
    from packer.cli import main

    assert main(["pack", "-q", str(bert_qa_src), str(tmp_path / "out"), "--int8", "static"]) == 2
    assert "--calibration" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_sparse_storage_round_trips_exactly_and_is_smaller(tmp_path):
    shape = Shape(layers=4, hidden=64, heads=4, intermediate=256, max_positions=64)
    src = build_checkpoint(tmp_path / "src", shape=shape, plan=PrunePlan(unstructured=0.9), seed=7)
    pack(str(src), tmp_path / "dense", PackOptions(progress=False))
    manifest = pack(str(src), tmp_path / "sparse", PackOptions(progress=False, sparse_storage=True))
    assert manifest["storage"]["sparse_tensors"] == 4 * 6
    dense_state = load_file(str(tmp_path / "dense" / "model.safetensors"))
    sparse_loaded = packer.load(tmp_path / "sparse")
    for name, tensor in sparse_loaded.model.state_dict().items():
        assert torch.equal(tensor.view(torch.int32), dense_state[name].view(torch.int32)), name
    matrices = [
        k for k in dense_state if k.startswith("layers.") and k.endswith(".weight") and "norm" not in k
    ]
    other_bytes = sum(t.numel() * 4 for k, t in dense_state.items() if k not in matrices)
    dense_size = (tmp_path / "dense" / "model.safetensors").stat().st_size
    sparse_size = (tmp_path / "sparse" / "model.safetensors").stat().st_size
    assert (dense_size - other_bytes) / (sparse_size - other_bytes) >= 4
    assert dense_size / sparse_size > 2


def test_missing_or_corrupted_onnx(bert_onnx, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(bert_onnx, copy)
    data = bytearray((copy / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"model\.onnx: sha256"):
        open_backend(copy, "onnx", device="cpu")
    (copy / "model.onnx").write_bytes(b"not a protobuf at all")
    write_manifest(copy, json.loads((copy / "pack.json").read_text()))
    with pytest.raises(ArtifactError, match=r"model\.onnx: ONNX Runtime cannot load it"):
        open_backend(copy, "onnx", device="cpu")
    (copy / "model.onnx").unlink()
    with pytest.raises(ArtifactError, match=r"model\.onnx: missing"):
        open_backend(copy, "onnx", device="cpu")


def test_variant_not_packed(bert_qa_packed):
    with pytest.raises(BackendError, match="has no onnx-int8 variant"):
        open_backend(bert_qa_packed, "onnx-int8", device="cpu")


def test_cuda_requests_without_a_gpu(bert_onnx, caplog):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with caplog.at_level(logging.WARNING):
        backend = open_backend(bert_onnx, "onnx", device="cuda")
    assert backend.device == "cpu" and "no CUDA device" in caplog.text
    with pytest.raises(BackendError, match="strict"):
        open_backend(bert_onnx, "onnx", device="cuda", strict=True)
    with pytest.raises(BackendError, match="strict"):
        open_backend(bert_onnx, "torch", device="cuda", strict=True)
    assert open_backend(bert_onnx, "torch", device="auto").name == "torch-cpu-fp32"


def test_int8_on_cuda_is_refused(bert_onnx):
    with pytest.raises(BackendError, match="CUDA provider does not run"):
        open_backend(bert_onnx, "onnx-int8", device="cuda")
    assert open_backend(bert_onnx, "onnx-int8", device="auto").device == "cpu"


def test_cpu_graphs_keep_add_and_layernorm_instead_of_the_slow_skip_kernel(bert_onnx, tmp_path):
    """ONNX Runtime 1.32's SkipLayerNormalization CPU kernel is ~10x slower than LayerNormalization:
    CPU graphs are written unfused, and CPU sessions run them so (checked on the graph ORT actually runs,
    dumped after its own optimizations; SkipLayerNormFusion is also disabled there as a guard)."""
    import onnxruntime as ort

    from packer.runtime.ort_session import CPU_DISABLED_OPTIMIZERS

    for name in ("model.onnx", "model.int8.onnx"):
        ops = op_counts(bert_onnx / name)
        assert ops["SkipLayerNormalization"] == 0 and ops["LayerNormalization"] >= 4, (name, ops)
    fusion = json.loads((bert_onnx / "pack.json").read_text())["variants"]["onnx"]["fusion"]
    assert fusion["skip_layer_norm"] == "add+layernorm"

    def optimized_ops(name: str):
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(tmp_path / f"opt-{name}")
        ort.InferenceSession(
            str(bert_onnx / name),
            options,
            providers=["CPUExecutionProvider"],
            disabled_optimizers=CPU_DISABLED_OPTIMIZERS,
        )
        return op_counts(tmp_path / f"opt-{name}")

    for name in ("model.onnx", "model.int8.onnx"):  # as the CPU sessions run them (ORT's level-2 fusions on)
        assert optimized_ops(name)["SkipLayerNormalization"] == 0
