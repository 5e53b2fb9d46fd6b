"""The Hugging Face Inference API shape: POST /models/{name} with {"inputs", "parameters"}."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from packer.artifact import QA
from packer.runtime.tasks import qa
from service.engine import Engine
from service.errors import InvalidInput
from service.guard import validation_message
from service.handlers import run_classify, run_qa
from service.registry import ServedModel
from service.routes.deps import REQUEST_ERRORS, Deadline, EngineDep
from service.schemas import ClassifyItem, HFRequest, QAItem, QARequest

router = APIRouter(tags=["Hugging Face Inference API"])


@router.post("/models/{name}", responses=REQUEST_ERRORS)
async def hf_inference(
    name: str,
    body: HFRequest,
    request: Request,
    eng: EngineDep,
    until: Deadline,
):
    model = eng.model(name)
    if model.task == QA:
        return await _hf_qa(eng, model, body, request, until)
    return await _hf_classify(eng, model, body, request, until)


def _invalid(exc: ValidationError) -> InvalidInput:
    return InvalidInput(validation_message(exc.errors()))


async def _hf_qa(rt: Engine, model: ServedModel, body: HFRequest, request, deadline: float):
    inputs = body.inputs
    single = isinstance(inputs, dict)
    raw_items = [inputs] if single else inputs
    if not isinstance(raw_items, list) or not all(isinstance(i, dict) for i in raw_items):
        raise InvalidInput("inputs: question answering takes {question, context} or a list of them")
    params = {k: v for k, v in body.parameters.items() if k in QARequest.model_fields and k not in ("items",)}
    try:
        items = [
            QAItem.model_validate({"question": i.get("question"), "context": i.get("context")})
            for i in raw_items
        ]
        req = QARequest.model_validate({**params, "items": [i.model_dump() for i in items]})
    except ValidationError as exc:
        raise _invalid(exc) from None
    results = await run_qa(rt, model, items, req, request, deadline)
    out = []
    for r in results:
        if r.is_impossible:
            null = qa.null_probability(r.null_score_diff)
            answers = [{"answer": "", "score": null, "start": 0, "end": 0}]
        else:
            answers = [a.model_dump() for a in r.answers]
        out.append(answers[0] if req.top_k == 1 else answers)
    return JSONResponse(out[0] if single else out)


async def _hf_classify(rt: Engine, model: ServedModel, body: HFRequest, request, deadline: float):
    inputs = body.inputs
    raw_items = inputs if isinstance(inputs, list) else [inputs]
    try:
        items = [ClassifyItem.model_validate(i if isinstance(i, dict) else {"text": i}) for i in raw_items]
    except ValidationError as exc:
        raise _invalid(exc) from None
    top_k = body.parameters.get("top_k")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise InvalidInput("parameters.top_k: must be a positive integer")
    results = await run_classify(rt, model, items, None, True, request, deadline)
    out = []
    for r in results:
        ranked = sorted(
            ({"label": k, "score": v} for k, v in (r.scores or {}).items()), key=lambda d: -d["score"]
        )
        out.append(ranked[:top_k] if top_k else ranked)
    return JSONResponse(out)
