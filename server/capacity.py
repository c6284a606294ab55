"""How many sessions this process can step on time, measured once at start-up.

Capacity is the largest session count whose batched step stays within
``budget`` (a fraction) of the 200 ms micro-turn, measured by stepping the model
with silent dummy sessions: 1, 2, 4, ... up to ``limit``. Runs before the
engine thread starts, so it has the model to itself.
"""

from __future__ import annotations

import logging
import statistics
import time

import numpy as np

from model.interface import TURN_MS, TURN_SAMPLES, MicroTurnModel, TurnInput

log = logging.getLogger(__name__)


def step_ms(model: MicroTurnModel, sessions: int, steps: int = 3) -> float:
    """Median step time (after one warm-up step) for ``sessions`` silent sessions."""
    ids = [f"capacity-probe-{i}" for i in range(sessions)]
    for session_id in ids:
        model.open_session(session_id)
    try:
        silence = np.zeros(TURN_SAMPLES, dtype=np.float32)
        times = []
        for turn in range(steps + 1):
            started = time.perf_counter()
            model.step([TurnInput(session_id, turn, silence) for session_id in ids])
            times.append((time.perf_counter() - started) * 1000)
        return statistics.median(times[1:])
    finally:
        for session_id in ids:
            model.close_session(session_id)


def measure_capacity(model: MicroTurnModel, limit: int, budget: float) -> tuple[int, dict[int, float]]:
    """(capacity, {sessions: step ms}) for ``model`` under ``budget`` of a micro-turn."""
    budget_ms = budget * TURN_MS
    measured: dict[int, float] = {}
    capacity, count = 0, 1
    while count <= limit:
        measured[count] = round(step_ms(model, count), 2)
        if measured[count] > budget_ms:
            break
        capacity = count
        if count == limit:
            break
        count = min(count * 2, limit)
    if capacity and capacity < limit and count in measured and measured[count] > budget_ms:
        # Between the last count that fit and the first that did not, assume the
        # step grows linearly with sessions.
        low, high = measured[capacity], measured[count]
        capacity += int((budget_ms - low) / (high - low) * (count - capacity))
    log.info("capacity %d sessions (step ms by sessions: %s, budget %.0f ms)", capacity, measured, budget_ms)
    return max(capacity, 1), measured
