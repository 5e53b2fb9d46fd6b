"""End to end: a real prune-serve (uvicorn) on 127.0.0.1 serving packed tiny models."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import sys
import time

import httpx
import pytest

import packer
from packer.runtime.samples import QA_PAIRS, SENTENCES
from packer.runtime.tasks.qa import QAOptions, make_windows
from tests.serving import Server, poll

KEY = "s3cret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="session")
def server(models_dir, tmp_path_factory):
    srv = Server(models_dir, tmp_path_factory.mktemp("logs") / "serve.log", max_wait_ms=20)
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def busy_server(models_dir, tmp_path_factory):
    """Holds windows for a second and has room for four: overload, deadlines and the API key."""
    srv = Server(
        models_dir,
        tmp_path_factory.mktemp("logs") / "busy.log",
        api_key=KEY,
        metrics_require_key="false",  # the tests read metrics without the key
        queue_size=4,
        max_wait_ms=1000,
        max_batch_size=64,
        request_timeout_s=0.5,
    )
    yield srv
    srv.stop()


def post(srv, path, body, headers=None, **kw):
    return httpx.post(srv.url + path, json=body, headers=headers, timeout=30, **kw)


def test_health_ready_and_models(server):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert httpx.get(server.url + "/ready").json()["models"] == ["cls", "qa", "qa-torch"]
    models = {m["name"]: m for m in httpx.get(server.url + "/v1/models").json()["models"]}
    assert models["qa"]["variant"] == "onnx-int8" and models["qa"]["backend"] == "ort-cpu-int8"
    assert models["qa-torch"]["backend"] == "torch-cpu-fp32"
    assert models["cls"]["task"] == "text-classification" and len(models["cls"]["labels"]) == 3
    assert server.metric("prune_serve_model_info", model="qa", variant="onnx-int8") == 1


@pytest.mark.parametrize("model", ["qa", "qa-torch"])
def test_every_answer_is_its_span_of_the_context(server, model):
    items = [{"question": q, "context": c} for q, c in QA_PAIRS]
    r = post(server, f"/v1/models/{model}/qa", {"items": items, "top_k": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == model and len(body["results"]) == len(items)
    for item, result in zip(items, body["results"], strict=True):
        assert 1 <= len(result["answers"]) <= 3
        scores = [a["score"] for a in result["answers"]]
        assert all(0 <= s <= 1 for s in scores)
        for a in result["answers"]:
            assert item["context"][a["start"] : a["end"]] == a["answer"]
        assert isinstance(result["is_impossible"], bool)
        assert result["is_impossible"] == (result["null_score_diff"] > 0)


def test_long_context_is_windowed_into_one_answer(server, models_dir):
    context = " ".join(c for _, c in QA_PAIRS) * 4
    tokenizer = packer.load(models_dir / "qa-torch").tokenizer
    options = QAOptions(max_seq_len=64, doc_stride=16)
    expected_windows = len(make_windows(tokenizer, "When did the bridge open?", context, options))
    assert expected_windows >= 5
    before = server.metric("prune_serve_batch_size_sum", model="qa-torch")
    r = post(
        server,
        "/v1/models/qa-torch/qa",
        {"question": "When did the bridge open?", "context": context, "max_seq_len": 64, "doc_stride": 16},
    )
    assert r.status_code == 200, r.text
    (result,) = r.json()["results"]
    (a,) = result["answers"]
    assert context[a["start"] : a["end"]] == a["answer"]
    assert server.metric("prune_serve_batch_size_sum", model="qa-torch") - before == expected_windows


def test_concurrent_requests_are_batched(server):
    """Counted as deltas around the burst; qa-torch batches, qa (dynamic int8) runs windows one by one."""

    def counts(model: str) -> tuple[float, float]:
        return (
            server.metric("prune_serve_batch_size_count", model=model),
            server.metric("prune_serve_batch_size_bucket", le="1.0", model=model),
        )

    async def fire(model: str):
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            jobs = [
                client.post(
                    f"/v1/models/{model}/qa",
                    json={"question": QA_PAIRS[i % 6][0], "context": QA_PAIRS[i % 6][1]},
                )
                for i in range(64)
            ]
            return await asyncio.gather(*jobs)

    for model, batched in (("qa-torch", True), ("qa", False)):
        before, singles_before = counts(model)
        responses = asyncio.run(fire(model))
        assert [r.status_code for r in responses] == [200] * 64
        after, singles_after = counts(model)
        batches, singles = after - before, singles_after - singles_before
        if batched:
            assert batches < 64 and singles < batches  # most batches held several requests' windows
        else:
            assert batches == singles == 64  # per-window int8: batch invariance by construction


def test_classification_native_and_hf_shapes(server):
    r = post(
        server,
        "/v1/models/cls/classify",
        {"items": [{"text": s} for s in SENTENCES], "return_all_scores": True},
    )
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == len(SENTENCES)
    for res in results:
        assert set(res["scores"]) == {"negative", "positive", "neutral"}
        assert res["label"] == max(res["scores"], key=res["scores"].get)
        assert abs(sum(res["scores"].values()) - 1) < 1e-5
    pair = post(server, "/v1/models/cls/classify", {"text": "a", "text_pair": "b"}).json()["results"][0]
    assert pair["scores"] is None and pair["label"] in {"negative", "positive", "neutral"}
    hf = post(server, "/models/cls", {"inputs": SENTENCES[:2], "parameters": {"top_k": 2}}).json()
    assert len(hf) == 2 and all(len(r) == 2 and r[0]["score"] >= r[1]["score"] for r in hf)


def test_hf_question_answering_shape(server):
    q, c = QA_PAIRS[0]
    one = post(
        server,
        "/models/qa-torch",
        {"inputs": {"question": q, "context": c}, "parameters": {"handle_impossible_answer": False}},
    ).json()
    assert set(one) == {"answer", "score", "start", "end"} and c[one["start"] : one["end"]] == one["answer"]
    many = post(
        server,
        "/models/qa-torch",
        {"inputs": [{"question": q, "context": c}] * 2, "parameters": {"top_k": 2}},
    ).json()
    assert len(many) == 2 and all(isinstance(x, list) for x in many)
    bad = post(server, "/models/qa-torch", {"inputs": "just a string"})
    assert bad.status_code == 422 and "inputs" in bad.json()["error"]["message"]


@pytest.mark.parametrize(
    ("path", "body", "status", "fragment"),
    [
        ("/v1/models/qa/qa", {"question": "", "context": "c"}, 422, "question"),
        ("/v1/models/qa/qa", {"question": "q", "context": ""}, 422, "context"),
        ("/v1/models/qa/qa", {"question": "q"}, 422, "both required"),
        ("/v1/models/qa/qa", {"items": []}, 422, "items"),
        ("/v1/models/qa/qa", {"items": [{"question": "q", "context": "c"}] * 65}, 422, "at most 64"),
        ("/v1/models/qa/qa", {"items": [{"question": 3, "context": "c"}]}, 422, "items[0].question"),
        ("/v1/models/qa/qa", {"question": "q", "context": "c", "top_k": 0}, 422, "top_k"),
        ("/v1/models/qa/qa", {"question": "q", "context": "c", "doc_stride": 400}, 422, "doc_stride"),
        ("/v1/models/qa/qa", {"question": "q", "context": "c", "surprise": 1}, 422, "surprise"),
        ("/v1/models/qa/qa", {"question": "q " * 400, "context": "c"}, 422, "shorten the question"),
        ("/v1/models/qa/qa", {"question": "q", "context": "c", "max_seq_len": 4000}, 422, "max_seq_len"),
        ("/v1/models/cls/classify", {"text": ""}, 422, "text"),
        ("/v1/models/cls/classify", {}, 422, "send text"),
        ("/v1/models/nope/qa", {"question": "q", "context": "c"}, 404, "no model named 'nope'"),
        ("/v1/models/nope/qa", {}, 404, "no model named"),
        ("/v1/models/cls/qa", {"question": "q", "context": "c"}, 400, "/v1/models/cls/classify"),
        ("/v1/models/qa/classify", {"text": "t"}, 400, "/v1/models/qa/qa"),
    ],
)
def test_bad_input_is_a_4xx_that_says_what_to_fix(server, path, body, status, fragment):
    r = post(server, path, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert fragment in error["message"] and error["type"]


def test_wrong_content_type_and_size(server):
    r = httpx.post(
        server.url + "/v1/models/qa/qa", content=b"question=q", headers={"content-type": "text/plain"}
    )
    assert r.status_code == 415 and "application/json" in r.json()["error"]["message"]
    r = httpx.post(
        server.url + "/v1/models/qa/qa", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 422 and "not valid JSON" in r.json()["error"]["message"]
    big = json.dumps({"question": "q", "context": "x" * 1_100_000}).encode()
    r = httpx.post(server.url + "/v1/models/qa/qa", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413

    def chunks():
        for _ in range(12):
            yield b" " * 100_000
        yield b'{"question": "q", "context": "c"}'

    r = httpx.post(
        server.url + "/v1/models/qa/qa", content=chunks(), headers={"content-type": "application/json"}
    )
    assert r.status_code == 413
    assert httpx.get(server.url + "/health").status_code == 200


def test_api_key(busy_server):
    assert httpx.get(busy_server.url + "/health").status_code == 200
    assert httpx.get(busy_server.url + "/ready").status_code == 200
    assert httpx.get(busy_server.url + "/metrics").status_code == 200
    r = httpx.get(busy_server.url + "/v1/models")
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert (
        httpx.get(busy_server.url + "/v1/models", headers={"Authorization": "Bearer wrong"}).status_code
        == 401
    )
    assert httpx.get(busy_server.url + "/v1/models", headers=AUTH).status_code == 200


def test_full_queue_is_429_at_once_and_late_is_504(busy_server):
    async def fire():
        async with httpx.AsyncClient(base_url=busy_server.url, headers=AUTH, timeout=30) as client:

            async def one(i):
                start = time.monotonic()
                r = await client.post(
                    "/v1/models/qa-torch/qa", json={"question": "q", "context": f"context {i}"}
                )
                return r, time.monotonic() - start

            return await asyncio.gather(*[one(i) for i in range(10)])

    results = asyncio.run(fire())
    codes = sorted(r.status_code for r, _ in results)
    assert codes == [429] * 6 + [504] * 4
    for r, _ in results:
        if r.status_code == 429:
            assert r.headers["retry-after"] == "1"
            assert "queued" in r.json()["error"]["message"]
        else:
            assert r.json()["error"]["type"] == "deadline_exceeded"
    # "At once": every 429 came back before any admitted request reached its deadline (relative, so a
    # loaded machine does not make it flaky).
    assert max(t for r, t in results if r.status_code == 429) < min(
        t for r, t in results if r.status_code == 504
    )
    assert httpx.get(busy_server.url + "/v1/models", headers=AUTH).status_code == 200
    assert busy_server.metric("prune_serve_errors_total", type="queue_full") >= 6
    # More windows than the whole queue holds can never be admitted: 413, not 429.
    r = post(busy_server, "/v1/models/qa-torch/qa", {"items": [{"question": "q", "context": "c"}] * 5}, AUTH)
    assert r.status_code == 413 and "more than the queue holds" in r.json()["error"]["message"]


def test_no_models_fails_at_start_saying_how_to_pack(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", "--models-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "prune-pack pack SRC" in done.stderr


def test_corrupted_artifact_fails_at_start(models_dir, tmp_path):
    broken = tmp_path / "models"
    shutil.copytree(models_dir / "qa", broken / "qa")
    (broken / "qa" / "model.int8.onnx").write_bytes(b"garbage")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", "--models-dir", str(broken), "--port", str(port)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "model.int8.onnx: sha256" in done.stdout + done.stderr


def test_disconnect_drops_windows_and_sigterm_drains(models_dir, tmp_path):
    srv = Server(models_dir, tmp_path / "slow.log", max_wait_ms=600, max_batch_size=64)
    try:
        before = srv.metric("prune_serve_batch_size_sum", model="qa-torch")
        body = json.dumps({"question": "q", "context": "gone"}).encode()
        with socket.create_connection(("127.0.0.1", srv.port)) as s:
            s.sendall(
                b"POST /v1/models/qa-torch/qa HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
            )
        # The client is gone before the 600 ms batching wait ends: the request is answered 499 ...
        poll(lambda: srv.metric("prune_serve_request_duration_seconds_count", status="499") == 1, 30)
        assert srv.metric("prune_serve_batch_size_sum", model="qa-torch") == before  # ... and never ran

        async def fire():
            async with httpx.AsyncClient(base_url=srv.url, timeout=30) as client:
                jobs = [
                    asyncio.create_task(
                        client.post("/v1/models/qa-torch/qa", json={"question": q, "context": c})
                    )
                    for q, c in QA_PAIRS
                ]
                # SIGTERM only once every request is admitted and waiting in the queue.
                deadline = time.monotonic() + 10
                while srv.metric("prune_serve_queue_depth", model="qa-torch") < len(QA_PAIRS):
                    assert time.monotonic() < deadline and not any(j.done() for j in jobs)
                    await asyncio.sleep(0.01)
                srv.proc.send_signal(15)
                return await asyncio.gather(*jobs)

        responses = asyncio.run(fire())
        assert [r.status_code for r in responses] == [200] * len(QA_PAIRS)
        assert srv.proc.wait(30) == 0
    finally:
        srv.stop()


def test_reload_swaps_changed_models_and_keeps_the_old_one_when_loading_fails(models_dir, tmp_path):
    root = tmp_path / "models"
    shutil.copytree(models_dir / "qa-torch", root / "m")
    srv = Server(root, tmp_path / "serve.log", api_key=KEY, metrics_require_key="false")
    try:
        body = {"question": "When did the bridge open?", "context": "The bridge opened in 1883."}

        def variant():
            return httpx.get(srv.url + "/v1/models", headers=AUTH).json()["models"][0]["variant"]

        assert variant() == "torch"
        r = httpx.post(srv.url + "/v1/admin/reload", headers=AUTH)
        assert r.status_code == 200 and r.json()["unchanged"] == ["m"] and r.json()["loaded"] == []
        assert httpx.post(srv.url + "/v1/admin/reload").status_code == 401

        # A new artifact version (here: one with ONNX variants) is loaded, warmed up and swapped in.
        shutil.rmtree(root / "m")
        shutil.copytree(models_dir / "qa", root / "m")
        r = httpx.post(srv.url + "/v1/admin/reload", headers=AUTH)
        assert r.status_code == 200 and r.json()["loaded"] == ["m"], r.text
        assert variant() == "onnx-int8"
        assert srv.metric("prune_serve_model_info", model="m", variant="onnx-int8") == 1
        assert srv.metric("prune_serve_model_info", model="m", variant="torch") == 0

        # A broken new version: the reload fails, says why, and the old model keeps answering.
        manifest = json.loads((root / "m" / "pack.json").read_text())
        manifest["files"]["model.int8.onnx"] = "0" * 64
        (root / "m" / "pack.json").write_text(json.dumps(manifest))
        r = httpx.post(srv.url + "/v1/admin/reload", headers=AUTH)
        assert r.status_code == 500 and r.json()["error"]["type"] == "reload_failed"
        assert "model.int8.onnx: sha256" in r.json()["error"]["message"]
        assert variant() == "onnx-int8"
        answer = post(srv, "/v1/models/m/qa", body, AUTH)
        assert answer.status_code == 200 and answer.json()["results"][0]["answers"]

        # SIGHUP reloads too: a second model appears.
        shutil.copytree(models_dir / "qa-torch", root / "second")
        srv.proc.send_signal(1)
        deadline = time.monotonic() + 30
        names = []
        while time.monotonic() < deadline and "second" not in names:
            time.sleep(0.2)
            names = [m["name"] for m in httpx.get(srv.url + "/v1/models", headers=AUTH).json()["models"]]
        assert "second" in names
        assert post(srv, "/v1/models/second/qa", body, AUTH).status_code == 200
    finally:
        srv.stop()
