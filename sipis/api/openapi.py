"""The OpenAPI 3.1 description of the HTTPS API, written by hand.

Why by hand: the contract (SPEC.md) is the source of truth, not the code; a generated document
would describe whatever the code happens to do. A test checks that every route of the app is
described here and that nothing here is missing from the app, so the two cannot drift apart
silently. Problem types come from ``api.problems`` so their URIs are listed exactly once.
"""

from __future__ import annotations

import copy
from typing import Any, Final

from sipis import __version__
from sipis.api import problems
from sipis.api.schemas import (
    APNS_ENVIRONMENTS,
    MAX_APP_LENGTH,
    MAX_LIFETIME_SECONDS,
    MAX_PASSWORD_LENGTH,
    MAX_TOKEN_LENGTH,
    MAX_URI_LENGTH,
    MAX_USERNAME_LENGTH,
    PUSH_PROVIDERS,
)
from sipis.store.models import CALL_OUTCOMES, REGISTRATION_STATES

_JSON: Final = "application/json"
_PROBLEM: Final = problems.PROBLEM_MEDIA_TYPE
_TIME: Final = {"type": "string", "format": "date-time", "examples": ["2026-11-28T10:00:00Z"]}
_NULLABLE_TIME: Final = {"type": ["string", "null"], "format": "date-time"}
_SIP_URI: Final = {"type": "string", "maxLength": MAX_URI_LENGTH, "pattern": "^[sS][iI][pP][sS]?:"}
_LIFETIME: Final = {
    "description": 'Seconds, or a duration such as "5d", "36h", "1d12h" (units w, d, h, m, s). '
    "Capped by the AOR domain's policy; the configured default when absent.",
    "oneOf": [
        {"type": "integer", "minimum": 1, "maximum": MAX_LIFETIME_SECONDS},
        {"type": "string", "pattern": "^([0-9]{1,9}[wdhms])+$"},
    ],
}
_INSTANCE_ID: Final = {
    "name": "id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": "^[A-Za-z0-9._~-]{1,128}$"},
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _problem(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/responses/{name}"}


def _json_body(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {_JSON: {"schema": schema}}}


_SCHEMAS: Final[dict[str, Any]] = {
    "NewInstance": {
        "type": "object",
        "additionalProperties": False,
        "required": ["app", "sip", "push"],
        "properties": {
            "app": {
                "type": "string",
                "maxLength": MAX_APP_LENGTH,
                "description": "Reverse-DNS app id (iOS bundle id or Android application id).",
                "examples": ["com.example.phone"],
            },
            "sip": {
                "type": "object",
                "additionalProperties": False,
                "required": ["aor", "password"],
                "properties": {
                    "aor": {**_SIP_URI, "description": "sip:/sips: URI with user and host."},
                    "username": {
                        "type": ["string", "null"],
                        "maxLength": MAX_USERNAME_LENGTH,
                        "description": "Digest username; defaults to the AOR user.",
                    },
                    "password": {
                        "type": "string",
                        "minLength": 1,
                        "maxLength": MAX_PASSWORD_LENGTH,
                        "writeOnly": True,
                        "description": "No CR, LF or NUL. Stored encrypted, never returned.",
                    },
                    "registrar": {
                        "type": ["string", "null"],
                        "maxLength": MAX_URI_LENGTH,
                        "description": "Defaults to the AOR domain resolved per RFC 3263.",
                    },
                    "outbound_proxy": {"type": ["string", "null"], "maxLength": MAX_URI_LENGTH},
                    "expires": {
                        "type": ["integer", "null"],
                        "description": "Requested REGISTER expiry within the configured "
                        "registrar min/max; the configured default when absent.",
                    },
                },
            },
            "push": {
                "type": "object",
                "additionalProperties": False,
                "required": ["provider", "token"],
                "properties": {
                    "provider": {"enum": list(PUSH_PROVIDERS)},
                    "token": {
                        "type": "string",
                        "minLength": 1,
                        "maxLength": MAX_TOKEN_LENGTH,
                        "pattern": "^[!-~]+$",
                        "writeOnly": True,
                    },
                    "environment": {
                        "enum": [*APNS_ENVIRONMENTS, None],
                        "description": "APNs only; default production.",
                    },
                },
            },
            "lifetime": {**_LIFETIME, "oneOf": [*_LIFETIME["oneOf"], {"type": "null"}]},
        },
    },
    "InstancePatch": {
        "type": "object",
        "additionalProperties": False,
        "description": "Any subset; {} is valid and only counts as heard from the device.",
        "properties": {
            "push": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "token": {
                        "type": "string",
                        "minLength": 1,
                        "maxLength": MAX_TOKEN_LENGTH,
                        "writeOnly": True,
                    },
                    "environment": {"enum": list(APNS_ENVIRONMENTS)},
                },
            },
            "sip": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "password": {
                        "type": "string",
                        "minLength": 1,
                        "maxLength": MAX_PASSWORD_LENGTH,
                        "writeOnly": True,
                    }
                },
            },
            "lifetime": _LIFETIME,
        },
    },
    "Registration": {
        "type": "object",
        "required": ["state", "expires", "last_error", "next_attempt_at", "last_registered_at"],
        "properties": {
            "state": {"enum": list(REGISTRATION_STATES)},
            "expires": {"type": ["integer", "null"], "description": "Expiry granted upstream."},
            "last_error": {"type": ["string", "null"]},
            "next_attempt_at": _NULLABLE_TIME,
            "last_registered_at": _NULLABLE_TIME,
        },
    },
    "CallRecord": {
        "type": "object",
        "description": "A finished incoming call (kept for calls.call_record_retention).",
        "required": ["call", "sip_call_id", "from_uri", "from_name", "to_uri", "started_at",
                     "ended_at", "outcome"],
        "properties": {
            "call": {"type": "string", "description": "The call reference of its pushes."},
            "sip_call_id": {"type": "string"},
            "from_uri": {"type": "string"},
            "from_name": {"type": ["string", "null"]},
            "to_uri": {"type": "string"},
            "started_at": {"type": "string", "format": "date-time"},
            "ended_at": {"type": "string", "format": "date-time"},
            "outcome": {"enum": list(CALL_OUTCOMES)},
        },
    },
    "CallList": {
        "type": "object",
        "required": ["calls"],
        "properties": {"calls": {"type": "array", "items": _ref("CallRecord"),
                                 "description": "Newest first."}},
    },
    "Instance": {
        "type": "object",
        "description": "Never holds the SIP password, the secret or the full push token.",
        "required": [
            "id",
            "app",
            "aor",
            "username",
            "registrar",
            "outbound_proxy",
            "push",
            "created_at",
            "last_heard_at",
            "expires_at",
            "lifetime",
            "registration",
        ],
        "properties": {
            "id": {"type": "string"},
            "app": {"type": "string"},
            "aor": {"type": "string"},
            "username": {"type": "string"},
            "registrar": {"type": ["string", "null"]},
            "outbound_proxy": {"type": ["string", "null"]},
            "push": {
                "type": "object",
                "properties": {
                    "provider": {"enum": list(PUSH_PROVIDERS)},
                    "environment": {"enum": [*APNS_ENVIRONMENTS, None]},
                    "token": {
                        "type": "string",
                        "description": 'Redacted: the first 6 characters (tokens of 24 or '
                        'more) and the length, e.g. "a1b2c3…(64)".',
                    },
                },
            },
            "created_at": _TIME,
            "last_heard_at": _NULLABLE_TIME,
            "expires_at": _TIME,
            "lifetime": {"type": "integer", "description": "Seconds."},
            "registration": _ref("Registration"),
        },
    },
    "Created": {
        "type": "object",
        "required": ["id", "secret", "expires_at", "registration", "device"],
        "properties": {
            "id": {"type": "string"},
            "secret": {
                "type": "string",
                "description": "Shown once; the bearer secret and the device binding password.",
            },
            "expires_at": _TIME,
            "registration": {
                "type": "object",
                "properties": {
                    "state": {"type": "string"},
                    "expires": {"type": ["integer", "null"]},
                },
            },
            "device": {
                "type": "object",
                "required": ["registrar", "username", "realm"],
                "properties": {
                    "registrar": {"type": "string"},
                    "username": {"type": "string"},
                    "realm": {"type": "string"},
                },
            },
        },
    },
    "Status": {
        "type": "object",
        "required": ["status"],
        "properties": {"status": {"type": "string"}},
    },
    "Problem": {
        "type": "object",
        "description": "RFC 9457 problem details.",
        "required": ["type", "title", "status", "detail"],
        "properties": {
            "type": {
                "type": "string",
                "format": "uri",
                "enum": [kind.type for kind in problems.ALL_KINDS],
            },
            "title": {"type": "string"},
            "status": {"type": "integer"},
            "detail": {"type": "string"},
            "errors": {
                "type": "array",
                "description": "Validation (and allow-list) errors, one per field.",
                "items": {
                    "type": "object",
                    "required": ["field", "message"],
                    "properties": {
                        "field": {
                            "type": "string",
                            "description": 'Dotted path such as "sip.password"; "" is the body.',
                        },
                        "message": {"type": "string"},
                    },
                },
            },
            "provider_status": {
                "type": "integer",
                "description": "provider-rejected only: the SIP status the provider answered.",
            },
        },
    },
}


def _problem_responses() -> dict[str, Any]:
    responses: dict[str, Any] = {}
    for kind in problems.ALL_KINDS:
        headers: dict[str, Any] = {}
        if kind is problems.UNAUTHORIZED:
            headers["WWW-Authenticate"] = {"schema": {"type": "string"}}
        if kind is problems.RATE_LIMITED:
            headers["Retry-After"] = {"schema": {"type": "integer"}}
        if kind is problems.METHOD_NOT_ALLOWED:
            headers["Allow"] = {"schema": {"type": "string"}}
        responses[kind.slug] = {
            "description": f"{kind.title} (type {kind.type})",
            "content": {_PROBLEM: {"schema": _ref("Problem")}},
            **({"headers": headers} if headers else {}),
        }
    return responses


_AUTH_ERRORS: Final = {
    "401": _problem("unauthorized"),
    "404": _problem("not-found"),
    "500": _problem("internal"),
}
_BODY_ERRORS: Final = {
    "400": {
        "description": "Malformed JSON or validation errors (types malformed-body, validation).",
        "content": {_PROBLEM: {"schema": _ref("Problem")}},
    },
    "413": _problem("body-too-large"),
    "415": _problem("unsupported-media-type"),
}
_BEARER: Final[list[dict[str, list[str]]]] = [{"bearer": []}]
_CALL_REF: Final = {
    "name": "call",
    "in": "path",
    "required": True,
    "description": "The call ref: the push payload's sipis.call.",
    "schema": {"type": "string", "pattern": "^[A-Za-z0-9._~-]{1,128}$"},
}


def _state_op(summary: str, operation_id: str) -> dict[str, Any]:
    return {
        "summary": summary,
        "operationId": operation_id,
        "security": _BEARER,
        "parameters": [_INSTANCE_ID],
        "responses": {
            "200": _json_body(_ref("Instance"), "The instance's state."),
            **_AUTH_ERRORS,
        },
    }


def _call_op(summary: str, operation_id: str) -> dict[str, Any]:
    return {
        "summary": summary,
        "operationId": operation_id,
        "security": _BEARER,
        "parameters": [_INSTANCE_ID, _CALL_REF],
        "responses": {
            "204": {"description": "Done: the call was ringing for this instance."},
            "401": _problem("unauthorized"),
            "404": {
                "description": "No such instance, or no such call ringing for it (unknown, "
                "finished, or another instance's call).",
                "content": {_PROBLEM: {"schema": _ref("Problem")}},
            },
            "500": _problem("internal"),
        },
    }


_PATHS: Final[dict[str, Any]] = {
    "/v1/instances": {
        "post": {
            "summary": "Create a push instance: REGISTER upstream, wait for the outcome, store.",
            "operationId": "createInstance",
            "security": [],
            "requestBody": {
                "required": True,
                "content": {_JSON: {"schema": _ref("NewInstance")}},
            },
            "responses": {
                "201": {
                    **_json_body(_ref("Created"), "Created; the secret is shown only here."),
                    "headers": {"Location": {"schema": {"type": "string"}}},
                },
                **_BODY_ERRORS,
                "403": _problem("not-allowed"),
                "422": {
                    "description": "The provider rejected the credentials (provider-rejected, "
                    "with provider_status) or its registrar was not found (provider-unreachable).",
                    "content": {_PROBLEM: {"schema": _ref("Problem")}},
                },
                "429": _problem("rate-limited"),
                "500": _problem("internal"),
                "504": _problem("provider-timeout"),
            },
        }
    },
    "/v1/instances/{id}": {
        "get": _state_op("State of the instance (counts as heard from the device).", "getInstance"),
        "patch": {
            **_state_op(
                "Change push token, SIP password or lifetime; extends the expiry.",
                "updateInstance",
            ),
            "requestBody": {
                "required": True,
                "content": {_JSON: {"schema": _ref("InstancePatch")}},
            },
            "responses": {
                "200": _json_body(_ref("Instance"), "The instance's new state."),
                **_AUTH_ERRORS,
                **_BODY_ERRORS,
            },
        },
        "delete": {
            "summary": "unREGISTER upstream (Expires: 0) and wipe the instance.",
            "operationId": "deleteInstance",
            "security": _BEARER,
            "parameters": [_INSTANCE_ID],
            "responses": {"204": {"description": "Wiped."}, **_AUTH_ERRORS},
        },
    },
    "/v1/instances/{id}/foreground": {
        "post": _state_op(
            "The app holds the registration itself: sipis unREGISTERs and keeps the instance.",
            "foregroundInstance",
        )
    },
    "/v1/instances/{id}/background": {
        "post": _state_op(
            "The app went to the background: sipis registers again.", "backgroundInstance"
        )
    },
    "/v1/instances/{id}/calls": {
        "get": {
            "summary": "Recent calls of this instance with their outcome, so the app can show "
                       "calls it never saw (counts as heard from the device).",
            "operationId": "listCalls",
            "security": _BEARER,
            "parameters": [_INSTANCE_ID],
            "responses": {
                "200": _json_body(_ref("CallList"), "The calls, newest first."),
                **_AUTH_ERRORS,
            },
        }
    },
    "/v1/instances/{id}/calls/{call}/progress": {
        "post": _call_op(
            "Fast channel: the device is waking up. The caller hears 180 "
            "Device-Making-Progress; the ring timer stops and the progress timer starts "
            "(counts as heard from the device).",
            "callProgress",
        )
    },
    "/v1/instances/{id}/calls/{call}/decline": {
        "post": _call_op(
            "The user declined: 603 Decline upstream (counts as heard from the device).",
            "callDecline",
        )
    },
    "/healthz": {
        "get": {
            "summary": "Liveness.",
            "operationId": "healthz",
            "security": [],
            "responses": {"200": _json_body(_ref("Status"), '{"status": "ok"}')},
        }
    },
    "/readyz": {
        "get": {
            "summary": "Readiness: store open, SIP sockets bound.",
            "operationId": "readyz",
            "security": [],
            "responses": {
                "200": _json_body(_ref("Status"), '{"status": "ready"}'),
                "503": _problem("not-ready"),
            },
        }
    },
    "/v1/openapi.json": {
        "get": {
            "summary": "This document.",
            "operationId": "openapi",
            "security": [],
            "responses": {"200": _json_body({"type": "object"}, "OpenAPI 3.1 document.")},
        }
    },
}


def openapi_document() -> dict[str, Any]:
    """A fresh copy of the OpenAPI 3.1 document (callers may change it freely)."""
    return copy.deepcopy(
        {
            "openapi": "3.1.0",
            "info": {
                "title": "sipis",
                "version": __version__,
                "description": "Hands SIP accounts of backgrounded softphones to sipis, which "
                "keeps them registered and wakes the app with a push on an incoming call. "
                "Every error is application/problem+json (RFC 9457).",
                "license": {"name": "AGPL-3.0-or-later", "identifier": "AGPL-3.0-or-later"},
            },
            "paths": _PATHS,
            "components": {
                "schemas": _SCHEMAS,
                "responses": _problem_responses(),
                "securitySchemes": {
                    "bearer": {
                        "type": "http",
                        "scheme": "bearer",
                        "description": "The instance secret from the 201 answer.",
                    }
                },
            },
        }
    )
