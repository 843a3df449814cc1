"""The gate in front of the application: concurrency limit, API key, upload size, time budget, metrics.

:class:`Gate` is a plain ASGI wrapper, so its refusals cost no routing and no body reading:

* more than ``max_inflight`` requests at once → 503 ``overloaded`` (health probes are exempt);
* with API keys configured, ``/v1/…`` and ``/metrics`` need ``Authorization: Bearer KEY`` or
  ``X-API-Key: KEY`` → else 401 (every key is compared with :func:`hmac.compare_digest`);
* a ``Content-Length`` over ``max_upload_bytes`` → 413 before any of the body is read; without one, the
  bytes are counted as they arrive and reading stops with 413 once past the limit;
* each request gets a deadline ``request_timeout_s`` ahead (a client may ask for less with the header
  ``X-Request-Timeout: SECONDS``); :func:`within_budget` turns waiting past it into 503 ``timeout``;
* every answer is counted and timed per route template, and error answers by their JSON ``code``.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from typing import Any, Awaitable, Callable

from .errors import ApiError, error_body
from .metrics import ServeMetrics

log = logging.getLogger("facekit.serve")

DEADLINE_KEY = "facekit.deadline"
BUDGET_KEY = "facekit.budget"
OPEN_PATHS = ("/healthz", "/readyz", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")


def _header(scope: dict, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value
    return None


class Gate:
    """Wraps an ASGI ``app`` with the checks in the module docstring."""

    def __init__(self, app, metrics: ServeMetrics, *, api_keys: tuple[str, ...] = (), max_upload_bytes: int,
                 request_timeout_s: float, max_inflight: int):
        self.app = app
        self.metrics = metrics
        self._keys = tuple(k.encode("utf-8") for k in api_keys)
        self.max_upload_bytes = int(max_upload_bytes)
        self.request_timeout_s = float(request_timeout_s)
        self.max_inflight = int(max_inflight)
        self.inflight = 0

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status: dict[str, Any] = {"code": 0, "error": None}

        async def recording_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            elif message["type"] == "http.response.body" and status["code"] >= 400 and status["error"] is None:
                status["error"] = _error_code(message.get("body", b""))
            await send(message)

        self.inflight += 1
        self.metrics.inflight.set(self.inflight)
        try:
            refusal = self._refusal(scope)
            budget = self._budget(scope) if refusal is None else None
            if isinstance(budget, ApiError):
                refusal = budget
            if refusal is not None:
                await _send_error(recording_send, refusal)
            else:
                scope[DEADLINE_KEY] = time.monotonic() + budget
                scope[BUDGET_KEY] = budget
                await self._call_app(scope, receive, recording_send, status)
        finally:
            self.inflight -= 1
            self.metrics.inflight.set(self.inflight)
            self.metrics.observe_request(self._endpoint(scope), scope.get("method", ""), status["code"] or 500,
                                         time.perf_counter() - t0)
            if status["error"]:
                self.metrics.errors.labels(status["error"]).inc()

    def _endpoint(self, scope: dict) -> str:
        """The route template of the request (also for requests refused before routing), else ``/other``."""
        route = scope.get("route")
        if route is None:
            from starlette.routing import Match

            route = next((r for r in getattr(self.app, "routes", ()) if r.matches(scope)[0] != Match.NONE), None)
        return getattr(route, "path", None) or "/other"

    def _refusal(self, scope: dict) -> ApiError | None:
        path = scope.get("path", "")
        if self.inflight > self.max_inflight and path not in OPEN_PATHS:
            return ApiError(503, f"the server is handling {self.max_inflight} requests; retry shortly", "overloaded",
                            {"Retry-After": "1"})
        if self._keys and (path.startswith("/v1/") or path == "/metrics") and not self._authorised(scope):
            return ApiError(401, "missing or wrong API key (send 'Authorization: Bearer KEY' or 'X-API-Key: KEY')",
                            "unauthorized", {"WWW-Authenticate": "Bearer"})
        length = _header(scope, b"content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                return ApiError(400, "invalid Content-Length header", "bad_request")
            if n > self.max_upload_bytes:
                return too_large(self.max_upload_bytes, f"the body (Content-Length {n})")
        return None

    def _budget(self, scope: dict) -> float | ApiError:
        """The request's time budget: the server's, or less when the client asks for less."""
        asked = _header(scope, b"x-request-timeout")
        if asked is None:
            return self.request_timeout_s
        try:
            value = float(asked)
        except ValueError:
            value = float("nan")
        if not value > 0:  # also NaN
            shown = asked[:40].decode("latin-1")
            return ApiError(400, f"X-Request-Timeout must be a positive number of seconds, got {shown!r}",
                            "invalid_parameter")
        return min(value, self.request_timeout_s)

    def _authorised(self, scope: dict) -> bool:
        given = _header(scope, b"x-api-key")
        if given is None:
            auth = _header(scope, b"authorization") or b""
            scheme, _, token = auth.partition(b" ")
            given = token.strip() if scheme.lower() == b"bearer" else b""
        ok = False
        for key in self._keys:  # every key compared, in constant time each
            ok |= hmac.compare_digest(given, key)
        return ok

    async def _call_app(self, scope: dict, receive: Callable, send: Callable, status: dict) -> None:
        limit, seen = self.max_upload_bytes, 0

        async def counting_receive() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise too_large(limit, "the body")
            return message

        try:
            await self.app(scope, counting_receive, send)
        except Exception:  # already answered (500 JSON) and logged by the application's handler
            if not status["code"]:
                await _send_error(send, ApiError(500, "internal error; see the server log", "internal_error"))


def too_large(limit: int, what: str) -> ApiError:
    return ApiError(413, f"{what} is over the {limit}-byte upload limit", "payload_too_large")


async def _send_error(send: Callable, e: ApiError) -> None:
    body = error_body(e.code, e.message)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in e.headers.items()]
    await send({"type": "http.response.start", "status": e.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _error_code(body: bytes) -> str:
    try:
        return str(json.loads(body)["error"]["code"])
    except Exception:  # noqa: BLE001 - not one of our JSON errors
        return "other"


# --------------------------------------------------------------------------------------- time budget


def deadline(scope: dict) -> float:
    """The request's deadline (:func:`time.monotonic` time)."""
    return scope.get(DEADLINE_KEY, float("inf"))


def timeout_error(scope: dict) -> ApiError:
    return ApiError(503, f"the request exceeded its {scope.get(BUDGET_KEY, 0):g} s time budget", "timeout",
                    {"Retry-After": "1"})


async def within_budget(scope: dict, awaitable: Awaitable) -> Any:
    """``await awaitable``, or 503 ``timeout`` once the request's deadline has passed."""
    left = deadline(scope) - time.monotonic()
    if left <= 0:
        if asyncio.isfuture(awaitable):
            awaitable.cancel()
        elif hasattr(awaitable, "close"):
            awaitable.close()
        raise timeout_error(scope)
    try:
        return await asyncio.wait_for(awaitable, left)
    except (asyncio.TimeoutError, TimeoutError):
        raise timeout_error(scope) from None
