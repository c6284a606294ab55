"""The contract between the serving engine and any interaction model.

One micro-turn is 200 ms. Every tick the engine hands the model a batch with one
closed input chunk for each of several sessions and gets back, for each of them,
the next 200 ms of the model's voice plus any text it produced. Sessions are
opened and closed explicitly so a model can keep per-session streaming state
(KV cache, vocoder phase) and free it deterministically.

Audio crosses this boundary as numpy float32 at 16 kHz: the server lives in
numpy/PyAV land, and a torch model can wrap it with ``torch.from_numpy`` at no cost.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

SAMPLE_RATE = 16_000
TURN_MS = 200
TURN_SAMPLES = SAMPLE_RATE * TURN_MS // 1000  # 3,200 samples per micro-turn


@dataclass(slots=True)
class TurnInput:
    """What one session heard (and was told) during micro-turn ``turn``."""

    session_id: str
    turn: int
    audio: np.ndarray  # float32, shape (TURN_SAMPLES,), 16 kHz mono, [-1, 1]
    text: str = ""  # typed text or background results entering this micro-turn
    video: np.ndarray | None = None  # newest camera frame, (height, width, 3) uint8 RGB


@dataclass(slots=True)
class TurnOutput:
    """What one session's model says during the micro-turn after ``turn``."""

    session_id: str
    turn: int
    audio: np.ndarray  # float32, shape (TURN_SAMPLES,), 16 kHz mono
    text: str = ""
    # Input text still queued for later micro-turns, in text ids (UTF-8 bytes; a marker
    # tag such as <result> is one): a model reads a few a micro-turn.
    text_waiting: int = 0


class MicroTurnModel(Protocol):
    """Anything the engine can step. Called from the engine thread only."""

    name: str
    weights: str  # what the weights are: "random", a checkpoint's name, or "none"
    decoding: str  # how output text is chosen: "greedy", "write_threshold P", or "none"

    def open_session(self, session_id: str) -> None:
        """Allocate per-session state; called before the session's first step."""

    def close_session(self, session_id: str) -> None:
        """Free every resource of the session; unknown ids are ignored."""

    def step(self, batch: Sequence[TurnInput]) -> list[TurnOutput]:
        """Advance each session in ``batch`` by one micro-turn, in one call.

        The batch holds at most one input per session. Outputs come back in the
        same order. A session's output must not depend on who else is in the batch.
        """
        ...
