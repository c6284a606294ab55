"""Which word would the model write, given the true history? A teacher-forced probe.

The closed loop (model/evaluate.py) says whether an answer came out right, not why
not. This asks, at each number answer and task request of the reference, what the
text head writes given everything before it: the first byte (which word to say) and
every byte in turn (the word, each byte given the reference's bytes before it), its
own voice fed back either as the reference has it or as its audio head renders it,
one output ahead (``model.train.rendered_history``, argmax as served). The gap
between the two is what the model's hearing of its own voice costs; the gap from
there to the closed loop is the rest of the loop (docs/eval.md, session 36). Bytes
are chosen as greedy would once the model writes (NO_TEXT set aside), without a
lexicon.
"""

from __future__ import annotations

import torch

from model.config import NO_TEXT, TASK_CLOSE, TASK_OPEN
from model.conversations import NUMBER_WORDS, Conversation, Event, turn_at
from model.interaction import InteractionModel
from model.lexicon import LETTERS
from model.train import led_start, predicting_states, rendered_history, teacher_forced_layers, to_example


def written_span(event: Event, text: list[int], first: int) -> list[int] | None:
    """The output positions of what ``event`` is scored on, from position ``first`` on
    (the user's end, moved by the model's text lead): an answer's first word's letters,
    or a delegation's request between its markers. None: the event has no such span."""
    if event.kind in ("answer", "pause") and event.expected_text in NUMBER_WORDS:
        start = next((i for i in range(first, len(text)) if text[i] in LETTERS), None)
        if start is None:
            return None
        span = []
        for i in range(start, len(text)):  # the word may pause (NO_TEXT) inside
            if text[i] in LETTERS:
                span.append(i)
            elif text[i] != NO_TEXT:
                break
        return span
    if event.kind == "delegation":
        opened = next((i for i in range(first, len(text)) if text[i] == TASK_OPEN), None)
        if opened is None:
            return None
        closed = next((i for i in range(opened, len(text)) if text[i] == TASK_CLOSE), None)
        return [i for i in range(opened + 1, closed) if text[i] != NO_TEXT] if closed is not None else None
    return None


def _picked_bytes(model: InteractionModel, hidden: torch.Tensor) -> list[int]:
    """The byte the text head picks at each output position, given it writes one."""
    logits = model.text_head(hidden).float()
    logits[:, NO_TEXT] = float("-inf")
    return logits.argmax(-1).tolist()


@torch.no_grad()
def chosen_bytes(model: InteractionModel, conversation: Conversation) -> tuple[list[int], list[int], list[int]]:
    """(the reference's text ids as this model writes them, the byte the model picks at
    each output position fed the reference voice, and fed its own rendering of it). The
    rendering is sampled from the reference pass's own states, so it takes one pass more."""
    batch = [to_example(conversation, model.config)]
    hidden = predicting_states(model, teacher_forced_layers(model, batch))
    own = predicting_states(model, teacher_forced_layers(model, batch,
                                                         own_history=rendered_history(model, batch, hidden)))
    return batch[0].text_out.reshape(-1).tolist(), _picked_bytes(model, hidden), _picked_bytes(model, own)


def answer_probe(model: InteractionModel, conversations: list[Conversation]) -> dict[str, dict[str, object]]:
    """Per question kind (and ``request`` for delegations): how many were scored, the
    share whose first byte the model picks right, whose every byte it picks right
    fed the reference voice (``word``) and fed its own rendering (``word_own_voice``)."""
    training = model.training
    model.eval()
    tallies: dict[str, list[int]] = {}  # kind -> [scored, first byte, word, word own voice]
    try:
        for conversation in conversations:
            text, reference, rendered = chosen_bytes(model, conversation)
            for event in conversation.events:
                first = led_start(turn_at(event.user_end_s), model.config)
                span = written_span(event, text, first)
                if not span:
                    continue
                kind = "request" if event.kind == "delegation" else event.question or event.kind
                tally = tallies.setdefault(kind, [0, 0, 0, 0])
                tally[0] += 1
                tally[1] += reference[span[0]] == text[span[0]]
                tally[2] += all(reference[i] == text[i] for i in span)
                tally[3] += all(rendered[i] == text[i] for i in span)
    finally:
        model.train(training)
    return {kind: {"scored": n, "first_byte": round(first / n, 3), "word": round(word / n, 3),
                   "word_own_voice": round(own / n, 3)}
            for kind, (n, first, word, own) in sorted(tallies.items())}
