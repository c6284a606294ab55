"""WHIP-shaped signalling: create a session from an SDP offer, delete it.

POST /v1/sessions (application/sdp offer) -> 201, SDP answer, Location header.
DELETE /v1/sessions/{id} -> 204. GET /v1/sessions/{id} -> JSON diagnostics.
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
from server.sessions import SessionRegistry

log = logging.getLogger(__name__)


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": code, "message": message}, status_code=status, headers=headers)


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
    try:
        description = aiortc_sdp.SessionDescription.parse(text)
    except Exception as exc:  # the parser raises whatever the bad line provokes
        raise OfferError(f"unparsable SDP: {exc!r}") from None
    if not any(media.kind == "audio" for media in description.media):
        raise OfferError("the offer has no audio section (m=audio)")
    return text


async def create_session(request: Request) -> Response:
    registry: SessionRegistry = request.app.state.registry
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/sdp":
        return error_response(415, "unsupported_media_type", "send the offer as application/sdp")
    limit = registry.config.max_offer_bytes
    too_large = error_response(413, "offer_too_large", f"offers are limited to {limit} bytes")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return too_large
    body = bytearray()
    async for piece in request.stream():  # count as it arrives: never buffer more than the limit
        body += piece
        if len(body) > limit:
            return too_large
    try:
        offer = validate_offer(bytes(body))
    except OfferError as exc:
        return error_response(400, "bad_offer", str(exc))
    if registry.full:
        registry.metrics.rejected_sessions.add(1, {tm.ATTR_REASON: "at_capacity"})
        return error_response(503, "at_capacity", f"all {registry.capacity} session slots are taken, retry later",
                              {"Retry-After": "5"})

    session = registry.new_session(secrets.token_urlsafe(12), parent=extract(request.headers))
    try:
        answer = await session.accept(offer)
    except (ValueError, InvalidAccessError, InvalidStateError) as exc:
        await session.close("offer rejected")
        return error_response(400, "bad_offer", f"the offer could not be applied: {exc}")
    except Exception:
        log.exception("session %s failed to start", session.id)
        await session.close("internal error during set-up")
        return error_response(500, "internal_error", "the session could not be started")
    return Response(
        answer,
        status_code=201,
        media_type="application/sdp",
        headers={"Location": f"/v1/sessions/{session.id}"},
    )


async def delete_session(request: Request) -> Response:
    registry: SessionRegistry = request.app.state.registry
    session = registry.get(request.path_params["session_id"])
    if session is None:
        return error_response(404, "not_found", "no such session")
    await session.close("deleted by client")
    return Response(status_code=204)


async def get_session(request: Request) -> Response:
    registry: SessionRegistry = request.app.state.registry
    session = registry.get(request.path_params["session_id"])
    if session is None:
        return error_response(404, "not_found", "no such session")
    return JSONResponse(session.describe())
