"""A small synchronous client for the broker API (standard library only), for the CLI and tests.

Errors come back as :class:`BrokerError` with the status and the API's stable code, so a caller
can tell ``no_proxy_available`` from ``target_not_found`` without parsing messages.

Every request carries a credential (an admin API key can do everything), so the client talks
``https://``, or plain ``http://`` only to a loopback address, unless told ``allow_insecure=True``:
the same rule as the proxy's link to the broker (console_proxy.brokerlink.check_broker_url).
"""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from console_proxy.hostside import is_loopback_host


class BrokerError(Exception):
    """An error answer (``status`` and ``code``) or, with status 0, no answer at all."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


class InsecureBrokerURL(ValueError):
    """A broker URL this client will not send a credential to; one line, never the credential."""


def check_broker_url(url: str, *, allow_insecure: bool = False) -> None:
    """Refuse a URL whose traffic (bearer credential included) could be read or altered on the way."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname
    if not host or parts.scheme not in ("http", "https"):
        raise InsecureBrokerURL("the broker URL must be https://HOST[:PORT] (or http:// to this host)")
    if parts.scheme == "http" and not allow_insecure and not is_loopback_host(host):
        raise InsecureBrokerURL(
            f"refusing plain http to the broker at {host!r}: the API key would cross the "
            "network readable; use https:// (plain http only to this host)"
        )


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # the 3xx then surfaces as an HTTPError


class BrokerClient:
    """``BrokerClient("http://127.0.0.1:8700", api_key)``; methods mirror DESIGN's table.

    ``allow_insecure=True`` permits plain http to a remote host (a lab behind its own tunnel);
    without it such a URL raises :class:`InsecureBrokerURL` before anything is sent.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        timeout: float = 10.0,
        ca_file: str | None = None,
        allow_insecure: bool = False,
    ) -> None:
        check_broker_url(base_url, allow_insecure=allow_insecure)
        self.base = base_url.rstrip("/") + "/api/v1"
        self.api_key, self.timeout = api_key, timeout
        context = ssl.create_default_context(cafile=ca_file)
        # No redirects: urllib would follow one carrying the Authorization header along.
        self._opener = urllib.request.build_opener(_NoRedirect, urllib.request.HTTPSHandler(context=context))

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        query: dict[str, Any] | None = None,
        raw: bytes | None = None,
        authorization: str | None = None,
    ) -> tuple[int, Any]:
        """(status, decoded JSON or None); raises BrokerError for 4xx/5xx and network failures."""
        url = self.base + path
        if query:
            url += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        request = urllib.request.Request(url, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        auth = authorization or (f"Bearer {self.api_key}" if self.api_key else None)
        if auth:
            request.add_header("Authorization", auth)
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                return response.status, _decode(response.read())
        except urllib.error.HTTPError as exc:
            answer = _decode(exc.read()) or {}
            raise BrokerError(exc.code, answer.get("error", "error"), answer.get("message", "")) from None
        except (urllib.error.URLError, OSError) as exc:
            raise BrokerError(0, "broker_unreachable", str(getattr(exc, "reason", exc))) from None

    def _get(self, path: str, **query: Any) -> dict[str, Any]:
        return _json_object(*self.request("GET", path, query=query))

    def _post(self, path: str, body: Any) -> dict[str, Any]:
        return _json_object(*self.request("POST", path, body))

    def _get_list(self, path: str, key: str, **query: Any) -> list[dict[str, Any]]:
        """The list of objects under ``key`` in a GET answer (``{"targets": [...]}`` and the like)."""
        status, answer = self.request("GET", path, query=query)
        items = _json_object(status, answer).get(key)
        if not isinstance(items, list):
            raise BrokerError(status, "unexpected_answer", f"the answer has no list {key!r}")
        return [_json_object(status, item) for item in items]

    def add_target(self, **target: Any) -> dict[str, Any]:
        return self._post("/targets", target)

    def targets(self) -> list[dict[str, Any]]:
        return self._get_list("/targets", "targets")

    def target(self, target_id: str) -> dict[str, Any]:
        return self._get(f"/targets/{urllib.parse.quote(target_id, safe='')}")

    def delete_target(self, target_id: str) -> None:
        self.request("DELETE", f"/targets/{urllib.parse.quote(target_id, safe='')}")

    def mint(self, target_id: str, **options: Any) -> dict[str, Any]:
        return self._post("/consoles", {"target_id": target_id, **options})

    def mint_domain(self, hypervisor: str, domain: str, **options: Any) -> dict[str, Any]:
        """A console for a libvirt domain, looked up at mint time (name or UUID)."""
        return self._post("/consoles", {"hypervisor": hypervisor, "domain": domain, **options})

    def sessions(
        self, state: str = "all", *, limit: int | None = None, cursor: str | None = None
    ) -> list[dict[str, Any]]:
        """One page of sessions, newest first (up to 1000 unless ``limit``); see :meth:`sessions_page`."""
        return self._get_list("/sessions", "sessions", state=state, limit=limit, cursor=cursor)

    def sessions_page(
        self, state: str = "all", *, limit: int | None = None, cursor: str | None = None
    ) -> dict[str, Any]:
        """``{sessions, next_cursor}``: pass ``next_cursor`` back as ``cursor`` until it is None."""
        return self._get("/sessions", state=state, limit=limit, cursor=cursor)

    def revoke(self, session_id: str) -> None:
        self.request("DELETE", f"/sessions/{urllib.parse.quote(session_id, safe='')}")

    def share(self, session_id: str, **options: Any) -> dict[str, Any]:
        """A view-only console on the session's VM for another person (user, ttl, client_ip)."""
        return self._post(f"/sessions/{urllib.parse.quote(session_id, safe='')}/viewers", options)

    def audit(self, after: int = 0, type_: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        return self._get_list("/audit", "events", after=after, type=type_, limit=limit)

    def rotate_keys(self) -> dict[str, Any]:
        return self._post("/keys/rotate", {})

    def keys(self) -> dict[str, Any]:
        return self._get("/keys")

    def proxies(self) -> list[dict[str, Any]]:
        return self._get_list("/proxies", "proxies")

    def openapi(self) -> dict[str, Any]:
        return self._get("/openapi.json")


def _decode(raw: bytes) -> Any:
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return None


def _json_object(status: int, answer: Any) -> dict[str, Any]:
    """An answer the API documents as a JSON object; anything else is reported, not returned."""
    if not isinstance(answer, dict):
        raise BrokerError(status, "unexpected_answer", f"expected a JSON object, got {type(answer).__name__}")
    return answer
