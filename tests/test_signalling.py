"""WHIP-shaped signalling: status codes, JSON errors, and nothing left behind."""

from __future__ import annotations

import asyncio
import signal

import httpx
import pytest
from conftest import free_port, microturn_process, running_server, wait_for_http

from loadtest.peer import Peer
from server.config import ServerConfig

DATA_CHANNEL_ONLY_OFFER = """v=0
o=- 1 1 IN IP4 127.0.0.1
s=-
t=0 0
a=group:BUNDLE 0
m=application 9 UDP/DTLS/SCTP webrtc-datachannel
c=IN IP4 0.0.0.0
a=mid:0
a=ice-ufrag:abcd
a=ice-pwd:abcdefghijklmnopqrstuvwx
a=fingerprint:sha-256 00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF:00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF
a=setup:actpass
a=sctp-port:5000
""".replace("\n", "\r\n")

AUDIO_OFFER_WITHOUT_ICE = """v=0
o=- 1 1 IN IP4 127.0.0.1
s=-
t=0 0
m=audio 9 UDP/TLS/RTP/SAVPF 111
c=IN IP4 0.0.0.0
a=mid:0
a=sendrecv
a=rtpmap:111 opus/48000/2
""".replace("\n", "\r\n")


async def health(client: httpx.AsyncClient, url: str) -> dict:
    response = await client.get(f"{url}/healthz")
    assert response.status_code == 200
    return response.json()


@pytest.mark.parametrize(
    ("content_type", "body", "status", "code"),
    [
        ("text/plain", "v=0\r\n", 415, "unsupported_media_type"),
        ("application/json", '{"sdp": "v=0"}', 415, "unsupported_media_type"),
        ("application/sdp", "hello", 400, "bad_offer"),
        ("application/sdp", b"v=0\r\n\xff\xfe", 400, "bad_offer"),
        ("application/sdp", DATA_CHANNEL_ONLY_OFFER, 400, "bad_offer"),
        ("application/sdp", AUDIO_OFFER_WITHOUT_ICE, 400, "bad_offer"),
        ("application/sdp", "v=0\r\n" + "a=x\r\n" * 20_000, 413, "offer_too_large"),
    ],
)
async def test_bad_offers_get_a_json_error_and_leave_nothing(live_server, content_type, body, status, code):
    async with httpx.AsyncClient() as client:
        response = await client.post(
            f"{live_server.url}/v1/sessions", content=body, headers={"Content-Type": content_type}
        )
        assert response.status_code == status
        assert response.headers["content-type"].startswith("application/json")
        assert response.json()["error"] == code and response.json()["message"]
        state = await health(client, live_server.url)
    assert state["sessions"] == 0 and state["engine_sessions"] == 0


async def test_unknown_sessions_are_404(live_server):
    async with httpx.AsyncClient() as client:
        for method in ("GET", "DELETE"):
            response = await client.request(method, f"{live_server.url}/v1/sessions/nope")
            assert response.status_code == 404
            assert response.json()["error"] == "not_found"


async def test_created_session_has_location_and_delete_frees_everything(live_server, speech):
    peer = Peer(live_server.url, speech)
    await peer.connect()
    assert peer.session_url is not None and "/v1/sessions/" in peer.session_url
    await peer.wait_for_event("session.ready")
    async with httpx.AsyncClient() as client:
        assert (await health(client, live_server.url))["engine_sessions"] == 1
        response = await client.delete(peer.session_url)
        assert response.status_code == 204
        assert (await client.get(peer.session_url)).status_code == 404
        assert (await client.delete(peer.session_url)).status_code == 404
        await asyncio.sleep(0.2)
        state = await health(client, live_server.url)
    assert state["sessions"] == 0 and state["engine_sessions"] == 0
    # The server closed its side: the peer connection goes down too.
    for _ in range(100):
        if peer.pc.connectionState in ("closed", "failed"):
            break
        await asyncio.sleep(0.1)
    assert peer.pc.connectionState in ("closed", "failed")
    await peer.close(delete=False)


async def test_a_full_server_answers_503_with_retry_after(speech):
    config = ServerConfig(engine="echo", ice_host_addresses=["127.0.0.1"], capacity=1)
    with running_server(config) as live_server:
        await _full_server_refuses_a_second_session(live_server, speech)


async def _full_server_refuses_a_second_session(live_server, speech):
    peer = Peer(live_server.url, speech)
    await peer.connect()
    try:
        second = Peer(live_server.url, speech)
        with pytest.raises(RuntimeError, match="503"):
            await second.connect()
        await second.close(delete=False)
        async with httpx.AsyncClient() as client:
            response = await client.post(
                f"{live_server.url}/v1/sessions", content=peer.pc.localDescription.sdp,
                headers={"Content-Type": "application/sdp"},
            )
            assert response.status_code == 503 and int(response.headers["Retry-After"]) > 0
            assert (await health(client, live_server.url))["sessions"] == 1
    finally:
        await peer.close()


async def test_the_page_and_its_module_are_served(live_server):
    async with httpx.AsyncClient() as client:
        page = await client.get(f"{live_server.url}/")
        assert page.status_code == 200 and '<script type="module" src="/static/app.js">' in page.text
        script = await client.get(f"{live_server.url}/static/app.js")
        assert script.status_code == 200 and "javascript" in script.headers["content-type"]


def test_the_microturn_console_script_serves_and_stops_on_sigterm():
    port = free_port()
    process = microturn_process("serve", "--port", str(port), "--engine", "echo")
    try:
        response = wait_for_http(process, f"http://127.0.0.1:{port}/healthz")
        assert response.json()["engine"] == "echo"
    finally:
        process.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal it caught.
        assert process.wait(10) in (0, -signal.SIGTERM)
    assert process.stdout is not None
    assert "Application shutdown complete" in process.stdout.read()


async def test_a_session_whose_peer_never_connects_is_freed(speech):
    config = ServerConfig(engine="echo", ice_host_addresses=["127.0.0.1"], connect_timeout_s=1.0)
    with running_server(config) as server:
        peer = Peer(server.url, speech)
        peer.pc.addTransceiver(peer.track, direction="sendrecv")
        await peer.pc.setLocalDescription(await peer.pc.createOffer())
        # No candidates and no end-of-candidates: ICE would wait for more forever.
        offer = "".join(
            line + "\r\n" for line in peer.pc.localDescription.sdp.splitlines()
            if not line.startswith(("a=candidate", "a=end-of-candidates"))
        )
        async with httpx.AsyncClient() as client:
            created = await client.post(f"{server.url}/v1/sessions", content=offer,
                                        headers={"Content-Type": "application/sdp"})
            assert created.status_code == 201
            session_url = server.url + created.headers["Location"]
            assert (await client.get(session_url)).status_code == 200
            await asyncio.sleep(1.6)
            assert (await client.get(session_url)).status_code == 404
            assert (await health(client, server.url))["sessions"] == 0
        await peer.pc.close()
