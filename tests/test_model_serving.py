"""The interaction model behind the real server: a WebRTC peer hears it speak."""

from __future__ import annotations

import asyncio
import statistics

import httpx
import numpy as np

from loadtest.peer import Peer
from model.interface import SAMPLE_RATE


async def test_a_peer_talks_to_the_model_engine(model_server, speech):
    peer = Peer(model_server.url, speech[: 3 * SAMPLE_RATE])
    await peer.connect()
    try:
        ready = await peer.wait_for_event("session.ready")
        assert ready["engine"] == "model" and ready["weights"] == "random" and ready["decoding"] == "greedy"
        await asyncio.sleep(3.0)
        async with httpx.AsyncClient() as client:
            info = (await client.get(peer.session_url)).json()
            health = (await client.get(f"{model_server.url}/healthz")).json()
    finally:
        await peer.close()

    turns = peer.events_of("turn")
    assert len(turns) >= 10, "the model steps every micro-turn"
    indices = [event["turn"] for event in turns]
    assert indices == list(range(indices[0], indices[0] + len(indices)))
    # It keeps up: the median step inside the 200 ms budget. Alone ~40-70 ms on the
    # 2-core VM; inside the full suite (one torch thread, the peer's codecs sharing the
    # process) medians of 122 ms with single steps of 165 were seen, so no tighter bound
    # here: speed is measured by `microturn bench` and the loadtest, not by this test.
    steps_ms = [event["step_ms"] for event in turns[2:]]
    assert statistics.median(steps_ms) < 200, steps_ms
    assert info["step_errors"] == 0 and info["turns_out"] >= 10
    # Random weights still make sound: the vocoder's output reaches the peer.
    heard = peer.recording.audio()
    assert heard.size > SAMPLE_RATE and float(np.sqrt(np.mean(heard**2))) > 1e-3
    assert health["engine"] == "model" and health["weights"] == "random" and health["decoding"] == "greedy"
