"""Unhandled exceptions: answered with the error envelope on a kept-alive connection, and counted."""

from __future__ import annotations

import logging
import threading

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sdserve.api.envelope import error_response
from sdserve.errors import SdserveError
from sdserve.settings import Settings

log = logging.getLogger(__name__)

_lock = threading.Lock()
_count = 0  # unhandled exceptions in this process


class InternalError(SdserveError):
    http_status = 500

    def __init__(self) -> None:
        super().__init__("Internal server error. Please try again.")


def record_internal_error(scope: Scope, exc: BaseException) -> None:
    """Log it (with the route) and count it: in `legacy` mode the client saw a 200, so the count
    in /metrics is how an operator sees these."""
    global _count
    with _lock:
        _count += 1
    route = getattr(scope.get("route"), "path", None) or scope.get("path")
    log.error("unhandled error on %s %s", scope.get("method"), route, exc_info=exc)


def internal_error_count() -> int:
    with _lock:
        return _count


def internal_error_response(settings: Settings) -> JSONResponse:
    return error_response(InternalError(), settings)


class InternalErrors:
    """Inside Starlette's ServerErrorMiddleware, which answers and then re-raises, so that the
    server closes the connection. Answering here ends the request normally: keep-alive holds."""

    def __init__(self, app: ASGIApp, settings: Settings):
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as exc:
            record_internal_error(scope, exc)
            if started:  # half an answer is out: only closing the connection can end it
                raise
            await internal_error_response(self.settings)(scope, receive, send)
