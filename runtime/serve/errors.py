"""Every error the service answers is JSON ``{"error": {"code", "message"}}``; no traceback reaches a client.

:class:`ApiError` carries an HTTP status, a stable machine-readable ``code`` and a one-line message.
:func:`install_error_handlers` maps the framework's own errors (unknown route, wrong method, invalid
parameters) and the runtime's (refused image, no face) to that shape; anything unexpected is a 500 whose
message names only the exception type (the traceback goes to the server log).
"""
from __future__ import annotations

import json
import logging

from ..gallery import GalleryError
from ..image_io import ImageError
from ..messages import one_line
from ..pipeline import NoFaceError

log = logging.getLogger("facekit.serve")
#: longest error message in a response body (longer ones are cut, ending "…")
MESSAGE_LIMIT = 500

#: status → the code used when an error of that status has no more specific one
DEFAULT_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
                 409: "conflict", 413: "payload_too_large", 415: "unsupported_media_type",
                 422: "invalid_parameter", 500: "internal_error", 503: "unavailable"}


class ApiError(Exception):
    """An error answered as ``status`` with ``{"error": {"code": code, "message": message}}``."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = int(status)
        self.code = code or DEFAULT_CODES.get(self.status, "error")
        self.message = one_line(message, MESSAGE_LIMIT)
        self.headers = headers or {}


def error_body(code: str, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": one_line(message, MESSAGE_LIMIT)}}).encode("utf-8")


#: runtime exceptions that are the client's input's fault: status and code
RUNTIME_ERRORS = ((ImageError, 422, "invalid_image"), (NoFaceError, 422, "no_face"),
                  (GalleryError, 422, "invalid_enrolment"))


def install_error_handlers(app) -> None:
    """Answer every error of ``app`` (a FastAPI application) as JSON."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException
    from starlette.responses import Response

    def respond(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
        return Response(error_body(code, message), status_code=status, media_type="application/json",
                        headers=headers)

    async def api_error(request, exc: ApiError):
        return respond(exc.status, exc.code, exc.message, exc.headers)

    async def http_error(request, exc: HTTPException):
        message = exc.detail if isinstance(exc.detail, str) else DEFAULT_CODES.get(exc.status_code, "error")
        if exc.status_code == 404 and message == "Not Found":
            message = f"no such endpoint: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        return respond(exc.status_code, DEFAULT_CODES.get(exc.status_code, "error"), message,
                       dict(exc.headers or {}))

    async def validation_error(request, exc: RequestValidationError):
        return respond(422, "invalid_parameter", "; ".join(_describe_validation(e) for e in exc.errors()))

    async def unexpected(request, exc: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return respond(500, "internal_error", f"internal error ({type(exc).__name__}); see the server log")

    def runtime_error(status: int, code: str):
        async def handler(request, exc: Exception):
            return respond(status, code, str(exc))
        return handler

    app.add_exception_handler(ApiError, api_error)
    for cls, status, code in RUNTIME_ERRORS:
        app.add_exception_handler(cls, runtime_error(status, code))
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, unexpected)


def _describe_validation(err: dict) -> str:
    where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("query", "path", "body"))
    return f"{where or 'request'}: {err.get('msg', 'invalid')}"
