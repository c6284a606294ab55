"""The teacher-forced answer probe (model/answering.py): it finds each answer's word
and each request in the model's text, wherever a text lead puts them, and reads the
byte the model picks at those very positions."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from model.answering import answer_probe, written_span
from model.config import preset
from model.conversations import generate
from model.interaction import InteractionModel
from model.train import to_example
from model.weights import load_checkpoint
from server.config import default_checkpoint


@pytest.fixture(scope="module")
def conversations():
    """Held-out conversations with "after", pause, small-sum and count answers and two delegations."""
    return generate([1_000_003, 1_000_006, 1_000_008], held_out=True)


@pytest.mark.parametrize("lead", [0, 1, 4])
def test_the_spans_spell_the_expected_words_and_requests_under_any_text_lead(conversations, lead):
    config = dataclasses.replace(preset("tiny"), text_lead=lead)
    found = []
    for conversation in conversations:
        text = to_example(conversation, config).text_out.reshape(-1).tolist()
        for event in conversation.events:
            first = max(int(event.user_end_s / 0.2 + 1e-9) * config.out_positions - lead, 0)
            span = written_span(event, text, first)
            found.append((event.kind, event.expected_text, span and bytes(text[i] for i in span).decode()))
    answers = [(expected, written) for kind, expected, written in found if kind in ("answer", "pause") and written]
    assert len(answers) == 10 and all(expected == written for expected, written in answers), answers
    requests = [written for kind, _, written in found if kind == "delegation"]
    assert requests == ["calc: 53 + 41", "calc: 19 + 76"]
    # A count ("one two") is no one-word number answer, and noise asks for nothing.
    assert all(written is None for kind, expected, written in found if kind == "noise" or " " in expected)


def test_the_shipped_model_picks_its_answers_first_bytes_where_random_weights_do_not(conversations):
    """The probe reads the byte picked at the answer's own positions: a trained model
    gets most first bytes right there (a probe one position off would read silence's
    neighbours); random weights get next to none."""
    trained = load_checkpoint(default_checkpoint())
    shipped = answer_probe(trained, conversations)
    assert {kind: scores["scored"] for kind, scores in shipped.items()} == {
        "after": 3, "pause": 3, "request": 2, "small_sum": 4}
    for scores in shipped.values():
        assert 0 <= scores["word_own_voice"] <= 1 and scores["word"] <= scores["first_byte"]
    first_bytes = sum(s["first_byte"] * s["scored"] for s in shipped.values()) / 12
    assert first_bytes >= 0.6, shipped
    torch.manual_seed(0)
    random_weights = answer_probe(InteractionModel(trained.config), conversations)
    assert sum(s["first_byte"] * s["scored"] for s in random_weights.values()) / 12 < 0.3, random_weights
