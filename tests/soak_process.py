"""The thousand-session soak of ``test_soak.py``, run in a fresh interpreter.

    python tests/soak_process.py CYCLES CONCURRENCY VANISH_EVERY SAMPLE_EVERY WARMUP PEER_TIMEOUT_S OUT.json

Why a process of its own: the soak's memory bounds read this process's RSS, and
inside the full suite that is a 1.8 GB pytest process whose allocator still holds
what every earlier test left — its noise broke an RSS bound twice in ~6 full runs
(+16.8 MB against 16, one 8.5 MB step at the last sample; +8.01 against 8 late)
while the soak alone always passed. A fresh interpreter measures the server and its
peers, nothing else.

The server runs here in a uvicorn thread (as everywhere in the suite) so the probe
can count its event loop's tasks and the objects left behind. Writes one JSON object
to OUT.json (the soak's result, its summary, why sessions closed, what was logged at
ERROR, the final health) for the test to judge; this script asserts nothing. Past
``STACKS_AFTER_S`` it prints every thread's stack to stderr, so a hang says where.
"""

from __future__ import annotations

import asyncio
import dataclasses
import faulthandler
import json
import logging
import sys
from collections import Counter
from typing import Any

import httpx
from conftest import serving
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor

from loadtest.soak import process_probe, soak, summarize
from server import telemetry as tm
from server.app import create_app
from server.config import ServerConfig

STACKS_AFTER_S = 540  # inside the test's 570 s limit on this process


class CloseReasons(SpanProcessor):
    """Counts why sessions closed (the ``session`` span's close reason, up to any
    parenthesis), keeping nothing else: an exporter holding every span would itself
    grow with the soak."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def on_end(self, span: ReadableSpan) -> None:
        if span.name == tm.SPAN_SESSION and span.attributes is not None:
            self.counts[str(span.attributes.get(tm.ATTR_CLOSE_REASON, "")).split(" (")[0]] += 1


class ErrorLines(logging.Handler):
    """Keeps one line of text per record at ERROR or above — never the record, whose
    traceback would keep a session's frames (and so the session) alive."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.name}: {record.getMessage()[:200]}")


class LoopRecorder:
    """The app as it is, noting the event loop it is served on (to count its tasks)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.loop: asyncio.AbstractEventLoop | None = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.loop = asyncio.get_running_loop()
        await self.app(scope, receive, send)


async def run(cycles: int, concurrency: int, vanish_every: int, sample_every: int, warmup: int,
              peer_timeout_s: float) -> dict[str, Any]:
    config = ServerConfig(engine="echo", ice_host_addresses=["127.0.0.1"], max_sessions=16,
                          peer_timeout_s=peer_timeout_s)
    reasons, errors = CloseReasons(), ErrorLines()
    logging.getLogger().addHandler(errors)
    app = LoopRecorder(create_app(config, tm.build_tracer_provider([reasons])))
    with serving(app) as url:
        assert app.loop is not None  # the lifespan ran on it
        result = await soak(url, cycles, concurrency, vanish_every, sample_every, process_probe(url, app.loop))
        async with httpx.AsyncClient() as client:
            health = (await client.get(url + "/healthz")).json()
    return {"result": dataclasses.asdict(result), "summary": summarize(result, warmup),
            "close_reasons": dict(reasons.counts), "logged_errors": errors.lines, "health": health}


if __name__ == "__main__":
    faulthandler.dump_traceback_later(STACKS_AFTER_S)
    cycles, concurrency, vanish_every, sample_every, warmup = (int(a) for a in sys.argv[1:6])
    soaked = asyncio.run(run(cycles, concurrency, vanish_every, sample_every, warmup, float(sys.argv[6])))
    with open(sys.argv[7], "w") as out:
        json.dump(soaked, out)
