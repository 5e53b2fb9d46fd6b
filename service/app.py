"""The app factory: the engine's lifespan, the guard, one table from errors to responses, the routers,
and the API docs served from the service's own assets (no CDN)."""

from __future__ import annotations

import asyncio
import logging
import signal
from contextlib import asynccontextmanager, suppress
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from packer import __version__
from service.engine import Engine
from service.errors import (
    BadRequest,
    InternalError,
    InvalidInput,
    MethodNotAllowed,
    ModelNotFound,
    RouteNotFound,
    ServiceError,
    error_response,
    status_of,
)
from service.guard import RequestGuard, validation_message
from service.metrics import Metrics
from service.routes import hf, ops, v1, v2
from service.settings import Settings

log = logging.getLogger("prune_serve")

DOCS_ASSETS = "/docs/assets"


def _model_label(request: Request, engine: Engine) -> str:
    name = request.path_params.get("name", "")
    return name if name in engine.models else ""


def install_error_handlers(app: FastAPI, engine: Engine) -> None:
    """Every error becomes a ServiceError, and errors.STATUS its status and body."""

    def respond(request: Request, error: ServiceError):
        engine.metrics.errors.labels(_model_label(request, engine), status_of(error)[1]).inc()
        return error_response(error, request.scope.get("request_id"), request.url.path)

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError):
        return respond(request, exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        name = request.path_params.get("name")
        if name is not None and name not in engine.models:  # an unknown model is 404 whatever the body
            try:
                engine.model(name)
            except ModelNotFound as missing:
                return await service_error(request, missing)
        return respond(request, InvalidInput(validation_message(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 400 and exc.detail == "There was an error parsing the body":
            # Undecodable bytes or nesting too deep for the JSON parser: the same fix as any bad JSON.
            return respond(request, InvalidInput("body: not valid JSON (send UTF-8 JSON of modest depth)"))
        # Starlette's own 404 and 405 (no route, wrong method): not counted as model errors.
        error = {404: RouteNotFound, 405: MethodNotAllowed}.get(exc.status_code, BadRequest)
        return error_response(
            error(str(exc.detail), getattr(exc, "headers", None)), request.scope.get("request_id")
        )

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        # The log has the traceback; the body names no library internals.
        log.exception(
            "unexpected error on %s (request %s)", request.url.path, request.scope.get("request_id")
        )
        return respond(request, InternalError("internal error; the server log has the cause"))


def install_docs(app: FastAPI) -> None:
    """Swagger UI from the swagger-ui-bundle package, so /docs works with no internet."""
    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:  # the [serve] extra installs it; without it /docs says how to get it
        swagger_ui_path = None

    if swagger_ui_path is not None:
        app.mount(DOCS_ASSETS, StaticFiles(directory=Path(swagger_ui_path)), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs():
        if swagger_ui_path is None:
            return error_response(
                RouteNotFound("API docs need the swagger-ui-bundle package (pip install swagger-ui-bundle)")
            )
        return get_swagger_ui_html(
            openapi_url=app.openapi_url,
            title="prune-serve API",
            swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_ASSETS}/favicon-32x32.png",
        )


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    engine = Engine(settings, Metrics())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if settings.api_key is None:
            log.warning(
                "no API key (PRUNE_SERVE_API_KEY unset or empty): every route is open to anyone who can "
                "reach %s",
                "this port",
            )
        if settings.api_key is None and settings.open_admin:
            log.warning(
                "PRUNE_SERVE_OPEN_ADMIN: POST /v1/admin/reload is open to ANYONE; "
                "use only on a trusted network"
            )
        await asyncio.to_thread(engine.start)
        with suppress(NotImplementedError, RuntimeError, AttributeError):  # no SIGHUP off the main thread
            asyncio.get_running_loop().add_signal_handler(
                signal.SIGHUP, lambda: asyncio.ensure_future(engine.reload())
            )
        served = ", ".join(f"{m.name} ({m.backend.name})" for m in engine.models.values())
        log.info(
            "ready: %s%s",
            served or "no model",
            f"; failed: {', '.join(engine.failed)}" if engine.failed else "",
        )
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(
        title="prune-serve",
        version=__version__,
        description="Packed pruned transformers: extractive question answering and text classification.",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.engine = engine
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
            expose_headers=["X-Request-ID"],
        )
    app.add_middleware(RequestGuard, state=engine)  # outermost: runs before routing and CORS
    install_error_handlers(app, engine)
    install_docs(app)
    for router in (ops.router, v1.router, v2.router, hf.router):
        app.include_router(router)
    return app
