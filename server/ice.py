"""ICE for the server's peer connections (and the test clients'): servers, extra
host candidates, trickled candidates and ICE restarts.

Choices that stock aiortc makes for us and we undo explicitly:
- with no ICE servers configured it falls back to a public STUN server; we pass
  an explicit (by default empty) list, so nothing leaves the machine unless asked;
- aioice never offers 127.0.0.1 as a host candidate, so on a loopback-only
  network (tests, a laptop offline) the SDP carries no candidate and the call
  hangs. ``extra_host_addresses`` (``--ice-host``) adds host candidates on the
  given local addresses before the description is set;
- aiortc has no ICE restart. WHIP restarts ICE with a PATCH (RFC 9725 §4.3.2),
  without a new offer, so ``restart_ice`` does it on the live aioice agent: new
  local credentials, the peer's new ones, a new check list. The pair in use keeps
  carrying media until the peer nominates a pair of the new generation, so DTLS
  and SRTP carry on untouched. This reaches into aioice's agent (no public hook);
  every such access is in this module and covered by tests/test_whip.py.
Each function acts on the one peer connection it is given and patches nothing
globally.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import string
import time
from collections.abc import Sequence
from dataclasses import dataclass

from aioice import Connection
from aioice.ice import CandidatePair
from aiortc import RTCConfiguration, RTCIceCandidate, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.rtcicetransport import RTCIceGatherer, candidate_to_aioice
from aiortc.sdp import candidate_from_sdp

_ICE_CHARS = string.ascii_letters + string.digits + "+/"


@dataclass(frozen=True, slots=True)
class IceServer:
    url: str  # stun:host:port, turn:host:port?transport=udp, turns:...
    username: str | None = None
    credential: str | None = None


def turn_rest_credentials(secret: str, user: str, ttl_s: float = 3600, now: float | None = None) -> tuple[str, str]:
    """Short-lived TURN credentials for a TURN server sharing ``secret`` (coturn's
    ``use-auth-secret``): username ``expiry:user``, password base64(HMAC-SHA1)."""
    username = f"{int((now or time.time()) + ttl_s)}:{user}"
    password = base64.b64encode(hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()).decode()
    return username, password


def ice_servers_for(urls: Sequence[str], user: str, turn_secret: str | None = None,
                    turn_username: str | None = None, turn_credential: str | None = None) -> list[IceServer]:
    """The configured STUN/TURN URLs with credentials on the TURN ones: per-``user``
    short-lived ones when a shared secret is set, else the static pair."""
    servers = []
    for url in urls:
        if url.startswith(("turn:", "turns:")):
            if turn_secret:
                username, credential = turn_rest_credentials(turn_secret, user)
            else:
                username, credential = turn_username, turn_credential
            servers.append(IceServer(url, username, credential))
        else:
            servers.append(IceServer(url))
    return servers


def rtc_configuration(ice_servers: Sequence[IceServer] = ()) -> RTCConfiguration:
    """An explicit (by default empty) server list: never aiortc's public STUN default."""
    return RTCConfiguration(iceServers=[
        RTCIceServer(urls=s.url, username=s.username, credential=s.credential) for s in ice_servers
    ])


def _gatherers(pc: RTCPeerConnection) -> list[RTCIceGatherer]:
    found: list[RTCIceGatherer] = []
    transports = [t.receiver.transport for t in pc.getTransceivers()]
    if pc.sctp is not None:
        transports.append(pc.sctp.transport)
    for dtls in transports:
        gatherer = dtls.transport.iceGatherer
        if gatherer not in found:  # a BUNDLE shares one transport
            found.append(gatherer)
    return found


def _agents(pc: RTCPeerConnection) -> list[Connection]:
    return [gatherer._connection for gatherer in _gatherers(pc)]


async def add_host_candidates(pc: RTCPeerConnection, addresses: Sequence[str]) -> None:
    """Gather as usual, then add host candidates on ``addresses``.

    Call after ``createOffer``/``createAnswer`` and before ``setLocalDescription``:
    gathering is then already complete, so ``setLocalDescription`` writes these
    candidates into the SDP and ICE checks them like any other.
    """
    if not addresses:
        return
    for gatherer in _gatherers(pc):
        await gatherer.gather()
        connection = gatherer._connection
        known = {c.host for c in connection.local_candidates}
        wanted = [a for a in addresses if a not in known]
        if wanted:
            extra = await connection.get_component_candidates(component=1, addresses=wanted)
            connection._local_candidates.extend(extra)


# Each remote candidate makes pairs the agent checks with STUN requests to its address:
# without a bound, PATCHes of 16 KiB each would have the server send bursts anywhere.
# An offer may hold as many (server/whip.py); real clients send a handful.
MAX_REMOTE_CANDIDATES = 256


@dataclass(frozen=True, slots=True)
class IceCredentials:
    ufrag: str
    pwd: str


def local_ice(pc: RTCPeerConnection) -> tuple[IceCredentials, list[str]]:
    """Our current credentials and candidates (``candidate:...`` values) on the first
    transport: with BUNDLE the only one, and the one WHIP's PATCH talks about."""
    agent = _agents(pc)[0]
    candidates = [f"candidate:{c.to_sdp()}" for c in agent.local_candidates]
    return IceCredentials(agent.local_username, agent.local_password), candidates


def remote_ufrag(pc: RTCPeerConnection) -> str | None:
    agents = _agents(pc)
    return agents[0].remote_username if agents else None


async def add_remote_candidates(pc: RTCPeerConnection, candidates: Sequence[str], end: bool) -> int:
    """Trickled ``candidate:...`` values (and end-of-candidates): to every transport,
    since the fragment names only the first m-line of the BUNDLE group. Returns
    how many were new. Raises ValueError for a malformed candidate, or for more than
    MAX_REMOTE_CANDIDATES in one ICE session (all or nothing)."""
    parsed = parse_candidates(candidates)
    check_candidate_count(max((len(g._connection.remote_candidates) for g in _gatherers(pc)), default=0),
                          len(parsed))
    added = 0
    for gatherer in _gatherers(pc):
        agent = gatherer._connection
        if agent._remote_candidates_end:
            continue  # end-of-candidates was said: later ones are ignored (RFC 8838 §14)
        before = len(agent.remote_candidates)
        for candidate in parsed:
            await agent.add_remote_candidate(candidate_to_aioice(candidate))
        added += len(agent.remote_candidates) - before
        _start_checks(agent)
        if end:
            gatherer._remote_candidates_end = True
            await agent.add_remote_candidate(None)
    return added


def check_candidate_count(held: int, more: int) -> None:
    """ValueError if an ICE session holding ``held`` remote candidates may not take ``more``."""
    if held + more > MAX_REMOTE_CANDIDATES:
        raise ValueError(f"{held} remote candidates and {more} more: at most {MAX_REMOTE_CANDIDATES} "
                         "in one ICE session")


def parse_candidates(values: Sequence[str]) -> list[RTCIceCandidate]:
    """``candidate:...`` values, all or nothing: ValueError names the first malformed one."""
    return [_parse_candidate(value) for value in values]


def _parse_candidate(value: str) -> RTCIceCandidate:
    try:  # aiortc's parser asserts on short lines and raises whatever a bad field provokes
        return candidate_from_sdp(value.removeprefix("candidate:"))
    except (AssertionError, ValueError, IndexError) as exc:
        raise ValueError(f"malformed candidate {value[:80]!r}") from exc


def restart_ice(pc: RTCPeerConnection, remote: IceCredentials | None) -> IceCredentials:
    """Start a new ICE generation; returns our new credentials. A server passes the
    peer's new credentials from the PATCH; a client, which learns them only from
    the answer, passes None and then calls ``set_remote_ice``. The peer's
    candidates of the new generation follow through ``add_remote_candidates``.
    """
    ours = IceCredentials(_random_ice_string(8), _random_ice_string(24))
    for gatherer in _gatherers(pc):
        agent = gatherer._connection
        for pair in agent._check_list:
            if pair.task is not None:
                pair.task.cancel()
        agent._check_list = []
        agent._remote_candidates = []
        agent._remote_candidates_end = False
        gatherer._remote_candidates_end = False
        agent._local_username, agent._local_password = ours.ufrag, ours.pwd
        if remote is not None:
            agent.remote_username, agent.remote_password = remote.ufrag, remote.pwd
        # ``_nominated`` stays: media keeps flowing on the old pair until a new one is nominated.
    return ours


def set_remote_ice(pc: RTCPeerConnection, remote: IceCredentials) -> None:
    """The peer's credentials of the new generation (the client side of a restart)."""
    for agent in _agents(pc):
        agent.remote_username, agent.remote_password = remote.ufrag, remote.pwd
        _start_checks(agent)


def nominated_in_current_generation(pc: RTCPeerConnection) -> bool:
    """Whether every transport carries media on a pair checked since the last restart
    (diagnostics and tests: proof that a restart completed, not just started)."""
    agents = _agents(pc)
    return bool(agents) and all(
        agent._nominated and all(pair in agent._check_list for pair in agent._nominated.values())
        for agent in agents
    )


def _start_checks(agent: Connection) -> None:
    """Check new pairs now. Before ``connect`` (no remote password yet) its own pacing
    loop starts them; after it — trickle or restart on a live session — nothing
    would, and a controlling agent (a client) must check a pair to nominate it."""
    if agent.remote_password is None or not agent._early_checks_done:
        return
    for pair in agent._check_list:
        if pair.state == CandidatePair.State.FROZEN and pair.task is None:
            agent.check_state(pair, CandidatePair.State.WAITING)
            agent.check_start_task(pair)


def passive_dtls(answer: RTCSessionDescription) -> RTCSessionDescription:
    """The answer with us as DTLS server (``a=setup:passive``) where aiortc chose
    client. As client aiortc offers only ECDHE-ECDSA ciphers, which a DTLS server
    with an RSA certificate (GStreamer's webrtcbin: OBS-style WHIP clients) cannot
    accept ("no shared cipher"); as server it picks from what the client offers.
    aiortc takes its DTLS role from the local description, so this is all it needs.
    Only valid when the offer said ``actpass``, as every WebRTC offer does."""
    return RTCSessionDescription(answer.sdp.replace("a=setup:active", "a=setup:passive"), answer.type)


def _random_ice_string(length: int) -> str:
    return "".join(secrets.choice(_ICE_CHARS) for _ in range(length))
