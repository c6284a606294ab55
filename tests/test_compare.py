"""``microturn compare``: two runs' events paired on the same conversations, scored by
the evaluation itself (the reference track, a model that never speaks, one that always
does), and the sign test on where they differ."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from model.compare import HEADLINE, OUTCOMES, compare, load, pooled, sign_test
from model.compare import main as compare_main
from model.conversations import generate
from model.evaluate import Timeline, aggregate, reference_timeline, score, write_records
from model.evaluate import main as eval_main
from model.interface import TURN_SAMPLES


def test_the_sign_test_is_the_exact_binomial_tail_both_ways():
    assert sign_test(0, 0) == 1.0
    assert sign_test(3, 3) == 1.0
    assert sign_test(10, 0) == sign_test(0, 10) == 2 / 1024
    assert sign_test(1, 5) == 2 * (1 + 6) / 64
    assert sign_test(2, 8) == 2 * (1 + 10 + 45) / 1024  # 0.109: not yet unlikely
    assert sign_test(20, 5) < 0.01


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    """Three behaviours on two held-out conversations, one records file per conversation."""
    folder = tmp_path_factory.mktemp("records")
    files: dict[str, list[Path]] = {"reference": [], "mute": [], "chatty": []}
    for conversation in generate([1_000_000, 1_000_001], held_out=True):
        turns = conversation.turns
        silence = np.zeros(turns * TURN_SAMPLES, dtype=np.float32)  # so its answers are scored, as wrong
        timelines = {"reference": reference_timeline(conversation),
                     "mute": Timeline(np.zeros(turns, dtype=bool), [""] * turns, silence),
                     "chatty": Timeline(np.ones(turns, dtype=bool), [""] * turns, silence)}
        for name, timeline in timelines.items():
            records = score(conversation, timeline)
            path = folder / f"{name}-{conversation.seed}.json"
            write_records(path, name, {"voices": "held-out", "seconds": 24.0, "conversations": 1}, records)
            files[name].append(path)
    return files


def test_a_model_that_never_speaks_loses_every_answer_and_wins_nothing(runs):
    result = compare(load(runs["reference"]), load(runs["mute"]))
    events = aggregate([r for path in runs["reference"] for r in json.loads(path.read_text())["records"]])["events"]
    assert events["answer"] >= 2 and events["delegation"] >= 1  # enough to read
    took = result["turn_taking_tor"]
    assert took["events"] == events["answer"] and (took["base"], took["new"]) == (1.0, 0.0)
    assert (took["only_base"], took["only_new"]) == (events["answer"], 0)
    assert took["p"] == round(sign_test(events["answer"], 0), 4)
    assert result["delegation_accuracy"]["only_base"] == events["delegation"]
    assert result["pause_tor"]["only_base"] == result["pause_tor"]["only_new"] == 0  # neither speaks into a pause
    assert result["response_latency_s"]["events"] == 0  # the mute one never replies
    words = result["written_word_accuracy"]
    assert words["events"] >= 4 and words["only_base"] == words["events"] and words["only_new"] == 0
    reference, mute = pooled(load(runs["reference"])), pooled(load(runs["mute"]))
    assert (reference["turn_taking_tor"], mute["turn_taking_tor"]) == (1.0, 0.0)
    assert mute["response_latency_s_median"] is None and reference["response_latency_s_median"] > 0
    assert reference["events"] == mute["events"] == events  # both files of a side, pooled


def test_a_model_that_always_speaks_is_worse_at_pauses_the_lower_is_better_way(runs, capsys):
    compare_main(["--base", *map(str, runs["reference"]), "--new", *map(str, runs["chatty"]), "--json"])
    result = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
    assert set(OUTCOMES) <= result.keys()
    pauses = result["pause_tor"]
    assert pauses["events"] >= 3 and (pauses["base"], pauses["new"]) == (0.0, 1.0)
    assert (pauses["only_base"], pauses["only_new"]) == (0, pauses["events"])
    compare_main(["--base", *map(str, runs["reference"]), "--new", *map(str, runs["chatty"])])
    table = capsys.readouterr().out
    assert "| pause_tor |" in table and "|" in table.splitlines()[-1]
    assert result["pooled"]["new"]["pause_tor"] == 1.0 and result["pooled"]["base"]["pause_tor"] == 0.0
    lines = table.splitlines()
    assert lines.index("| pause_tor | 0.0 | 1.0 |") < lines.index("| outcome | events | base | new | only base | only new | p |")
    # It talks through every barge-in: no stop to take a p90 of, null as eval --json has it (not Infinity).
    assert result["pooled"]["new"]["events"]["barge_in"] >= 1
    assert result["pooled"]["new"]["stop_latency_s_p90"] is None and result["pooled"]["base"]["stop_latency_s_p90"] > 0
    if pauses["p"] < 0.05:
        assert "(new worse)" in next(line for line in table.splitlines() if line.startswith("| pause_tor |"))


def test_the_same_run_on_both_sides_differs_nowhere(runs):
    result = compare(load(runs["reference"]), load(runs["reference"]))
    assert all(row.get("only_base", 0) == row.get("only_new", 0) == 0 for row in result.values())
    assert all(row["p"] == 1.0 for row in result.values())


def test_each_paired_rate_is_the_rate_eval_reports_for_that_side(runs):
    """The pairing reads every rate as ``microturn eval`` does: over the events both
    sides have (here all of them), each side's rate is its pooled figure."""
    for base, new in (("reference", "mute"), ("chatty", "reference")):
        result = compare(load(runs[base]), load(runs[new]))
        figures = pooled(load(runs[base])), pooled(load(runs[new]))
        for name in OUTCOMES:
            assert (result[name]["base"], result[name]["new"]) == (figures[0][name], figures[1][name]), name
    assert {"delegation_result_copied", "spoken_word_accuracy"} <= set(OUTCOMES)


def test_a_span_pairs_only_the_events_whose_user_stopped_within_it(runs, capsys):
    everything = load(runs["reference"])
    ends = sorted(key[4] for key in everything)
    middle = ends[len(ends) // 2]
    compare_main(["--base", *map(str, runs["reference"]), "--new", *map(str, runs["mute"]), "--json",
                  "--span", "0", str(middle)])
    early = json.loads(capsys.readouterr().out)
    compare_main(["--base", *map(str, runs["reference"]), "--new", *map(str, runs["mute"]), "--json",
                  "--span", str(middle), "1e9"])
    late = json.loads(capsys.readouterr().out)
    for name in OUTCOMES:  # the two spans split every outcome's events between them
        whole = compare(everything, load(runs["mute"]))[name]["events"]
        assert early[name]["events"] + late[name]["events"] == whole, name
    assert sum(early["pooled"]["base"]["events"].values()) == sum(key[4] < middle for key in everything)
    assert 0 < sum(late["pooled"]["base"]["events"].values()) < len(everything)
    with pytest.raises(SystemExit):
        compare_main(["--base", str(runs["reference"][0]), "--new", str(runs["mute"][0]), "--span", "5", "5"])
    assert "an empty span" in capsys.readouterr().err


def test_runs_on_different_conversations_are_refused_with_the_reason(runs, capsys):
    with pytest.raises(SystemExit):
        compare_main(["--base", str(runs["reference"][0]), "--new", str(runs["mute"][1])])
    assert "not evaluated on the same conversations" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        compare_main(["--base", str(runs["reference"][0]), str(runs["reference"][0]), "--new", str(runs["mute"][0])])
    assert "more than one file of a side" in capsys.readouterr().err


def test_a_file_that_is_not_records_is_refused(tmp_path, capsys):
    (tmp_path / "result.json").write_text(json.dumps({"turn_taking_tor": 1.0}))  # an eval --json, not --records
    (tmp_path / "torn.json").write_text(json.dumps({"voices": "held-out", "seconds": 24.0, "records": [{"seed": 1}]}))
    for name in ("result.json", "torn.json", "absent.json"):
        with pytest.raises(SystemExit):
            compare_main(["--base", str(tmp_path / name), "--new", str(tmp_path / name)])
        assert "not a `microturn eval --records` file" in capsys.readouterr().err
    answer = {"seed": 1, "kind": "answer", "user_end_s": 2.0}  # matched, but nothing to score it by
    (tmp_path / "bare.json").write_text(json.dumps({"voices": "held-out", "seconds": 24.0, "records": [answer]}))
    with pytest.raises(SystemExit):
        compare_main(["--base", str(tmp_path / "bare.json"), "--new", str(tmp_path / "bare.json")])
    assert "a record has no 'took_turn'" in capsys.readouterr().err


def test_eval_writes_records_that_pair_with_themselves(tmp_path, capsys):
    """The command line end to end, on the reference tracks of one conversation."""
    eval_main(["--reference", "--first-seed", "1000001", "--conversations", "1", "--records", str(tmp_path / "r.json"),
               "--json"])
    result = json.loads(capsys.readouterr().out)
    assert "records" not in result  # they go to the file, not into the summary
    written = json.loads((tmp_path / "r.json").read_text())
    assert written["checkpoint"] == "reference" and written["voices"] == "held-out"
    assert len(written["records"]) == sum(result["events"].values())
    assert compare(load([tmp_path / "r.json"]), load([tmp_path / "r.json"]))["turn_taking_tor"]["base"] == 1.0
    compare_main(["--base", str(tmp_path / "r.json"), "--new", str(tmp_path / "r.json"), "--json"])
    figures = json.loads(capsys.readouterr().out)["pooled"]["base"]
    assert {name: figures[name] for name in HEADLINE} == {name: result[name] for name in HEADLINE}  # the file holds all
    with pytest.raises(SystemExit):
        eval_main(["--loss", "--records", str(tmp_path / "x.json")])
    assert "--records are the closed loop's" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        eval_main(["--reference", "--records", str(tmp_path / "no" / "x.json")])
    assert "no folder" in capsys.readouterr().err
