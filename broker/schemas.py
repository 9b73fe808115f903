"""The shapes of the API's request bodies: one declaration, used to validate and to document.

:func:`validate` turns a decoded JSON body into a checked dict or a ValueError naming the first
problem (unknown member, wrong type, out of range); :func:`to_openapi` renders the same
declaration as an OpenAPI schema, so the document cannot drift from what the code accepts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from broker.auth import NAME_PATTERN

_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "boolean": (bool,),
    "object": (dict,),
    "array": (list,),
    "number": (int, float),
}


@dataclass(frozen=True)
class Field:
    kind: str
    required: bool = False
    nullable: bool = False
    minimum: int | None = None
    maximum: int | None = None
    min_length: int | None = None
    max_length: int | None = None
    pattern: str | None = None
    enum: tuple[str, ...] | None = None
    properties: dict[str, Field] | None = None
    open: bool = False
    """For objects: members beyond ``properties`` are allowed (and ignored)."""
    items: Field | None = None
    max_items: int | None = None
    description: str = ""

    def __post_init__(self) -> None:
        """Every number has a range: an unbounded one reaches SQLite or ``float()`` and fails there
        (a 500) instead of here (a 400). Checked when the schemas are declared, i.e. at import."""
        if self.kind in ("integer", "number") and (self.minimum is None or self.maximum is None):
            raise TypeError("a numeric Field needs both a minimum and a maximum")


def _type_ok(value: Any, kind: str) -> bool:
    if isinstance(value, bool) and kind in ("integer", "number"):
        return False
    return isinstance(value, _JSON_TYPES[kind])


def _check(value: Any, spec: Field, where: str) -> Any:
    if value is None:
        if spec.nullable:
            return None
        raise ValueError(f"{where} must not be null")
    if not _type_ok(value, spec.kind):
        raise ValueError(f"{where} must be of type {spec.kind}")
    if spec.kind in ("integer", "number"):
        if spec.minimum is not None and value < spec.minimum:
            raise ValueError(f"{where} must be at least {spec.minimum}")
        if spec.maximum is not None and value > spec.maximum:
            raise ValueError(f"{where} must be at most {spec.maximum}")
    if spec.kind == "string":
        _check_string(value, spec, where)
    if spec.kind == "object" and spec.properties is not None:
        return validate(value, spec.properties, where=where, open_=spec.open)
    if spec.kind == "array":
        if spec.max_items is not None and len(value) > spec.max_items:
            raise ValueError(f"{where} must have at most {spec.max_items} items")
        assert spec.items is not None
        return [_check(item, spec.items, f"{where}[{i}]") for i, item in enumerate(value)]
    return value


def _encodable(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_string(value: str, spec: Field, where: str) -> None:
    """Besides the field's limits: no NUL (PostgreSQL's text cannot hold it) and no lone
    surrogate (no database driver can encode it), so both engines accept the same strings."""
    if "\x00" in value or not _encodable(value):
        raise ValueError(f"{where} must not contain NUL or unpaired surrogate characters")
    if spec.min_length is not None and len(value) < spec.min_length:
        raise ValueError(f"{where} must have at least {spec.min_length} characters")
    if spec.max_length is not None and len(value) > spec.max_length:
        raise ValueError(f"{where} must have at most {spec.max_length} characters")
    if spec.pattern is not None and not re.fullmatch(spec.pattern, value):
        raise ValueError(f"{where} has an invalid format")
    if spec.enum is not None and value not in spec.enum:
        raise ValueError(f"{where} must be one of {', '.join(spec.enum)}")


def validate(data: Any, fields: dict[str, Field], *, where: str = "body", open_: bool = False) -> dict[str, Any]:
    """The checked object: required members present, no unknown members, every type right."""
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a JSON object")
    unknown = sorted(set(data) - set(fields))
    if unknown and not open_:
        raise ValueError(f"{where} has unknown member {unknown[0]!r}")
    result: dict[str, Any] = {}
    for name, spec in fields.items():
        if name not in data:
            if spec.required:
                raise ValueError(f"{where} lacks the required member {name!r}")
            continue
        result[name] = _check(data[name], spec, f"{where}.{name}" if where != "body" else name)
    return result


def to_openapi(spec: Field) -> dict[str, Any]:
    """The OpenAPI 3.0 schema of one field (objects recursively)."""
    schema: dict[str, Any] = {"type": spec.kind}
    for key, value in (
        ("minimum", spec.minimum),
        ("maximum", spec.maximum),
        ("minLength", spec.min_length),
        ("maxLength", spec.max_length),
        ("maxItems", spec.max_items),
        ("description", spec.description or None),
    ):
        if value is not None:
            schema[key] = value
    if spec.pattern is not None:
        schema["pattern"] = f"^{spec.pattern}$"
    if spec.enum is not None:
        schema["enum"] = list(spec.enum)
    if spec.nullable:
        schema["nullable"] = True
    if spec.kind == "object" and spec.properties is not None:
        schema.update(object_schema(spec.properties, open_=spec.open))
    if spec.kind == "array" and spec.items is not None:
        schema["items"] = to_openapi(spec.items)
    return schema


def object_schema(fields: dict[str, Field], *, open_: bool = False) -> dict[str, Any]:
    schema: dict[str, Any] = {
        "type": "object",
        "properties": {k: to_openapi(v) for k, v in fields.items()},
        "additionalProperties": open_,
    }
    required = [k for k, v in fields.items() if v.required]
    if required:
        schema["required"] = required
    return schema


_ID = NAME_PATTERN.pattern.strip("^$")
_HOST = r"[^\s/@\x00-\x1f\x7f]+"
_TIME_MAX = 2**53
"""Largest time, duration or count given as a JSON number: every integer up to it is exact as a float."""
TLS = {
    "ca": Field(
        "string",
        max_length=4096,
        description='PEM CA certificate for VeNCrypt X.509, or "broker": the broker\'s own CA '
        "(the proxy verifies with the CA it holds and presents its own certificate)",
    ),
    "sni": Field("string", min_length=1, max_length=253),
    "allow_anon": Field("boolean"),
    "require": Field("boolean"),
}

TARGET_CREATE = {
    "id": Field("string", pattern=_ID, description="default: generated"),
    "name": Field("string", required=True, min_length=1, max_length=256),
    "host": Field("string", required=True, min_length=1, max_length=253, pattern=_HOST),
    "port": Field("integer", required=True, minimum=1, maximum=65535),
    "password": Field("string", min_length=1, max_length=256, description="write-only VNC password"),
    "tls": Field("object", properties=TLS, nullable=True, description="upstream VeNCrypt policy"),
    "clip": Field(
        "string",
        enum=("none", "in", "out", "both"),
        nullable=True,
        description="clipboard directions consoles may allow: in (to the VM), out (from it); default both",
    ),
}

HYPERVISOR_CREATE = {
    "name": Field("string", required=True, pattern=_ID),
    "uri": Field(
        "string",
        required=True,
        min_length=1,
        max_length=2048,
        description="libvirt URI: qemu:///system, qemu+tls://HOST/system, qemu+ssh://…, test:///default",
    ),
    "address": Field(
        "string",
        min_length=1,
        max_length=253,
        pattern=_HOST,
        nullable=True,
        description="host proxies use for domains whose VNC listens on 0.0.0.0 / ::",
    ),
    "tls": Field("object", properties=TLS, nullable=True, description="upstream VeNCrypt policy"),
    "console_passwords": Field(
        "boolean",
        description="each mint sets the domain's VNC password, valid until "
        "the last outstanding console's exp (default false)",
    ),
    "clip": Field(
        "string",
        enum=("none", "in", "out", "both"),
        nullable=True,
        description="clipboard directions its domains' consoles may allow; default both",
    ),
}

CONSOLE_CREATE = {
    "target_id": Field("string", min_length=1, max_length=64, description="a registered target; or:"),
    "hypervisor": Field("string", pattern=_ID, description="a registered hypervisor (with domain)"),
    "domain": Field("string", min_length=1, max_length=256, description="a libvirt domain name or UUID"),
    "user": Field("string", min_length=1, max_length=256, nullable=True),
    "ttl": Field("integer", minimum=1, maximum=86400, description="seconds; default 60, at most the broker's max"),
    "single_use": Field("boolean", description="default true"),
    "client_ip": Field("string", min_length=2, max_length=64, nullable=True),
    "view_only": Field("boolean", description="default false"),
    "desktop_name": Field("string", min_length=1, max_length=1024, nullable=True),
    "clip": Field(
        "string",
        enum=("none", "in", "out", "both"),
        nullable=True,
        description="clipboard directions for this console, within the target's "
        "(403 clip_not_allowed beyond it); default: the target's",
    ),
}

VIEWER_CREATE = {
    "user": CONSOLE_CREATE["user"],
    "ttl": Field(
        "integer", minimum=1, maximum=86400, description="seconds; default 60, never past the shared session's expiry"
    ),
    "single_use": CONSOLE_CREATE["single_use"],
    "client_ip": CONSOLE_CREATE["client_ip"],
    "desktop_name": Field(
        "string", min_length=1, max_length=1024, nullable=True, description="default: the target's or domain's name"
    ),
}
"""``POST /sessions/{id}/viewers``: the view-only console's own options; the VM is the session's."""

HEARTBEAT = {
    "proxy_id": Field("string", required=True, pattern=_ID),
    "public_url": Field("string", nullable=True, max_length=2048),
    "sessions": Field("integer", required=True, minimum=0, maximum=10**9),
    "capacity": Field("integer", required=True, minimum=0, maximum=10**9),
    "draining": Field("boolean", required=True),
    "version": Field(
        "integer",
        required=True,
        minimum=0,
        maximum=2**62,
        description="the keyring version the proxy holds (0: none yet)",
    ),
}

REDEEM = {
    "jti": Field("string", required=True, min_length=22, max_length=128),
    "session_id": Field("string", required=True, min_length=1, max_length=128),
    "exp": Field("integer", required=True, minimum=0, maximum=2**62),
}

_EVENT = {
    "event": Field("string", required=True, enum=("opened", "closed", "refused")),
    "at": Field("number", nullable=True, minimum=0, maximum=_TIME_MAX, description="Unix time, seconds"),
    "session_id": Field("string", nullable=True, max_length=128),
    "vm": Field("string", nullable=True, max_length=256),
    "user": Field("string", nullable=True, max_length=256),
    "client": Field("string", nullable=True, max_length=64),
    "view_only": Field("boolean", nullable=True),
    "security": Field("string", nullable=True, max_length=64),
    "handshake_ms": Field("number", nullable=True, minimum=0, maximum=_TIME_MAX),
    "bytes_up": Field("integer", nullable=True, minimum=0, maximum=2**62),  # SQLite's integers are 64-bit
    "bytes_down": Field("integer", nullable=True, minimum=0, maximum=2**62),
    "duration_s": Field("number", nullable=True, minimum=0, maximum=_TIME_MAX),
    "close_code": Field("integer", nullable=True, minimum=0, maximum=65535),
    "close_reason": Field("string", nullable=True, max_length=64),
    "detail": Field("string", nullable=True, max_length=1024),
    "code": Field("string", nullable=True, max_length=64),
    "reason": Field("string", nullable=True, max_length=256),
    "status": Field("integer", nullable=True, minimum=100, maximum=599),
    "path": Field("string", nullable=True, max_length=256),
}

EVENTS = {"events": Field("array", required=True, max_items=500, items=Field("object", properties=_EVENT, open=True))}

EMPTY: dict[str, Field] = {}

_CSR = Field(
    "string",
    required=True,
    min_length=1,
    max_length=60000,
    description="a PEM certificate signing request for an ECDSA P-256 key (at most 8192 bytes)",
)

ENROLL = {
    "join_token": Field("string", required=True, min_length=1, max_length=4096, description="cgj1.…"),
    "csr": _CSR,
}

RENEW = {"csr": _CSR}
