"""The Open Inference Protocol (KServe v2 / Triton HTTP): health, metadata and infer over JSON.

QA models take BYTES tensors `question` and `context` (N strings each) and give `answer` (BYTES),
`score` (FP32), `start`/`end` (INT64, character offsets) and `is_impossible` (BOOL); classifiers take
`text` [+ `text_pair`] and give `label` (BYTES) and `score` (FP32). Request `parameters` are the native
API's options (top_k excepted: one answer per question here). Errors follow the protocol's shape,
`{"error": "<message>"}`, with our `type` and `request_id` beside it.
"""

from __future__ import annotations

import math
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from packer import __version__
from packer.artifact import QA
from packer.runtime.tasks import qa
from service.errors import InvalidInput, ModelNotFound, NotReady
from service.guard import validation_message
from service.handlers import run_classify, run_qa
from service.registry import ServedModel
from service.routes.deps import ERRORS, REQUEST_ERRORS, Deadline, EngineDep, app_engine
from service.schemas import ClassifyItem, QAItem, QARequest

router = APIRouter(prefix="/v2", tags=["Open Inference Protocol (KServe v2)"])

VERSION = "1"  # one version per served model: the artifact in the models directory now
QA_INPUTS, QA_OUTPUTS = ("question", "context"), ("answer", "score", "start", "end", "is_impossible")
CLASSIFY_INPUTS, CLASSIFY_OUTPUTS = ("text", "text_pair"), ("label", "score")
DATATYPES = {"answer": "BYTES", "label": "BYTES", "score": "FP32", "start": "INT64", "end": "INT64"}
DATATYPES["is_impossible"] = "BOOL"


class InputTensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any]


class RequestedOutput(BaseModel):
    name: str
    parameters: dict[str, Any] | None = None


class ProtocolError(BaseModel):
    """The Open Inference Protocol's error body, with our type and request id beside the message."""

    error: str
    type: str
    request_id: str | None = None


def documented(*codes: int) -> dict:
    return {code: {"model": ProtocolError, "description": ERRORS[code]["description"]} for code in codes}


class InferRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    inputs: list[InputTensor] = Field(min_length=1)
    outputs: list[RequestedOutput] | None = None


@router.get("", responses=documented(401))
async def server_metadata():
    return {"name": "prune-serve", "version": __version__, "extensions": []}


@router.get("/health/live", responses=documented(401))
async def live():
    return {"live": True}


@router.get("/health/ready", responses=documented(401, 503))
async def ready(request: Request):
    if not app_engine(request).is_ready:
        raise NotReady("the server is not ready", {"Retry-After": "1"})
    return {"ready": True}


def _model(request: Request, name: str, version: str | None) -> ServedModel:
    if version is not None and version != VERSION:
        raise ModelNotFound(f"model {name!r} has no version {version!r}; its only version is {VERSION}")
    return app_engine(request).require_ready().model(name)


def _metadata(model: ServedModel) -> dict:
    is_qa = model.task == QA
    inputs = QA_INPUTS if is_qa else CLASSIFY_INPUTS
    outputs = QA_OUTPUTS if is_qa else CLASSIFY_OUTPUTS
    return {
        "name": model.name,
        "versions": [VERSION],
        "platform": f"prune-serve_{model.backend.name}",
        "inputs": [{"name": n, "datatype": "BYTES", "shape": [-1]} for n in inputs],
        "outputs": [{"name": n, "datatype": DATATYPES[n], "shape": [-1]} for n in outputs],
    }


@router.get("/models/{name}", responses=documented(401, 404, 503))
@router.get("/models/{name}/versions/{version}", responses=documented(401, 404, 503))
async def model_metadata(name: str, request: Request, version: str | None = None):
    return _metadata(_model(request, name, version))


@router.get("/models/{name}/ready", responses=documented(401, 404, 503))
@router.get("/models/{name}/versions/{version}/ready", responses=documented(401, 404, 503))
async def model_ready(name: str, request: Request, version: str | None = None):
    _model(request, name, version)
    return {"name": name, "ready": True}


def _strings(tensor: InputTensor) -> list[str]:
    """A BYTES tensor's elements, flattened (shape [N] or [N, 1])."""
    if tensor.datatype != "BYTES":
        raise InvalidInput(f"inputs.{tensor.name}: datatype must be BYTES, got {tensor.datatype}")
    flat = tensor.data
    while flat and isinstance(flat[0], list):
        flat = [x for row in flat for x in row]
    if math.prod(tensor.shape) != len(flat) or not all(isinstance(x, str) and x for x in flat):
        raise InvalidInput(
            f"inputs.{tensor.name}: shape {tensor.shape} needs {math.prod(tensor.shape)} non-empty strings, "
            f"got {len(flat)} elements"
        )
    return flat


def _columns(body: InferRequest, names: tuple[str, ...], required: tuple[str, ...]) -> dict[str, list[str]]:
    given = {t.name: t for t in body.inputs}
    unknown = sorted(set(given) - set(names))
    missing = [n for n in required if n not in given]
    if unknown or missing:
        raise InvalidInput(
            f"inputs: this model takes {', '.join(names)} ({', '.join(required)} required); "
            + (f"unknown {', '.join(unknown)}" if unknown else f"missing {', '.join(missing)}")
        )
    columns = {n: _strings(t) for n, t in given.items()}
    counts = {len(v) for v in columns.values()}
    if len(counts) != 1:
        raise InvalidInput(f"inputs: every input needs the same number of elements, got {sorted(counts)}")
    return columns


def _tensor(name: str, values: list) -> dict:
    return {"name": name, "datatype": DATATYPES[name], "shape": [len(values)], "data": values}


@router.post("/models/{name}/infer", responses=documented(*REQUEST_ERRORS))
@router.post("/models/{name}/versions/{version}/infer", responses=documented(*REQUEST_ERRORS))
async def infer(
    name: str,
    body: InferRequest,
    request: Request,
    eng: EngineDep,
    until: Deadline,
    version: str | None = None,
):
    model = _model(request, name, version)
    if model.task == QA:
        columns = _columns(body, QA_INPUTS, QA_INPUTS)
        items = [
            QAItem(question=q, context=c)
            for q, c in zip(columns["question"], columns["context"], strict=True)
        ]
        try:
            options = QARequest(items=items, **body.parameters)
        except (ValidationError, TypeError) as exc:
            message = validation_message(exc.errors()) if isinstance(exc, ValidationError) else str(exc)
            raise InvalidInput(f"parameters: {message}") from None
        if options.top_k != 1:
            raise InvalidInput("parameters.top_k: the v2 protocol returns one answer per question here")
        results = await run_qa(eng, model, items, options, request, until)
        best = [r.answers[0] if r.answers and not r.is_impossible else None for r in results]
        values = {
            "answer": [b.answer if b else "" for b in best],
            "score": [
                b.score if b else qa.null_probability(r.null_score_diff)
                for b, r in zip(best, results, strict=True)
            ],
            "start": [b.start if b else 0 for b in best],
            "end": [b.end if b else 0 for b in best],
            "is_impossible": [r.is_impossible for r in results],
        }
    else:
        columns = _columns(body, CLASSIFY_INPUTS, ("text",))
        pairs = columns.get("text_pair") or [None] * len(columns["text"])
        items = [ClassifyItem(text=t, text_pair=p) for t, p in zip(columns["text"], pairs, strict=True)]
        max_seq_len = body.parameters.get("max_seq_len")
        results = await run_classify(eng, model, items, max_seq_len, False, request, until)
        values = {"label": [r.label for r in results], "score": [r.score for r in results]}
    wanted = [o.name for o in body.outputs] if body.outputs else list(values)
    unknown = sorted(set(wanted) - set(values))
    if unknown:
        raise InvalidInput(f"outputs: this model gives {', '.join(values)}; unknown {', '.join(unknown)}")
    response = {
        "model_name": name,
        "model_version": VERSION,
        "outputs": [_tensor(n, values[n]) for n in wanted],
    }
    if body.id is not None:
        response["id"] = body.id
    return response
