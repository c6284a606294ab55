"""Does the model copy a background result into its answer? A teacher-forced probe.

Free-running delegation accuracy (model/evaluate.py) says only whether a whole
answer came out right, which needs the request, the wait and every digit. This
asks the narrower question that decides the last part: at each digit of the
reference answer ("it's 87."), given the true history up to it, which digit does
the model predict — and does that prediction change when the ``<result>`` it was
fed carries other digits? A model that copies moves with the result; a model
that guesses from the question or from habit does not.
"""

from __future__ import annotations

import dataclasses
import random
import re

import torch

from model.conversations import Conversation
from model.interaction import InteractionModel
from model.train import Example, led_start, predictor_states, text_input_slots, to_example

_RESULT = re.compile(r"(<result>[^<:]*: )([^<]*)(</result>)")
_DIGITS = frozenset(range(ord("0"), ord("9") + 1))
_FULL_STOP = ord(".")


def result_turn(conversation: Conversation) -> int | None:
    """The micro-turn whose text input carries the first ``<result>``, if any."""
    return next((turn for turn, text in enumerate(conversation.text_in) if "<result>" in text), None)


def with_changed_result(conversation: Conversation, rng: random.Random) -> Conversation:
    """The same conversation, its first result's value with every digit replaced by
    another digit (everything else, the reference answer included, unchanged)."""
    turn = result_turn(conversation)
    if turn is None:
        raise ValueError(f"conversation {conversation.seed} has no <result>")

    def change(match: re.Match[str]) -> str:
        value = "".join(str((int(c) + rng.randint(1, 9)) % 10) if c.isdigit() else c for c in match.group(2))
        return match.group(1) + value + match.group(3)

    text_in = list(conversation.text_in)
    text_in[turn] = _RESULT.sub(change, text_in[turn], count=1)
    return dataclasses.replace(conversation, text_in=text_in)


@dataclasses.dataclass(frozen=True)
class DigitGuess:
    target: int  # the reference byte
    predicted: int  # the model's most likely byte there
    p_target: float  # the probability it gives the reference byte


@torch.no_grad()
def answer_digits(model: InteractionModel, conversation: Conversation,
                  example: Example | None = None) -> list[DigitGuess]:
    """The model's guess at each digit of the answer the reference writes after the
    result arrives ("it's 3:24." up to its full stop; later requests' operands are
    not copies), under teacher forcing. ``example``: the conversation's tensors, if
    already made (as ``to_example`` makes them for this model)."""
    turn = result_turn(conversation)
    if turn is None:
        return []
    example = example or to_example(conversation, model.config)
    probabilities = model.text_head(predictor_states(model, [example])).float().softmax(-1)
    # The example's text, not the conversation's: a model with a text lead is trained on
    # it moved that many outputs earlier, and predicts it there (as model/answering.py).
    targets = example.text_out.reshape(-1).tolist()
    guesses: list[DigitGuess] = []
    for i in range(led_start(turn, model.config), len(targets)):
        if targets[i] in _DIGITS:
            row = probabilities[i]
            guesses.append(DigitGuess(targets[i], int(row.argmax()), float(row[targets[i]])))
        elif targets[i] == _FULL_STOP and guesses:
            break
    return guesses


def copy_probe(model: InteractionModel, conversations: list[Conversation], seed: int = 0) -> dict[str, object]:
    """Over the conversations with a result: the answer digits predicted right, the
    share of predictions that move when the result's digits change, and the mean
    probability of the right digit with the true and with the changed result (equal
    for a model that ignores the result; far apart for one that copies); and the
    first digit's probability with and without the model's own voice."""
    rng = random.Random(seed)
    true: list[DigitGuess] = []
    changed: list[DigitGuess] = []
    first: list[DigitGuess] = []
    first_silenced: list[DigitGuess] = []
    answers = 0
    for conversation in conversations:
        turn = result_turn(conversation)
        if turn is None:
            continue
        answers += 1
        example = to_example(conversation, model.config)
        guesses = answer_digits(model, conversation, example)
        true += guesses
        first += guesses[:1]
        # Only the text input differs: reuse the audio's dMel bins.
        other = with_changed_result(conversation, rng)
        other_text = text_input_slots(other.text_in, model.config.text_in_slots)
        changed += answer_digits(model, other, dataclasses.replace(example, text_in=other_text))
        silenced = without_own_voice(example, turn * model.config.frames_per_turn)
        first_silenced += answer_digits(model, conversation, silenced)[:1]
    if not true:
        return {"answers": answers, "digits": 0}

    def mean(values: list[float]) -> float:
        return round(sum(values) / len(values), 3)

    return {
        "answers": answers,
        "digits": len(true),
        "digit_accuracy_teacher_forced": mean([float(g.predicted == g.target) for g in true]),
        "moved_with_result": mean([float(a.predicted != b.predicted) for a, b in zip(true, changed, strict=True)]),
        "p_right_digit": mean([g.p_target for g in true]),
        "p_right_digit_changed_result": mean([g.p_target for g in changed]),
        # The first digit with the model's own voice as recorded and silenced from the
        # result on: far apart, it reads the digit off its voice (data before version 4);
        # from version 5 its voice has only begun "it's" when the digit is due, so a gap
        # there is reliance on hearing itself start, not a leak (docs/eval.md, session 8).
        "p_first_digit": mean([g.p_target for g in first]),
        "p_first_digit_voice_silenced": mean([g.p_target for g in first_silenced]),
    }


def without_own_voice(example: Example, from_frame: int) -> Example:
    """``example`` with the model's own (teacher-forced) voice silent from
    ``from_frame`` on: what the text head can then know only from the text."""
    bins = example.model_bins.clone()
    bins[from_frame:] = 0  # dMel bin 0: silence
    return dataclasses.replace(example, model_bins=bins)
