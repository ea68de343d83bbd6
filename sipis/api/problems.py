"""RFC 9457 problem details: the one shape of every error the HTTPS API returns.

Why one module: SPEC.md promises `application/problem+json` with `type`, `title`, `status`,
`detail` (and `errors` for validation) on *every* error path, never a stack trace and never
Starlette's default HTML/plain text. Each kind of problem is declared once here (its stable
`type` URI, title and status), the OpenAPI document lists the same table, and app.py builds
every error response through `problem_response`.

The `type` URIs are identifiers (RFC 9457 §3.1.1): stable, not necessarily resolvable.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Final

import attrs
from starlette.responses import JSONResponse

from sipis.api.schemas import FieldError

PROBLEM_MEDIA_TYPE: Final = "application/problem+json"
PROBLEM_TYPE_BASE: Final = "https://sipis.dev/problems/"
# RFC 6750 §3: the challenge a client gets without (or with a bad) bearer token.
BEARER_REALM: Final = "sipis"


@attrs.frozen
class ProblemKind:
    """One kind of problem: the slug of its type URI, its title and HTTP status."""

    slug: str
    title: str
    status: int

    @property
    def type(self) -> str:
        return PROBLEM_TYPE_BASE + self.slug


MALFORMED = ProblemKind("malformed-body", "Request body is not valid JSON", 400)
VALIDATION = ProblemKind("validation", "Request body failed validation", 400)
UNAUTHORIZED = ProblemKind("unauthorized", "Missing or invalid bearer secret", 401)
FORBIDDEN = ProblemKind("not-allowed", "Not allowed by this server's policy", 403)
NOT_FOUND = ProblemKind("not-found", "Not found", 404)
METHOD_NOT_ALLOWED = ProblemKind("method-not-allowed", "Method not allowed", 405)
BODY_TOO_LARGE = ProblemKind("body-too-large", "Request body too large", 413)
UNSUPPORTED_MEDIA_TYPE = ProblemKind(
    "unsupported-media-type", "Request body must be application/json", 415
)
PROVIDER_REJECTED = ProblemKind(
    "provider-rejected", "The SIP provider rejected the registration", 422
)
PROVIDER_UNREACHABLE = ProblemKind(
    "provider-unreachable", "The SIP provider's registrar could not be found", 422
)
RATE_LIMITED = ProblemKind("rate-limited", "Too many requests", 429)
INTERNAL = ProblemKind("internal", "Internal server error", 500)
NOT_READY = ProblemKind("not-ready", "Service not ready", 503)
PROVIDER_TIMEOUT = ProblemKind(
    "provider-timeout", "The SIP provider did not answer in time", 504
)
# Any other HTTP error Starlette itself raises (e.g. a routing-level 400).
HTTP_ERROR = ProblemKind("http-error", "HTTP error", 400)

ALL_KINDS: Final = (
    MALFORMED,
    VALIDATION,
    UNAUTHORIZED,
    FORBIDDEN,
    NOT_FOUND,
    METHOD_NOT_ALLOWED,
    BODY_TOO_LARGE,
    UNSUPPORTED_MEDIA_TYPE,
    PROVIDER_REJECTED,
    PROVIDER_UNREACHABLE,
    RATE_LIMITED,
    INTERNAL,
    NOT_READY,
    PROVIDER_TIMEOUT,
    HTTP_ERROR,
)
# Bare statuses (Starlette's own HTTPExceptions) that have a kind of their own; any other
# status becomes HTTP_ERROR with that status.
_BY_STATUS: Final = {
    kind.status: kind
    for kind in (
        UNAUTHORIZED,
        FORBIDDEN,
        NOT_FOUND,
        METHOD_NOT_ALLOWED,
        BODY_TOO_LARGE,
        UNSUPPORTED_MEDIA_TYPE,
        RATE_LIMITED,
        INTERNAL,
        NOT_READY,
    )
}


class ProblemResponse(JSONResponse):
    """A JSONResponse with the problem media type, always pure-ASCII JSON.

    ASCII because an error may quote what the client sent (an unknown key), and a lone
    surrogate from a JSON escape cannot be encoded as UTF-8 but can be escaped again.
    """

    media_type = PROBLEM_MEDIA_TYPE

    def render(self, content: object) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False).encode("ascii")


def problem_response(
    kind: ProblemKind,
    detail: str,
    *,
    status: int | None = None,
    errors: Iterable[FieldError] = (),
    headers: Mapping[str, str] | None = None,
    extra: Mapping[str, object] | None = None,
) -> ProblemResponse:
    """Build an RFC 9457 response.

    Args:
        kind: which problem (type, title, default status).
        detail: human-readable, specific to this occurrence; must not hold secrets.
        status: overrides kind.status (only for HTTP_ERROR, which covers several codes).
        errors: field errors, added as the `errors` member when not empty.
        headers: extra response headers (WWW-Authenticate, Retry-After, Allow).
        extra: extension members (e.g. `provider_status`).
    """
    code = kind.status if status is None else status
    body: dict[str, object] = {
        "type": kind.type,
        "title": kind.title,
        "status": code,
        "detail": detail,
    }
    error_list = [error.to_json() for error in errors]
    if error_list:
        body["errors"] = error_list
    if extra:
        body.update(extra)
    all_headers = {"Cache-Control": "no-store"}
    all_headers.update(headers or {})
    return ProblemResponse(body, status_code=code, headers=all_headers)


def kind_for_status(status: int) -> ProblemKind:
    """The problem kind for a bare HTTP status (Starlette's own HTTPExceptions)."""
    return _BY_STATUS.get(status, HTTP_ERROR)


def unauthorized(detail: str, *, invalid_token: bool) -> ProblemResponse:
    """401 with the RFC 6750 challenge; `error="invalid_token"` when a token was sent."""
    challenge = f'Bearer realm="{BEARER_REALM}"'
    if invalid_token:
        challenge += ', error="invalid_token"'
    return problem_response(UNAUTHORIZED, detail, headers={"WWW-Authenticate": challenge})


def validation_failed(errors: Iterable[FieldError]) -> ProblemResponse:
    """400 listing every field error."""
    return problem_response(
        VALIDATION, "One or more fields are invalid; see errors.", errors=errors
    )
