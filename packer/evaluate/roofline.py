"""This machine's GEMM rates, measured in the benchmark's own run, and how close each variant gets.

The limit of a variant at a shape is its encoder's matrix work (FLOPs) at the machine's GEMM rate for
its number format: ONNX Runtime's fp32 `MatMul` for torch/onnx/source rows, and the same GEMM through
ONNX Runtime's dynamic quantizer (`DynamicQuantizeMatMul`, what the int8 graphs run) for onnx-int8.
The fraction printed is limit time / measured time: 1.0 would be a model that is nothing but GEMMs at
full speed.

python -m packer.evaluate.roofline M K N THREADS   (one JSON line: fp32 and int8 GFLOP/s)
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def gemm_graph(path: Path, k: int, n: int) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = np.random.default_rng(0).normal(0, 0.05, (k, n)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "gemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", n])],
        [numpy_helper.from_array(weight, "w")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def rate(path: Path, m: int, k: int, threads: int, runs: int = 10) -> float:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).normal(0, 1, (m, k)).astype(np.float32)
    for _ in range(3):
        session.run(None, {"x": x})
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        (y,) = session.run(None, {"x": x})
        times.append(time.perf_counter() - start)
    return 2 * m * k * y.shape[1] / statistics.median(times)


def measure(m: int, k: int, n: int, threads: int) -> dict[str, float]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        fp32, int8 = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        gemm_graph(fp32, k, n)
        quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8)
        return {"fp32": rate(fp32, m, k, threads), "int8": rate(int8, m, k, threads)}


def gemm_rates(m: int, k: int, n: int, threads: int) -> dict[str, float]:
    """Measured in a process of its own, like every variant (no two compute pools at once)."""
    done = subprocess.run(
        [sys.executable, "-m", "packer.evaluate.roofline", str(m), str(k), str(n), str(threads)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        raise RuntimeError(f"GEMM rate measurement failed: {lines[-1] if lines else 'no output'}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def number_format(variant: str) -> str:
    return "int8" if variant == "onnx-int8" else "fp32"


if __name__ == "__main__":
    m_, k_, n_, threads_ = (int(a) for a in sys.argv[1:5])
    print(json.dumps(measure(m_, k_, n_, threads_)))
