"""Operations: liveness, readiness, metrics, reload."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.errors import NotReady, ReloadFailed, error_response
from service.routes.deps import ERRORS, EngineDep, app_engine

router = APIRouter(tags=["ops"])


@router.get("/health")
async def health() -> dict:
    return {"status": "ok"}


@router.get("/ready", responses={503: ERRORS[503]})
async def ready(request: Request):
    """200 when models serve: at least one (or every one, with PRUNE_SERVE_REQUIRE_ALL_MODELS)."""
    eng = app_engine(request)
    if not eng.is_ready:
        why = "models are loading or the server is stopping" if not eng.ready else "a required model failed"
        return error_response(NotReady(why), failed=sorted(eng.failed))
    return {"status": "ready", "models": sorted(eng.models), "failed": sorted(eng.failed)}


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus exposition format"}},
)
async def metrics(request: Request) -> Response:
    return Response(generate_latest(app_engine(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.post(
    "/v1/admin/reload",
    responses={401: ERRORS[401], 403: ERRORS[403], 500: {"description": "some artifact failed to load"}},
)
async def reload(request: Request, eng: EngineDep):
    """Load new and changed artifacts (as SIGHUP does); a failed one leaves the old model serving."""
    result = await eng.reload()
    body = {
        "loaded": result.loaded,
        "unchanged": result.unchanged,
        "removed": result.removed,
        "failed": result.failed,
    }
    if result.failed:
        failed = ReloadFailed("; ".join(result.failed.values()))
        return error_response(failed, request.scope.get("request_id"), reload=body)
    return body
