"""The ASGI layer in front of every route: request id, authentication, content type and body size,
in-flight gauge, request metrics and the access log. It runs before routing, so a request without
the key gets 401 before any 404 or 422 can say what the server holds."""

from __future__ import annotations

import hmac
import json
import logging
import re
import time
import uuid

from service.errors import Forbidden, PayloadTooLarge, Unauthorized, UnsupportedMediaType, error_response
from service.metrics import Metrics
from service.settings import Settings

access_log = logging.getLogger("prune_serve.access")

# The routes that take a JSON body (others are the router's to answer: 404 / 405).
BODY_ROUTES = re.compile(
    r"^(/v1/models/[^/]+/(qa|classify)|/models/[^/]+|/v2/models/[^/]+(/versions/[^/]+)?/infer)$"
)
OPEN_PATHS = ("/health", "/ready")
ADMIN_PREFIX = "/v1/admin/"
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def request_id_of(scope) -> str:
    """The client's X-Request-ID when it is a sane token, or a new one."""
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            text = value.decode("latin-1")
            if REQUEST_ID.match(text):
                return text
    return uuid.uuid4().hex


class RequestGuard:
    """Pure ASGI middleware; `state` is the app's ServiceState (settings, metrics, models)."""

    def __init__(self, app, state):
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        settings: Settings = self.state.settings
        metrics: Metrics = self.state.metrics
        start = time.perf_counter()
        request_id = scope["request_id"] = request_id_of(scope)
        status_holder = {"status": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
                message = {
                    **message,
                    "headers": [*message.get("headers", []), (b"x-request-id", request_id.encode())],
                }
            await send(message)

        metrics.in_flight.inc()
        try:
            rejection = self._authenticate(scope, settings) or self._reject(scope, settings)
            if rejection is not None:
                await rejection(scope, receive, send_wrapper)
                return
            if scope["method"] == "POST" and BODY_ROUTES.match(scope["path"]):
                body = await self._read_body(receive, settings.max_body_bytes)
                if body is None:  # the client went away mid-body: nobody to answer
                    return
                if body is False:
                    too_large = error_response(
                        PayloadTooLarge(f"body is over the limit of {settings.max_body_bytes} bytes"),
                        request_id,
                        scope["path"],
                    )
                    await too_large(scope, receive, send_wrapper)
                    return
                receive = self._replay(body, receive)
            await self.app(scope, receive, send_wrapper)
        finally:
            metrics.in_flight.dec()
            self._record(scope, status_holder["status"], time.perf_counter() - start)

    def _record(self, scope, status: int, seconds: float) -> None:
        route = scope.get("route")
        name = (scope.get("path_params") or {}).get("name", "")
        model = name if name in self.state.models else ""
        if route is not None:
            self.state.metrics.request_duration.labels(model, route.path, str(status)).observe(seconds)
        if self.state.settings.access_log:
            access_log.info(
                json.dumps(
                    {
                        "time": round(time.time(), 3),
                        "request_id": scope["request_id"],
                        "method": scope["method"],
                        "route": route.path if route is not None else None,
                        "status": status,
                        "duration_ms": round(seconds * 1000, 2),
                        "model": model or None,
                        "windows": scope.get("windows"),
                    }
                )
            )

    @staticmethod
    def _authenticate(scope, settings: Settings):
        path = scope["path"]
        rid = scope["request_id"]
        if settings.api_key is None:
            if path.startswith(ADMIN_PREFIX) and not settings.open_admin:
                return error_response(
                    Forbidden(
                        "admin routes are off without an API key: set PRUNE_SERVE_API_KEY "
                        "(or PRUNE_SERVE_OPEN_ADMIN=true on a trusted network)"
                    ),
                    rid,
                    scope["path"],
                )
            return None
        if path in OPEN_PATHS or (path == "/metrics" and not settings.metrics_require_key):
            return None
        if scope["method"] == "OPTIONS" and settings.cors_origins:
            return None  # CORS preflights carry no credentials; the CORS middleware answers them
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        expected = settings.api_key.get_secret_value().encode()
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected):
            return error_response(
                Unauthorized(
                    "send the API key as 'Authorization: Bearer KEY'", {"WWW-Authenticate": "Bearer"}
                ),
                rid,
                scope["path"],
            )
        return None

    @staticmethod
    def _reject(scope, settings: Settings):
        # Only the POST routes take a body; anything else is the router's to answer (404 / 405).
        if scope["method"] != "POST" or not BODY_ROUTES.match(scope["path"]):
            return None
        rid = scope["request_id"]
        headers = dict(scope["headers"])
        content_type = headers.get(b"content-type", b"").decode("latin-1").split(";")[0].strip().lower()
        v2 = scope["path"].startswith("/v2/")
        if v2 and b"inference-header-content-length" in headers:
            return error_response(
                UnsupportedMediaType(
                    "the binary tensor extension is not supported: send tensors as JSON "
                    "(tritonclient: binary_data=False on inputs and outputs)"
                ),
                rid,
                scope["path"],
            )
        if v2 and not content_type:
            # Open Inference Protocol clients (tritonclient) send JSON without a content type: say it
            # for them, so the router parses the body as the JSON it is.
            scope["headers"] = [*scope["headers"], (b"content-type", b"application/json")]
            content_type = "application/json"
        if content_type != "application/json":
            return error_response(
                UnsupportedMediaType(f"content-type must be application/json, got {content_type or 'none'}"),
                rid,
                scope["path"],
            )
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > settings.max_body_bytes:
            return error_response(
                PayloadTooLarge(f"body is {int(length)} bytes, the limit is {settings.max_body_bytes}"),
                rid,
                scope["path"],
            )
        return None

    @staticmethod
    async def _read_body(receive, limit: int) -> bytes | bool | None:
        """The whole body; False once it passes `limit` (chunked bodies have no content-length);
        None when the client disconnected first."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            size += len(message.get("body", b""))
            if size > limit:
                return False
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


def validation_message(errors) -> str:
    messages = []
    for e in errors[:5]:
        if e.get("type") == "json_invalid":
            messages.append(f"body: not valid JSON ({(e.get('ctx') or {}).get('error', 'decode error')})")
            continue
        field = _field(e.get("loc", ()))
        messages.append(f"{field}: {e.get('msg', 'invalid')}")
    return "; ".join(messages)
