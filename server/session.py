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
from aiortc.exceptions import InvalidAccessError, InvalidStateError
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.rtcsctptransport import WEBRTC_STRING
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanContext

from model.interface import SAMPLE_RATE, TURN_MS, TURN_SAMPLES, TurnInput, TurnOutput
from model.text import encode as encode_text
from model.text import literal
from server import telemetry as tm
from server.alignment import MIN_EVIDENCE_S, QUIET_RMS, QuietFloor, SenderClock, is_on_grid, padding_to_grid
from server.config import ServerConfig
from server.engine import SESSION_LOST, SESSION_RESET, TURN_S, Engine, StepInfo
from server.events import CHANNEL_LABEL, PROTOCOL_VERSION, ProtocolError, RateLimit, parse_client_message, server_event
from server.ice import IceServer, add_host_candidates, passive_dtls, rtc_configuration
from server.media_in import AudioChunker
from server.media_out import OutputAudioTrack
from server.metrics import Metrics
from server.recording import RecordingWriter
from server.rtp_tuning import set_audio_jitter_prefetch
from server.tasks import TaskError, TaskManager, TaskRequestParser
from server.tools import Tool
from server.whep import Viewer

log = logging.getLogger(__name__)

_MAX_EARLY_EVENTS = 64  # events kept for a data channel that is not open yet
_WATCHDOG_PERIOD_S = 0.1
_PEER_WATCH_PERIOD_S = 0.25
_RECORDED_VIDEO_WIDTH = 160  # pixels; the height keeps the camera's aspect ...
_RECORDED_VIDEO_MAX_HEIGHT = 320  # ... up to 1:2 portrait (a 2×16383 stream must not cost 600 MiB a turn)
_ALIGN_FRAMES = 5  # frames whose arrival times place the first chunk on the engine grid
_ALIGN_CHECK_TURNS = 5  # turns between checks that the chunks still close on the grid
_REALIGN_HOLDOFF_TURNS = 50  # and after padding, before the next (the estimate is noisy)


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
    text_inputs: int = 0
    tasks_created: int = 0


class Session:
    def __init__(
        self,
        session_id: str,
        config: ServerConfig,
        engine: Engine,
        tracer: trace.Tracer,
        parent: Context | None,
        on_closed: Callable[[Session], None],
        tools: dict[str, Tool],
        metrics: Metrics,
        ice_servers: list[IceServer] | None = None,
        recording: RecordingWriter | None = None,
    ) -> None:
        self.id = session_id
        self.config = config
        self.engine = engine
        self.tracer = tracer
        self.loop = asyncio.get_running_loop()
        # STUN/TURN for this session (TURN credentials may be per session); the client
        # gets the same list in WHIP Link headers.
        self.ice_servers = ice_servers or []
        self.pc = RTCPeerConnection(rtc_configuration(self.ice_servers))
        self.viewers: dict[str, Viewer] = {}  # WHEP peers playing this session's voice
        self.output = OutputAudioTrack(config.playout_delay_ms)
        self.stats = SessionStats()
        self.channel: RTCDataChannel | None = None
        self.close_reason: str | None = None
        self.ending_reason: str | None = None  # set once ``session.ending`` went out
        self._last_heard = time.monotonic()  # the peer's last audio frame or message
        # Each side's recent loudness: where its background sits, for realigning only in
        # quiet (server/alignment.py), and the model's last turn, for draining.
        self._input_quiet, self._output_quiet = QuietFloor(), QuietFloor()
        self._on_closed = on_closed
        self._chunker: AudioChunker | None = None
        self._first_frames: list[av.AudioFrame] = []  # held until the chunker is aligned
        self._sender_clock = SenderClock()  # when the sender's audio arrives by our clock
        self._sender_restarts = (0, 0, 0)  # the chunker's discontinuities, format changes, stalls
        self._next_alignment_check = 0  # turn
        self._clock_wall = 0.0  # wall time matching the end of the audio consumed so far
        self._chunk_closed_ns: dict[int, int] = {}
        self._chunk_rms: dict[int, float] = {}
        self._early_events: list[tuple[str, dict[str, Any]]] = []
        self._ready_sent = False
        self._audio_track_seen = False
        self._tasks: set[asyncio.Task[None]] = set()
        self.span = tracer.start_span(
            tm.SPAN_SESSION,
            context=parent,
            attributes={tm.ATTR_SESSION_ID: session_id, tm.ATTR_ENGINE: engine.model.name},
        )
        self.trace_id = format(self.span.get_span_context().trace_id, "032x")
        # Time-aligned record of the session (the client consented); never blocks the loop.
        self.recorder = recording.open(
            session_id, {"engine": engine.model.name, "weights": engine.model.weights,
                         "decoding": engine.model.decoding, "trace_id": self.trace_id},
            on_failure=lambda message: self.loop.call_soon_threadsafe(self._recording_failed, message),
        ) if recording is not None else None
        self.metrics = metrics
        self.tasks = TaskManager(
            tools, self.emit, self._queue_task_result, tracer, self.span,
            max_concurrent=config.max_tasks_per_session, on_finish=self._task_finished,
        )
        self._task_requests = TaskRequestParser(default_tool="chat" if "chat" in tools else "calc", tools=tools)
        self._model_text: list[str] = []  # text entering the model at the next micro-turn
        # Input text not yet read by the model, in its text ids: what waits for the next
        # micro-turn, what was submitted with turns it has not answered yet (turn -> the
        # text and its ids: a failed turn's text is sent again), and what it last
        # reported still queued in it.
        self._model_text_ids = 0
        self._text_in_flight: dict[int, tuple[str, int]] = {}
        self._retried_text: list[str] = []  # failed turns' text, in turn order: it goes first
        self._text_waiting_in_model = 0
        self._rate = RateLimit(config.messages_per_second, config.message_burst)
        self._metrics_task: asyncio.Task[None] | None = None

    # -- signalling ----------------------------------------------------------

    async def accept(self, offer_sdp: str) -> str:
        """Apply the client's offer; return the answer SDP (candidates included)."""
        self.pc.on("track", self._on_track)
        self.pc.on("datachannel", self._on_datachannel)
        self.pc.on("connectionstatechange", self._on_connection_state)
        try:
            await self.pc.setRemoteDescription(RTCSessionDescription(offer_sdp, "offer"))
        except (ValueError, InvalidAccessError, InvalidStateError):
            raise
        except Exception as exc:  # aiortc tripping over an offer validate_offer let through
            log.warning("session %s: aiortc could not apply the offer: %r", self.id, exc)
            raise ValueError(f"aiortc could not apply it ({type(exc).__name__})") from exc
        self._refuse_undecodable_text()
        audio_receivers = sum(t.kind == "audio" for t in self.pc.getTransceivers())
        if set_audio_jitter_prefetch(self.pc, self.config.jitter_prefetch) != audio_receivers:
            # aiortc renamed what rtp_tuning touches: everything works, 60 ms slower.
            log.warning("could not set the audio jitter buffer (aiortc changed?); using aiortc's default")
        self.pc.addTrack(self.output)
        answer = await self.pc.createAnswer()
        await add_host_candidates(self.pc, self.config.ice_host_addresses)
        await self.pc.setLocalDescription(passive_dtls(answer) if "a=setup:actpass" in offer_sdp else answer)
        self.output.pre_encode = self.config.pre_encode_opus and self._negotiated_opus()
        if not self._sends_voice():
            # A send-only WHIP publisher hears nothing back, so no sender paces the
            # voice: pace it here, for turn timing and for WHEP viewers.
            self._spawn(self._pace_unsent_voice())
        self.engine.open_session(self.id, self)
        self._spawn(self._close_unless_connected(self.config.connect_timeout_s))
        self._spawn(self._close_if_vanished())
        if self.config.max_session_s > 0:
            self._spawn(self._end_after(self.config.max_session_s))
        return self.pc.localDescription.sdp

    def _negotiated_opus(self) -> bool:
        """Whether our audio goes out as Opus (then the track hands aiortc Opus packets)."""
        for transceiver in self.pc.getTransceivers():
            if transceiver.sender.track is self.output:
                codecs = transceiver._codecs  # aiortc keeps the negotiated list here, first = used
                return bool(codecs) and codecs[0].mimeType.lower() == "audio/opus"
        return False

    def _sends_voice(self) -> bool:
        return any(t.sender.track is self.output and "send" in (t.currentDirection or "")
                   for t in self.pc.getTransceivers())

    async def _pace_unsent_voice(self) -> None:
        while True:
            try:
                await self.output.recv()
            except MediaStreamError:
                return

    async def add_viewer(self, viewer_id: str, offer_sdp: str) -> tuple[Viewer, str]:
        """A WHEP viewer of this session's voice; its answer SDP. ValueError for an
        offer that cannot receive audio (the viewer is then already closed)."""
        viewer = Viewer(viewer_id, self.output, self.ice_servers, self.config.ice_host_addresses,
                        lambda v: self.viewers.pop(v.id, None))
        self.viewers[viewer_id] = viewer
        try:
            return viewer, await viewer.accept(offer_sdp, self.config.connect_timeout_s)
        except BaseException:
            await viewer.close("offer rejected")
            raise

    async def _close_unless_connected(self, timeout_s: float) -> None:
        """A client that never completes ICE must not hold a slot: aioice keeps waiting
        for more candidates unless the offer said end-of-candidates."""
        await asyncio.sleep(timeout_s)
        if self.pc.connectionState != "connected":
            await self.close(f"not connected within {timeout_s:g} s")

    async def _close_if_vanished(self) -> None:
        """A peer that went away without closing (lid shut, network gone) sends
        nothing more; ICE consent would notice only after 30 s."""
        timeout = self.config.peer_timeout_s
        while True:
            await asyncio.sleep(_PEER_WATCH_PERIOD_S)
            if self.pc.connectionState != "connected":
                self._last_heard = time.monotonic()  # the connect timeout covers this phase
            elif time.monotonic() - self._last_heard > timeout:
                await self.close(f"peer vanished (nothing heard for {timeout:g} s)")
                return

    async def _end_after(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        await self.end("max_duration", self.config.drain_timeout_s)

    async def end(self, reason: str, drain_s: float) -> None:
        """End gracefully: tell the client (``session.ending``), let the reply being
        spoken and the running tasks finish — at most ``drain_s`` — then close."""
        if self.ending_reason is not None or self.close_reason is not None:
            return
        self.ending_reason = reason
        deadline = time.monotonic() + drain_s
        self.emit("session.ending", reason=reason, deadline_ms=round((time.time() + drain_s) * 1000))
        while time.monotonic() < deadline and self.close_reason is None:
            if self.tasks.running == 0 and self._output_quiet.latest < QUIET_RMS:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(min(0.1, max(0.0, deadline - time.monotonic())))  # let the last events go out
        await self.close(reason)

    async def close(self, reason: str) -> None:
        """Release everything the session holds. Safe to call more than once."""
        if self.close_reason is not None:
            return
        self.close_reason = reason
        try:
            self.engine.close_session(self.id)
            current = asyncio.current_task()
            for task in list(self._tasks):
                if task is not current:
                    task.cancel()
            # One viewer failing to close must not leave the session's own connection open.
            closed = await asyncio.gather(*(v.close("session ended") for v in list(self.viewers.values())),
                                          return_exceptions=True)
            for failure in [c for c in closed if isinstance(c, Exception)]:
                log.error("session %s: closing a viewer failed: %r", self.id, failure)
            self.output.stop()
            await self.tasks.close()
            await self.pc.close()
        finally:  # whatever failed above, the session is gone and its slot free
            if self.recorder is not None:
                self.recorder.close(reason)  # the writer thread writes the manifest after every record
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
                "underrun_frames": self.output.underrun_frames,
                "flushed_frames": self.output.flushed_frames,
                "dropped_frames": self.output.dropped_frames,
                "tick_realignments": self.output.tick_realignments,
                "queued_ms": self.output.queued_ms,
            },
            **asdict(self.stats),
            "viewers": [v.describe() for v in self.viewers.values()],
            "tasks_running": self.tasks.running,
            "text_waiting": self.text_waiting,  # input text the model has yet to read, in its text ids
            "trace_id": self.trace_id,
        }

    @property
    def span_context(self) -> SpanContext:
        return self.span.get_span_context()

    # -- media in --------------------------------------------------------------

    def _on_track(self, track: MediaStreamTrack) -> None:
        if track.kind == "audio" and not self._audio_track_seen:
            self._audio_track_seen = True
            self._spawn(self._read_audio(track))
            self._spawn(self._watch_for_stalls())
        else:
            # One microphone per session: further audio tracks are read and dropped
            # (two timebases cannot share one session clock). Video joins the model
            # in a later step; until then it is dropped too, so aiortc's unbounded
            # receive queue cannot grow.
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
            self._clock_wall = self._last_heard = now
            if self._chunker is None:
                # Held until their arrivals say where the first chunk should close.
                self._first_frames.append(frame)
                self._sender_clock.observe(now, sum(f.samples / f.sample_rate for f in self._first_frames))
                if len(self._first_frames) < _ALIGN_FRAMES:
                    continue
                self._chunker = self._new_chunker()
                frames, self._first_frames = self._first_frames, []
            else:
                frames = [frame]
            for each in frames:
                closed = self._chunker.push(each)
                if len(frames) == 1:  # (the held frames were observed as they came)
                    self._observe_sender_clock(now)
                self._submit_all(closed)
            if not self._ready_sent:
                self._send_ready()

    def _new_chunker(self) -> AudioChunker:
        """A chunker whose lead-in puts this session's chunk closes on the engine's grid.

        When chunks close follows from when frames arrive. The first frames of a call
        often come in a burst (sent during the handshake), so one frame's arrival says
        little; the earliest arrival relative to media time over the first few frames
        is the sender's real-time clock (a burst only makes frames late). Sessions
        aligned from a single frame missed their neighbours' steps one time in five.
        Later frames refine the estimate (``_realign_if_off_grid``).
        """
        offset = self._sender_clock.offset
        assert offset is not None
        # Without a lead-in the first chunk closes when its last sample arrives.
        return AudioChunker(lead_in_samples=padding_to_grid(offset + TURN_S, self.engine.grid_origin))

    def _observe_sender_clock(self, arrived: float) -> None:
        """Refine the sender's clock with a frame just consumed (server/alignment.py)."""
        chunker = self._chunker
        assert chunker is not None
        # A new media clock, or a stall (media time moved on without frames, and the
        # first frames back come in a late burst): start over.
        restarts = (chunker.stats.discontinuities, chunker.stats.format_changes, chunker.stats.stall_samples)
        if restarts != self._sender_restarts:
            self._sender_restarts = restarts
            self._sender_clock.reset()
        self._sender_clock.observe(arrived, chunker.media_seconds)

    def _realign_if_off_grid(self) -> list[np.ndarray]:
        """Pad the input back onto the engine's grid if the sender's clock, now known
        better than from the first frames, says it has left it. Only while the user
        is quiet: the model then hears a slightly longer silence, never a cut word.
        And only while the model is quiet: after a pad its turns arrive up to 200 ms
        sooner, deepening the output queue by as much; the output track drops queued
        silence at once, but a reply in progress would play that much later."""
        chunker = self._chunker
        assert chunker is not None
        offset = self._sender_clock.offset
        if (chunker.next_turn < self._next_alignment_check  # the cheap test first: it runs every chunk
                or offset is None or self._sender_clock.evidence_s < MIN_EVIDENCE_S
                or not self._input_quiet.is_quiet(self._input_quiet.latest)
                or not self._output_quiet.is_quiet(self._output_quiet.latest)):
            return []
        self._next_alignment_check = chunker.next_turn + _ALIGN_CHECK_TURNS
        boundary_at = offset + chunker.media_seconds + chunker.samples_to_boundary / SAMPLE_RATE
        padding = padding_to_grid(boundary_at, self.engine.grid_origin)
        if is_on_grid(padding):
            return []
        self._next_alignment_check = chunker.next_turn + _REALIGN_HOLDOFF_TURNS
        log.info("session %s: chunks %.1f ms off the engine grid; padding %d samples",
                 self.id, min(padding, TURN_SAMPLES - padding) * 1000 / SAMPLE_RATE, padding)
        self.output.realign_from_turn(chunker.next_turn)  # the first turn the pad moves
        return chunker.pad(padding)

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
            self._submit_all(chunker.fill_silence(int(stalled_for * chunker.input_rate)))
            self._clock_wall = now

    def _submit_all(self, chunks: list[np.ndarray]) -> None:
        """Hand closed chunks to the engine; the chunker has already counted them."""
        assert self._chunker is not None
        first = self._chunker.next_turn - len(chunks)
        for offset, chunk in enumerate(chunks):
            self._submit(first + offset, chunk)
        if chunks:  # right after a boundary: the place to move the next one (once:
            # a pad puts off the next check, so the inner call submits and stops)
            self._submit_all(self._realign_if_off_grid())

    def _submit(self, turn: int, chunk: np.ndarray) -> None:
        """Hand one chunk to the engine."""
        self.stats.chunks_in += 1
        rms = _rms(chunk)
        self.stats.input_rms_max = max(self.stats.input_rms_max, rms)
        self._chunk_rms[turn] = rms
        self._input_quiet.observe(rms)
        self._chunk_closed_ns[turn] = time.time_ns()
        text = "".join(self._retried_text + self._model_text)
        self._retried_text, self._model_text = [], []
        if text:
            self._text_in_flight[turn], self._model_text_ids = (text, self._model_text_ids), 0
        if self.recorder is not None:
            self.recorder.input(turn, chunk, text)
        self.engine.submit(TurnInput(self.id, turn, chunk, text))

    def _queue_model_text(self, text: str, ids: int) -> None:
        """Typed text and background results (``ids``: its length in the model's text
        ids): they enter the model at the next micro-turn."""
        self._model_text.append(text)
        self._model_text_ids += ids

    def _backlog_exceeded(self, ids: int) -> bool:
        """Whether ``ids`` more would take the text waiting for the model past the limit."""
        return self.text_waiting + ids > self.config.max_text_backlog_bytes

    def _queue_task_result(self, text: str) -> None:
        """A background result for the model to read, bounded as typed text is: a tool
        finishing 20 times a second would otherwise grow the model's queue (copied every
        step) without end. Past the limit its task fails (TaskError) rather than wait."""
        ids = len(encode_text(text))
        if self._backlog_exceeded(ids):
            raise TaskError("text_backlog", f"its result ({ids} bytes) does not fit: {self.text_waiting} bytes of "
                            f"text are still waiting to enter the model (at most {self.config.max_text_backlog_bytes})")
        self._queue_model_text(text, ids)

    @property
    def text_waiting(self) -> int:
        """Input text (typed, and background results) the model has yet to read, in its
        text ids (UTF-8 bytes; a marker tag is one): not yet sent, in flight, queued in it."""
        in_flight = sum(ids for _, ids in self._text_in_flight.values())
        return self._model_text_ids + in_flight + self._text_waiting_in_model

    async def _drain(self, track: MediaStreamTrack) -> None:
        recorded_turn = -1
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            # Camera frames are recorded (small, one per micro-turn) though the model
            # does not see them yet: the recording is tomorrow's training data.
            turn = self._chunker.next_turn if self._chunker else 0
            if (self.recorder is not None and self.recorder.active and isinstance(frame, av.VideoFrame)
                    and turn != recorded_turn):
                recorded_turn = turn
                height = max(2, round(_RECORDED_VIDEO_WIDTH * frame.height / max(frame.width, 1) / 2) * 2)
                height = min(height, _RECORDED_VIDEO_MAX_HEIGHT)
                self.recorder.video(turn, frame.to_ndarray(width=_RECORDED_VIDEO_WIDTH, height=height,
                                                           format="rgb24"))

    # -- engine output (called on the engine thread) ------------------------------

    def on_output(self, output: TurnOutput, info: StepInfo) -> None:
        self.loop.call_soon_threadsafe(self._deliver, output, info)

    def on_step_error(self, turn: int, message: str, code: str = "step_failed") -> None:
        self.loop.call_soon_threadsafe(self._report_step_error, turn, message, code)

    def _deliver(self, output: TurnOutput, info: StepInfo) -> None:
        if self.close_reason is not None:
            return
        if self.recorder is not None:
            self.recorder.output(output.turn, output.audio, output.text)
        self.output.enqueue(output.audio, output.turn)
        self._text_waiting_in_model = output.text_waiting
        for turn in [turn for turn in self._text_in_flight if turn <= output.turn]:  # now in text_waiting
            del self._text_in_flight[turn]
        self.stats.turns_out += 1
        self.stats.overruns += info.overran
        out_rms = _rms(output.audio)
        self._output_quiet.observe(out_rms)
        self.stats.output_rms_max = max(self.stats.output_rms_max, out_rms)
        closed_ns = self._chunk_closed_ns.pop(output.turn, None)
        self._trace_microturn(output, info, closed_ns)
        event: dict[str, Any] = {
            "turn": output.turn,
            "t_ms": (output.turn + 1) * TURN_MS,
            "step_ms": round(info.step_ms, 2),
            "batch": info.batch_size,
            # chunk closed -> its output queued for sending: what the server adds
            "latency_ms": round((time.time_ns() - closed_ns) / 1e6, 2) if closed_ns else None,
            "closed_at_ms": round(closed_ns / 1e6, 1) if closed_ns else None,  # server wall clock
            # turns whose first output frame went out since the last event: [turn, offset of
            # that frame's RTP timestamp from the stream's first]
            "played": self._drain_started_turns(),
            "in_rms": round(self._chunk_rms.pop(output.turn, 0.0), 4),
            "out_rms": round(out_rms, 4),
        }
        if info.overran:
            event["overran"] = True
        self.emit("turn", **event)
        if output.text:
            self.emit("transcript.delta", turn=output.turn, text=output.text)
            for tool, tool_input in self._task_requests.feed(output.text):
                self._create_task(tool, tool_input, origin="model")

    def _drain_started_turns(self) -> list[list[int]]:
        started, self.output.started_turns = self.output.started_turns, []
        return [[turn, pts] for turn, pts in started]

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

    def _report_step_error(self, turn: int, message: str, code: str) -> None:
        if self.close_reason is not None:
            return
        self.stats.step_errors += 1
        self._chunk_closed_ns.pop(turn, None)
        self._chunk_rms.pop(turn, None)
        text, ids = self._text_in_flight.pop(turn, ("", 0))
        if code == SESSION_RESET:  # the model forgot the conversation, its queued text with it
            self._text_waiting_in_model = 0
        elif text and code != SESSION_LOST:
            # A failed step changed nothing: the text goes with the next turn, ahead of what
            # came since (after other failed turns' texts: errors arrive in turn order).
            self._retried_text.append(text)
            self._model_text_ids += ids
        self.emit("error", code=code, message=message, turn=turn)
        if code == SESSION_LOST:  # the engine let it go: the model would never answer again
            self._spawn(self._end_when_heard(SESSION_LOST))

    async def _end_when_heard(self, reason: str) -> None:
        """End, once the client can hear why: a session the model refused at its start
        has no open channel yet, and ending at once would drop the error unsent. (A
        publisher without a data channel waits the connect timeout, then ends.)"""
        deadline = time.monotonic() + self.config.connect_timeout_s
        while (self.close_reason is None and time.monotonic() < deadline
               and (self.channel is None or self.channel.readyState != "open")):
            await asyncio.sleep(0.05)
        await self.end(reason, 0.5)

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

    def _refuse_undecodable_text(self) -> None:
        """aiortc decodes text messages itself, and text that is not UTF-8 raises inside
        its SCTP receive loop, which ends the whole association (found by fuzzing). This
        session's transport checks first and refuses such a message like any other.
        Per instance, at set-up: nothing global is patched."""
        sctp = self.pc.sctp
        if sctp is None:
            return
        receive = sctp._data_channel_receive

        async def checked(stream_id: int, pp_id: int, data: bytes) -> None:
            if pp_id == WEBRTC_STRING:
                try:
                    data.decode("utf-8")
                except UnicodeDecodeError:
                    self._last_heard = time.monotonic()
                    self._protocol_error("bad_json", "a text message that is not UTF-8")
                    return
            await receive(stream_id, pp_id, data)

        sctp._data_channel_receive = checked

    def emit(self, event_type: str, **fields: Any) -> None:
        """Send one event, stamped with the protocol version, this session's trace and
        the server's wall clock when it is sent (ms; clients measure event lag with it).
        Events from before the channel opened wait, unserialised, and go out on open."""
        if self.recorder is not None:
            self.recorder.event("out", {"type": event_type, **fields})
        self._send(event_type, fields)

    def _send(self, event_type: str, fields: dict[str, Any]) -> None:
        channel = self.channel
        if channel is not None and channel.readyState == "open":
            ts_ms = round(time.time() * 1000, 1)
            encoded = server_event(event_type, trace_id=self.trace_id, ts_ms=ts_ms, **fields)
            try:
                channel.send(encoded)
            except ValueError:  # over the peer's max-message-size (e.g. a huge task result)
                log.warning("session %s: %s event of %d bytes is too large for the peer", self.id, event_type,
                            len(encoded))
                channel.send(server_event("error", trace_id=self.trace_id, ts_ms=ts_ms, code="event_too_large",
                                          message=f"a {event_type} event ({len(encoded)} bytes) exceeded the "
                                                  "channel's message size and was dropped"))
        elif len(self._early_events) < _MAX_EARLY_EVENTS:
            self._early_events.append((event_type, fields))

    def _flush_early_events(self) -> None:
        events, self._early_events = self._early_events, []
        for event_type, fields in events:
            self._send(event_type, fields)
        if not self._ready_sent and self.stats.frames_in:
            self._send_ready()

    def _send_ready(self) -> None:
        """``session.ready``: media flows and the channel is open."""
        if self.channel is None or self.channel.readyState != "open":
            return
        self._ready_sent = True
        self.emit(
            "session.ready",
            session_id=self.id,
            engine=self.engine.model.name,
            weights=self.engine.model.weights,
            decoding=self.engine.model.decoding,
            turn_ms=TURN_MS,
            sample_rate=SAMPLE_RATE,
            protocol=PROTOCOL_VERSION,
            tools={name: tool.description for name, tool in self.tasks.tools.items()},
        )

    def _on_message(self, raw: str | bytes) -> None:
        if self.close_reason is not None:  # closing: nothing may start that close() would not stop
            return
        self._last_heard = time.monotonic()
        try:
            if not self._rate.allow():
                raise ProtocolError("rate_limited", "too many messages; slow down")
            message = parse_client_message(raw, self.config.max_message_bytes, self.config.max_text_chars)
        except ProtocolError as exc:
            self._protocol_error(exc.code, exc.message)
            return
        if self.recorder is not None:
            self.recorder.event("in", message)
        handler = getattr(self, "_on_" + message["type"].replace(".", "_"))
        try:
            handler(message)
        except Exception as exc:  # a bug here must not end the session (aiortc would drop it)
            log.exception("session %s: handling %s failed", self.id, message["type"])
            self._protocol_error("internal_error", f"{message['type']} could not be handled: {exc!r}"[:200])

    def _recording_failed(self, message: str) -> None:
        self.emit("error", code="recording_failed", message=f"recording stopped: {message}")

    def _protocol_error(self, code: str, message: str, **fields: Any) -> None:
        self.stats.protocol_errors += 1
        self.metrics.protocol_errors.add(1, {tm.ATTR_CODE: code})
        self.emit("error", code=code, message=message, **fields)

    def _on_ping(self, message: dict[str, Any]) -> None:
        self.emit("pong", id=message.get("id"), t=message.get("t"), server_ms=round(time.time() * 1000))

    def _on_text_input(self, message: dict[str, Any]) -> None:
        text = message["text"]
        for_model = literal(text)  # typed tags are text: a user cannot fake a result or a request
        ids, limit = len(encode_text(for_model)), self.config.max_text_backlog_bytes
        if ids > limit:  # could never be taken: say so rather than "send it again"
            self._protocol_error("too_long", f"{ids} bytes of text as the model reads it: more than the model may "
                                 f"have waiting ({limit})")
            return
        if self._backlog_exceeded(ids):  # refused, not dropped: the client may send it again
            self._protocol_error("text_backlog", f"{self.text_waiting} bytes of text (typed, and background results) "
                                 f"are still waiting to enter the model (at most {limit}); send this again once it "
                                 "has read them")
            return
        self.stats.text_inputs += 1
        self._queue_model_text(for_model, ids)
        self.emit("user.text", text=text)

    def _on_task_create(self, message: dict[str, Any]) -> None:
        self._create_task(message["tool"], message["input"], origin="client", ref=message.get("ref"))

    def _on_task_cancel(self, message: dict[str, Any]) -> None:
        if not self.tasks.cancel(message["task_id"]):
            self._protocol_error("unknown_task", f"no running task {message['task_id']!r}")

    def _on_session_update(self, message: dict[str, Any]) -> None:
        interval = message.get("metrics_interval_ms")
        if interval is not None:
            if interval != 0 and not 200 <= interval <= 60_000:
                self._protocol_error("bad_field", "metrics_interval_ms: 0 (off) or 200..60000")
                return
            if self._metrics_task is not None:
                self._metrics_task.cancel()
                self._metrics_task = None
            if interval:
                self._metrics_task = self._spawn(self._send_metrics(interval / 1000))

    def _create_task(self, tool: str, tool_input: str, origin: str, ref: str | None = None) -> None:
        try:
            if self.ending_reason is not None:
                raise TaskError("session_ending", f"the session is ending ({self.ending_reason}); no new tasks")
            self.tasks.create(tool, tool_input, origin, ref)
            self.stats.tasks_created += 1
        except TaskError as exc:
            fields = {"ref": ref} if ref is not None else {}
            if origin == "model":  # the model's request, not a client's mistake: not a protocol error
                self.emit("error", code=exc.code, message=exc.message, origin=origin)
            else:
                self._protocol_error(exc.code, exc.message, **fields)

    def _task_finished(self, tool: str, outcome: str) -> None:
        self.metrics.tasks.add(1, {tm.ATTR_TOOL: tool, tm.ATTR_OUTCOME: outcome})

    async def _send_metrics(self, period_s: float) -> None:
        while True:
            await asyncio.sleep(period_s)
            self.emit(
                "metrics",
                turns_out=self.stats.turns_out,
                overruns=self.stats.overruns,
                output_queued_ms=round(self.output.queued_ms, 1),
                silent_frames=self.output.silent_frames,
                tasks_running=self.tasks.running,
                engine_step_ms=round(self.engine.last_step_ms, 2),
            )

    # -- lifecycle --------------------------------------------------------------------

    async def _on_connection_state(self) -> None:
        if self.pc.connectionState in ("failed", "closed"):
            await self.close(f"peer connection {self.pc.connectionState}")

    def _spawn(self, coroutine: Any) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("session %s task failed", self.id, exc_info=task.exception())
            self._spawn(self.close(f"internal error: {task.exception()!r}"))


def _rms(audio: np.ndarray) -> float:
    value = float(np.sqrt(np.mean(np.square(audio, dtype=np.float64))))
    return value if math.isfinite(value) else 0.0
