"""WHIP signalling (RFC 9725) for sessions, WHEP for their voice.

POST   /v1/sessions               application/sdp offer -> 201, answer, Location, ETag, Link
OPTIONS /v1/sessions              -> 204, Accept-Post (and CORS, from the middleware)
PATCH  /v1/sessions/{id}          trickle ICE -> 204; ICE restart (If-Match: "*") -> 200
DELETE /v1/sessions/{id}          -> 204
GET    /v1/sessions/{id}          -> JSON diagnostics
POST   /v1/sessions/{id}/whep     receive-only offer -> 201 (a viewer of the session's voice)
PATCH/DELETE /v1/sessions/{id}/whep/{viewer}
Every refusal is an HTTP status with a JSON body, decided before anything is
allocated, so a bad request leaves nothing behind.
"""

from __future__ import annotations

import logging
import secrets

from aiortc import sdp as aiortc_sdp
from aiortc.exceptions import InvalidAccessError, InvalidStateError
from opentelemetry.propagate import extract
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from server import telemetry as tm
from server.auth import is_preflight
from server.config import ServerConfig
from server.session import Session
from server.sessions import SessionRegistry
from server.whep import Viewer
from server.whip import (
    RECORDING_HEADER,
    SDP,
    SDPFRAG,
    error_response,
    etag,
    ice_server_links,
    offer_problem,
    offer_text_problem,
    patch_ice,
    read_limited,
    with_links,
)

log = logging.getLogger(__name__)


class OfferError(ValueError):
    pass


def validate_offer(body: bytes) -> str:
    """The offer as text, or OfferError saying why it cannot be a session."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise OfferError("the offer is not UTF-8 text") from None
    if not text.lstrip().startswith("v=0"):
        raise OfferError("not an SDP offer (it must start with 'v=0')")
    problem = offer_text_problem(text)  # before parsing: bounds the parser's work
    if problem is not None:
        raise OfferError(problem)
    try:
        description = aiortc_sdp.SessionDescription.parse(text)
    except Exception as exc:  # noqa: BLE001 - the parser raises whatever the bad line provokes
        raise OfferError(f"unparsable SDP ({type(exc).__name__}: {str(exc)[:120] or 'a malformed line'})") from None
    problem = offer_problem(description)
    if problem is not None:
        raise OfferError(problem)
    return text


async def read_offer(request: Request, limit: int) -> str | Response:
    """The request's SDP offer, or the error response to send instead."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != SDP:
        return error_response(415, "unsupported_media_type", "send the offer as application/sdp")
    body = await read_limited(request, limit)
    if body is None:
        return error_response(413, "offer_too_large", f"offers are limited to {limit} bytes")
    try:
        return validate_offer(body)
    except OfferError as exc:
        return error_response(400, "bad_offer", str(exc))


async def create_session(request: Request) -> Response:
    registry: SessionRegistry = request.app.state.registry
    offer = await read_offer(request, registry.config.max_offer_bytes)
    if isinstance(offer, Response):
        return offer
    if registry.draining:
        registry.metrics.rejected_sessions.add(1, {tm.ATTR_REASON: "draining"})
        return error_response(503, "draining", "this server is shutting down; retry (elsewhere)",
                              {"Retry-After": "1"})
    if registry.full:
        registry.metrics.rejected_sessions.add(1, {tm.ATTR_REASON: "at_capacity"})
        return error_response(503, "at_capacity", f"all {registry.capacity} session slots are taken, retry later",
                              {"Retry-After": "5"})

    # Recorded only with the client's consent (the page's box sends record=1) on a
    # server that offers recording (--record-dir).
    record = request.query_params.get("record") == "1" and registry.recording is not None
    session = registry.new_session(secrets.token_urlsafe(12), parent=extract(request.headers), record=record)
    try:
        answer = await session.accept(offer)
    except (ValueError, InvalidAccessError, InvalidStateError) as exc:
        await session.close("offer rejected")
        return error_response(400, "bad_offer", f"the offer could not be applied: {exc}")
    except Exception:
        log.exception("session %s failed to start", session.id)
        await session.close("internal error during set-up")
        return error_response(500, "internal_error", "the session could not be started")
    response = Response(answer, status_code=201, media_type=SDP,
                        headers={"Location": _location(registry.config, f"/v1/sessions/{session.id}"),
                                 "ETag": etag(session.pc),
                                 "Accept-Patch": SDPFRAG})
    if session.recorder is not None:
        response.headers[RECORDING_HEADER] = "on"
    return with_links(response, ice_server_links(session.ice_servers))


def _location(config: ServerConfig, path: str) -> str:
    """Absolute when this node is advertised: a client redirected here by the router
    may resolve a relative Location against the router (simple-whip-client does)."""
    return (config.advertise_url or "").rstrip("/") + path


async def session_options(request: Request) -> Response:
    """WHIP's OPTIONS: what may be posted, and (when configured) which ICE servers to use."""
    registry: SessionRegistry = request.app.state.registry
    response = Response(status_code=204, headers={"Accept-Post": SDP})
    if registry.recording is not None:
        response.headers[RECORDING_HEADER] = "available"
    if is_preflight(request.scope):  # a browser sends it without the token: no TURN credentials for it
        return response
    return with_links(response, ice_server_links(registry.ice_servers_for("options")))


def _session(request: Request) -> Session | Response:
    registry: SessionRegistry = request.app.state.registry
    session = registry.get(request.path_params["session_id"])
    return session if session is not None else error_response(404, "not_found", "no such session")


def _resource(request: Request) -> Session | Viewer | Response:
    """The session, or with ``viewer_id`` in the path its WHEP viewer; else a 404."""
    session = _session(request)
    if isinstance(session, Response) or "viewer_id" not in request.path_params:
        return session
    viewer = session.viewers.get(request.path_params["viewer_id"])
    return viewer if viewer is not None else error_response(404, "not_found", "no such viewer")


async def patch_resource(request: Request) -> Response:
    """WHIP/WHEP PATCH: trickle ICE or ICE restart."""
    resource = _resource(request)
    return resource if isinstance(resource, Response) else await patch_ice(request, resource.pc)


async def delete_resource(request: Request) -> Response:
    resource = _resource(request)
    if isinstance(resource, Response):
        return resource
    await resource.close("deleted by client")
    return Response(status_code=204)


async def get_session(request: Request) -> Response:
    session = _session(request)
    return session if isinstance(session, Response) else JSONResponse(session.describe())


async def create_viewer(request: Request) -> Response:
    session = _session(request)
    if isinstance(session, Response):
        return session
    offer = await read_offer(request, session.config.max_offer_bytes)
    if isinstance(offer, Response):
        return offer
    if session.close_reason is not None:  # ended while the offer was read: close() would miss this viewer
        return error_response(404, "not_found", "the session has ended")
    if len(session.viewers) >= session.config.max_viewers_per_session:
        return error_response(409, "too_many_viewers",
                              f"a session has at most {session.config.max_viewers_per_session} WHEP viewers")
    try:
        viewer, answer = await session.add_viewer(secrets.token_urlsafe(9), offer)
    except (ValueError, InvalidAccessError, InvalidStateError) as exc:
        return error_response(400, "bad_offer", f"the offer could not be applied: {exc}")
    except Exception:
        log.exception("viewer of session %s failed to start", session.id)
        return error_response(500, "internal_error", "the viewer could not be started")
    if session.close_reason is not None:  # ended while the viewer connected
        await viewer.close("session ended")
        return error_response(404, "not_found", "the session has ended")
    response = Response(answer, status_code=201, media_type=SDP,
                        headers={"Location": _location(session.config, f"/v1/sessions/{session.id}/whep/{viewer.id}"),
                                 "ETag": etag(viewer.pc), "Accept-Patch": SDPFRAG})
    return with_links(response, ice_server_links(session.ice_servers))
