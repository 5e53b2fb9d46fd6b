"""Where a variant's time goes, by operator type: ONNX Runtime's profiler for the ONNX variants, torch's
for the torch ones (prune-pack bench --profile)."""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np


def ort_profile(graph: Path, inputs: dict[str, np.ndarray], threads: int, runs: int) -> dict[str, float]:
    """Share of kernel time per ONNX operator type over `runs` runs."""
    from packer.runtime.ort_session import session

    with tempfile.TemporaryDirectory() as tmp:
        sess = session(graph, threads, profile_prefix=str(Path(tmp) / "profile"))
        names = [i.name for i in sess.get_inputs()]
        feed = {n: inputs.get(n, np.zeros_like(inputs["input_ids"])) for n in names}
        for _ in range(runs):
            sess.run(None, feed)
        trace = json.loads(Path(sess.end_profiling()).read_text())
    per_op: Counter = Counter()
    for event in trace:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            per_op[event.get("args", {}).get("op_name", "?")] += event.get("dur", 0)
    return _shares(per_op)


def torch_profile(model, inputs: dict[str, np.ndarray], runs: int) -> dict[str, float]:
    """Share of self CPU time per torch operator over `runs` runs."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    tensors = {k: torch.from_numpy(v) for k, v in inputs.items()}
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(runs):
            model(**tensors)
    per_op = Counter({e.key: e.self_cpu_time_total for e in prof.key_averages()})
    return _shares(per_op)


def _shares(per_op: Counter, top: int = 8) -> dict[str, float]:
    total = sum(per_op.values()) or 1
    shares = {op: round(t / total, 3) for op, t in per_op.most_common(top)}
    rest = 1 - sum(shares.values())
    if rest > 0.001:
        shares["(other)"] = round(rest, 3)
    return shares
