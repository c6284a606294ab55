"""Synthetic training conversations: deterministic, and teaching what they claim."""

from __future__ import annotations

import dataclasses
import os
import random
import re
import signal
import subprocess
import sys
import time
import wave

import numpy as np
import pytest
from conftest import checkout_env

from model import conversations as conv
from model.config import NO_TEXT, RESULT_OPEN, TASK_CLOSE, TASK_OPEN, ModelConfig
from model.interface import SAMPLE_RATE, TURN_SAMPLES
from model.text import encode, result_label
from model.train import text_input_slots

SEEDS = list(range(8))


@pytest.fixture(scope="module")
def sample() -> list[conv.Conversation]:
    return conv.generate(SEEDS)


def rms(audio: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(audio)))) if audio.size else 0.0


def seconds(audio: np.ndarray, start: float, end: float) -> np.ndarray:
    return audio[int(max(start, 0) * SAMPLE_RATE) : int(end * SAMPLE_RATE)]


def test_a_seed_gives_the_same_bits_whatever_was_generated_before(sample):
    again = conv.generate([SEEDS[5], SEEDS[2]])
    for original, repeat in ((sample[5], again[0]), (sample[2], again[1])):
        assert np.array_equal(original.user_audio, repeat.user_audio)
        assert np.array_equal(original.model_audio, repeat.model_audio)
        assert np.array_equal(original.text_out, repeat.text_out) and original.text_in == repeat.text_in


def test_conversations_come_in_seed_order_as_they_are_made_a_few_ahead(monkeypatch):
    submitted: list[int] = []
    submit = conv.ProcessPoolExecutor.submit

    def counted(self, fn, /, *args, **kwargs):
        submitted.append(args[0][0])  # the seed
        return submit(self, fn, *args, **kwargs)

    monkeypatch.setattr(conv.ProcessPoolExecutor, "submit", counted)
    # Six seeds, more than the four one worker keeps in flight, so each one taken is replaced.
    seeds = [11, 3, 7, 5, 2, 13]
    stream = conv.generate_in_order(seeds, duration_s=6.0, workers=1)
    first = next(stream)
    assert submitted == seeds[:5]  # four ahead, and one more for the one taken
    streamed = [first, *stream]
    assert submitted == seeds
    for one, seed in zip(streamed, seeds, strict=True):
        [alone] = conv.generate([seed], duration_s=6.0)
        assert np.array_equal(one.user_audio, alone.user_audio) and one.text_in == alone.text_in


def test_past_its_deadline_the_stream_ends_early_and_closing_it_stops_the_workers():
    seeds = list(range(1_000))
    until = time.monotonic() + 2.0
    came = [c.text_out.shape[0] for c in conv.generate_in_order(seeds, duration_s=6.0, workers=1, until=until)]
    assert 1 <= len(came) < 100 and set(came) == {30}  # 1,000 would take minutes

    many = conv.generate_in_order(seeds, duration_s=6.0, workers=1)
    assert next(many).text_out.shape[0] == 30  # six seconds of micro-turns
    began = time.monotonic()
    many.close()  # drops those waiting, finishes what the worker already holds: not the other 999
    assert time.monotonic() - began < 15


_SAY_BREATHILY = """
import hashlib
from model.speech import Voice, synthesize
print(hashlib.sha1(synthesize("what is nine plus eight", Voice("en-029+f3")).audio.tobytes()).hexdigest())
"""


def test_a_breathy_voice_is_the_same_bits_in_every_run():
    # espeak-ng seeds its breath noise from the clock at start-up; two runs a second
    # apart differed until the seed was fixed.
    first = subprocess.run([sys.executable, "-c", _SAY_BREATHILY], capture_output=True, text=True, check=True)
    time.sleep(1.1)
    second = subprocess.run([sys.executable, "-c", _SAY_BREATHILY], capture_output=True, text=True, check=True)
    assert first.stdout == second.stdout and len(first.stdout.strip()) == 40


_A_CALLERS_SCRIPT = """
import torch
import model.evaluate  # module-level torch ops, which each worker runs again as __mp_main__
from model.conversations import generate

if __name__ == "__main__":
    print(len(generate([3], duration_s=6.0, workers=1)))
"""


def test_a_script_that_uses_torch_can_generate(tmp_path):
    """Such a script once hung for good in its first worker (an OpenMP team inherited
    from the fork server); ``microturn`` itself never showed it."""
    script = tmp_path / "script.py"
    script.write_text(_A_CALLERS_SCRIPT)
    env = checkout_env()
    env.pop("OMP_NUM_THREADS", None)
    process = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=env, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # its fork server and hung worker too
        process.communicate()
        pytest.fail("generate() hung in a script that had used torch")
    assert process.returncode == 0, stderr[-3000:]
    assert stdout.strip() == "1"
    before = os.environ.get("OMP_NUM_THREADS")
    conv.generate([3], duration_s=6.0, workers=1)
    assert os.environ.get("OMP_NUM_THREADS") == before  # the caller's setting is restored


_A_SCRIPT_WITHOUT_A_MAIN_GUARD = """
from model.conversations import generate

print(len(generate([3], duration_s=6.0)))
"""


def test_a_script_without_a_main_guard_gets_an_error_not_a_hang(tmp_path):
    """Each worker re-imports the script and calls generate() while it is still
    starting, so it dies; a multiprocessing.Pool replaced such workers for ever."""
    script = tmp_path / "script.py"
    script.write_text(_A_SCRIPT_WITHOUT_A_MAIN_GUARD)
    env = checkout_env()
    process = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=env, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail("generate() hung in a script without a main guard")
    assert process.returncode == 1 and stdout == ""
    assert 'RuntimeError: a conversation worker died' in stderr and '__name__ == "__main__"' in stderr


def test_layout_on_the_micro_turn_timeline(sample):
    for c in sample:
        assert c.user_audio.shape == c.model_audio.shape == (c.turns * TURN_SAMPLES,)
        assert c.text_out.shape == (c.turns, conv.OUT_POSITIONS)
        assert c.user_audio.dtype == np.float32 and np.abs(c.user_audio).max() <= 1.0
    kinds = {event.kind for c in sample for event in c.events}
    assert kinds == {"answer", "pause", "barge_in", "delegation", "noise"}


def live(step_start_s: float) -> float:
    """When output audio made in step time at ``step_start_s`` is heard: its input chunk
    closes 0.2 s after the output turn starts."""
    return step_start_s + 0.2


def test_the_model_answers_after_the_user_not_over_them(sample):
    answers = [(c, e) for c in sample for e in c.events if e.kind in ("answer", "pause")]
    assert len(answers) >= 10
    for c, event in answers:
        # Silent while the user speaks; the reply is the first output made after the
        # model heard REPLY_AFTER_SILENCE_S of silence (heard live 0.15-0.35 s after the end).
        assert rms(seconds(c.model_audio, event.user_end_s - 1.0, event.model_start_s)) < 1e-3
        latency = live(event.model_start_s) - event.user_end_s
        assert conv.REPLY_AFTER_SILENCE_S - 1e-9 <= latency < conv.REPLY_AFTER_SILENCE_S + 0.2
        assert rms(seconds(c.model_audio, event.model_start_s, event.model_start_s + 0.4)) > 0.01


def test_the_model_waits_through_mid_utterance_pauses(sample):
    pauses = [(c, e) for c in sample for e in c.events if e.kind == "pause"]
    assert pauses
    for c, event in pauses:
        # Across the whole question, pause included, the model says nothing.
        assert rms(seconds(c.model_audio, event.user_end_s - 2.5, event.model_start_s)) < 1e-3


def test_the_model_yields_within_a_micro_turn_of_a_barge_in(sample):
    barge_ins = [(c, e) for c in sample for e in c.events if e.kind == "barge_in"]
    assert barge_ins
    for c, event in barge_ins:
        assert rms(seconds(c.model_audio, event.model_start_s, event.user_end_s)) > 0.01, "it was speaking"
        # Silent from the first output made after hearing STOP_AFTER_SPEECH_S of the user.
        stop = int(np.ceil((event.user_end_s + conv.STOP_AFTER_SPEECH_S) / 0.2 - 1 - 1e-9)) * 0.2
        assert rms(seconds(c.model_audio, stop, stop + 0.6)) < 1e-3
        assert rms(seconds(c.model_audio, stop - 0.2, stop)) > 1e-3, "and not before"
        assert conv.STOP_AFTER_SPEECH_S - 1e-9 <= live(stop) - event.user_end_s < conv.STOP_AFTER_SPEECH_S + 0.2


def assert_answered_in_step_with_the_result(c: conv.Conversation, event: conv.Event) -> None:
    written = c.text_out.flatten().tolist()
    result_turns = [t for t, text in enumerate(c.text_in) if f": {event.expected_text}</result>" in text]
    assert result_turns, "the result arrives as text input"
    assert encode(c.text_in[result_turns[0]])[0] == RESULT_OPEN
    # The answer is written in step with the result entering (4 ids a turn): each
    # digit at the output slot where it arrives as input; spoken from the next turn.
    arrived = text_input_slots(c.text_in, ModelConfig().text_in_slots).flatten().tolist()
    answer = encode(f"it's {event.expected_text}.")
    result_at = result_turns[0] * conv.OUT_POSITIONS
    first = next(i for i in range(result_at, len(written)) if written[i] != NO_TEXT)
    assert written[first : first + len(answer)] == answer
    value = encode(event.expected_text)
    value_at = first + len("it's ")
    assert arrived[value_at : value_at + len(value)] == value
    assert first == result_at  # its prefix starts as <result> arrives: every label is one digit
    voice = np.abs(c.model_audio.reshape(c.turns, TURN_SAMPLES)).max(axis=1) > 0
    text_turn = first // conv.OUT_POSITIONS
    assert not voice[text_turn] and voice[text_turn + 1]


def test_delegation_writes_a_task_request_and_answers_when_the_result_arrives(sample):
    delegations = [(c, e) for c in sample for e in c.events if e.kind == "delegation"]
    assert delegations
    for c, event in delegations:
        written = c.text_out.flatten().tolist()
        assert TASK_OPEN in written and TASK_CLOSE in written
        assert_answered_in_step_with_the_result(c, event)


def test_results_keep_one_label_length_however_many_tasks_a_conversation_has():
    """From the tenth task on, labels start again at t1, as the server's do
    (model.text.result_label): the answer's digits stay the one distance after the
    label that the model copies across (with t10, no result was spoken again)."""
    long = conv.generate([3_000_000], held_out=True, duration_s=240)[0]
    labels = [re.match(r"<result>(t\d+): ", text).group(1) for text in long.text_in if "<result>" in text]
    assert len(labels) >= 10 and labels == [result_label(n) for n in range(1, len(labels) + 1)]
    assert labels[9] == "t1"
    for event in long.events:
        if event.kind == "delegation":
            assert_answered_in_step_with_the_result(long, event)


def test_delegation_drills_are_delegations_only_with_the_result_soon_after_the_request():
    drills = conv.generate([0, 1], drill="delegation")
    assert drills[0].seed == 0 and not np.array_equal(drills[0].user_audio, conv.generate([0])[0].user_audio)
    for c in drills:
        assert len(c.events) >= 2 and {e.kind for e in c.events} == {"delegation"}
        written = c.text_out.flatten().tolist()
        closes = [i // conv.OUT_POSITIONS for i, t in enumerate(written) if t == TASK_CLOSE]
        results = [t for t, text in enumerate(c.text_in) if "<result>" in text]
        assert len(closes) == len(results) == len(c.events)
        speaking = np.abs(c.model_audio.reshape(c.turns, TURN_SAMPLES)).max(axis=1) > 0
        for request_turn, result_turn, event in zip(closes, results, c.events, strict=True):
            # The holding phrase (spoken and written) ends; the result comes 1-4 turns later.
            said_until = max(t for t in range(result_turn) if speaking[t]) + 1
            assert 1 <= result_turn - max(said_until, request_turn + 1) <= 4
            assert f": {event.expected_text}</result>" in c.text_in[result_turn]


def test_answer_drills_are_small_sums_and_next_numbers_answered_in_words():
    drills = conv.generate([0, 1], drill="answer")
    assert not np.array_equal(drills[0].user_audio, conv.generate([0], drill="delegation")[0].user_audio)
    sums = 0
    for c in drills:
        assert {e.kind for e in c.events} == {"answer"} and {e.question for e in c.events} <= {"small_sum", "after"}
        written = bytes(t for t in c.text_out.flatten().tolist() if t < 256).decode()
        asked = [text for _, _, text in c.user_words]
        assert len(asked) == len(c.events) >= 4
        for question, event in zip(asked, c.events, strict=True):
            numbers = [conv.NUMBER_WORDS.index(w) for w in re.findall(r"[a-z]+", question) if w in conv.NUMBER_WORDS]
            wanted = sum(numbers) if event.question == "small_sum" else numbers[0] + 1
            assert event.expected_text == conv.NUMBER_WORDS[wanted] and f"{event.expected_text}." in written
        sums += sum(e.question == "small_sum" for e in c.events)
    assert sums >= 6  # several a conversation, where an ordinary one has under one


def test_only_noise_gets_no_answer(sample):
    for c in sample:
        for event in (e for e in c.events if e.kind == "noise"):
            assert rms(seconds(c.model_audio, event.user_end_s - 1.0, event.user_end_s + 0.4)) < 1e-3


def test_held_out_voices_are_not_training_voices():
    assert not set(conv._VARIANTS_HELD_OUT) & set(conv._VARIANTS_TRAIN)
    assert not set(conv._LANGUAGES_HELD_OUT) & set(conv._LANGUAGES_TRAIN)
    held_out = conv.generate([100], held_out=True)[0]
    assert held_out.events


def test_held_out_conversations_are_those_of_version_6(monkeypatch):
    # Background talkers are drawn from the training variants; the longer lists of
    # versions 7 and 8 must not change what a held-out conversation says, in which
    # voices, or results before and after them stop being comparable. What is spoken
    # is recorded rather than the audio: in one process espeak-ng carries state from
    # call to call.
    spoken: list[tuple[str, str]] = []
    speak = conv.speak
    monkeypatch.setattr(conv, "speak", lambda text, voice: spoken.append((text, voice.name)) or speak(text, voice))
    seed = 1_000_038  # the longer list would change its background talker and what follows
    conv.make_conversation(seed, held_out=True)
    now = spoken.copy()
    spoken.clear()
    monkeypatch.setattr(conv, "_VARIANTS_TRAIN", conv._VARIANTS_TRAIN_V6)
    conv.make_conversation(seed, held_out=True)
    assert spoken == now


def test_a_stretched_training_voice_keeps_its_tempo():
    # The widest stretch raises pitch and formants by ~1.5x; it must not also speed the
    # user up by 1.5x, or "high voice" would be learned as "fast voice".
    seed = next(s for s in range(1000) if conv._Builder(s, False, 30.0).stretch < 0.70)
    stretched = conv._Builder(seed, False, 30.0)
    plain = conv._Builder(seed, False, 30.0)
    plain.user_voice = dataclasses.replace(
        plain.user_voice, words_per_minute=round(plain.user_voice.words_per_minute / plain.stretch))
    plain.stretch = 1.0
    text = "what comes after seven and then what comes after nine"
    start, end = stretched.user_says([text])
    plain_start, plain_end = plain.user_says([text])
    assert 0.88 < (end - start) / (plain_end - plain_start) < 1.12


def test_render_wav_for_listening(tmp_path, sample):
    path = conv.render_wav(sample[0], tmp_path / "c.wav")
    with wave.open(str(path)) as wav:
        assert wav.getnchannels() == 2 and wav.getframerate() == SAMPLE_RATE
        frames = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2").reshape(-1, 2)
    assert frames.shape[0] == sample[0].user_audio.size
    # The model channel is the model track one micro-turn later, as heard live.
    expected = np.round(np.clip(sample[0].model_audio[:-TURN_SAMPLES], -1, 1) * 32767)
    assert np.abs(frames[TURN_SAMPLES:, 1] - expected).max() <= 1


def test_numbers_are_said_in_english_words():
    """Another language's voice reads digits in its own language: German said "38" as
    "achtunddreißig" to a model asked to write "calc: 38 + ..." (versions 3-8)."""
    assert conv.english_numbers("what is 38 plus 90?") == "what is thirty eight plus ninety?"
    assert conv.english_numbers("7, 12, 20 and 99") == "seven, twelve, twenty and ninety nine"


def test_an_accented_user_says_the_numbers_in_english(monkeypatch):
    """What is spoken is English words; what the listening loss reads (user_words) is
    the text as written. English voices still read the digits themselves (version 8's bits)."""
    spoken: list[tuple[str, str]] = []
    speak = conv.speak
    monkeypatch.setattr(conv, "speak", lambda text, voice: spoken.append((text, voice.name)) or speak(text, voice))
    for seed in (s for s in range(200) if conv._Builder(s, False, 24.0).english_numbers):
        spoken.clear()
        conversation = conv.make_conversation(seed, held_out=False)
        written = [text for _, _, text in conversation.user_words]
        if any(re.search(r"\d", text) for text in written):
            break
    else:
        pytest.fail("no accented user among the first 200 seeds asks a sum")
    said = [text for text, voice in spoken if voice == conversation.user_voice]
    assert said == [conv.english_numbers(text) for text in written] and not any(re.search(r"\d", t) for t in said)
    assert conversation.user_voice.split("+")[0] in conv._ACCENTS_TRAIN
    assert not any(conv._Builder(seed, True, 24.0).english_numbers for seed in range(1_000_000, 1_000_100))


def test_the_room_convolves_by_fft_as_numpy_does_directly(monkeypatch):
    """FFT convolution (done directly, four fifths of a conversation's making): the same
    numbers to float64 rounding, which the room's float32 output does not see: 120
    held-out and 20 training conversations came out the same to the bit (docs/eval.md,
    session 34)."""
    rng = np.random.default_rng(0)
    for size, taps in ((16000, 1600), (24 * 16000, 8000), (5, 7), (1, 1)):
        sound = rng.normal(0, 0.1, size).astype(np.float32)
        response = rng.normal(0, 1, taps) * np.exp(-6.9 * np.arange(taps) / taps)
        direct, ours = np.convolve(sound, response), conv.convolve(sound, response)
        assert ours.shape == direct.shape and np.abs(ours - direct).max() < 1e-9 * max(1.0, np.abs(direct).max())
    with pytest.raises(ValueError, match="empty"):
        conv.convolve(np.zeros(0, np.float32), np.ones(3))
    audio = rng.normal(0, 0.1, 4 * 16000).astype(np.float32)
    by_fft = [conv._room(audio, random.Random(seed)) for seed in range(8)]
    monkeypatch.setattr(conv, "convolve", np.convolve)  # the direct convolution it replaced
    assert all(np.array_equal(room, conv._room(audio, random.Random(seed))) for seed, room in enumerate(by_fft))
