"""Evaluation on held-out conversations, from the model's own output timeline.

The model runs closed-loop, exactly as it serves: one ``StreamingModel.step`` per
micro-turn on the conversation's user audio, its own outputs fed back. Background
results enter on the conversation's schedule (an oracle background model, so the
figures measure the interaction model alone). From what it says and writes:

- ``turn_taking_tor``: questions after which it starts speaking within 1.4 s;
- ``response_latency_s_median``: user speech end -> its speech onset, as heard live
  (output turn ``t`` plays at 0.2·(t + 1) s, its audio the vocoder's ``LAG_SAMPLES`` later);
- ``overlap_rate``: questions it spoke over (from the question's start to its end);
- ``pause_tor``: questions with a mid-utterance pause that it took over before the end;
- ``stop_latency_s_p90``: user barge-in onset -> its speech stopping, live;
- ``delegation_accuracy``: delegated questions for which it asked the tool for the
  right thing and then wrote the result (``delegation_request_accuracy`` and
  ``delegation_result_copied``: each half alone; the result fed back is the data's
  whatever it asked, so copying alone would count a misheard sum as right);
- ``delegation_copying``: teacher forced, the answer digits it predicts right and
  the share that change when the result's digits do (model/copying.py);
- ``noise_silence_rate``: stretches of noise or background talk it stayed silent through;
- ``spoken_word_accuracy``: one-word number answers whose first 1.2 s of speech
  is nearest (DTW, model/recognise.py) to the right word in the model's voice;
  ``spoken_word_accuracy_asr``: the same judged by pocketsphinx (closed vocabulary;
  with ``--reference``, its ceiling);
  ``written_word_accuracy``: the same answers whose first word in its text stream
  is right — choosing the word, apart from voicing it;
- ``heard``: for a checkpoint with a listening head (model/listening.py), teacher
  forced, the user's utterances it read right word for word, and those with
  numbers whose numbers it read right — hearing, apart from answering;
- ``answers_teacher_forced``: per kind of number answer and for task requests, teacher
  forced, the first byte and the whole word it would write, fed its own voice as the
  reference has it and as its head renders it — the skill, apart from the loop
  (model/answering.py).

``reference_timeline`` scores the conversation's own model track — what a perfect
model would do — which is how the metric code itself is tested.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from model import listening, recognise
from model.answering import answer_probe
from model.arguments import at_least, lexicon_file, positive, write_threshold
from model.audio import require_pyav, resampler
from model.conversations import NUMBER_WORDS, Conversation, Event, generate, turn_at
from model.copying import copy_probe
from model.interaction import InteractionModel
from model.interface import SAMPLE_RATE, TURN_SAMPLES, TurnInput
from model.plot import timeline_image, write_png
from model.streaming import StreamingModel, load_engine
from model.text import Decoder
from model.train import batch_loss, crop, listened_states, teacher_forced_layers, to_example
from model.vocoder import LAG_SAMPLES
from server.tasks import TaskRequestParser
from server.tools import ToolError, calculate, default_tools

ACTIVE_RMS = 0.01  # a micro-turn of model audio louder than this is speech
REPLY_WINDOW_TURNS = 7  # 1.4 s
WORD_SECONDS = 1.2  # the stretch of a reply the recogniser hears
SERVED_TOOLS = tuple(default_tools())  # the tools a server has without an LLM: requests parse as there


@dataclass
class Timeline:
    """The model's side of a conversation, one entry per output micro-turn."""

    active: np.ndarray  # (turns,) bool
    text: list[str]  # what it wrote in each micro-turn
    audio: np.ndarray | None = None  # its speech in step time (output t at 3200·t), for the recogniser
    lag_s: float = 0.0  # how much later than 0.2·(t + 1) output t is heard (the vocoder's lag)


def activity(audio: np.ndarray, window: int = TURN_SAMPLES) -> np.ndarray:
    """Per window (default: per micro-turn), whether the audio in it is speech."""
    count = audio.size // window
    frames = audio[: count * window].reshape(count, window)
    return np.sqrt(np.mean(np.square(frames), axis=1)) > ACTIVE_RMS


def data_text(conversation: Conversation) -> list[str]:
    """What the conversation's own model track writes, per micro-turn."""
    decoder = Decoder()
    return [decoder.decode([int(t) for t in row]) for row in conversation.text_out]


def reference_timeline(conversation: Conversation) -> Timeline:
    return Timeline(activity(conversation.model_audio), data_text(conversation), conversation.model_audio)


def model_timeline(engine: StreamingModel, conversation: Conversation, session_id: str = "eval") -> Timeline:
    engine.open_session(session_id)
    try:
        audio, text = [], []
        for turn in range(conversation.turns):
            chunk = conversation.user_audio[turn * TURN_SAMPLES : (turn + 1) * TURN_SAMPLES]
            output = engine.step([TurnInput(session_id, turn, chunk, conversation.text_in[turn])])[0]
            audio.append(output.audio)
            text.append(output.text)
    finally:
        engine.close_session(session_id)
    return vocoded_timeline(np.concatenate(audio), text)


def vocoded_timeline(emitted: np.ndarray, text: list[str]) -> Timeline:
    """The timeline of audio as the vocoder emitted it, output after output.

    Each output's audio comes ``LAG_SAMPLES`` late (model/vocoder.py): its chunk opens
    with the end of the output before. Read as it came, the first silent output after
    speech counted as speaking, which put a stop after a mid-word cut-off (most
    barge-ins) a micro-turn late; so activity is read on the audio moved back into
    step time, and the lag is added to the times as heard instead."""
    speech = np.concatenate([emitted[LAG_SAMPLES:], np.zeros(LAG_SAMPLES, dtype=emitted.dtype)])
    return Timeline(activity(speech), text, speech, lag_s=LAG_SAMPLES / SAMPLE_RATE)


def _question_turn(event: Event) -> int:
    return turn_at(event.user_start_s if event.user_start_s is not None else event.user_end_s)


def _delegation(event: Event, following: Event | None, wanted_text: list[str],
                timeline: Timeline) -> dict[str, object]:
    """Did it ask for the right thing, and say the result after asking? Both are read
    from the question's start to the next delegated question's start; requests are
    parsed as the server parses them."""
    span = slice(_question_turn(event), _question_turn(following) if following is not None else None)
    written = "".join(timeline.text[span])
    asked = TaskRequestParser("calc", SERVED_TOOLS).feed(written)
    wanted = TaskRequestParser("calc", SERVED_TOOLS).feed("".join(wanted_text[span]))
    after = written.partition("</task>")[2] if asked else written
    copied = re.search(rf"(?<![\d.:-]){re.escape(event.expected_text)}(?![\d:])", after) is not None
    request_right = bool(asked and wanted) and _same_request(asked[0], wanted[0])
    return {"copied": copied, "request_right": request_right, "answered": copied and request_right,
            "asked": ": ".join(asked[0]) if asked else None, "wanted": ": ".join(wanted[0]) if wanted else None}


def _same_request(asked: tuple[str, str], wanted: tuple[str, str]) -> bool:
    """Whether the server's tool would answer both (tool, input) alike: a sum of the
    same value (``71 + 57`` for ``57 + 71``); for the clock, the tool alone (the
    data's time is its own)."""
    if asked[0] != wanted[0]:
        return False
    if asked[0] != "calc":
        return True
    try:
        return calculate(asked[1]) == calculate(wanted[1])
    except ToolError:
        return False


def score(conversation: Conversation, timeline: Timeline) -> list[dict[str, object]]:
    """One record per event: what the model did there."""
    records = []
    wanted_text = data_text(conversation)
    delegations = [e for e in conversation.events if e.kind == "delegation"]
    for event in conversation.events:
        record: dict[str, object] = {"kind": event.kind, "user_end_s": round(event.user_end_s, 3),
                                     "seed": conversation.seed}
        if event.kind in ("answer", "pause", "delegation"):
            record.update(_reply(event, timeline))
        if event.kind in ("answer", "pause") and event.expected_text in NUMBER_WORDS:
            record["heard"] = _heard(event, timeline)
            record["question"] = event.question or event.kind  # a pause's question is its own kind
        if event.kind == "barge_in":
            record.update(_stop(event, timeline))
        if event.kind == "delegation":
            # The result fed back offline is the data's, whatever the model asked for;
            # live, the background tool answers the request it wrote. So a delegation
            # is right only if the request was too (session 11).
            later = delegations[delegations.index(event) + 1 :]
            record.update(_delegation(event, later[0] if later else None, wanted_text, timeline))
        if event.kind == "noise":
            quiet = timeline.active[max(turn_at(event.user_end_s - 1.0), 0) : turn_at(event.user_end_s) + 2]
            record["silent"] = not quiet.any()
        records.append(record)
    return records


def _reply(event: Event, timeline: Timeline) -> dict[str, object]:
    end_turn = turn_at(event.user_end_s)  # outputs from this one on come after the user stopped
    start = turn_at(event.user_start_s) + 1 if event.user_start_s is not None else max(end_turn - 5, 0)
    spoke_over = bool(timeline.active[start:end_turn].any())
    window = timeline.active[end_turn : end_turn + REPLY_WINDOW_TURNS]
    onset = int(np.argmax(window)) + end_turn if window.any() else None
    latency = round(0.2 * (onset + 1) + timeline.lag_s - event.user_end_s, 3) if onset is not None else None
    return {"spoke_over": spoke_over, "took_turn": onset is not None, "latency_s": latency}


def _heard(event: Event, timeline: Timeline) -> dict[str, object] | None:
    """Which word the reply is (None: no audio kept). No reply counts as wrong."""
    if timeline.audio is None:
        return None
    end_turn = turn_at(event.user_end_s)
    window = timeline.active[end_turn : end_turn + REPLY_WINDOW_TURNS]
    heard: dict[str, object] = {"expected": event.expected_text, "dtw": "", "asr": None}
    words = re.findall(r"[a-z]+", "".join(timeline.text[end_turn : end_turn + REPLY_WINDOW_TURNS]).lower())
    heard["written"] = words[0] if words else ""
    heard["written_right"] = heard["written"] == event.expected_text
    if window.any():
        start = (end_turn + int(np.argmax(window))) * TURN_SAMPLES
        reply = timeline.audio[start : start + int(WORD_SECONDS * SAMPLE_RATE)]
        heard["dtw"] = recognise.nearest_word(reply, NUMBER_WORDS)
        if recognise.available():
            heard["asr"] = recognise.recognise(reply, NUMBER_WORDS)
    heard["right"] = heard["dtw"] == event.expected_text
    heard["right_asr"] = heard["asr"] == event.expected_text if recognise.available() else None
    return heard


def _stop(event: Event, timeline: Timeline) -> dict[str, object]:
    onset_turn = turn_at(event.user_end_s)  # for barge-in, user_end_s is when the user cut in
    after = timeline.active[onset_turn:]
    silent = np.flatnonzero(~after)
    if not silent.size:
        return {"stop_latency_s": None}
    stop_turn = onset_turn + int(silent[0])
    return {"stop_latency_s": round(0.2 * (stop_turn + 1) + timeline.lag_s - event.user_end_s, 3)}


def rate(items: list[dict[str, object]], key: str) -> float | None:
    """The share of ``items`` whose ``key`` is true (None: no items)."""
    return round(sum(bool(r[key]) for r in items) / len(items), 3) if items else None


# Each rate read one event at a time: the kind of event it is read on, and the yes or
# no each such record holds. Defined once: ``aggregate`` and ``microturn compare``'s
# event-by-event pairing (model/compare.py) both read them from here.
EVENT_RATES: dict[str, tuple[str, str]] = {
    "turn_taking_tor": ("answer", "took_turn"),
    "pause_tor": ("pause", "spoke_over"),  # pauses it spoke into: lower is better
    "delegation_accuracy": ("delegation", "answered"),
    "delegation_request_accuracy": ("delegation", "request_right"),
    "delegation_result_copied": ("delegation", "copied"),
    "noise_silence_rate": ("noise", "silent"),
}
# ... and those read off the number answers scored for words (a record's ``heard``).
WORD_RATES: dict[str, str] = {"spoken_word_accuracy": "right", "written_word_accuracy": "written_right"}


def nearest_rank(ordered: list[float], q: float) -> float:
    """The ``q`` quantile of sorted values by nearest rank: the smallest value with at
    least a fraction ``q`` of them at or below it (so with 2 of 13 stops never made, the
    p90 is "never", not the 11th stop)."""
    return ordered[max(0, math.ceil(round(q * len(ordered), 9)) - 1)]


def aggregate(records: list[dict[str, object]]) -> dict[str, object]:
    def of(kind: str) -> list[dict[str, object]]:
        return [r for r in records if r["kind"] == kind]

    def event_rate(name: str) -> float | None:
        kind, key = EVENT_RATES[name]
        return rate(of(kind), key)

    answers = of("answer")
    latencies = [r["latency_s"] for r in answers if r["latency_s"] is not None]
    heard: list[dict[str, object]] = []
    by_question: dict[str, list[dict[str, object]]] = {}
    for r in records:
        if r.get("heard") is not None:
            heard.append(r["heard"])
            by_question.setdefault(r["question"], []).append(r["heard"])
    stops = [r["stop_latency_s"] for r in of("barge_in")]
    stops_known = sorted(s if s is not None else float("inf") for s in stops)
    p90 = nearest_rank(stops_known, 0.9) if stops_known else None
    return {
        "turn_taking_tor": event_rate("turn_taking_tor"),
        "response_latency_s_median": round(statistics.median(latencies), 3) if latencies else None,
        "overlap_rate": rate(answers + of("pause") + of("delegation"), "spoke_over"),
        "pause_tor": event_rate("pause_tor"),
        "stop_latency_s_p90": None if p90 == float("inf") else p90,  # None: it never stopped in the worst decile
        "delegation_accuracy": event_rate("delegation_accuracy"),
        "delegation_request_accuracy": event_rate("delegation_request_accuracy"),
        "delegation_result_copied": event_rate("delegation_result_copied"),
        # Each wrong request, to read what was misheard (session 24: mostly one number word).
        "delegation_misses": [{key: r[key] for key in ("seed", "user_end_s", "wanted", "asked")}
                              for r in of("delegation") if not r["request_right"]],
        "noise_silence_rate": event_rate("noise_silence_rate"),
        "spoken_word_accuracy": rate(heard, WORD_RATES["spoken_word_accuracy"]),
        "spoken_word_accuracy_asr": rate([h for h in heard if h["right_asr"] is not None], "right_asr"),
        "written_word_accuracy": rate(heard, WORD_RATES["written_word_accuracy"]),
        "spoken_words_scored": len(heard),  # the three rates above are over these (to pool runs)
        # The same by question: a sum of two heard numbers, the next number, the next
        # number after a pause (session 29: V8 wrote 1 sum in 36 right, 0.64-0.75 of the others).
        # And split by what the listening head read off the question (``by_ear``, when
        # the model has one): written right when its ear heard the numbers, and when not.
        "spoken_words_by_question": {
            question: {"scored": len(items), "spoken": rate(items, "right"), "written": rate(items, "written_right"),
                       **_by_ear(items)}
            for question, items in sorted(by_question.items())},
        "events": {kind: len(of(kind)) for kind in ("answer", "pause", "barge_in", "delegation", "noise")},
    }


def _by_ear(items: list[dict[str, object]]) -> dict[str, object]:
    marked = [h for h in items if "by_ear" in h]
    if not marked:
        return {}
    heard = [h for h in marked if h["by_ear"]]
    return {"by_ear_scored": len(marked), "heard_by_ear": rate(marked, "by_ear"),  # counts to pool runs
            "written_when_heard": rate(heard, "written_right"),
            "written_when_misheard": rate([h for h in marked if not h["by_ear"]], "written_right")}


def evaluate(engine: StreamingModel | None, seeds: list[int], plots: Path | None = None,
             held_out: bool = True, duration_s: float = 24.0, keep_records: bool = False,
             probes: bool = True) -> dict[str, object]:
    """Scores over held-out conversations; ``engine=None`` scores the reference tracks.
    With ``plots``, writes each conversation's timeline there as ``SEED.png``. With
    ``held_out=False`` the users speak in the training voices (use seeds beyond the
    training range): what is left of the gap is the skill, not hearing new voices.
    A seed's conversation depends on ``duration_s`` too. ``keep_records`` adds
    ``records``: what the model did at each event, for ``microturn compare``.
    ``probes=False`` skips the teacher-forced probes (copying, answers, hearing, and
    the records' ``by_ear``): one full forward over the whole conversation each, which
    dominates a conversation of minutes and places the sinks as no served session does."""
    require_pyav("evaluation conversations")  # training voices too, which generate() lets through
    records: list[dict[str, object]] = []
    conversations = generate(seeds, held_out=held_out, duration_s=duration_s)
    listens = probes and engine is not None and engine.model.config.listen_head
    reads = {c.seed: read_by_ear(engine.model, c) for c in conversations} if listens else {}
    for conversation in conversations:
        timeline = reference_timeline(conversation) if engine is None else model_timeline(engine, conversation)
        records += score(conversation, timeline)
        if plots is not None:
            plots.mkdir(parents=True, exist_ok=True)
            image = timeline_image(conversation.user_audio, timeline.active, timeline.text)
            write_png(image, plots / f"{conversation.seed}.png")
    mark_heard_by_ear(records, reads)
    result = aggregate(records)
    if engine is not None and probes:
        result["delegation_copying"] = copy_probe(engine.model, conversations)
        result["answers_teacher_forced"] = answer_probe(engine.model, conversations)
        if listens:
            result["heard"] = listen_probe(reads, conversations)
    result["conversations"] = len(seeds)
    result["voices"] = "held-out" if held_out else "training"
    result["seconds"] = duration_s
    if keep_records:
        result["records"] = records
    return result


@torch.no_grad()
def read_by_ear(model: InteractionModel, conversation: Conversation) -> list[tuple[float, list[str], list[str]]]:
    """Per user utterance: (end s, words said, words the listening head reads off it
    by greedy CTC, teacher forced)."""
    example = to_example(conversation, model.config)
    if not len(example.user_words):
        return []
    hidden = listened_states(model, teacher_forced_layers(model, [example]))
    found, words = listening.spans([example.user_words], model.config.frames_per_audio_token)
    log_probs, lengths = listening.listen_logits(model.listen_head, hidden, found)
    return [(end_s, [listening.WORDS[w - 1] for w in target_ids if w != listening.BLANK],
             listening.greedy_words(log_probs[:, i], int(lengths[i])))
            for i, (target_ids, (_, end_s, _)) in enumerate(zip(words.tolist(), conversation.user_words, strict=True))]


def _numbers(words: list[str]) -> list[str]:
    return [w for w in words if w in listening.NUMBERS]


def listen_probe(reads: dict[int, list[tuple[float, list[str], list[str]]]],
                 conversations: list[Conversation]) -> dict[str, object]:
    """What the listening head reads off each user utterance (``read_by_ear``): the
    share read word for word, and of those with numbers (the operands,
    "after seven"), the share whose number words were all read right — overall and
    by each part of the user's voice name (language voice, variant), because the
    held-out voices are not all equally hard (docs/eval.md, session 22)."""
    utterances = right = 0
    numbers: dict[str, list[int]] = {}  # voice part (or "all") -> [right, utterances with numbers]
    for conversation in conversations:
        voice_parts = [part for part in conversation.user_voice.split("+") if part]
        for _, target, read in reads[conversation.seed]:
            utterances += 1
            right += read == target
            if _numbers(target):
                for key in ["all", *voice_parts]:
                    tally = numbers.setdefault(key, [0, 0])
                    tally[0] += _numbers(read) == _numbers(target)
                    tally[1] += 1
    numbers_right, with_numbers = numbers.pop("all", [0, 0])
    return {
        "utterances": utterances,
        "words_right": round(right / utterances, 3) if utterances else None,
        "with_numbers": with_numbers,
        "numbers_right": round(numbers_right / with_numbers, 3) if with_numbers else None,
        "numbers_right_by_voice": {part: {"with_numbers": n, "numbers_right": round(r / n, 3)}
                                   for part, (r, n) in sorted(numbers.items())},
    }


def mark_heard_by_ear(records: list[dict[str, object]], reads: dict[int, list[tuple[float, list[str], list[str]]]]
                      ) -> None:
    """Marks each scored answer with whether the listening head read the question's
    numbers right (``by_ear``): a wrong answer to a question it heard is the skill's
    fault, one to a question it misheard the ear's (docs/eval.md, session 33)."""
    for record in records:
        heard = record.get("heard")
        if heard is None or not reads.get(record["seed"]):
            continue
        end_s, target, read = min(reads[record["seed"]], key=lambda r: abs(r[0] - record["user_end_s"]))
        if abs(end_s - record["user_end_s"]) < 0.01 and _numbers(target):
            heard["by_ear"] = _numbers(read) == _numbers(target)


def teacher_forced_loss(model: InteractionModel, conversations: list[Conversation],
                        turns: int = 80) -> dict[str, float]:
    """The training's loss on ``conversations``, teacher forced, on one window of
    ``turns`` micro-turns each (placed by a fixed seed; the whole conversation if
    shorter) with the weights every run since session 14 trained with (text 3, speech 2,
    listening 0.25), its own voice fed back clean (training adds ``--history-noise``)
    and the user's audio unmasked. Seconds where the closed loop takes minutes; set
    against the same figure on conversations a model trained on, it shows how much of
    its data it memorised. Each part is a mean over the batches that have it (a batch
    with no whole utterance has no listening loss)."""
    examples = [to_example(c, model.config) for c in conversations]
    rng = random.Random(0)
    totals: dict[str, float] = {}
    counts: dict[str, int] = {}
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for first in range(0, len(examples), 4):
                batch = [crop(e, turns, rng) for e in examples[first : first + 4]]
                _, parts = batch_loss(model, batch, history_noise=0.0, text_weight=3.0, speech_weight=2.0,
                                      listen_weight=0.25 if model.config.listen_head else 0.0)
                for key, value in parts.items():
                    totals[key] = totals.get(key, 0.0) + value * len(batch)
                    counts[key] = counts.get(key, 0) + len(batch)
    finally:
        model.train(training)
    return {key: round(value / counts[key], 4) for key, value in totals.items()}


def write_records(path: Path, checkpoint: str, result: dict[str, object], records: list[dict[str, object]]) -> None:
    """``records`` with what names the conversations they came from (a seed's
    conversation depends on its voices and length too)."""
    path.write_text(json.dumps({"checkpoint": checkpoint, "voices": result["voices"], "seconds": result["seconds"],
                                "conversations": result["conversations"], "records": records}))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="microturn eval", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="checkpoint directory (default: random weights)")
    parser.add_argument("--reference", action="store_true", help="score the reference model tracks instead")
    parser.add_argument("--conversations", type=at_least(1), default=20)
    parser.add_argument("--first-seed", type=at_least(0), default=1_000_000, help="held-out seeds start here")
    parser.add_argument("--training-voices", action="store_true",
                        help="users in the training voices and accents (pair with a --first-seed past the "
                             "training seeds): separates hearing new voices from the skill itself")
    parser.add_argument("--seconds", type=positive, default=24.0,
                        help="conversation length (a seed's conversation depends on it; `microturn "
                             "loadtest --seconds S` plays seeds from 2,000,000 at S + 2)")
    parser.add_argument("--heard-only", action="store_true",
                        help="only what the listening head reads off the users' utterances (teacher forced, no "
                             "closed loop: seconds where the full evaluation takes minutes)")
    parser.add_argument("--loss", action="store_true",
                        help="only the training's loss, teacher forced (no closed loop): with --training-voices "
                             "and a --first-seed no run trained on, against seeds it did, how much it memorised")
    parser.add_argument("--no-probes", action="store_true",
                        help="the closed loop alone, without the teacher-forced probes (copying, answers, "
                             "heard): for conversations of minutes (--seconds), where the probes' one forward "
                             "pass over the whole conversation takes most of the time")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--plots", default=None, help="directory for one timeline PNG per conversation")
    parser.add_argument("--records", default=None, metavar="FILE",
                        help="also write what the model did at each event to FILE (JSON), for a paired "
                             "`microturn compare` with another checkpoint on the same conversations")
    parser.add_argument("--write-threshold", default=argparse.SUPPRESS,
                        type=write_threshold,
                        help="decode text in two stages with this threshold, or 'greedy' "
                             "(default: as the checkpoint's decoding.json says)")
    parser.add_argument("--lexicon", default=argparse.SUPPRESS, type=lexicon_file,
                        help="word list the text must spell (model/lexicon.py), or 'none' "
                             "(default: as the checkpoint's decoding.json says)")
    args = parser.parse_args(argv)
    try:
        if not (args.loss and args.training_voices):  # a loss on training data made there, as it was made
            require_pyav("evaluation conversations")
    except ValueError as error:
        parser.error(str(error))
    decoding = {key: getattr(args, key) for key in ("write_threshold", "lexicon") if key in args}
    if args.heard_only and args.reference:
        parser.error("--heard-only reads a model's listening head; the reference tracks have none")
    if args.loss and (args.reference or args.heard_only):
        parser.error("--loss is a model's loss: not with --reference or --heard-only")
    if args.no_probes and (args.loss or args.heard_only):
        parser.error("--no-probes is for the closed loop: --loss and --heard-only are probes alone")
    if args.records and (args.loss or args.heard_only):
        parser.error("--records are the closed loop's: not with --loss or --heard-only")
    if args.records and not Path(args.records).parent.is_dir():  # before minutes of evaluation, not after
        parser.error(f"--records: no folder {Path(args.records).parent} to write {args.records} in")
    engine = None if args.reference else load_engine(args.checkpoint, max_sessions=1, **decoding)
    seeds = list(range(args.first_seed, args.first_seed + args.conversations))
    held_out = not args.training_voices
    if args.heard_only:
        if not engine.model.config.listen_head:
            parser.error(f"--heard-only: {args.checkpoint or 'the random model'} has no listening head")
        conversations = generate(seeds, held_out=held_out, duration_s=args.seconds)
        reads = {c.seed: read_by_ear(engine.model, c) for c in conversations}
        result = {"heard": listen_probe(reads, conversations), "conversations": len(seeds),
                  "voices": "held-out" if held_out else "training", "seconds": args.seconds}  # as evaluate() labels them
    elif args.loss:
        conversations = generate(seeds, held_out=held_out, duration_s=args.seconds)
        result = {"loss": teacher_forced_loss(engine.model, conversations),
                  "answers_teacher_forced": answer_probe(engine.model, conversations), "conversations": len(seeds),
                  "voices": "held-out" if held_out else "training", "seconds": args.seconds,
                  "resampler": resampler()}
    else:
        result = evaluate(engine, seeds, Path(args.plots) if args.plots else None, held_out=held_out,
                          duration_s=args.seconds, keep_records=args.records is not None,
                          probes=not args.no_probes)
        if args.records is not None:
            source = "reference" if args.reference else args.checkpoint or "random"
            write_records(Path(args.records), source, result, result.pop("records"))
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:28s} {value}")
