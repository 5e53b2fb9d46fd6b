"""The GPU paths end to end: `python3 -m pytest -m gpu tests/gpu` on a machine with an NVIDIA GPU.

Not part of CI (deselected by default in pyproject's addopts; skipped without CUDA). It packs --fp16,
serves on cuda, checks answers against CPU fp32 on 50 SQuAD v2 questions, benchmarks torch fp16 and ORT
CUDA fp16 against the source, and watches GPU memory over a mixed-shape soak. Uses the real MiniLM from
../shared/data when present, else a synthetic BERT-base-shaped QA model.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys

import httpx
import pytest

from tests.conftest import SHARED_DATA
from tests.serving import Server

pytestmark = pytest.mark.gpu

REAL = SHARED_DATA / "models" / "minilm-l6-squad2"


def cuda_engines() -> list[str]:
    from packer.runtime.backends import engine_sees_cuda

    return [e for e in ("onnxruntime", "torch") if engine_sees_cuda(e)]


@pytest.fixture(scope="module")
def gpu_artifact(tmp_path_factory):
    if not cuda_engines():
        pytest.skip("no CUDA device seen by onnxruntime or torch")
    from packer.build.pack import PackOptions, pack

    root = tmp_path_factory.mktemp("gpu")
    src = REAL
    if not src.is_dir():
        from packer.synth.checkpoints import build_profile

        src = root / "src"
        build_profile(src, "bert-base-40h-70f")
    out = root / "models" / "qa"
    pack(str(src), out, PackOptions(progress=False, onnx=True, fp16=True))
    return out


def squad_questions(n: int) -> list[dict]:
    path = SHARED_DATA / "squad_v2" / "dev-v2.0.json"
    if not path.is_file():
        contexts = [
            "The bridge opened in 1883 after fourteen years of work by the Roeblings. " * k
            for k in range(1, 6)
        ]
        return [{"question": "When did the bridge open?", "context": c} for c in contexts] * (n // 5)
    data = json.loads(path.read_text())["data"]
    return [
        {"question": q["question"], "context": p["context"]}
        for a in data[-5:]
        for p in a["paragraphs"]
        for q in p["qas"]
    ][:n]


def ask_all(server: Server, questions: list[dict]) -> list[str]:
    r = httpx.post(server.url + "/v1/models/qa/qa", json={"items": questions}, timeout=120)
    assert r.status_code == 200, r.text
    return [res["answers"][0]["answer"] if res["answers"] else "" for res in r.json()["results"]]


def test_served_on_cuda_answers_as_cpu_fp32(gpu_artifact, tmp_path):
    questions = squad_questions(50)
    cpu = Server(gpu_artifact.parent, tmp_path / "cpu.log", variant="onnx")
    try:
        expected = ask_all(cpu, questions)
    finally:
        cpu.stop()
    gpu = Server(gpu_artifact.parent, tmp_path / "gpu.log", device="cuda", strict_device="true")
    try:
        info = httpx.get(gpu.url + "/v1/models", timeout=10).json()["models"][0]
        assert info["device"] == "cuda" and info["providers"][0] in ("CUDAExecutionProvider", "cuda"), info
        got = ask_all(gpu, questions)
    finally:
        gpu.stop()
    same = sum(a == b for a, b in zip(got, expected, strict=True))
    print(f"{info['backend']}: {same}/{len(questions)} answers equal to CPU fp32")
    assert same >= 0.98 * len(questions)


def test_bench_torch_and_ort_fp16_against_the_source(gpu_artifact):
    src = REAL if REAL.is_dir() else gpu_artifact.parent.parent / "src"
    variants = ["source", "torch"] + (["onnx-fp16"] if "onnxruntime" in cuda_engines() else [])
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "packer.cli",
            "bench",
            str(src),
            str(gpu_artifact),
            "--device",
            "cuda",
            "--variants",
            ",".join(variants),
            "--shape",
            "1x384",
            "--shape",
            "32x128",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    print(done.stdout)
    assert done.returncode == 0, done.stderr
    assert "cuda" in done.stdout


def test_gpu_memory_stays_flat_over_a_mixed_shape_soak(gpu_artifact, tmp_path):
    import torch

    server = Server(gpu_artifact.parent, tmp_path / "soak.log", device="cuda", cuda_arena_shrinkage="false")
    rng = random.Random(0)
    base = squad_questions(50)

    def round_(k: int) -> None:
        for _ in range(k):
            items = [
                dict(q, context=q["context"] * rng.randint(1, 6)) for q in rng.sample(base, rng.randint(1, 8))
            ]
            assert (
                httpx.post(server.url + "/v1/models/qa/qa", json={"items": items}, timeout=120).status_code
                == 200
            )

    try:
        round_(50)
        free, total = torch.cuda.mem_get_info()
        used_after_warm = total - free
        round_(200)
        free, total = torch.cuda.mem_get_info()
        grown = (total - free) - used_after_warm
        print(
            f"GPU memory used after 50 requests {used_after_warm / 2**20:.0f} MiB, "
            f"grew {grown / 2**20:.0f} MiB over 200 more"
        )
        assert grown < 0.1 * used_after_warm + 64 * 2**20
    finally:
        server.stop()


def test_a_new_batch_shape_builds_no_attention_plan(gpu_artifact):
    """cuDNN's SDPA builds an execution plan per new shape (240-700 ms each on an H100, per distinct head
    count: every layer of a pruned model); the torch backend runs attention without it, so the first
    batch of a new (batch, length) under live traffic costs milliseconds."""
    import time

    import numpy as np

    from packer.runtime.backends import open_backend

    backend = open_backend(gpu_artifact, "torch", device="cuda", strict=True)
    rng = np.random.default_rng(0)
    backend.run(*[np.ones((2, 384), dtype=np.int64)] * 2, None)
    firsts = []
    for batch, length in [(1, 136), (2, 200), (3, 264), (1, 328)]:
        ids = rng.integers(1000, 20000, (batch, length))
        mask = np.ones_like(ids)
        mask[0, -5:] = 0  # padded: the masked attention path the service takes
        start = time.perf_counter()
        backend.run(ids, mask, np.zeros_like(ids))
        firsts.append((time.perf_counter() - start) * 1000)
    print("first call of a new shape (ms):", [round(f, 1) for f in firsts])
    assert max(firsts) < 100, firsts
