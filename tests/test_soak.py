"""Soak (issue #8): a thousand sessions come and go — a fifth of their peers vanish
without closing — and the server ends where it started: no sessions, no extra
asyncio tasks, no live session objects, no error logged, flat memory; every vanished
peer's slot freed within 10 s.

The thousand sessions run in a fresh interpreter (``soak_process.py``), server and
peers together, so the probe can count the server loop's tasks and the objects left
behind, and memory is read at quiet points between batches of a process that holds
nothing else.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import checkout_env, running_server

from loadtest.impair import ImpairedLink, Impairment
from loadtest.peer import Peer
from loadtest.soak import soak, tone, wait_until_gone
from server import telemetry as tm
from server.config import ServerConfig

CYCLES = 1000
# With max_sessions 16: 8 live peers plus ~7 vanished ones awaiting their timeout; a 503
# when that fills the server is retried after 0.5 s (counted as ``refused``).
CONCURRENCY = 8
VANISH_EVERY = 5
SAMPLE_EVERY = 100
WARMUP = 100  # first-use allocations (codecs, OpenSSL, the allocator's arenas) settle by then
PEER_TIMEOUT_S = 5.0
FREED_WITHIN_S = 10.0
# Memory, measured here (four runs of 1,000 cycles, one of 3,000; a busy 2-core machine;
# inside pytest until 2026-12-05, since then in a process of its own: first run
# +7.7 MB from cycle 100, +2.9 MB over the last 500):
# - RSS (after gc and malloc_trim) rises by 2-10 MB from cycle 100 and levels off by
#   cycle ~1,000 (then +2 MB over 2,000 more cycles): by 0.4-4.5 MB over the last 500
#   of 1,000. A leak of 16 KB per session (8 MB over 500) breaks the late bound.
# - Interpreter memory blocks rise by 6.5-7.9 per cycle: ~1.2 are the soak's own
#   records (a connect time per cycle), ~5 uvloop's cache of peer address -> sockaddr
#   (an LRU of 2,048 entries, one per new peer port: flat once it is full). A leak of
#   5 blocks per session (a few hundred bytes of Python objects) breaks the bound.
# - Objects the collector tracks: flat within ~150 at every quiet point (one leaked
#   object per session would add 900).
MAX_RSS_GROWTH_BYTES = 16 * 1024 * 1024  # cycle 100 -> any later quiet point
MAX_RSS_GROWTH_LATE_BYTES = 8 * 1024 * 1024  # over the last 500 cycles
MAX_BLOCKS_PER_CYCLE = 12
MAX_OBJECT_GROWTH = 500


async def test_a_vanished_peer_sends_nothing_more_and_its_session_is_freed_after_the_timeout():
    """``Peer.vanish`` as the soak uses it: through a (clean) relay that counts what
    crosses it, not one packet leaves the peer after it vanishes — no DELETE, no
    closing handshake, no consent answer — and the server frees the slot for that."""
    config = ServerConfig(engine="echo", ice_host_addresses=["127.0.0.1"], max_sessions=4, peer_timeout_s=1.0)
    with running_server(config) as server:
        peer = Peer(server.url, tone(), jitter_prefetch=1)
        link = ImpairedLink(Impairment())
        link.attach(peer)
        await peer.connect()
        await peer.wait_for_event("turn")
        assert link.relay is not None
        vanished_at = time.monotonic()
        await peer.vanish()
        sent, received = link.relay.up.stats.packets, link.relay.down.stats.packets
        async with httpx.AsyncClient() as client:
            freed_after = await wait_until_gone(client, peer.session_url, vanished_at, 10)
            health = (await client.get(server.url + "/healthz")).json()
        assert link.relay.up.stats.packets == sent, "the vanished peer sent something"
        assert link.relay.down.stats.packets > received  # while the server still talked to it
        link.close()
    assert freed_after is not None and 1.0 <= freed_after <= 1.0 + 1.0, freed_after
    assert health["sessions"] == health["engine_sessions"] == 0
    [session] = [s for s in server.spans.get_finished_spans() if s.name == tm.SPAN_SESSION]
    assert str(session.attributes[tm.ATTR_CLOSE_REASON]).startswith("peer vanished")


@pytest.mark.timeout(600)
def test_a_thousand_sessions_leave_nothing_behind_and_vanished_peers_are_freed(tmp_path: Path):
    # In a fresh interpreter (tests/soak_process.py says why): this process's RSS
    # after the rest of the suite is mostly its allocator's noise. This checkout's
    # code, not whichever the environment has installed.
    out = tmp_path / "soak.json"
    try:
        child = subprocess.run(
            [sys.executable, str(Path(__file__).with_name("soak_process.py")), str(CYCLES), str(CONCURRENCY),
             str(VANISH_EVERY), str(SAMPLE_EVERY), str(WARMUP), str(PEER_TIMEOUT_S), str(out)],
            env=checkout_env(),
            check=False, capture_output=True, text=True, timeout=570)
    except subprocess.TimeoutExpired as timeout:  # its stacks at 540 s are in stderr
        stderr = timeout.stderr.decode(errors="replace") if isinstance(timeout.stderr, bytes) else timeout.stderr
        pytest.fail(f"the soak did not finish in 570 s:\n{(stderr or '')[-8000:]}")
    print(child.stderr[-4000:])  # shown if an assertion below fails
    assert child.returncode == 0, child.stderr[-8000:]
    soaked = json.loads(out.read_text())
    result, health, reasons = soaked["result"], soaked["health"], soaked["close_reasons"]
    print(json.dumps({**soaked["summary"], "close_reasons": reasons}, indent=1))
    for sample in result["samples"]:
        print({k: sample.get(k) for k in ("cycle", "t_s", "rss_bytes", "objects", "allocated_blocks", "tasks",
                                          "sessions_alive", "peer_connections_alive", "settle_s", "held_by")})

    vanished = result["vanished"]
    assert result["errors"] == [] and result["cycles"] == CYCLES
    assert vanished == CYCLES // VANISH_EVERY and result["closed"] == CYCLES - vanished
    # Every vanished peer's session was closed for that (not by ICE consent, 30 s on),
    # after the timeout and well within 10 s; the others by their DELETE.
    assert result["not_freed"] == [] and len(result["freed_after_s"]) == vanished
    assert max(result["freed_after_s"]) <= FREED_WITHIN_S
    assert min(result["freed_after_s"]) >= PEER_TIMEOUT_S - 0.5
    assert reasons == {"peer vanished": vanished, "deleted by client": result["closed"]}

    # Nothing logged an error. (One did, about once in 1,000 sessions, until
    # server/loop_errors.py: aiortc's retransmission racing a vanished peer's teardown,
    # "Task exception was never retrieved" — and pytest's log capture's copy of its
    # traceback kept that Session and its connection alive to the end.)
    assert soaked["logged_errors"] == []
    # At every quiet point: nothing alive but the server itself.
    samples = result["samples"]
    for sample in samples:
        assert sample["sessions"] == sample["engine_sessions"] == 0, sample
        assert sample["tasks"] == samples[0]["tasks"], sample
        assert sample["sessions_alive"] == sample["peer_connections_alive"] == 0, \
            {k: sample.get(k) for k in ("cycle", "sessions_alive", "peer_connections_alive", "settle_s", "held_by")}
    assert health["sessions"] == health["engine_sessions"] == 0 and health["status"] == "ok"

    # Flat memory after warm-up.
    steady = [s for s in samples if s["cycle"] >= WARMUP]
    late = [s for s in samples if s["cycle"] >= CYCLES // 2]
    assert len(steady) == CYCLES // SAMPLE_EVERY
    rss = [s["rss_bytes"] for s in steady]
    assert max(rss) - rss[0] < MAX_RSS_GROWTH_BYTES, rss
    assert max(s["rss_bytes"] for s in late) - late[0]["rss_bytes"] < MAX_RSS_GROWTH_LATE_BYTES, rss
    blocks = [s["allocated_blocks"] for s in steady]
    assert max(blocks) - blocks[0] < MAX_BLOCKS_PER_CYCLE * (CYCLES - WARMUP), blocks
    objects = [s["objects"] for s in steady]
    assert max(objects) - objects[0] < MAX_OBJECT_GROWTH, objects


async def test_a_soak_against_a_server_that_frees_no_slot_ends_with_an_error(speech):
    """A 503 is retried as a client would, but not for ever: a server whose slots are
    never freed is the leak a soak exists to find, so the cycle ends as an error."""
    with running_server(ServerConfig(engine="echo", ice_host_addresses=["127.0.0.1"], max_sessions=1)) as server:
        holder = Peer(server.url, speech)
        await holder.connect()  # the only slot, held throughout
        try:
            result = await soak(server.url, cycles=1, concurrency=1, vanish_every=0, sample_every=1,
                                free_deadline_s=1.0)
        finally:
            await holder.close()
    assert result.refused >= 2 and len(result.errors) == 1
    assert "refused (503) for 1 s on end: the server frees no slot" in result.errors[0]


async def test_a_peer_closes_its_connection_even_when_the_delete_fails(speech):
    with running_server(ServerConfig(engine="echo", ice_host_addresses=["127.0.0.1"])) as server:
        peer = Peer(server.url, speech)
        await peer.connect()
        url = peer.session_url
        peer.session_url = "http://127.0.0.1:9/v1/sessions/gone"  # nothing listens there
        with pytest.raises(httpx.ConnectError):
            await peer.close()
        assert peer.pc.connectionState == "closed"
        async with httpx.AsyncClient() as client:  # the server notices the connection go
            assert await wait_until_gone(client, url, time.monotonic(), 10.0) is not None
