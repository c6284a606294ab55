"""CPU cost of the server's own media path per session, before and after, in one run.

Input: one session's decoded frames (48 kHz stereo s16, 20 ms) through the
AudioChunker — FFmpeg's resampler (before) vs the numpy decimator (after).
Output: one session's model output through the OutputAudioTrack and what aiortc's
sender then does per frame — raw frames to aiortc (audio level + stereo Opus
encode, before) vs our mono Opus packets (after; aiortc only packs them).
Microseconds per 20 ms frame, share of one core per session, and the ratios.
Median of several runs.

    .venv/bin/python -m bench.media_path [--seconds 60] [--runs 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from fractions import Fraction

import av
import numpy as np
from aiortc.codecs.opus import OpusEncoder
from aiortc.rtp import compute_audio_level_dbov

from model.interface import TURN_SAMPLES
from server.media_in import AudioChunker
from server.media_out import OutputAudioTrack, UnpacedClock

FRAMES_PER_SECOND = 50


def input_frames(seconds: int) -> list[av.AudioFrame]:
    rng = np.random.default_rng(0)
    frames = []
    for i in range(seconds * FRAMES_PER_SECOND):
        data = (rng.normal(0, 3000, 1920)).astype(np.int16).reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(data, format="s16", layout="stereo")
        frame.sample_rate, frame.pts, frame.time_base = 48_000, i * 960, Fraction(1, 48_000)
        frames.append(frame)
    return frames


def time_input(frames: list[av.AudioFrame], ffmpeg_only: bool) -> float:
    chunker = AudioChunker(ffmpeg_only=ffmpeg_only)
    started = time.perf_counter()
    for frame in frames:
        chunker.push(frame)
    return time.perf_counter() - started


async def time_output(seconds: int, pre_encode: bool) -> float:
    """The track's work plus what aiortc's RTCRtpSender does with each result."""
    track = OutputAudioTrack(playout_delay_ms=0, clock=UnpacedClock())  # the work, not the pacing sleep
    track.pre_encode = pre_encode
    encoder = OpusEncoder()
    turn = np.random.default_rng(1).normal(0, 0.1, TURN_SAMPLES).astype(np.float32)
    started = time.perf_counter()
    for _ in range(seconds * 5):
        track.enqueue(turn)
        for _ in range(10):
            data = await track.recv()
            if isinstance(data, av.AudioFrame):  # as rtcrtpsender._next_encoded_frame
                compute_audio_level_dbov(data)
                encoder.encode(data)
            else:
                encoder.pack(data)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    frames = input_frames(args.seconds)
    count = args.seconds * FRAMES_PER_SECOND
    runs: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(args.runs):  # interleaved, so drift hits every variant alike
        runs["input, FFmpeg resampler"].append(time_input(frames, ffmpeg_only=True))
        runs["input, numpy decimator"].append(time_input(frames, ffmpeg_only=False))
        runs["output, aiortc encodes"].append(asyncio.run(time_output(args.seconds, pre_encode=False)))
        runs["output, mono Opus packets"].append(asyncio.run(time_output(args.seconds, pre_encode=True)))
    medians = {name: statistics.median(values) for name, values in runs.items()}
    for name, median in medians.items():
        print(f"{name:26s}: {median / count * 1e6:6.1f} us per 20 ms frame, "
              f"{median / args.seconds * 100:5.2f} % of a core per session (median of {args.runs})")
    print(f"input before/after:  {medians['input, FFmpeg resampler'] / medians['input, numpy decimator']:.2f}x")
    print(f"output before/after: {medians['output, aiortc encodes'] / medians['output, mono Opus packets']:.2f}x")


VARIANTS = ("input, FFmpeg resampler", "input, numpy decimator", "output, aiortc encodes", "output, mono Opus packets")


if __name__ == "__main__":
    main()
