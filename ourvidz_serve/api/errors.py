"""The one place where exceptions become the contract's error body."""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ourvidz_serve.errors import GenerationTimeout, OurVidzError, RateLimited
from ourvidz_serve.jobs.openai_compat import OpenAIErrorBody
from ourvidz_serve.jobs.protocol import ErrorBody

logger = logging.getLogger(__name__)

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    429: "rate_limited",
    415: "unsupported_media_type",
}


_DESCRIPTIONS = {
    400: "The body cannot be parsed (not JSON, or nested too deeply)",
    401: "No credential, or an invalid one",
    403: "The credential may not do this",
    404: "No such resource (or it belongs to another user)",
    409: "Conflict with an earlier request",
    410: "The file was deleted: its job passed the retention period",
    413: "The request body is larger than allowed",
    422: "The request is invalid; the message says why",
    429: "Rate limit (rate_limited), queued-jobs cap (too_many_queued_jobs) or GPU-time quota "
    "(quota_exhausted) reached; see the Retry-After header",
    500: "The job failed or was cancelled (generation_failed; the message names the job)",
    502: "Object storage failed; the request can be retried",
    503: "The service is starting or its database is unavailable",
    504: "The job did not finish in time (generation_timeout); it goes on, under the id the "
    "message names",
}

OPENAI_PATHS = ("/v1/images/", "/v1/videos", "/v1/models")
"""Routes that answer errors in OpenAI's shape, so OpenAI's SDKs raise them as their own."""

_OPENAI_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    429: "rate_limit_error",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for error statuses, all in the contract's error shape."""
    responses: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        response: dict[str, Any] = {"model": ErrorBody, "description": _DESCRIPTIONS[status]}
        if status == 429:
            response["headers"] = {
                "Retry-After": {
                    "description": "Seconds to wait before retrying",
                    "schema": {"type": "integer"},
                }
            }
        responses[status] = response
    return responses


AUTHENTICATED_ERRORS = error_responses(401, 429, 503)
"""What any route behind a credential can answer, whatever it does."""


def openai_error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` of an OpenAI route, in OpenAI's error shape. A refusal the job
    API answers 422 is a 400 there (OpenAI's status for an invalid request)."""
    responses = error_responses(*(400 if status == 422 else status for status in statuses))
    for status, response in responses.items():
        response["model"] = OpenAIErrorBody
        if status == 400:
            response["description"] = (
                "The request is invalid: error.param names the field, error.code says why "
                "(invalid_request, prompt_refused, invalid_image, ...)"
            )
    return responses


OPENAI_AUTHENTICATED_ERRORS = openai_error_responses(401, 429, 503)


def error_response(
    status: int,
    code: str,
    message: str,
    details: Any = None,
    headers: dict[str, str] | None = None,
    *,
    path: str | None = None,
    param: str | None = None,
) -> JSONResponse:
    """The contract's error body, or OpenAI's on the OpenAI routes (``path`` tells)."""
    if path is not None and path.startswith(OPENAI_PATHS):
        return _openai_error_response(status, code, message, details, headers, param)
    body = {"error": {"code": code, "message": message, "details": details}}
    return JSONResponse(body, status_code=status, headers=headers)


def _openai_error_response(
    status: int,
    code: str,
    message: str,
    details: Any,
    headers: dict[str, str] | None,
    param: str | None,
) -> JSONResponse:
    if status == 422:
        status = 400
    kind = _OPENAI_TYPES.get(status)
    if kind is None:
        kind = "server_error" if status >= 500 else "invalid_request_error"
    error: dict[str, Any] = {"message": message, "type": kind, "param": param, "code": code}
    if isinstance(details, dict) and "job_id" in details:
        error["job_id"] = details["job_id"]
    return JSONResponse({"error": error}, status_code=status, headers=headers)


def _validation_details(exc: RequestValidationError) -> list[dict[str, Any]]:
    return [
        {"loc": list(error.get("loc", ())), "msg": error.get("msg", ""), "type": error.get("type")}
        for error in exc.errors()
    ]


async def _on_service_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, OurVidzError)
    if exc.status_code >= 500:
        logger.error("%s: %s", exc.code, exc.message)
    headers = None
    if isinstance(exc, RateLimited):
        headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))}
    elif request.url.path.startswith(OPENAI_PATHS) and (
        exc.status_code == 409 or "job_id" in (exc.details if isinstance(exc.details, dict) else {})
    ):
        # OpenAI's SDKs retry a 409 and any 5xx. A retry after the job was stored would submit
        # it again, unless it replays it under the same Idempotency-Key; a conflict stays one.
        replays = isinstance(exc, GenerationTimeout) and "idempotency-key" in request.headers
        headers = {"x-should-retry": "true" if replays else "false"}
    return error_response(
        exc.status_code,
        exc.code,
        exc.message,
        exc.details,
        headers,
        path=request.url.path,
        param=exc.param,
    )


async def _on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    details = _validation_details(exc)
    first = details[0] if details else {"loc": [], "msg": "invalid request"}
    where = ".".join(str(part) for part in first["loc"] if part != "body")
    message = f"{where}: {first['msg']}" if where else str(first["msg"])
    # A body that is not JSON has the position as its second part: not a field.
    fields = [part for part in first["loc"][1:] if isinstance(part, str)]
    return error_response(
        422,
        "invalid_request",
        message,
        details,
        path=request.url.path,
        param=fields[0] if fields else None,
    )


async def _on_http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    return error_response(exc.status_code, code, str(exc.detail), path=request.url.path)


async def _on_unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, "internal_error", "internal server error", path=request.url.path)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(OurVidzError, _on_service_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_unexpected_error)
