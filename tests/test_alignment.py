"""Keeping sessions on the engine's grid: the sender's clock, estimated from arrivals."""

from __future__ import annotations

import random

import pytest

from model.interface import SAMPLE_RATE, TURN_SAMPLES
from server.alignment import ALIGN_TOLERANCE_SAMPLES, QUIET_RMS, QuietFloor, SenderClock, is_on_grid, padding_to_grid

FRAME_S = 0.02
TRUE_OFFSET = 1000.0  # our clock when the sender's media time was 0


def arrivals(frames: int, first: int = 0, seed: int = 0) -> list[tuple[float, float]]:
    """(arrival, media end) of on-time frames delayed 1-30 ms each, a few not at all."""
    rng = random.Random(seed)
    out = []
    for i in range(first, first + frames):
        media_end = (i + 1) * FRAME_S
        delay = 0.0 if rng.random() < 0.1 else rng.uniform(0.001, 0.03)
        out.append((TRUE_OFFSET + media_end + delay, media_end))
    return out


def test_frames_that_all_came_late_at_first_are_outweighed_by_later_ones():
    clock = SenderClock()
    for i in range(5):  # a busy loop during the handshake: every first frame 45 ms late
        media_end = (i + 1) * FRAME_S
        clock.observe(TRUE_OFFSET + media_end + 0.045, media_end)
    assert clock.offset == pytest.approx(TRUE_OFFSET + 0.045)
    for arrived, media_end in arrivals(50, first=5):
        clock.observe(arrived, media_end)
    assert clock.offset == pytest.approx(TRUE_OFFSET, abs=1e-9)
    assert clock.evidence_s == pytest.approx(54 * FRAME_S)


def test_the_window_follows_a_drifting_clock_and_reset_forgets():
    clock = SenderClock(window_s=2.0)
    for arrived, media_end in arrivals(100):
        clock.observe(arrived, media_end)
    assert clock.offset == pytest.approx(TRUE_OFFSET)
    # The route got 12 ms slower: after a window's worth of frames the estimate follows.
    for arrived, media_end in arrivals(150, first=100, seed=1):
        clock.observe(arrived + 0.012, media_end)
    assert clock.offset == pytest.approx(TRUE_OFFSET + 0.012)
    clock.reset()
    assert clock.offset is None and clock.evidence_s == 0.0


def test_padding_puts_a_boundary_on_the_grid_line_at_or_before_it():
    origin = 500.0
    for late_s in (0.0, 0.004, 0.05, 0.1999):
        boundary = origin + 7 * 0.2 + late_s
        padding = padding_to_grid(boundary, origin)
        assert 0 <= padding < TURN_SAMPLES
        assert padding == pytest.approx(late_s * SAMPLE_RATE, abs=1)
        moved = boundary - padding / SAMPLE_RATE  # lands on a grid line, to a sample
        phase = (moved - origin) % 0.2
        assert min(phase, 0.2 - phase) < 1 / SAMPLE_RATE
    assert is_on_grid(0) and is_on_grid(ALIGN_TOLERANCE_SAMPLES) and is_on_grid(TURN_SAMPLES - 10)
    assert not is_on_grid(ALIGN_TOLERANCE_SAMPLES + 1) and not is_on_grid(TURN_SAMPLES // 2)


def test_quiet_is_measured_against_the_background_once_ten_seconds_were_heard():
    """A user in a noisy room (background at 0.02 RMS, over the fixed 0.01) is quiet
    between utterances and not while speaking; before 10 s the fixed level rules,
    so the first turns of an utterance never set the floor."""
    floor = QuietFloor(turns=50)
    noise, speech = 0.02, 0.2  # 20 dB apart
    for _ in range(49):
        floor.observe(speech * 0.6)  # the quietest so far is speech
    assert not floor.is_quiet(speech * 0.6)
    assert floor.is_quiet(QUIET_RMS / 2)
    rng = random.Random(3)
    for turn in range(200):
        talking = (turn // 10) % 2 == 1  # 2 s of speech, 2 s of room noise
        floor.observe(speech * rng.uniform(0.3, 1.0) if talking else noise * rng.uniform(0.8, 1.2))
    assert floor.is_quiet(noise * 1.1)
    assert not floor.is_quiet(speech * 0.3)
