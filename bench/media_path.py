"""CPU cost of the server's own media path per session, excluding WebRTC itself.

Feeds one simulated session's worth of decoded frames (48 kHz stereo s16, 20 ms)
through the AudioChunker, and one session's model output through the
OutputAudioTrack's resampling and frame building, and reports microseconds per
20 ms frame and the share of one core per session. Median of several runs.

    .venv/bin/python bench/media_path.py [--seconds 60] [--runs 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from fractions import Fraction

import av
import numpy as np

from model.interface import TURN_SAMPLES
from server.media_in import AudioChunker
from server.media_out import OutputAudioTrack

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


def time_input(frames: list[av.AudioFrame]) -> float:
    chunker = AudioChunker()
    started = time.perf_counter()
    for frame in frames:
        chunker.push(frame)
    return time.perf_counter() - started


async def time_output(seconds: int) -> float:
    track = OutputAudioTrack(playout_delay_ms=0)
    turn = np.random.default_rng(1).normal(0, 0.1, TURN_SAMPLES).astype(np.float32)
    track._wait_for_next_frame = _no_wait  # measure the work, not the pacing sleep
    started = time.perf_counter()
    for _ in range(seconds * 5):
        track.enqueue(turn)
        for _ in range(10):
            await track.recv()
    return time.perf_counter() - started


async def _no_wait() -> None:
    return None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    frames = input_frames(args.seconds)
    count = args.seconds * FRAMES_PER_SECOND
    inputs = [time_input(frames) for _ in range(args.runs)]
    outputs = [asyncio.run(time_output(args.seconds)) for _ in range(args.runs)]
    for name, runs in (("input  (chunker)", inputs), ("output (track)  ", outputs)):
        median = statistics.median(runs)
        print(f"{name}: {median / count * 1e6:6.1f} us per 20 ms frame, "
              f"{median / args.seconds * 100:5.2f} % of a core per session (median of {args.runs})")


if __name__ == "__main__":
    main()
