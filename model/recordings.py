"""Session recordings as training examples (``microturn train --recordings DIR``).

A recording (``server/recording.py``) is already on the training timeline: input
chunk ``t`` is the user's audio of micro-turn ``t``, output ``t`` is what the model
said right after hearing it — step time, as in ``model/conversations.py``. So it
becomes a ``Conversation`` and goes through the same ``to_example`` as synthetic
data. Text out is recorded as the string each turn produced; laid out again from
the first output position of its turn, which is where the model wrote it unless
it left a gap (``NO_TEXT``) mid-turn. A character split across turns comes out of
the server's decoder whole, one turn late; the layout carries any ids beyond a
turn's positions into the next turn rather than drop them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from model.config import NO_TEXT, ModelConfig
from model.conversations import Conversation
from model.text import encode
from model.train import Example, to_example
from server.recording import Recording, find_recordings, read_recording


def text_output_positions(texts: list[str], positions: int) -> np.ndarray:
    """Per-turn output text -> (turns, positions) ids, left-aligned in each turn,
    overflow carried into the next turn's free positions."""
    ids = np.full((len(texts), positions), NO_TEXT, dtype=np.int64)
    carry: list[int] = []
    for turn, text in enumerate(texts):
        carry += encode(text)
        taken, carry = carry[:positions], carry[positions:]
        ids[turn, : len(taken)] = taken
    return ids


def trained_turns(recording: Recording) -> int:
    """Turns usable for training: up to the last one with both input and output
    (a crash can leave an input whose output was never written)."""
    both = set(recording.inputs) & set(recording.outputs)
    return 1 + max(both, default=-1)


def to_conversation(recording: Recording, positions: int) -> Conversation:
    """A recording on the conversation timeline; missing turns (a failed step) are
    silence with no text, in and out: the text a failed turn carried never reached
    the model, and the server sent it again with the next turn, recorded there."""
    turns = trained_turns(recording)
    return Conversation(
        seed=-1,
        user_audio=recording.user_audio(turns),
        model_audio=recording.model_audio(turns),
        text_in=[recording.input_text.get(t, "") if t in recording.outputs else "" for t in range(turns)],
        text_out=text_output_positions([recording.output_text.get(t, "") for t in range(turns)], positions),
    )


def recording_example(recording: Recording, config: ModelConfig) -> Example:
    # Its text is where the served model wrote it, any text lead included: not moved again.
    return to_example(to_conversation(recording, config.out_positions), config, text_lead=0)


def load_recording_examples(roots: list[str | Path], config: ModelConfig, min_turns: int) -> list[Example]:
    """An example for every readable recording at or under ``roots`` (complete or
    not). Ones with fewer than ``min_turns`` turns (the training window) are
    skipped, saying so on stderr; so are unreadable ones."""
    examples = []
    for root in roots:
        paths = find_recordings(root)
        if not paths:
            print(f"recordings: none under {root}", file=sys.stderr)
        for path in paths:
            try:
                recording = read_recording(path)
            except OSError as exc:
                print(f"recordings: skipping {path}: {exc}", file=sys.stderr)
                continue
            turns = trained_turns(recording)
            if turns < min_turns:
                print(f"recordings: skipping {path}: {turns} turns, shorter than the {min_turns}-turn window",
                      file=sys.stderr)
                continue
            examples.append(recording_example(recording, config))
            state = "complete" if recording.complete else "incomplete (no manifest or a torn tail)"
            print(f"recordings: {path}: {turns} turns, {state}", file=sys.stderr)
    return examples
