"""Multi-node: two server processes and ``microturn router`` on loopback. New
sessions go to a node with room (307), a full node is skipped, all full is 503;
with auth, the router's redirect carries its own short-lived token."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time

import httpx
import numpy as np
from conftest import free_port, microturn_process, wait_for_http

from loadtest.peer import Peer
from server.auth import mint_token

SECRET = "router-test-secret"


def stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()


async def nodes_settled(client: httpx.AsyncClient, router: str, headers: dict[str, str],
                        wanted: dict[str, int], timeout_s: float = 15) -> None:
    """Wait until the router's view of each node's free slots is ``wanted``."""
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = (await client.get(f"{router}/v1/nodes", headers=headers)).json()["nodes"]
        seen = {n["url"]: n["free"] for n in nodes if n["live"]}
        if seen == wanted:
            return
        assert time.monotonic() < deadline, f"router sees {seen}, wanted {wanted}"
        await asyncio.sleep(0.2)


async def test_the_router_sends_sessions_to_nodes_with_room_and_skips_full_ones():
    router_port, a_port, b_port = free_port(), free_port(), free_port()
    router = f"http://127.0.0.1:{router_port}"
    nodes = {f"http://127.0.0.1:{a_port}": a_port, f"http://127.0.0.1:{b_port}": b_port}
    env = {"MICROTURN_AUTH_SECRET": SECRET}
    processes = [microturn_process("router", "--port", str(router_port), "--node-timeout-s", "3", env=env)]
    for url, port in nodes.items():
        processes.append(microturn_process("serve", "--engine", "echo", "--port", str(port), "--capacity", "1",
                                           "--ice-host", "127.0.0.1", "--router", router, "--advertise", url,
                                           env=env))
    auth = {"Authorization": f"Bearer {mint_token(SECRET, 300, 'test')}"}
    peers: list[Peer] = []
    try:
        for process, url in zip(processes, [router, *nodes], strict=True):
            wait_for_http(process, f"{url}/healthz")
        tone = (0.2 * np.sin(np.arange(16_000 * 20) * 2 * np.pi * 300 / 16_000)).astype(np.float32)
        async with httpx.AsyncClient() as client:
            await nodes_settled(client, router, auth, {url: 1 for url in nodes})
            unauthorised = await client.post(f"{router}/v1/sessions", content="v=0\r\n",
                                             headers={"Content-Type": "application/sdp"})
            assert unauthorised.status_code == 401
            # A client's token may not register a server that clients would then be sent to.
            posing = await client.post(f"{router}/v1/nodes", headers=auth,
                                       json={"url": "http://127.0.0.1:9", "capacity": 9, "free": 9, "ready": True})
            assert posing.status_code == 403 and posing.json()["error"] == "not_a_node"

            first = Peer(router, tone)
            peers.append(first)
            await first.connect(headers=auth)  # follows the 307; httpx drops Authorization cross-origin
            landed_first = first.session_url.split("/v1/")[0]
            assert landed_first in nodes
            await nodes_settled(client, router, auth, {url: 0 if url == landed_first else 1 for url in nodes})

            # The redirect itself: to the node with room, with a token of the router's own.
            redirect = await client.post(f"{router}/v1/sessions", content="v=0\r\n",
                                         headers={"Content-Type": "application/sdp", **auth})
            assert redirect.status_code == 307
            other = next(url for url in nodes if url != landed_first)
            assert redirect.headers["location"].startswith(f"{other}/v1/sessions?access_token=mt1.")
            await asyncio.sleep(6)  # let that unused reservation lapse (5 s)

            second = Peer(router, tone)
            peers.append(second)
            await second.connect(headers=auth)
            assert second.session_url.startswith(other), "the full node was not skipped"
            await nodes_settled(client, router, auth, {url: 0 for url in nodes})
            full = await client.post(f"{router}/v1/sessions", content="v=0\r\n",
                                     headers={"Content-Type": "application/sdp", **auth})
            assert full.status_code == 503 and full.headers["retry-after"] and full.json()["error"] == "at_capacity"

            # Audio reached both nodes; the sessions live where the router sent them.
            for peer in peers:  # (the second may have connected only a moment ago)
                deadline = time.monotonic() + 5
                while (info := await client.get(peer.session_url, headers=auth)).json()["chunks_in"] == 0:
                    assert time.monotonic() < deadline, info.json()
                    await asyncio.sleep(0.1)
                assert info.status_code == 200

            await first.close()
            peers.remove(first)
            await nodes_settled(client, router, auth, {url: 1 if url == landed_first else 0 for url in nodes})
            again = await client.post(f"{router}/v1/sessions", content="v=0\r\n",
                                      headers={"Content-Type": "application/sdp", **auth})
            assert again.status_code == 307 and again.headers["location"].startswith(landed_first)

            # A node shutting down tells the router at once: no client is sent to it after.
            leaving = 1 if landed_first.endswith(str(a_port)) else 2
            stop(processes[leaving])
            listed = (await client.get(f"{router}/v1/nodes", headers=auth)).json()["nodes"]
            left = next(n for n in listed if n["url"] == landed_first)
            assert left["live"] and not left["ready"] and left["free"] == 0, left  # its beats not yet stale
            gone = await client.post(f"{router}/v1/sessions", content="v=0\r\n",
                                     headers={"Content-Type": "application/sdp", **auth})
            assert gone.status_code == 503
            # A node that dies without a word is dropped once its heartbeat is stale.
            processes[3 - leaving].kill()
            peers.remove(second)
            await second.close(delete=False)  # its node is gone: nothing to DELETE
            await asyncio.sleep(4)
            await nodes_settled(client, router, auth, {}, timeout_s=1)
    finally:
        for peer in peers:
            await peer.close()
        for process in processes:
            stop(process)


async def test_the_redirect_keeps_the_clients_query_and_adds_the_routers_token():
    from server.auth import Verifier
    from server.router import create_router_app

    app = create_router_app(Verifier(secret=SECRET))
    headers = {"Authorization": f"Bearer {mint_token(SECRET, 60)}"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://router") as client:
        beat = await client.post("/v1/nodes", headers={"Authorization": f"Bearer {mint_token(SECRET, 60, 'node')}"},
                                 json={"url": "http://node-a:8000", "capacity": 4, "free": 4, "ready": True})
        assert beat.status_code == 204, beat.text
        redirect = await client.post("/v1/sessions?record=1&access_token=stale", headers=headers,
                                     content="v=0\r\n", follow_redirects=False)
    assert redirect.status_code == 307
    location = httpx.URL(redirect.headers["Location"])
    assert location.host == "node-a" and location.params["record"] == "1"  # the user's consent goes along
    assert location.params["access_token"] != "stale"  # the router's own, not the client's
