"""WHIP and WHEP resource details shared by sessions and viewers (RFC 9725, RFC 8840).

- ``ETag``: names a resource's ICE generation (quoted local ufrag), so it changes
  exactly when ICE restarts.
- ``PATCH`` with ``application/trickle-ice-sdpfrag``: trickled candidates -> 204;
  ``If-Match: "*"`` with new ``ice-ufrag``/``ice-pwd`` restarts ICE -> 200 with our
  new credentials and candidates, and a new ETag.
- ``Link: rel="ice-server"`` headers tell clients which STUN/TURN servers to use.
- Offers are checked here before anything is allocated (``offer_text_problem``,
  then ``offer_problem`` on aiortc's parse): what aiortc would otherwise trip
  over once the session exists becomes a 400 naming the line or section.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from aiortc import RTCPeerConnection
from aiortc.codecs import CODECS
from aiortc.rtcdtlstransport import X509_DIGEST_ALGORITHMS
from aiortc.rtcpeerconnection import find_common_codecs
from aiortc.sdp import MediaDescription, SessionDescription
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from server import ice

SDP = "application/sdp"
SDPFRAG = "application/trickle-ice-sdpfrag"
MAX_FRAGMENT_BYTES = 16 * 1024
# Headers a cross-origin page must be allowed to read (CORS expose list).
EXPOSED_HEADERS = ["Location", "ETag", "Link", "Accept-Post", "Accept-Patch", "Retry-After", "Microturn-Recording"]
RECORDING_HEADER = "Microturn-Recording"  # OPTIONS: "available"; 201: "on" (docs/recording.md)

# Offer limits, checked before aiortc parses: its parser is quadratic in places
# (every "a=rtcp-fb:*" line touches every codec), so one 64 KiB offer of rtpmap and
# rtcp-fb lines blocked the event loop, and every session's audio, for 7 s. A
# browser's audio+video+data offer has ~250 lines, ~40 rtpmap and ~70 rtcp-fb.
MAX_OFFER_LINES = 1000
MAX_OFFER_ATTRIBUTES = {"m=": 8, "a=rtpmap:": 128, "a=fmtp:": 128, "a=rtcp-fb:": 256, "a=ssrc:": 128,
                        "a=extmap:": 64, "a=candidate:": 256}
# The smallest a=max-message-size we accept (RFC 8841's default when absent): aiortc
# raises on sending a larger message, and an echoed user.text alone can reach 24 KB.
MIN_PEER_MESSAGE_BYTES = 64 * 1024
_SDP_LINE = re.compile(r"[a-z]=")
# Lines aiortc's parser reads, in the forms it can read: a 400 naming the line rather
# than whatever the parser raised ("AssertionError", "KeyError: 'x'", "not enough
# values to unpack").
_LINE_FORMS = {prefix: re.compile(form) for prefix, form in {
    "v=": r"v=0",
    "m=": r"m=[^ ]+ [0-9]+ [A-Z/]+ .+",
    "c=": r"c=IN IP[46] [^ ]+",
    "a=setup:": r"a=setup:(actpass|active|passive)",
    "a=candidate:": r"a=candidate:\S+ [0-9]+ \S+ [0-9]+ \S+ [0-9]+ typ \S+( .*)?",
    "a=fingerprint:": r"a=fingerprint:\s*\S+\s+\S+\s*",
    "a=rtpmap:": r"a=rtpmap:[0-9]+ [^/]+/[0-9]+(/[0-9]+)?",
    "a=fmtp:": r"a=fmtp:[0-9]+ .+",
    "a=rtcp-fb:": r"a=rtcp-fb:\S+ \S.*",
    "a=extmap:": r"a=extmap:[0-9]+(/\S+)? \S+",
    "a=ssrc:": r"a=ssrc:[0-9]+ [^:]+:.*",
    "a=rtcp:": r"a=rtcp:[0-9]+( IN IP[46] [^ ]+)?",
    "a=sctp-port:": r"a=sctp-port:[0-9]+",
    "a=sctpmap:": r"a=sctpmap:[0-9]+ .+",
    "a=max-message-size:": r"a=max-message-size:[0-9]+",
    "a=group:": r"a=group:.*",
    "a=msid-semantic:": r"a=msid-semantic:.*",
    "a=ssrc-group:": r"a=ssrc-group:\s*(\S+(\s+[0-9]+)*\s*)?",
}.items()}
_MID = re.compile(r"[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]{1,32}")  # an RFC 5888 token, short
_ICE_UFRAG = re.compile(r"[A-Za-z0-9+/]{4,256}")  # RFC 8839 ice-char
_ICE_PWD = re.compile(r"[A-Za-z0-9+/]{22,256}")


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": code, "message": message}, status_code=status, headers=headers)


async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """Starlette's own refusals (no such route, a method it does not allow) as JSON, like ours."""
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return error_response(exc.status_code, code, exc.detail, dict(exc.headers or {}))


JSON_HTTP_ERRORS = {HTTPException: http_error}  # a Starlette app's exception_handlers


def offer_text_problem(text: str) -> str | None:
    """Why the offer's lines cannot be an offer we parse, or None."""
    lines = text.splitlines()  # the split aiortc's parser makes
    if len(lines) > MAX_OFFER_LINES:
        return f"an offer has at most {MAX_OFFER_LINES} lines"
    for number, line in enumerate(lines, 1):
        if line.strip() and not _SDP_LINE.match(line):
            return f"line {number} is not an SDP line: {line[:60]!r}"
        key = (line[: line.find(":") + 1] or line + ":") if line.startswith("a=") else line[:2]
        form = _LINE_FORMS.get(key)
        if form is not None and not form.fullmatch(line):
            return f"line {number} is malformed: {line[:60]!r}"
        if key == "m=" and not _payload_types_ok(line):
            return f"line {number}: RTP payload types are 0-127, except 72-76"
    for prefix, limit in MAX_OFFER_ATTRIBUTES.items():
        if sum(line.startswith(prefix) for line in lines) > limit:
            return f"an offer has at most {limit} {prefix.rstrip(':')} lines"
    return None


def _payload_types_ok(m_line: str) -> bool:
    """RTP payload types are 7 bits, and 72-76 would read as RTCP (RFC 5761)."""
    kind, _, _, *formats = m_line[2:].split(" ")
    if kind not in ("audio", "video"):
        return True
    return all(f.isdecimal() and len(f) <= 3 and 0 <= int(f) < 128 and not 72 <= int(f) <= 76 for f in formats)


def offer_problem(offer: SessionDescription) -> str | None:
    """Why a parsed offer cannot become a session, or None. Each check is one that
    aiortc fails later: in the request (AttributeError, OperationError: a 500) or,
    worse, in a transport task after the 201."""
    media = offer.media
    if not any(section.kind == "audio" for section in media):
        return "the offer has no audio section (m=audio)"
    mids = [section.rtp.muxId for section in media]
    named = [mid for mid in mids if mid is not None]  # a missing one is the section's problem
    if len(set(named)) != len(named):
        return "two media sections share an a=mid"
    for group in offer.group:
        if group.semantic == "BUNDLE" and any(item not in mids for item in group.items):
            return "a=group:BUNDLE names a mid that no media section has"
    if sum(section.kind == "application" for section in media) > 1:
        return "an offer has at most one m=application section"
    for index, section in enumerate(media):
        problem = _section_problem(section)
        if problem is not None:
            return f"m={section.kind} section {index}: {problem}"
    return None


def _section_problem(section: MediaDescription) -> str | None:
    if section.kind not in ("audio", "video", "application"):
        return "only audio, video and application sections are supported"
    if section.rtp.muxId is None or not _MID.fullmatch(section.rtp.muxId):
        return "a=mid is missing or not a short token"
    ice = section.ice
    if not _ICE_UFRAG.fullmatch(ice.usernameFragment or "") or not _ICE_PWD.fullmatch(ice.password or ""):
        return "a=ice-ufrag (4-256 ice-chars) and a=ice-pwd (22-256) are required"
    if section.dtls is None:
        return "a=setup is required"
    if section.msid is not None and " " in section.msid and len(section.msid.split()) < 2:
        return "a=msid needs a stream id and a track id"  # aiortc indexes both (IndexError: a 500)
    if not any(f.algorithm.lower() in X509_DIGEST_ALGORITHMS for f in section.dtls.fingerprints):
        return "an a=fingerprint with sha-256, sha-384 or sha-512 is required"
    if section.kind == "application":
        port: int | str | None = section.sctp_port
        if section.profile == "DTLS/SCTP":  # the legacy form: the port is the m= line's format
            port = section.fmt[0] if section.fmt else None
        if isinstance(port, str):
            port = int(port) if port.isdecimal() and len(port) <= 5 else None
        if port is None or not 0 < port < 65536:
            return "an SCTP port (a=sctp-port) of 1-65535 is required"
        caps = section.sctpCapabilities
        if caps is not None and caps.maxMessageSize != 0 and caps.maxMessageSize < MIN_PEER_MESSAGE_BYTES:
            return f"a=max-message-size must be 0 (no limit) or at least {MIN_PEER_MESSAGE_BYTES}"
        return None
    if not section.rtcp_mux:
        return "a=rtcp-mux is required"
    if section.direction is None:
        return "a direction (a=sendrecv, a=sendonly, a=recvonly or a=inactive) is required"
    if not find_common_codecs(CODECS[section.kind], section.rtp.codecs):
        supported = ", ".join(sorted({c.mimeType.split("/")[1] for c in CODECS[section.kind]}))
        return f"no codec in common (this server takes {supported})"
    return None


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

    if if_match is not None and if_match.strip() in ("*", '"*"'):  # ICE restart (RFC 9725 writes it quoted)
        if not fragment.ufrag or not fragment.pwd:
            return error_response(400, "bad_fragment", "an ICE restart needs a=ice-ufrag and a=ice-pwd")
        try:
            # A refused restart must leave the old ICE session be: check all before restarting.
            ice.check_candidate_count(0, len(ice.parse_candidates(fragment.candidates)))
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
