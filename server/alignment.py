"""Keeping a session's chunk boundaries on the engine's 200 ms grid.

The engine steps every session whose chunk is ready in one batch, waiting at most
``batch_window_s`` (25 ms) for stragglers, so sessions share a step only if their
chunks close within that window of each other. A session is put on the grid by
padding its input with silence (a lead-in when it starts, 0–199 ms), which needs
an estimate of when its audio arrives by our clock.

That estimate is the sender's clock: over recent frames, the least of (arrival −
media time). Delays in the network and on a busy event loop only ever make a frame
late, so the earliest frame is the truest. Five frames suffice on an idle server,
but under load every one of the first frames can arrive late (measured with both
cores busy: sessions aligned from their first five frames landed 25–100 ms off the
grid, and two sessions never shared a step in 4 runs of 10). So the estimate keeps
improving with every frame, over a sliding window (10 s) that also follows clock
drift (a sender's clock off by 100 ppm moves its chunks 20 ms in 200 s), and a
session found more than 10 ms off the grid is padded again, once the user is
quiet: the model hears a short extra pause in silence, and no audio is lost.
"Quiet" is relative to the sender's own background (``QuietFloor``): a fixed level
would never let a user in a noisy room be realigned.
"""

from __future__ import annotations

from collections import deque

from model.interface import SAMPLE_RATE, TURN_SAMPLES

# Closer to the grid than this is on it. Re-padding for less chased noise: over a
# network with 30 ms of jitter, sessions padded every second or two by 4-11 ms, back
# and forth, each time inserting up to 195 ms of silence (a 4 s window, 4 ms).
ALIGN_TOLERANCE_SAMPLES = SAMPLE_RATE * 10 // 1000  # 10 ms
# Media time the estimate must cover before it can move a session's boundaries.
MIN_EVIDENCE_S = 1.0
QUIET_RMS = 0.01  # a 200 ms turn quieter than this is not speech, whatever the background
# ... nor is one within this factor (6 dB) of the quietest recent turn: steady noise.
# Speech at the 15 dB SNR the training data's noisiest rooms have is 5.6x the noise.
NOISE_MARGIN = 2.0


class SenderClock:
    """Our clock minus the sender's media clock, as the least of (arrival − media
    time) over the last ``window_s`` seconds of media, kept as per-second minima."""

    def __init__(self, window_s: float = 10.0, bucket_s: float = 1.0) -> None:
        self.bucket_s = bucket_s
        self._buckets: deque[tuple[int, float]] = deque()  # (bucket index, least offset)
        self._keep = max(1, round(window_s / bucket_s))
        self._first_media_s: float | None = None
        self._last_media_s = 0.0

    def observe(self, arrived: float, media_end_s: float) -> None:
        """A frame whose last sample is at ``media_end_s`` of the stream arrived at
        ``arrived``. One that did not move the stream on (a late frame the chunker
        dropped) says nothing about when new audio arrives, and is ignored."""
        if self._first_media_s is None:
            self._first_media_s = media_end_s
        elif media_end_s <= self._last_media_s:
            return
        self._last_media_s = media_end_s
        offset = arrived - media_end_s
        index = int(media_end_s // self.bucket_s)
        if self._buckets and self._buckets[-1][0] == index:
            self._buckets[-1] = (index, min(self._buckets[-1][1], offset))
        else:
            self._buckets.append((index, offset))
        while self._buckets[0][0] <= index - self._keep:
            self._buckets.popleft()

    def reset(self) -> None:
        """Forget everything (the sender restarted its clock)."""
        self._buckets.clear()
        self._first_media_s = None

    @property
    def offset(self) -> float | None:
        """Our time at which media time 0 was sent (None before any frame)."""
        return min(offset for _, offset in self._buckets) if self._buckets else None

    @property
    def evidence_s(self) -> float:
        """Media time observed since the last reset."""
        return 0.0 if self._first_media_s is None else self._last_media_s - self._first_media_s


class QuietFloor:
    """What quiet means for one audio stream: below ``QUIET_RMS``, or within
    ``NOISE_MARGIN`` of the quietest of its last ``turns`` turns — its background
    noise. Only once it has heard that many (50 turns = 10 s, longer than people talk
    without a pause): over the first few turns of an utterance the quietest would be
    speech."""

    def __init__(self, turns: int = 50) -> None:
        self._recent: deque[float] = deque(maxlen=turns)

    def observe(self, rms: float) -> None:
        self._recent.append(rms)

    @property
    def latest(self) -> float:
        """The RMS of the last turn observed (0 before any)."""
        return self._recent[-1] if self._recent else 0.0

    def is_quiet(self, rms: float) -> bool:
        heard_enough = len(self._recent) == self._recent.maxlen
        floor = min(self._recent) if heard_enough else 0.0
        return rms < max(QUIET_RMS, NOISE_MARGIN * floor)


def padding_to_grid(boundary_at: float, grid_origin: float) -> int:
    """Samples of silence that move a boundary due at ``boundary_at`` (our clock) back
    onto the grid line at or before it: each sample of padding closes the chunk one
    sample earlier."""
    phase = (boundary_at - grid_origin) % (TURN_SAMPLES / SAMPLE_RATE)
    return round(phase * SAMPLE_RATE) % TURN_SAMPLES  # round: a boundary on the line needs 0, not 3199


def is_on_grid(padding: int) -> bool:
    """Whether a boundary needing ``padding`` is within tolerance of a grid line (either side)."""
    return min(padding, TURN_SAMPLES - padding) <= ALIGN_TOLERANCE_SAMPLES
