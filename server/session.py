"""One WebRTC session: a peer connection wired to the engine.

Incoming audio -> AudioChunker -> engine.submit; engine output -> OutputAudioTrack;
events both ways on the ``events`` data channel. Everything here runs on the event
loop except ``on_output``/``on_step_error``, which the engine thread calls and
which only hop back onto the loop.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import av
import numpy as np
from aiortc import RTCDataChannel, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from opentelemetry import trace
from opentelemetry.context import Context

from model.interface import SAMPLE_RATE, TURN_MS, TURN_SAMPLES, TurnInput, TurnOutput
from server import telemetry as tm
from server.config import ServerConfig
from server.engine import Engine, StepInfo
from server.events import CHANNEL_LABEL, PROTOCOL_VERSION, ProtocolError, error_event, parse_client_message, server_event
from server.ice import add_host_candidates, rtc_configuration
from server.media_in import AudioChunker
from server.media_out import OutputAudioTrack

log = logging.getLogger(__name__)

_MAX_EARLY_EVENTS = 64  # events kept for a data channel that is not open yet
_WATCHDOG_PERIOD_S = 0.1


@dataclass(slots=True)
class SessionStats:
    frames_in: int = 0
    chunks_in: int = 0
    turns_out: int = 0
    input_rms_max: float = 0.0  # loudest 200 ms chunk heard, linear RMS
    output_rms_max: float = 0.0
    step_errors: int = 0
    protocol_errors: int = 0
    overruns: int = 0


class Session:
    def __init__(
        self,
        session_id: str,
        config: ServerConfig,
        engine: Engine,
        tracer: trace.Tracer,
        parent: Context | None,
        on_closed: Callable[[Session], None],
    ) -> None:
        self.id = session_id
        self.config = config
        self.engine = engine
        self.tracer = tracer
        self.loop = asyncio.get_running_loop()
        self.pc = RTCPeerConnection(rtc_configuration(config.ice_servers))
        self.output = OutputAudioTrack(config.playout_delay_ms)
        self.stats = SessionStats()
        self.channel: RTCDataChannel | None = None
        self.close_reason: str | None = None
        self._on_closed = on_closed
        self._chunker: AudioChunker | None = None
        self._clock_wall = 0.0  # wall time matching the end of the audio consumed so far
        self._chunk_closed_ns: dict[int, int] = {}
        self._early_events: list[str] = []
        self._ready_sent = False
        self._tasks: set[asyncio.Task[None]] = set()
        self.span = tracer.start_span(
            tm.SPAN_SESSION,
            context=parent,
            attributes={tm.ATTR_SESSION_ID: session_id, tm.ATTR_ENGINE: engine.model.name},
        )
        self.trace_id = format(self.span.get_span_context().trace_id, "032x")

    # -- signalling ----------------------------------------------------------

    async def accept(self, offer_sdp: str) -> str:
        """Apply the client's offer; return the answer SDP (candidates included)."""
        self.pc.on("track", self._on_track)
        self.pc.on("datachannel", self._on_datachannel)
        self.pc.on("connectionstatechange", self._on_connection_state)
        await self.pc.setRemoteDescription(RTCSessionDescription(offer_sdp, "offer"))
        self.pc.addTrack(self.output)
        answer = await self.pc.createAnswer()
        await add_host_candidates(self.pc, self.config.ice_host_addresses)
        await self.pc.setLocalDescription(answer)
        self.engine.open_session(self.id, self)
        return self.pc.localDescription.sdp

    async def close(self, reason: str) -> None:
        """Release everything the session holds. Safe to call more than once."""
        if self.close_reason is not None:
            return
        self.close_reason = reason
        self.engine.close_session(self.id)
        current = asyncio.current_task()
        for task in list(self._tasks):
            if task is not current:
                task.cancel()
        self.output.stop()
        await self.pc.close()
        self.span.set_attribute(tm.ATTR_CLOSE_REASON, reason)
        self.span.end()
        self._on_closed(self)

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "engine": self.engine.model.name,
            "connection_state": self.pc.connectionState,
            "channel_open": self.channel is not None and self.channel.readyState == "open",
            "next_turn": self._chunker.next_turn if self._chunker else 0,
            "chunker": asdict(self._chunker.stats) if self._chunker else None,
            "output": {
                "frames_sent": self.output.frames_sent,
                "silent_frames": self.output.silent_frames,
                "flushed_frames": self.output.flushed_frames,
                "queued_ms": self.output.queued_ms,
            },
            **asdict(self.stats),
            "trace_id": self.trace_id,
        }

    # -- media in --------------------------------------------------------------

    def _on_track(self, track: MediaStreamTrack) -> None:
        if track.kind == "audio":
            self._spawn(self._read_audio(track))
            self._spawn(self._watch_for_stalls())
        else:
            # Video joins the model in a later step; until then read and drop it so
            # aiortc's unbounded receive queue cannot grow.
            self._spawn(self._drain(track))

    async def _read_audio(self, track: MediaStreamTrack) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            assert isinstance(frame, av.AudioFrame)
            self.stats.frames_in += 1
            now = time.monotonic()
            if self._chunker is None:
                self._chunker = self._new_chunker(frame, now)
            self._clock_wall = now
            for chunk in self._chunker.push(frame):
                self._submit(chunk)
            if not self._ready_sent:
                self._send_ready()

    def _new_chunker(self, first: av.AudioFrame, now: float) -> AudioChunker:
        first_16k = first.samples * SAMPLE_RATE // first.sample_rate
        closes_at = now + (TURN_SAMPLES - first_16k) / SAMPLE_RATE
        return AudioChunker(lead_in_samples=self.engine.lead_in_samples(closes_at))

    async def _watch_for_stalls(self) -> None:
        """Keep the session clock moving while the sender is silent or cut off."""
        while True:
            await asyncio.sleep(_WATCHDOG_PERIOD_S)
            chunker = self._chunker
            if chunker is None or chunker.input_rate is None:
                continue
            now = time.monotonic()
            stalled_for = now - self._clock_wall
            if stalled_for < self.config.stall_after_s:
                continue
            for chunk in chunker.fill_silence(int(stalled_for * chunker.input_rate)):
                self._submit(chunk)
            self._clock_wall = now

    def _submit(self, chunk: np.ndarray) -> None:
        assert self._chunker is not None
        turn = self._chunker.next_turn - 1
        self.stats.chunks_in += 1
        self.stats.input_rms_max = max(self.stats.input_rms_max, _rms(chunk))
        self._chunk_closed_ns[turn] = time.time_ns()
        self.engine.submit(TurnInput(self.id, turn, chunk))

    async def _drain(self, track: MediaStreamTrack) -> None:
        while True:
            try:
                await track.recv()
            except MediaStreamError:
                return

    # -- engine output (called on the engine thread) ------------------------------

    def on_output(self, output: TurnOutput, info: StepInfo) -> None:
        self.loop.call_soon_threadsafe(self._deliver, output, info)

    def on_step_error(self, turn: int, message: str) -> None:
        self.loop.call_soon_threadsafe(self._report_step_error, turn, message)

    def _deliver(self, output: TurnOutput, info: StepInfo) -> None:
        if self.close_reason is not None:
            return
        self.output.enqueue(output.audio)
        self.stats.turns_out += 1
        self.stats.overruns += info.overran
        self.stats.output_rms_max = max(self.stats.output_rms_max, _rms(output.audio))
        closed_ns = self._chunk_closed_ns.pop(output.turn, None)
        self._trace_microturn(output, info, closed_ns)
        event: dict[str, Any] = {
            "turn": output.turn,
            "t_ms": (output.turn + 1) * TURN_MS,
            "step_ms": round(info.step_ms, 2),
            "batch": info.batch_size,
        }
        if info.overran:
            event["overran"] = True
        self.send(server_event("turn", **event))
        if output.text:
            self.send(server_event("transcript.delta", turn=output.turn, text=output.text))

    def _trace_microturn(self, output: TurnOutput, info: StepInfo, closed_ns: int | None) -> None:
        span = self.tracer.start_span(
            tm.SPAN_MICROTURN,
            context=trace.set_span_in_context(self.span),
            start_time=closed_ns,
            attributes={
                tm.ATTR_SESSION_ID: self.id,
                tm.ATTR_TURN: output.turn,
                tm.ATTR_TICK: info.tick,
                tm.ATTR_BATCH_SIZE: info.batch_size,
                tm.ATTR_STEP_MS: info.step_ms,
                tm.ATTR_OVERRAN: info.overran,
                tm.ATTR_QUEUE_MS: self.output.queued_ms,
            },
        )
        span.end()

    def _report_step_error(self, turn: int, message: str) -> None:
        if self.close_reason is not None:
            return
        self.stats.step_errors += 1
        self._chunk_closed_ns.pop(turn, None)
        self.send(error_event("step_failed", message, turn=turn))

    # -- data channel -----------------------------------------------------------------

    def _on_datachannel(self, channel: RTCDataChannel) -> None:
        if channel.label != CHANNEL_LABEL:
            channel.close()
            return
        self.channel = channel
        channel.on("message", self._on_message)
        channel.on("open", self._flush_early_events)
        if channel.readyState == "open":
            self._flush_early_events()

    def send(self, text: str) -> None:
        channel = self.channel
        if channel is not None and channel.readyState == "open":
            channel.send(text)
        elif len(self._early_events) < _MAX_EARLY_EVENTS:
            self._early_events.append(text)

    def _flush_early_events(self) -> None:
        events, self._early_events = self._early_events, []
        for text in events:
            self.send(text)
        if not self._ready_sent and self.stats.frames_in:
            self._send_ready()

    def _send_ready(self) -> None:
        """``session.ready``: media flows and the channel is open."""
        if self.channel is None or self.channel.readyState != "open":
            return
        self._ready_sent = True
        self.send(
            server_event(
                "session.ready",
                session_id=self.id,
                engine=self.engine.model.name,
                weights=self.engine.model.weights,
                turn_ms=TURN_MS,
                sample_rate=SAMPLE_RATE,
                protocol=PROTOCOL_VERSION,
                trace_id=self.trace_id,
            )
        )

    def _on_message(self, raw: str | bytes) -> None:
        try:
            message = parse_client_message(raw)
        except ProtocolError as exc:
            self.stats.protocol_errors += 1
            self.send(error_event(exc.code, exc.message))
            return
        if message["type"] == "ping":
            self.send(
                server_event(
                    "pong", id=message.get("id"), t=message.get("t"), server_ms=round(time.time() * 1000)
                )
            )

    # -- lifecycle --------------------------------------------------------------------

    async def _on_connection_state(self) -> None:
        if self.pc.connectionState in ("failed", "closed"):
            await self.close(f"peer connection {self.pc.connectionState}")

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("session %s task failed", self.id, exc_info=task.exception())
            self._spawn(self.close(f"internal error: {task.exception()!r}"))


def _rms(audio: np.ndarray) -> float:
    value = float(np.sqrt(np.mean(np.square(audio, dtype=np.float64))))
    return value if math.isfinite(value) else 0.0
