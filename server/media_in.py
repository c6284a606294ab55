"""Incoming audio: WebRTC frames -> exact 200 ms, 16 kHz mono float32 chunks.

The session clock is the sender's media clock (RTP timestamps, carried by aiortc as
each frame's ``pts``), not the arrival time of packets. Chunk *t* therefore always
covers [200·t, 200·t + 200) ms of the session (less the lead-in and any padding
before it), whatever the network does:

- a gap in timestamps (lost packets) is filled with silence before resampling, so
  the resampler sees one continuous stream and its filter state stays valid;
- a frame that starts before what was already consumed (late, duplicated or
  reordered) is trimmed or dropped: it belongs to a chunk that has been closed;
- if frames stop arriving altogether, the reader calls :meth:`fill_silence` so the
  model keeps stepping (and speaking) while the user's side is stalled.

The session may begin with a short lead-in of silence: it shifts the chunk
boundaries so that they line up with the engine's tick grid (see engine.py). Later
padding (:meth:`AudioChunker.pad`) moves them back onto it (server/alignment.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np

from model.interface import SAMPLE_RATE, TURN_SAMPLES

_TIMESTAMP_WRAP = 1 << 32  # RTP timestamps are 32-bit and wrap around
# A timestamp jump beyond this is a sender restart, not loss: re-anchor instead of
# filling minutes of silence.
_MAX_GAP_SECONDS = 5.0
# FFmpeg downmixes stereo to mono as 0.707·(L + R), so Opus's usual "stereo" made
# of two identical channels would come out 3 dB louder than it was spoken. This
# gain turns that into the plain average (L + R) / 2.
STEREO_DOWNMIX_GAIN = np.float32(0.5 / np.sqrt(0.5))


class Decimator:
    """Integer-ratio downsampling to 16 kHz (48 kHz, WebRTC's Opus rate: by 3) with a
    causal windowed-sinc FIR in numpy.

    Causal on purpose: output sample m uses inputs up to its own instant, so a 20 ms
    frame in gives exactly 20 ms out and a chunk closes with its last input frame.
    FFmpeg's resampler holds back 16 output samples for its filter's lookahead, so a
    chunk closed only when the *next* frame arrived: 20 ms added to every reply. The
    price here is a constant 1.25 ms shift of the audio itself (the filter's group
    delay), which no one can hear. One matrix product per frame, no per-sample Python.
    """

    TAPS = 121
    CUTOFF_HZ = 7_200.0

    def __init__(self, input_rate: int) -> None:
        if input_rate % SAMPLE_RATE:
            raise ValueError(f"{input_rate} Hz is not a multiple of {SAMPLE_RATE} Hz")
        self.factor = input_rate // SAMPLE_RATE
        n = np.arange(self.TAPS) - (self.TAPS - 1) / 2
        taps = np.sinc(2 * self.CUTOFF_HZ / input_rate * n) * np.kaiser(self.TAPS, 8.0)
        # Reversed, so each output is a dot product with the window of inputs ending at it.
        self._taps = (taps / taps.sum())[::-1].astype(np.float32)
        self._history = np.zeros(self.TAPS - 1, dtype=np.float32)
        self._consumed = 0  # input samples so far (for the output phase)

    def __call__(self, samples: np.ndarray) -> np.ndarray:
        """Mono float32 at the input rate -> mono float32 at 16 kHz."""
        if self.factor == 1 or not samples.size:
            return samples.astype(np.float32, copy=False)
        buffer = np.concatenate([self._history, samples.astype(np.float32, copy=False)])
        # Outputs fall on input indices ≡ 0 (mod factor): with an odd tap count whose
        # group delay, (TAPS − 1) / 2 = 60 samples, is a multiple of the factor, the
        # output is the input delayed by a whole number of 16 kHz samples (20).
        first = (-self._consumed) % self.factor
        # Every output at the input rate, then every factor-th: in C, faster here than
        # computing only the kept ones through a strided window view (14 vs 21 µs a frame).
        filtered = np.convolve(buffer, self._taps[::-1], mode="valid")[first :: self.factor]
        self._history = buffer[buffer.size - (self.TAPS - 1) :]
        self._consumed += samples.size
        return filtered.astype(np.float32, copy=False)


@dataclass(slots=True)
class ChunkerStats:
    frames: int = 0
    chunks: int = 0
    gap_samples: int = 0  # silence inserted for lost packets (input rate)
    stall_samples: int = 0  # silence inserted while no frames arrived (input rate)
    late_samples: int = 0  # samples dropped because their chunk had closed (input rate)
    discontinuities: int = 0  # timestamp jumps treated as a restart
    format_changes: int = 0
    realignments: int = 0  # times silence was inserted to put the chunks back on the grid
    realign_samples: int = 0  # that silence, 16 kHz samples (the lead-in not included)


def _signed_wrap(delta: int) -> int:
    """A 32-bit timestamp difference as the nearest signed distance."""
    return (delta + _TIMESTAMP_WRAP // 2) % _TIMESTAMP_WRAP - _TIMESTAMP_WRAP // 2


class AudioChunker:
    """Cuts one session's incoming audio into micro-turn chunks.

    Not thread-safe: it is fed from the session's reader task on the event loop.
    """

    def __init__(self, lead_in_samples: int = 0, ffmpeg_only: bool = False) -> None:
        if not 0 <= lead_in_samples < TURN_SAMPLES:
            raise ValueError("lead-in must be shorter than one micro-turn")
        self.stats = ChunkerStats()
        self.next_turn = 0
        self._buffer = np.zeros(TURN_SAMPLES, dtype=np.float32)
        self._filled = lead_in_samples  # the lead-in is already-zeroed samples
        self._resampler: av.AudioResampler | None = None  # any other input rate
        self._decimator: Decimator | None = None  # input rates that are multiples of 16 kHz
        self._gain = np.float32(1)
        self._input_format: tuple[str, str, int] | None = None
        self._next_pts: int | None = None  # timestamp the next frame should carry
        self._ffmpeg_only = ffmpeg_only  # always FFmpeg's resampler (the A/B benchmark's baseline)
        # The sender's stream consumed so far, in seconds of its media clock (audio
        # plus silence for lost packets and stalls; no lead-in or padding).
        self.media_seconds = 0.0

    @property
    def input_rate(self) -> int | None:
        return self._input_format[2] if self._input_format else None

    def push(self, frame: av.AudioFrame) -> list[np.ndarray]:
        """Feed one decoded frame; return the chunks it closed (usually none or one)."""
        self.stats.frames += 1
        fmt = (frame.format.name, frame.layout.name, frame.sample_rate)
        if fmt != self._input_format:
            closed = self._switch_format(fmt)
        else:
            closed = []

        pts = _frame_pts(frame)
        if pts is None:  # no timing: trust arrival order
            pts = self._next_pts if self._next_pts is not None else 0
        if self._next_pts is None:
            self._next_pts = pts

        delta = _signed_wrap(pts - self._next_pts)
        if abs(delta) > _MAX_GAP_SECONDS * frame.sample_rate:
            self.stats.discontinuities += 1
            self._next_pts, delta = pts, 0
        elif delta < 0:
            overlap = min(-delta, frame.samples)
            self.stats.late_samples += overlap
            if overlap == frame.samples:
                return closed
            frame, delta = _tail(frame, frame.samples - overlap), 0
        elif delta > 0:
            self.stats.gap_samples += delta
            self.media_seconds += delta / frame.sample_rate
            closed += self._feed(_silence(fmt, delta))
        self.media_seconds += frame.samples / frame.sample_rate
        # The frame now starts exactly where the stream so far ends.
        self._next_pts = (self._next_pts + delta + frame.samples) % _TIMESTAMP_WRAP
        return closed + self._feed(frame)

    def fill_silence(self, input_samples: int) -> list[np.ndarray]:
        """Advance the session clock by ``input_samples`` of silence (a stalled sender).

        Frames that later arrive for this stretch are dropped as late.
        """
        if self._input_format is None or input_samples <= 0:
            return []
        self.stats.stall_samples += input_samples
        self.media_seconds += input_samples / self._input_format[2]
        assert self._next_pts is not None
        self._next_pts = (self._next_pts + input_samples) % _TIMESTAMP_WRAP
        return self._feed(_silence(self._input_format, input_samples))

    @property
    def samples_to_boundary(self) -> int:
        """16 kHz samples still to come before the current chunk closes."""
        return TURN_SAMPLES - self._filled

    def pad(self, samples: int) -> list[np.ndarray]:
        """Insert ``samples`` of silence at the last boundary, before what the current
        chunk holds so far, so every later boundary comes that much sooner; returns
        the chunk it closed, if the boundary moved into the past. (At the boundary, not
        at the end: called after a quiet chunk, the silence then follows quiet audio
        even if the user started speaking in the frame that closed it.)"""
        if not 0 <= samples < TURN_SAMPLES:
            raise ValueError("padding must be shorter than one micro-turn")
        self.stats.realignments += 1
        self.stats.realign_samples += samples
        held, self._filled = self._buffer[: self._filled].copy(), 0
        closed = self._append(np.zeros(samples, dtype=np.float32), downmixed=True)
        return closed + self._append(held, downmixed=True)

    def flush(self) -> list[np.ndarray]:
        """Drain the resampler at the end of the stream (the last chunk, zero-padded)."""
        closed = self._drain_resampler()
        if self._filled:
            self._buffer[self._filled :] = 0.0
            self._filled = TURN_SAMPLES
            closed += self._take_chunk()
        return closed

    def _switch_format(self, fmt: tuple[str, str, int]) -> list[np.ndarray]:
        # PyAV's resampler raises if layout or rate change mid-stream: drain the old
        # one into the current chunk and continue with a new one.
        closed = self._drain_resampler()
        if self._input_format is not None:
            self.stats.format_changes += 1
            if self._next_pts is not None and fmt[2] != self._input_format[2]:
                self._next_pts = None  # timestamps of another clock rate
        self._input_format = fmt
        numpy_ok = fmt[2] % SAMPLE_RATE == 0 and fmt[0] in _NUMPY_FORMATS and fmt[1] in ("mono", "stereo")
        if numpy_ok and not self._ffmpeg_only:
            self._decimator, self._resampler = Decimator(fmt[2]), None
        else:
            self._decimator = None
            self._resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        self._gain = STEREO_DOWNMIX_GAIN if fmt[1] == "stereo" else np.float32(1)
        return closed

    def _drain_resampler(self) -> list[np.ndarray]:
        if self._resampler is None:
            return []
        closed: list[np.ndarray] = []
        for out in self._resampler.resample(None):
            closed += self._append(out.to_ndarray()[0])
        self._resampler = None
        return closed

    def _feed(self, frame: av.AudioFrame) -> list[np.ndarray]:
        if self._decimator is not None:
            return self._append(self._decimator(to_mono(frame)), downmixed=True)
        assert self._resampler is not None
        closed: list[np.ndarray] = []
        for out in self._resampler.resample(frame):
            closed += self._append(out.to_ndarray()[0])
        return closed

    def _append(self, samples: np.ndarray, downmixed: bool = False) -> list[np.ndarray]:
        closed: list[np.ndarray] = []
        if self._gain != 1 and not downmixed:
            samples = samples * self._gain
        while samples.size:
            take = min(TURN_SAMPLES - self._filled, samples.size)
            self._buffer[self._filled : self._filled + take] = samples[:take]
            self._filled += take
            samples = samples[take:]
            if self._filled == TURN_SAMPLES:
                closed += self._take_chunk()
        return closed

    def _take_chunk(self) -> list[np.ndarray]:
        chunk = self._buffer.copy()
        self._filled = 0
        self.next_turn += 1
        self.stats.chunks += 1
        return [chunk]


def _frame_pts(frame: av.AudioFrame) -> int | None:
    """The frame's start in samples of its own rate (aiortc: the RTP timestamp)."""
    if frame.pts is None:
        return None
    time_base = frame.time_base or Fraction(1, frame.sample_rate)
    if time_base == Fraction(1, frame.sample_rate):
        return int(frame.pts) % _TIMESTAMP_WRAP
    return int(frame.pts * time_base * frame.sample_rate) % _TIMESTAMP_WRAP


_NUMPY_FORMATS = {"s16": np.float32(1 / 32768), "s16p": np.float32(1 / 32768), "flt": np.float32(1), "fltp": np.float32(1)}


def to_mono(frame: av.AudioFrame) -> np.ndarray:
    """A decoded frame as mono float32 in [-1, 1]: the plain average of its channels."""
    data = frame.to_ndarray()
    channels = len(frame.layout.channels)
    if channels == 1:
        mono = data[0]
    elif frame.format.is_planar:
        mono = data.mean(axis=0, dtype=np.float32)
    else:  # packed: one row of interleaved samples
        mono = data.reshape(-1, channels).mean(axis=1, dtype=np.float32)
    return mono.astype(np.float32, copy=False) * _NUMPY_FORMATS[frame.format.name]


def _silence(fmt: tuple[str, str, int], samples: int) -> av.AudioFrame:
    name, layout, rate = fmt
    probe = av.AudioFrame(format=name, layout=layout, samples=samples)
    probe.sample_rate = rate
    for plane in probe.planes:
        plane.update(bytes(plane.buffer_size))
    return probe


def _tail(frame: av.AudioFrame, keep: int) -> av.AudioFrame:
    """The last ``keep`` samples of a frame, as a new frame of the same format."""
    data = frame.to_ndarray()
    channels = len(frame.layout.channels)
    if frame.format.is_planar:
        data = data[:, -keep:]
    else:  # packed: one row of interleaved samples
        data = data[:, -keep * channels :]
    out = av.AudioFrame.from_ndarray(
        np.ascontiguousarray(data), format=frame.format.name, layout=frame.layout.name
    )
    out.sample_rate = frame.sample_rate
    return out
