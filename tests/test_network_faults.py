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
import json
import time
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import httpx
import numpy as np
import pytest
from test_loopback_echo import best_alignment

from loadtest.impair import ImpairedLink, Impairment, nominated_remotes
from loadtest.measure import measure, server_added
from loadtest.peer import FRAME_SAMPLES, Peer
from model.conversations import generate
from model.evaluate import aggregate
from model.interface import SAMPLE_RATE

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
        started = time.monotonic()
        async with httpx.AsyncClient() as client:
            while (elapsed := time.monotonic() - started) < seconds:
                result.frames_in.append((elapsed, (await client.get(peer.session_url)).json()["frames_in"]))
                await asyncio.sleep(1.0)
            result.info = (await client.get(peer.session_url)).json()
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
    """(frames received, frames missing between the first and last, longest run missing)."""
    pts = sorted(peer.recording.arrivals)
    steps = np.diff(pts) // FRAME_SAMPLES
    return len(pts), int(np.sum(steps - 1)), int(np.max(steps - 1)) if steps.size else 0


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
    # ... and bounded delay. Clean ~550 ms; faulty 870-1,060 ms, of which the path is
    # ~70: aiortc's receive jitter buffers (the server's and this client's) fill to
    # their 16 packets after the first loss and stay there (loadtest/README.md).
    assert measured["echo_round_trip_ms"] < 1500


SCRIPT_SEEDS = [2_000_000, 2_000_002]  # held-out voices; between them 4 questions, a pause, a barge-in
SCRIPT_S = 16.0


@pytest.fixture(scope="module")
def scripts():
    return generate(SCRIPT_SEEDS, held_out=True, duration_s=SCRIPT_S)


@pytest.mark.timeout(180)
async def test_the_trained_model_takes_its_turns_through_five_percent_loss(trained_server, scripts):
    """Each script is played twice at once, over a clean path and over 5 % loss (both
    through the relay, same server, same moment), and scored as the load tester does
    (model/evaluate.py's metrics on what the peer heard)."""
    assert sum(e.kind == "answer" and e.user_end_s + 2 <= SCRIPT_S for c in scripts for e in c.events) >= 2
    seconds = SCRIPT_S + 1.0  # the script, then the last reply
    conditions = {"0% loss": CLEAN, "5% loss": LOSSY}
    calls = await asyncio.gather(*(
        call(trained_server, name, script.user_audio, impairment, seconds, seed=10 * i + j)
        for i, script in enumerate(scripts) for j, (name, impairment) in enumerate(conditions.items())))
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
