"""The native API: list and describe models, question answering, classification."""

from __future__ import annotations

from fastapi import APIRouter, Request

from packer.artifact import QA
from service.errors import BadRequest
from service.handlers import run_classify, run_qa
from service.routes.deps import ERRORS, REQUEST_ERRORS, Deadline, EngineDep, app_engine
from service.schemas import (
    ClassifyRequest,
    ClassifyResponse,
    ModelInfo,
    ModelsResponse,
    QARequest,
    QAResponse,
)

router = APIRouter(prefix="/v1")


@router.get("/models", response_model=ModelsResponse, responses={401: ERRORS[401]})
async def list_models(request: Request):
    return {"models": app_engine(request).describe()}


@router.get("/models/{name}", response_model=ModelInfo, responses={401: ERRORS[401], 404: ERRORS[404]})
async def model_info(name: str, request: Request):
    """Where the model came from (source and sha256), packer version, variant, backend, limits, state."""
    return app_engine(request).model(name).info()


@router.post("/models/{name}/qa", response_model=QAResponse, responses=REQUEST_ERRORS)
async def answer_questions(
    name: str,
    body: QARequest,
    request: Request,
    eng: EngineDep,
    until: Deadline,
):
    model = eng.model(name, QA)
    results = await run_qa(eng, model, body.all_items(), body, request, until)
    return {"model": name, "results": results}


@router.post("/models/{name}/classify", response_model=ClassifyResponse, responses=REQUEST_ERRORS)
async def classify_texts(
    name: str,
    body: ClassifyRequest,
    request: Request,
    eng: EngineDep,
    until: Deadline,
):
    model = eng.model(name)
    if model.task == QA:
        raise BadRequest(f"model {name} does question answering; use /v1/models/{name}/qa")
    results = await run_classify(
        eng, model, body.all_items(), body.max_seq_len, body.return_all_scores, request, until
    )
    return {"model": name, "results": results}
