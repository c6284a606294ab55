"""Soak: many short sessions against a live server, some of whose peers vanish.

    python -m loadtest.soak --url http://127.0.0.1:8000 --cycles 1000 --concurrency 8 --vanish-every 5

Each cycle is a real aiortc peer (``peer.py``): it connects (audio and the events
channel), waits for ``session.ready``, a ``pong`` and the first ``turn`` (audio went
in and came out), then either hangs up properly (``DELETE`` and a closing handshake)
or, every ``--vanish-every``-th cycle, vanishes without a word (``Peer.vanish``).
For each vanished session the driver polls ``GET /v1/sessions/{id}`` until it is
gone (404): how long the server held a dead peer's slot. The cycles run in batches of
``--sample-every``; after each batch, once every session has ended, the server is
sampled (by default RSS from ``/metrics`` and sessions from ``/healthz``; tests pass
``process_probe``, which also counts the server's asyncio tasks and live objects).

The summary (JSON on stdout) says whether memory and tasks stayed flat: each reading
at the first sample after warm-up, the last, and the largest.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import inspect
import json
import re
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
from aiortc import RTCPeerConnection

from loadtest.peer import Peer, SignallingError
from loadtest.run import percentile, start_server, stop_server
from model.arguments import at_least
from model.interface import SAMPLE_RATE
from model.memory import release_freed_memory, resident_bytes
from server.session import Session

Probe = Callable[[], Awaitable[dict[str, Any]]]
REFUSED_RETRY_S = 0.5  # a 503 (server full, e.g. of vanished peers not yet freed): retry after this
POLL_S = 0.1  # how often a vanished session's resource is polled
SETTLE_S = 10.0  # how long a probe waits for objects still being torn down to go


@dataclass
class SoakResult:
    cycles: int = 0
    closed: int = 0
    vanished: int = 0
    errors: list[str] = field(default_factory=list)  # one line per failed cycle, with when
    refused: int = 0  # 503 answers retried (not failures)
    connect_ms: list[float] = field(default_factory=list)
    freed_after_s: list[float] = field(default_factory=list)  # vanish -> its resource 404s
    not_freed: list[str] = field(default_factory=list)  # vanished sessions still there at the deadline
    samples: list[dict[str, Any]] = field(default_factory=list)  # probe readings, with "cycle"
    elapsed_s: float = 0.0


def tone(seconds: float = 1.0, hz: float = 220.0) -> np.ndarray:
    """What each peer says: a quiet tone (any audio will do; it must not be silence
    so the echo is audible)."""
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return (0.2 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


async def run_cycle(url: str, audio: np.ndarray, vanish: bool, timeout_s: float = 15.0) -> tuple[Peer, float]:
    """Connect, exchange audio and a ping, then hang up or vanish. Returns the peer and
    when it hung up (``time.monotonic()``). Raises on any failure (peer closed)."""
    peer = Peer(url, audio, jitter_prefetch=1)
    try:
        async with asyncio.timeout(timeout_s):
            await peer.connect()
            await peer.wait_for_event("session.ready", timeout_s)
            peer.send({"type": "ping", "id": 1})
            await peer.wait_for_event("pong", timeout_s, id=1)
            await peer.wait_for_event("turn", timeout_s)
            while peer.recording.first_arrival is None:  # the server's voice reached us
                await asyncio.sleep(0.02)
    except BaseException:
        await peer.close(delete=peer.session_url is not None)
        raise
    hung_up = time.monotonic()
    await (peer.vanish() if vanish else peer.close())
    return peer, hung_up


async def wait_until_gone(client: httpx.AsyncClient, session_url: str, since: float,
                          deadline_s: float) -> float | None:
    """Seconds from ``since`` until ``GET session_url`` answers 404; None if it still
    exists ``deadline_s`` after ``since``."""
    while time.monotonic() - since < deadline_s:
        try:
            if (await client.get(session_url)).status_code == 404:
                return time.monotonic() - since
        except httpx.TransportError:
            pass  # e.g. a kept-alive connection the server closed just then: ask again
        await asyncio.sleep(POLL_S)
    return None


async def soak(url: str, cycles: int = 1000, concurrency: int = 8, vanish_every: int = 5, sample_every: int = 100,
               probe: Probe | None = None, free_deadline_s: float = 30.0,
               progress: Callable[[SoakResult], None] | None = None) -> SoakResult:
    """Run ``cycles`` cycles, ``concurrency`` at a time; every ``vanish_every``-th
    peer vanishes (0: none). The cycles run in batches of ``sample_every``; after each
    batch every peer has hung up and every vanished session is gone (or past
    ``free_deadline_s``), and ``probe`` is sampled then — readings taken at the same
    quiet point (no sessions) compare, readings during a batch would not. A first
    sample is taken before any cycle (``cycle`` 0)."""
    probe = probe or http_probe(url)
    result = SoakResult()
    audio = tone()
    started = time.monotonic()

    async def sample() -> None:
        result.samples.append({"cycle": result.cycles, "t_s": round(time.monotonic() - started, 2),
                               **await probe()})

    async def watch(client: httpx.AsyncClient, session_url: str, since: float) -> None:
        freed = await wait_until_gone(client, session_url, since, free_deadline_s)
        if freed is None:
            result.not_freed.append(session_url)
        else:
            result.freed_after_s.append(round(freed, 3))

    async def one(client: httpx.AsyncClient, index: int, watchers: list[asyncio.Task[None]]) -> None:
        vanish = vanish_every > 0 and index % vanish_every == vanish_every - 1
        first_refused: float | None = None
        while True:
            try:
                peer, hung_up = await run_cycle(url, audio, vanish)
                break
            except SignallingError as exc:
                if exc.status != 503:
                    result.errors.append(f"cycle {index} at {time.monotonic() - started:.1f} s: {exc}")
                    return
                result.refused += 1  # full (of vanished peers not yet freed): as a client would, retry ...
                first_refused = first_refused or time.monotonic()
                if time.monotonic() - first_refused > free_deadline_s:  # ... but not for ever: a leak
                    result.errors.append(f"cycle {index}: refused (503) for {free_deadline_s:.0f} s on end: "
                                         "the server frees no slot")
                    return
                await asyncio.sleep(REFUSED_RETRY_S)
            except Exception as exc:  # noqa: BLE001 — a failed cycle is a result, not the end
                result.errors.append(f"cycle {index} at {time.monotonic() - started:.1f} s: {type(exc).__name__}: {exc}")
                return
        if peer.connect_ms is not None:
            result.connect_ms.append(round(peer.connect_ms, 1))
        if vanish:
            result.vanished += 1
            assert peer.session_url is not None
            watchers.append(asyncio.ensure_future(watch(client, peer.session_url, hung_up)))
        else:
            result.closed += 1

    async def batch(client: httpx.AsyncClient, indices: list[int]) -> None:
        watchers: list[asyncio.Task[None]] = []

        async def worker() -> None:
            while indices:
                await one(client, indices.pop(0), watchers)
                result.cycles += 1
                if progress is not None:
                    progress(result)

        await asyncio.gather(*(worker() for _ in range(max(1, concurrency))))
        await asyncio.gather(*watchers)

    async with httpx.AsyncClient(timeout=10) as client:
        await sample()
        step = sample_every or cycles
        for first in range(0, cycles, step):
            await batch(client, list(range(first, min(first + step, cycles))))
            await sample()
    result.elapsed_s = round(time.monotonic() - started, 2)
    return result


def http_probe(url: str) -> Probe:
    """Server RSS (``process_resident_memory_bytes`` on ``/metrics``, from the server
    process's own collector) and its live sessions (``/healthz``)."""

    async def probe() -> dict[str, Any]:
        async with httpx.AsyncClient(timeout=10) as client:
            metrics = (await client.get(url + "/metrics")).text
            health = (await client.get(url + "/healthz")).json()
        match = re.search(r"^process_resident_memory_bytes (\S+)$", metrics, re.MULTILINE)
        return {"rss_bytes": int(float(match.group(1))) if match else None,
                "sessions": health.get("sessions"), "engine_sessions": health.get("engine_sessions")}

    return probe


def process_probe(url: str, server_loop: asyncio.AbstractEventLoop) -> Probe:
    """For a server running in this process (tests): its sessions (``/healthz``), its
    event loop's task count, and this process's memory — RSS after a full collection
    and ``malloc_trim`` (so freed memory is not counted; without the trim RSS wanders
    by megabytes with heap fragmentation), the memory blocks the interpreter holds
    (every Python allocation, strings and bytes too), the objects the collector
    tracks (not the start-up objects ``gc.freeze`` set aside, see server/app.py), and
    how many ``Session`` and ``RTCPeerConnection`` objects (server's and peers') are
    still alive."""
    async def count_tasks() -> int:
        return len(asyncio.all_tasks()) - 1  # not this one

    over_http = http_probe(url)

    async def probe() -> dict[str, Any]:
        tasks = await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(count_tasks(), server_loop))
        reading = await over_http()
        # The server may still hold the last session for a moment after /healthz
        # counts it gone (a teardown callback or executor thread finishing); a leak
        # stays past SETTLE_S, so wait that long at most before counting.
        started = time.monotonic()
        while True:
            gc.collect()
            objects = gc.get_objects()
            alive = [o for o in objects if isinstance(o, (Session, RTCPeerConnection))]
            waited = time.monotonic() - started
            if not alive or waited >= SETTLE_S:
                break
            del objects, alive
            await asyncio.sleep(POLL_S)
        sessions = sum(isinstance(o, Session) for o in alive)
        held = [_holders(o, ignore={id(objects), id(alive)}) for o in alive]
        count = len(objects)
        del alive, objects
        release_freed_memory()
        rss, blocks = resident_bytes(), sys.getallocatedblocks()
        return {**reading, "rss_bytes": rss, "tasks": tasks, "objects": count, "allocated_blocks": blocks,
                "sessions_alive": sessions, "peer_connections_alive": len(held) - sessions, "settle_s": round(waited, 1),
                **({"held_by": held} if held else {})}

    return probe


def _holders(obj: object, ignore: set[int], depth: int = 3) -> str:
    """What keeps ``obj`` alive, as a short chain of referrer types (for a failure
    message: which callback, timer or cache to look at); ``ignore``: the probe's own lists."""
    chain, current = [type(obj).__name__], obj
    for _ in range(depth):
        # Frames count (a logged traceback's frames held a session once); the probe's own do not.
        referrers = [r for r in gc.get_referrers(current)
                     if id(r) not in ignore and not (inspect.isframe(r) and r.f_code.co_filename == __file__)]
        if not referrers:
            break
        current = referrers[0]
        names = sorted({type(r).__name__ for r in referrers})
        chain.append("|".join(names))
    return " <- ".join(chain)


def _trend(samples: list[dict[str, Any]], key: str, warmup: int) -> dict[str, Any]:
    """first/last/max of ``key`` over the samples from cycle ``warmup`` on."""
    values = [s[key] for s in samples if s["cycle"] >= warmup and s.get(key) is not None]
    if not values:
        return {"first": None, "last": None, "max": None, "growth": None}
    return {"first": values[0], "last": values[-1], "max": max(values), "growth": values[-1] - values[0]}


def summarize(result: SoakResult, warmup: int = 100) -> dict[str, Any]:
    """The JSON summary: counts, trends from cycle ``warmup`` on, free latencies."""
    baseline = result.samples[0] if result.samples else {}
    return {
        "cycles": result.cycles,
        "closed": result.closed,
        "vanished": result.vanished,
        "errors": len(result.errors),
        "error_examples": result.errors[:5],
        "refused": result.refused,
        "elapsed_s": result.elapsed_s,
        "cycles_per_s": round(result.cycles / result.elapsed_s, 2) if result.elapsed_s else None,
        "connect_ms_p50": percentile(result.connect_ms, 0.5, digits=None),
        "connect_ms_p99": percentile(result.connect_ms, 0.99, digits=None),
        "warmup_cycles": warmup,
        "rss_bytes": _trend(result.samples, "rss_bytes", warmup),
        "objects": _trend(result.samples, "objects", warmup),
        "allocated_blocks": _trend(result.samples, "allocated_blocks", warmup),
        "tasks": {**_trend(result.samples, "tasks", warmup), "baseline": baseline.get("tasks"),
                  "end": result.samples[-1].get("tasks") if result.samples else None},
        "sessions_end": result.samples[-1].get("sessions") if result.samples else None,
        "vanished_freed": len(result.freed_after_s),
        "vanished_not_freed": len(result.not_freed),
        "vanished_free_s_p50": percentile(result.freed_after_s, 0.5, digits=None),
        "vanished_free_s_max": max(result.freed_after_s) if result.freed_after_s else None,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m loadtest.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=None, help="a running server (default: start an echo server)")
    parser.add_argument("--cycles", type=at_least(1), default=1000)
    parser.add_argument("--concurrency", type=at_least(1), default=8)
    parser.add_argument("--vanish-every", type=at_least(0), default=5, help="every N-th peer vanishes (0: none)")
    parser.add_argument("--sample-every", type=at_least(1), default=100, help="cycles per batch (a sample after each)")
    parser.add_argument("--warmup", type=at_least(0), default=100, help="cycles before memory is expected to be flat")
    parser.add_argument("--json", default=None, help="also write the summary, samples and errors here")
    args = parser.parse_args(argv)

    def progress(result: SoakResult) -> None:
        print(f"\r  {result.cycles}/{args.cycles} cycles, {len(result.errors)} errors, {result.refused} refused",
              end="", file=sys.stderr, flush=True)

    process, url = (None, args.url.rstrip("/")) if args.url else start_server("echo", None, [])
    try:
        result = asyncio.run(soak(url, args.cycles, args.concurrency, args.vanish_every, args.sample_every,
                                  progress=progress))
    finally:
        if process is not None:
            stop_server(process)
    print(file=sys.stderr)
    summary = summarize(result, args.warmup)
    if args.json:
        with open(args.json, "w") as out:
            json.dump({**summary, "samples": result.samples, "errors_all": result.errors}, out, indent=2)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    summary = main()
    sys.exit(1 if summary["errors"] or summary["vanished_not_freed"] else 0)  # CI reads the status
