"""WHIP (RFC 9725) and WHEP on real aiortc peers over loopback: ETag, trickle ICE,
ICE restart, OPTIONS/CORS, ICE-server Link headers, send-only publishers, WHEP
viewers of a session's voice, and bearer-token auth."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import re

import httpx
import numpy as np
import pytest
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError
from conftest import running_server
from waiting import wait_until

from loadtest.peer import Peer
from server import ice
from server.auth import mint_token
from server.config import ServerConfig
from server.whip import SDPFRAG, etag, format_sdpfrag, parse_sdpfrag

ECHO = {"engine": "echo", "ice_host_addresses": ["127.0.0.1"], "max_sessions": 4}


def server_session(server, peer: Peer):
    return server.session(peer.session_url)


def tone(seconds: float, hz: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * 16_000)) / 16_000
    return (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def strip_candidates(sdp: str) -> tuple[str, list[str]]:
    lines = sdp.split("\r\n")
    candidates = [line.removeprefix("a=") for line in lines if line.startswith("a=candidate:")]
    kept = [line for line in lines if not line.startswith(("a=candidate:", "a=end-of-candidates"))]
    return "\r\n".join(kept), candidates


async def test_created_session_has_an_etag_and_no_ice_links_unless_configured(speech):
    with running_server(ServerConfig(**ECHO)) as server:
        peer = Peer(server.url, speech)
        await peer.connect()
        try:
            headers = peer.response_headers
            assert re.fullmatch(r'"[A-Za-z0-9+/]{4,}"', headers["etag"])
            assert headers["accept-patch"] == SDPFRAG
            assert "link" not in headers
            async with httpx.AsyncClient() as client:
                options = await client.options(f"{server.url}/v1/sessions")
            assert options.status_code == 204 and options.headers["accept-post"] == "application/sdp"
            # Routes and methods that do not exist are refused in JSON too.
            async with httpx.AsyncClient() as client:
                no_route = await client.get(f"{server.url}/v1/nothing")
                no_method = await client.put(peer.session_url)
            assert no_route.status_code == 404 and no_route.json()["error"] == "not_found"
            assert no_method.status_code == 405 and no_method.json()["error"] == "method_not_allowed"
        finally:
            await peer.close()


async def test_ice_servers_are_advertised_with_per_session_turn_credentials(speech):
    config = ServerConfig(**ECHO, ice_servers=["stun:stun.example.test:3478", "turn:turn.example.test:3478"],
                          turn_secret="s3cret")
    with running_server(config) as server:
        # aiortc would contact these servers while gathering: read the headers from a
        # refused offer's sibling, OPTIONS, and check the per-session ones directly.
        async with httpx.AsyncClient() as client:
            options = await client.options(f"{server.url}/v1/sessions")
        links = options.headers.get_list("link")
        assert links[0] == '<stun:stun.example.test:3478>; rel="ice-server"'
        turn = re.fullmatch(r'<turn:turn.example.test:3478>; rel="ice-server"; username="(\d+):options"; '
                            r'credential="([^"]+)"; credential-type="password"', links[1])
        assert turn, links[1]
        username, credential = turn.groups()[0] + ":options", turn.groups()[1]
        expected = base64.b64encode(hmac.new(b"s3cret", username.encode(), hashlib.sha1).digest()).decode()
        assert credential == expected  # what coturn's use-auth-secret checks
        per_session = server.app.state.registry.ice_servers_for("abc")
        assert per_session[1].username.endswith(":abc") and per_session[0].username is None


async def test_turn_credentials_are_given_only_to_a_request_with_a_token():
    """With auth configured, TURN credentials (a relay anyone could use) go only to an
    OPTIONS that carries a good token; a CORS preflight passes without one but gets none."""
    config = ServerConfig(**ECHO, ice_servers=["turn:turn.example.test:3478"], turn_secret="s3cret",
                          auth_tokens=["letmein"])
    with running_server(config) as server:
        async with httpx.AsyncClient() as client:
            url = f"{server.url}/v1/sessions"
            anonymous = await client.options(url)
            preflight = await client.options(url, headers={"Access-Control-Request-Method": "POST",
                                                           "Origin": "https://app.example.test"})
            with_token = await client.options(url, headers={"Authorization": "Bearer letmein"})
    assert anonymous.status_code == 401 and anonymous.json()["error"] == "unauthorized"
    assert "link" not in anonymous.headers and "link" not in preflight.headers
    assert preflight.status_code == 204, preflight.text  # no CORS configured: the route answers it
    assert with_token.status_code == 204 and 'credential="' in with_token.headers["link"]


async def test_trickled_candidates_reach_the_servers_ice_agent(speech):
    with running_server(ServerConfig(**ECHO)) as server:
        pc = RTCPeerConnection(ice.rtc_configuration())
        pc.addTransceiver("audio", direction="sendrecv")
        offer = await pc.createOffer()
        await ice.add_host_candidates(pc, ["127.0.0.1"])
        await pc.setLocalDescription(offer)
        bare_offer, candidates = strip_candidates(pc.localDescription.sdp)
        assert candidates
        async with httpx.AsyncClient() as client:
            created = await client.post(f"{server.url}/v1/sessions", content=bare_offer,
                                        headers={"Content-Type": "application/sdp"})
            assert created.status_code == 201
            url = server.url + created.headers["location"]
            session = server.app.state.registry.get(url.rsplit("/", 1)[1])
            assert not [c for c in session.pc.getTransceivers()[0].receiver.transport.transport
                        .getRemoteCandidates() if c.type == "host"]
            credentials, _ = ice.local_ice(pc)
            fragment = format_sdpfrag(credentials, candidates, "0")

            wrong_etag = await client.patch(url, content=fragment,
                                            headers={"Content-Type": SDPFRAG, "If-Match": '"nope"'})
            assert wrong_etag.status_code == 412 and wrong_etag.json()["error"] == "precondition_failed"
            other_session = format_sdpfrag(ice.IceCredentials("zzzz", "z" * 22), candidates, "0")
            mismatch = await client.patch(url, content=other_session, headers={"Content-Type": SDPFRAG})
            assert mismatch.status_code == 422 and mismatch.json()["error"] == "ice_session_mismatch"
            wrong_type = await client.patch(url, content=fragment, headers={"Content-Type": "application/sdp"})
            assert wrong_type.status_code == 415
            garbage = await client.patch(url, content="hello", headers={"Content-Type": SDPFRAG})
            assert garbage.status_code == 400 and garbage.json()["error"] == "bad_fragment"
            bad_candidate = format_sdpfrag(credentials, ["candidate:1 1 udp"], "0")
            assert (await client.patch(url, content=bad_candidate,
                                       headers={"Content-Type": SDPFRAG})).status_code == 400
            missing = await client.patch(f"{server.url}/v1/sessions/nope", content=fragment,
                                         headers={"Content-Type": SDPFRAG})
            assert missing.status_code == 404

            # More candidates than one ICE session may hold: refused whole (the agent would
            # check every one of them with STUN requests).
            flood = [f"candidate:{i} 1 udp 2130706431 127.0.0.1 {20_000 + i} typ host"
                     for i in range(ice.MAX_REMOTE_CANDIDATES + 1)]
            flooded = await client.patch(url, content=format_sdpfrag(credentials, flood, "0"),
                                         headers={"Content-Type": SDPFRAG})
            assert flooded.status_code == 400 and "at most 256 in one ICE session" in flooded.json()["message"]
            assert not session.pc.getTransceivers()[0].receiver.transport.transport.getRemoteCandidates()

            trickled = await client.patch(url, content=fragment,
                                          headers={"Content-Type": SDPFRAG, "If-Match": created.headers["etag"]})
            assert trickled.status_code == 204
            remote = session.pc.getTransceivers()[0].receiver.transport.transport.getRemoteCandidates()
            sent = {(c.split()[4], int(c.split()[5])) for c in candidates}
            assert sent <= {(c.ip, c.port) for c in remote if c.type == "host"}
            await pc.setRemoteDescription(RTCSessionDescription(created.text, "answer"))
            await wait_until(lambda: session.pc.connectionState == "connected")
            assert (await client.delete(url)).status_code == 204
        await pc.close()


async def test_ice_restart_moves_the_session_to_new_credentials_without_dropping_it():
    with running_server(ServerConfig(**ECHO)) as server:
        peer = Peer(server.url, tone(30.0))
        await peer.connect()
        session = server_session(server, peer)
        try:
            await wait_until(lambda: session.stats.chunks_in >= 3)
            old_etag = peer.response_headers["etag"]
            old_server_ufrag = ice.local_ice(session.pc)[0].ufrag

            old_remote_ufrag = ice.remote_ufrag(session.pc)
            ours = ice.restart_ice(peer.pc, None)  # the client side of a restart
            _, our_candidates = ice.local_ice(peer.pc)
            async with httpx.AsyncClient() as client:
                # A restart with a malformed candidate is refused before anything restarts.
                # So is one with more candidates than an ICE session may hold.
                flood = [f"candidate:{i} 1 udp 2130706431 127.0.0.1 {20_000 + i} typ host"
                         for i in range(ice.MAX_REMOTE_CANDIDATES + 1)]
                for candidates in ([*our_candidates, "candidate:1 1 udp"], flood):
                    refused = await client.patch(peer.session_url, headers={"Content-Type": SDPFRAG, "If-Match": "*"},
                                                 content=format_sdpfrag(ours, candidates, "0"))
                    assert refused.status_code == 400 and refused.json()["error"] == "bad_fragment"
                    assert etag(session.pc) == old_etag and ice.local_ice(session.pc)[0].ufrag == old_server_ufrag
                    assert ice.remote_ufrag(session.pc) == old_remote_ufrag
                response = await client.patch(peer.session_url, content=format_sdpfrag(ours, our_candidates, "0"),
                                              headers={"Content-Type": SDPFRAG, "If-Match": '"*"'})  # as quoted
            assert response.status_code == 200 and response.headers["content-type"].startswith(SDPFRAG)
            assert response.headers["etag"] != old_etag
            answer = parse_sdpfrag(response.content)
            assert answer.ufrag != old_server_ufrag and answer.candidates and answer.end_of_candidates
            assert response.headers["etag"] == f'"{answer.ufrag}"'
            ice.set_remote_ice(peer.pc, ice.IceCredentials(answer.ufrag, answer.pwd))
            await ice.add_remote_candidates(peer.pc, answer.candidates, end=True)

            # Both agents now carry media on a pair checked with the new credentials.
            await wait_until(lambda: ice.nominated_in_current_generation(peer.pc)
                             and ice.nominated_in_current_generation(session.pc))
            assert ice.remote_ufrag(session.pc) == ours.ufrag
            before = session.stats.chunks_in
            await wait_until(lambda: session.stats.chunks_in >= before + 4, 5, "audio after the restart")
            assert session.pc.connectionState == "connected" and session.close_reason is None
            # The old ETag no longer names the ICE session.
            async with httpx.AsyncClient() as client:
                stale = await client.patch(peer.session_url, content=format_sdpfrag(ours, [], "0"),
                                           headers={"Content-Type": SDPFRAG, "If-Match": old_etag})
            assert stale.status_code == 412
        finally:
            await peer.close()


async def test_a_send_only_publisher_without_data_channel_is_a_session_and_whep_plays_its_voice():
    """A platform publishes a participant over WHIP (send-only, no data channel) and
    plays the model's voice over WHEP; the echo engine's voice is the tone sent."""
    with running_server(ServerConfig(**ECHO)) as server:
        publisher = Peer(server.url, tone(30.0, hz=440.0), direction="sendonly", data_channel=False)
        await publisher.connect()
        session = server_session(server, publisher)
        viewer_pc = RTCPeerConnection(ice.rtc_configuration())
        heard: list[np.ndarray] = []
        try:
            await wait_until(lambda: session.stats.turns_out >= 3)
            assert session.output.frames_sent > 0  # paced although nothing goes back to the publisher

            viewer_pc.addTransceiver("audio", direction="recvonly")
            reader: list[asyncio.Task] = []

            async def record(track) -> None:
                while True:
                    try:
                        frame = await track.recv()
                    except MediaStreamError:
                        return
                    heard.append(frame.to_ndarray().reshape(-1, frame.layout.nb_channels if hasattr(
                        frame.layout, "nb_channels") else len(frame.layout.channels))[:, 0].astype(np.float32))

            viewer_pc.on("track", lambda track: reader.append(asyncio.ensure_future(record(track))))
            offer = await viewer_pc.createOffer()
            await ice.add_host_candidates(viewer_pc, ["127.0.0.1"])
            await viewer_pc.setLocalDescription(offer)
            async with httpx.AsyncClient() as client:
                whep_url = f"{publisher.session_url}/whep"
                created = await client.post(whep_url, content=viewer_pc.localDescription.sdp,
                                            headers={"Content-Type": "application/sdp"})
                assert created.status_code == 201, created.text
                assert created.headers["location"].startswith(publisher.session_url.removeprefix(server.url))
                assert created.headers["etag"]
                await viewer_pc.setRemoteDescription(RTCSessionDescription(created.text, "answer"))
                await asyncio.sleep(2.0)
                samples = np.concatenate(heard) / 32768
                assert samples.size > 48_000, "the viewer heard (almost) nothing"
                loud = samples[np.abs(samples) > 0.05]
                assert loud.size > 20_000
                # The dominant frequency of what the viewer heard is the tone the publisher sent.
                tail = samples[-32_768:]
                spectrum = np.abs(np.fft.rfft(tail * np.hanning(tail.size)))
                assert abs(np.argmax(spectrum) * 48_000 / tail.size - 440) < 10
                described = (await client.get(publisher.session_url)).json()
                assert described["viewers"][0]["takes_opus"] is True

                viewer_url = server.url + created.headers["location"]
                assert (await client.delete(viewer_url)).status_code == 204
                assert (await client.delete(viewer_url)).status_code == 404
                assert not session.viewers
                missing = await client.post(f"{server.url}/v1/sessions/nope/whep", content=created.text,
                                            headers={"Content-Type": "application/sdp"})
                assert missing.status_code == 404
        finally:
            await viewer_pc.close()
            await publisher.close()
        assert not session.viewers and session.close_reason is not None


async def test_whep_refuses_offers_that_cannot_receive_and_bounds_viewers(speech):
    with running_server(ServerConfig(**ECHO, max_viewers_per_session=1)) as server:
        peer = Peer(server.url, speech)
        await peer.connect()
        pcs: list[RTCPeerConnection] = []
        try:
            async def offer(direction: str) -> str:
                pc = RTCPeerConnection(ice.rtc_configuration())
                pcs.append(pc)
                pc.addTransceiver("audio", direction=direction)
                offer = await pc.createOffer()
                # A candidate, or ICE fails at once in a loopback-only namespace and the viewer ends.
                await ice.add_host_candidates(pc, ["127.0.0.1"])
                await pc.setLocalDescription(offer)
                return pc.localDescription.sdp

            async with httpx.AsyncClient() as client:
                url = f"{peer.session_url}/whep"
                send_only = await client.post(url, content=await offer("sendonly"),
                                              headers={"Content-Type": "application/sdp"})
                assert send_only.status_code == 400 and send_only.json()["error"] == "bad_offer"
                first = await client.post(url, content=await offer("recvonly"),
                                          headers={"Content-Type": "application/sdp"})
                assert first.status_code == 201
                second = await client.post(url, content=await offer("recvonly"),
                                           headers={"Content-Type": "application/sdp"})
                assert second.status_code == 409 and second.json()["error"] == "too_many_viewers"
            assert len(server_session(server, peer).viewers) == 1
        finally:
            for pc in pcs:
                await pc.close()
            await peer.close()


async def test_a_whep_viewer_that_sends_media_is_heard_by_nobody_and_costs_nothing(speech):
    """A viewer offering to send (a=sendrecv audio, and a camera) is answered send-only
    and inactive: the server never receives what it would send (aiortc decoded it into
    queues that nobody drains), and the viewer still hears the session's voice."""
    from aiortc import AudioStreamTrack, VideoStreamTrack

    with running_server(ServerConfig(**ECHO)) as server:
        peer = Peer(server.url, speech)
        await peer.connect()
        viewer_pc = RTCPeerConnection(ice.rtc_configuration())
        heard: list[int] = []
        try:
            viewer_pc.addTrack(AudioStreamTrack())  # silence, sent as Opus RTP all the same
            viewer_pc.addTrack(VideoStreamTrack())

            async def count(track) -> None:
                while True:
                    try:
                        await track.recv()
                    except MediaStreamError:
                        return
                    heard.append(1)

            reader: list[asyncio.Task] = []
            viewer_pc.on("track", lambda track: reader.append(asyncio.ensure_future(count(track))))
            offer = await viewer_pc.createOffer()
            await ice.add_host_candidates(viewer_pc, ["127.0.0.1"])
            await viewer_pc.setLocalDescription(offer)
            async with httpx.AsyncClient() as client:
                created = await client.post(f"{peer.session_url}/whep", content=viewer_pc.localDescription.sdp,
                                            headers={"Content-Type": "application/sdp"})
            assert created.status_code == 201, created.text
            audio, video = created.text.split("\r\nm=")[1:3]
            assert audio.startswith("audio") and "a=sendonly" in audio, audio
            assert video.startswith("video") and "a=inactive" in video, video
            await viewer_pc.setRemoteDescription(RTCSessionDescription(created.text, "answer"))
            await wait_until(lambda: len(heard) >= 50, 10, "the viewer hearing the session")  # 1 s of voice
            (viewer,) = server_session(server, peer).viewers.values()
            received = [stats.packetsReceived for transceiver in viewer.pc.getTransceivers()
                        for stats in (await transceiver.receiver.getStats()).values() if stats.type == "inbound-rtp"]
            # Nothing taken in (no receiver runs, so RTP a viewer sent anyway would be dropped
            # unread); told so, this viewer does not send.
            assert received == [], received
            assert [t.currentDirection for t in viewer_pc.getTransceivers()] == ["recvonly", "inactive"]
        finally:
            await viewer_pc.close()
            await peer.close()


@pytest.mark.parametrize("mode", ["static", "signed"])
async def test_signalling_needs_a_good_bearer_token_when_auth_is_configured(speech, mode):
    config = ServerConfig(**ECHO, auth_tokens=["letmein"] if mode == "static" else [],
                          auth_secret="hmac-secret" if mode == "signed" else None,
                          cors_origins=["https://app.example.test"])
    good = "letmein" if mode == "static" else mint_token("hmac-secret", 60, "test")
    refused = ["", "Bearer wrong", "Basic bGV0bWVpbg=="]
    if mode == "signed":
        refused += [f"Bearer {mint_token('hmac-secret', -5)}", f"Bearer {mint_token('other-secret', 60)}",
                    "Bearer mt1.e30.\u00e9".encode()]  # non-ASCII: compare_digest raised (a 500)
    with running_server(config) as server:
        peer = Peer(server.url, speech)
        async with httpx.AsyncClient() as client:
            for authorization in refused:
                response = await client.post(f"{server.url}/v1/sessions", content="v=0\r\n",
                                             headers={"Content-Type": "application/sdp",
                                                      **({"Authorization": authorization} if authorization else {})})
                assert response.status_code == 401, authorization
                assert response.json()["error"] == "unauthorized"
                assert response.headers["www-authenticate"].startswith("Bearer")
            assert (await client.get(f"{server.url}/healthz")).json()["sessions"] == 0
            assert (await client.get(f"{server.url}/readyz")).status_code == 200  # probes need no token
            # CORS: the allowed origin's preflight passes without a token; another origin is not allowed.
            preflight = {"Access-Control-Request-Method": "POST",
                         "Access-Control-Request-Headers": "authorization,content-type"}
            allowed = await client.options(f"{server.url}/v1/sessions",
                                           headers={"Origin": "https://app.example.test", **preflight})
            assert allowed.status_code == 200
            assert allowed.headers["access-control-allow-origin"] == "https://app.example.test"
            # The page's own OPTIONS (ICE servers) may be preflighted too.
            options_preflight = await client.options(f"{server.url}/v1/sessions", headers={
                "Origin": "https://app.example.test", **preflight, "Access-Control-Request-Method": "OPTIONS"})
            assert options_preflight.status_code == 200, options_preflight.text
            other = await client.options(f"{server.url}/v1/sessions",
                                         headers={"Origin": "https://evil.example.test", **preflight})
            assert "access-control-allow-origin" not in other.headers
            refused_cors = await client.post(f"{server.url}/v1/sessions", content="v=0\r\n",
                                             headers={"Content-Type": "application/sdp",
                                                      "Origin": "https://app.example.test"})
            assert refused_cors.status_code == 401
            assert "etag" in refused_cors.headers["access-control-expose-headers"].lower()

        await peer.connect(headers={"Authorization": f"Bearer {good}"})
        try:
            async with httpx.AsyncClient() as client:
                assert (await client.get(peer.session_url)).status_code == 401
                assert (await client.get(peer.session_url, params={"access_token": good})).status_code == 200
        finally:
            await peer.close()
        assert not server.app.state.registry.get(peer.session_url.rsplit("/", 1)[1])
