"""The evaluation's metrics, checked on the reference model tracks (a perfect model)
and run end to end on the random-weight engine."""

from __future__ import annotations

import numpy as np

from model.conversations import generate
from model.evaluate import Timeline, evaluate, reference_timeline, score
from model.streaming import load_engine

KEYS = {"turn_taking_tor", "response_latency_s_median", "overlap_rate", "pause_tor", "stop_latency_s_p90",
        "delegation_accuracy", "noise_silence_rate"}


def test_the_reference_tracks_score_as_a_perfect_model():
    result = evaluate(None, list(range(1_000_000, 1_000_008)))
    assert KEYS <= result.keys()
    assert result["turn_taking_tor"] == 1.0 and result["overlap_rate"] == 0.0 and result["pause_tor"] == 0.0
    assert 0.1 < result["response_latency_s_median"] <= 0.45
    assert result["stop_latency_s_p90"] <= 0.4
    assert result["delegation_accuracy"] == 1.0 and result["noise_silence_rate"] == 1.0


def test_the_metrics_notice_a_model_that_talks_all_the_time_or_never():
    conversation = generate([1_000_001], held_out=True)[0]
    chatty = Timeline(np.ones(conversation.turns, dtype=bool), [""] * conversation.turns)
    mute = Timeline(np.zeros(conversation.turns, dtype=bool), [""] * conversation.turns)
    loud, quiet = score(conversation, chatty), score(conversation, mute)
    assert all(r["spoke_over"] for r in loud if "spoke_over" in r)
    assert not any(r.get("silent", False) for r in loud)
    assert all(r["stop_latency_s"] is None for r in loud if r["kind"] == "barge_in")
    assert not any(r["took_turn"] for r in quiet if "took_turn" in r)
    assert all(r.get("answered", False) is False for r in quiet if r["kind"] == "delegation")
    reference = score(conversation, reference_timeline(conversation))
    assert all(r["took_turn"] for r in reference if r["kind"] == "answer")


def test_the_random_model_runs_through_the_evaluation_and_draws_its_timeline(tmp_path):
    result = evaluate(load_engine(max_sessions=1), [1_000_002], plots=tmp_path)
    assert KEYS <= result.keys() and result["conversations"] == 1
    png = (tmp_path / "1000002.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and b"IEND" in png[-12:]
