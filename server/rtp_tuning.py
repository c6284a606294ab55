"""Tuning aiortc's receive path, per peer connection, where aiortc has no setting.

aiortc gives every audio receiver ``JitterBuffer(capacity=16, prefetch=4)``: it holds
four packets (~80 ms) before releasing any. On a server that is pure added latency
for every reply — the chunker already tolerates loss and reordering by RTP timestamp
(server/media_in.py) — so sessions replace it with a smaller prefetch. This touches
one private attribute of one receiver, explicitly, after the transceivers exist and
before media flows; nothing is patched at import time and other connections are
untouched. ``tests/test_loopback_echo.py`` measures the difference end to end.
"""

from __future__ import annotations

import time

from aiortc import RTCPeerConnection
from aiortc.jitterbuffer import JitterBuffer, JitterFrame
from aiortc.rtp import RtpPacket

AIORTC_AUDIO_CAPACITY = 16  # aiortc's own value; a power of two
AIORTC_AUDIO_PREFETCH = 4


class ArrivalStampingJitterBuffer(JitterBuffer):
    """aiortc's buffer, also noting when each RTP timestamp first arrived (wall clock):
    the load tester times packets as they reach the client, not after buffering."""

    def __init__(self, capacity: int, prefetch: int = 0, is_video: bool = False) -> None:
        super().__init__(capacity, prefetch, is_video)
        self.arrivals: dict[int, float] = {}

    def add(self, packet: RtpPacket) -> tuple[bool, JitterFrame | None]:
        self.arrivals.setdefault(packet.timestamp, time.time())
        return super().add(packet)


def validate_jitter_prefetch(prefetch: int) -> None:
    if not 1 <= prefetch <= AIORTC_AUDIO_CAPACITY // 2:
        raise ValueError(f"jitter prefetch must be 1..{AIORTC_AUDIO_CAPACITY // 2} packets, got {prefetch}")


def set_audio_jitter_prefetch(pc: RTCPeerConnection, prefetch: int,
                              buffer_class: type[JitterBuffer] = JitterBuffer) -> int:
    """Give each audio receiver of ``pc`` a jitter buffer releasing after ``prefetch``
    packets (1–8). Call after setRemoteDescription/addTransceiver, before media
    arrives. Returns how many receivers were changed.

    1 is the floor: aiortc's buffer knows a frame is complete only when a packet with
    the next timestamp arrives, so every packet waits for its successor (20 ms)."""
    validate_jitter_prefetch(prefetch)
    changed = 0
    for transceiver in pc.getTransceivers():
        receiver = transceiver.receiver
        if transceiver.kind == "audio" and hasattr(receiver, "_RTCRtpReceiver__jitter_buffer"):
            receiver._RTCRtpReceiver__jitter_buffer = buffer_class(AIORTC_AUDIO_CAPACITY, prefetch=prefetch)
            changed += 1
    return changed


def audio_jitter_buffers(pc: RTCPeerConnection) -> list[JitterBuffer]:
    """Each audio receiver's jitter buffer (for tests, diagnostics and arrival stamps)."""
    return [t.receiver._RTCRtpReceiver__jitter_buffer for t in pc.getTransceivers() if t.kind == "audio"]


def audio_jitter_prefetch(pc: RTCPeerConnection) -> list[int]:
    return [buffer._prefetch for buffer in audio_jitter_buffers(pc)]
