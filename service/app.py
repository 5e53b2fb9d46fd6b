"""The HTTP layer: app factory, lifespan (load, warm up, drain) and thin routes."""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, suppress

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from packer.arch import QA
from service.batching import Batcher, BatchLimits
from service.errors import (
    BadRequest,
    InvalidInput,
    ModelNotFound,
    NotReady,
    ServiceError,
    Unauthorized,
    error_response,
)
from service.handlers import ClientGone, Runtime, run_classify, run_qa
from service.metrics import Metrics
from service.registry import Reload, ServedModel, load_models, reload_models
from service.schemas import (
    ClassifyItem,
    ClassifyRequest,
    ClassifyResponse,
    ErrorResponse,
    HFRequest,
    ModelsResponse,
    QAItem,
    QARequest,
    QAResponse,
)
from service.settings import Settings

log = logging.getLogger("prune_serve")

ERRORS = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        400: "bad request",
        401: "missing or wrong API key",
        404: "unknown model",
        413: "payload too large",
        415: "not application/json",
        422: "invalid input (the message names the field)",
        429: "queue full (Retry-After)",
        503: "not ready",
        504: "deadline passed",
    }.items()
}


POST_PREFIXES = ("/v1/models/", "/models/")


class RequestGuard:
    """Pure ASGI: content type and body size before any parsing, in-flight gauge, request metrics."""

    def __init__(self, app, state: dict):
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        settings: Settings = self.state["settings"]
        metrics: Metrics = self.state["metrics"]
        start = time.perf_counter()
        status_holder = {"status": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
            await send(message)

        metrics.in_flight.inc()
        try:
            rejection = self._reject(scope, settings)
            if rejection is not None:
                await rejection(scope, receive, send_wrapper)
                return
            if scope["method"] == "POST" and scope["path"].startswith(POST_PREFIXES):
                body = await self._read_body(receive, settings.max_body_bytes)
                if body is None:
                    too_large = error_response(
                        413, "payload_too_large", f"body is over the limit of {settings.max_body_bytes} bytes"
                    )
                    await too_large(scope, receive, send_wrapper)
                    return
                receive = self._replay(body, receive)
            await self.app(scope, receive, send_wrapper)
        finally:
            metrics.in_flight.dec()
            route = scope.get("route")
            if route is not None:
                name = (scope.get("path_params") or {}).get("name", "")
                model = name if name in self.state.get("models", {}) else ""
                metrics.request_duration.labels(model, route.path, str(status_holder["status"])).observe(
                    time.perf_counter() - start
                )

    @staticmethod
    def _reject(scope, settings: Settings):
        # Only the POST routes take a body; anything else is the router's to answer (404 / 405).
        if scope["method"] != "POST" or not scope["path"].startswith(POST_PREFIXES):
            return None
        headers = dict(scope["headers"])
        content_type = headers.get(b"content-type", b"").decode("latin-1").split(";")[0].strip().lower()
        if content_type != "application/json":
            return error_response(
                415,
                "unsupported_media_type",
                f"content-type must be application/json, got {content_type or 'none'}",
            )
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > settings.max_body_bytes:
            return error_response(
                413,
                "payload_too_large",
                f"body is {int(length)} bytes, the limit is {settings.max_body_bytes}",
            )
        return None

    @staticmethod
    async def _read_body(receive, limit: int) -> bytes | None:
        """The whole body, or None once it passes `limit` (chunked bodies have no content-length)."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b"".join(chunks)
            size += len(message.get("body", b""))
            if size > limit:
                return None
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                return b"".join(chunks)

    @staticmethod
    def _replay(body: bytes, receive):
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later calls watch for the client going away

        return replay


def _field(loc) -> str:
    parts = [str(p) for p in loc if p not in ("body",)]
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out or "body"


def _validation_message(errors) -> str:
    messages = []
    for e in errors[:5]:
        if e.get("type") == "json_invalid":
            messages.append(f"body: not valid JSON ({(e.get('ctx') or {}).get('error', 'decode error')})")
            continue
        field = _field(e.get("loc", ()))
        messages.append(f"{field}: {e.get('msg', 'invalid')}")
    return "; ".join(messages)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics()
    state: dict = {"settings": settings, "metrics": metrics, "models": {}, "ready": False}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        models = load_models(settings)
        batcher = Batcher(metrics)

        def serve(model: ServedModel, replacing: ServedModel | None = None) -> None:
            limits = BatchLimits(
                # A backend that runs each window alone gains nothing from batches: schedule windows singly.
                max_batch_size=1 if model.backend.per_window else settings.max_batch_size,
                max_batch_tokens=settings.batch_tokens_for(model.backend.device),
                max_wait_ms=settings.max_wait_ms,
                queue_size=settings.queue_size,
                length_grouping=settings.length_grouping,
            )
            batcher.register(model.name, model.backend.run, model.pad_id, limits)
            if replacing is not None:
                retire(replacing)
            metrics.model_info.labels(model.name, model.variant, model.backend.name, str(model.params)).set(1)
            metrics.queue_depth.labels(model.name).set(batcher.depth(model.name))

        def retire(model: ServedModel) -> None:
            labels = (model.name, model.variant, model.backend.name, str(model.params))
            with suppress(KeyError):
                metrics.model_info.remove(*labels)

        for model in models.values():
            serve(model)
        batcher.start()
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")
        reload_lock = asyncio.Lock()

        async def reload() -> Reload:
            async with reload_lock:
                result = await asyncio.to_thread(reload_models, settings, state["models"])
                for name in result.loaded:
                    serve(result.models[name], state["models"].get(name))
                for name in result.removed:
                    retire(state["models"][name])
                state["models"] = result.models
                for name in result.failed:
                    metrics.errors.labels(name if name in result.models else "", "reload_failed").inc()
                return result

        state.update(
            models=models, runtime=Runtime(settings, metrics, batcher, pool), ready=True, reload=reload
        )
        with suppress(
            NotImplementedError, RuntimeError, AttributeError
        ):  # no SIGHUP off the main thread / Unix
            asyncio.get_running_loop().add_signal_handler(
                signal.SIGHUP, lambda: asyncio.ensure_future(reload())
            )
        log.info("ready: %s", ", ".join(f"{m.name} ({m.backend.name})" for m in models.values()))
        try:
            yield
        finally:
            state["ready"] = False
            batcher.stop(timeout=settings.graceful_shutdown_s)
            pool.shutdown(wait=False)

    app = FastAPI(
        title="prune-serve",
        version="0.1.0",
        description="Packed pruned transformers: extractive question answering and text classification.",
        lifespan=lifespan,
    )
    app.state.prune_serve = state
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    app.add_middleware(RequestGuard, state=state)

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError):
        name = request.path_params.get("name", "")
        metrics.errors.labels(name if name in state["models"] else "", exc.type).inc()
        return error_response(exc.status, exc.type, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        name = request.path_params.get("name")
        if name is not None and name not in state["models"]:  # an unknown model is 404 whatever the body
            return await service_error(request, unknown_model(name))
        metrics.errors.labels(name or "", "validation_error").inc()
        return error_response(422, "validation_error", _validation_message(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 400 and exc.detail == "There was an error parsing the body":
            # Undecodable bytes or nesting too deep for the JSON parser: the same fix as any bad JSON.
            metrics.errors.labels("", "validation_error").inc()
            return error_response(
                422, "validation_error", "body: not valid JSON (send UTF-8 JSON of modest depth)"
            )
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, kind, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        log.exception("unexpected error on %s", request.url.path)
        metrics.errors.labels("", "internal_error").inc()
        return error_response(500, "internal_error", f"internal error: {type(exc).__name__}")

    def unknown_model(name: str) -> ModelNotFound:
        return ModelNotFound(
            f"no model named {name!r}; served models: {', '.join(sorted(state['models'])) or 'none'}"
        )

    def require_key(request: Request) -> None:
        if settings.api_key is None:
            return
        expected = settings.api_key.get_secret_value().encode()
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected):
            raise Unauthorized(
                "send the API key as 'Authorization: Bearer KEY'", {"WWW-Authenticate": "Bearer"}
            )

    def runtime() -> Runtime:
        if not state["ready"]:
            raise NotReady("the server is not ready", {"Retry-After": "1"})
        return state["runtime"]

    def served(name: str, task: str | None = None) -> ServedModel:
        model = state["models"].get(name)
        if model is None:
            raise unknown_model(name)
        if task is not None and model.task != task:
            route = "qa" if model.task == QA else "classify"
            raise BadRequest(f"model {name} does {model.task}; use /v1/models/{name}/{route}")
        return model

    def deadline() -> float:
        return time.monotonic() + settings.request_timeout_s

    keyed = [Depends(require_key)]

    @app.get("/health", tags=["ops"])
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready", tags=["ops"], responses={503: ERRORS[503]})
    async def ready():
        if not state["ready"]:
            return error_response(503, "not_ready", "models are loading or the server is stopping")
        return {"status": "ready", "models": sorted(state["models"])}

    @app.get(
        "/metrics",
        tags=["ops"],
        dependencies=keyed if settings.metrics_require_key else [],
        response_class=PlainTextResponse,
        responses={200: {"content": {"text/plain": {}}, "description": "Prometheus exposition format"}},
    )
    async def metrics_route() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=keyed, response_model=ModelsResponse, responses={401: ERRORS[401]})
    async def list_models():
        return {"models": [m.describe() for m in state["models"].values()]}

    @app.post(
        "/v1/admin/reload",
        dependencies=keyed,
        tags=["ops"],
        responses={
            401: ERRORS[401],
            500: {"description": "some artifact failed to load; the old model serves"},
        },
    )
    async def reload_models_route():
        """Load new and changed artifacts (as SIGHUP does); a failed one leaves the old model serving."""
        runtime()
        result = await state["reload"]()
        body = {
            "loaded": result.loaded,
            "unchanged": result.unchanged,
            "removed": result.removed,
            "failed": result.failed,
        }
        if result.failed:
            message = "; ".join(f"{name}: {why}" for name, why in result.failed.items())
            return JSONResponse({"error": {"type": "reload_failed", "message": message}, "reload": body}, 500)
        return body

    qa_errors = {c: ERRORS[c] for c in (400, 401, 404, 413, 415, 422, 429, 503, 504)}

    @app.post("/v1/models/{name}/qa", dependencies=keyed, response_model=QAResponse, responses=qa_errors)
    async def answer_questions(name: str, body: QARequest, request: Request):
        rt = runtime()
        model = served(name, QA)
        try:
            results = await run_qa(rt, model, body.all_items(), body, request, deadline())
        except ClientGone:
            return Response(status_code=499)
        return {"model": name, "results": results}

    @app.post(
        "/v1/models/{name}/classify", dependencies=keyed, response_model=ClassifyResponse, responses=qa_errors
    )
    async def classify_texts(name: str, body: ClassifyRequest, request: Request):
        rt = runtime()
        model = served(name)
        if model.task == QA:
            raise BadRequest(f"model {name} does question answering; use /v1/models/{name}/qa")
        try:
            results = await run_classify(
                rt, model, body.all_items(), body.max_seq_len, body.return_all_scores, request, deadline()
            )
        except ClientGone:
            return Response(status_code=499)
        return {"model": name, "results": results}

    @app.post("/models/{name}", dependencies=keyed, responses=qa_errors, tags=["Hugging Face Inference API"])
    async def hf_inference(name: str, body: HFRequest, request: Request):
        rt = runtime()
        model = served(name)
        try:
            if model.task == QA:
                return await _hf_qa(rt, model, body, request, deadline())
            return await _hf_classify(rt, model, body, request, deadline())
        except ClientGone:
            return Response(status_code=499)

    return app


def _invalid(exc: ValidationError) -> InvalidInput:
    return InvalidInput(_validation_message(exc.errors()))


async def _hf_qa(rt: Runtime, model: ServedModel, body: HFRequest, request, deadline: float):
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
            null = 1 / (1 + math.exp(-max(min(r.null_score_diff, 50), -50)))
            answers = [{"answer": "", "score": null, "start": 0, "end": 0}]
        else:
            answers = [a.model_dump() for a in r.answers]
        out.append(answers[0] if req.top_k == 1 else answers)
    return JSONResponse(out[0] if single else out)


async def _hf_classify(rt: Runtime, model: ServedModel, body: HFRequest, request, deadline: float):
    inputs = body.inputs
    raw_items = inputs if isinstance(inputs, list) else [inputs]
    try:
        items = [ClassifyItem.model_validate(i if isinstance(i, dict) else {"text": i}) for i in raw_items]
    except ValidationError as exc:
        raise _invalid(exc) from None
    top_k = body.parameters.get("top_k")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise InvalidInput("parameters.top_k: must be a positive integer")
    results = await run_classify(rt, model, items, 512, True, request, deadline)
    out = []
    for r in results:
        ranked = sorted(
            ({"label": k, "score": v} for k, v in (r.scores or {}).items()), key=lambda d: -d["score"]
        )
        out.append(ranked[:top_k] if top_k else ranked)
    return JSONResponse(out)
