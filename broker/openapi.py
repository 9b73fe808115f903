"""The OpenAPI 3.0 document of the broker's API, built from the same schemas the handlers check."""

from __future__ import annotations

from typing import Any

from broker import schemas
from broker.schemas import object_schema
from broker.service import AUDIT_TYPES, CURSOR_MAX_LENGTH, SESSION_STATES, SESSIONS_PAGE_MAX
from broker.watch import WATCH_HOLD

_ERROR = {
    "type": "object",
    "required": ["error", "message"],
    "additionalProperties": False,
    "properties": {"error": {"type": "string"}, "message": {"type": "string"}},
}
_THROTTLED = (
    "too_many_attempts: too many failed authentications from this address (or its IPv6 /64) for "
    "this kind of credential; refused before the credential is examined, a correct one included"
)
_NULLABLE_STR = {"type": "string", "nullable": True}
_NULLABLE_NUM = {"type": "number", "nullable": True}
_NULLABLE_INT = {"type": "integer", "nullable": True}

_TARGET = {
    "type": "object",
    "properties": {
        "id": {"type": "string"},
        "name": {"type": "string"},
        "host": {"type": "string"},
        "port": {"type": "integer"},
        "has_password": {"type": "boolean"},
        "tls": {"type": "object", "nullable": True},
        "clip": {"type": "string", "enum": ["none", "in", "out", "both"]},
        "created_at": {"type": "number"},
    },
}
_CONSOLE = {
    "type": "object",
    "properties": {
        "session_id": {"type": "string"},
        "url": {"type": "string"},
        "websocket_url": {"type": "string"},
        "token": {"type": "string"},
        "expires_at": {"type": "integer"},
        "proxy_id": {"type": "string"},
    },
}
_SESSION = {
    "type": "object",
    "properties": {
        "session_id": {"type": "string"},
        "target_id": _NULLABLE_STR,
        "user": _NULLABLE_STR,
        "proxy_id": _NULLABLE_STR,
        "state": {"type": "string", "enum": ["minted", "active", "closed", "revoked"]},
        "single_use": {"type": "boolean"},
        "expires_at": {"type": "integer"},
        "minted_at": {"type": "number"},
        "opened_at": _NULLABLE_NUM,
        "closed_at": _NULLABLE_NUM,
        "bytes_up": {"type": "integer"},
        "bytes_down": {"type": "integer"},
        "close_code": _NULLABLE_INT,
        "parent_session_id": {
            **_NULLABLE_STR,
            "description": "for a view-only share (POST /sessions/{id}/viewers): the session it watches",
        },
    },
}
_SESSION_PAGE = {
    "type": "object",
    "properties": {
        "sessions": {"type": "array", "items": _SESSION},
        "next_cursor": {
            "type": "string",
            "nullable": True,
            "description": "pass as ?cursor= for the next (older) page; null on the last page",
        },
    },
}
_AUDIT_EVENT = {
    "type": "object",
    "properties": {
        "seq": {"type": "integer"},
        "at": {"type": "number"},
        "type": {"type": "string"},
        "session_id": _NULLABLE_STR,
        "actor": {"type": "string"},
        "detail": {"type": "object"},
    },
}
_PROXY = {
    "type": "object",
    "properties": {
        "id": {"type": "string"},
        "public_url": {"type": "string"},
        "sessions": {"type": "integer"},
        "capacity": {"type": "integer"},
        "draining": {"type": "boolean"},
        "last_seen": _NULLABLE_NUM,
        "healthy": {"type": "boolean"},
    },
}
_KEYS = {
    "type": "object",
    "properties": {
        "version": {"type": "integer"},
        "max_ttl": {"type": "integer"},
        "keys": {"type": "array", "items": {"type": "object"}},
    },
}

_WATCH = {
    "type": "object",
    "required": ["seq", "revoked", "keyring_version"],
    "properties": {
        "seq": {
            "type": "integer",
            "minimum": 0,
            "description": "position in the audit sequence: pass it as ?since= on the next watch",
        },
        "revoked": {
            "type": "array",
            "items": {"type": "string"},
            "description": "sessions revoked after `since` (the snapshot: all a proxy must refuse)",
        },
        "keyring_version": {"type": "integer", "description": "the broker's keyring version now"},
    },
}


_ISSUED = {
    "type": "object",
    "properties": {
        "proxy_id": {"type": "string"},
        "certificate": {"type": "string", "description": "the issued certificate, PEM"},
        "ca": {"type": "string", "description": "the CA certificate, PEM"},
        "serial": {"type": "string", "description": "the certificate's serial, hex"},
        "not_after": {"type": "number", "description": "Unix time the certificate expires"},
    },
}
_CA = {
    "type": "object",
    "properties": {
        "certificate": {"type": "string", "description": "PEM"},
        "fingerprint": {"type": "string", "pattern": "^sha256:[0-9a-f]{64}$"},
    },
}


def _list(name: str, item: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": {name: {"type": "array", "items": item}}}


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _op(
    summary: str,
    who: str,
    ok: tuple[str, dict[str, Any] | None],
    *,
    body: dict[str, Any] | None = None,
    errors: tuple[str, ...] = (),
    params: list[dict[str, Any]] | None = None,
    throttled: bool | None = None,
) -> dict[str, Any]:
    status, schema = ok
    responses: dict[str, Any] = {status: _json(schema) if schema is not None else {"description": "done"}}
    for code in ("400", "401", "403", *errors) if who != "anyone" else errors:
        responses[code] = _json({"$ref": "#/components/schemas/Error"}, "error")
    if throttled if throttled is not None else who != "anyone":
        responses["429"] = {
            **_json({"$ref": "#/components/schemas/Error"}, _THROTTLED),
            "headers": {
                "Retry-After": {
                    "schema": {"type": "integer", "minimum": 1},
                    "description": "whole seconds until one more attempt",
                }
            },
        }
    operation: dict[str, Any] = {
        "summary": summary,
        "description": f"Caller: {who}.",
        "responses": responses,
        "security": [] if who == "anyone" else [{"proxyCredential": []}] if who == "proxy" else [{"apiKey": []}],
    }
    if body is not None:
        operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    if params:
        operation["parameters"] = params
    return operation


def _path_param(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string", "minLength": 1}}


def _query(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema}


_MINT_ERRORS = (
    "Name either `target_id`, or `hypervisor` and `domain` (a libvirt domain name or UUID, looked "
    "up at mint time). Errors: 404 `target_not_found`, `hypervisor_not_found`, `domain_not_found`; "
    "409 `domain_not_running`, `no_vnc_console` (SPICE only, or VNC on a unix socket); "
    "503 `hypervisor_unavailable` (libvirt did not answer within the broker's deadline), "
    "`no_proxy_available`; 403 `clip_not_allowed` (`clip` asks for a clipboard direction the "
    "target or hypervisor does not allow: a request may narrow the default, never widen it; "
    "without `clip` the console gets the default, and the token always carries it)."
)


def _mint_console() -> dict[str, Any]:
    operation = _op(
        "Mint a console: a token and the URL of the assigned proxy",
        "issuer",
        ("201", _CONSOLE),
        body=object_schema(schemas.CONSOLE_CREATE),
        errors=("404", "409", "413", "503"),
    )
    operation["description"] += " " + _MINT_ERRORS
    return operation


_SHARE_ERRORS = (
    "The console is view-only, on the same VM as session `id` (its target, or its libvirt domain "
    "looked up again), for another person; its `expires_at` is never past the session's, and "
    "revoking the session (DELETE /sessions/{id}) revokes it too. Caller: an admin, or the issuer "
    "that minted the session (others 403). Audited as `viewer_shared`. Errors: 404 "
    "`session_not_found` (and the mint's 404s); 409 `session_revoked`, `session_closed`, "
    "`session_expired`, `session_is_shared_view` (share the session it watches instead), "
    "`session_not_shareable` (a libvirt session minted before sharing existed); 503 as for a mint."
)


def _share_session() -> dict[str, Any]:
    operation = _op(
        "Share a session: mint a view-only console on the same VM for another person",
        "issuer",
        ("201", _CONSOLE),
        body=object_schema(schemas.VIEWER_CREATE),
        errors=("404", "409", "413", "503"),
    )
    operation["description"] += " " + _SHARE_ERRORS
    return operation


def document() -> dict[str, Any]:
    """The whole document; served at ``GET /api/v1/openapi.json``."""
    empty = {"type": "object", "additionalProperties": False}
    paths = {
        "/targets": {
            "post": _op(
                "Create a target (password write-only)",
                "admin",
                ("201", _TARGET),
                body=object_schema(schemas.TARGET_CREATE),
                errors=("409", "413"),
            ),
            "get": _op("List targets", "admin", ("200", _list("targets", _TARGET))),
        },
        "/targets/{id}": {
            "parameters": [_path_param("id")],
            "get": _op("One target", "admin", ("200", _TARGET), errors=("404",)),
            "delete": _op("Delete a target", "admin", ("204", None), errors=("404",)),
        },
        "/consoles": {"post": _mint_console()},
        "/sessions": {
            "get": _op(
                "Console sessions, newest first, a page at a time (issuers see their own)",
                "issuer",
                ("200", _SESSION_PAGE),
                params=[
                    _query("state", {"type": "string", "enum": [*SESSION_STATES, "all"]}),
                    _query("limit", {"type": "integer", "minimum": 1, "maximum": SESSIONS_PAGE_MAX}),
                    _query(
                        "cursor",
                        {
                            "type": "string",
                            "minLength": 1,
                            "maxLength": CURSOR_MAX_LENGTH,
                            "description": "the previous page's next_cursor (opaque)",
                        },
                    ),
                ],
            )
        },
        "/sessions/{id}": {
            "parameters": [_path_param("id")],
            "delete": _op(
                "Revoke: the proxy holding it closes it with 4410 at once (its watch), at the latest within one "
                "heartbeat",
                "admin",
                ("202", {"type": "object"}),
                errors=("404",),
            ),
        },
        "/sessions/{id}/viewers": {"parameters": [_path_param("id")], "post": _share_session()},
        "/audit": {
            "get": _op(
                "Audit events after a sequence number",
                "admin",
                ("200", _list("events", _AUDIT_EVENT)),
                params=[
                    _query("after", {"type": "integer", "minimum": 0}),
                    _query("type", {"type": "string", "enum": list(AUDIT_TYPES)}),
                    _query("limit", {"type": "integer", "minimum": 1, "maximum": 1000}),
                ],
            )
        },
        "/keys": {"get": _op("Key ids and status, never key material", "admin", ("200", _KEYS))},
        "/keys/rotate": {
            "post": _op(
                "Rotate: new active keys; old ones verify until their tokens expire",
                "admin",
                ("200", {"type": "object"}),
                body=empty,
                errors=("413",),
            )
        },
        "/proxies": {"get": _op("The proxy fleet", "admin", ("200", _list("proxies", _PROXY)))},
        "/proxy/heartbeat": {
            "post": _op(
                "Proxy heartbeat: load and draining in; keyring (when the proxy's version differs) and revoked "
                "session ids out",
                "proxy",
                ("200", {"type": "object"}),
                body=object_schema(schemas.HEARTBEAT),
                errors=("413",),
            )
        },
        "/proxy/redeem": {
            "post": _op(
                "Redeem a single-use token: 200 the first time, 409 token_used after",
                "proxy",
                ("200", {"type": "object"}),
                body=object_schema(schemas.REDEEM),
                errors=("409", "413"),
            )
        },
        "/proxy/events": {
            "post": _op(
                "Session opened / closed (bytes, duration, close code) / refused (reason)",
                "proxy",
                ("200", {"type": "object"}),
                body=object_schema(schemas.EVENTS),
                errors=("413",),
            )
        },
        "/proxy/watch": {
            "get": _op(
                "Long-poll for revocations and key changes: answered at once when a session was revoked, the keys "
                "rotated or a proxy removed after position `since` (any replica answers from the database), else "
                f"after at most {WATCH_HOLD:g} s (the broker's --watch-hold) with the current position. Without "
                "`since` (or with one ahead of the database): at once, the position and every revoked session a proxy "
                "must still refuse. The proxy acts on `revoked` (close with 4410) and fetches the keys with a "
                "heartbeat when `keyring_version` differs from its own; then watches again from `seq`",
                "proxy",
                ("200", _WATCH),
                params=[
                    _query(
                        "since",
                        {"type": "integer", "minimum": 0, "maximum": 2**62, "description": "the previous answer's seq"},
                    )
                ],
            )
        },
        "/proxy/enroll": {
            "post": _op(
                "Enroll a proxy: a one-time join token (from proxy add) and a PEM CSR (ECDSA P-256; CN the proxy id, "
                "SAN its public URL's host) for a certificate with client and server authentication. Errors: 400 "
                "`join_token_malformed`, `csr_malformed`, `csr_too_large`, `csr_key_not_p256`, `csr_bad_signature`; "
                "401 `join_token_invalid`, `join_token_expired`; 403 `join_token_other_broker`, `csr_names`, "
                "`proxy_removed`; 409 `join_token_used`",
                "anyone",
                ("200", _ISSUED),
                body=object_schema(schemas.ENROLL),
                errors=("400", "401", "403", "409", "413"),
                throttled=True,  # failed join tokens count against the address like credentials
            )
        },
        "/proxy/renew": {
            "post": _op(
                "Renew a proxy certificate: authenticated by the current one (mutual TLS; a bearer credential gets "
                "403 `mtls_required`), a new CSR in, the next certificate out",
                "proxy",
                ("200", _ISSUED),
                body=object_schema(schemas.RENEW),
                errors=("413",),
            )
        },
        "/ca": {"get": _op("The broker CA's certificate (PEM) and sha256: fingerprint", "anyone", ("200", _CA))},
        "/openapi.json": {"get": _op("This document", "anyone", ("200", {"type": "object"}))},
    }
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "consolegate broker",
            "version": "1",
            "description": "Mints short-lived console tokens and keeps the proxy fleet, sessions and audit.",
        },
        "servers": [{"url": "/api/v1"}],
        "paths": paths,
        "components": {
            "schemas": {"Error": _ERROR},
            "securitySchemes": {
                "apiKey": {"type": "http", "scheme": "bearer", "description": "an API key: cgk.<id>.<secret>"},
                "proxyCredential": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "a proxy credential: <proxy_id>.<secret>",
                },
            },
        },
    }
