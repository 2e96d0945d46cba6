"""The Bearer key dependency: `Authorization: Bearer tf_<key_id>_<secret>` -> the key's tenant.

The tenant comes from the key alone, never from the request: every route that reads or acts on requests depends
on `current_tenant`. A missing, malformed, unknown or revoked key is one answer, 401 `unauthorized` with
`WWW-Authenticate: Bearer`, so a caller cannot tell which it was.
"""

from __future__ import annotations

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .keys import ApiKey
from .problems import ApiProblem

bearer = HTTPBearer(
    auto_error=False,
    scheme_name="apiKey",
    bearerFormat="tf_<key_id>_<secret>",
    description="An API key from `turboflow keys create --tenant T` (or the one `turboflow dev` prints).",
)


def current_key(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> ApiKey:
    """The caller's active API key (a plain `def`: FastAPI runs the database lookup in its thread pool)."""
    from .app import get_service

    if credentials is None or credentials.scheme.lower() != "bearer":
        raise ApiProblem("unauthorized", "an API key is required: `Authorization: Bearer tf_...`")
    key = get_service(request).keys.verify(credentials.credentials.strip())
    if key is None:
        raise ApiProblem("unauthorized", "the API key is not valid (unknown, malformed or revoked)")
    request.state.api_key = key
    return key


def current_tenant(key: ApiKey = Depends(current_key)) -> str:
    """The tenant the caller acts as: its key's."""
    return key.tenant
