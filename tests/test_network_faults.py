"""Network faults (issue #8): real peers whose media crosses an impaired path — 5 %
loss, 30 ms ± 30 ms delay, 5 % of packets held back 40 ms — keep talking to the
server: audio flows, the server's own latency stays small, nothing breaks; and what
loss does to the trained model's turn-taking, measured.

This kernel has no netem, so the path is ``loadtest/impair.py``'s user-space relay on
loopback (inside tests/run's network namespace). Each test checks that the media
really took it: both ends' nominated ICE pairs point at the relay.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import time
from dataclasses import dataclass, field
from fractions import Fraction
from itertools import pairwise
from typing import Any

import av
import httpx
import numpy as np
import pytest
from aiortc.codecs.opus import OpusDecoder, OpusEncoder
from aiortc.jitterbuffer import JitterBuffer, JitterFrame
from aiortc.rtp import RtpPacket
from test_loopback_echo import best_alignment

import server.session
from loadtest.impair import ImpairedLink, Impairment, nominated_remotes
from loadtest.measure import measure, server_added
from loadtest.peer import FRAME_SAMPLES, Peer
from model.conversations import generate
from model.evaluate import aggregate
from model.interface import SAMPLE_RATE
from server.config import ServerConfig
from server.rtp_tuning import BoundedJitterBuffer, audio_jitter_buffers, join_opus
from tests.conftest import running_server

CLEAN = Impairment()
FAULTY = Impairment(loss=0.05, delay_ms=30, jitter_ms=30, reorder=0.05, reorder_ms=40)
LOSSY = Impairment(loss=0.05)


@dataclass
class Call:
    """One peer's call over an impaired link, and what the server said about it."""

    name: str
    peer: Peer
    link: ImpairedLink
    frames_in: list[tuple[float, int]] = field(default_factory=list)  # (seconds since ready, server frames_in)
    info: dict[str, Any] = field(default_factory=dict)  # GET /v1/sessions/{id} at the end
    server_remotes: list[tuple[str, int]] = field(default_factory=list)
    client_remotes: list[tuple[str, int]] = field(default_factory=list)
    relay: dict[str, Any] = field(default_factory=dict)
    held: list[int] = field(default_factory=list)  # packets in the server's audio jitter buffer, every 20 ms

    @property
    def held_mean(self) -> float:
        return float(np.mean(self.held)) if self.held else 0.0

    @property
    def filled_fraction(self) -> float:
        """Share of the user's audio the server's chunker filled with silence (lost)."""
        chunker = self.info["chunker"]
        return chunker["gap_samples"] / max(1, chunker["chunks"] * 48_000 // 5)


async def sample_held(pc, into: list[int]) -> None:
    """Packets held in ``pc``'s audio jitter buffer, every 20 ms (any buffer class:
    the server's thread writes the list, a racy read only skews one sample)."""
    while True:
        for buffer in audio_jitter_buffers(pc):
            into.append(sum(packet is not None for packet in buffer._packets))
        await asyncio.sleep(0.02)


async def call(server, name: str, audio: np.ndarray, impairment: Impairment, seconds: float, seed: int) -> Call:
    """Connect through ``impairment`` (both directions), talk for ``seconds``, hang up."""
    peer = Peer(server.url, audio, lead_silence_s=0.5, jitter_prefetch=1)
    link = ImpairedLink(impairment, seed=seed)
    link.attach(peer)
    result = Call(name, peer, link)
    try:
        await peer.connect()
        await peer.wait_for_event("session.ready", timeout=15)
        session = server.app.state.registry.get(peer.session_url.rsplit("/", 1)[1])
        sampler = asyncio.create_task(sample_held(session.pc, result.held))
        started = time.monotonic()
        async with httpx.AsyncClient() as client:
            while (elapsed := time.monotonic() - started) < seconds:
                result.frames_in.append((elapsed, (await client.get(peer.session_url)).json()["frames_in"]))
                await asyncio.sleep(1.0)
            result.info = (await client.get(peer.session_url)).json()
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
        result.server_remotes = nominated_remotes(session.pc)
        result.client_remotes = nominated_remotes(peer.pc)
    finally:
        await peer.close()
        result.relay = link.stats()
        link.close()
    return result


def assert_routed_through_relay(result: Call) -> None:
    """Every packet of the call crossed the relay: ICE sends only on the nominated
    pair, and both ends' point at it; and the relay carried the media."""
    relay = result.link.relay
    assert relay is not None and relay.address is not None
    assert result.client_remotes == [relay.address], (result.client_remotes, relay.address)
    assert result.server_remotes and set(result.server_remotes) <= set(relay.target_side_addresses)
    assert relay.target_side_addresses and result.link.server_candidate not in result.server_remotes
    # The server decoded no frame the relay did not deliver.
    assert result.relay["up"]["delivered_by_kind"]["rtp"] >= result.info["frames_in"] > 0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def echo_round_trip_ms(peer: Peer, sent: np.ndarray) -> tuple[float, float]:
    """(speech sent -> heard back in ms, correlation of what came back) — as in
    tests/test_loopback_echo.py."""
    lag, score = best_alignment(sent, peer.recording.audio())
    assert peer.track.started_at is not None and peer.recording.first_arrival is not None
    sent_at = peer.track.started_at + peer.track.lead_samples / SAMPLE_RATE
    return (peer.recording.first_arrival + lag / SAMPLE_RATE - sent_at) * 1000, score


def received_gaps(peer: Peer) -> tuple[int, int, int]:
    """(20 ms frames received, frames missing between the first and last, longest run
    missing), from the audio's extent: the client's buffer may join frames into one."""
    spans = sorted((pts, pts + chunk.size * FRAME_SAMPLES // (SAMPLE_RATE // 50))
                   for pts, chunk in peer.recording.chunks)
    received = sum(end - start for start, end in spans) // FRAME_SAMPLES
    holes = [max(0, start - end) // FRAME_SAMPLES for (_, end), (start, _) in pairwise(spans)]
    return received, sum(holes), max(holes, default=0)


async def test_echo_keeps_flowing_through_loss_jitter_and_reordering(live_server, speech):
    seconds = 12.0
    clean, faulty = await asyncio.gather(call(live_server, "clean", speech, CLEAN, seconds, seed=1),
                                         call(live_server, "5% loss, 30±30 ms, 5% reordered", speech, FAULTY,
                                              seconds, seed=2))
    async with httpx.AsyncClient() as client:
        health = (await client.get(live_server.url + "/healthz")).json()

    report = {}
    for result in (clean, faulty):
        turns = result.peer.events_of("turn")
        latency = [t["latency_ms"] for t in turns if t.get("latency_ms") is not None]
        added, _ = server_added(result.peer, turns)
        round_trip, correlation = echo_round_trip_ms(result.peer, speech)
        received, missing, longest = received_gaps(result.peer)
        report[result.name] = {
            "turns": len(turns), "server_latency_ms_p50": percentile(latency, 0.5),
            "server_latency_ms_p95": percentile(latency, 0.95),
            "server_added_ms_p50": percentile(added, 0.5), "server_added_ms_p95": percentile(added, 0.95),
            "echo_round_trip_ms": round(round_trip), "echo_correlation": round(correlation, 3),
            "frames_received": received, "frames_missing": missing, "longest_gap_frames": longest,
            "server_frames_in": result.info["frames_in"], "server_gap_ms": result.info["chunker"]["gap_samples"] / 48,
            "server_filled_fraction": round(result.filled_fraction, 4),
            "server_jitter_held_mean": round(result.held_mean, 2), "server_jitter_held_max": max(result.held),
            "relay": result.relay,
        }
    print(json.dumps(report, indent=1, ensure_ascii=False))

    for result in (clean, faulty):
        assert_routed_through_relay(result)
        info, turns = result.info, result.peer.events_of("turn")
        # Nothing broke: the session is up, no step failed, no protocol error.
        assert info["connection_state"] == "connected" and info["step_errors"] == 0 and info["protocol_errors"] == 0
        # Audio kept flowing all along: the server's frames grew every second, one turn
        # event per micro-turn (none skipped or repeated) up to the end.
        counts = [n for _, n in result.frames_in]
        assert all(b > a for a, b in pairwise(counts)), result.frames_in
        indices = [t["turn"] for t in turns]
        assert indices == list(range(indices[0], indices[0] + len(indices))), "turns skipped or repeated"
        assert len(turns) >= 0.9 * seconds / 0.2
        assert info["chunks_in"] >= 0.9 * seconds / 0.2  # the session clock kept pace with wall time
    assert health["status"] == "ok" and health["sessions"] == 0

    # The path really was faulty, both ways.
    for direction in ("up", "down"):
        stats = faulty.relay[direction]
        assert 0.02 < stats["dropped"] / stats["packets"] < 0.09, stats
        assert stats["out_of_order"] > 0.05 * stats["packets"], stats
    assert faulty.info["chunker"]["gap_samples"] > 0  # the server saw the loss and filled it
    # The server's jitter buffer gives up on lost packets and drains its backlog: it
    # holds ~1.5 packets (aiortc's own: ~14, its full 16 after the first loss), and
    # fills about the audio the uplink lost (aiortc's: 12-18 % for 5 % lost).
    assert clean.held_mean <= 1.2 and faulty.held_mean <= 3, (clean.held_mean, faulty.held_mean)
    assert faulty.filled_fraction <= 1.6 * faulty.relay["up"]["dropped"] / faulty.relay["up"]["packets"] + 0.01

    measured = report[faulty.name]
    # What the server adds (chunk closed -> its reply queued) does not depend on the
    # network: p95 16-17 ms with and without faults (the two sessions wait up to the
    # 15 ms batch window for each other's chunk; ~1-4 ms for one session alone).
    assert measured["server_latency_ms_p95"] < 100
    # Chunk closed -> first reply packet at the client: server time plus the downlink's
    # 0-60 ms (+40 ms when held back); measured p95 ~160 ms.
    assert measured["server_added_ms_p95"] < 300
    # The echo comes back, with short holes only (5 % loss each way; measured: ~18 %
    # of frames missing at the client, never more than 5 in a row) ...
    assert measured["frames_received"] >= 0.6 * seconds * 50
    assert measured["longest_gap_frames"] <= 10
    # ... and bounded delay. Clean ~550 ms; faulty was 870-1,060 ms with aiortc's
    # buffers (both ends' fill to 16 packets after the first loss), of which the path
    # is ~70 ms; with BoundedJitterBuffer at both ends see docs/benchmarks.md.
    assert measured["echo_round_trip_ms"] < report[clean.name]["echo_round_trip_ms"] + 250


SCRIPT_SEEDS = [2_000_000, 2_000_002]  # held-out voices; between them 4 questions, a pause, a barge-in
SCRIPT_S = 16.0


@pytest.fixture(scope="module")
def scripts():
    return generate(SCRIPT_SEEDS, held_out=True, duration_s=SCRIPT_S)


@pytest.mark.timeout(180)
async def test_the_trained_model_takes_its_turns_through_five_percent_loss(trained_server, scripts):
    """Each script is played twice at once, over a clean path and over 5 % loss (both
    through the relay, same server, same moment), and scored as the load tester does
    (model/evaluate.py's metrics on what the peer heard).

    One script at a time: the peers, the relay and the server share this process's
    GIL and two cores. With all four calls at once, the model's steps waited on the
    GIL behind the peers' media work (a 4-session step ~75 ms alone on this VM, up to
    900 ms from tick to output there, 30 of 31 turns overran), every reply came
    seconds late and the scores measured the load generator, not loss."""
    assert sum(e.kind == "answer" and e.user_end_s + 2 <= SCRIPT_S for c in scripts for e in c.events) >= 2
    seconds = SCRIPT_S + 1.0  # the script, then the last reply
    conditions = {"0% loss": CLEAN, "5% loss": LOSSY}
    calls: list[Call] = []
    for i, script in enumerate(scripts):
        calls += await asyncio.gather(*(call(trained_server, name, script.user_audio, impairment, seconds,
                                             seed=10 * i + j)
                                        for j, (name, impairment) in enumerate(conditions.items())))
    async with httpx.AsyncClient() as client:
        health = (await client.get(trained_server.url + "/healthz")).json()

    by_condition: dict[str, list] = {name: [] for name in conditions}
    for index, result in enumerate(calls):
        by_condition[result.name].append((result, measure(index, result.peer, scripts[index // 2], result.info)))
    report = {}
    for name, runs in by_condition.items():
        records = [r for _, m in runs for r in m.interaction]
        report[name] = {
            "voice_to_voice_ms": [v for _, m in runs for v in m.voice_to_voice_ms],
            "unanswered": sum(m.unanswered for _, m in runs),
            "replies": [{k: r.get(k) for k in ("kind", "took_turn", "latency_s", "spoke_over", "stop_latency_s")}
                        for r in records if r["kind"] in ("answer", "pause", "barge_in")],
            **{k: v for k, v in aggregate(records).items() if k.startswith(("turn_taking", "response", "overlap",
                                                                             "pause", "stop", "noise"))},
            "server_gap_ms": [r.info["chunker"]["gap_samples"] / 48 for r, _ in runs],
            "relay_dropped_up_down": [(r.relay["up"]["dropped"], r.relay["down"]["dropped"]) for r, _ in runs],
            "turns_overran": [m.deadline_misses for _, m in runs],
        }
    print(json.dumps(report, indent=1, ensure_ascii=False))

    for result in calls:
        assert_routed_through_relay(result)
        assert result.info["step_errors"] == 0 and result.info["connection_state"] == "connected"
        indices = [t["turn"] for t in result.peer.events_of("turn")]
        assert indices == list(range(indices[0], indices[0] + len(indices)))
        if result.name == "5% loss":
            assert result.relay["up"]["dropped"] > 0 and result.info["chunker"]["gap_samples"] > 0
    assert health["status"] == "ok"
    # Robust across runs: with 5 % loss the model still answers questions.
    assert report["5% loss"]["voice_to_voice_ms"], report["5% loss"]


# -- the server's audio jitter buffer, fed directly ------------------------------------

def opus_packets(count: int) -> list[bytes]:
    """``count`` real 20 ms Opus packets of a 440 Hz tone (aiortc's encoder)."""
    encoder = OpusEncoder()
    packets: list[bytes] = []
    t = np.arange((count + 4) * 960) / 48_000
    pcm = (np.sin(2 * np.pi * 440 * t) * 8000).astype(np.int16)
    for i in range(count + 4):  # the encoder may hold the first frames back
        frame = av.AudioFrame.from_ndarray(np.repeat(pcm[None, i * 960:(i + 1) * 960], 2, axis=1),
                                           format="s16", layout="stereo")
        frame.sample_rate, frame.pts, frame.time_base = 48_000, i * 960, Fraction(1, 48_000)
        packets += encoder.encode(frame)[0]
    assert len(packets) >= count
    return packets[:count]


def feed(buffer: JitterBuffer, order: list[int], payloads: list[bytes]) -> list[tuple[int, JitterFrame | None]]:
    out = []
    for seq in order:
        packet = RtpPacket(payload_type=111, sequence_number=(60_000 + seq) % 65_536,
                           timestamp=(1_000 + 960 * seq) % (1 << 32), payload=payloads[seq])
        packet._data = payloads[seq]  # what RTCRtpReceiver's depayloader sets
        out.append((seq, buffer.add(packet)[1]))
    return out


def decoded_samples(frames: list[JitterFrame]) -> dict[int, int]:
    """Frame start (in 20 ms packets) -> samples decoded, through aiortc's Opus decoder."""
    decoder = OpusDecoder()
    return {(f.timestamp - 1_000) // 960: sum(d.samples for d in decoder.decode(f)) for f in frames}


def opus_buffer() -> BoundedJitterBuffer:
    buffer = BoundedJitterBuffer(16, prefetch=1)
    buffer.codec_of = {111: "audio/opus"}.get
    return buffer


@pytest.mark.parametrize("prefetch", [1, 4])
def test_in_order_packets_leave_as_aiortcs_buffer_releases_them(prefetch):
    payloads = opus_packets(40)  # the sequence numbers wrap at 65,536 on the way
    buffer = BoundedJitterBuffer(16, prefetch)
    buffer.codec_of = {111: "audio/opus"}.get
    ours, stock = feed(buffer, list(range(40)), payloads), feed(JitterBuffer(16, prefetch), list(range(40)), payloads)
    assert [(s, f and (f.timestamp, f.data)) for s, f in ours] == [(s, f and (f.timestamp, f.data)) for s, f in stock]
    assert [f.timestamp for _, f in ours if f] == [1_000 + 960 * i for i in range(40 - prefetch)]


def test_a_reordered_packet_is_used_and_the_backlog_leaves_as_one_frame():
    payloads = opus_packets(12)
    buffer = opus_buffer()
    out = feed(buffer, [0, 1, 2, 4, 5, 3, 6, 7, 8, 9, 10, 11], payloads)  # 3 comes 40 ms late
    frames = [f for _, f in out if f]
    assert dict(out)[3] is not None and dict(out)[6] is not None
    # When 3 arrives, 2-4 leave as one frame: every 20 ms decoded, in place, once.
    assert decoded_samples(frames) == {0: 960, 1: 960, 2: 3 * 960, **{i: 960 for i in range(5, 11)}}
    assert buffer.stats.late == buffer.stats.skipped == buffer.stats.dropped == 0
    assert buffer.held == 1  # back to just the newest packet, as without reordering


def test_a_lost_packet_is_given_up_and_the_delay_falls_back():
    payloads = opus_packets(16)
    buffer = opus_buffer()
    order = [0, 1, 2, 3, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]  # 4 is lost
    samples = decoded_samples([f for _, f in feed(buffer, order, payloads) if f])
    # 0-3 and 5-14 all decoded at their own timestamps; nothing placed where 4 was.
    assert 4 not in samples and sum(samples.values()) == 14 * 960
    assert all(start + n // 960 <= 4 or start >= 5 for start, n in samples.items())
    assert buffer.stats.skipped == 1 and buffer.held == 1
    # aiortc's buffer, same packets: still waiting for 4, holding the rest.
    stock = JitterBuffer(16, 1)
    assert not any(f for _, f in feed(stock, order, payloads)[4:])
    assert sum(p is not None for p in stock._packets) == 12  # 3, and 5-15
    # A packet that comes after its place was given up is dropped, not misplaced.
    assert feed(buffer, [4], payloads) == [(4, None)] and buffer.stats.late == 1


def test_without_a_codec_to_join_the_oldest_frames_go():
    payloads = opus_packets(24)
    buffer = BoundedJitterBuffer(16, prefetch=1)  # codec unknown: frames cannot join
    feed(buffer, list(range(4)) + list(range(5, 24)), payloads)
    assert buffer.stats.dropped > 0 and buffer.stats.held_max <= 3 + 2


def test_opus_frames_join_into_one_packet_that_decodes():
    payloads = opus_packets(6)
    joined = join_opus(payloads)
    assert joined is not None and joined[0] & 3 == 3 and joined[1] & 63 == 6
    frames = OpusDecoder().decode(JitterFrame(joined, 0))
    assert sum(f.samples for f in frames) == 6 * 960
    assert join_opus(payloads + payloads[:1]) is None  # 140 ms: more than a packet holds
    assert join_opus([payloads[0], bytes([payloads[1][0] ^ 4]) + payloads[1][1:]]) is None  # mono and stereo


def test_garbage_never_raises_into_the_receiver():
    buffer = opus_buffer()
    rng = np.random.default_rng(0)
    for _ in range(3_000):
        packet = RtpPacket(payload_type=111, sequence_number=int(rng.integers(0, 65_536)),
                           timestamp=int(rng.integers(0, 1 << 32)))
        if rng.random() < 0.9:  # some come without the depayloaded data: an internal error
            packet._data = rng.bytes(int(rng.integers(0, 40)))
        assert buffer.add(packet)[0] is False
    assert buffer.held <= 16 and buffer.stats.resets > 0


async def test_bounded_buffer_against_aiortcs_under_faults(speech, monkeypatch):
    """Before/after: the same faulty call (same seeds) to an echo server with aiortc's
    stock buffer (prefetch 1, the previous default), then to one with the bounded one."""
    seconds = 12.0
    config = ServerConfig(engine="echo", ice_host_addresses=["127.0.0.1"], max_sessions=4)
    results = {}
    for name, buffer_class in (("aiortc", JitterBuffer), ("bounded", BoundedJitterBuffer)):
        with monkeypatch.context() as patch, running_server(config) as live:
            setter = functools.partial(server.session.set_audio_jitter_prefetch, buffer_class=buffer_class)
            patch.setattr(server.session, "set_audio_jitter_prefetch", setter)
            results[name] = await call(live, name, speech, FAULTY, seconds, seed=2)
    stock, bounded = results["aiortc"], results["bounded"]
    report = {}
    for result in (stock, bounded):
        assert_routed_through_relay(result)
        round_trip, _ = echo_round_trip_ms(result.peer, speech)
        report[result.name] = {"held_mean": round(result.held_mean, 2), "held_max": max(result.held),
                               "heard_late_ms": round(20 * result.held_mean),
                               "filled_fraction": round(result.filled_fraction, 4),
                               "uplink_lost": round(result.relay["up"]["dropped"] / result.relay["up"]["packets"], 4),
                               "echo_round_trip_ms": round(round_trip)}
    print(json.dumps(report, indent=1))
    assert bounded.held_mean < stock.held_mean / 3
    assert bounded.filled_fraction < stock.filled_fraction
