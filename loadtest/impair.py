"""A netem-like impaired network path for one peer, in user space.

This kernel has no netem (``tc qdisc ... netem``: "Specified qdisc kind is
unknown"), so impairment is a UDP relay on the event loop: each packet, in each
direction, may be dropped (``loss``), is delayed by ``delay_ms`` plus jitter
(uniform within ±``jitter_ms``, or normal with that standard deviation; never below
zero), and a share (``reorder``) is held back a further ``reorder_ms`` so later
packets overtake it. Jitter larger than the packet spacing reorders too, as netem's
does. One seeded RNG per direction makes a run repeatable.

Routing a peer's media through it (``ImpairedLink.attach``) takes two SDP edits:

- the offer goes to the server *without* the peer's candidates and without
  end-of-candidates, so the server knows no address to check directly and waits
  for more (trickle); it learns the peer only as the peer-reflexive source of the
  checks that reach it through the relay;
- the answer reaches the peer with the server's candidates replaced by one: the
  relay's. The relay forwards to the server's real candidate from a socket of its
  own per peer address, so the server answers to the relay.

ICE sends every packet on its nominated pair, so once both ends nominate a pair
through the relay, all media takes it; ``tests/test_network_faults.py`` checks both
nominated pairs and the relay's counters.
"""

from __future__ import annotations

import asyncio
import random
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiortc import RTCPeerConnection

from loadtest.peer import Peer, ice_agents

MAX_DATAGRAM = 65_535


@dataclass(frozen=True, slots=True)
class Impairment:
    loss: float = 0.0  # probability that a packet is dropped
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    distribution: str = "uniform"  # of the jitter: "uniform" (±jitter_ms) or "normal" (sigma jitter_ms)
    reorder: float = 0.0  # probability that a packet is held back another reorder_ms
    reorder_ms: float = 40.0

    def __post_init__(self) -> None:
        if not (0 <= self.loss <= 1 and 0 <= self.reorder <= 1):
            raise ValueError("loss and reorder are probabilities")
        if self.distribution not in ("uniform", "normal"):
            raise ValueError(f"unknown jitter distribution {self.distribution!r}")


@dataclass
class DirectionStats:
    packets: int = 0
    dropped: int = 0
    delivered: int = 0
    held_back: int = 0  # chosen for explicit reordering
    out_of_order: int = 0  # delivered after a packet that arrived later (any cause)
    bytes: int = 0
    delay_ms_total: float = 0.0
    by_kind: dict[str, int] = field(default_factory=dict)  # packets by RFC 7983 kind, as they came
    delivered_by_kind: dict[str, int] = field(default_factory=dict)  # ... and as they went on

    def as_dict(self) -> dict[str, Any]:
        return {"packets": self.packets, "dropped": self.dropped, "delivered": self.delivered,
                "held_back": self.held_back, "out_of_order": self.out_of_order, "bytes": self.bytes,
                "mean_delay_ms": round(self.delay_ms_total / max(1, self.delivered), 2),
                "by_kind": dict(self.by_kind), "delivered_by_kind": dict(self.delivered_by_kind)}


def packet_kind(data: bytes) -> str:
    """What a WebRTC datagram is, by its first byte (RFC 7983 demultiplexing)."""
    first = data[0] if data else 255
    if first <= 3:
        return "stun"
    if 20 <= first <= 63:
        return "dtls"  # handshake, and SCTP (the data channel) inside DTLS records
    if 128 <= first <= 191:
        # RTCP packet types 200-206 in the second byte (rtcp-mux)
        return "rtcp" if len(data) > 1 and 192 <= data[1] <= 223 else "rtp"
    return "other"


class Direction:
    """One direction of the path: impairment, scheduling, counting."""

    def __init__(self, impairment: Impairment, seed: int) -> None:
        self.impairment = impairment
        self.rng = random.Random(seed)
        self.stats = DirectionStats()
        self._arrived = 0  # arrival sequence
        self._latest_delivered = -1
        self._pending: set[asyncio.TimerHandle] = set()

    def submit(self, data: bytes, deliver: Callable[[bytes], None]) -> None:
        """Schedule ``deliver(data)`` as the impaired network would, or drop it."""
        imp, stats = self.impairment, self.stats
        seq = self._arrived
        self._arrived += 1
        stats.packets += 1
        stats.bytes += len(data)
        kind = packet_kind(data)
        stats.by_kind[kind] = stats.by_kind.get(kind, 0) + 1
        if imp.loss and self.rng.random() < imp.loss:
            stats.dropped += 1
            return
        delay = imp.delay_ms
        if imp.jitter_ms:
            if imp.distribution == "normal":
                delay += self.rng.gauss(0.0, imp.jitter_ms)
            else:
                delay += self.rng.uniform(-imp.jitter_ms, imp.jitter_ms)
        if imp.reorder and self.rng.random() < imp.reorder:
            stats.held_back += 1
            delay += imp.reorder_ms
        delay = max(0.0, delay)
        if delay == 0:
            self._deliver(seq, kind, delay, data, deliver, None)
            return
        loop = asyncio.get_running_loop()
        handle: asyncio.TimerHandle | None = None

        def fire() -> None:
            self._deliver(seq, kind, delay, data, deliver, handle)

        handle = loop.call_later(delay / 1000, fire)
        self._pending.add(handle)

    def _deliver(self, seq: int, kind: str, delay: float, data: bytes, deliver: Callable[[bytes], None],
                 handle: asyncio.TimerHandle | None) -> None:
        stats = self.stats
        if handle is not None:
            self._pending.discard(handle)
        if seq < self._latest_delivered:
            stats.out_of_order += 1
        self._latest_delivered = max(self._latest_delivered, seq)
        stats.delivered += 1
        stats.delivered_by_kind[kind] = stats.delivered_by_kind.get(kind, 0) + 1
        stats.delay_ms_total += delay
        deliver(data)

    def cancel(self) -> None:
        for handle in self._pending:
            handle.cancel()
        self._pending.clear()


class UdpRelay:
    """Peers send to ``address``; each peer address gets its own socket towards
    ``target``, and what the target sends to that socket goes back to that peer
    from ``address``. ``up`` impairs peer -> target, ``down`` target -> peer."""

    def __init__(self, target: tuple[str, int], up: Impairment, down: Impairment, seed: int = 0,
                 host: str = "127.0.0.1") -> None:
        self.target = target
        self.host = host
        self.up = Direction(up, seed)
        self.down = Direction(down, seed + 1)
        self.address: tuple[str, int] | None = None
        self._listen: socket.socket | None = None
        self._towards: dict[tuple[str, int], socket.socket] = {}  # peer address -> its socket to the target
        # Where the target sees this relay's packets come from (one per peer address, kept after close).
        self.target_side_addresses: list[tuple[str, int]] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> tuple[str, int]:
        """Bind and start relaying (on the running loop); returns the peer-facing address."""
        self._loop = asyncio.get_running_loop()
        self._listen = self._bind()
        self._loop.add_reader(self._listen.fileno(), self._from_peer)
        self.address = self._listen.getsockname()
        return self.address

    def close(self) -> None:
        self.up.cancel()
        self.down.cancel()
        for sock in [*self._towards.values(), *([self._listen] if self._listen else [])]:
            if self._loop is not None:
                self._loop.remove_reader(sock.fileno())
            sock.close()
        self._towards.clear()
        self._listen = None

    def stats(self) -> dict[str, Any]:
        return {"up": self.up.stats.as_dict(), "down": self.down.stats.as_dict(),
                "peers": len(self.target_side_addresses)}

    def _bind(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        sock.bind((self.host, 0))
        return sock

    def _from_peer(self) -> None:
        assert self._listen is not None and self._loop is not None
        for data, peer in _drain(self._listen):
            towards = self._towards.get(peer)
            if towards is None:
                towards = self._towards[peer] = self._bind()
                self.target_side_addresses.append(towards.getsockname())
                self._loop.add_reader(towards.fileno(), self._from_target, peer, towards)
            self.up.submit(data, lambda d, s=towards: _send(s, d, self.target))

    def _from_target(self, peer: tuple[str, int], towards: socket.socket) -> None:
        listen = self._listen
        for data, source in _drain(towards):
            if listen is not None and source == self.target:
                self.down.submit(data, lambda d: _send(listen, d, peer))


def _drain(sock: socket.socket) -> list[tuple[bytes, tuple[str, int]]]:
    out = []
    while True:
        try:
            out.append(sock.recvfrom(MAX_DATAGRAM))
        except (BlockingIOError, InterruptedError):
            return out
        except OSError:  # e.g. ICMP port unreachable reported on the socket: not a packet
            return out


def _send(sock: socket.socket, data: bytes, address: tuple[str, int]) -> None:
    if sock.fileno() < 0:
        return  # closed while the packet was in flight
    try:
        sock.sendto(data, address)
    except (BlockingIOError, InterruptedError, OSError):
        pass  # a full socket buffer or an unreachable port: lost, as on a real network


# -- SDP ------------------------------------------------------------------------------

_CANDIDATE = re.compile(r"^a=candidate:(\S+) (\d+) (\S+) (\d+) (\S+) (\d+) typ (\S+)(.*)$")


def candidates(sdp: str) -> list[tuple[str, int]]:
    """(address, port) of each UDP candidate in ``sdp``."""
    found = []
    for line in sdp.splitlines():
        match = _CANDIDATE.match(line)
        if match and match.group(3).lower() == "udp":
            found.append((match.group(5), int(match.group(6))))
    return found


def without_candidates(sdp: str) -> str:
    """``sdp`` with no candidates and no end-of-candidates: the receiver waits for
    candidates that never come, and meets the sender only through its checks."""
    lines = [line for line in sdp.splitlines()
             if not line.startswith(("a=candidate:", "a=end-of-candidates"))]
    return "\r\n".join(lines) + "\r\n"


def with_only_candidate(sdp: str, address: tuple[str, int]) -> str:
    """``sdp`` with its candidates replaced by one host candidate at ``address``
    (once per media section, keeping the first candidate's foundation and priority)."""
    out: list[str] = []
    replaced_in_section = False
    for line in sdp.splitlines():
        if line.startswith("m="):
            replaced_in_section = False
        match = _CANDIDATE.match(line)
        if match is None:
            out.append(line)
            continue
        if not replaced_in_section:
            foundation, component, _, priority = match.group(1), match.group(2), match.group(3), match.group(4)
            out.append(f"a=candidate:{foundation} {component} udp {priority} {address[0]} {address[1]} typ host")
            replaced_in_section = True
    return "\r\n".join(out) + "\r\n"


def nominated_remotes(pc: RTCPeerConnection) -> list[tuple[str, int]]:
    """Where ``pc`` sends its media: the remote address of each nominated ICE pair."""
    return [tuple(pair.remote_addr) for agent in ice_agents(pc) for pair in agent._nominated.values()]


class ImpairedLink:
    """An impaired path between one ``loadtest.peer.Peer`` and the server."""

    def __init__(self, up: Impairment, down: Impairment | None = None, seed: int = 0,
                 prefer_host: str = "127.0.0.1") -> None:
        self.up, self.down = up, down if down is not None else up
        self.seed = seed
        self.prefer_host = prefer_host
        self.relay: UdpRelay | None = None
        self.server_candidate: tuple[str, int] | None = None

    def attach(self, peer: Peer) -> None:
        """Route ``peer``'s media through this link (before ``peer.connect()``)."""
        peer.rewrite_offer = without_candidates
        peer.rewrite_answer = self._answer

    def _answer(self, sdp: str) -> str:
        found = candidates(sdp)
        if not found:
            raise ValueError("the answer has no UDP candidate to relay to")
        preferred = [c for c in found if c[0] == self.prefer_host]
        self.server_candidate = (preferred or found)[0]
        self.relay = UdpRelay(self.server_candidate, self.up, self.down, self.seed)
        return with_only_candidate(sdp, self.relay.start())

    def stats(self) -> dict[str, Any]:
        return self.relay.stats() if self.relay is not None else {}

    def close(self) -> None:
        if self.relay is not None:
            self.relay.close()
