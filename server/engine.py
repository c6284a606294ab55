"""The engine: steps every session that has a closed chunk, in one batched call.

It runs in its own thread, so the asyncio loop only moves bytes and never waits on
the model (torch releases the GIL inside its kernels). Sessions talk to it through
three thread-safe calls: ``open_session``, ``submit`` and ``close_session``. The
model is touched from the engine thread alone, so it needs no locks.

Ticks are driven by chunks, on a 200 ms grid from ``grid_origin``. Sessions pad
their input so their chunk boundaries fall on it (server/alignment.py), so their
chunks close together and one step serves them all. A tick starts as soon as
every open session has a chunk waiting, or ``batch_window_s`` after the first
chunk arrived, whichever comes first: a session whose phase drifted costs an
extra small step, never 200 ms of waiting.

Nothing is dropped: a session with a backlog (a slow step) gets one chunk per
step, in order, on the following ticks, and every step's overrun is reported.

Faults stay with the session that caused them. When ``model.step`` raises for a
batch, the engine steps its halves, and their halves, until only the session(s)
that fail alone are left: they get ``on_step_error`` (``step_failed``), everyone
else gets their output within the same tick. This relies on the model's step
being all-or-nothing (``StreamingModel`` and ``EchoModel`` are): a failed call
must leave every session as it was, so the retry computes the same bits. A
session that failed recently is stepped on its own, after the others, until it
succeeds; after ``MAX_FAILURES`` failures in a row its model state is reset
(``session_reset``). A model may also report sessions it reset itself (e.g. a NaN
in one session's state) through an optional ``faults`` attribute, a mapping of
session id to reason for the last step; the engine passes those on as
``session_reset`` too. A session the model cannot open (or reopen after a reset)
is let go with ``session_lost``: its owner must close it, since no output follows.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from opentelemetry import trace
from opentelemetry.trace import Link, SpanContext, Status, StatusCode

from model.interface import TURN_MS, TURN_SAMPLES, MicroTurnModel, TurnInput, TurnOutput
from model.text import TAG_BREAK
from server import telemetry as tm

log = logging.getLogger(__name__)

TURN_S = TURN_MS / 1000
# How long a step waits for the chunks of sessions not yet ready. A chunk closes when
# the frame holding its last sample arrives, and independent senders' 20 ms frames are
# out of phase, so sessions on the grid close up to 20 ms apart: 15 ms split some
# pairs for good, 25 ms none (python -m bench.batching; docs/benchmarks.md).
BATCH_WINDOW_S = 0.025
MAX_FAILURES = 3  # failed steps in a row after which a session's model state is reset

# Codes for ``SessionSink.on_step_error``:
STEP_FAILED = "step_failed"  # this session's step raised; its turn is skipped, its state kept
SESSION_RESET = "session_reset"  # its model state was reset: the model forgets the conversation
SESSION_LOST = "session_lost"  # the model could not take it (or take it back): the engine has let it go


@dataclass(frozen=True, slots=True)
class StepInfo:
    """How the step that produced an output went; shared by a whole batch."""

    tick: int
    batch_size: int  # sessions in the model call that produced it
    step_ms: float  # from the start of the tick to the output (with any retries after a fault)
    overran: bool  # that took longer than one micro-turn


class SessionSink(Protocol):
    """Where a session's results go. Called from the engine thread: implementations
    must hand off to their own thread (e.g. ``loop.call_soon_threadsafe``)."""

    @property
    def span_context(self) -> SpanContext | None:
        """The session's trace context, which the batch's ``model.step`` span links to."""

    def on_output(self, output: TurnOutput, info: StepInfo) -> None: ...

    def on_step_error(self, turn: int, message: str, code: str = STEP_FAILED) -> None:
        """No output for ``turn`` (``STEP_FAILED``), or the model's state for this
        session was reset (``SESSION_RESET``; an output may still have come)."""


@dataclass(slots=True)
class _Slot:
    sink: SessionSink
    inbox: deque[TurnInput]


class Engine:
    def __init__(self, model: MicroTurnModel, batch_window_s: float = BATCH_WINDOW_S,
                 tracer: trace.Tracer | None = None, on_step: Callable[[StepInfo], None] | None = None) -> None:
        self.model = model
        self.batch_window_s = batch_window_s
        self.tracer = tracer or trace.NoOpTracer()
        self._on_step = on_step or (lambda info: None)
        self.grid_origin = time.monotonic()
        self.ticks = 0
        self.overruns = 0
        self.last_step_ms = 0.0
        self.step_failures = 0  # sessions' turns lost to a failing step
        self.session_resets = 0  # sessions whose model state was reset
        self._slots: dict[str, _Slot] = {}
        self._failures: dict[str, int] = {}  # failed steps in a row, by session (engine thread only)
        self._to_open: list[str] = []
        self._to_close: list[str] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="microturn-engine", daemon=True)

    # -- called from any thread ------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def session_count(self) -> int:
        with self._cond:
            return len(self._slots)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def queued_chunks(self) -> int:
        with self._cond:
            return sum(len(slot.inbox) for slot in self._slots.values())

    def open_session(self, session_id: str, sink: SessionSink) -> None:
        with self._cond:
            if session_id in self._slots:
                raise ValueError(f"session {session_id} is already open")
            self._slots[session_id] = _Slot(sink, deque())
            self._to_open.append(session_id)
            self._cond.notify()

    def close_session(self, session_id: str) -> None:
        """Forget the session; queued chunks are discarded and no output follows."""
        with self._cond:
            if self._slots.pop(session_id, None) is not None:
                self._to_close.append(session_id)
                self._cond.notify()

    def submit(self, chunk: TurnInput) -> None:
        if chunk.audio.shape != (TURN_SAMPLES,):
            raise ValueError(f"a chunk holds {TURN_SAMPLES} samples, got {chunk.audio.shape}")
        with self._cond:
            slot = self._slots.get(chunk.session_id)
            if slot is None:
                return  # closed while the chunk was in flight
            slot.inbox.append(chunk)
            self._cond.notify()

    # -- the engine thread -------------------------------------------------------

    def _run(self) -> None:
        while True:
            batch, sinks = self._next_batch()
            if batch is None:
                break
            if batch:
                try:
                    self._step(batch, sinks)
                except Exception:  # a bug in a sink must not stop every session's engine
                    log.exception("engine step bookkeeping failed")
        for session_id in list(self._slots):
            self._safe_close(session_id)

    def _next_batch(self) -> tuple[list[TurnInput] | None, list[SessionSink]]:
        """Wait for work; return one chunk per ready session (None when stopping)."""
        with self._cond:
            while not self._stopping and not self._lifecycle_pending() and not self._any_ready():
                self._cond.wait()
            if self._stopping:
                return None, []
            self._apply_lifecycle()
            if not self._any_ready():
                return [], []
            deadline = time.monotonic() + self.batch_window_s
            while not self._all_ready() and not self._stopping:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            self._apply_lifecycle()
            ready = [slot for slot in self._slots.values() if slot.inbox]
            return [slot.inbox.popleft() for slot in ready], [slot.sink for slot in ready]

    def _lifecycle_pending(self) -> bool:
        return bool(self._to_open or self._to_close)

    def _apply_lifecycle(self) -> None:
        # Called with the lock held; the model calls are cheap bookkeeping.
        for session_id in self._to_close:
            self._safe_close(session_id)
            self._failures.pop(session_id, None)
        for session_id in self._to_open:
            slot = self._slots.get(session_id)
            if slot is None:
                continue
            try:
                self.model.open_session(session_id)
            except Exception as exc:  # e.g. no memory for its cache: this session only
                log.exception("model.open_session(%s) failed", session_id)
                del self._slots[session_id]
                _safely(slot.sink.on_step_error, -1, f"the model could not take this session: {exc}",
                        code=SESSION_LOST)
        self._to_close.clear()
        self._to_open.clear()

    def _safe_close(self, session_id: str) -> None:
        try:
            self.model.close_session(session_id)
        except Exception:
            log.exception("model.close_session(%s) failed", session_id)

    def _any_ready(self) -> bool:
        return any(slot.inbox for slot in self._slots.values())

    def _all_ready(self) -> bool:
        return all(slot.inbox for slot in self._slots.values())

    def _step(self, batch: Sequence[TurnInput], sinks: Sequence[SessionSink]) -> None:
        tick = self.ticks
        self.ticks += 1
        started = time.monotonic()
        work = list(zip(batch, sinks, strict=True))
        # Sessions that failed lately go alone, after the rest: a session whose input
        # keeps breaking the model then costs the others no retries.
        suspects = [item for item in work if self._failures.get(item[0].session_id)]
        healthy = [item for item in work if not self._failures.get(item[0].session_id)]
        groups = ([healthy] if healthy else []) + [[item] for item in suspects]
        for group in groups:
            self._step_isolating(tick, started, group)
        self.last_step_ms = (time.monotonic() - started) * 1000
        self.overruns += self.last_step_ms > TURN_MS

    def _step_isolating(self, tick: int, started: float, work: list[tuple[TurnInput, SessionSink]]) -> None:
        """Step ``work``; if the model raises, step each half instead, down to the
        sessions that fail on their own."""
        try:
            outputs = self._call_model(tick, work)
        except Exception as exc:  # noqa: BLE001 - any fault of a model step; _failed logs it
            if len(work) == 1:
                self._failed(*work[0], exc)
            else:
                self._step_isolating(tick, started, work[: len(work) // 2])
                self._step_isolating(tick, started, work[len(work) // 2 :])
            return
        step_ms = (time.monotonic() - started) * 1000
        info = StepInfo(tick, len(work), step_ms, step_ms > TURN_MS)
        self._on_step(info)
        faults: Mapping[str, str] = getattr(self.model, "faults", None) or {}
        for output, (chunk, sink) in zip(outputs, work, strict=True):
            self._failures.pop(chunk.session_id, None)
            _safely(sink.on_output, output, info)
            if chunk.session_id in faults:
                self.session_resets += 1
                _safely(sink.on_step_error, chunk.turn, faults[chunk.session_id], code=SESSION_RESET)

    def _call_model(self, tick: int, work: list[tuple[TurnInput, SessionSink]]) -> list[TurnOutput]:
        """One ``model.step`` under its own span."""
        batch = [chunk for chunk, _ in work]
        links = [Link(context) for _, sink in work if (context := sink.span_context) is not None]
        span = self.tracer.start_span(
            tm.SPAN_MODEL_STEP, links=links,
            attributes={tm.ATTR_TICK: tick, tm.ATTR_BATCH_SIZE: len(batch), tm.ATTR_ENGINE: self.model.name},
        )
        started = time.monotonic()
        try:
            outputs = self.model.step(batch)
            if len(outputs) != len(batch):
                raise RuntimeError(f"model returned {len(outputs)} outputs for {len(batch)} inputs")
        except Exception as exc:
            log.warning("model step failed for a batch of %d: %r", len(batch), exc)
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, str(exc)))
            span.end()
            raise
        step_ms = (time.monotonic() - started) * 1000
        span.set_attribute(tm.ATTR_STEP_MS, step_ms)
        span.set_attribute(tm.ATTR_OVERRAN, step_ms > TURN_MS)
        span.end()
        return outputs

    def _failed(self, chunk: TurnInput, sink: SessionSink, exc: Exception) -> None:
        """``chunk`` failed on its own: report it; reset the session after MAX_FAILURES in a row."""
        session_id = chunk.session_id
        log.error("model step failed for session %s, turn %d", session_id, chunk.turn, exc_info=exc)
        self.step_failures += 1
        failures = self._failures.get(session_id, 0) + 1
        if failures < MAX_FAILURES:
            self._failures[session_id] = failures
            _safely(sink.on_step_error, chunk.turn, f"model step failed: {exc}")
            return
        self._failures.pop(session_id, None)
        self.session_resets += 1
        self._safe_close(session_id)
        try:
            self.model.open_session(session_id)
        except Exception as reopen:  # it cannot come back: it is gone, like a failed open
            log.exception("model.open_session(%s) failed after a reset", session_id)
            with self._cond:
                self._slots.pop(session_id, None)
            _safely(sink.on_step_error, chunk.turn, f"the model could not take this session back: {reopen}",
                    code=SESSION_LOST)
            return
        _safely(sink.on_step_error, chunk.turn,
                f"model step failed {MAX_FAILURES} times in a row ({exc}); the session's model state was reset",
                code=SESSION_RESET)


def _safely(call: Callable[..., None], *args: object, **kwargs: object) -> None:
    """Call a sink; a broken one must not keep the other sessions' results from them."""
    try:
        call(*args, **kwargs)
    except Exception:
        log.exception("session sink %s failed", getattr(call, "__qualname__", call))


class EchoModel:
    """Diagnostic engine: each session hears its own chunk one micro-turn later.

    It measures what the transport alone costs (latency, CPU, continuity) with a
    model whose step takes no time. It is not the product. Its text is its text
    input, with the tags the session broke (typed text is content, model.text.literal)
    whole again: so a client scripts what "the model" writes, task requests included
    (a zero-width space typed after a "<" goes too: a diagnostic engine may lose it).
    """

    name = "echo"
    weights = "none"
    decoding = "none"

    def __init__(self) -> None:
        self._previous: dict[str, np.ndarray] = {}

    def open_session(self, session_id: str) -> None:
        self._previous[session_id] = np.zeros(TURN_SAMPLES, dtype=np.float32)

    def close_session(self, session_id: str) -> None:
        self._previous.pop(session_id, None)

    def step(self, batch: Sequence[TurnInput]) -> list[TurnOutput]:
        # All lookups before any change: a failing step changes nothing (see Engine).
        outputs = [TurnOutput(chunk.session_id, chunk.turn, self._previous[chunk.session_id],
                              chunk.text.replace(TAG_BREAK, "<")) for chunk in batch]
        for chunk in batch:
            self._previous[chunk.session_id] = chunk.audio
        return outputs


def model_threads() -> int:
    """Torch threads for the model: every core but one, which the event loop, aiortc's
    codec threads and the network need. On the 2-core VM, 2 threads made a 4-session
    step take 49 ms inside the loaded server against 29 ms with 1 (docs/benchmarks.md)."""
    return max(1, (os.cpu_count() or 2) - 1)


def _interaction_model(max_sessions: int, checkpoint: str | None, device: str) -> MicroTurnModel:
    # Imported here: torch takes a second or two to import, and the echo engine needs none of it.
    import torch

    from model.streaming import load_engine

    if "OMP_NUM_THREADS" not in os.environ:  # an explicit setting wins
        torch.set_num_threads(model_threads())
    return load_engine(checkpoint, max_sessions, device=device)


ENGINES = ("model", "echo")


def make_model(name: str, max_sessions: int = 32, checkpoint: str | None = None,
               device: str = "cpu") -> MicroTurnModel:
    """The engine's model by name: ``model`` (the interaction model, on ``device``) or ``echo``."""
    if name == "echo":
        return EchoModel()
    if name == "model":
        return _interaction_model(max_sessions, checkpoint, device)
    raise ValueError(f"unknown engine {name!r}; choose from {list(ENGINES)}")
