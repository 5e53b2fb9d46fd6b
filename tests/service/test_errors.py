"""The one table from errors to responses covers every error the service raises."""

import inspect
import json

from service import errors


def test_every_service_error_has_its_status_and_type():
    classes = [
        c for _, c in inspect.getmembers(errors, inspect.isclass) if issubclass(c, errors.ServiceError)
    ]
    missing = [c.__name__ for c in classes if c is not errors.ServiceError and c not in errors.STATUS]
    assert missing == []
    kinds = [kind for _, kind in errors.STATUS.values()]
    assert len(kinds) == len(set(kinds))  # a type names one kind of error
    assert all(400 <= status < 600 for status, _ in errors.STATUS.values())


def test_an_error_becomes_its_status_body_and_headers():
    response = errors.error_response(
        errors.QueueFull("model m is full", {"Retry-After": "1"}), "rid-1", extra=1
    )
    assert response.status_code == 429 and response.headers["retry-after"] == "1"
    body = json.loads(response.body)
    assert body == {
        "error": {"type": "queue_full", "message": "model m is full", "request_id": "rid-1"},
        "extra": 1,
    }
    # An error class the table does not know is an internal error, never a made-up status.
    assert errors.status_of(errors.ServiceError("x")) == (500, "internal_error")
