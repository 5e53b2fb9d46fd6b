"""What a first GPU run would hit, checked on the CPU where it can be: the provider really in use, GPU
memory options, aligned padding, warm-up checks that refuse a broken variant, non-finite logits."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from packer.artifact import write_manifest
from packer.runtime.backends import BackendError, open_backend
from packer.runtime.backends.base import CudaOptions
from packer.runtime.tasks.padding import pad
from service.registry import RegistryError, load_model
from service.settings import Settings


@pytest.fixture()
def claims_cuda(monkeypatch):
    """The situation of a machine with onnxruntime-gpu whose CUDA libraries do not load: the wheel lists
    the CUDA provider, the session then cannot create it (here: a CPU build, so it really cannot)."""
    import onnxruntime

    listed = onnxruntime.get_available_providers()
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", *listed])


def test_a_cuda_session_that_fell_back_to_the_cpu_is_seen(bert_onnx, claims_cuda):
    with pytest.raises(BackendError, match="could not start its CUDA provider"):
        open_backend(bert_onnx, "onnx-fp16", device="cuda", strict=True)
    backend = open_backend(bert_onnx, "onnx-fp16", device="cuda", strict=False)
    assert (backend.device, backend.name, backend.providers) == (
        "cpu",
        "ort-cpu-fp16",
        ["CPUExecutionProvider"],
    )


def test_models_report_the_providers_really_in_use(models_dir):
    settings = Settings(models_dir=models_dir, device="cpu", threads=1)
    model = load_model(models_dir / "qa", settings)
    assert model.describe()["providers"] == ["CPUExecutionProvider"]
    assert load_model(models_dir / "qa-torch", settings).describe()["providers"] == ["cpu"]


def test_cuda_memory_options_come_from_the_settings(monkeypatch):
    monkeypatch.setenv("PRUNE_SERVE_CUDA_MEMORY_LIMIT_MB", "2048")
    monkeypatch.setenv("PRUNE_SERVE_CUDA_ARENA_SHRINKAGE", "true")
    options = Settings().cuda_options()
    assert options == CudaOptions(memory_limit_mb=2048, arena_shrinkage=True)
    assert options.provider_options() == {
        "device_id": "0",
        "arena_extend_strategy": "kSameAsRequested",
        "gpu_mem_limit": str(2048 * 1024 * 1024),
    }
    assert "gpu_mem_limit" not in CudaOptions().provider_options()
    monkeypatch.setenv("PRUNE_SERVE_CUDA_ARENA_EXTEND_STRATEGY", "kEverythingAtOnce")
    with pytest.raises(ValueError, match="kSameAsRequested or kNextPowerOfTwo"):
        Settings()


def test_padding_rounds_up_to_the_multiple():
    class W:
        def __init__(self, n):
            self.input_ids, self.token_type_ids, self.length = np.arange(n), None, n

    ids, mask, _, longest = pad([W(13), W(5)], 0, multiple=8)
    assert longest == 16 and ids.shape == (2, 16) and mask.sum(axis=1).tolist() == [13, 5]
    assert pad([W(16)], 0, multiple=8)[3] == 16 and pad([W(13)], 0)[3] == 13


def break_fp16(artifact, out, value):
    """A copy of the artifact whose fp16 graph's QA head weights are all `value` (checksums updated)."""
    shutil.copytree(artifact, out)
    graph = onnx.load(out / "model.fp16.onnx")
    for init in graph.graph.initializer:
        if "qa_outputs" in init.name:
            weights = numpy_helper.to_array(init)
            init.CopyFrom(numpy_helper.from_array(np.full_like(weights, value), init.name))
    onnx.save(graph, out / "model.fp16.onnx")
    write_manifest(out, json.loads((out / "pack.json").read_text()))
    return out


@pytest.mark.parametrize(
    ("value", "refusal"),
    [(np.inf, "ort-cpu-fp16 produced non-finite"), (60000, "agrees with the CPU fp32 reference on only")],
)
def test_warm_up_refuses_a_broken_fp16_variant(bert_onnx, tmp_path, value, refusal):
    """An fp16 graph with non-finite outputs, or finite ones that disagree with the fp32 graph on the
    CPU, is refused at load naming the variant (never served); the artifact's other variants still serve."""
    broken = break_fp16(bert_onnx, tmp_path / "broken", value)
    settings = Settings(models_dir=tmp_path, device="cpu", threads=1, variant="onnx-fp16")
    with pytest.raises(RegistryError, match=refusal):
        load_model(broken, settings)
    assert load_model(broken, Settings(models_dir=tmp_path, device="cpu", threads=1)).variant == "onnx-int8"


def doctor(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "service.cli", "doctor", *args], capture_output=True, text=True, timeout=300
    )


def test_doctor_on_a_cpu_machine(bert_onnx):
    done = doctor(str(bert_onnx), "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["ok"] and report["gpu"] == []  # no driver here: nothing claims a GPU
    assert report["environment"]["onnxruntime_providers"][-1] == "CPUExecutionProvider"
    rows = {(r["variant"], r["device"]): r for r in report["artifacts"]}
    assert set(rows) == {("torch", "cpu"), ("onnx", "cpu"), ("onnx-int8", "cpu"), ("onnx-fp16", "cpu")}
    assert rows[("onnx", "cpu")]["max_abs_diff"] == 0 and rows[("torch", "cpu")]["argmax_agreement"] == 1
    lines = doctor(str(bert_onnx)).stdout
    assert "all checks passed" in lines and "ort-cpu-int8" in lines


def test_doctor_fails_on_a_broken_variant_and_refuses_a_non_artifact(bert_onnx, tmp_path):
    broken = break_fp16(bert_onnx, tmp_path / "broken", 60000)
    done = doctor(str(broken))
    assert done.returncode == 1 and "FAIL" in done.stdout and "onnx-fp16" in done.stdout
    assert "some checks FAILED" in done.stdout
    missing = doctor(str(tmp_path))
    assert missing.returncode == 2 and "not a packed artifact" in missing.stderr


def test_argmax_agreement_counts_near_ties_and_nothing_else():
    """fp16 or int8 may flip an argmax between two positions whose reference logits tie within 1% of the
    row's range (flat logits of a random-weight model are full of them): that agrees; a real flip, or a
    NaN, does not. Masked positions (-inf in both) are ignored."""
    from packer.runtime.agreement import argmax_agrees

    reference = np.array([[0.0, 1.0, 2.0, 1.995], [0.0, 5.0, 1.0, 2.0], [-np.inf, 1.0, 2.0, 0.0]])
    candidate = np.array([[0.0, 1.0, 1.99, 2.0], [0.0, 1.0, 5.0, 2.0], [-np.inf, np.nan, 1.0, 0.0]])
    assert argmax_agrees(reference, candidate).tolist() == [True, False, False]
    assert argmax_agrees(reference[:2], reference[:2]).all()


def test_doctor_skips_an_engine_that_sees_no_gpu(bert_onnx, monkeypatch):
    """CUDA torch beside CPU onnxruntime (what the H100 image has): the ONNX variants are not checked on
    cuda, and that is not a failure; torch is (and fails here, honestly: this machine has no GPU)."""
    from service import doctor as doctor_module

    monkeypatch.setattr(doctor_module, "engine_sees_cuda", lambda engine: engine == "torch")
    rows = {(r["variant"], r["device"]): r for r in doctor_module.check_artifact(bert_onnx)}
    for variant in ("onnx", "onnx-fp16"):
        row = rows[(variant, "cuda")]
        assert row["ok"] and "onnxruntime sees no CUDA" in row["skipped"]
    assert ("onnx-int8", "cuda") not in rows and ("onnx-fp16", "cpu") not in rows
    assert not rows[("torch", "cuda")]["ok"] and rows[("torch", "cpu")]["ok"]
