"""One load-generator process: a share of the peers, each on its own aiortc
connection, all on this process's event loop. Results go back as plain dicts."""

from __future__ import annotations

import asyncio
import resource
import time
from multiprocessing.queues import Queue
from typing import Any

import httpx

from loadtest.measure import PeerResult, measure
from loadtest.peer import Peer
from model.conversations import Conversation

CONNECT_SPACING_S = 0.05  # peers of one worker connect this far apart (no thundering herd)


async def run_peer(index: int, url: str, script: Conversation, seconds: float, delay_s: float,
                   jitter_prefetch: int, progress: Queue | None) -> dict[str, Any]:
    await asyncio.sleep(delay_s)
    audio = script.user_audio[: int(seconds * 16_000)]
    peer = Peer(url, audio, jitter_prefetch=jitter_prefetch)
    info, error = None, None
    try:
        await peer.connect()
        if progress is not None:
            progress.put(("connected", index))
        await asyncio.sleep(audio.size / 16_000 + 1.0)  # the script, then the last replies
        async with httpx.AsyncClient(timeout=10) as client:
            response = await client.get(peer.session_url)
            info = response.json() if response.status_code == 200 else None
    except Exception as exc:  # noqa: BLE001 — a refused or failed peer is a result, not a crash
        error = f"{type(exc).__name__}: {exc}"
    try:
        await peer.close(delete=peer.session_url is not None)
    except Exception as exc:  # noqa: BLE001 — the hang-up failed; what was measured still stands
        error = error or f"hang-up failed: {type(exc).__name__}: {exc}"
    try:
        result = measure(index, peer, script, info)
    except Exception as exc:  # noqa: BLE001 — as above: one peer's failure stays its own
        result, error = PeerResult(index), error or f"measuring failed: {type(exc).__name__}: {exc}"
    result.error = error
    return result.to_dict()


async def run_peers(indices: list[int], url: str, scripts: list[Conversation], seconds: float,
                    jitter_prefetch: int, progress: Queue | None) -> list[dict[str, Any]]:
    return await asyncio.gather(*(
        run_peer(index, url, scripts[index % len(scripts)], seconds, n * CONNECT_SPACING_S, jitter_prefetch, progress)
        for n, index in enumerate(indices)))


def work(indices: list[int], url: str, scripts: list[Conversation], seconds: float, jitter_prefetch: int,
         progress: Queue, results: Queue) -> None:
    """Process entry point: run the peers, then report results and this process's CPU time."""
    import uvloop

    started = time.monotonic()
    before = resource.getrusage(resource.RUSAGE_SELF)
    peers = uvloop.run(run_peers(indices, url, scripts, seconds, jitter_prefetch, progress))
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    results.put({"peers": peers, "cpu_s": cpu_s, "wall_s": time.monotonic() - started})
