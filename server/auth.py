"""Bearer tokens for signalling: static tokens and short-lived HMAC-signed ones.

A signed token is ``mt1.<payload>.<signature>``: payload = base64url(JSON
``{"exp": unix seconds, "sub": name}``), signature = base64url(HMAC-SHA256(secret,
"mt1." + payload)). ``microturn token`` mints them; any server or router holding
the secret checks them without a database. Tokens come in ``Authorization:
Bearer`` or, where a header cannot be carried (a redirect to another node, see
router.py), the RFC 6750 ``access_token`` query parameter.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from collections.abc import Sequence
from urllib.parse import parse_qs

from starlette.types import ASGIApp, Receive, Scope, Send

from server.whip import error_response

PREFIX = "mt1"


class TokenError(ValueError):
    pass


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _sign(secret: str, signed_part: str) -> str:
    return _b64(hmac.new(secret.encode(), signed_part.encode(), hashlib.sha256).digest())


def mint_token(secret: str, ttl_s: float, subject: str = "", now: float | None = None) -> str:
    if not secret:
        raise ValueError("an empty secret signs nothing")
    payload = _b64(json.dumps({"exp": int((now or time.time()) + ttl_s), "sub": subject},
                              separators=(",", ":")).encode())
    signed_part = f"{PREFIX}.{payload}"
    return f"{signed_part}.{_sign(secret, signed_part)}"


def verify_token(secret: str, token: str, now: float | None = None) -> dict[str, object]:
    """The token's claims, or TokenError saying why it is refused."""
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != PREFIX:
        raise TokenError("not a microturn token")
    signed_part = f"{parts[0]}.{parts[1]}"
    # As bytes: compare_digest refuses str with non-ASCII characters (TypeError, a 500).
    if not hmac.compare_digest(_sign(secret, signed_part).encode(), parts[2].encode()):
        raise TokenError("bad signature")
    try:
        claims = json.loads(_unb64(parts[1]))
        expires = float(claims["exp"])
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise TokenError("malformed payload") from None
    if expires < (now or time.time()):
        raise TokenError("expired")
    return claims


class Verifier:
    def __init__(self, static_tokens: Sequence[str] = (), secret: str | None = None) -> None:
        self.static_tokens = [t for t in static_tokens if t]
        self.secret = secret or None

    @property
    def enabled(self) -> bool:
        return bool(self.static_tokens or self.secret)

    def check(self, token: str | None) -> str | None:
        """None if ``token`` is good, else why not."""
        if not token:
            return "missing bearer token"
        # Compare against every static token: the time taken says nothing about which matched.
        matched = False
        for static in self.static_tokens:
            matched |= hmac.compare_digest(static.encode(), token.encode())
        if matched:
            return None
        if self.secret:
            try:
                verify_token(self.secret, token)
                return None
            except TokenError as exc:
                return f"invalid token: {exc}"
        return "invalid token"


def request_token(scope: Scope) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer":
                return token.strip()
    values = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("access_token")
    return values[0] if values else None


def is_preflight(scope: Scope) -> bool:
    """A CORS preflight: an OPTIONS a browser sends, without credentials, before the
    real request. Other OPTIONS (WHIP's ICE-server query) are requests like any other."""
    return scope["method"] == "OPTIONS" and any(
        name == b"access-control-request-method" for name, _ in scope.get("headers", []))


class BearerAuth:
    """ASGI middleware: requests under ``prefix`` need a good token (CORS preflight
    excepted: browsers send it without credentials). Refusals are 401 + JSON and
    reach no handler, so nothing is allocated."""

    def __init__(self, app: ASGIApp, verifier: Verifier, prefix: str = "/v1/") -> None:
        self.app = app
        self.verifier = verifier
        self.prefix = prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] == "http" and self.verifier.enabled and scope["path"].startswith(self.prefix)
                and not is_preflight(scope)):
            problem = self.verifier.check(request_token(scope))
            if problem is not None:
                response = error_response(401, "unauthorized", problem,
                                          {"WWW-Authenticate": 'Bearer realm="microturn"'})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
