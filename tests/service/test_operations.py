"""Hardening and operations: authentication before routing, stalled clients, every file verified,
one failing model never stops the rest, strict types, reloads that change a model, operator features."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from packer.synth.checkpoints import PROFILES, Shape, build_checkpoint
from tests.serving import Server, poll

KEY = "s3cret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
QA_BODY = {"question": "When did the bridge open?", "context": "The bridge opened in 1883."}


@pytest.fixture(scope="module")
def keyed(models_dir, tmp_path_factory):
    srv = Server(
        models_dir,
        tmp_path_factory.mktemp("keyed") / "serve.log",
        api_key=KEY,
        access_log="true",
        metrics_require_key="false",
    )
    yield srv
    srv.stop()


# -- authentication ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method, path, body",
    [
        ("POST", "/v1/models/nope/qa", QA_BODY),  # would be 404 listing models
        ("POST", "/v1/models/qa/qa", {"question": 1}),  # would be 422
        ("POST", "/models/nope", {"inputs": "x"}),
        ("GET", "/v1/models/nope", None),
        ("GET", "/docs", None),
        ("GET", "/openapi.json", None),
        ("GET", "/redoc", None),
        ("GET", "/nothing-here", None),
        ("POST", "/v1/admin/reload", None),
    ],
)
def test_without_the_key_everything_but_health_and_ready_is_401(keyed, method, path, body):
    r = httpx.request(method, keyed.url + path, json=body, timeout=30)
    assert r.status_code == 401, r.text
    assert "nope" not in r.text and "qa-torch" not in r.text  # nothing about what the server holds
    assert r.json()["error"]["request_id"] == r.headers["x-request-id"]


def test_health_ready_and_metrics_stay_open_and_docs_work_offline_with_the_key(keyed):
    for path in ("/health", "/ready", "/metrics"):
        assert httpx.get(keyed.url + path, timeout=10).status_code == 200
    docs = httpx.get(keyed.url + "/docs", headers=AUTH, timeout=10)
    assert docs.status_code == 200 and "/docs/assets/swagger-ui-bundle.js" in docs.text
    assert "cdn" not in docs.text.lower()
    asset = httpx.get(keyed.url + "/docs/assets/swagger-ui-bundle.js", headers=AUTH, timeout=10)
    assert asset.status_code == 200 and len(asset.content) > 100_000
    assert (
        httpx.get(keyed.url + "/openapi.json", headers=AUTH, timeout=10).json()["info"]["title"]
        == "prune-serve"
    )


def test_an_empty_key_is_no_key_and_admin_routes_are_off_without_one(models_dir, tmp_path):
    srv = Server(models_dir, tmp_path / "serve.log", api_key="")
    try:
        # `Authorization: Bearer ` (empty token), sent raw: HTTP clients refuse the trailing space.
        with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as s:
            s.sendall(
                b"POST /v1/admin/reload HTTP/1.1\r\nhost: x\r\nauthorization: Bearer \r\n"
                b"content-length: 0\r\nconnection: close\r\n\r\n"
            )
            reply = b""
            while chunk := s.recv(65536):
                reply += chunk
        assert reply.startswith(b"HTTP/1.1 403") and b"PRUNE_SERVE_API_KEY" in reply
        assert httpx.post(srv.url + "/v1/models/qa/qa", json=QA_BODY, timeout=30).status_code == 200
        assert "no API key" in srv.log.read_text()
    finally:
        srv.stop()
    srv = Server(models_dir, tmp_path / "open.log", open_admin="true")
    try:
        assert httpx.post(srv.url + "/v1/admin/reload", timeout=60).status_code == 200
        assert "open to ANYONE" in srv.log.read_text()
    finally:
        srv.stop()


# -- operator features ---------------------------------------------------------------------------


def test_request_ids_and_the_json_access_log(keyed):
    r = httpx.post(keyed.url + "/v1/models/qa/qa", json=QA_BODY, headers={**AUTH, "X-Request-ID": "abc-123"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "abc-123"
    bad = httpx.post(keyed.url + "/v1/models/qa/qa", json={"question": "q"}, headers=AUTH)
    assert bad.status_code == 422 and bad.json()["error"]["request_id"] == bad.headers["x-request-id"]
    weird = httpx.get(keyed.url + "/health", headers={"X-Request-ID": "bad id\twith spaces"})
    assert weird.headers["x-request-id"] != "bad id\twith spaces"  # replaced, not echoed

    def logged():
        lines = [json.loads(x) for x in keyed.log.read_text().splitlines() if x.startswith("{")]
        return [x for x in lines if x["request_id"] == "abc-123"]

    (line,) = poll(logged, 10)
    assert line["route"] == "/v1/models/{name}/qa" and line["status"] == 200 and line["model"] == "qa"
    assert line["windows"] == 1 and line["duration_ms"] > 0
    assert "bridge" not in keyed.log.read_text()  # no payloads


def test_model_info_route(keyed):
    info = httpx.get(keyed.url + "/v1/models/qa", headers=AUTH, timeout=10).json()
    assert info["state"] == "ready" and info["variant"] == "onnx-int8" and info["backend"] == "ort-cpu-int8"
    assert len(info["source"]["weights"][0]["sha256"]) == 64 and info["packer_version"]
    assert info["max_seq_len"] == 384 and info["batch_invariant"] is True
    assert set(info["files"]) >= {"config.json", "model.int8.onnx", "pack.json"} - {"pack.json"}
    assert not info["source"]["ref"].startswith("/")


@pytest.mark.parametrize("command", [["-m", "service.cli"], ["-m", "packer.cli"]])
def test_help_lists_every_setting_and_version(command):
    from service.settings import Settings

    out = subprocess.run([sys.executable, *command, "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "0." in out.stdout
    if command[-1] == "service.cli":
        text = subprocess.run([sys.executable, *command, "--help"], capture_output=True, text=True).stdout
        for name in Settings.model_fields:
            assert f"PRUNE_SERVE_{name.upper()}" in text


# -- strict types ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("top_k", True),
        ("top_k", "2"),
        ("top_k", 2.0),
        ("handle_impossible_answer", "yes"),
        ("align_to_words", 1),
    ],
)
def test_loose_types_are_refused_naming_the_field(keyed, field, value):
    r = httpx.post(keyed.url + "/v1/models/qa/qa", json={**QA_BODY, field: value}, headers=AUTH, timeout=30)
    assert r.status_code == 422 and field in r.json()["error"]["message"]
    hf = httpx.post(
        keyed.url + "/models/cls",
        json={"inputs": "fine", "parameters": {"top_k": True}},
        headers=AUTH,
        timeout=30,
    )
    assert hf.status_code == 422 and "top_k" in hf.json()["error"]["message"]


# -- stalled clients ---------------------------------------------------------------------------------


def test_stalled_clients_are_closed_while_health_answers(models_dir, tmp_path):
    srv = Server(models_dir, tmp_path / "serve.log", read_timeout_s=2)
    sockets = []
    try:
        body = json.dumps(QA_BODY).encode()
        for i in range(50):
            s = socket.create_connection(("127.0.0.1", srv.port))
            if i % 2:  # half the headers
                s.sendall(b"POST /v1/models/qa/qa HTTP/1.1\r\nhost: x\r\ncontent-type: appl")
            else:  # whole headers, half the body
                s.sendall(
                    b"POST /v1/models/qa/qa HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                    b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body[:10]
                )
            s.settimeout(0.01)
            sockets.append(s)
        times = []
        for _ in range(5):
            start = time.perf_counter()
            assert httpx.get(srv.url + "/health", timeout=5).status_code == 200
            times.append(time.perf_counter() - start)
        assert statistics.median(times) < 0.1

        def closed(s: socket.socket) -> bool:
            try:
                return s.recv(1024) == b""
            except TimeoutError:
                return False
            except OSError:
                return True

        open_ones = list(sockets)
        deadline = time.monotonic() + 2 + 8  # the read timeout, plus generous slack on a loaded machine
        while open_ones and time.monotonic() < deadline:
            open_ones = [s for s in open_ones if not closed(s)]
            time.sleep(0.1)
        assert not open_ones, f"{len(open_ones)} of 50 stalled connections still open"
        poll(
            lambda: srv.metric("prune_serve_in_flight_requests") <= 1, 10
        )  # only the /metrics request itself
    finally:
        for s in sockets:
            s.close()
        srv.stop()


def test_sigterm_does_not_wait_for_a_stalled_client(models_dir, tmp_path):
    srv = Server(models_dir, tmp_path / "serve.log", graceful_shutdown_s=30, read_timeout_s=60)
    try:
        stalled = socket.create_connection(("127.0.0.1", srv.port))
        stalled.sendall(
            b"POST /v1/models/qa/qa HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"content-length: 99\r\n\r\n{"
        )
        poll(lambda: srv.metric("prune_serve_in_flight_requests") >= 2, 10)  # the stalled one is in
        start = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(25) == 0
        assert time.monotonic() - start < 20  # not the 30 s graceful period
        stalled.close()
    finally:
        srv.stop()


# -- integrity and failing models --------------------------------------------------------------------


def copy_models(models_dir: Path, root: Path, names=("qa", "cls")) -> Path:
    for name in names:
        shutil.copytree(models_dir / name, root / name)
    return root


def test_every_file_is_verified_and_a_failing_model_leaves_the_rest_serving(models_dir, tmp_path):
    root = copy_models(models_dir, tmp_path / "models")
    config = json.loads((root / "cls" / "config.json").read_text())
    config["max_position_embeddings"] = 4096  # pack.json untouched
    (root / "cls" / "config.json").write_text(json.dumps(config))
    srv = Server(root, tmp_path / "serve.log", api_key=KEY, metrics_require_key="false")
    try:
        models = {m["name"]: m for m in httpx.get(srv.url + "/v1/models", headers=AUTH).json()["models"]}
        assert models["qa"]["state"] == "ready" and models["cls"]["state"] == "failed"
        assert (
            "config.json: sha256" in models["cls"]["reason"] and str(tmp_path) not in models["cls"]["reason"]
        )
        assert httpx.get(srv.url + "/ready").status_code == 200  # one model serves
        assert srv.metric("prune_serve_model_ready", model="cls") == 0
        assert srv.metric("prune_serve_model_load_failures_total", model="cls") == 1
        r = httpx.post(srv.url + "/v1/models/cls/classify", json={"text": "x"}, headers=AUTH)
        assert r.status_code == 404 and "failed to load" in r.json()["error"]["message"]
        assert httpx.post(srv.url + "/v1/models/qa/qa", json=QA_BODY, headers=AUTH).status_code == 200

        # Corrupting a served file is caught by the next reload (not "unchanged"), and the old one serves.
        int8 = root / "qa" / "model.int8.onnx"
        data = bytearray(int8.read_bytes())
        data[len(data) // 2] ^= 0xFF
        int8.write_bytes(bytes(data))
        r = httpx.post(srv.url + "/v1/admin/reload", headers=AUTH, timeout=120)
        assert r.status_code == 500 and "qa" in r.json()["reload"]["failed"], r.text
        assert str(tmp_path) not in r.text
        assert httpx.post(srv.url + "/v1/models/qa/qa", json=QA_BODY, headers=AUTH).status_code == 200
    finally:
        srv.stop()


def test_require_all_models_makes_ready_wait_for_every_model(models_dir, tmp_path):
    root = copy_models(models_dir, tmp_path / "models")
    (root / "cls" / "model.onnx").write_bytes(b"garbage")
    srv = Server(root, tmp_path / "serve.log", wait_for="/v1/models", require_all_models="true")
    try:
        ready = httpx.get(srv.url + "/ready")
        assert ready.status_code == 503 and ready.json()["failed"] == ["cls"]
    finally:
        srv.stop()


@pytest.mark.parametrize("positions, expected", [(130, 130), (128, 128), (512, 384)])
def test_window_defaults_follow_the_models_positions(tmp_path, positions, expected):
    from packer.build.pack import PackOptions, pack

    shape = Shape(**{**PROFILES["tiny"].__dict__, "max_positions": positions})
    src = build_checkpoint(tmp_path / "src", shape=shape, seed=3)
    root = tmp_path / "models"
    pack(str(src), root / "m", PackOptions(progress=False))
    srv = Server(root, tmp_path / "serve.log")
    try:
        info = httpx.get(srv.url + "/v1/models/m").json()
        assert info["max_seq_len"] == expected and info["max_window"] == positions
        long_context = "the bridge opened in the year eighteen eighty three " * 40
        r = httpx.post(srv.url + "/v1/models/m/qa", json={"question": "when?", "context": long_context})
        assert r.status_code == 200, r.text
        if positions == 512:  # BERT's positions allow 512-token windows
            full = {"question": "when?", "context": long_context, "max_seq_len": 512}
            assert httpx.post(srv.url + "/v1/models/m/qa", json=full).status_code == 200
        too_long = {"question": "when?", "context": long_context, "max_seq_len": positions + 1}
        r = httpx.post(srv.url + "/v1/models/m/qa", json=too_long)
        assert r.status_code == 422 and f"supports ({positions} tokens)" in r.json()["error"]["message"]
    finally:
        srv.stop()


def test_a_reload_that_changes_the_task_never_gives_500(models_dir, tmp_path):
    root = tmp_path / "models"
    shutil.copytree(models_dir / "qa-torch", root / "m")
    srv = Server(root, tmp_path / "serve.log", open_admin="true", max_wait_ms=800, max_batch_size=64)

    async def scenario():
        async with httpx.AsyncClient(base_url=srv.url, timeout=60) as http:
            inflight = [asyncio.ensure_future(http.post("/v1/models/m/qa", json=QA_BODY)) for _ in range(20)]
            await asyncio.sleep(0.3)  # tokenized and queued behind the 800 ms batching wait
            shutil.rmtree(root / "m")
            shutil.copytree(models_dir / "cls", root / "m")
            reload = await http.post("/v1/admin/reload")
            return reload, await asyncio.gather(*inflight)

    try:
        reload, replies = asyncio.run(scenario())
        assert reload.status_code == 200 and reload.json()["loaded"] == ["m"]
        assert {r.status_code for r in replies} <= {200, 503}, [
            r.text for r in replies if r.status_code >= 500
        ]
        after = httpx.post(srv.url + "/v1/models/m/classify", json={"text": "a fine film"})
        assert after.status_code == 200
    finally:
        srv.stop()


def test_accept_errors_at_the_descriptor_limit_are_logged_once_per_interval():
    """What asyncio logs for every failed accept() at the descriptor limit (200k tracebacks in 20 s
    before): one line per interval with the count of the suppressed ones; other records untouched."""
    import logging

    from service.connections import AcceptErrorThrottle

    throttle = AcceptErrorThrottle(interval_s=60)

    def record(message: str) -> logging.LogRecord:
        exc = OSError(24, "Too many open files")
        return logging.LogRecord("asyncio", logging.ERROR, __file__, 1, message, (), (OSError, exc, None))

    kept = [throttle.filter(record("socket.accept() out of system resource")) for _ in range(1000)]
    assert kept.count(True) == 1
    assert throttle.suppressed == 999
    assert throttle.filter(record("some other asyncio error")) is True


def test_the_readme_lists_every_setting_with_its_default():
    """README's settings table is what operators read: every field of the one settings object, with
    the default the code has."""
    from service.settings import Settings

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    rows = {
        line.split("|")[1].strip(): line.split("|")[2].strip()
        for line in readme.splitlines()
        if line.startswith("| `PRUNE_SERVE_")
    }
    for name, field in Settings.model_fields.items():
        row = f"`PRUNE_SERVE_{name.upper()}`"
        assert row in rows, f"README's settings table lacks {row}"
        default = field.default if field.default_factory is None else field.default_factory()
        shown = None if name == "api_key" else default
        assert rows[row] == f"`{shown}`", (row, rows[row], default)
