"""CI smoke for the load tester: real peers in worker processes against a live echo
server, 10 seconds, with bounds on continuity and latency; and how it times replies."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import running_server

from loadtest.measure import PeerResult, heard_timeline, voice_to_voice, with_fine_latencies
from loadtest.run import aggregate_level, percentile, shared_step_share
from loadtest.run import main as loadtest_main
from model.conversations import make_conversation
from model.evaluate import data_text, reference_timeline, score
from model.interface import SAMPLE_RATE, TURN_SAMPLES
from server.config import ServerConfig


def test_two_peers_for_ten_seconds(live_server, tmp_path):
    out = tmp_path / "result.json"
    result = loadtest_main(["--url", live_server.url, "--peers", "2", "--seconds", "10", "--workers", "1",
                            "--scripts", "2", "--json", str(out), "--report", str(tmp_path / "report")])
    written = json.loads(out.read_text())
    for key in ("peers", "connect_ms_p50", "server_added_ms_p50", "server_added_ms_p99", "voice_to_voice_ms_p50",
                "underruns", "deadline_miss_rate", "server_cpu_pct_per_session"):
        assert key in written, key
    assert result["peers"] == result["peers_ok"] == 2, result["errors"]
    # Continuity: every 20 ms frame arrived; the server's output ran dry in at most 1 %
    # of frames (0 on a quiet machine; a step delayed past the 20 ms playout delay by a
    # busy one costs a frame).
    assert result["concealed_frames"] == 0 and result["received_frames"] >= 2 * 10 * 50 * 0.9
    assert result["underruns"] <= 0.01 * result["received_frames"]
    assert result["deadline_miss_rate"] == 0
    # Both sessions on the engine's grid share each step: 1.0 measured here, with both
    # cores busy too; sessions that never met (docs/architecture.md) score 0.
    assert result["shared_step_share"] >= 0.5, result["shared_step_share"]
    # Latency bounds, loose enough for a busy CI machine: measured here p50 39 ms, p99 57 ms.
    assert 0 < result["server_added_ms_p50"] < 100
    assert result["server_added_ms_p99"] < 200
    assert result["connect_ms_p50"] < 3000
    # Data-channel events: a backlog (events queued behind media or a stalled SCTP
    # association) delays every event, so the median carries the bound; measured here
    # p50 ~1 ms, p99 ~3 ms, but one stall of a busy CI machine put a p99 at 102 ms.
    assert result["event_lag_ms"]["p50"] < 20
    assert result["event_lag_ms"]["p99"] < 250
    assert result["turns"] >= 2 * 10 * 5 * 0.9
    assert result["server_cpu_pct_per_session"] is not None and result["generator_cpu_pct"] > 0
    assert (tmp_path / "report" / "report.md").exists() and (tmp_path / "report" / "latency_cdf.png").exists()


def test_shared_steps_are_counted_only_while_every_peer_is_in_session():
    first = {"steps": [(0.0, 1), (200.0, 1), (400.0, 2), (600.0, 2), (800.0, 1)]}
    second = {"steps": [(390.0, 2), (590.0, 2), (790.0, 1), (990.0, 1)]}  # joined late, left last
    # Together from 390 to 800 ms: first's 400, 600, 800 and second's 390, 590, 790.
    assert shared_step_share([first, second]) == round(4 / 6, 3)
    assert shared_step_share([first, {"steps": []}]) is None


@pytest.mark.parametrize("delay_s", [0.07, 0.1, 0.13])
def test_online_reply_latency_is_read_finer_than_a_turn(delay_s):
    """A peer hears the data's own replies ``delay_s`` after they were made (server
    and network time, at no fixed phase to the 200 ms turns). The latency scored
    online must be the offline one plus that delay, to the 20 ms onset windows; read
    on turns it came out ``delay_s`` short or 0.2 - ``delay_s`` long."""
    script = make_conversation(2_000_000, held_out=True)
    offline = score(script, reference_timeline(script))
    # Output t is heard at 0.2·(t + 1) s with no delay: one turn, then the delay.
    lead = np.zeros(TURN_SAMPLES + round(delay_s * SAMPLE_RATE), dtype=np.float32)
    heard = np.concatenate([lead, script.model_audio])[: script.user_audio.size]
    onsets, missed, overlapped = voice_to_voice(script, heard)
    online = with_fine_latencies(score(script, heard_timeline(heard, data_text(script))), onsets)
    answers = [(before, after) for before, after in zip(offline, online) if before["kind"] == "answer"]
    assert answers and missed == overlapped == 0
    for before, after in answers:
        assert after["took_turn"] and after["latency_s"] == pytest.approx(before["latency_s"] + delay_s, abs=0.025)


@pytest.mark.parametrize("flag,value,said", [
    ("--peers", "0", "must be 1 or more, not 0"),
    ("--workers", "-2", "must be 1 or more, not -2"),
    ("--seconds", "nan", "must be above 0, not nan"),
    ("--jitter-prefetch", "9", "must be 8 or less, not 9"),
    ("--ramp", "4,x", "must be comma-separated whole numbers, not '4,x'"),
    ("--ramp", "8,0", "each must be 1 or more, not 0"),
])
def test_nonsense_flags_are_refused_before_anything_starts(capsys, flag, value, said):
    """Once these reached a worker process or a division, after the scripts were made
    and a server started; now argparse names the flag."""
    with pytest.raises(SystemExit):
        loadtest_main([flag, value])
    assert f"argument {flag}: {said}" in capsys.readouterr().err


def test_a_run_whose_peers_did_not_all_complete_fails_loudly(capsys):
    """Two peers against a server with room for one: the summary shows it and the
    exit status says so (a green CI step on a run of 503s would be a lie)."""
    config = ServerConfig(engine="echo", ice_host_addresses=["127.0.0.1"], max_sessions=1)
    with running_server(config) as server, pytest.raises(SystemExit) as failed:
        loadtest_main(["--url", server.url, "--peers", "2", "--seconds", "3", "--workers", "1", "--scripts", "2"])
    assert failed.value.code == 1
    captured = capsys.readouterr()
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["peers"] == 2 and summary["peers_ok"] == 1 and summary["errors"], summary
    assert "loadtest failed: not every peer completed" in captured.err


def test_peers_that_never_report_are_errors_and_percentiles_are_by_nearest_rank():
    level = aggregate_level(3, [PeerResult(0).to_dict()], None, 0.0)
    assert level["peers_ok"] == 1 and level["errors"] == ["2 of 3 peers never reported (a load worker died or timed out)"]
    assert percentile(list(range(1, 101)), 0.99) == 99 and percentile([1.0, 2.0], 0.5) == 1.0  # not the larger
    assert percentile([0.1234], 0.5) == 0.12 and percentile([0.1234], 0.5, digits=None) == 0.1234
    assert percentile([], 0.5) is None
