"""What making a training conversation costs: whole conversations with each resampler,
and the synthetic room's convolution done directly against by FFT, side by side.

    python -m bench.data [--conversations 8] [--repeats 3]

Prints one JSON object. Conversations are made as training makes them (one fresh
process each, one worker: seconds per conversation per core), the resamplers
alternated within each repeat; medians over the repeats. The room's convolution is
timed on a conversation's length of audio against responses as short and as long as
``model.conversations._room`` draws (RT60 0.1–0.5 s).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from model.arguments import at_least


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=at_least(1), default=8)
    parser.add_argument("--repeats", type=at_least(1), default=3)
    parser.add_argument("--first-seed", type=at_least(0), default=50_000)
    args = parser.parse_args(argv)
    # Imported here: conversation workers re-import this module (model/conversations.py).
    import numpy as np

    from model.conversations import convolve, generate
    from model.interface import SAMPLE_RATE

    seeds = list(range(args.first_seed, args.first_seed + args.conversations))
    try:
        import av  # noqa: F401  (the GPU machine has none: the numpy resampler alone there)

        made: dict[str, list[float]] = {"av": [], "sinc": []}
    except ImportError:
        made = {"sinc": []}
    before = os.environ.get("MICROTURN_RESAMPLER")
    try:
        os.environ["MICROTURN_RESAMPLER"] = "sinc"
        generate(seeds[:1], workers=1)  # the fork server's start, once, outside the timings
        for _ in range(args.repeats):
            for name in made:
                os.environ["MICROTURN_RESAMPLER"] = name
                began = time.perf_counter()
                generate(seeds, workers=1)
                made[name].append((time.perf_counter() - began) / len(seeds))
    finally:
        if before is None:
            os.environ.pop("MICROTURN_RESAMPLER", None)
        else:
            os.environ["MICROTURN_RESAMPLER"] = before

    rng = np.random.default_rng(0)
    audio = rng.normal(0, 0.1, 24 * SAMPLE_RATE).astype(np.float32)
    room: dict[str, dict[str, float]] = {}
    for rt60 in (0.1, 0.5):
        response = rng.normal(0, 1, int(rt60 * SAMPLE_RATE))
        times: dict[str, list[float]] = {"direct": [], "fft": []}
        for _ in range(args.repeats):
            for way, run in (("direct", np.convolve), ("fft", convolve)):
                began = time.perf_counter()
                run(audio, response)
                times[way].append(time.perf_counter() - began)
        room[f"rt60_{rt60}s_ms"] = {way: round(1000 * statistics.median(t), 1) for way, t in times.items()}
    print(json.dumps({
        "conversations": args.conversations, "repeats": args.repeats,
        "seconds_a_conversation": {name: round(statistics.median(t), 3) for name, t in made.items()},
        "room_convolution_24s": room,
    }))


if __name__ == "__main__":
    main()
