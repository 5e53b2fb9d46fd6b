"""Hostile input and faults against a real server: right 4xx, still serving, memory bounded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest

from packer.artifact import write_manifest
from tests.serving import Server


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


@pytest.fixture(scope="module")
def hostile_server(models_dir, tmp_path_factory):
    srv = Server(models_dir, tmp_path_factory.mktemp("hostile") / "serve.log")
    yield srv
    srv.stop()


def raw(srv, path, body: bytes, content_type="application/json"):
    return httpx.post(srv.url + path, content=body, headers={"content-type": content_type}, timeout=30)


HOSTILE = [
    (
        "1 MB context",
        "/v1/models/qa/qa",
        json.dumps({"question": "q", "context": "x" * 1_000_000}).encode(),
        413,
    ),
    (
        "200k-char context",
        "/v1/models/qa/qa",
        json.dumps({"question": "q", "context": "word " * 40_000}).encode(),
        422,
    ),
    (
        "5000 items",
        "/v1/models/qa/qa",
        json.dumps({"items": [{"question": "q", "context": "c"}] * 5000}).encode(),
        422,
    ),
    ("invalid UTF-8", "/v1/models/qa/qa", b'{"question": "\xff\xfe\xfa", "context": "c"}', 422),
    ("deeply nested", "/v1/models/qa/qa", b"[" * 50_000 + b"]" * 50_000, 422),
    ("nested in a field", "/models/qa", b'{"inputs": ' + b"[" * 5000 + b"]" * 5000 + b"}", 422),
    ("traversal name", "/v1/models/..%2F..%2Fetc%2Fpasswd/qa", b'{"question": "q", "context": "c"}', 404),
    ("dot-dot name", "/v1/models/%2e%2e/qa", b'{"question": "q", "context": "c"}', 404),
    (
        "null bytes",
        "/v1/models/qa/qa",
        json.dumps({"question": "a\x00b", "context": "c\x00\x1b[2J\u202e"}).encode(),
        200,
    ),
    ("not an object", "/v1/models/qa/qa", b'"just a string"', 422),
    ("huge number", "/v1/models/qa/qa", b'{"question": "q", "context": "c", "top_k": 1e400}', 422),
]


@pytest.mark.parametrize(("what", "path", "body", "status"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_input_gets_the_right_status(hostile_server, what, path, body, status):
    r = raw(hostile_server, path, body)
    assert r.status_code == status, f"{what}: {r.text[:300]}"
    if status != 200:
        assert r.json()["error"]["message"]


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", "application/xml", ""],
)
def test_wrong_content_types(hostile_server, content_type):
    r = raw(hostile_server, "/v1/models/qa/qa", b'{"question": "q", "context": "c"}', content_type)
    assert r.status_code == 415


def test_memory_stays_bounded_under_hostile_input(hostile_server):
    """Rounds of every hostile body (~1.5 MB of bodies per round): after the first rounds settle the
    allocator, later rounds must not grow the heap. A leak keeping each body would add >1 MB a round."""
    pid = hostile_server.proc.pid
    ok = {"question": "When did the bridge open?", "context": "The bridge opened to traffic in 1883."}
    for _ in range(3):
        httpx.post(hostile_server.url + "/v1/models/qa/qa", json=ok, timeout=30)
    sizes = []
    for _ in range(8):
        for _, path, body, _ in HOSTILE:
            raw(hostile_server, path, body)
        sizes.append(rss_mb(pid))
    growth = sizes[-1] - sizes[2]  # five rounds after the warm-up rounds
    assert growth < 5, f"RSS grew {growth:.1f} MB over five rounds: {[round(x) for x in sizes]}"
    assert httpx.post(hostile_server.url + "/v1/models/qa/qa", json=ok, timeout=30).status_code == 200


def test_a_token_past_the_embedding_table_is_refused_before_batching(models_dir, tmp_path):
    """A tokenizer with an id past the model's embedding table: that request gets 422, concurrent ones 200."""
    import asyncio

    root = tmp_path / "models"
    shutil.copytree(models_dir / "qa-torch", root / "faulty")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(root / "faulty")
    tokenizer.add_tokens(["zzqxfault"])
    tokenizer.save_pretrained(root / "faulty")
    write_manifest(root / "faulty", json.loads((root / "faulty" / "pack.json").read_text()))
    srv = Server(root, tmp_path / "serve.log", max_wait_ms=50)
    good = {"question": "when?", "context": "It opened in 1883."}
    bad = {"question": "q", "context": "zzqxfault here"}

    async def burst():
        async with httpx.AsyncClient(base_url=srv.url, timeout=60) as http:
            bodies = [good] * 10 + [bad] + [good] * 10  # sent together: they share the batching window
            return await asyncio.gather(*[http.post("/v1/models/faulty/qa", json=b) for b in bodies])

    try:
        replies = asyncio.run(burst())
        assert [r.status_code for r in replies] == [200] * 10 + [422] + [200] * 10
        message = replies[10].json()["error"]["message"]
        assert "token id" in message and "embedding rows" in message
        assert srv.metric("prune_serve_errors_total", type="inference_failed") == 0
        assert httpx.get(srv.url + "/ready").status_code == 200
    finally:
        srv.stop()


def test_overload_loses_nothing(models_dir, tmp_path):
    """Open-loop load far past capacity for a few seconds: every request is answered 200, 429 or 504."""
    import asyncio

    from packer.evaluate.soak import open_loop

    # A queue never "full enough" to skip the 300 ms wait caps the rate far below the offered load.
    srv = Server(
        models_dir,
        tmp_path / "serve.log",
        queue_size=32,
        request_timeout_s=1,
        max_batch_size=64,
        max_wait_ms=300,
    )
    try:
        # Small windows: each request makes several, so the load is many times the capacity.
        bodies = [
            {
                "question": "When did it open?",
                "context": f"The bridge opened in {1800 + i}. " * 20,
                "max_seq_len": 32,
                "doc_stride": 4,
            }
            for i in range(50)
        ]
        run = asyncio.run(
            open_loop(srv.url, "/v1/models/qa-torch/qa", bodies, rate=150, seconds=4, client_timeout=10)
        )
        statuses = run.statuses
        assert run.lost == [] and sum(statuses.values()) == run.sent  # every request sent was answered
        assert run.sent > 150 and run.send_seconds < 4.5  # stopped at its time bound
        assert set(statuses) <= {200, 429, 504} and statuses[200] > 0 and statuses[429] > 0
        # Admitted requests end within their 1 s deadline, measured by the server (not by a client
        # sharing the cores): every 200 falls in the 2.5 s bucket of the duration histogram.
        route = "/v1/models/{name}/qa"
        ok = srv.metric("prune_serve_request_duration_seconds_count", status="200", route=route)
        within = srv.metric(
            "prune_serve_request_duration_seconds_bucket", status="200", route=route, le="2.5"
        )
        assert ok == statuses[200] and within == ok
        assert httpx.get(srv.url + "/ready").status_code == 200
    finally:
        srv.stop()
