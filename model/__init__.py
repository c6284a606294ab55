"""microturn's interaction model: importable and testable without the server."""

from model.interface import (
    SAMPLE_RATE,
    TURN_MS,
    TURN_SAMPLES,
    MicroTurnModel,
    TurnInput,
    TurnOutput,
)

__all__ = [
    "SAMPLE_RATE",
    "TURN_MS",
    "TURN_SAMPLES",
    "MicroTurnModel",
    "TurnInput",
    "TurnOutput",
]
