"""The Open Inference Protocol (KServe v2) through a real client library (tritonclient[http]) against a
live server: health, metadata, QA and classification answers equal to the native API's, errors."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from tests.conftest import require_module
from tests.serving import Server

KEY = "v2-key"
QUESTIONS = ["When did the bridge open?", "Who designed it?"]
CONTEXTS = [
    "The Brooklyn Bridge opened in 1883 after fourteen years of work.",
    "John Roebling designed the bridge; his son Washington finished it.",
]


@pytest.fixture(scope="module")
def served(models_dir, tmp_path_factory):
    server = Server(models_dir, tmp_path_factory.mktemp("v2") / "server.log", api_key=KEY)
    yield server
    server.stop()


def client(server: Server):
    http = require_module("tritonclient.http", "tritonclient[http] not installed (dev extra)")
    return http, http.InferenceServerClient(url=server.url.removeprefix("http://"))


def strings(http, name: str, values: list[str]):
    tensor = http.InferInput(name, [len(values)], "BYTES")
    tensor.set_data_from_numpy(np.array(values, dtype=object), binary_data=False)
    return tensor


def test_health_and_metadata(served):
    _, triton = client(served)
    auth = {"Authorization": f"Bearer {KEY}"}
    assert triton.is_server_live(headers=auth) and triton.is_server_ready(headers=auth)
    assert triton.is_model_ready("qa", headers=auth) and triton.is_model_ready("cls", "1", headers=auth)
    meta = triton.get_model_metadata("qa", headers=auth)
    assert [i["name"] for i in meta["inputs"]] == ["question", "context"]
    assert {o["name"]: o["datatype"] for o in meta["outputs"]}["is_impossible"] == "BOOL"
    assert triton.get_server_metadata(headers=auth)["name"] == "prune-serve"
    # closed by default: without the key the protocol's routes answer 401 too
    assert httpx.get(served.url + "/v2/health/ready").status_code == 401


def test_qa_and_classification_answer_as_the_native_api(served):
    http, triton = client(served)
    auth = {"Authorization": f"Bearer {KEY}"}
    outputs = [http.InferRequestedOutput(n, binary_data=False) for n in ("answer", "start", "end", "score")]
    result = triton.infer(
        "qa",
        [strings(http, "question", QUESTIONS), strings(http, "context", CONTEXTS)],
        outputs=outputs,
        headers=auth,
        request_id="r-1",
    )
    native = httpx.post(
        served.url + "/v1/models/qa/qa",
        json={"items": [{"question": q, "context": c} for q, c in zip(QUESTIONS, CONTEXTS, strict=True)]},
        headers=auth,
    ).json()["results"]
    for i, r in enumerate(native):
        best = r["answers"][0] if r["answers"] and not r["is_impossible"] else None
        answer = result.as_numpy("answer")[i]
        assert (answer.decode() if isinstance(answer, bytes) else answer) == (best["answer"] if best else "")
        assert int(result.as_numpy("start")[i]) == (best["start"] if best else 0)
        assert int(result.as_numpy("end")[i]) == (best["end"] if best else 0)
    assert result.get_response()["id"] == "r-1" and result.as_numpy("is_impossible") is None  # not asked
    texts = ["a fine film", "dull and slow"]
    labelled = triton.infer("cls", [strings(http, "text", texts)], headers=auth)
    expected = httpx.post(
        served.url + "/v1/models/cls/classify", json={"items": [{"text": t} for t in texts]}, headers=auth
    ).json()["results"]
    labels = [x.decode() if isinstance(x, bytes) else x for x in labelled.as_numpy("label")]
    assert labels == [r["label"] for r in expected]
    assert np.allclose(labelled.as_numpy("score"), [r["score"] for r in expected], atol=1e-6)


def test_errors_follow_the_protocol(served):
    http, triton = client(served)
    auth = {"Authorization": f"Bearer {KEY}"}
    exception = require_module("tritonclient.utils", "tritonclient not installed").InferenceServerException
    with pytest.raises(exception, match="missing context"):
        triton.infer("qa", [strings(http, "question", QUESTIONS)], headers=auth)
    with pytest.raises(exception, match="no model named 'nope'"):
        triton.get_model_metadata("nope", headers=auth)
    r = httpx.post(
        served.url + "/v2/models/qa/infer",
        json={"inputs": [{"name": "question", "shape": [1], "datatype": "INT64", "data": [3]}]},
        headers=auth,
    )
    body = r.json()
    assert r.status_code == 422 and isinstance(body["error"], str) and body["type"] == "validation_error"
    binary = httpx.post(
        served.url + "/v2/models/qa/infer",
        content=b"{}",
        headers={**auth, "Inference-Header-Content-Length": "2"},
    )
    assert binary.status_code == 415 and "binary_data=False" in binary.json()["error"]
