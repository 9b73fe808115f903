"""The OpenAPI 3.0 document of the proxy's HTTP surface, served at ``GET /openapi.json``.

The proxy has few endpoints and no request bodies; the document exists so that the same
fuzzer that checks the broker (schemathesis, in the tests) checks every proxy endpoint too, and
so that what each one answers, refusals included, is written down in one place. Every error is
``{"error": CODE, "message": TEXT}`` (:meth:`console_proxy.admission.Refusal.body`,
:mod:`console_proxy.httperrors`).
"""

from __future__ import annotations

from typing import Any

_ERROR = {
    "type": "object",
    "required": ["error", "message"],
    "additionalProperties": False,
    "properties": {"error": {"type": "string"}, "message": {"type": "string"}},
}
_ERROR_REF = {"$ref": "#/components/schemas/Error"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: str) -> dict[str, Any]:
    return {status: _json(_ERROR_REF, "refused") for status in statuses}


def _header(name: str, description: str = "") -> dict[str, Any]:
    return {"name": name, "in": "header", "required": False, "schema": {"type": "string"}, "description": description}


def _file(summary: str, example: str) -> dict[str, Any]:
    return {
        "get": {
            "summary": summary,
            "parameters": [
                {
                    "name": "path",
                    "in": "path",
                    "required": True,
                    "example": example,
                    "schema": {"type": "string", "minLength": 1},
                    "description": "relative path of plain segments (no NUL, backslash, . or ..)",
                }
            ],
            "responses": {
                "200": {"description": "the file"},
                "304": {"description": "not modified"},
                "416": {"description": "range not satisfiable"},
                **_errors("400", "403", "404"),
            },
        }
    }


_TOKEN_STATUS = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "expires_at": {"type": "integer"},
        "view_only": {"type": "boolean"},
        "single_use": {"type": "boolean"},
        "desktop_name": {"type": "string", "nullable": True},
        "clip": {
            "type": "string",
            "enum": ["none", "in", "out", "both"],
            "description": "which way the clipboard may flow: in (to the VM), out (from it); the proxy enforces it",
        },
        "max_cut_text": {
            "type": "integer",
            "description": "longest text, in bytes, the proxy passes to the VM's clipboard",
        },
    },
}
_HEALTH = {
    "type": "object",
    "properties": {"status": {"type": "string"}, "sessions": {"type": "integer"}, "capacity": {"type": "integer"}},
}


def document() -> dict[str, Any]:
    """The whole document (small, so built on each request rather than cached)."""
    paths = {
        "/console": {
            "get": {
                "summary": "The viewer page; the token travels in the URL fragment, never sent here",
                "responses": {"200": {"description": "HTML"}, **_errors("404")},
            }
        },
        "/websockify": {
            "get": {
                "summary": "The console: a websocket upgrade, admitted (token, Origin, capacity) before the 101",
                "parameters": [
                    {
                        "name": "token",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string"},
                        "description": "the token, when the subprotocol cannot carry it",
                    },
                    _header("Origin"),
                    _header("Upgrade"),
                    _header("Connection"),
                    _header("Sec-WebSocket-Key"),
                    _header("Sec-WebSocket-Version"),
                    _header("Sec-WebSocket-Protocol", "binary, and the token as base64url.bearer.authorization.…"),
                ],
                "responses": {
                    "101": {"description": "switching to the websocket"},
                    **_errors("400", "401", "403", "409", "410", "426", "503"),
                },
            }
        },
        "/token-status": {
            "get": {
                "summary": "The verdict the websocket would give now, without redeeming a single-use token",
                "parameters": [_header("Authorization", "Bearer TOKEN"), _header("Origin")],
                "responses": {
                    "200": _json(_TOKEN_STATUS, "the token would be admitted"),
                    **_errors("400", "401", "403", "409", "410", "503"),
                },
            }
        },
        "/healthz": {
            "get": {
                "summary": "Liveness; 503 while draining",
                "responses": {"200": _json(_HEALTH, "serving"), "503": _json(_HEALTH, "draining")},
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus text exposition",
                "responses": {
                    "200": {"description": "metrics", "content": {"text/plain": {"schema": {"type": "string"}}}}
                },
            }
        },
        "/openapi.json": {
            "get": {"summary": "This document", "responses": {"200": _json({"type": "object"}, "OpenAPI 3.0")}}
        },
        "/static/{path}": _file("The viewer's own files", "console.js"),
        "/novnc/{path}": _file("noVNC's files", "core/rfb.js"),
    }
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "consolegate proxy",
            "version": "1",
            "description": "Serves the viewer and relays consoles; stateless, no request bodies.",
        },
        "paths": paths,
        "components": {"schemas": {"Error": _ERROR}},
    }
