"""Connection hygiene on top of uvicorn's h11 protocol: read deadlines, prompt close on shutdown,
a bounded number of connections, and no log flood at the descriptor limit.

uvicorn closes idle keep-alive connections, but a client that sends half the headers or half a body
holds its connection (and, mid-body, a handler) forever, and such connections keep a graceful
shutdown waiting. Here a request must arrive whole, headers and body, within `read_timeout_s` of its
first byte (or of the connection opening); otherwise the connection is closed. On shutdown a
connection whose request has not fully arrived is closed at once.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)


class ReadDeadlineProtocol(H11Protocol):
    read_timeout_s: float = 10.0  # set by configure()

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._read_deadline: asyncio.TimerHandle | None = None
        self._arm()

    def _request_arrived(self) -> bool:
        return self.conn.their_state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED, h11.ERROR)

    def _arm(self) -> None:
        if self._read_deadline is None:
            self._read_deadline = self.loop.call_later(self.read_timeout_s, self._read_timed_out)

    def _disarm(self) -> None:
        if self._read_deadline is not None:
            self._read_deadline.cancel()
            self._read_deadline = None

    def data_received(self, data: bytes) -> None:
        if not self._request_arrived():
            self._arm()  # the clock runs from the first byte of a request
        super().data_received(data)
        if self._request_arrived() or self.transport.is_closing():
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._disarm()  # idle keep-alive is uvicorn's own timeout; the next request's first byte re-arms

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _read_timed_out(self) -> None:
        self._read_deadline = None
        if self._request_arrived() or self.transport.is_closing():
            return
        log.info("closing a connection whose request did not arrive within %.0f s", self.read_timeout_s)
        self.transport.close()

    def shutdown(self) -> None:
        if self.cycle is not None and not self.cycle.response_complete and not self._request_arrived():
            # A body still arriving (or stalled): nothing has been asked of the model yet, close now.
            self._disarm()
            self.transport.close()
            return
        super().shutdown()  # idle or half-sent headers: closed now; a request being answered: finished first


class AcceptErrorThrottle(logging.Filter):
    """At the descriptor limit asyncio logs every failed accept() with a traceback (thousands a second):
    keep one line per interval."""

    def __init__(self, interval_s: float = 10.0):
        super().__init__()
        self.interval_s = interval_s
        self._last = 0.0
        self.suppressed = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if "accept" not in record.getMessage() or "out of system resource" not in record.getMessage():
            return True
        now = time.monotonic()
        if now - self._last < self.interval_s:
            self.suppressed += 1
            return False
        self._last = now
        record.msg = (
            f"accept() failed: out of file descriptors ({self.suppressed} more suppressed); "
            "lower PRUNE_SERVE_MAX_CONNECTIONS or raise the descriptor limit"
        )
        record.args = ()
        record.exc_info = None
        self.suppressed = 0
        return True


def raise_descriptor_limit() -> int:
    """Raise the soft open-files limit to the hard one; returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def configure(read_timeout_s: float) -> type[ReadDeadlineProtocol]:
    ReadDeadlineProtocol.read_timeout_s = read_timeout_s
    logging.getLogger("asyncio").addFilter(AcceptErrorThrottle())
    return ReadDeadlineProtocol
