"""The evaluation's metrics, checked on the reference model tracks (a perfect model)
and run end to end on the random-weight engine; and the shipped model, stepped as
the evaluation steps it, still taking turns late in a session."""

from __future__ import annotations

import json
import random
import re

import numpy as np
import pytest
import torch

from loadtest.run import SCRIPT_SEED
from model import dmel
from model.config import NO_TEXT
from model.conversations import NUMBER_WORDS, OUT_POSITIONS, Conversation, Event, generate, speak
from model.evaluate import (
    Timeline,
    aggregate,
    evaluate,
    mark_heard_by_ear,
    model_timeline,
    reference_timeline,
    score,
    vocoded_timeline,
)
from model.evaluate import main as eval_main
from model.interface import SAMPLE_RATE, TURN_SAMPLES
from model.speech import Voice
from model.streaming import load_engine
from model.vocoder import LAG_SAMPLES, VocoderState, vocode_chunk
from server.config import default_checkpoint

KEYS = {"turn_taking_tor", "response_latency_s_median", "overlap_rate", "pause_tor", "stop_latency_s_p90",
        "delegation_accuracy", "delegation_request_accuracy", "delegation_result_copied", "noise_silence_rate",
        "spoken_word_accuracy", "spoken_word_accuracy_asr", "written_word_accuracy", "spoken_words_scored",
        "spoken_words_by_question"}


def test_the_reference_tracks_score_as_a_perfect_model():
    result = evaluate(None, list(range(1_000_000, 1_000_008)))
    assert KEYS <= result.keys()
    assert result["turn_taking_tor"] == 1.0 and result["overlap_rate"] == 0.0 and result["pause_tor"] == 0.0
    assert 0.1 < result["response_latency_s_median"] <= 0.45
    assert result["stop_latency_s_p90"] <= 0.4
    assert result["delegation_accuracy"] == 1.0 and result["noise_silence_rate"] == 1.0
    assert result["spoken_word_accuracy"] == 1.0  # the reference says its words in the model's voice
    assert 0.4 <= result["spoken_word_accuracy_asr"] <= 1.0  # pocketsphinx's ceiling (0.63 here)
    assert result["written_word_accuracy"] == 1.0
    assert 0 < result["spoken_words_scored"] <= result["events"]["answer"] + result["events"]["pause"]
    by_question = result["spoken_words_by_question"]
    assert set(by_question) <= {"after", "small_sum", "pause"} and len(by_question) >= 2
    assert sum(q["scored"] for q in by_question.values()) == result["spoken_words_scored"]
    assert all(q["spoken"] == 1.0 and q["written"] == 1.0 for q in by_question.values())


def test_conversations_in_the_training_voices_are_scored_alike():
    result = evaluate(None, [5_000_000, 5_000_001], held_out=False)
    assert result["voices"] == "training" and result["turn_taking_tor"] == 1.0
    assert generate([5_000_000])[0].user_audio.tobytes() != generate([5_000_000], held_out=True)[0].user_audio.tobytes()


def test_a_vocoded_stop_is_scored_when_it_is_heard_not_a_micro_turn_late():
    """The reference track through the model's own streaming vocoder: a model that
    stops exactly when the reference does. Its chunks lag their frames by LAG_SAMPLES
    (12.5 ms), and the stop must cost just that, not the 200 ms of a whole micro-turn."""
    conversation = generate([1_000_001], held_out=True)[0]  # one barge-in, at 12.5 s
    bins = dmel.dmel(torch.from_numpy(conversation.model_audio)[None])
    state, chunks = VocoderState.silence(), []
    for turn in range(conversation.turns):
        chunk, state = vocode_chunk(state, dmel.dequantize(bins[:, 16 * turn : 16 * (turn + 1)]))
        chunks.append(chunk[0].numpy())
    reference = reference_timeline(conversation)
    vocoded = vocoded_timeline(np.concatenate(chunks), reference.text)
    assert (vocoded.active != reference.active).sum() <= 2  # the vocoder smears an edge at most
    stops = [r["stop_latency_s"] for r in score(conversation, vocoded) if r["kind"] == "barge_in"]
    reference_stops = [r["stop_latency_s"] for r in score(conversation, reference) if r["kind"] == "barge_in"]
    assert len(stops) == len(reference_stops) == 1
    assert abs(stops[0] - reference_stops[0] - LAG_SAMPLES / SAMPLE_RATE) < 1e-3
    # Onsets: the same micro-turn, heard LAG_SAMPLES later.
    onsets = [r["latency_s"] for r in score(conversation, vocoded) if r["kind"] == "answer"]
    reference_onsets = [r["latency_s"] for r in score(conversation, reference) if r["kind"] == "answer"]
    assert onsets and all(abs(o - r - LAG_SAMPLES / SAMPLE_RATE) < 1e-3 for o, r in zip(onsets, reference_onsets))


def test_eval_scores_the_loadtests_own_scripts(capsys):
    """`microturn loadtest --seconds 24` plays seed 2,000,001 at 26 s: noise and three
    delegations, where the 24 s conversation of that seed has two, an answer and more
    noise. Offline and online compare only on the same conversations."""
    eval_main(["--reference", "--first-seed", str(SCRIPT_SEED + 1), "--conversations", "1", "--seconds", "26",
               "--json"])
    result = json.loads(capsys.readouterr().out)
    script = generate([SCRIPT_SEED + 1], held_out=True, duration_s=26)[0]
    assert result["seconds"] == 26
    assert result["events"] == {kind: sum(e.kind == kind for e in script.events) for kind in result["events"]}
    assert result["events"]["delegation"] == 3
    assert [e.kind for e in generate([SCRIPT_SEED + 1], held_out=True)[0].events].count("delegation") == 2


def test_heard_only_reads_the_listening_head_without_the_closed_loop(capsys):
    eval_main(["--checkpoint", str(default_checkpoint()), "--heard-only", "--training-voices",
               "--first-seed", "5000000", "--conversations", "2", "--json"])
    result = json.loads(capsys.readouterr().out)
    conversations = generate([5_000_000, 5_000_001], held_out=False)
    assert set(result) == {"heard", "conversations", "voices", "seconds"} and result["voices"] == "training"
    assert result["seconds"] == 24  # a seed's conversation depends on its length: the label says which
    assert result["heard"]["utterances"] == sum(len(c.user_words) for c in conversations) > 0
    assert 0 < result["heard"]["words_right"] <= 1  # the shipped model hears some utterances word for word
    # Per voice: each utterance with numbers counts once under its language voice and
    # once under its variant ("en-us+f3": "en-us" and "f3").
    by_voice = result["heard"]["numbers_right_by_voice"]
    assert set(by_voice) == {part for c in conversations for part in c.user_voice.split("+")}
    assert sum(v["with_numbers"] for v in by_voice.values()) == 2 * result["heard"]["with_numbers"]
    assert all(0 <= v["numbers_right"] <= 1 for v in by_voice.values())
    with pytest.raises(SystemExit):
        eval_main(["--reference", "--heard-only"])
    assert "the reference tracks have none" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        eval_main(["--heard-only"])  # random weights of a preset without the head
    assert "the random model has no listening head" in capsys.readouterr().err


def test_loss_is_the_trainings_teacher_forced_loss_without_the_closed_loop(capsys):
    """--loss: seconds, not minutes, to compare checkpoints, or a checkpoint on data it
    trained on against data it did not (how much it memorised: docs/eval.md, session 34)."""
    args = ["--loss", "--training-voices", "--first-seed", "5000000", "--conversations", "2", "--json"]
    eval_main(["--checkpoint", str(default_checkpoint()), *args])
    trained = json.loads(capsys.readouterr().out)
    eval_main(args)  # random weights
    untrained = json.loads(capsys.readouterr().out)
    assert trained["conversations"] == 2 and trained["voices"] == "training"
    assert set(trained["loss"]) == {"loss", "text", "audio", "listen"}  # the shipped model has a listening head
    assert set(untrained["loss"]) == {"loss", "text", "audio"}
    assert trained["loss"]["loss"] == pytest.approx(
        trained["loss"]["text"] + trained["loss"]["audio"] + 0.25 * trained["loss"]["listen"], abs=1e-3)
    assert trained["loss"]["text"] < untrained["loss"]["text"] / 10
    assert trained["loss"]["audio"] < untrained["loss"]["audio"]
    with pytest.raises(SystemExit):
        eval_main(["--loss", "--reference"])
    assert "--loss is a model's loss" in capsys.readouterr().err


def test_the_teacher_forced_loss_is_the_same_each_time_and_leaves_the_model_as_it_was():
    from model.evaluate import teacher_forced_loss
    from model.train import batch_loss, crop, to_example
    from model.weights import load_checkpoint

    model = load_checkpoint(default_checkpoint()).train()
    conversations = generate([5_000_000, 5_000_001], held_out=False)
    first = teacher_forced_loss(model, conversations)
    assert model.training and teacher_forced_loss(model, conversations) == first
    # One 80-micro-turn window each, placed by Random(0), at the weights of every run since session 14.
    rng = random.Random(0)
    batch = [crop(to_example(c, model.config), 80, rng) for c in conversations]
    model.eval()
    with torch.no_grad():
        _, parts = batch_loss(model, batch, history_noise=0.0, text_weight=3.0, speech_weight=2.0, listen_weight=0.25)
    assert first == {key: round(value, 4) for key, value in parts.items()}


def test_a_delegation_counts_only_if_the_model_asked_for_the_right_sum():
    """Offline the data's result is fed back whatever the model asked; live, the tool
    answers the request it wrote. A model that misheard an operand and then read out
    the data's result copied well, but would have said the wrong number live."""
    conversation = generate([SCRIPT_SEED + 1], held_out=True, duration_s=26)[0]  # three sums
    reference = reference_timeline(conversation)
    text = reference.text
    opens = next(t for t, written in enumerate(text) if "<task>" in written)  # the first request
    closes = next(t for t in range(opens, len(text)) if "</task>" in text[t])
    request = "".join(text[opens : closes + 1])
    a, op, b = re.search(r"calc: (\d+) ([+-]) (\d+)", request).groups()

    def asking(sum_: str) -> Timeline:
        """The reference, with the first request replaced by ``calc: SUM``."""
        edited = list(text)
        edited[opens : closes + 1] = [request.replace(f"{a} {op} {b}", sum_)] + [""] * (closes - opens)
        return Timeline(reference.active, edited)

    def first_delegation(timeline: Timeline) -> dict[str, object]:
        return next(r for r in score(conversation, timeline) if r["kind"] == "delegation")

    right = first_delegation(reference)
    misheard = first_delegation(asking(f"{int(a) + 1} {op} {b}"))  # an operand misheard
    assert right["request_right"] and right["copied"] and right["answered"]
    assert misheard["copied"] and not misheard["request_right"] and not misheard["answered"]
    # The eval lists each wrong request beside the right one, to read what was misheard.
    assert aggregate(score(conversation, reference))["delegation_misses"] == []
    misses = aggregate(score(conversation, asking(f"{int(a) + 1} {op} {b}")))["delegation_misses"]
    assert misses == [{"seed": conversation.seed, "user_end_s": misheard["user_end_s"],
                       "wanted": f"calc: {a} {op} {b}", "asked": f"calc: {int(a) + 1} {op} {b}"}]
    if op == "+":  # the tool answers the sum, whatever its order
        assert first_delegation(asking(f"{b} + {a}"))["answered"]


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


def test_the_stop_p90_is_by_nearest_rank_and_null_when_a_tenth_never_stopped():
    def p90(stops: list[float | None]) -> float | None:
        return aggregate([{"kind": "barge_in", "stop_latency_s": s} for s in stops])["stop_latency_s_p90"]

    tenths = [round(0.1 * i, 1) for i in range(1, 12)]
    assert p90(tenths[:10]) == 0.9  # 9 of 10 at or below it
    assert p90(tenths[:9] + [None]) == 0.9  # one never stopped: still 9 of 10 stopped by 0.9 s
    assert p90(tenths + [None, None]) is None  # 2 of 13 never: a tenth did not stop at all
    assert p90([0.2, 0.3]) == 0.3 and p90([0.2]) == 0.2  # a few: the largest, not the smallest
    assert p90([]) is None


def test_the_written_word_is_judged_apart_from_the_spoken_one():
    """Saying the right word while writing a wrong one: heard right, written wrong."""
    conversation = generate([1_000_000], held_out=True)[0]  # four one-number answers
    timeline = reference_timeline(conversation)
    timeline.text = [re.sub(r"[a-z]+", lambda word: "x" + word[0], text) for text in timeline.text]
    answers = [r["heard"] for r in score(conversation, timeline) if r.get("heard")]
    assert len(answers) == 4 and all(h["right"] and not h["written_right"] for h in answers)


def test_the_random_model_runs_through_the_evaluation_and_draws_its_timeline(tmp_path):
    result = evaluate(load_engine(max_sessions=1), [1_000_002], plots=tmp_path)
    assert KEYS <= result.keys() and result["conversations"] == 1
    assert result["delegation_copying"]["answers"] == 1 and result["delegation_copying"]["digits"] == 2  # 't1: 87'
    assert result["answers_teacher_forced"]["request"]["scored"] == 1  # its one delegation (model/answering.py)
    png = (tmp_path / "1000002.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and b"IEND" in png[-12:]


def test_without_probes_the_closed_loop_scores_alike(capsys):
    """``--no-probes`` (conversations of minutes): the closed loop's figures and
    records as with the probes, the teacher-forced ones left out."""
    engine = load_engine(max_sessions=1)
    full = evaluate(engine, [1_000_002], keep_records=True)
    loop = evaluate(engine, [1_000_002], keep_records=True, probes=False)
    probes = {"delegation_copying", "answers_teacher_forced", "heard"}  # heard: with a listening head
    assert probes - {"heard"} <= full.keys() and not probes & loop.keys()
    assert {key: full[key] for key in KEYS} == {key: loop[key] for key in KEYS}
    for record in full["records"]:
        record.get("heard", {}).pop("by_ear", None)  # the listening probe's mark
    assert full["records"] == loop["records"]
    with pytest.raises(SystemExit):
        eval_main(["--loss", "--no-probes"])
    assert "--no-probes is for the closed loop" in capsys.readouterr().err


def test_the_word_judge_hears_the_word_through_the_vocoder_and_not_a_wrong_one():
    """What a perfect model could say at best — the word in its voice, quantised to dMel
    and re-synthesised by the streaming vocoder — is judged right; another word,
    another voice's garble or silence is not."""
    import torch

    from model import dmel
    from model.conversations import MODEL_VOICE, speak
    from model.recognise import nearest_word
    from model.vocoder import VocoderState, vocode_chunk

    def vocoded(audio: np.ndarray) -> np.ndarray:
        audio = np.concatenate([audio, np.zeros(-audio.size % 3200 + 3200, np.float32)])
        mel = dmel.dequantize(dmel.dmel(torch.from_numpy(audio)[None]))
        state, out = VocoderState.silence(), []
        for start in range(0, mel.shape[1], 16):
            voice, state = vocode_chunk(state, mel[:, start : start + 16])
            out.append(voice[0].numpy())
        return np.concatenate(out)

    words = ["one", "two", "three", "seven", "eight", "twelve", "seventeen"]
    for word in ("seven", "twelve"):
        assert nearest_word(vocoded(speak(f"{word}.", MODEL_VOICE) * 0.5), words) == word
    assert nearest_word(vocoded(speak("three.", MODEL_VOICE) * 0.5), words) != "seven"
    assert nearest_word(np.zeros(16000, np.float32), words) == ""


def test_the_shipped_model_answers_as_readily_late_in_a_session_as_early():
    """Two sessions of six questions, one every 4 s, the same numbers in reverse order.
    Trained on 8 s windows but served attending over 25.6 s, the model fell silent for
    good once a session outgrew its training windows (the questions at 17 s and 21 s
    went unanswered); the served window now matches what it was trained on
    (docs/eval.md, session 10). A take-over rate of 0.98 still misses a question now
    and then (run 22 lets "after eight" at 21 s pass in the first order, and takes it
    at 1 s and 17 s): one miss of twelve is allowed, never both late ones of a session."""
    checkpoint = default_checkpoint()
    assert checkpoint is not None, "checkpoints/tiny is missing"
    voice = Voice("en-us+m1", words_per_minute=160)  # a training voice, as in the browser test
    turns, starts = 120, [1.0, 5.0, 9.0, 13.0, 17.0, 21.0]
    engine = load_engine(checkpoint, max_sessions=1)  # each session starts from a freshly reset slot
    answered = []
    for numbers in ([7, 3, 11, 5, 14, 8], [8, 14, 5, 11, 3, 7]):
        user = np.zeros(turns * TURN_SAMPLES, np.float32)
        events = []
        for start_s, n in zip(starts, numbers, strict=True):
            audio = speak(f"what comes after {NUMBER_WORDS[n]}?", voice)
            at = int(start_s * SAMPLE_RATE)
            user[at : at + audio.size] = 0.3 * audio / np.abs(audio).max()
            events.append(Event("answer", (at + audio.size) / SAMPLE_RATE, NUMBER_WORDS[n + 1], user_start_s=start_s))
        conversation = Conversation(0, user, np.zeros_like(user), [""] * turns,
                                    np.full((turns, OUT_POSITIONS), NO_TEXT), events)
        records = score(conversation, model_timeline(engine, conversation))
        assert not any(record["spoke_over"] for record in records)
        took = [bool(record["took_turn"]) for record in records]
        assert took[-2] or took[-1], f"silent from 16 s on: {list(zip(starts, took))}"
        answered += [(numbers[i], starts[i], took[i]) for i in range(len(starts))]
    assert sum(not took for _, _, took in answered) <= 1, answered


def test_a_negative_first_seed_is_refused_not_replayed(capsys):
    """Seed -1,000,000 would replay held-out seed 1,000,000 (random.Random takes |seed|)."""
    with pytest.raises(SystemExit):
        eval_main(["--first-seed", "-1000000"])
    assert "argument --first-seed: must be 0 or more, not -1000000" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["7", "0", "nan", "half"])
def test_a_write_threshold_that_is_no_probability_is_refused(capsys, value):
    """At 0 the model would always write, above 1 never; 'greedy' is the other choice."""
    with pytest.raises(SystemExit):
        eval_main(["--write-threshold", value])
    assert (f"argument --write-threshold: 'greedy' or a probability between 0 and 1 (exclusive), not '{value}'"
            in capsys.readouterr().err)


def test_answers_are_split_by_whether_the_ear_heard_the_question():
    """A wrong answer to a question the listening head read right is the skill's fault;
    to one it misread, the ear's (session 33: V8 wrote "after N" right 0.87 of the time
    when it heard N, and a small sum 1 time in 18)."""
    def answer(end_s: float, written_right: bool) -> dict[str, object]:
        return {"kind": "answer", "seed": 7, "user_end_s": end_s, "question": "after", "spoke_over": False,
                "took_turn": True, "latency_s": 0.3,
                "heard": {"right": written_right, "written_right": written_right, "right_asr": None}}

    said = ["what", "comes", "after", "seven"]
    reads = {7: [(2.0, said, said), (5.0, said[:3] + ["nine"], said[:3] + ["five"]), (8.0, ["hello"], [])]}
    records = [answer(2.0, True), answer(5.0, False), answer(5.0, True), answer(11.0, False)]
    mark_heard_by_ear(records, reads)
    assert [r["heard"].get("by_ear") for r in records] == [True, False, False, None]  # 11 s: no such utterance
    after = aggregate(records)["spoken_words_by_question"]["after"]
    assert after["scored"] == 4 and after["written"] == 0.5
    assert after["by_ear_scored"] == 3 and after["heard_by_ear"] == 0.333
    assert after["written_when_heard"] == 1.0 and after["written_when_misheard"] == 0.5
    assert "heard_by_ear" not in aggregate([answer(2.0, True)])["spoken_words_by_question"]["after"]  # no ear: no split
