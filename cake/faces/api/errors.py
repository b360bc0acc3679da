"""Errors in OpenAI's shape: `{"error": {message, type, param, code}}`, whatever went wrong;
on Anthropic's routes (`/v1/messages`), in Anthropic's: `{"type": "error", "error": {type,
message}}`.

A request the server cannot serve (malformed, out of range, too large, not allowed) is a 4xx that
names the field and the fix; a failure of ours is a 5xx in the same shape, never a bare text.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from cake.decoding.grammar import GrammarError
from cake.errors import SESSION_REFUSALS, CakeError, ContextError, WorkerError

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error answered as HTTP `status` with OpenAI's error body."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = {"message": message, "type": type, "param": param, "code": code}


ANTHROPIC_PREFIX = "/v1/messages"
# Anthropic's error types by status (its 529 "overloaded" is cake's 503: a worker refused).
ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}


def anthropic_error_body(error: ApiError) -> dict[str, Any]:
    kind = ANTHROPIC_TYPES.get(error.status)
    if kind is None:
        kind = "api_error" if error.status >= 500 else "invalid_request_error"
    return {"type": "error", "error": {"type": kind, "message": error.body["message"]}}


def error_response(error: ApiError, path: str = "") -> JSONResponse:
    """The error in the shape of the API that `path` belongs to."""
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
    is_anthropic = path == ANTHROPIC_PREFIX or path.startswith(ANTHROPIC_PREFIX + "/")
    body = anthropic_error_body(error) if is_anthropic else {"error": error.body}
    return JSONResponse(body, status_code=error.status, headers=headers)


def generation_error(exc: BaseException, param: str) -> ApiError:
    """What a failed generation answers, before the response starts or as a stream's last event."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, GrammarError):
        return ApiError(400, str(exc), param="response_format")
    if isinstance(exc, ContextError):
        return ApiError(400, str(exc), param=param, code="context_length_exceeded")
    if isinstance(exc, CakeError) and exc.code in SESSION_REFUSALS:  # try again later
        return ApiError(503, str(exc), type="server_error", code=exc.code.value)
    if isinstance(exc, WorkerError):
        return ApiError(502, str(exc), type="server_error", code="worker_unavailable")
    log.error("generation failed", exc_info=exc)
    return ApiError(500, f"internal error: {exc!r}", type="server_error", code="internal_error")


def validation_error(errors: Sequence[Any]) -> ApiError:
    """Pydantic's errors as one 400: bad JSON says so; a bad field names the field."""
    if any(e.get("type") == "json_invalid" for e in errors):
        detail = next(e for e in errors if e.get("type") == "json_invalid")
        context = (detail.get("ctx") or {}).get("error", "")
        return ApiError(400, f"the request body is not valid JSON ({context})".replace(" ()", ""))
    if any(tuple(e.get("loc", ())) == ("body",) for e in errors):
        return ApiError(400, "the request body must be a JSON object (it is empty or not one)")
    fields = []
    for e in errors:
        loc = [str(part) for part in e.get("loc", ()) if part != "body"]
        fields.append((".".join(loc), e.get("msg", "invalid")))
    message = "; ".join(f"{loc}: {msg}" if loc else msg for loc, msg in fields)
    return ApiError(400, message or "invalid request", param=fields[0][0] if fields else None)


def install_error_handlers(app: FastAPI) -> None:
    """Every error the app can raise, answered in OpenAI's shape."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(exc.errors()), request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else None
        error = ApiError(exc.status_code, str(exc.detail), code=code)
        return error_response(error, request.url.path)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        return error_response(generation_error(exc, param=""), request.url.path)
