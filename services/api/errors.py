"""One error shape for every error the API answers.

::

    {"error": {"status": 404, "message": "no node called 'x'", "path": "/api/v1/nodes/x"}}
    {"error": {"status": 400, "message": "expected a string", "field": "PatientID", "path": "..."}}

``field`` appears when one input field is to blame. Flask's own errors (404,
405, 413, 415, malformed JSON) and :class:`~pacsbridge.shared.core.errors.PacsbridgeError`
subclasses take the same shape:

=======================  ======
InvalidRequest, QueryError  400
NotFound (UnknownNode, UnknownJob)  404
Conflict                 409
DimseError               502 (the DICOM peer failed, not us)
WebError                 502 (the DICOMweb peer failed, not us)
ConfigError and the rest 500
database unreachable     503
=======================  ======
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, Response, jsonify, request
from sqlalchemy.exc import OperationalError
from werkzeug.exceptions import HTTPException

from pacsbridge.shared.core.errors import (Conflict, ConfigError, DimseError, InvalidRequest, NotFound,
                                      PacsbridgeError, QueryError, WebError)

from .models import ErrorBody, answer

__all__ = ["error_response", "register", "ApiError", "STATUS_OF"]

log = logging.getLogger(__name__)

#: PacsbridgeError subclasses and their HTTP status (first match wins).
STATUS_OF: tuple[tuple[type[PacsbridgeError], int], ...] = (
    (InvalidRequest, 400),
    (QueryError, 400),
    (NotFound, 404),
    (Conflict, 409),
    (DimseError, 502),
    (WebError, 502),
    (ConfigError, 500),
)


class ApiError(Exception):
    """An HTTP error raised by the API itself (401, 403 ...), with optional headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def error_response(status: int, message: str, field: str = "", headers: dict[str, str] | None = None,
                   **extra: Any) -> Response:
    """The one error shape, as a response."""
    body: dict[str, Any] = {"status": status, "message": message, "path": request.path}
    if field:
        body["field"] = field
    body.update(extra)
    response = jsonify(answer(ErrorBody, {"error": body}))
    response.status_code = status
    for k, v in (headers or {}).items():
        response.headers[k] = v
    return response


def _http(exc: HTTPException) -> Response:
    status = exc.code or 500
    message = exc.description or exc.name
    if status == 413:
        limit = request.max_content_length
        message = f"the body is larger than {limit} bytes" if limit else "the body is too large"
    headers = {}
    if status == 405 and exc.valid_methods:  # type: ignore[attr-defined]
        headers["Allow"] = ", ".join(exc.valid_methods)  # type: ignore[attr-defined]
    return error_response(status, message, headers=headers)


def _api(exc: ApiError) -> Response:
    return error_response(exc.status, exc.message, headers=exc.headers)


def _pacsbridge(exc: PacsbridgeError) -> Response:
    for cls, status in STATUS_OF:  # noqa: B007 (status is read after the loop)
        if isinstance(exc, cls):
            break
    else:
        status = 500
    if status >= 500:
        log.error("%s %s: %s: %s", request.method, request.path, type(exc).__name__, exc)
    extra: dict[str, Any] = {}
    if isinstance(exc, DimseError) and exc.status is not None:
        extra["dimse_status"] = exc.status
    problems = getattr(exc, "problems", None)
    if problems:  # a cohort file: every problem, by row and column
        extra["problems"] = [{"row": p.row, "column": p.column, "message": p.message} for p in problems]
    return error_response(status, str(exc), getattr(exc, "field", ""), **extra)


def _database(exc: OperationalError) -> Response:
    log.error("%s %s: database unavailable: %s", request.method, request.path, exc.orig)
    return error_response(503, "the index database is unavailable; try again later")


def _unexpected(exc: Exception) -> Response:
    if isinstance(exc, HTTPException):
        return _http(exc)
    log.exception("%s %s failed", request.method, request.path)
    return error_response(500, "internal error (logged on the server)")


def register(app: Flask) -> None:
    """Install the handlers: every error leaves as the one shape."""
    app.register_error_handler(HTTPException, _http)
    app.register_error_handler(ApiError, _api)
    app.register_error_handler(PacsbridgeError, _pacsbridge)
    app.register_error_handler(OperationalError, _database)
    app.register_error_handler(Exception, _unexpected)
