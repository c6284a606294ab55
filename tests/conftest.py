"""Shared fixtures: test speech, and a real server (uvicorn + uvloop) on loopback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import wave
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette.applications import Starlette

from server.app import create_app
from server.config import ServerConfig
from server.telemetry import build_tracer_provider
from server.tools import Tool

DATA = Path(__file__).parent / "data"
REPOSITORY = Path(__file__).resolve().parents[1]


def checkout_env() -> dict[str, str]:
    """This process's environment with this checkout first on the path, so that a child
    Python runs this tree's code, not whichever the environment has installed."""
    return {**os.environ, "PYTHONPATH": str(REPOSITORY)}


@pytest.fixture(scope="session")
def speech() -> np.ndarray:
    """About 7 s of espeak-ng speech, 16 kHz mono float32 (see data/README.md)."""
    with wave.open(str(DATA / "speech.wav")) as wav:
        assert wav.getframerate() == 16_000 and wav.getnchannels() == 1
        pcm = np.frombuffer(wav.readframes(wav.getnframes()), dtype=np.int16)
    return pcm.astype(np.float32) / 32768


@dataclass
class LiveServer:
    url: str
    config: ServerConfig
    spans: InMemorySpanExporter
    app: Starlette  # for tests that reach inside (e.g. to load the engine directly)

    def session(self, session_url: str) -> Any:
        """The server's own Session behind a session URL (None once it has ended)."""
        return self.app.state.registry.get(session_url.rsplit("/", 1)[1])


@contextmanager
def running_server(config: ServerConfig, extra_tools: dict[str, Tool] | None = None) -> Iterator[LiveServer]:
    """The real app under uvicorn/uvloop in its own thread, on a free loopback port."""
    spans = InMemorySpanExporter()
    app = create_app(config, build_tracer_provider([SimpleSpanProcessor(spans)]), extra_tools)
    with serving(app) as url:
        yield LiveServer(url, config, spans, app)


@contextmanager
def serving(app: object) -> Iterator[str]:
    """Any ASGI app under uvicorn/uvloop in a thread; yields its base URL."""
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, loop="uvloop", log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("server did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
    assert not thread.is_alive(), "server did not shut down"


@pytest.fixture
def live_server() -> Iterator[LiveServer]:
    """A server with the echo engine (transport tests)."""
    with running_server(ServerConfig(engine="echo", ice_host_addresses=["127.0.0.1"], max_sessions=4)) as server:
        yield server


@pytest.fixture
def model_server() -> Iterator[LiveServer]:
    """A server with the interaction model, random weights."""
    config = ServerConfig(engine="model", checkpoint=None, ice_host_addresses=["127.0.0.1"], max_sessions=4)
    with running_server(config) as server:
        yield server


@pytest.fixture
def trained_server() -> Iterator[LiveServer]:
    """The interaction model with the shipped checkpoint, as ``make serve`` runs it."""
    config = ServerConfig(engine="model", ice_host_addresses=["127.0.0.1"], max_sessions=4)
    assert config.checkpoint is not None, "checkpoints/tiny is missing"
    with running_server(config) as server:
        yield server


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def microturn_process(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """The installed ``microturn`` console script in its own process."""
    command = [os.path.join(os.path.dirname(sys.executable), "microturn"), *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})})


def wait_for_http(process: subprocess.Popen[str], url: str, timeout_s: float = 30) -> httpx.Response:
    """Poll ``url`` until it answers; fail with the process's output if it died."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return httpx.get(url, timeout=1)
        except httpx.TransportError:
            assert process.poll() is None, process.stdout.read() if process.stdout else ""
            assert time.monotonic() < deadline, f"{url} did not come up"
            time.sleep(0.2)
