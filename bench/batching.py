"""How often sessions share a model step: the batch window A/B, idle or loaded.

    python -m bench.batching [--peers 3] [--seconds 6] [--repeats 5] [--windows 15,25] [--load 2]

Starts an echo server per window and repeat (windows alternated, so drift hits all
alike), connects ``--peers`` load-test peers 0.3-0.32 s apart, and reads each peer's
``turn`` events: the share of its turns, after the first ``--settle`` seconds
(alignment needs a second of frames, server/alignment.py), whose step served every
peer. ``--load N`` runs N busy processes beside it, as a loaded machine would:
first frames arrive late and the event loop jitters. Prints one JSON object: per
window, the median and the worst over repeats of the share of turns that shared a step.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import sys

import numpy as np

from loadtest.peer import Peer
from loadtest.run import start_server, stop_server
from model.interface import SAMPLE_RATE, TURN_MS


async def shared_share(url: str, peers: int, seconds: float, settle_s: float, rng: random.Random) -> float:
    """Share of the peers' turns after ``settle_s`` whose step served all ``peers``."""
    quiet = np.zeros(int((seconds + 1) * SAMPLE_RATE), dtype=np.float32)
    connected: list[Peer] = []
    try:
        for _ in range(peers):
            peer = Peer(url, quiet)
            await peer.connect()
            connected.append(peer)
            # Not a whole number of 20 ms frames apart: independent senders' frames
            # are out of phase, so their chunks can close up to a frame apart.
            await asyncio.sleep(0.3 + rng.uniform(0.0, 0.02))
        await asyncio.sleep(seconds)
        turns = [[event["batch"] for event in peer.events_of("turn")] for peer in connected]  # before any leaves
    finally:
        for peer in connected:
            await peer.close()
    # Turns while every peer was connected, settled: as many as the last to join had
    # after settling, counted from each peer's end.
    counted = len(turns[-1]) - round(settle_s * 1000 / TURN_MS)
    if counted <= 0:
        raise RuntimeError("no turns after settling: lengthen --seconds")
    batches = [batch for peer_turns in turns for batch in peer_turns[-counted:]]
    return sum(batch == peers for batch in batches) / len(batches)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=6.0, help="after the last peer joined")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds of each peer's turns not counted")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--windows", default="15,25", help="batch windows to compare, ms (comma-separated)")
    parser.add_argument("--load", type=int, default=0, help="busy processes running beside the server")
    args = parser.parse_args(argv)
    windows = [float(w) for w in args.windows.split(",")]
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.load)]
    samples: dict[float, list[float]] = {w: [] for w in windows}
    try:
        for repeat in range(args.repeats):
            for window in windows:  # the same joining times for each window
                process, url = start_server("echo", None, ["--batch-window-ms", str(window)])
                try:
                    share = asyncio.run(shared_share(url, args.peers, args.seconds, args.settle, random.Random(repeat)))
                finally:
                    stop_server(process)
                samples[window].append(round(share, 3))
                print(f"window {window:g} ms: {share:.3f} of turns shared by all {args.peers}", file=sys.stderr)
    finally:
        for burner in burners:
            burner.kill()
    print(json.dumps({
        "peers": args.peers, "seconds": args.seconds, "settle_s": args.settle, "repeats": args.repeats,
        "load": args.load,
        "shared_median": {f"{w:g}": statistics.median(v) for w, v in samples.items()},
        "shared_worst": {f"{w:g}": min(v) for w, v in samples.items()},  # a pair split for good shows here
        "samples": {f"{w:g}": v for w, v in samples.items()},
    }))


if __name__ == "__main__":
    main()
