"""The chunker: exact 200 ms chunks on the sender's media clock, whatever the network does."""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np
import pytest

from model.interface import SAMPLE_RATE, TURN_SAMPLES
from server.media_in import AudioChunker, Decimator

RATE = 48_000
FRAME = 960  # aiortc hands over 20 ms frames
TONE_HZ = 250.0


def tone(start: int, count: int, rate: int = RATE) -> np.ndarray:
    """A sine whose phase is tied to absolute stream time: any drift shows up as phase error."""
    t = (start + np.arange(count)) / rate
    return (0.5 * np.sin(2 * np.pi * TONE_HZ * t)).astype(np.float32)


def make_frame(index: int, pts_origin: int = 0, layout: str = "stereo", rate: int = RATE) -> av.AudioFrame:
    samples = rate // 50
    mono = (tone(index * samples, samples, rate) * 32767).astype(np.int16)
    channels = 2 if layout == "stereo" else 1
    data = np.repeat(mono, channels).reshape(1, -1)  # packed s16, as aiortc decodes Opus
    frame = av.AudioFrame.from_ndarray(data, format="s16", layout=layout)
    frame.sample_rate = rate
    frame.pts = (pts_origin + index * samples) % (1 << 32)
    frame.time_base = Fraction(1, rate)
    return frame


def feed(chunker: AudioChunker, frames) -> list[np.ndarray]:
    chunks: list[np.ndarray] = []
    for frame in frames:
        chunks += chunker.push(frame)
    return chunks


def test_chunks_are_exactly_200_ms_of_16_khz_mono_float32():
    chunker = AudioChunker()
    chunks = feed(chunker, (make_frame(i) for i in range(50)))  # 1 s of 48 kHz stereo
    chunks += chunker.flush()
    assert len(chunks) == 5
    for chunk in chunks:
        assert chunk.dtype == np.float32 and chunk.shape == (TURN_SAMPLES,)
    assert chunker.next_turn == 5


@pytest.mark.parametrize("layout", ["mono", "stereo"])
def test_resampled_audio_matches_the_tone(layout):
    chunker = AudioChunker()
    audio = np.concatenate(feed(chunker, (make_frame(i, layout=layout) for i in range(100))))
    expected = tone(0, audio.size, SAMPLE_RATE)
    lag = resampler_lag(audio, expected)
    assert 0 <= lag < 40, "the resampler's delay is a few samples, not a drift"
    error = audio[lag + 100 :] - expected[100 : audio.size - lag]
    assert np.abs(error).max() < 0.01


def resampler_lag(audio: np.ndarray, expected: np.ndarray) -> int:
    scores = [np.dot(audio[lag : lag + 8000], expected[:8000]) for lag in range(64)]
    return int(np.argmax(scores))


def test_ten_minutes_with_loss_reordering_duplicates_and_wraparound_do_not_drift():
    rng = np.random.default_rng(7)
    total_frames = 10 * 60 * 50  # 10 minutes
    origin = (1 << 32) - 5 * RATE  # RTP timestamps wrap 5 s in
    order = list(range(total_frames))
    for i in range(0, total_frames - 1, 97):  # reorder neighbours now and then
        order[i], order[i + 1] = order[i + 1], order[i]
    lost = set(rng.choice(total_frames, size=total_frames // 20, replace=False).tolist())  # 5 % loss
    burst_start = 12_345
    lost.update(range(burst_start, burst_start + 25))  # and a 0.5 s burst
    arrivals = []
    for index in order:
        if index in lost:
            continue
        arrivals.append(index)
        if rng.random() < 0.01:
            arrivals.append(index)  # duplicate packet

    chunker = AudioChunker()
    chunks = feed(chunker, (make_frame(i, origin) for i in arrivals))
    chunks += chunker.flush()

    # Exactly one chunk per 200 ms of session time.
    assert len(chunks) == total_frames * FRAME // (RATE * TURN_SAMPLES // SAMPLE_RATE)
    # The last seconds still line up with the absolute timeline: no drift.
    # Compare inside frames that were used (and whose neighbours were, so the
    # resampler's filter is not ringing from a filled gap).
    used, newest = set(), -1
    for index in arrivals:
        if index > newest:
            used.add(index)
            newest = index
    audio = np.concatenate(chunks)
    expected = tone(0, audio.size, SAMPLE_RATE)
    lag = resampler_lag(audio, expected)
    assert lag < 40
    positions = np.arange(audio.size - 2 * SAMPLE_RATE, audio.size - SAMPLE_RATE)
    frame_of = (positions - lag) * (RATE // SAMPLE_RATE) // FRAME
    clean = np.array([{f - 1, f, f + 1} <= used for f in frame_of])
    assert clean.mean() > 0.7
    error = audio[positions[clean]] - expected[positions[clean] - lag]
    assert np.abs(error).max() < 0.01
    stats = chunker.stats
    assert stats.gap_samples > 0 and stats.late_samples > 0 and stats.discontinuities == 0


def test_lead_in_shifts_the_chunk_boundaries():
    lead_in = 1_000
    chunker = AudioChunker(lead_in_samples=lead_in)
    chunks = feed(chunker, (make_frame(i) for i in range(10)))  # 200 ms of input
    assert len(chunks) == 1
    assert np.all(chunks[0][:lead_in] == 0)
    assert np.abs(chunks[0][lead_in + 50 :]).max() > 0.3
    with pytest.raises(ValueError):
        AudioChunker(lead_in_samples=TURN_SAMPLES)


def test_padding_moves_later_boundaries_sooner_and_loses_nothing():
    chunker, reference = AudioChunker(), AudioChunker()
    frames = [make_frame(i) for i in range(30)]  # 600 ms
    padding = 1_000
    padded = feed(chunker, frames[:12])  # one chunk closed, 40 ms into the next
    assert chunker.samples_to_boundary == TURN_SAMPLES - 640
    padded += chunker.pad(padding)
    padded += feed(chunker, frames[12:])
    plain = feed(reference, frames)
    audio, expected = np.concatenate(padded), np.concatenate(plain)
    # The same stream with `padding` zeros spliced in at the last boundary, before the
    # 40 ms the next chunk already held (the user may have begun a word there).
    split = TURN_SAMPLES
    assert np.array_equal(audio[:split], expected[:split])
    assert np.all(audio[split : split + padding] == 0)
    assert np.array_equal(audio[split + padding :], expected[split : audio.size - padding])
    # The boundary after the pad came `padding` samples sooner.
    assert len(padded) == 3 and chunker.samples_to_boundary == TURN_SAMPLES - (600 * 16 + padding - 3 * TURN_SAMPLES)
    assert chunker.stats.realignments == 1 and chunker.stats.realign_samples == padding
    with pytest.raises(ValueError):
        chunker.pad(TURN_SAMPLES)


def test_a_pad_past_the_boundary_closes_the_chunk_at_once():
    chunker = AudioChunker()
    held = np.concatenate(feed(chunker, (make_frame(i) for i in range(19))))  # 380 ms: 20 ms short
    closed = chunker.pad(TURN_SAMPLES // 2)
    assert len(closed) == 1 and np.all(closed[0][: TURN_SAMPLES // 2] == 0)
    assert np.abs(closed[0][TURN_SAMPLES // 2 :]).max() > 0.3  # what it held, after the silence
    assert chunker.samples_to_boundary == TURN_SAMPLES // 2 + 320
    assert held.size == TURN_SAMPLES


def test_media_time_counts_the_senders_stream_not_lead_in_or_padding():
    chunker = AudioChunker(lead_in_samples=500)
    feed(chunker, (make_frame(i) for i in range(10)))
    chunker.pad(700)
    feed(chunker, (make_frame(i) for i in range(15, 20)))  # 100 ms lost before these
    chunker.fill_silence(5 * FRAME)  # then a 100 ms stall
    assert chunker.media_seconds == pytest.approx(0.2 + 0.1 + 0.1 + 0.1)


def test_a_format_change_mid_stream_does_not_raise_or_lose_time():
    chunker = AudioChunker()
    chunks = feed(chunker, (make_frame(i, layout="stereo") for i in range(25)))
    chunks += feed(chunker, (make_frame(i, layout="mono") for i in range(25, 50)))
    chunks += chunker.flush()
    assert len(chunks) == 5
    assert chunker.stats.format_changes == 1


def test_stall_fill_advances_the_clock_and_late_frames_are_dropped():
    chunker = AudioChunker()
    chunks = feed(chunker, (make_frame(i) for i in range(5)))
    chunks += chunker.fill_silence(10 * FRAME)  # the sender went quiet for 200 ms
    # The frames for that stretch turn up late: their time has passed.
    chunks += feed(chunker, (make_frame(i) for i in range(5, 15)))
    assert chunker.stats.late_samples == 10 * FRAME
    chunks += feed(chunker, (make_frame(i) for i in range(15, 20)))
    chunks += chunker.flush()
    assert len(chunks) == 2  # 400 ms of session time, however it was filled
    assert np.abs(chunks[0][2000:3000]).max() < 1e-3  # the stalled stretch is silence


def test_a_partly_late_frame_keeps_only_its_new_samples():
    chunker = AudioChunker()
    feed(chunker, (make_frame(i) for i in range(3)))
    late = make_frame(3)
    late.pts -= FRAME // 2  # starts half a frame before the stream's end
    chunker.push(late)
    assert chunker.stats.late_samples == FRAME // 2


def test_a_chunk_closes_with_its_own_last_frame():
    """No resampler lookahead: the tenth 20 ms frame closes the first chunk (FFmpeg's
    resampler held 16 samples back, so it took an eleventh frame: +20 ms per reply)."""
    chunker = AudioChunker()
    assert feed(chunker, (make_frame(i) for i in range(9))) == []
    assert len(chunker.push(make_frame(9))) == 1


@pytest.mark.parametrize("hz,low,high", [(300, 0.98, 1.02), (3000, 0.98, 1.02), (6000, 0.9, 1.05),
                                          (8800, 0.0, 0.01), (15000, 0.0, 0.001)])
def test_the_decimator_keeps_the_speech_band_and_stops_aliases(hz, low, high):
    t = np.arange(RATE) / RATE
    x = np.sin(2 * np.pi * hz * t).astype(np.float32)
    whole = Decimator(RATE)(x)
    assert whole.size == SAMPLE_RATE
    gain = np.sqrt(2 * np.mean(np.square(whole[200:])))
    assert low <= gain <= high, gain
    decimator = Decimator(RATE)
    streamed = np.concatenate([decimator(x[i : i + FRAME]) for i in range(0, x.size, FRAME)])
    np.testing.assert_allclose(streamed, whole, atol=1e-6)
