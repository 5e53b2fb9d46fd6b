"""Exceptions of the service and the one JSON error shape: {"error": {"type", "message"}}."""

from __future__ import annotations

from fastapi.responses import JSONResponse


class ServiceError(Exception):
    status = 500
    type = "internal_error"

    def __init__(self, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class BadRequest(ServiceError):
    status, type = 400, "bad_request"


class Unauthorized(ServiceError):
    status, type = 401, "unauthorized"


class Forbidden(ServiceError):
    status, type = 403, "forbidden"


class ModelNotFound(ServiceError):
    status, type = 404, "model_not_found"


class PayloadTooLarge(ServiceError):
    status, type = 413, "payload_too_large"


class InvalidInput(ServiceError):
    status, type = 422, "validation_error"


class QueueFull(ServiceError):
    status, type = 429, "queue_full"


class NotReady(ServiceError):
    status, type = 503, "not_ready"


class ModelUnavailable(ServiceError):
    status, type = 503, "model_unavailable"


class DeadlineExceeded(ServiceError):
    status, type = 504, "deadline_exceeded"


class InferenceFailed(ServiceError):
    status, type = 500, "inference_failed"


def error_response(
    status: int,
    type_: str,
    message: str,
    headers: dict[str, str] | None = None,
    request_id: str | None = None,
    **extra,
) -> JSONResponse:
    error = {"type": type_, "message": message}
    if request_id:
        error["request_id"] = request_id
    return JSONResponse({"error": error, **extra}, status_code=status, headers=headers)
