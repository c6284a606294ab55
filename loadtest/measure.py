"""What one simulated peer measured, from its recording, its events and its script.

Clocks: server events carry the server's wall clock (``closed_at_ms``, ``ts_ms``)
and the peer stamps arrivals with its own, so cross-clock figures (server-added
latency, event lag) need both on one host or NTP-synchronised hosts.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from loadtest.peer import FRAME_SAMPLES, Peer
from model.conversations import Conversation
from model.evaluate import Timeline, activity, score
from model.interface import SAMPLE_RATE, TURN_SAMPLES

# model/evaluate.py's speech test: on 200 ms turns for the interaction timeline, as
# offline; on 20 ms windows for voice-to-voice onsets (finer timing).
ONSET_WINDOW = SAMPLE_RATE // 50
ONSET_SEARCH_S = 2.0  # a reply must start within this long after the user stops


@dataclass
class PeerResult:
    peer: int
    connect_ms: float | None = None
    server_added_ms: list[float] = field(default_factory=list)  # per turn: chunk closed -> its audio arrived
    voice_to_voice_ms: list[float] = field(default_factory=list)  # per answered question
    unanswered: int = 0  # questions with no reply onset within ONSET_SEARCH_S
    overlapped: int = 0  # questions the model was already speaking at the end of (no onset to time)
    arrival_source: str = ""  # "packet" (stamped entering the jitter buffer) or "decoded" (after it)
    event_lag_ms: list[float] = field(default_factory=list)
    turns: int = 0
    deadline_misses: int = 0
    steps: list[tuple[float, int]] = field(default_factory=list)  # per turn: (closed_at_ms, sessions in its step)
    underrun_frames: int = 0  # the server's output queue ran dry after audio started
    concealed_frames: int = 0  # 20 ms frames missing from what arrived (loss)
    received_frames: int = 0
    interaction: list[dict[str, Any]] = field(default_factory=list)  # model/evaluate.py records
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def played_part(script: Conversation, seconds: float) -> Conversation:
    """The script as far as it was played: events whose reply could be heard in time."""
    events = [e for e in script.events if e.user_end_s + ONSET_SEARCH_S <= seconds]
    return dataclasses.replace(script, events=events)


def measure(index: int, peer: Peer, script: Conversation, info: dict[str, Any] | None) -> PeerResult:
    result = PeerResult(index, connect_ms=peer.connect_ms)
    script = played_part(script, (peer.track.script.size - peer.track.lead_samples) / SAMPLE_RATE)
    turns = peer.events_of("turn")
    result.turns = len(turns)
    result.deadline_misses = sum(bool(t.get("overran")) for t in turns)
    result.steps = [(t["closed_at_ms"], t["batch"]) for t in turns
                    if t.get("closed_at_ms") is not None and t.get("batch") is not None]
    result.event_lag_ms = [round(lag, 2) for lag in peer.event_lag_ms]
    result.server_added_ms, result.arrival_source = server_added(peer, turns)
    arrivals = peer.recording.arrivals
    if arrivals:
        first, last = min(arrivals), max(arrivals)
        result.received_frames = len(arrivals)
        result.concealed_frames = (last - first) // FRAME_SAMPLES + 1 - len(arrivals)
    if info is not None:
        result.underrun_frames = info.get("output", {}).get("underrun_frames", 0)
    ready = peer.events_of("session.ready")
    echo = bool(ready) and ready[0].get("engine") == "echo"  # echo repeats the user: no replies to time
    heard = heard_in_script_time(peer, script)
    if heard is not None and not echo:
        onsets, result.unanswered, result.overlapped = voice_to_voice(script, heard)
        result.voice_to_voice_ms = list(onsets.values())
        result.interaction = with_fine_latencies(score(script, timeline(peer, script, heard)), onsets)
    return result


def server_added(peer: Peer, turns: list[dict[str, Any]]) -> tuple[list[float], str]:
    """Per turn: the server's chunk-close time -> when the first packet of that turn's
    output arrived here, before any client buffering (its RTP timestamp is in a later
    ``turn`` event's ``played``). Falls back to decoded-frame arrival (after the
    client's jitter buffer) when packets were not stamped; says which it used."""
    closed = {t["turn"]: t["closed_at_ms"] for t in turns if t.get("closed_at_ms") is not None}
    arrivals, source = peer.packet_arrivals(), "packet"
    if not arrivals:
        arrivals, source = peer.recording.arrivals, "decoded"
    out = []
    for event in turns:
        for turn, pts in event.get("played", []):
            arrived = arrivals.get(pts)
            if arrived is not None and turn in closed:
                out.append(round(arrived * 1000 - closed[turn], 2))
    return out, source


def heard_in_script_time(peer: Peer, script: Conversation) -> np.ndarray | None:
    """What the peer heard, placed on its script's timeline (sample i of the result
    arrived i/16000 s after the script's first sample was sent)."""
    rec = peer.recording
    arrivals = peer.packet_arrivals() or rec.arrivals
    if peer.track.started_wall is None or not arrivals:
        return None
    # When the stream's sample 0 arrived: the earliest any packet implies (one late
    # stamp — a busy event loop — must not shift the whole timeline).
    origin = min(at - pts / 48_000 for pts, at in arrivals.items())
    offset = round((origin - peer.track.started_wall) * SAMPLE_RATE) - peer.track.lead_samples
    audio = rec.audio()
    heard = np.zeros(script.user_audio.size, dtype=np.float32)
    source = audio[max(-offset, 0):]
    start = max(offset, 0)
    n = max(0, min(source.size, heard.size - start))
    heard[start : start + n] = source[:n]
    return heard


def voice_to_voice(script: Conversation, heard: np.ndarray) -> tuple[dict[int, float], int, int]:
    """User speech end -> onset of model audio heard after it, for each question:
    (latency ms by index in ``script.events``, questions with no onset in time,
    questions it was already speaking at the end of — overlap, reported separately,
    not a latency)."""
    active = activity(heard, ONSET_WINDOW)
    latencies: dict[int, float] = {}
    missed = overlapped = 0
    for index, event in enumerate(script.events):
        if event.kind not in ("answer", "pause", "delegation"):
            continue
        first = math.ceil(event.user_end_s * 50)  # the first 20 ms window wholly after the end
        if first > 0 and active[first - 1 : first].any():
            overlapped += 1
            continue
        window = active[first : first + int(ONSET_SEARCH_S * 50)]
        if window.any():
            latencies[index] = round((first + int(np.argmax(window))) * 20 - event.user_end_s * 1000, 1)
        else:
            missed += 1
    return latencies, missed, overlapped


def with_fine_latencies(records: list[dict[str, Any]], onsets_ms: dict[int, float]) -> list[dict[str, Any]]:
    """``score``'s records (one per script event) with each reply's latency read on
    20 ms windows. Heard audio arrives at no fixed phase to the 200 ms turns the
    timeline reads it in, so a turn-read onset lands up to a turn late or early;
    whether the model took the turn is still read on turns, as offline."""
    for index, record in enumerate(records):
        if record.get("took_turn") and index in onsets_ms:
            record["latency_s"] = round(onsets_ms[index] / 1000, 3)
    return records


def timeline(peer: Peer, script: Conversation, heard: np.ndarray) -> Timeline:
    """The model's timeline as model/evaluate.py scores it, text from the transcript:
    each delta goes to the turn in which it arrived."""
    turns = script.turns
    text = [""] * turns
    start = (peer.track.started_wall or 0.0) + peer.track.lead_samples / SAMPLE_RATE
    for _, event in peer.events:
        if event.get("type") == "transcript.delta":
            wall = event["ts_ms"] / 1000
            turn = int((wall - start) / 0.2) - 1
            if 0 <= turn < turns:
                text[turn] += event["text"]
    return heard_timeline(heard, text)


def heard_timeline(heard: np.ndarray, text: list[str]) -> Timeline:
    """Output turn t is heard at 0.2·(t + 1) s, so turn t is active if the peer heard
    speech then (real latency included)."""
    turns = len(text)
    live = activity(heard[: turns * TURN_SAMPLES])
    active = np.zeros(turns, dtype=bool)
    active[:-1] = live[1:]
    # Its speech in step time (output t at 3200·t, heard 0.2 s later), for the word judge.
    return Timeline(active, text, heard[TURN_SAMPLES:])
