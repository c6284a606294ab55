"""WHEP viewers: other peer connections that play a session's voice.

A platform bridging a call publishes a participant's audio over WHIP (a session)
and plays the model's answers into the call over WHEP: ``POST
/v1/sessions/{id}/whep`` with a receive-only offer. Each viewer gets a copy of
exactly what the session sends (``media_out.VoiceListener``), ends with its session,
and is bounded in number per session.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from aiortc import RTCPeerConnection, RTCSessionDescription

from server.ice import IceServer, add_host_candidates, passive_dtls, rtc_configuration
from server.media_out import OutputAudioTrack, VoiceListener

log = logging.getLogger(__name__)


class Viewer:
    def __init__(self, viewer_id: str, source: OutputAudioTrack, ice_servers: Sequence[IceServer],
                 host_addresses: Sequence[str], on_closed: Callable[[Viewer], None]) -> None:
        self.id = viewer_id
        self.pc = RTCPeerConnection(rtc_configuration(ice_servers))
        self.track = VoiceListener(source)
        self.close_reason: str | None = None
        self._host_addresses = host_addresses
        self._on_closed = on_closed
        self._watch: asyncio.Task[None] | None = None

    async def accept(self, offer_sdp: str, connect_timeout_s: float) -> str:
        """Apply a receive-only offer; return the answer. ValueError if it cannot
        receive audio."""
        await self.pc.setRemoteDescription(RTCSessionDescription(offer_sdp, "offer"))
        audio = [t for t in self.pc.getTransceivers() if t.kind == "audio"]
        # aiortc stores the offer's direction reversed, i.e. as ours: we must be able to send.
        if not audio or not any("send" in (t._offerDirection or "") for t in audio):
            raise ValueError("a WHEP offer must receive audio (a=recvonly or a=sendrecv on m=audio)")
        self.pc.addTrack(self.track)
        # A viewer listens. What its offer might send (a=sendrecv, a camera) nobody here
        # reads, and aiortc would decode it into queues without bound: answer that we
        # only send audio, so none of it is received at all.
        for transceiver in self.pc.getTransceivers():
            transceiver.direction = "sendonly" if transceiver.sender.track is self.track else "inactive"
        answer = await self.pc.createAnswer()
        await add_host_candidates(self.pc, self._host_addresses)
        await self.pc.setLocalDescription(passive_dtls(answer) if "a=setup:actpass" in offer_sdp else answer)
        sending = next(t for t in self.pc.getTransceivers() if t.sender.track is self.track)
        codecs = sending._codecs  # aiortc keeps the negotiated list here, first = used
        self.track.takes_opus = bool(codecs) and codecs[0].mimeType.lower() == "audio/opus"
        self.pc.on("connectionstatechange", self._on_connection_state)
        self._watch = asyncio.ensure_future(self._close_unless_connected(connect_timeout_s))
        return self.pc.localDescription.sdp

    def describe(self) -> dict[str, object]:
        return {"id": self.id, "connection_state": self.pc.connectionState,
                "dropped_frames": self.track.dropped_frames, "takes_opus": self.track.takes_opus}

    async def _close_unless_connected(self, timeout_s: float) -> None:
        await asyncio.sleep(timeout_s)
        if self.pc.connectionState != "connected":
            await self.close(f"not connected within {timeout_s:g} s")

    async def _on_connection_state(self) -> None:
        if self.pc.connectionState in ("failed", "closed"):
            await self.close(f"peer connection {self.pc.connectionState}")

    async def close(self, reason: str) -> None:
        if self.close_reason is not None:
            return
        self.close_reason = reason
        try:
            if self._watch is not None and self._watch is not asyncio.current_task():
                self._watch.cancel()
            self.track.stop()
            await self.pc.close()
        finally:
            self._on_closed(self)
