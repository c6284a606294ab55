"""Outgoing audio: the model's 200 ms turns played as paced 20 ms, 48 kHz frames.

The engine hands over a whole micro-turn (200 ms) at once; WebRTC wants one 20 ms
frame every 20 ms. This track keeps a small queue of ready frames, paces ``recv``
on a monotonic clock, sends silence when the queue is empty, and can drop
everything queued at once when the user barges in.

Frames leave as mono Opus packets encoded here (``pre_encode``, set when Opus was
negotiated): aiortc would upmix every 20 ms frame to stereo, encode stereo at 96
kbit/s on a thread-pool hop, and compute an RFC 6465 audio level in a pure-Python
loop over every sample — together most of the server's per-session send cost
(py-spy; docs/benchmarks.md). A pre-encoded packet skips all three. Opus packets
say how many channels they carry, so a stereo-negotiated decoder plays mono fine.

Because the model produces audio exactly as fast as it is played, the queue runs
nearly dry at the end of every turn. After running dry the track waits a short
playout delay before resuming, so ordinary jitter in step completion does not turn
into a click at every turn boundary.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from fractions import Fraction
from typing import Protocol

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from model.interface import SAMPLE_RATE, TURN_SAMPLES

OUTPUT_RATE = 48_000
FRAME_SAMPLES = OUTPUT_RATE // 50  # 20 ms
_TIME_BASE = Fraction(1, OUTPUT_RATE)
# If the sender fell this far behind (a stalled loop), restart the clock rather
# than sending a burst of frames to catch up.
_MAX_LAG_S = 0.1
_TURN_FRAMES = TURN_SAMPLES * (OUTPUT_RATE // SAMPLE_RATE) // FRAME_SAMPLES  # 10
_QUIET = 64  # int16 peak below which a frame is inaudible (-54 dBFS)


class Clock(Protocol):
    """What the track paces its frames by."""

    def monotonic(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class WallClock:
    """Real time: the clock every session plays by."""

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class UnpacedClock(WallClock):
    """Real time that never waits: each frame goes as soon as it is asked for, to
    measure the track's own work (bench/media_path.py) or step it in a test."""

    async def sleep(self, seconds: float) -> None:
        return None


class OutputAudioTrack(MediaStreamTrack):
    """One session's outgoing voice. All methods run on the event loop."""

    kind = "audio"

    def __init__(self, playout_delay_ms: float = 20.0, max_queue_ms: float = 400.0,
                 opus_bitrate: int = 32_000, clock: Clock | None = None) -> None:
        super().__init__()
        self._clock = clock or WallClock()
        self.pre_encode = False  # the session sets it once it knows Opus was negotiated
        self._encoder = av.CodecContext.create("libopus", "w")
        self._encoder.bit_rate = opus_bitrate  # mono voice; aiortc's own is 96 kbit/s stereo
        self._encoder.format = "s16"
        self._encoder.layout = "mono"
        self._encoder.sample_rate = OUTPUT_RATE
        self._encoder.time_base = _TIME_BASE
        # CELT only: a fraction of the CPU of voip mode and 2.5 ms of codec delay, not
        # 6.5; at 32 kbit/s it carries 16 kHz synthetic speech without audible loss.
        self._encoder.options = {"application": "lowdelay"}
        self.playout_delay_s = playout_delay_ms / 1000
        # Steady-state depth right after a turn is queued: the turn, the playout delay, one spare.
        self._target_frames = _TURN_FRAMES + math.ceil(playout_delay_ms * OUTPUT_RATE / 1000 / FRAME_SAMPLES) + 1
        # Beyond this much queued audio (a backlog of turns after a stall, or a
        # client clock running fast) the oldest frames are dropped: late speech is
        # worse than a skip, and latency must not ratchet up for good.
        self.max_queue_frames = int(max_queue_ms * OUTPUT_RATE / 1000) // FRAME_SAMPLES
        self.frames_sent = 0
        self.silent_frames = 0  # frames sent because nothing was queued
        self.underrun_frames = 0  # of those, after audio first played: the queue ran dry
        self.flushed_frames = 0
        self.dropped_frames = 0  # dropped to keep latency bounded
        self.skipped_quiet_frames = 0  # quiet frames dropped to win back latency after a late turn
        self.tick_realignments = 0  # send ticks moved to a new turn phase (realign_from_turn)
        self._queue: deque[np.ndarray] = deque()
        # Which turn's audio starts where: (index of its first frame among all frames
        # ever queued, turn). When that frame is sent, (turn, pts) goes to
        # ``started_turns`` — what a client needs to time a turn's arrival.
        self._turn_marks: deque[tuple[int, int]] = deque()
        self._frames_queued = 0  # frames ever queued
        self._frames_taken = 0  # frames ever taken from the queue (sent, flushed or dropped)
        # Where the resampler's output stream began (a frame boundary: reset by flush)
        # and how many 16 kHz samples went in since: the 48 kHz sample at which the
        # next turn's audio starts is exactly base + 3·input (the resampler delays
        # nothing, it only holds samples back until it can emit them).
        self._stream_base = 0
        self._input_since_reset = 0
        self.started_turns: list[tuple[int, int]] = []
        self._pending = np.zeros(0, dtype=np.int16)  # < one frame of resampled audio
        self._resampler = self._new_resampler()
        self._clock_start: float | None = None
        self._realign_at_turn: int | None = None  # see realign_from_turn
        self._pts = 0
        self._playing = False  # False after running dry, until the playout delay passes
        self._refill_since: float | None = None
        self._silence = np.zeros(FRAME_SAMPLES, dtype=np.int16)
        # WHEP viewers: each gets a copy of what this track sends (see VoiceListener).
        self.listeners: set[VoiceListener] = set()

    @staticmethod
    def _new_resampler() -> av.AudioResampler:
        return av.AudioResampler(format="s16", layout="mono", rate=OUTPUT_RATE)

    @property
    def queued_ms(self) -> float:
        return (len(self._queue) * FRAME_SAMPLES + self._pending.size) * 1000 / OUTPUT_RATE

    def enqueue(self, audio: np.ndarray, turn: int | None = None) -> None:
        """Queue 16 kHz mono float32 audio (one micro-turn's output) for playback."""
        frame = av.AudioFrame.from_ndarray(
            np.ascontiguousarray(audio, dtype=np.float32).reshape(1, -1),
            format="flt",
            layout="mono",
        )
        frame.sample_rate = SAMPLE_RATE
        parts = [self._pending] + [o.to_ndarray()[0] for o in self._resampler.resample(frame)]
        samples = np.concatenate(parts)
        whole = samples.size - samples.size % FRAME_SAMPLES
        if turn is not None:  # the frame holding this turn's first sample
            first_sample = self._stream_base + self._input_since_reset * (OUTPUT_RATE // SAMPLE_RATE)
            self._turn_marks.append((first_sample // FRAME_SAMPLES, turn))
        self._input_since_reset += audio.size
        moved = self._realign_at_turn is not None and turn is not None and turn >= self._realign_at_turn
        if moved:
            self._realign_at_turn = None
            if self._frames_queued:  # before any audio the first-audio alignment does it
                self.tick_realignments += 1
        if (self._frames_queued == 0 or moved) and whole:
            # Tick in step with the engine's turns: from the first audio, and again
            # from the first turn a realignment moved.
            self._align_clock_to_now()
        self._queue.extend(samples[:whole].reshape(-1, FRAME_SAMPLES))
        self._frames_queued += whole // FRAME_SAMPLES
        self._pending = samples[whole:]
        while len(self._queue) > self.max_queue_frames:
            self._take()
            self.dropped_frames += 1
        # After a late turn the queue stays that much deeper, and every later reply with
        # it: drop quiet frames at its head (pauses, nothing audible) down to the target.
        while len(self._queue) > self._target_frames and np.abs(self._queue[0]).max() < _QUIET:
            self._take()
            self.skipped_quiet_frames += 1

    def realign_from_turn(self, turn: int) -> None:
        """The session's turns moved on the engine's grid from ``turn`` on (its input was
        padded back onto it): put the send ticks in phase with that turn's arrival, not
        the old one's, or its replies wait up to 20 ms more for a tick. Turns before it
        are still in flight and arrive in the old phase."""
        self._realign_at_turn = turn

    @property
    def next_frame_due(self) -> float | None:
        """When (on the track's clock) the next frame is due; None before any audio."""
        return None if self._clock_start is None else self._clock_start + self._pts / OUTPUT_RATE

    def _align_clock_to_now(self) -> None:
        """Put the 20 ms send ticks in phase with now. Turns arrive on the engine's 200 ms
        grid, so ticks aligned with the first one leave no 0–20 ms wait for a tick on
        every later turn (measured: a session's latency was 20 ms higher half the time)."""
        self._clock_start = self._clock.monotonic() - self._pts / OUTPUT_RATE

    def _take(self, pts: int | None = None) -> np.ndarray:
        """The next queued frame; ``pts`` when it is being sent (not dropped)."""
        index = self._frames_taken
        self._frames_taken += 1
        while self._turn_marks and self._turn_marks[0][0] <= index:
            first, turn = self._turn_marks.popleft()
            if first == index and pts is not None:
                self.started_turns.append((turn, pts))
        return self._queue.popleft()

    def flush(self) -> int:
        """Drop everything not yet sent (barge-in). Returns the frames dropped."""
        dropped = len(self._queue)
        self.flushed_frames += dropped
        for _ in range(dropped):
            self._take()
        self._pending = np.zeros(0, dtype=np.int16)
        self._resampler = self._new_resampler()  # forget the filter's tail too
        self._stream_base, self._input_since_reset = self._frames_queued * FRAME_SAMPLES, 0
        self._playing, self._refill_since = False, None  # the next turn waits the playout delay
        return dropped

    async def recv(self) -> av.AudioFrame | av.Packet:
        if self.readyState != "live":
            raise MediaStreamError
        await self._wait_for_next_frame()
        frame = av.AudioFrame.from_ndarray(
            self._next_samples().reshape(1, -1), format="s16", layout="mono"
        )
        frame.sample_rate = OUTPUT_RATE
        frame.pts = self._pts
        frame.time_base = _TIME_BASE
        self._pts += FRAME_SAMPLES
        self.frames_sent += 1
        packet = self._encode(frame) if self.pre_encode else None
        for listener in self.listeners:
            listener.put(packet if packet is not None and listener.takes_opus else frame)
        return packet if packet is not None else frame

    def _encode(self, frame: av.AudioFrame) -> av.Packet | None:
        # libopus emits one packet per 20 ms frame at once; label it with this
        # frame's timestamp (libopus's own starts 120 samples early, its lookahead).
        packets = self._encoder.encode(frame)
        if not packets:  # not seen with libopus; a raw frame beats a muted session
            return None
        packet = packets[0]
        packet.pts, packet.time_base = frame.pts, _TIME_BASE
        return packet

    async def _wait_for_next_frame(self) -> None:
        now = self._clock.monotonic()
        if self._clock_start is None:
            self._clock_start = now - self._pts / OUTPUT_RATE
        due = self._clock_start + self._pts / OUTPUT_RATE
        if now - due > _MAX_LAG_S:
            self._clock_start = now - self._pts / OUTPUT_RATE
        elif due > now:
            await self._clock.sleep(due - now)

    def _next_samples(self) -> np.ndarray:
        if not self._playing and self._queue:
            now = self._clock.monotonic()
            if self._refill_since is None:
                self._refill_since = now
            if now - self._refill_since >= self.playout_delay_s:
                self._playing, self._refill_since = True, None
        if self._playing and self._queue:
            return self._take(self._pts)
        if not self._queue and self._frames_taken:  # ran dry (not a playout-delay wait)
            self.underrun_frames += 1
        self._playing = False
        self.silent_frames += 1
        return self._silence


class VoiceListener(MediaStreamTrack):
    """A copy of a session's voice for another peer connection (a WHEP viewer).

    The session's own track stays the one paced clock; this one hands on whatever
    it sent, at once. Packets are shared when the viewer negotiated Opus too (no
    second encode), else raw frames go to the viewer's own encoder. A viewer that
    falls behind loses its oldest frames, never the session's.
    """

    kind = "audio"

    def __init__(self, source: OutputAudioTrack, max_queue_frames: int = 10) -> None:
        super().__init__()
        self.source = source
        self.takes_opus = False  # set once the viewer's codec is known
        self.dropped_frames = 0
        self._queue: deque[av.AudioFrame | av.Packet] = deque()
        self._max = max_queue_frames
        self._ready = asyncio.Event()
        source.listeners.add(self)

    def put(self, item: av.AudioFrame | av.Packet) -> None:
        if len(self._queue) >= self._max:
            self._queue.popleft()
            self.dropped_frames += 1
        self._queue.append(item)
        self._ready.set()

    async def recv(self) -> av.AudioFrame | av.Packet:
        while not self._queue:
            if self.readyState != "live" or self.source.readyState != "live":
                raise MediaStreamError
            self._ready.clear()
            await self._ready.wait()
        return self._queue.popleft()

    def stop(self) -> None:
        self.source.listeners.discard(self)
        super().stop()
        self._ready.set()  # wake a waiting recv so it sees the end
