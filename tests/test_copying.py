"""The delegation copy probe (model/copying.py): it reads the spoken answer's digits
at the right positions, changes only the result's digits, and sees a model whose
predictions depend on the result."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from model.config import preset
from model.conversations import generate
from model.copying import answer_digits, copy_probe, result_turn, with_changed_result, without_own_voice
from model.interaction import InteractionModel
from model.streaming import load_engine
from model.train import predictor_states, to_example


@pytest.fixture(scope="module")
def delegating():
    """A held-out conversation whose background result is a time ('t1: 3:24')."""
    conversation = generate([1_000_001], held_out=True)[0]
    assert result_turn(conversation) is not None
    return conversation


def test_a_changed_result_differs_in_every_digit_and_nowhere_else(delegating):
    turn = result_turn(delegating)
    changed = with_changed_result(delegating, random.Random(1))
    before, after = delegating.text_in[turn], changed.text_in[turn]
    assert len(before) == len(after) and before != after
    value_at = before.index(": ", before.index("<result>")) + 2
    for i, (a, b) in enumerate(zip(before, after, strict=True)):
        assert (a != b) == (a.isdigit() and i >= value_at), (before, after)
    assert changed.text_in[:turn] == delegating.text_in[:turn] and changed.text_in[turn + 1:] == delegating.text_in[turn + 1:]
    assert (changed.text_out == delegating.text_out).all()


def test_the_probe_reads_the_digits_of_the_spoken_answer(delegating):
    model = load_engine(max_sessions=1).model  # random weights: positions, not skill
    turn = result_turn(delegating)
    value = delegating.text_in[turn].split("<result>")[1].split(": ", 1)[1].split("</result>")[0]
    digits = answer_digits(model, delegating)
    assert [chr(guess.target) for guess in digits] == [c for c in value if c.isdigit()]
    assert all(0 < guess.p_target < 1 for guess in digits)


def test_the_changed_result_reaches_the_model(delegating):
    """Random weights mix every input into every prediction, so the right digit's
    probability shifts when the result changes (if the changed result never reached
    the model, the two would be equal)."""
    model = load_engine(max_sessions=1).model
    true = answer_digits(model, delegating)
    changed = answer_digits(model, with_changed_result(delegating, random.Random(2)))
    assert [g.target for g in true] == [g.target for g in changed]
    assert [g.p_target for g in true] != [g.p_target for g in changed]
    result = copy_probe(model, [delegating])
    assert result["answers"] == 1 and result["digits"] == 3
    assert 0 <= result["moved_with_result"] <= 1 and 0 <= result["digit_accuracy_teacher_forced"] <= 1


def test_the_own_voice_check_silences_only_the_voice_from_the_result_on(delegating):
    model = load_engine(max_sessions=1).model
    example = to_example(delegating, model.config)
    start = result_turn(delegating) * model.config.frames_per_turn
    silenced = without_own_voice(example, start)
    assert (silenced.model_bins[start:] == 0).all() and example.model_bins[start:].any()
    assert (silenced.model_bins[:start] == example.model_bins[:start]).all()
    assert (silenced.user_bins == example.user_bins).all() and (silenced.text_in == example.text_in).all()
    # Random weights hear everything, so the first digit's probability moves with the voice.
    assert answer_digits(model, delegating, example)[0].p_target != answer_digits(model, delegating, silenced)[0].p_target
    result = copy_probe(model, [delegating])
    assert 0 < result["p_first_digit"] < 1 and 0 < result["p_first_digit_voice_silenced"] < 1


def test_a_text_lead_model_is_scored_where_its_led_text_writes_the_digits(delegating):
    """A model trained with ``text_lead`` writes each byte that many outputs early: the
    probe must score the digits at the led positions, with the rows that predict them."""
    torch.manual_seed(0)
    model = InteractionModel(dataclasses.replace(preset("tiny"), text_lead=2)).eval()
    example = to_example(delegating, model.config)
    led = example.text_out.reshape(-1).tolist()
    start = result_turn(delegating) * model.config.out_positions - 2
    stop = led.index(ord("."), next(i for i in range(start, len(led)) if chr(led[i]).isdigit()))
    positions = [i for i in range(start, stop) if chr(led[i]).isdigit()]
    assert len(positions) == 3  # "3:24"
    with torch.no_grad():
        probabilities = model.text_head(predictor_states(model, [example])).float().softmax(-1)
    guesses = answer_digits(model, delegating)
    assert [g.target for g in guesses] == [led[i] for i in positions]
    assert [g.p_target for g in guesses] == pytest.approx([float(probabilities[i, led[i]]) for i in positions])
