"""WHIP and WHEP resource details shared by sessions and viewers (RFC 9725, RFC 8840).

- ``ETag``: names a resource's ICE generation (quoted local ufrag), so it changes
  exactly when ICE restarts.
- ``PATCH`` with ``application/trickle-ice-sdpfrag``: trickled candidates -> 204;
  ``If-Match: "*"`` with new ``ice-ufrag``/``ice-pwd`` restarts ICE -> 200 with our
  new credentials and candidates, and a new ETag.
- ``Link: rel="ice-server"`` headers tell clients which STUN/TURN servers to use.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from aiortc import RTCPeerConnection
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from server import ice

SDP = "application/sdp"
SDPFRAG = "application/trickle-ice-sdpfrag"
MAX_FRAGMENT_BYTES = 16 * 1024
# Headers a cross-origin page must be allowed to read (CORS expose list).
EXPOSED_HEADERS = ["Location", "ETag", "Link", "Accept-Post", "Accept-Patch", "Retry-After"]


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": code, "message": message}, status_code=status, headers=headers)


class FragmentError(ValueError):
    pass


@dataclass(slots=True)
class IceFragment:
    """What a trickle/restart PATCH carries."""

    ufrag: str | None = None
    pwd: str | None = None
    mid: str | None = None
    candidates: list[str] = field(default_factory=list)  # "candidate:..." values
    end_of_candidates: bool = False


def parse_sdpfrag(body: bytes) -> IceFragment:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise FragmentError("the fragment is not UTF-8 text") from None
    fragment = IceFragment()
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        if line[1:2] != "=":
            raise FragmentError(f"not an SDP line: {line[:60]!r}")
        if line.startswith("a=ice-ufrag:"):
            fragment.ufrag = line.removeprefix("a=ice-ufrag:")
        elif line.startswith("a=ice-pwd:"):
            fragment.pwd = line.removeprefix("a=ice-pwd:")
        elif line.startswith("a=mid:"):
            fragment.mid = line.removeprefix("a=mid:")
        elif line.startswith("a=candidate:"):
            fragment.candidates.append(line.removeprefix("a="))
        elif line == "a=end-of-candidates":
            fragment.end_of_candidates = True
        # m=, a=ice-options, a=group: carry nothing we act on.
    return fragment


def format_sdpfrag(credentials: ice.IceCredentials, candidates: Sequence[str], mid: str | None) -> str:
    lines = [f"a=ice-ufrag:{credentials.ufrag}", f"a=ice-pwd:{credentials.pwd}"]
    if mid is not None:
        lines += ["m=audio 9 UDP/TLS/RTP/SAVPF 0", f"a=mid:{mid}"]
    lines += [f"a={c}" for c in candidates] + ["a=end-of-candidates"]
    return "\r\n".join(lines) + "\r\n"


def etag(pc: RTCPeerConnection) -> str:
    credentials, _ = ice.local_ice(pc)
    return f'"{credentials.ufrag}"'


def first_mid(pc: RTCPeerConnection) -> str | None:
    for transceiver in pc.getTransceivers():
        if transceiver.mid is not None:
            return transceiver.mid
    return None


def ice_server_links(servers: Sequence[ice.IceServer]) -> list[str]:
    """``Link`` header values (RFC 9725 §4.6)."""
    links = []
    for server in servers:
        link = f'<{server.url}>; rel="ice-server"'
        if server.username is not None and server.credential is not None:
            username = server.username.replace('"', "")
            credential = server.credential.replace('"', "")
            link += f'; username="{username}"; credential="{credential}"; credential-type="password"'
        links.append(link)
    return links


def with_links(response: Response, links: Sequence[str]) -> Response:
    for link in links:
        response.headers.append("Link", link)
    return response


async def read_limited(request: Request, limit: int) -> bytes | None:
    """The body, or None once it exceeds ``limit`` (counted as it arrives)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return None
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            return None
    return bytes(body)


async def patch_ice(request: Request, pc: RTCPeerConnection) -> Response:
    """Trickle ICE or ICE restart on a live resource (RFC 9725 §4.3)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != SDPFRAG:
        return error_response(415, "unsupported_media_type", f"send ICE as {SDPFRAG}",
                              {"Accept-Patch": SDPFRAG})
    body = await read_limited(request, MAX_FRAGMENT_BYTES)
    if body is None:
        return error_response(413, "fragment_too_large", f"fragments are limited to {MAX_FRAGMENT_BYTES} bytes")
    try:
        fragment = parse_sdpfrag(body)
    except FragmentError as exc:
        return error_response(400, "bad_fragment", str(exc))
    if_match = request.headers.get("if-match")
    if pc.connectionState == "closed":
        return error_response(404, "not_found", "the resource has ended")

    if if_match == "*":  # ICE restart
        if not fragment.ufrag or not fragment.pwd:
            return error_response(400, "bad_fragment", "an ICE restart needs a=ice-ufrag and a=ice-pwd")
        try:
            ours = ice.restart_ice(pc, ice.IceCredentials(fragment.ufrag, fragment.pwd))
            await ice.add_remote_candidates(pc, fragment.candidates, fragment.end_of_candidates)
        except ValueError as exc:
            return error_response(400, "bad_fragment", f"unusable ICE parameters: {exc}")
        _, candidates = ice.local_ice(pc)
        return Response(format_sdpfrag(ours, candidates, fragment.mid or first_mid(pc)), status_code=200,
                        media_type=SDPFRAG, headers={"ETag": etag(pc)})

    if if_match is not None and if_match != etag(pc):
        return error_response(412, "precondition_failed", "the ETag does not name this ICE session (it restarted?)")
    current = ice.remote_ufrag(pc)
    if fragment.ufrag is not None and current is not None and fragment.ufrag != current:
        return error_response(422, "ice_session_mismatch",
                              "the fragment's ice-ufrag is not this ICE session's; restart with If-Match: \"*\"")
    try:
        await ice.add_remote_candidates(pc, fragment.candidates, fragment.end_of_candidates)
    except ValueError as exc:
        return error_response(400, "bad_fragment", f"unusable candidate: {exc}")
    return Response(status_code=204)
