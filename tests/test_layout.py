"""The layout rule (README, Architecture): each floor imports only the floors below it.

artifact (standard library, safetensors)  <  runtime (+ numpy, tokenizers, onnxruntime; torch only in
the torch variant's modules)  <  service (+ FastAPI)  ;  build, evaluate and synth sit beside service
and may use everything below. The static check reads every import (function-level ones too); the
end-to-end check serves an int8 artifact with torch, transformers and the build code made unimportable.
"""

from __future__ import annotations

import ast
import json
import os
import sys
from pathlib import Path

import httpx
import pytest

from tests.serving import Server

ROOT = Path(__file__).resolve().parent.parent

# floor -> the first-party packages it may import
ALLOWED = {
    "packer/artifact": ("packer.artifact", "packer.errors"),
    "packer/runtime": ("packer.artifact", "packer.errors", "packer.runtime"),
    "service": ("packer", "packer.artifact", "packer.errors", "packer.runtime", "service"),
}
# third-party packages each floor may import
THIRD_PARTY = {
    "packer/artifact": {"safetensors"},
    "packer/runtime": {"safetensors", "numpy", "tokenizers", "onnxruntime", "torch", "transformers"},
    "service": {"numpy", "fastapi", "starlette", "pydantic", "pydantic_settings", "uvicorn", "h11"}
    | {"prometheus_client", "swagger_ui_bundle", "onnxruntime"},
}
# the only runtime modules that may import torch or transformers: the torch variant's own
TORCH_MODULES = {"loading.py", "modeling.py", "modeling_prune_serve.py", "sparse.py", "torch.py"}


def imports(file: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names if node.module == "packer"}
    return names


def first_party(name: str) -> bool:
    return name.split(".")[0] in ("packer", "service")


def test_each_floor_imports_only_the_floors_below_it():
    stdlib = set(sys.stdlib_module_names)
    problems = []
    for floor, allowed in ALLOWED.items():
        for file in sorted((ROOT / floor).rglob("*.py")):
            for name in imports(file):
                top = name.split(".")[0]
                where = file.relative_to(ROOT)
                if first_party(name):
                    if name == "packer.__version__" or name == "packer":
                        continue
                    if not any(name == a or name.startswith(a + ".") for a in allowed):
                        problems.append(f"{where} imports {name}")
                elif top in ("torch", "transformers") and floor == "packer/runtime":
                    if file.name not in TORCH_MODULES:
                        problems.append(f"{where} imports {name} (torch belongs to the torch variant only)")
                elif top not in stdlib and top not in THIRD_PARTY[floor]:
                    problems.append(f"{where} imports third-party {name}")
    assert not problems, "\n".join(problems)


def test_the_rule_check_sees_a_violation(tmp_path):
    """The scanner is not blind: function-level imports of the build code are found."""
    file = tmp_path / "x.py"
    file.write_text("def f():\n    from packer.build.pack import pack\n    import torch\n")
    assert {"packer.build.pack", "torch"} <= imports(file)


def in_process_answer(artifact: Path, body: dict) -> dict:
    """The same question through the runtime floor directly (with the transformers-free tokenizer)."""
    from packer.artifact import read_packed_config
    from packer.runtime.backends import open_backend
    from packer.runtime.tasks import qa
    from packer.runtime.tokenizer import load_tokenizer

    backend = open_backend(artifact, "onnx-int8", device="cpu", threads=1)
    tokenizer = load_tokenizer(artifact, read_packed_config(artifact))
    options = qa.QAOptions(max_seq_len=read_packed_config(artifact).max_position_embeddings)
    options = qa.QAOptions(max_seq_len=options.max_seq_len, doc_stride=qa.doc_stride_for(options.max_seq_len))
    windows = qa.make_windows(tokenizer, body["question"], body["context"], options)
    logits = []
    for w in windows:
        out = backend.run(w.input_ids[None], w.attention_mask[None], w.token_type_ids[None])
        logits.append((out["start_logits"][0], out["end_logits"][0]))
    best = qa.answer(body["context"], windows, logits, options).answers[0]
    return {
        "answer": best.answer,
        "score": pytest.approx(best.score, abs=1e-5),
        "start": best.start,
        "end": best.end,
    }


def test_serving_an_onnx_artifact_needs_no_torch_transformers_or_build_code(bert_onnx, tmp_path):
    """The int8 artifact served end to end in a process where those imports fail, as in an environment
    installed with `pip install prune-serve[serve,onnx]`; none is even attempted."""
    served = tmp_path / "models"
    served.mkdir()
    (served / "qa").symlink_to(Path(bert_onnx).resolve())
    report = tmp_path / "imports.json"
    os.environ["IMPORT_REPORT"] = str(report)
    try:
        server = Server(
            served,
            tmp_path / "server.log",
            launcher=[sys.executable, str(ROOT / "tests" / "without_torch.py")],
            variant="onnx-int8",
        )
    finally:
        del os.environ["IMPORT_REPORT"]
    try:
        info = httpx.get(server.url + "/v1/models", timeout=10).json()
        assert [(m["name"], m["backend"]) for m in info["models"]] == [("qa", "ort-cpu-int8")]
        body = {"question": "When did the bridge open?", "context": "The bridge opened in 1883."}
        r = httpx.post(server.url + "/v1/models/qa/qa", json=body, timeout=30)
        assert r.status_code == 200, r.text
        assert r.json()["results"][0]["answers"][0] == in_process_answer(bert_onnx, body)
        assert server.terminate() == 0
    finally:
        server.stop()
    loaded = json.loads(report.read_text())
    assert loaded["attempts"] == []
    heavy = [m for m in loaded["modules"] if m.split(".")[0] in ("torch", "transformers")]
    assert heavy == [] and "onnxruntime" in loaded["modules"] and "tokenizers" in loaded["modules"]
