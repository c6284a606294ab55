"""How sessions end: graceful shutdown on SIGTERM, the maximum duration, and peers
that vanish without closing — each over real WebRTC against a real server."""

from __future__ import annotations

import asyncio
import signal
import time

import av
import httpx
import numpy as np
import pytest
from aiortc import VideoStreamTrack
from conftest import free_port, microturn_process, running_server, serving, wait_for_http
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from waiting import wait_until

from loadtest.peer import Peer, SignallingError
from server.config import ServerConfig
from server.recording import find_recordings, read_recording

ECHO = {"engine": "echo", "ice_host_addresses": ["127.0.0.1"]}


def otlp_collector() -> tuple[Starlette, list[bytes]]:
    """A stand-in for the OpenTelemetry Collector (an external service we do not
    ship): it keeps every OTLP/HTTP trace export it is sent."""
    received: list[bytes] = []

    async def traces(request: Request) -> Response:
        received.append(await request.body())
        return Response(b"", media_type="application/x-protobuf")

    return Starlette(routes=[Route("/v1/traces", traces, methods=["POST"])]), received


async def test_sigterm_tells_clients_drains_tasks_and_flushes_recordings_and_traces(speech, tmp_path):
    collector, exports = otlp_collector()
    port = free_port()
    with serving(collector) as collector_url:
        process = microturn_process(
            "serve", "--port", str(port), "--engine", "echo", "--ice-host", "127.0.0.1", "--drain-timeout-s", "5",
            "--record-dir", str(tmp_path),
            env={"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"{collector_url}/v1/traces",
                 "OTEL_BSP_SCHEDULE_DELAY": "60000"})  # nothing leaves before the shutdown flush
        url = f"http://127.0.0.1:{port}"
        try:
            wait_for_http(process, f"{url}/healthz")
            peer = Peer(url, speech)
            await peer.connect(path="/v1/sessions?record=1")
            await peer.wait_for_event("session.ready")
            session_id = peer.session_url.rsplit("/", 1)[1]
            peer.send({"type": "task.create", "tool": "timer", "input": "2 s: tea", "ref": "r1"})
            created = await peer.wait_for_event("task.created", ref="r1")
            process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()

            ending = await peer.wait_for_event("session.ending", timeout=5)
            assert ending["reason"] == "server_shutdown"
            assert ending["deadline_ms"] > time.time() * 1000
            # The running task was allowed to finish and its result reached the client.
            done = await peer.wait_for_event("task.done", timeout=6, task_id=created["task_id"])
            assert "tea" in str(done["result"])
            assert process.wait(10) in (0, -signal.SIGTERM)
            exited_s = time.monotonic() - signalled
            print(f"\nSIGTERM -> exit: {exited_s:.2f} s")
            assert 1.0 < exited_s < 5 + 3, exited_s  # waited for the task, not for the full deadline
            # New sessions are no longer admitted: the listener is gone.
            async with httpx.AsyncClient() as client:
                try:
                    refused = await client.post(f"{url}/v1/sessions", content="v=0\r\n",
                                                headers={"Content-Type": "application/sdp"})
                    assert refused.status_code == 503
                except httpx.ConnectError:
                    pass
            for _ in range(50):  # the peer sees its connection end
                if peer.pc.connectionState in ("closed", "failed"):
                    break
                await asyncio.sleep(0.1)
            await peer.close(delete=False)
        finally:
            if process.poll() is None:
                process.kill()
            output = process.stdout.read() if process.stdout else ""
        # The trace of the session (ended at shutdown) was exported before exit.
        assert any(session_id.encode() in body for body in exports), output[-2000:]
        assert "Application shutdown complete" in output
        # The recording was finished before exit: every record, then its manifest.
        recording = read_recording(tmp_path / session_id)
        assert recording.complete and recording.end_reason == "server_shutdown"
        assert [r["result"] for r in recording.task_results] == [done["result"]]


async def test_a_draining_server_refuses_new_sessions_with_503(speech):
    with running_server(ServerConfig(**ECHO)) as server:
        registry = server.app.state.registry
        registry.draining = True
        peer = Peer(server.url, speech)
        with pytest.raises(SignallingError, match="draining") as refused:
            await peer.connect()
        await peer.close(delete=False)
        assert refused.value.status == 503
        async with httpx.AsyncClient() as client:
            assert (await client.get(f"{server.url}/readyz")).status_code == 503
        registry.draining = False


async def test_a_session_ends_gracefully_at_its_maximum_duration(speech):
    with running_server(ServerConfig(**ECHO, max_session_s=1.5, drain_timeout_s=1.0)) as server:
        peer = Peer(server.url, speech)
        await peer.connect()
        await peer.wait_for_event("session.ready")
        ending = await peer.wait_for_event("session.ending", timeout=4)
        assert ending["reason"] == "max_duration"
        # Ending refuses new tasks with a clear error ...
        peer.send({"type": "task.create", "tool": "calc", "input": "1 + 1", "ref": "late"})
        error = await peer.wait_for_event("error", timeout=2, ref="late")
        assert error["code"] == "session_ending"
        # ... and within the drain deadline the session is gone.
        async with httpx.AsyncClient() as client:
            for _ in range(40):
                if (await client.get(peer.session_url)).status_code == 404:
                    break
                await asyncio.sleep(0.1)
            assert (await client.get(peer.session_url)).status_code == 404
        await peer.close(delete=False)


async def test_a_peer_that_falls_silent_is_freed_after_the_peer_timeout(speech):
    with running_server(ServerConfig(**ECHO, peer_timeout_s=1.0)) as server:
        quiet, talking = Peer(server.url, speech), Peer(server.url, speech)
        for peer in (quiet, talking):
            await peer.connect()
            await peer.wait_for_event("session.ready")
        # No more audio and no messages, but the connection itself stays up.
        quiet.pc.getSenders()[0].replaceTrack(None)
        stopped = time.monotonic()
        async with httpx.AsyncClient() as client:
            while (await client.get(quiet.session_url)).status_code != 404:
                assert time.monotonic() - stopped < 4, "the silent session was not freed"
                await asyncio.sleep(0.1)
            freed_s = time.monotonic() - stopped
            assert freed_s > 0.9  # not before the timeout
            # Its neighbour, still talking, is untouched.
            assert (await client.get(talking.session_url)).status_code == 200
        for peer in (quiet, talking):
            await peer.close()


class TallCamera(VideoStreamTrack):
    """A camera 16 times as tall as it is wide (64 × 1024): recorded at 160 wide, the
    aspect alone would ask for 2,560 rows a frame."""

    async def recv(self) -> av.VideoFrame:
        pts, time_base = await self.next_timestamp()
        frame = av.VideoFrame.from_ndarray(np.full((1024, 64, 3), 90, np.uint8), format="rgb24")
        frame.pts, frame.time_base = pts, time_base
        return frame


async def test_a_recorded_camera_of_any_shape_is_kept_small(speech, tmp_path):
    with running_server(ServerConfig(**ECHO, record_dir=str(tmp_path))) as server:
        peer = Peer(server.url, speech)
        peer.pc.addTransceiver(TallCamera(), direction="sendonly")
        await peer.connect(path="/v1/sessions?record=1")
        await peer.wait_for_event("session.ready")
        await wait_until(lambda: len(peer.events_of("turn")) >= 8, 15, "eight turns, camera frames among them")
        await peer.close()
    recording = read_recording(tmp_path / peer.session_url.rsplit("/", 1)[1])
    assert recording.complete and recording.video
    assert {frame.shape for _, frame in recording.video} == {(320, 160, 3)}  # clamped, not 2,560 rows


async def test_a_consenting_session_is_recorded_time_aligned_and_complete(speech, tmp_path):
    config = ServerConfig(**ECHO, record_dir=str(tmp_path))
    with running_server(config) as server:
        async with httpx.AsyncClient() as client:
            offered = await client.options(f"{server.url}/v1/sessions")
            assert offered.headers["Microturn-Recording"] == "available"
        unrecorded = Peer(server.url, speech)
        await unrecorded.connect()
        recorded = Peer(server.url, speech)
        recorded.pc.addTransceiver(VideoStreamTrack(), direction="sendonly")  # a camera, too
        await recorded.connect(path="/v1/sessions?record=1")
        assert recorded.response_headers["Microturn-Recording"] == "on"
        assert "Microturn-Recording" not in unrecorded.response_headers
        await recorded.wait_for_event("session.ready")
        recorded.send({"type": "text.input", "text": "hello there"})
        recorded.send({"type": "task.create", "tool": "calc", "input": "6 * 7", "ref": "c"})
        await recorded.wait_for_event("task.done", ref=None, result="42")
        await asyncio.sleep(1.0)
        await recorded.close()  # DELETE: a clean end
        await unrecorded.close()
    session_id = recorded.session_url.rsplit("/", 1)[1]
    assert [p.name for p in find_recordings(tmp_path)] == [session_id]  # consent is per session
    recording = read_recording(tmp_path / session_id)
    assert recording.complete and recording.end_reason == "deleted by client"
    assert recording.manifest["meta"]["engine"] == "echo"
    assert recording.turns >= 5 and len(recording.outputs) >= recording.turns - 2
    # Time-aligned: the echo engine says input t during output t+1, so the two
    # recorded tracks match one turn apart (to int16 rounding).
    shared = [t for t in recording.inputs if t + 1 in recording.outputs and np.abs(recording.inputs[t]).max() > 0.01]
    assert shared
    for turn in shared:
        np.testing.assert_allclose(recording.outputs[turn + 1], recording.inputs[turn], atol=1e-4)
    # Both text streams, both directions of events, the task's result, the camera.
    assert "hello there" in "".join(recording.input_text.values())
    assert "42" in "".join(recording.input_text.values())  # the result entered the model
    incoming = [e.event["type"] for e in recording.events if e.direction == "in"]
    assert incoming[:2] == ["text.input", "task.create"]
    assert [r["result"] for r in recording.task_results] == ["42"]
    assert recording.video and recording.video[0][1].shape[1] == 160 and recording.video[0][1].dtype == np.uint8
