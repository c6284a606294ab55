"""ICE set-up for the server's peer connections (and the test clients').

Two choices that stock aiortc makes for us and we undo explicitly:
- with no ICE servers configured it falls back to a public STUN server; we pass
  an explicit (by default empty) list, so nothing leaves the machine unless asked;
- aioice never offers 127.0.0.1 as a host candidate, so on a loopback-only
  network (tests, a laptop offline) the SDP carries no candidate and the call
  hangs. ``extra_host_addresses`` (``--ice-host``) adds host candidates on the
  given local addresses before the description is set. It acts on one peer
  connection, on request, and patches nothing globally.
"""

from __future__ import annotations

from collections.abc import Sequence

from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection
from aiortc.rtcicetransport import RTCIceGatherer


def rtc_configuration(ice_servers: Sequence[str] = ()) -> RTCConfiguration:
    """``ice_servers``: URLs such as ``stun:stun.example.org:3478``; none by default."""
    return RTCConfiguration(iceServers=[RTCIceServer(urls=url) for url in ice_servers])


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
        connection = gatherer._connection  # aioice.Connection: no public hook for this
        known = {c.host for c in connection.local_candidates}
        wanted = [a for a in addresses if a not in known]
        if wanted:
            extra = await connection.get_component_candidates(component=1, addresses=wanted)
            connection._local_candidates.extend(extra)
