"""Multi-node: ``microturn router`` sends each new session to a server with room.

Servers report themselves (``report_capacity``, started by ``serve --router URL
--advertise URL``): every second a heartbeat with their free session slots. The
router answers ``POST /v1/sessions`` with ``307 Temporary Redirect`` to the node
with the most free slots; the client re-sends its offer there (WHIP allows the
redirect, RFC 9725 §4.5) and media then flows straight to that node. The router
holds no media and no session state, so several can run side by side.

Between heartbeats the router counts the redirects it hands out against a node
(for ``_RESERVATION_S``), so a burst of clients spreads instead of all landing on
whichever node looked emptiest a second ago. A node silent for ``node_timeout_s``
is skipped.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from dataclasses import dataclass, field
from urllib.parse import urlencode, urlsplit

import httpx
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from server.auth import BearerAuth, TokenError, Verifier, mint_token, request_token, verify_token
from server.config import ServerConfig
from server.sessions import SessionRegistry
from server.whip import EXPOSED_HEADERS, JSON_HTTP_ERRORS, SDP, error_response

log = logging.getLogger(__name__)
NODE_SUBJECT = "node"  # the subject servers sign their heartbeats' tokens for

_RESERVATION_S = 5.0  # a redirect counts against its node this long at most...
_SETTLE_S = 1.0  # ...or until a heartbeat this much later (the session exists by then)
_REDIRECT_TOKEN_TTL_S = 60.0


@dataclass(slots=True)
class Node:
    url: str
    capacity: int = 0
    free: int = 0
    ready: bool = False
    seen: float = 0.0  # monotonic time of the last heartbeat
    reservations: list[float] = field(default_factory=list)  # monotonic times of recent redirects

    def available(self, now: float) -> int:
        self.reservations = [t for t in self.reservations
                             if now - t < _RESERVATION_S and self.seen - t < _SETTLE_S]
        return self.free - len(self.reservations) if self.ready else 0


class NodeTable:
    def __init__(self, node_timeout_s: float = 3.0) -> None:
        self.node_timeout_s = node_timeout_s
        self.nodes: dict[str, Node] = {}

    def heartbeat(self, url: str, capacity: int, free: int, ready: bool, now: float | None = None) -> None:
        node = self.nodes.setdefault(url, Node(url))
        node.capacity, node.free, node.ready, node.seen = capacity, free, ready, now or time.monotonic()

    def pick(self, now: float | None = None) -> Node | None:
        """The live node with the most room, its slot reserved; None if all are full."""
        now = now or time.monotonic()
        live = [n for n in self.nodes.values() if now - n.seen <= self.node_timeout_s]
        best = max(live, key=lambda n: (n.available(now), -len(n.reservations)), default=None)
        if best is None or best.available(now) <= 0:
            return None
        best.reservations.append(now)
        return best

    def describe(self, now: float | None = None) -> list[dict[str, object]]:
        now = now or time.monotonic()
        return [{"url": n.url, "capacity": n.capacity, "free": n.free, "ready": n.ready,
                 "reserved": len(n.reservations), "age_s": round(now - n.seen, 3),
                 "live": now - n.seen <= self.node_timeout_s} for n in self.nodes.values()]


def _from_a_node(verifier: Verifier, request: Request) -> bool:
    """Whether a heartbeat comes from a server. With a signing secret, servers sign
    their beats for subject "node", and a client's token (which got past the auth
    middleware all the same) may not register a URL that clients would then be sent
    to. With static tokens (or none) nothing tells them apart (docs/deploy.md)."""
    if not verifier.secret:
        return True
    try:
        return verify_token(verifier.secret, request_token(request.scope) or "").get("sub") == NODE_SUBJECT
    except TokenError:
        return False


def _valid_node_url(url: object) -> bool:
    if not isinstance(url, str):
        return False
    parts = urlsplit(url)
    return parts.scheme in ("http", "https") and bool(parts.netloc) and parts.path in ("", "/")


def create_router_app(verifier: Verifier | None = None, cors_origins: list[str] | None = None,
                      node_timeout_s: float = 3.0) -> Starlette:
    table = NodeTable(node_timeout_s)
    verifier = verifier or Verifier()

    async def route_session(request: Request) -> Response:
        node = table.pick()
        if node is None:
            return error_response(503, "at_capacity", "every node is full or silent, retry later",
                                  {"Retry-After": "5"})
        location = f"{node.url.rstrip('/')}/v1/sessions"
        # The client's own parameters (e.g. record=1, its consent) go along.
        query = [(k, v) for k, v in request.query_params.multi_items() if k != "access_token"]
        if verifier.secret:
            # Browsers drop Authorization on a cross-origin redirect: carry a short-lived
            # token of our own in the URL (RFC 6750 access_token) instead.
            query.append(("access_token", mint_token(verifier.secret, _REDIRECT_TOKEN_TTL_S, "router")))
        if query:
            location += "?" + urlencode(query)
        return Response(status_code=307, headers={"Location": location, "Cache-Control": "no-store"})

    async def options(request: Request) -> Response:
        return Response(status_code=204, headers={"Accept-Post": SDP})

    async def heartbeat(request: Request) -> Response:
        if not _from_a_node(verifier, request):
            return error_response(403, "not_a_node", "heartbeats need a token minted for subject 'node' "
                                  "(servers mint their own from --auth-secret)")
        try:
            body = await request.json()
            url, capacity, free, ready = body["url"], body["capacity"], body["free"], body["ready"]
            if not (_valid_node_url(url) and isinstance(capacity, int) and isinstance(free, int)
                    and isinstance(ready, bool)):
                raise ValueError
        except (ValueError, KeyError, TypeError):
            return error_response(400, "bad_heartbeat",
                                  'send {"url": "http(s)://host:port", "capacity": int, "free": int, "ready": bool}')
        table.heartbeat(url, capacity, free, ready)
        return Response(status_code=204)

    async def nodes(request: Request) -> Response:
        return JSONResponse({"nodes": table.describe()})

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok", "nodes": len(table.nodes)})

    middleware = []
    if cors_origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["POST", "OPTIONS"],
                                     allow_headers=["Authorization", "Content-Type", "traceparent"],
                                     expose_headers=EXPOSED_HEADERS))
    middleware.append(Middleware(BearerAuth, verifier=verifier))
    app = Starlette(routes=[
        Route("/healthz", healthz),
        Route("/v1/sessions", route_session, methods=["POST"]),
        Route("/v1/sessions", options, methods=["OPTIONS"]),
        Route("/v1/nodes", heartbeat, methods=["POST"]),
        Route("/v1/nodes", nodes, methods=["GET"]),
    ], middleware=middleware, exception_handlers=JSON_HTTP_ERRORS)
    app.state.nodes = table
    return app


def _node_headers(config: ServerConfig) -> dict[str, str]:
    if config.auth_secret:  # a fresh token each beat: never near its expiry
        return {"Authorization": f"Bearer {mint_token(config.auth_secret, 3600, NODE_SUBJECT)}"}
    return {"Authorization": f"Bearer {config.auth_tokens[0]}"} if config.auth_tokens else {}


def _nodes_url(config: ServerConfig) -> str:
    assert config.router_url is not None
    return config.router_url.rstrip("/") + "/v1/nodes"


def _beat(config: ServerConfig, registry: SessionRegistry) -> dict[str, object]:
    """What a node tells the router of itself."""
    return {"url": config.advertise_url, "capacity": registry.capacity, "free": registry.free,
            "ready": registry.ready}


async def report_capacity(config: ServerConfig, registry: SessionRegistry) -> None:
    """Node side: heartbeat to the router for the server's life. A router that is
    down costs a log line per period, never the node's own sessions."""
    url = _nodes_url(config)
    failing = False
    async with httpx.AsyncClient(timeout=2.0) as client:
        while True:
            try:
                response = await client.post(url, json=_beat(config, registry), headers=_node_headers(config))
                response.raise_for_status()
                if failing:
                    log.info("router %s reachable again", url)
                failing = False
            except httpx.HTTPError as exc:
                if not failing:
                    log.warning("cannot report capacity to %s: %s", url, exc)
                failing = True
            await asyncio.sleep(config.heartbeat_period_s)


async def leave_router(config: ServerConfig, registry: SessionRegistry) -> None:
    """Node side, at shutdown: one last beat saying it takes no one, so the router
    stops sending clients here now rather than when the beats go stale (seconds of
    new sessions refused by a draining node)."""
    beat = _beat(config, registry) | {"free": 0, "ready": False}
    try:
        async with httpx.AsyncClient(timeout=1.0) as client:
            await client.post(_nodes_url(config), json=beat, headers=_node_headers(config))
    except httpx.HTTPError as exc:  # the router may be gone first; its beats then go stale
        log.info("could not tell the router this node is leaving: %s", exc)


def main(argv: list[str] | None = None) -> None:
    import os

    import uvicorn

    parser = argparse.ArgumentParser(prog="microturn router",
                                     description="Send each new WHIP session to a server with room (HTTP 307).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--node-timeout-s", type=float, default=3.0,
                        help="skip a node whose last heartbeat is older than this")
    parser.add_argument("--auth-token", action="append", default=[],
                        help="static bearer token (repeatable; also MICROTURN_AUTH_TOKENS, comma-separated)")
    parser.add_argument("--auth-secret", default=os.environ.get("MICROTURN_AUTH_SECRET"),
                        help="HMAC secret of `microturn token` tokens (or MICROTURN_AUTH_SECRET)")
    parser.add_argument("--cors-origin", action="append", default=[])
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    tokens = args.auth_token + [t for t in os.environ.get("MICROTURN_AUTH_TOKENS", "").split(",") if t]
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_router_app(Verifier(tokens, args.auth_secret), args.cors_origin, args.node_timeout_s)
    uvicorn.run(app, host=args.host, port=args.port, loop="uvloop", log_level=args.log_level)

