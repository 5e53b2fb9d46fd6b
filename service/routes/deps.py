"""What routes depend on: the engine (ready), the request's deadline, the shared error docs."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import Depends, Request

from service.engine import Engine
from service.schemas import ErrorResponse


def app_engine(request: Request) -> Engine:
    """The app's engine, typed (the app's state holds nothing else)."""
    return request.app.state.engine


def engine(request: Request) -> Engine:
    """The engine, or 503 while models load or the server stops."""
    return app_engine(request).require_ready()


def deadline(request: Request) -> float:
    return time.monotonic() + app_engine(request).settings.request_timeout_s


EngineDep = Annotated[Engine, Depends(engine)]
Deadline = Annotated[float, Depends(deadline)]

ERRORS = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        400: "wrong route for the model's task",
        401: "missing or wrong API key",
        403: "admin routes are off without an API key",
        404: "unknown model",
        413: "payload too large (body, or more windows than one request may make)",
        415: "not application/json",
        422: "invalid input (the message names the field)",
        429: "queue full (Retry-After)",
        503: "not ready, or the model was replaced mid-request (Retry-After)",
        504: "deadline passed",
    }.items()
}
REQUEST_ERRORS = {c: ERRORS[c] for c in (400, 401, 404, 413, 415, 422, 429, 503, 504)}
