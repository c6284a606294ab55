"""``microturn loadtest``: simulated WebRTC peers against a real server.

    microturn loadtest --peers 8 --seconds 20 --json out.json --report out/   # starts an echo server
    microturn loadtest --url http://host:8000 --peers 16                       # a running server
    microturn loadtest --engine model --ramp 1,2,4,8,16,32 --report out/      # capacity

Peers are spread over ``--workers`` processes (the generator must not be the
bottleneck: its own CPU is reported). Each plays a held-out synthetic conversation
(model/conversations.py) with a known timeline and records what it hears.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from loadtest.worker import work
from model.arguments import at_least, counts, positive
from model.conversations import Conversation, generate
from model.evaluate import aggregate, nearest_rank

SCRIPT_SEED = 2_000_000  # held-out voices, seeds no evaluation uses
MAX_DEADLINE_MISS_RATE = 0.01
MAX_SERVER_ADDED_P99_MS = 60.0


def percentile(values: list[float], q: float, digits: int | None = 2) -> float | None:
    """The ``q`` quantile by nearest rank, as ``microturn eval`` reads its stop p90
    (``model.evaluate.nearest_rank``); None for no values."""
    if not values:
        return None
    value = nearest_rank(sorted(values), q)
    return value if digits is None else round(value, digits)


def summary(values: list[float]) -> dict[str, float | None]:
    return {"p50": percentile(values, 0.5), "p95": percentile(values, 0.95), "p99": percentile(values, 0.99)}


# -- the server ---------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(engine: str, checkpoint: str | None, extra: list[str]) -> tuple[subprocess.Popen[bytes], str]:
    """``microturn serve`` in a child process, admission limit off (the load test finds the limit)."""
    port = free_port()
    command = [sys.executable, "-m", "server.cli", "serve", "--engine", engine, "--port", str(port),
               "--ice-host", "127.0.0.1", "--capacity", "512", "--max-sessions", "512", "--log-level", "warning",
               *(["--checkpoint", checkpoint] if checkpoint else []), *extra]
    process = subprocess.Popen(command)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.kill()
    process.wait()
    raise RuntimeError("the server did not start within 120 s")


def stop_server(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM (the server drains its sessions), then SIGKILL if it is still there."""
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def server_cpu_seconds(url: str) -> float | None:
    """The server process's CPU time, from its Prometheus endpoint."""
    try:
        text = httpx.get(url + "/metrics", timeout=5).text
    except httpx.HTTPError:
        return None
    match = re.search(r"^process_cpu_seconds_total (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else None


# -- one run at one peer count --------------------------------------------------------


def run_level(url: str, peers: int, seconds: float, workers: int, scripts: list[Conversation],
              jitter_prefetch: int, show_progress: bool = True) -> dict[str, Any]:
    context = multiprocessing.get_context("spawn")
    progress, results = context.Queue(), context.Queue()
    shares = [list(range(peers))[w::workers] for w in range(min(workers, peers))]
    started = time.monotonic()
    processes = [context.Process(target=work, args=(share, url, scripts, seconds, jitter_prefetch, progress, results))
                 for share in shares]
    for process in processes:
        process.start()
    # Server CPU is read over the steady part only: from all peers connected until
    # shortly before their scripts end (not worker start-up, connects or teardown).
    window: list[tuple[float, float | None]] = []
    connected, outcome = 0, []
    deadline = started + seconds + 120
    while len(outcome) < len(processes) and time.monotonic() < deadline:
        while not progress.empty():
            progress.get()
            connected += 1
            if connected == peers:
                window.append((time.monotonic(), server_cpu_seconds(url)))
        if len(window) == 1 and time.monotonic() - window[0][0] >= 0.7 * seconds:
            window.append((time.monotonic(), server_cpu_seconds(url)))
        while not results.empty():
            outcome.append(results.get())
        if show_progress:
            print(f"\r  {peers} peers: {connected} connected, {time.monotonic() - started:5.1f} s / {seconds:.0f} s, "
                  f"{len(outcome)}/{len(processes)} workers done", end="", file=sys.stderr, flush=True)
        time.sleep(0.25)
    if show_progress:
        print(file=sys.stderr)
    for process in processes:
        process.join(5)
        if process.is_alive():
            process.kill()
    wall = time.monotonic() - started
    server_cpu_pct = None
    if len(window) == 2 and window[0][1] is not None and window[1][1] is not None:
        server_cpu_pct = 100 * (window[1][1] - window[0][1]) / (window[1][0] - window[0][0])
    results_by_peer = sorted((p for o in outcome for p in o["peers"]), key=lambda p: p["peer"])
    generator_cpu = sum(o["cpu_s"] for o in outcome)
    return aggregate_level(peers, results_by_peer, server_cpu_pct, 100 * generator_cpu / wall)


def aggregate_level(peers: int, results: list[dict[str, Any]], server_cpu_pct: float | None,
                    generator_cpu_pct: float) -> dict[str, Any]:
    ok = [r for r in results if r["error"] is None]
    missing = peers - len(results)  # a worker that died or ran out of time sends nothing back
    lost = [f"{missing} of {peers} peers never reported (a load worker died or timed out)"] if missing else []

    def every(key: str) -> list[float]:
        return [value for r in ok for value in r[key]]

    turns = sum(r["turns"] for r in ok)
    connect = [r["connect_ms"] for r in ok if r["connect_ms"] is not None]
    server_added, v2v = every("server_added_ms"), every("voice_to_voice_ms")
    interaction = aggregate([record for r in ok for record in r["interaction"]]) if ok else {}
    return {
        "peers": peers,
        "peers_ok": len(ok),
        "errors": lost + sorted({r["error"] for r in results if r["error"]}),
        "connect_ms_p50": percentile(connect, 0.5),
        "connect_ms": summary(connect),
        "server_added_ms_p50": percentile(server_added, 0.5),
        "server_added_ms_p99": percentile(server_added, 0.99),
        "server_added_ms": summary(server_added),
        "voice_to_voice_ms_p50": percentile(v2v, 0.5),
        "voice_to_voice_ms": summary(v2v),
        "unanswered": sum(r["unanswered"] for r in ok),
        "overlapped": sum(r["overlapped"] for r in ok),
        "arrival_source": sorted({r["arrival_source"] for r in ok if r["arrival_source"]}),
        "event_lag_ms": summary(every("event_lag_ms")),
        "turns": turns,
        "underruns": sum(r["underrun_frames"] for r in ok),
        "concealed_frames": sum(r["concealed_frames"] for r in ok),
        "received_frames": sum(r["received_frames"] for r in ok),
        "deadline_misses": sum(r["deadline_misses"] for r in ok),
        "deadline_miss_rate": round(sum(r["deadline_misses"] for r in ok) / turns, 4) if turns else None,
        "shared_step_share": shared_step_share(ok),
        "server_cpu_pct": round(server_cpu_pct, 1) if server_cpu_pct is not None else None,
        "server_cpu_pct_per_session": round(server_cpu_pct / len(ok), 2) if server_cpu_pct and ok else None,
        "generator_cpu_pct": round(generator_cpu_pct, 1),
        "interaction": interaction,
        "samples": {"server_added_ms": server_added, "voice_to_voice_ms": v2v},
    }


def shared_step_share(results: list[dict[str, Any]]) -> float | None:
    """Of the turns whose chunks closed while every peer was in session, the share
    stepped together with all of them: sessions off the engine's grid, or a batch
    window too short for frames out of phase, each cost an extra step a micro-turn
    (server/alignment.py). None if the peers were never all in session at once."""
    if not results or any(not r["steps"] for r in results):
        return None
    start = max(min(closed for closed, _ in r["steps"]) for r in results)
    end = min(max(closed for closed, _ in r["steps"]) for r in results)
    together = [batch for r in results for closed, batch in r["steps"] if start <= closed <= end]
    if not together:
        return None
    return round(sum(batch >= len(results) for batch in together) / len(together), 3)


def passes(level: dict[str, Any], max_p99_ms: float = MAX_SERVER_ADDED_P99_MS) -> bool:
    p99 = level["server_added_ms_p99"]
    return (level["peers_ok"] == level["peers"] and (level["deadline_miss_rate"] or 0) <= MAX_DEADLINE_MISS_RATE
            and p99 is not None and p99 <= max_p99_ms)


# -- the command ----------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="microturn loadtest", description="Simulated WebRTC peers against a server.")
    parser.add_argument("--url", default=None, help="a running server (default: start one)")
    parser.add_argument("--engine", choices=["echo", "model"], default="echo", help="engine of a started server")
    parser.add_argument("--checkpoint", default=None, help="checkpoint of a started model server")
    parser.add_argument("--peers", type=at_least(1), default=4)
    parser.add_argument("--seconds", type=positive, default=20.0, help="script length each peer plays")
    parser.add_argument("--workers", type=at_least(1), default=max(1, (os.cpu_count() or 2) // 2))
    parser.add_argument("--ramp", type=counts, default=None,
                        help="comma-separated peer counts: run each until one fails")
    parser.add_argument("--jitter-prefetch", type=at_least(1, at_most=8), default=1,
                        help="the peers' receive jitter buffer (packets)")
    parser.add_argument("--max-p99-ms", type=float, default=MAX_SERVER_ADDED_P99_MS,
                        help="ramp: the p99 server-added latency a passing count may have")
    parser.add_argument("--scripts", type=at_least(1), default=4, help="distinct conversations the peers cycle through")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--report", default=None, help="directory for report.md and PNG plots")
    parser.add_argument("--server-arg", action="append", default=[], help="extra argument for a started server")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    scripts = generate(list(range(SCRIPT_SEED, SCRIPT_SEED + args.scripts)), held_out=True,
                       duration_s=args.seconds + 2)
    process, url = (None, args.url) if args.url else start_server(args.engine, args.checkpoint, args.server_arg)
    try:
        health = httpx.get(url + "/healthz", timeout=5).json()
        levels = args.ramp or [args.peers]
        runs = []
        for peers in levels:
            level = run_level(url, peers, args.seconds, args.workers, scripts, args.jitter_prefetch)
            runs.append(level)
            print(f"  {peers} peers: server-added p50/p99 {level['server_added_ms_p50']}/{level['server_added_ms_p99']} ms,"
                  f" deadline misses {level['deadline_miss_rate']}, shared steps {level['shared_step_share']},"
                  f" server CPU {level['server_cpu_pct']} %",
                  file=sys.stderr)
            if args.ramp and not passes(level, args.max_p99_ms):
                break
    finally:
        if process is not None:
            stop_server(process)
    passing_runs = [r for r in runs if passes(r, args.max_p99_ms)]
    shown = passing_runs[-1] if args.ramp and passing_runs else runs[-1]
    result = {**shown, "engine": health.get("engine"), "url": url,
              "seconds": args.seconds, "workers": args.workers}
    if args.ramp:
        passing = [r["peers"] for r in runs if passes(r, args.max_p99_ms)]
        result["ramp"] = [{k: v for k, v in r.items() if k != "samples"} for r in runs]
        result["capacity"] = max(passing) if passing else 0
        result["capacity_rule"] = (f"deadline misses <= {MAX_DEADLINE_MISS_RATE:.0%} and p99 server-added "
                                   f"<= {args.max_p99_ms:.0f} ms")
    if args.report:
        from loadtest.report import write_report

        write_report(result, runs, Path(args.report))
    output = {k: v for k, v in result.items() if k != "samples"}
    if args.json:
        Path(args.json).write_text(json.dumps(output, indent=2))
    print(json.dumps({k: output.get(k) for k in ("peers", "peers_ok", "errors", "connect_ms_p50", "server_added_ms_p50",
                                                  "server_added_ms_p99", "voice_to_voice_ms_p50", "underruns",
                                                  "deadline_miss_rate", "shared_step_share",
                                                  "server_cpu_pct_per_session", "capacity")}))
    # A run whose peers failed must not look like one that passed (CI reads the status).
    failed = result["capacity"] == 0 if args.ramp else result["peers_ok"] < result["peers"]
    if failed:
        print(f"loadtest failed: {'no level passed' if args.ramp else 'not every peer completed'}: "
              f"{result['errors'][:3]}", file=sys.stderr)
        raise SystemExit(1)
    return result

