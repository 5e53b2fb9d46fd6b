"""What the README promises and no other test checked: the metrics key, CORS, /ready while stopping,
variant overrides and `auto`, the fusion fallback, `eval --articles`."""

from __future__ import annotations

import json

import httpx
import pytest

from packer.errors import PackerError
from packer.runtime.backends import choose_variant
from tests.build.test_onnx import op_counts
from tests.serving import Server

KEY = "promise-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def test_metrics_require_key_and_cors(models_dir, tmp_path):
    srv = Server(
        models_dir,
        tmp_path / "serve.log",
        api_key=KEY,  # /metrics needs the key by default once a key is set
        cors_origins='["https://app.example"]',
    )
    try:
        assert httpx.get(srv.url + "/metrics").status_code == 401
        assert httpx.get(srv.url + "/metrics", headers=AUTH).status_code == 200
        assert httpx.get(srv.url + "/health").status_code == 200
        preflight = {
            "Origin": "https://app.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        }
        ok = httpx.options(srv.url + "/v1/models/qa/qa", headers=preflight)
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "https://app.example"
        other = httpx.options(
            srv.url + "/v1/models/qa/qa", headers={**preflight, "Origin": "https://evil.example"}
        )
        assert "access-control-allow-origin" not in other.headers
        answer = httpx.post(
            srv.url + "/v1/models/qa/qa",
            json={"question": "Who?", "context": "Ada wrote it."},
            headers={**AUTH, "Origin": "https://app.example"},
        )
        assert (
            answer.status_code == 200
            and answer.headers["access-control-allow-origin"] == "https://app.example"
        )
    finally:
        srv.stop()


def test_ready_only_while_models_serve(models_dir):
    """In process (uvicorn accepts no connection before startup ends): 200 once loaded, 503 after stop."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    app = create_app(Settings(models_dir=models_dir, threads=1, device="cpu"))
    with TestClient(app) as client:
        ready = client.get("/ready")
        assert ready.status_code == 200 and set(ready.json()["models"]) == {"qa", "qa-torch", "cls"}
        app.state.engine.stop()  # what the lifespan does on SIGTERM
        stopping = client.get("/ready")
        assert stopping.status_code == 503 and stopping.json()["error"]["type"] == "not_ready"
        assert client.post("/v1/models/qa/qa", json={"question": "q", "context": "c"}).status_code == 503


def test_variant_choice_auto_and_overrides(models_dir, tmp_path):
    every = ["torch", "onnx", "onnx-int8", "onnx-fp16"]
    assert choose_variant("auto", ["torch", "onnx", "onnx-int8"], "cpu") == "onnx-int8"
    assert choose_variant("auto", ["torch", "onnx"], "cpu") == "onnx"
    assert choose_variant("auto", every, "cpu", sees_cuda=lambda engine: True) == "onnx-int8"
    assert choose_variant("auto", every, "auto", sees_cuda=lambda engine: True) == "onnx-fp16"
    assert choose_variant("auto", ["torch", "onnx-int8"], "auto", sees_cuda=lambda engine: True) == "torch"
    # Each engine is asked on its own: CUDA torch beside CPU onnxruntime serves torch on the GPU, and
    # CPU torch beside onnxruntime-gpu serves onnx-fp16; neither seeing CUDA keeps the CPU order.
    assert choose_variant("auto", every, "auto", sees_cuda=lambda engine: engine == "torch") == "torch"
    assert choose_variant("auto", every, "cuda", sees_cuda=lambda e: e == "onnxruntime") == "onnx-fp16"
    assert choose_variant("auto", every, "auto", sees_cuda=lambda engine: False) == "onnx-int8"
    with pytest.raises(PackerError, match="not packed"):
        choose_variant("onnx-fp16", ["torch"], "cpu")
    srv = Server(models_dir, tmp_path / "serve.log", model_variants="qa=onnx, cls=torch")
    try:
        models = {m["name"]: m for m in httpx.get(srv.url + "/v1/models").json()["models"]}
        assert (models["qa"]["variant"], models["qa"]["backend"]) == ("onnx", "ort-cpu-fp32")
        assert models["cls"]["variant"] == "torch" and models["qa-torch"]["variant"] == "torch"
    finally:
        srv.stop()
    srv = Server(models_dir, tmp_path / "torch.log", variant="torch")
    try:
        assert {m["variant"] for m in httpx.get(srv.url + "/v1/models").json()["models"]} == {"torch"}
    finally:
        srv.stop()


def test_fusion_fallback_keeps_a_correct_unfused_graph(bert_qa_src, tmp_path, monkeypatch):
    from onnxruntime.transformers import optimizer

    from packer.build.pack import PackOptions, pack

    def refuse(*args, **kwargs):
        raise RuntimeError("fusion unavailable")

    monkeypatch.setattr(optimizer, "optimize_model", refuse)
    manifest = pack(str(bert_qa_src), tmp_path / "out", PackOptions(progress=False, onnx=True))
    fusion = manifest["variants"]["onnx"]["fusion"]
    assert fusion["fused"] is False and "optimizer failed" in fusion["note"]
    assert manifest["variants"]["onnx"]["equivalence"]["passed"] is True  # still the same function
    assert op_counts(tmp_path / "out" / "model.onnx")["Attention"] == 0


def test_eval_articles_restricts_the_questions(bert_onnx, tmp_path, capsys):
    from packer.cli import main

    def article(title: str, n: int) -> dict:
        qas = [
            {
                "id": f"{title}-{i}",
                "question": "When?",
                "answers": [{"text": "1883", "answer_start": 21}],
                "is_impossible": False,
            }
            for i in range(n)
        ]
        return {"title": title, "paragraphs": [{"context": "The bridge opened in 1883.", "qas": qas}]}

    data = tmp_path / "dev.json"
    data.write_text(json.dumps({"version": "v2.0", "data": [article("Alpha", 3), article("Beta", 5)]}))
    for articles, total in (("Beta", 5), ("Alpha,Beta", 8), ("Alpha", 3)):
        out = tmp_path / f"{articles}.json"
        code = main(
            [
                "eval",
                "squad2",
                "-q",
                "--data",
                str(data),
                "--artifact",
                str(bert_onnx),
                "--articles",
                articles,
                "--output",
                str(out),
            ]
        )
        assert code == 0 and json.loads(out.read_text())["total"] == total
    capsys.readouterr()
