"""Server CPU per session, excluding the model: the media path A/B in one run.

    python -m bench.media_cost [--peers 8] [--seconds 15] [--repeats 3]

Starts an echo server (the engine costs nothing, so all CPU is transport and media)
once per variant and repeat, drives it with ``--peers`` load-test peers, and reads
the server's CPU time from its /metrics. Variants: ``aiortc`` (raw frames to
aiortc's encoder) and ``pre-encoded`` (our mono Opus packets, the default). Prints
one JSON object: per-variant median %-of-a-core per session and their ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

VARIANTS = {"aiortc": ["--aiortc-encoder"], "pre-encoded": []}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    # Imported here, not at the top: conversation workers re-import this module (it is
    # __main__ under -m), and torch work at import in a forked child can deadlock.
    from loadtest.run import SCRIPT_SEED, run_level, start_server, stop_server
    from model.conversations import generate

    scripts = generate([SCRIPT_SEED, SCRIPT_SEED + 1], held_out=True, duration_s=args.seconds + 2)
    samples: dict[str, list[float]] = {name: [] for name in VARIANTS}
    underruns: dict[str, list[int]] = {name: [] for name in VARIANTS}
    for _ in range(args.repeats):
        for name, extra in VARIANTS.items():  # interleaved, so drift hits both alike
            process, url = start_server("echo", None, extra)
            try:
                level = run_level(url, args.peers, args.seconds, args.workers, scripts, 1, show_progress=False)
            finally:
                stop_server(process)
            samples[name].append(level["server_cpu_pct_per_session"])
            underruns[name].append(level["underruns"])
            print(f"{name}: {level['server_cpu_pct_per_session']} % per session", file=sys.stderr)
    medians = {name: statistics.median(values) for name, values in samples.items()}
    print(json.dumps({
        "peers": args.peers, "seconds": args.seconds, "repeats": args.repeats,
        "server_cpu_pct_per_session": medians, "samples": samples, "underruns": underruns,
        "aiortc_over_pre_encoded": round(medians["aiortc"] / medians["pre-encoded"], 2),
    }))


if __name__ == "__main__":
    main()
