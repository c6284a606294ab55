"""The engine thread: batching, ordering, nothing dropped, errors contained."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import numpy as np
import pytest

from model.interface import TURN_SAMPLES, TurnInput, TurnOutput
from model.streaming import load_engine
from server.engine import MAX_FAILURES, SESSION_LOST, SESSION_RESET, STEP_FAILED, EchoModel, Engine, StepInfo


class Collector:
    """A session sink that records what the engine delivers (from its thread)."""

    span_context = None  # no trace to link to

    def __init__(self) -> None:
        self.outputs: list[tuple[TurnOutput, StepInfo]] = []
        self.errors: list[tuple[int, str]] = []
        self.codes: list[str] = []
        self.event = threading.Event()

    def on_output(self, output: TurnOutput, info: StepInfo) -> None:
        self.outputs.append((output, info))
        self.event.set()

    def on_step_error(self, turn: int, message: str, code: str = STEP_FAILED) -> None:
        self.errors.append((turn, message))
        self.codes.append(code)
        self.event.set()

    def wait_for(self, count: int, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.outputs) + len(self.errors) < count:
            assert time.monotonic() < deadline, f"got {len(self.outputs)} of {count}"
            time.sleep(0.005)


class SlowModel(EchoModel):
    """The echo model with a step that takes ``delay`` seconds, and optional faults."""

    def __init__(self, delay: float = 0.0, fail_on_turn: int | None = None) -> None:
        super().__init__()
        self.delay = delay
        self.fail_on_turn = fail_on_turn
        self.batches: list[list[tuple[str, int]]] = []

    def step(self, batch: Sequence[TurnInput]) -> list[TurnOutput]:
        self.batches.append([(c.session_id, c.turn) for c in batch])
        time.sleep(self.delay)
        if any(c.turn == self.fail_on_turn for c in batch):
            raise RuntimeError("boom")
        return super().step(batch)


class GatedModel(SlowModel):
    """The echo model whose step for ``gate_turn`` waits until the test releases it, so
    the test acts while that step is in flight however late its own thread runs (a
    sleep standing in for "the engine is now mid-step" fails on a stalled machine)."""

    def __init__(self, gate_turn: int) -> None:
        super().__init__()
        self.gate_turn = gate_turn
        self.entered, self.release = threading.Event(), threading.Event()

    def step(self, batch: Sequence[TurnInput]) -> list[TurnOutput]:
        if any(c.turn == self.gate_turn for c in batch):
            self.entered.set()
            assert self.release.wait(5.0), "the test never released the step"
        return super().step(batch)


class PickyModel(EchoModel):
    """The echo model, failing every step that includes a session in ``refuse``."""

    def __init__(self) -> None:
        super().__init__()
        self.refuse: set[str] = set()
        self.batches: list[list[str]] = []

    def step(self, batch: Sequence[TurnInput]) -> list[TurnOutput]:
        self.batches.append([c.session_id for c in batch])
        if refused := sorted(c.session_id for c in batch if c.session_id in self.refuse):
            raise RuntimeError(f"cannot step {refused}")
        return super().step(batch)


class BrokenSink(Collector):
    def on_output(self, output: TurnOutput, info: StepInfo) -> None:
        raise RuntimeError("sink bug")


def chunk(session_id: str, turn: int, value: float = 0.0) -> TurnInput:
    return TurnInput(session_id, turn, np.full(TURN_SAMPLES, value, dtype=np.float32))


@pytest.fixture
def engine_factory():
    engines: list[Engine] = []

    def make(model, **kwargs) -> Engine:
        engine = Engine(model, **kwargs)
        engine.start()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.stop()


def test_echo_returns_each_chunk_one_turn_later(engine_factory):
    engine = engine_factory(EchoModel())
    sink = Collector()
    engine.open_session("a", sink)
    for turn in range(3):
        engine.submit(chunk("a", turn, value=turn + 1))
    sink.wait_for(3)
    levels = [float(out.audio[0]) for out, _ in sink.outputs]
    assert [out.turn for out, _ in sink.outputs] == [0, 1, 2]
    assert levels == [0.0, 1.0, 2.0]


def test_sessions_with_closed_chunks_share_one_step(engine_factory):
    """A window far longer than the gaps (a 50 ms one split them once the test's own
    thread ran late); the step still starts once all are ready, not at the window's end."""
    model = SlowModel()
    engine = engine_factory(model, batch_window_s=1.0)
    sinks = {name: Collector() for name in "abc"}
    for name, sink in sinks.items():
        engine.open_session(name, sink)
    started = time.monotonic()
    for name in "abc":
        engine.submit(chunk(name, 0))
        time.sleep(0.005)  # chunks close a few ms apart
    for sink in sinks.values():
        sink.wait_for(1)
    assert time.monotonic() - started < 0.8, "waited out the window with every session ready"
    assert model.batches == [[("a", 0), ("b", 0), ("c", 0)]]
    infos = {sink.outputs[0][1] for sink in sinks.values()}
    assert len(infos) == 1 and infos.pop().batch_size == 3


def test_a_slow_step_backs_up_in_order_without_dropping(engine_factory):
    model = SlowModel(delay=0.25)  # longer than a micro-turn
    engine = engine_factory(model)
    sink = Collector()
    engine.open_session("a", sink)
    for turn in range(4):
        engine.submit(chunk("a", turn))
    sink.wait_for(4)
    assert [out.turn for out, _ in sink.outputs] == [0, 1, 2, 3]
    assert all(len(batch) == 1 for batch in model.batches), "one chunk per session per step"
    assert all(info.overran for _, info in sink.outputs)
    assert engine.overruns == 4


def test_a_failing_step_is_reported_and_the_engine_goes_on(engine_factory):
    engine = engine_factory(SlowModel(fail_on_turn=1))
    sink = Collector()
    engine.open_session("a", sink)
    for turn in range(3):
        engine.submit(chunk("a", turn))
    sink.wait_for(3)
    assert [turn for turn, _ in sink.errors] == [1]
    assert "boom" in sink.errors[0][1]
    assert [out.turn for out, _ in sink.outputs] == [0, 2]


def test_closing_a_session_discards_its_queue_and_frees_the_model_state(engine_factory):
    model = GatedModel(gate_turn=1)
    engine = engine_factory(model)
    sink = Collector()
    engine.open_session("a", sink)
    for turn in range(5):
        engine.submit(chunk("a", turn))
    assert model.entered.wait(5.0)  # turn 1 is being stepped; 2-4 wait in the queue
    engine.close_session("a")
    engine.submit(chunk("a", 9))  # in flight when it closed: ignored
    model.release.set()
    assert engine.session_count == 0
    deadline = time.monotonic() + 2
    while "a" in model._previous and time.monotonic() < deadline:
        time.sleep(0.01)
    assert "a" not in model._previous
    assert model.batches == [[("a", 0)], [("a", 1)]], "the closed session's queue was stepped"
    assert [out.turn for out, _ in sink.outputs] in ([0], [0, 1])
    with pytest.raises(ValueError):
        engine.submit(TurnInput("b", 0, np.zeros(10, dtype=np.float32)))


def test_a_session_that_joins_mid_step_waits_at_most_one_step(engine_factory):
    model = GatedModel(gate_turn=0)
    engine = engine_factory(model)
    early, late = Collector(), Collector()
    engine.open_session("early", early)
    engine.submit(chunk("early", 0))
    assert model.entered.wait(5.0)  # the engine is now inside early's step
    engine.open_session("late", late)
    engine.submit(chunk("late", 0))
    engine.submit(chunk("early", 1))
    model.release.set()
    late.wait_for(1)
    early.wait_for(2)
    # late was stepped in the very next step, together with early's next chunk.
    assert model.batches[0] == [("early", 0)]
    assert sorted(model.batches[1]) == [("early", 1), ("late", 0)]


def test_a_failing_session_is_found_and_only_it_loses_its_turn(engine_factory):
    model = PickyModel()
    engine = engine_factory(model, batch_window_s=1.0)
    sinks = {name: Collector() for name in "abcd"}
    for name, sink in sinks.items():
        engine.open_session(name, sink)

    def turn(t: int) -> None:
        for name in "abcd":
            engine.submit(chunk(name, t, value=t + 1))
        for sink in sinks.values():
            sink.wait_for(t + 1)

    turn(0)
    model.refuse = {"b"}
    model.batches.clear()
    turn(1)
    # Halves of the batch, down to the session that fails alone; in one tick.
    assert model.batches == [["a", "b", "c", "d"], ["a", "b"], ["a"], ["b"], ["c", "d"]]
    assert sinks["b"].errors == [(1, "model step failed: cannot step ['b']")]
    assert all(sinks[name].outputs[-1][0].turn == 1 for name in "acd")
    assert {sinks[name].outputs[-1][1].tick for name in "acd"} == {1}
    model.batches.clear()
    for t in range(2, 1 + MAX_FAILURES):
        turn(t)
    # A suspect steps alone, after the others; at MAX_FAILURES in a row it is reset.
    assert model.batches == [["a", "c", "d"], ["b"]] * (MAX_FAILURES - 1)
    assert sinks["b"].codes == [STEP_FAILED] * (MAX_FAILURES - 1) + [SESSION_RESET]
    assert engine.step_failures == MAX_FAILURES and engine.session_resets == 1
    model.refuse.clear()
    model.batches.clear()
    turn(1 + MAX_FAILURES)
    assert model.batches == [["a", "b", "c", "d"]]
    # The echo model's state for b was reset: it says silence, not its turn-0 chunk.
    assert not sinks["b"].outputs[-1][0].audio.any()
    assert sinks["a"].outputs[-1][0].audio[0] == MAX_FAILURES + 1
    assert [out.turn for out, _ in sinks["a"].outputs] == list(range(2 + MAX_FAILURES))


def test_a_broken_sink_does_not_keep_outputs_from_the_others(engine_factory):
    engine = engine_factory(EchoModel(), batch_window_s=1.0)
    broken, fine = BrokenSink(), Collector()
    engine.open_session("broken", broken)
    engine.open_session("fine", fine)
    for turn in range(3):
        engine.submit(chunk("broken", turn))
        engine.submit(chunk("fine", turn))
    fine.wait_for(3)
    assert [out.turn for out, _ in fine.outputs] == [0, 1, 2]


class RaisingOnErrorSink(Collector):
    def on_step_error(self, turn: int, message: str, code: str = STEP_FAILED) -> None:
        super().on_step_error(turn, message, code)
        raise RuntimeError("sink bug")


def test_a_session_the_model_cannot_take_is_let_go_and_the_engine_goes_on(engine_factory):
    """The real model with room for one session: the second cannot be opened. It is told
    ``session_lost`` (its owner must close it: no output will follow), even a sink that
    raises on it does not stop the engine thread, and the first session is served."""
    engine = engine_factory(load_engine(None, max_sessions=1))
    first, second = Collector(), RaisingOnErrorSink()
    engine.open_session("first", first)
    engine.open_session("second", second)
    for turn in range(2):
        engine.submit(chunk("first", turn))
        engine.submit(chunk("second", turn))  # dropped: the engine let it go
    first.wait_for(2)
    second.wait_for(1)
    assert engine.alive and engine.session_count == 1
    assert second.codes == [SESSION_LOST] and second.errors[0][0] == -1
    assert "the KV pool is full" in second.errors[0][1] and not second.outputs
    assert [out.turn for out, _ in first.outputs] == [0, 1] and not first.errors
