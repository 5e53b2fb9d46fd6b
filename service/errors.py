"""What can go wrong in the service, and the one table that turns each into a status and a JSON body.

The engine, batcher and handlers raise these domain errors and know nothing of HTTP; `STATUS` (as TEI's
one `match`) decides the status code and the `type` of {"error": {"type", "message", "request_id"}},
for the routers' exception handler and the guard's early rejections alike.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse


class ServiceError(Exception):
    def __init__(self, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class BadRequest(ServiceError):
    """The request is well formed but asks for something this model does not do."""


class Unauthorized(ServiceError):
    """No API key, or the wrong one."""


class Forbidden(ServiceError):
    """Admin routes without an API key configured."""


class ModelNotFound(ServiceError):
    """No model by that name (or it failed to load)."""


class RouteNotFound(ServiceError):
    """No route at that path."""


class MethodNotAllowed(ServiceError):
    """The route exists; the method does not."""


class PayloadTooLarge(ServiceError):
    """A body, or a request's windows, over the limit."""


class UnsupportedMediaType(ServiceError):
    """A body that is not application/json."""


class InvalidInput(ServiceError):
    """The body does not match the request schema, or its tokens do not fit the model."""


class QueueFull(ServiceError):
    """The model's queue cannot take the request's windows now (or the server is stopping)."""


class ClientGone(ServiceError):
    """The client disconnected; its windows were dropped (nobody reads the answer)."""


class InferenceFailed(ServiceError):
    """The backend failed on this request's windows."""


class ReloadFailed(ServiceError):
    """Some artifact failed to load on reload (the old model, if any, keeps serving)."""


class NotReady(ServiceError):
    """Models are loading, or the server is stopping."""


class ModelUnavailable(ServiceError):
    """The model was replaced while the request was prepared."""


class CpuWorkerLost(ServiceError):
    """A tokenization worker process died with this request in it (it is started again)."""


class DeadlineExceeded(ServiceError):
    """The request's deadline passed before its windows ran."""


class InternalError(ServiceError):
    """Anything unexpected (the log has the traceback; the body names no library internals)."""


STATUS: dict[type[ServiceError], tuple[int, str]] = {
    BadRequest: (400, "bad_request"),
    Unauthorized: (401, "unauthorized"),
    Forbidden: (403, "forbidden"),
    ModelNotFound: (404, "model_not_found"),
    RouteNotFound: (404, "not_found"),
    MethodNotAllowed: (405, "method_not_allowed"),
    PayloadTooLarge: (413, "payload_too_large"),
    UnsupportedMediaType: (415, "unsupported_media_type"),
    InvalidInput: (422, "validation_error"),
    QueueFull: (429, "queue_full"),
    ClientGone: (499, "client_closed_request"),
    InferenceFailed: (500, "inference_failed"),
    ReloadFailed: (500, "reload_failed"),
    InternalError: (500, "internal_error"),
    NotReady: (503, "not_ready"),
    ModelUnavailable: (503, "model_unavailable"),
    CpuWorkerLost: (503, "worker_restarting"),
    DeadlineExceeded: (504, "deadline_exceeded"),
}


def status_of(error: ServiceError) -> tuple[int, str]:
    return STATUS.get(type(error), STATUS[InternalError])


def error_response(
    error: ServiceError, request_id: str | None = None, path: str = "", **extra
) -> JSONResponse:
    """The error's status and body: {"error": {"type", "message", "request_id"}}; under /v2/ the Open
    Inference Protocol's {"error": "<message>"}, with type and request_id beside it."""
    status, kind = status_of(error)
    body = {"type": kind, "message": error.message}
    if request_id:
        body["request_id"] = request_id
    if path.startswith("/v2/"):
        content = {"error": body.pop("message"), **body, **extra}
    else:
        content = {"error": body, **extra}
    return JSONResponse(content, status_code=status, headers=error.headers or None)
