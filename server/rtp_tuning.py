"""Tuning aiortc's receive path, per peer connection, where aiortc has no setting.

aiortc gives every audio receiver ``JitterBuffer(capacity=16, prefetch=4)``: it holds
four packets (~80 ms) before releasing any. On a server that is pure added latency
for every reply — the chunker already tolerates loss and reordering by RTP timestamp
(server/media_in.py) — so sessions replace it with a smaller prefetch. This touches
private attributes of one receiver, explicitly, after the transceivers exist and
before media flows; nothing is patched at import time and other connections are
untouched. ``tests/test_loopback_echo.py`` measures the difference end to end.

aiortc's buffer also never gives up on a lost packet and releases at most one frame
per packet received (RTCRtpReceiver takes one frame per ``add``), so after the first
loss it fills to its 16 packets (~300 ms) and stays there. ``BoundedJitterBuffer``
waits a few packets for a missing one, then skips it, and releases a backlog as one
frame (Opus packets are joined into one multi-frame packet, RFC 6716 §3.2.5), so
the delay falls back to one packet. ``tests/test_network_faults.py`` measures it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from aiortc import RTCPeerConnection
from aiortc.jitterbuffer import MAX_MISORDER, JitterBuffer, JitterFrame
from aiortc.rtp import RtpPacket
from aiortc.utils import uint16_add

log = logging.getLogger(__name__)

AIORTC_AUDIO_CAPACITY = 16  # aiortc's own value; a power of two
AIORTC_AUDIO_PREFETCH = 4
# How many newer packets may arrive before a missing one is given up (~20 ms each):
# the late packets that the chunker could still place arrive within ~60 ms.
HOLE_WAIT_PACKETS = 3
# Without a codec to join frames, more ready frames than this are dropped (oldest
# first) rather than delay everything after them.
MAX_BACKLOG_FRAMES = 3
OPUS_MAX_PACKET_MS = 120  # RFC 6716 §3.2.5: a code 3 packet holds at most 120 ms
OPUS_MAX_FRAME_BYTES = 1275


def opus_frame_ms(toc: int) -> float:
    """Duration of each frame of an Opus packet, from its TOC byte (RFC 6716 §3.1)."""
    config = toc >> 3
    if config < 12:  # SILK
        return (10, 20, 40, 60)[config % 4]
    if config < 16:  # hybrid
        return (10, 20)[config % 2]
    return (2.5, 5, 10, 20)[config % 4]  # CELT


def join_opus(packets: list[bytes]) -> bytes | None:
    """One Opus packet holding the frames of ``packets`` in order (code 3, VBR), or
    None where they cannot be joined: not single-frame (code 0), different modes,
    bandwidths, frame sizes or channels, or over 120 ms."""
    if not packets or any(not p or p[0] & 3 or len(p) - 1 > OPUS_MAX_FRAME_BYTES for p in packets):
        return None
    toc = packets[0][0]
    if any(p[0] != toc for p in packets) or len(packets) * opus_frame_ms(toc) > OPUS_MAX_PACKET_MS:
        return None
    if len(packets) == 1:
        return packets[0]
    header = bytearray([toc | 3, 0x80 | len(packets)])  # VBR, no padding, M frames
    for packet in packets[:-1]:  # every length but the last (RFC 6716 §3.2.1 coding)
        n = len(packet) - 1
        if n < 252:
            header.append(n)
        else:
            first = 252 + ((n - 252) & 3)
            header += bytes([first, (n - first) >> 2])
    return bytes(header) + b"".join(p[1:] for p in packets)


def _concatenate(packets: list[bytes]) -> bytes:
    return b"".join(packets)


def opus_ticks(payload: bytes) -> int:
    """RTP clock ticks (48 kHz) one single-frame Opus packet lasts; -1 for others."""
    return int(opus_frame_ms(payload[0]) * 48) if payload and not payload[0] & 3 else -1


# Per codec: how payloads join into one longer frame (sample codecs concatenate), and
# how long one lasts in RTP ticks: only frames that follow each other exactly join.
JOINERS: dict[str, tuple[Callable[[list[bytes]], bytes | None], Callable[[bytes], int]]] = {
    "audio/opus": (join_opus, opus_ticks), "audio/pcmu": (_concatenate, len), "audio/pcma": (_concatenate, len),
}


@dataclass
class JitterStats:
    packets: int = 0
    frames_out: int = 0  # frames handed to the decoder (a joined frame counts once)
    joined: int = 0  # frames released inside another (no audio lost)
    late: int = 0  # packets arriving after their place was released or skipped
    duplicates: int = 0
    skipped: int = 0  # missing packets given up on
    dropped: int = 0  # frames discarded to bound the delay (no joiner, or a seq jump)
    resets: int = 0  # stream restarts and internal errors
    held_total: int = 0  # packets held after each add, summed: mean = held_total / packets
    held_max: int = 0

    def as_dict(self) -> dict[str, float]:
        return {**self.__dict__, "held_mean": round(self.held_total / max(1, self.packets), 2)}


class BoundedJitterBuffer(JitterBuffer):
    """An audio jitter buffer whose delay stays ~``prefetch`` packets under loss.

    Same interface and, for an in-order stream, the same output as aiortc's (a frame
    is released once ``prefetch`` complete frames follow it). Differences: a missing
    packet is waited for only until ``hole_wait`` newer packets have arrived, and
    the frames then ready leave together as one frame when the codec can join them
    (``codec_of`` maps an RTP payload type to a MIME type), else the oldest beyond
    ``MAX_BACKLOG_FRAMES`` are dropped. It runs in aiortc's receive path, where an
    exception would end the receiver, so ``add`` never raises: an internal error
    resets the buffer."""

    def __init__(self, capacity: int, prefetch: int = 1, is_video: bool = False,
                 hole_wait: int = HOLE_WAIT_PACKETS) -> None:
        super().__init__(capacity, max(1, prefetch), is_video)
        if not 0 <= hole_wait < capacity // 2:
            raise ValueError(f"hole_wait must be 0..{capacity // 2 - 1}")
        self._hole_wait = hole_wait
        self._newest: int | None = None
        self.codec_of: Callable[[int], str | None] = lambda payload_type: None
        self.stats = JitterStats()

    @property
    def held(self) -> int:
        return sum(packet is not None for packet in self._packets)

    def add(self, packet: RtpPacket) -> tuple[bool, JitterFrame | None]:
        try:
            frame = self._add(packet)
        except Exception:  # never into aiortc's receive loop
            if self.stats.resets < 5:
                log.exception("jitter buffer error; resetting it")
            self._reset()
            frame = None
        held = self.held
        self.stats.packets += 1
        self.stats.held_total += held
        self.stats.held_max = max(self.stats.held_max, held)
        return False, frame

    def _reset(self) -> None:
        self.stats.resets += 1
        self._packets = [None] * self._capacity
        self._origin = self._newest = None

    def _add(self, packet: RtpPacket) -> JitterFrame | None:
        seq = packet.sequence_number
        if self._origin is None or self._newest is None:
            self._origin = self._newest = seq
        behind = uint16_add(self._origin, -seq)
        if 0 < behind < 1 << 15:  # older than anything still held
            if behind < MAX_MISORDER:
                self.stats.late += 1
                return None
            self._reset()  # the sender restarted its sequence
            self._origin = self._newest = seq
        if uint16_add(seq, -self._origin) >= self._capacity:
            # A jump past the buffer (a long outage): what is held is too old to wait for.
            self.stats.dropped += self.held
            self._packets = [None] * self._capacity
            self._origin = self._newest = seq
        pos = seq % self._capacity
        if self._packets[pos] is not None:
            self.stats.duplicates += 1
            return None
        self._packets[pos] = packet
        if uint16_add(seq, -self._origin) >= uint16_add(self._newest, -self._origin):
            self._newest = seq
        return self._release()

    def _release(self) -> JitterFrame | None:
        assert self._origin is not None and self._newest is not None
        span = uint16_add(self._newest, -self._origin)
        # Frames from the origin (packets sharing a timestamp make one), each with the
        # slots it spans. A missing packet ends the walk unless hole_wait
        # newer ones (beyond prefetch) are here: then it is given up and walked past.
        frames: list[tuple[list[RtpPacket], int, int]] = []  # (packets, first slot, end slot)
        for count in range(span + 1):
            packet = self._packets[(self._origin + count) % self._capacity]
            if packet is None:
                if span - count < self._hole_wait + self._prefetch:
                    break
            elif frames and frames[-1][0][0].timestamp == packet.timestamp:
                frames[-1][0].append(packet)
                frames[-1] = (frames[-1][0], frames[-1][1], count + 1)
            else:
                frames.append(([packet], count, count + 1))
        # A frame is complete once a packet of another timestamp follows it; hold prefetch.
        ready = frames[: max(0, len(frames) - self._prefetch)]
        if not ready:
            return None
        payloads = [b"".join(p._data for p in packets) for packets, _, _ in ready]  # type: ignore[attr-defined]
        codec = JOINERS.get((self.codec_of(ready[0][0][0].payload_type) or "").lower())
        first, taken, data = 0, 1, payloads[0]
        # As many as the codec can hold in one frame (the backlog leaves at once), but
        # only gapless: no hole given up, no timestamp jump in between.
        run = 1
        while (codec is not None and run < len(ready) and ready[run][1] == ready[run - 1][2]
               and (ready[run][0][0].timestamp - ready[run - 1][0][0].timestamp) % (1 << 32)
               == codec[1](payloads[run - 1])):
            run += 1
        for n in range(run, 1, -1):
            joined = codec[0](payloads[:n]) if codec is not None else None
            if joined is not None:
                taken, data = n, joined
                break
        # A lone frame before a hole or jump is progress (the rest joins next time);
        # a backlog that cannot join would stay, so its oldest frames go.
        if taken == 1 and (codec is None or run > 1) and len(ready) > MAX_BACKLOG_FRAMES:
            first = len(ready) - MAX_BACKLOG_FRAMES
            self.stats.dropped += first
            data = payloads[first]
        # Free every slot up to the last frame released, holes given up included.
        slots = ready[first + taken - 1][2]
        packets_freed = sum(len(packets) for packets, _, _ in ready[: first + taken])
        self.stats.skipped += slots - packets_freed
        self.remove(slots)
        self.stats.frames_out += 1
        self.stats.joined += taken - 1
        return JitterFrame(data=data, timestamp=ready[first][0][0].timestamp)


class ArrivalStampingJitterBuffer(BoundedJitterBuffer):
    """The bounded buffer, also noting when each RTP timestamp first arrived (wall
    clock): the load tester times packets as they reach the client, not after buffering."""

    def __init__(self, capacity: int, prefetch: int = 1, is_video: bool = False) -> None:
        super().__init__(capacity, prefetch, is_video)
        self.arrivals: dict[int, float] = {}

    def add(self, packet: RtpPacket) -> tuple[bool, JitterFrame | None]:
        self.arrivals.setdefault(packet.timestamp, time.time())
        return super().add(packet)


def validate_jitter_prefetch(prefetch: int) -> None:
    if not 1 <= prefetch <= AIORTC_AUDIO_CAPACITY // 2:
        raise ValueError(f"jitter prefetch must be 1..{AIORTC_AUDIO_CAPACITY // 2} packets, got {prefetch}")


def set_audio_jitter_prefetch(pc: RTCPeerConnection, prefetch: int,
                              buffer_class: type[JitterBuffer] = BoundedJitterBuffer) -> int:
    """Give each audio receiver of ``pc`` a jitter buffer releasing after ``prefetch``
    packets (1–8). Call after setRemoteDescription/addTransceiver, before media
    arrives. Returns how many receivers were changed.

    1 is the floor: a frame is known complete only when a packet with the next
    timestamp arrives, so every packet waits for its successor (20 ms)."""
    validate_jitter_prefetch(prefetch)
    changed = 0
    for transceiver in pc.getTransceivers():
        receiver = transceiver.receiver
        if transceiver.kind == "audio" and hasattr(receiver, "_RTCRtpReceiver__jitter_buffer"):
            buffer = buffer_class(AIORTC_AUDIO_CAPACITY, prefetch=prefetch)
            if isinstance(buffer, BoundedJitterBuffer):
                buffer.codec_of = _codec_lookup(receiver)
            receiver._RTCRtpReceiver__jitter_buffer = buffer
            changed += 1
    return changed


def _codec_lookup(receiver: object) -> Callable[[int], str | None]:
    """Payload type -> MIME type, read when packets arrive (the receiver learns its
    codecs after negotiation; without them the buffer drops instead of joining)."""
    def codec_of(payload_type: int) -> str | None:
        codec = getattr(receiver, "_RTCRtpReceiver__codecs", {}).get(payload_type)
        return getattr(codec, "mimeType", None)
    return codec_of


def audio_jitter_buffers(pc: RTCPeerConnection) -> list[JitterBuffer]:
    """Each audio receiver's jitter buffer (for tests, diagnostics and arrival stamps)."""
    return [t.receiver._RTCRtpReceiver__jitter_buffer for t in pc.getTransceivers() if t.kind == "audio"]


def audio_jitter_prefetch(pc: RTCPeerConnection) -> list[int]:
    return [buffer._prefetch for buffer in audio_jitter_buffers(pc)]
