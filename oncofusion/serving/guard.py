"""The server's front door: every request passes here before MONAI Label's routes see it.

An ASGI middleware, outermost, so that it also covers MONAI Label's stock endpoints:

- gives each request an id (``X-Request-ID``) and logs one line per request with the method, path,
  image id, status and time, and nothing else: no parameters, report text or clinical values;
- applies :mod:`~oncofusion.serving.policy` (unknown routes 404, administrative routes off without
  authentication) and, with authentication on, the bearer token's roles (401/403);
- refuses ids that are not identifiers (``image``, ``label``, ``tag``, ``id``, ``session_id``) with 400
  before any file is touched;
- refuses request bodies over the configured size (413) and bodies of unknown length (411);
- answers cross-origin requests only for configured origins (stock MONAI Label reflects any origin
  with credentials).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from oncofusion.contract import InvalidRequest
from oncofusion.serving.auth import TokenVerifier
from oncofusion.serving.identifiers import check_identifier, is_identifier
from oncofusion.serving.policy import access, role_satisfied

logger = logging.getLogger("oncofusion.access")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: query parameters that name a stored object: identifiers only
ID_PARAMS = ("image", "label", "tag", "id", "session_id")
#: methods whose body the guard bounds
BODY_METHODS = ("POST", "PUT", "PATCH")


@dataclass(frozen=True)
class GuardConfig:
    """``max_body_bytes``: largest request body (an uploaded study included). ``cors_origins``: origins
    (``scheme://host:port``) allowed to call from a browser page served elsewhere; ``verifier``: set when
    authentication is on."""

    max_body_bytes: int = 1024 * 2**20
    cors_origins: Sequence[str] = field(default_factory=tuple)
    verifier: TokenVerifier | None = None


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


async def _answer(send: Send, status: int, detail: str, request_id: str, extra: Sequence[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"x-request-id", request_id.encode()), *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class RequestGuard:
    """ASGI middleware applying :class:`GuardConfig` to every HTTP request (see the module docstring)."""

    def __init__(self, app: ASGIApp, config: GuardConfig):
        self.app = app
        self.config = config

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = uuid.uuid4().hex[:12]
        start = time.perf_counter()
        status_box = {"status": 500}

        async def send_tracked(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_box["status"] = message["status"]
                message["headers"] = [*self._filter_cors(scope, message.get("headers", [])),
                                      (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            refusal = self._refusal(scope)
            if refusal is not None:
                status_box["status"] = refusal.status_code
                await _answer(send, refusal.status_code, str(refusal), request_id,
                              [(b"www-authenticate", b"Bearer")] if refusal.status_code == 401 else [])
                return
            scope.setdefault("state", {})["request_id"] = request_id
            await self.app(scope, self._bounded(receive), send_tracked)
        finally:
            self._log(scope, status_box["status"], time.perf_counter() - start, request_id)

    # -- decisions -----------------------------------------------------------------------------------
    def _refusal(self, scope: Scope) -> InvalidRequest | None:
        """Why the request may not proceed, or None; records the verified user in ``scope["state"]``."""
        method, path = scope["method"], scope["path"]
        origin = _header(scope, b"origin")
        if origin and not self._origin_allowed(scope, origin):
            return InvalidRequest(f"cross-origin requests from {origin[:80]} are not allowed on this server "
                                  "(--conf cors_origins)", 403)
        decision = access(method, path.rstrip("/") or "/", self.config.verifier is not None)
        if not decision.allowed:
            return InvalidRequest(decision.reason, decision.status)
        if self.config.verifier is not None and decision.role is not None:
            try:
                user, roles = self.config.verifier.verify(_header(scope, b"authorization"))
            except InvalidRequest as e:
                return e
            if not role_satisfied(decision.role, roles):
                return InvalidRequest(f"{method} {path} needs the '{decision.role}' role", 403)
            scope.setdefault("state", {})["user"] = (user, roles)
        try:
            for key, value in parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True):
                if key in ID_PARAMS and value:
                    check_identifier(value, f"'{key}'")
        except InvalidRequest as e:
            return e
        if method in BODY_METHODS:
            length = _header(scope, b"content-length")
            if length is None and _header(scope, b"transfer-encoding"):
                return InvalidRequest("send the request with a Content-Length (chunked uploads are not accepted)", 411)
            if length is not None and (not length.isdigit() or int(length) > self.config.max_body_bytes):
                limit_mb = self.config.max_body_bytes / 2**20
                return InvalidRequest(f"request body of {length} bytes is over this server's limit of "
                                      f"{limit_mb:g} MiB (--conf max_upload_mb)", 413)
        return None

    def _origin_allowed(self, scope: Scope, origin: str) -> bool:
        """Same-origin pages (OHIF served by this server) and configured origins."""
        host = _header(scope, b"host")
        same = host is not None and origin.split("://", 1)[-1] == host
        return same or origin in self.config.cors_origins

    def _filter_cors(self, scope: Scope, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        """Drop CORS grants the stock middleware made for an origin that is not configured."""
        origin = _header(scope, b"origin")
        if origin and origin in self.config.cors_origins:
            return list(headers)
        return [(k, v) for k, v in headers if not k.lower().startswith(b"access-control-")]

    def _bounded(self, receive: Receive) -> Receive:
        """Count body bytes as they arrive: a client that lies about Content-Length is cut off."""
        received = 0
        limit = self.config.max_body_bytes

        async def bounded() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise InvalidRequest(f"request body over {limit} bytes", 413)
            return message

        return bounded

    # -- the access log ------------------------------------------------------------------------------
    def _log(self, scope: Scope, status: int, seconds: float, request_id: str) -> None:
        query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
        image = query.get("image", "")
        shown = f" image={image}" if image and is_identifier(image) else ""
        logger.info("%s %s %s%s -> %d in %.3fs", request_id, scope["method"], scope["path"], shown, status, seconds)
