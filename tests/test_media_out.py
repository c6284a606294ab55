"""The outgoing track: 20 ms, 48 kHz frames, paced, silence when idle, flushable."""

from __future__ import annotations

import time

import numpy as np

from model.interface import SAMPLE_RATE, TURN_SAMPLES
from server.media_out import FRAME_SAMPLES, OUTPUT_RATE, OutputAudioTrack, UnpacedClock


def turn_of_tone(hz: float = 300.0) -> np.ndarray:
    t = np.arange(TURN_SAMPLES) / SAMPLE_RATE
    return (0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


async def receive(track: OutputAudioTrack, count: int) -> list[np.ndarray]:
    frames = []
    for _ in range(count):
        frame = await track.recv()
        assert frame.sample_rate == OUTPUT_RATE and frame.samples == FRAME_SAMPLES
        assert frame.format.name == "s16" and frame.layout.name == "mono"
        frames.append(frame.to_ndarray()[0])
    return frames


async def test_silence_when_nothing_is_queued_with_continuous_timestamps():
    track = OutputAudioTrack()
    stamps = []
    for _ in range(5):
        frame = await track.recv()
        stamps.append(frame.pts)
        assert not frame.to_ndarray().any()
    assert stamps == [i * FRAME_SAMPLES for i in range(5)]
    assert track.silent_frames == 5


async def test_frames_are_paced_in_real_time():
    track = OutputAudioTrack()
    await track.recv()
    started = time.monotonic()
    await receive(track, 25)
    # 25 frames are 500 ms of audio: they cannot all go out faster than that.
    assert time.monotonic() - started >= 0.45


class FrameClock:
    """A clock that moves only when the track waits for its next frame, by exactly that
    wait (one frame, 20 ms). On the wall clock a frame woken 20 ms late would count the
    playout delay as over one frame early; here the delay is exact, whatever the load."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds


async def test_a_queued_turn_plays_after_the_playout_delay_and_then_in_full():
    clock = FrameClock()
    track = OutputAudioTrack(playout_delay_ms=40, clock=clock)
    track.enqueue(turn_of_tone())
    frames = await receive(track, 14)
    loud = [i for i, f in enumerate(frames) if np.abs(f).max() > 1000]
    assert loud[0] == 2, "waits 40 ms (two frames) before starting"
    played = np.concatenate([frames[i] for i in loud]).astype(np.float32) / 32768
    # 200 ms in, up to one frame of it held back by the resampler for the next turn.
    assert OUTPUT_RATE * 0.18 <= played.size <= OUTPUT_RATE * 0.2
    t = np.arange(played.size) / OUTPUT_RATE
    reference = 0.5 * np.sin(2 * np.pi * 300.0 * t)
    best = max(np.corrcoef(played[lag:], reference[: played.size - lag])[0, 1] for lag in range(40))
    assert best > 0.99


async def test_flush_drops_queued_audio_at_once():
    track = OutputAudioTrack(playout_delay_ms=0)
    for _ in range(2):
        track.enqueue(turn_of_tone())
    assert track.queued_ms >= 390
    await receive(track, 2)
    dropped = track.flush()
    assert dropped >= 15 and track.queued_ms == 0
    frames = await receive(track, 3)
    assert not any(f.any() for f in frames), "silence right after a barge-in"


async def test_a_backlog_beyond_the_queue_limit_drops_the_oldest_audio():
    track = OutputAudioTrack(playout_delay_ms=0, max_queue_ms=400)
    for hz in (200.0, 300.0, 400.0, 500.0, 600.0):  # five turns at once, e.g. after a stall
        track.enqueue(turn_of_tone(hz))
    assert track.queued_ms <= 400 + 20
    assert track.dropped_frames >= 29
    # What is left is the newest audio: the 600 Hz turn is still there.
    frames = np.concatenate(await receive(track, 20)).astype(np.float32)
    spectrum = np.abs(np.fft.rfft(frames[-9600:]))
    assert abs(np.argmax(spectrum) * OUTPUT_RATE / 9600 - 600) < 10


async def test_a_turn_is_marked_at_the_frame_holding_its_first_sample():
    """``started_turns`` (what the ``played`` field reports) gives the pts of the frame
    that carries a turn's first sample. The resampler holds the last 48 samples of
    the first turn back, so after 9 frames the queue runs dry once (a silent frame,
    pts 8640) and every later frame is sent one frame later than its index."""
    track = OutputAudioTrack(playout_delay_ms=0, clock=UnpacedClock())
    for turn in range(3):
        track.enqueue(np.full(TURN_SAMPLES, 0.1 * (turn + 1), dtype=np.float32), turn)
        for _ in range(10 if turn < 2 else 11):  # the last turn's tail waits in the resampler
            await track.recv()
    assert track.started_turns == [(0, 0), (1, 11 * 960), (2, 21 * 960)]
    assert track.underrun_frames == 2  # after the first turn's 9 frames, and at the end


async def test_send_ticks_move_to_the_turn_a_realignment_names_and_only_then():
    """A session padded back onto the engine's grid asks for ticks in phase with the
    first turn the pad moved (``realign_from_turn``); turns before it, still in flight,
    leave the clock alone, and once moved it keeps time from the new phase."""
    track = OutputAudioTrack(playout_delay_ms=0, clock=UnpacedClock())  # pts runs ahead of the wall clock
    track.enqueue(turn_of_tone(), 0)
    first_due = track.next_frame_due
    assert first_due is not None and abs(first_due - time.monotonic()) < 0.05
    await receive(track, 10)
    track.realign_from_turn(2)
    track.enqueue(turn_of_tone(), 1)  # in flight before the pad: the old phase
    assert track.next_frame_due == first_due + 10 * FRAME_SAMPLES / OUTPUT_RATE
    await receive(track, 10)
    track.enqueue(turn_of_tone(), 2)
    moved_at = time.monotonic()
    assert abs(track.next_frame_due - moved_at) < 0.05  # was ~0.4 s ahead on the old phase
    assert track.tick_realignments == 1
    await receive(track, 10)
    track.enqueue(turn_of_tone(), 3)  # once only: now the clock runs on from turn 2's phase
    assert abs(track.next_frame_due - (moved_at + 10 * FRAME_SAMPLES / OUTPUT_RATE)) < 0.05
    assert track.tick_realignments == 1

    fresh = OutputAudioTrack(playout_delay_ms=0)  # padded before any audio: the first
    fresh.realign_from_turn(0)  # audio's own alignment serves, and nothing is left pending
    fresh.enqueue(turn_of_tone(), 0)
    fresh.enqueue(turn_of_tone(), 1)
    assert fresh.tick_realignments == 0 and fresh.next_frame_due is not None
