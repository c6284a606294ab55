"""A scripted WebRTC peer: plays a known waveform, records what it hears and the
events it receives, with arrival times. The tests use it against a live server;
the load test will run many of them.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import av
import httpx
import numpy as np
from aioice import Connection
from aioice.ice import StunProtocol
from aiortc import RTCDataChannel, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from model.audio import resample_mono
from model.interface import SAMPLE_RATE
from server.ice import add_host_candidates, rtc_configuration
from server.media_in import Decimator, to_mono
from server.rtp_tuning import ArrivalStampingJitterBuffer, audio_jitter_buffers, set_audio_jitter_prefetch

SEND_RATE = 48_000
FRAME_SAMPLES = SEND_RATE // 50  # 20 ms


class ScriptedAudioTrack(MediaStreamTrack):
    """Plays ``audio`` (16 kHz mono float32) in real time as 20 ms 48 kHz frames,
    then silence. ``started_at`` is when its first sample went out."""

    kind = "audio"

    def __init__(self, audio: np.ndarray, lead_silence_s: float = 0.0) -> None:
        super().__init__()
        lead = np.zeros(int(lead_silence_s * SAMPLE_RATE), dtype=np.float32)
        self.script = np.concatenate([lead, audio.astype(np.float32)])
        self.lead_samples = lead.size
        self.samples = resample_mono(self.script, SAMPLE_RATE, SEND_RATE, "s16")
        self.started_at: float | None = None
        self.started_wall: float | None = None  # time.time() of the first sample, to align with server clocks
        self._pts = 0

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        now = time.monotonic()
        if self.started_at is None:
            self.started_at, self.started_wall = now, time.time()
        due = self.started_at + self._pts / SEND_RATE
        if due > now:
            await asyncio.sleep(due - now)
        chunk = self.samples[self._pts : self._pts + FRAME_SAMPLES]
        if chunk.size < FRAME_SAMPLES:
            chunk = np.concatenate([chunk, np.zeros(FRAME_SAMPLES - chunk.size, dtype=np.int16)])
        frame = av.AudioFrame.from_ndarray(chunk.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = SEND_RATE
        frame.pts = self._pts
        frame.time_base = Fraction(1, SEND_RATE)
        self._pts += FRAME_SAMPLES
        return frame


@dataclass
class Recording:
    """What the peer heard, placed on the sender's media clock (RTP timestamps)."""

    first_arrival: float | None = None  # monotonic time of the first received frame
    first_pts: int | None = None
    chunks: list[tuple[int, np.ndarray]] = field(default_factory=list)  # (pts at 48 kHz, 16 kHz samples)
    arrivals: dict[int, float] = field(default_factory=dict)  # pts -> wall-clock arrival (time.time())

    def audio(self) -> np.ndarray:
        """The received audio at 16 kHz, gaps (lost packets) filled with silence."""
        if not self.chunks:
            return np.zeros(0, dtype=np.float32)
        end = max(pts * SAMPLE_RATE // SEND_RATE + c.size for pts, c in self.chunks)
        out = np.zeros(end, dtype=np.float32)
        for pts, chunk in self.chunks:
            start = pts * SAMPLE_RATE // SEND_RATE
            out[start : start + chunk.size] = chunk
        return out


class SignallingError(RuntimeError):
    """The server refused the offer (``status``: 503 when it is at capacity)."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"signalling failed: {status} {body}")
        self.status = status


class Peer:
    def __init__(self, base_url: str, audio: np.ndarray, ice_host_addresses: list[str] | None = None,
                 lead_silence_s: float = 0.0, jitter_prefetch: int | None = None,
                 direction: str = "sendrecv", data_channel: bool = True) -> None:
        # direction "sendonly" and no data channel: a plain WHIP publisher (OBS-like).
        self.direction = direction
        self.data_channel = data_channel
        self.response_headers: httpx.Headers | None = None
        self.auth_headers: dict[str, str] = {}
        self.jitter_prefetch = jitter_prefetch  # None: aiortc's default (4), like a stock client
        self.base_url = base_url.rstrip("/")
        self.ice_host_addresses = ice_host_addresses or ["127.0.0.1"]
        self.pc = RTCPeerConnection(rtc_configuration())
        self.track = ScriptedAudioTrack(audio, lead_silence_s)
        self.recording = Recording()
        self.events: list[tuple[float, dict[str, Any]]] = []
        self.channel: RTCDataChannel | None = None
        self.session_url: str | None = None
        self.connect_ms: float | None = None
        self.event_lag_ms: list[float] = []  # arrival − server send time, per event (same clock on one host)
        self._channel_open = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None
        # SDP edits on the way out and in (loadtest/impair.py routes the media through
        # an impairing relay with them).
        self.rewrite_offer: Callable[[str], str] = _unchanged
        self.rewrite_answer: Callable[[str], str] = _unchanged

    async def connect(self, traceparent: str | None = None, headers: dict[str, str] | None = None,
                      path: str = "/v1/sessions") -> None:
        """Offer, answer, and wait until the events channel opens (or, without one,
        until the connection is up). ``headers`` are sent with the offer (auth);
        redirects (a router's 307) are followed."""
        started = time.monotonic()
        self.pc.addTransceiver(self.track, direction=self.direction)
        if self.jitter_prefetch is not None:
            set_audio_jitter_prefetch(self.pc, self.jitter_prefetch, ArrivalStampingJitterBuffer)
        if self.data_channel:
            self.channel = self.pc.createDataChannel("events")
            self.channel.on("message", self._on_message)
            self.channel.on("open", self._channel_open.set)
        connected = asyncio.Event()
        self.pc.on("connectionstatechange",
                   lambda: connected.set() if self.pc.connectionState == "connected" else None)
        self.pc.on("track", self._on_track)
        offer = await self.pc.createOffer()
        await add_host_candidates(self.pc, self.ice_host_addresses)
        await self.pc.setLocalDescription(offer)
        async with httpx.AsyncClient(follow_redirects=True) as client:
            response = await client.post(
                f"{self.base_url}{path}",
                content=self.rewrite_offer(self.pc.localDescription.sdp),
                headers={"Content-Type": "application/sdp", **({"traceparent": traceparent} if traceparent else {}),
                         **(headers or {})},
            )
        if response.status_code != 201:
            raise SignallingError(response.status_code, response.text)
        self.response_headers = response.headers
        # Relative to where the offer landed (after any redirect), as WHIP says.
        self.session_url = str(response.url.join(response.headers["Location"]))
        self.auth_headers = {k: v for k, v in (headers or {}).items() if k.lower() == "authorization"}
        await self.pc.setRemoteDescription(RTCSessionDescription(self.rewrite_answer(response.text), "answer"))
        await asyncio.wait_for(self._channel_open.wait() if self.data_channel else connected.wait(), 10)
        self.connect_ms = (time.monotonic() - started) * 1000

    def send(self, message: dict[str, Any] | str | bytes) -> None:
        assert self.channel is not None
        self.channel.send(message if isinstance(message, (str, bytes)) else json.dumps(message))

    def packet_arrivals(self) -> dict[int, float]:
        """Wall-clock arrival of each received audio packet, by RTP timestamp relative to
        the first packet's (aiortc starts decoded frames' pts at 0 the same way, so these
        match ``Recording``); empty unless ``jitter_prefetch`` was set."""
        stamped = [b for b in audio_jitter_buffers(self.pc) if isinstance(b, ArrivalStampingJitterBuffer)]
        if not stamped or not stamped[0].arrivals:
            return {}
        arrivals = stamped[0].arrivals
        first = min(arrivals, key=arrivals.__getitem__)
        return {(timestamp - first) % (1 << 32): at for timestamp, at in arrivals.items()}

    def events_of(self, event_type: str) -> list[dict[str, Any]]:
        return [event for _, event in self.events if event.get("type") == event_type]

    async def wait_for_event(self, event_type: str, timeout: float = 10.0, **fields: Any) -> dict[str, Any]:
        """The first event of ``event_type`` whose fields include ``fields``."""
        deadline = time.monotonic() + timeout
        seen = 0
        while time.monotonic() < deadline:
            for _, event in self.events[seen:]:
                if event.get("type") == event_type and all(event.get(k) == v for k, v in fields.items()):
                    return event
            seen = len(self.events)
            await asyncio.sleep(0.02)
        raise TimeoutError(f"no {event_type!r} event with {fields} within {timeout} s")

    async def close(self, delete: bool = True) -> None:
        """DELETE the session (if asked), then close the connection whatever the DELETE
        did: a server that is down must not leave this peer's connection open."""
        try:
            if delete and self.session_url:
                async with httpx.AsyncClient() as client:
                    await client.delete(self.session_url, headers=self.auth_headers)
        finally:
            if self._reader:
                self._reader.cancel()
            await self.pc.close()

    async def vanish(self) -> None:
        """Drop off the network without a word, like a closed laptop lid: from now on
        nothing leaves this peer (no DELETE, no DTLS close_notify, SCTP ABORT or RTCP
        BYE, no ICE consent answers), then its own resources are released. Only the
        server's timeouts can tell it is gone."""
        for protocol in ice_protocols(self.pc):
            protocol.transport = _Unplugged(protocol.transport)  # type: ignore[assignment]
        await self.close(delete=False)

    def _on_message(self, raw: str | bytes) -> None:
        event = json.loads(raw) if isinstance(raw, str) else {"type": "<binary>"}
        self.events.append((time.monotonic(), event))
        if "ts_ms" in event:
            self.event_lag_ms.append(time.time() * 1000 - event["ts_ms"])

    def _on_track(self, track: MediaStreamTrack) -> None:
        if track.kind == "audio":
            self._reader = asyncio.ensure_future(self._record(track))

    async def _record(self, track: MediaStreamTrack) -> None:
        decimator: Decimator | None = None  # the server's own path: channel average, causal FIR
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            rec = self.recording
            if rec.first_arrival is None:
                rec.first_arrival, rec.first_pts = time.monotonic(), frame.pts
            pts = (frame.pts - rec.first_pts) % (1 << 32)
            rec.arrivals[pts] = time.time()
            decimator = decimator or Decimator(frame.sample_rate)
            rec.chunks.append((pts, decimator(to_mono(frame))))


def _unchanged(sdp: str) -> str:
    return sdp


class _Unplugged:
    """A datagram transport whose cable is pulled: sends vanish; closing still closes."""

    def __init__(self, transport: asyncio.DatagramTransport) -> None:
        self._transport = transport

    def sendto(self, data: bytes, addr: Any = None) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def ice_agents(pc: RTCPeerConnection) -> list[Connection]:
    """The aioice agents (``Connection``) under ``pc``'s ICE transports: one with BUNDLE."""
    transports = [t.receiver.transport for t in pc.getTransceivers()]
    if pc.sctp is not None:
        transports.append(pc.sctp.transport)
    agents = {id(d.transport.iceGatherer._connection): d.transport.iceGatherer._connection for d in transports}
    return list(agents.values())


def ice_protocols(pc: RTCPeerConnection) -> list[StunProtocol]:
    """The UDP endpoints (aioice ``StunProtocol``s) under ``pc``: every packet of the
    connection leaves through one of them."""
    return [protocol for agent in ice_agents(pc) for protocol in agent._protocols]
