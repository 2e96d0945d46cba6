"""Errors as RFC 9457 problem details: the one table from error code to HTTP status, and the handlers that make
every error the gateway answers `application/problem+json` (FastAPI's own validation errors, unknown routes and
methods, malformed bodies included).

A body is `{"type": "https://turboflow.io/problems/<code>", "title", "status", "detail", "code"}`, plus
`errors: [{"field", "code", "message"}]` on a 422 and `retry_after` (seconds) on a 429. Routes raise `ApiProblem`
(or a typed `TurboflowError`, mapped through `status_of`); nothing else reaches the client, and an unexpected
exception becomes a 500 `internal_error` whose details stay in the log.
"""

from __future__ import annotations

import http
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from turboflow.errors import InvalidRequestError, TurboflowError

log = logging.getLogger(__name__)

PROBLEM_TYPE_BASE = "https://turboflow.io/problems/"
PROBLEM_MEDIA_TYPE = "application/problem+json"

# The gateway's own codes, each with its status and what it means (field codes of the event contract, e.g.
# `invalid_num_frames`, appear inside `errors` and map to 422 through InvalidRequestError).
CODES: dict[str, tuple[int, str]] = {
    "invalid_json": (400, "the body is not valid JSON (or not UTF-8)"),
    "unauthorized": (401, "no API key, or one that is unknown or revoked"),
    "not_found": (404, "no such resource for this tenant (another tenant's id is not found either)"),
    "method_not_allowed": (405, "the resource does not support this method"),
    "id_conflict": (409, "the request id was already used for a different input"),
    "idempotency_conflict": (409, "the Idempotency-Key was already used for a different input"),
    "not_cancellable": (409, "the request already completed or failed"),
    "length_required": (411, "a multipart upload must declare its Content-Length"),
    "payload_too_large": (413, "the body or the uploaded image is over the limit"),
    "unsupported_media_type": (415, "the body is neither application/json nor multipart/form-data"),
    "invalid_request": (422, "the request is invalid; `errors` lists every field at fault"),
    "image_not_allowed": (422, "the image is outside the tenant's upload prefix and the shared prefixes"),
    "image_bucket_not_allowed": (422, "the s3:// image is in a bucket the functions may not read"),
    "webhook_not_allowed": (422, "the webhook URL is not http(s) or resolves to a private address"),
    "invalid_cursor": (422, "the list cursor is not one this gateway issued"),
    "too_many_requests": (429, "the tenant has its maximum of unfinished requests; retry after `retry_after` s"),
    "quota_exceeded": (429, "the tenant's monthly GPU-second budget is spent; `resets_at` says when it renews"),
    "internal_error": (500, "unexpected failure; the gateway's log has details"),
    "broker_unavailable": (503, "the request could not be handed to the broker; it was not accepted"),
    "state_unavailable": (503, "the request-state store (NATS) cannot be reached"),
    "storage_unavailable": (503, "the object store cannot be reached"),
}


class ProblemFieldError(BaseModel):
    field: str | None = None
    code: str
    message: str


class Problem(BaseModel):
    """An error answer (RFC 9457), always `application/problem+json`."""

    type: str = Field(examples=[PROBLEM_TYPE_BASE + "not_found"])
    title: str
    status: int
    detail: str
    code: str
    errors: list[ProblemFieldError] | None = None
    retry_after: int | None = None
    limit: str | None = Field(
        default=None, description="429 only: which limit (concurrent_requests, monthly_gpu_seconds)"
    )
    resets_at: str | None = Field(default=None, description="429 only: when the limit frees up (RFC 3339, UTC)")


class ApiProblem(Exception):
    """An error answer. `status` defaults to the code's (CODES); `errors` for 422, `retry_after` for 429."""

    def __init__(
        self,
        code: str,
        detail: str,
        *,
        status: int | None = None,
        errors: list[dict] | None = None,
        retry_after: int | None = None,
        headers: dict[str, str] | None = None,
        limit: str | None = None,
        resets_at: str | None = None,
    ):
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.status = status or CODES.get(code, (500, ""))[0]
        self.errors = errors
        self.retry_after = retry_after
        self.headers = dict(headers or {})
        self.limit, self.resets_at = limit, resets_at

    @classmethod
    def invalid(cls, errors: list[dict], detail: str | None = None, code: str = "invalid_request") -> ApiProblem:
        """A 422 listing `errors` ({field, code, message}); the detail defaults to the first message."""
        first = errors[0]["message"] if errors else "the request is invalid"
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        return cls(code, detail or first + more, status=422, errors=errors)


def field_error(error: TurboflowError) -> dict:
    """The `errors` entry of a typed error."""
    return {"field": error.field, "code": error.code, "message": error.message}


def status_of(error: TurboflowError) -> int:
    """The HTTP status of a typed error: invalid input 422, a retryable failure 503, anything else 500."""
    if error.code in CODES:
        return CODES[error.code][0]
    if isinstance(error, InvalidRequestError):
        return 422
    return 503 if error.retryable else 500


def problem_body(
    status: int, code: str, detail: str, errors: list[dict] | None = None, retry_after: int | None = None
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": PROBLEM_TYPE_BASE + code,
        "title": _title(status),
        "status": status,
        "detail": detail,
        "code": code,
    }
    if errors is not None:
        body["errors"] = errors
    if retry_after is not None:
        body["retry_after"] = retry_after
    return body


def problem_response(problem: ApiProblem) -> JSONResponse:
    headers = dict(problem.headers)
    if problem.retry_after is not None:
        headers.setdefault("Retry-After", str(problem.retry_after))
    if problem.status == 401:
        headers.setdefault("WWW-Authenticate", "Bearer")
    body = problem_body(problem.status, problem.code, problem.detail, problem.errors, problem.retry_after)
    body.update({k: v for k, v in (("limit", problem.limit), ("resets_at", problem.resets_at)) if v is not None})
    return JSONResponse(body, status_code=problem.status, headers=headers, media_type=PROBLEM_MEDIA_TYPE)


def _title(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def _validation_errors(exc: RequestValidationError) -> list[dict]:
    """FastAPI's (pydantic's) errors as {field, code, message}: the field is the last named location part."""
    out = []
    for err in exc.errors():
        names = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path", "header")]
        kind = str(err.get("type", "invalid"))
        code = "invalid_json" if kind == "json_invalid" else f"invalid_{names[-1]}" if names else "invalid_request"
        out.append({"field": ".".join(names) or None, "code": code, "message": str(err.get("msg", kind))})
    return out


async def _on_api_problem(request: Request, exc: ApiProblem) -> JSONResponse:
    return problem_response(exc)


async def _on_typed_error(request: Request, exc: TurboflowError) -> JSONResponse:
    status = status_of(exc)
    errors = [field_error(exc)] if status == 422 else None
    if status >= 500:
        log.warning("%s %s: %s: %s", request.method, request.url.path, exc.code, exc.message)
    return problem_response(ApiProblem(exc.code, exc.message, status=status, errors=errors))


async def _on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = _validation_errors(exc)
    if any(e["code"] == "invalid_json" for e in errors):
        return problem_response(ApiProblem("invalid_json", "the body is not valid JSON", status=400))
    return problem_response(ApiProblem.invalid(errors))


async def _on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large", 415: "unsupported_media_type"}
    detail = exc.detail if isinstance(exc.detail, str) else _title(exc.status_code)
    if exc.status_code == 404 and detail == "Not Found":
        detail = f"no route {request.url.path[:200]}"
    problem = ApiProblem(code.get(exc.status_code, "invalid_request"), detail, status=exc.status_code)
    problem.headers.update(getattr(exc, "headers", None) or {})
    return problem_response(problem)


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("%s %s failed", request.method, request.url.path)
    return problem_response(ApiProblem("internal_error", "internal error; the gateway's log has details"))


def install(app: FastAPI) -> None:
    """Register the handlers that turn every error into a problem document."""
    app.add_exception_handler(ApiProblem, _on_api_problem)
    app.add_exception_handler(TurboflowError, _on_typed_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_unexpected)


def responses(*codes: int) -> dict[int | str, dict]:
    """OpenAPI `responses` entries declaring the problem schema for `codes` (moved to application/problem+json by
    `problem_media_types`)."""
    return {code: {"model": Problem, "description": _title(code)} for code in codes}


def problem_media_types(document: dict) -> dict:
    """Declare every error response of an OpenAPI document as application/problem+json: FastAPI files a response
    model under application/json; errors are never sent as that."""
    for path in document.get("paths", {}).values():
        for operation in path.values():
            for status, response in (operation.get("responses") or {}).items():
                content = response.get("content") or {}
                if str(status)[:1] in "45" and "application/json" in content:
                    content[PROBLEM_MEDIA_TYPE] = content.pop("application/json")
    return document
