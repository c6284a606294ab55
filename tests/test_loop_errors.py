"""The server loop's handler for unawaited errors (server/loop_errors.py): aiortc's
send racing a transport's teardown is one quiet line that keeps nothing alive;
any other unawaited error is still logged in full."""

from __future__ import annotations

import asyncio
import gc
import logging
import weakref

import pytest
from aioice.ice import Connection, StunProtocol
from aiortc import RTCCertificate, RTCDtlsTransport, RTCIceGatherer, RTCIceTransport

from server import loop_errors


class Marker:
    """Something a failed task's frames hold: is it freed?"""


async def _fail_unawaited(coroutine: object) -> None:
    task = asyncio.ensure_future(coroutine)  # type: ignore[arg-type]
    await asyncio.sleep(0)  # it runs and fails
    assert task.done()
    del task
    gc.collect()  # the task goes: asyncio reports its exception to the loop's handler


async def _our_send(marker: Marker) -> None:
    raise ConnectionError(f"not aiortc's ({type(marker).__name__})")


async def test_an_aiortc_send_on_a_closed_transport_is_one_quiet_line_and_holds_nothing(caplog: pytest.LogCaptureFixture):
    loop = asyncio.get_running_loop()
    restore = loop_errors.install(loop)
    try:
        caplog.set_level(logging.INFO)
        # A real aiortc coroutine failing the way the race does: DTLS no longer sends.
        dtls = RTCDtlsTransport(RTCIceTransport(RTCIceGatherer()), [RTCCertificate.generateCertificate()])
        await _fail_unawaited(dtls._send_data(b"retransmission"))
        transport = weakref.ref(dtls)
        del dtls
        gc.collect()
        quiet = [r for r in caplog.records if r.name == loop_errors.__name__]
        assert len(quiet) == 1 and quiet[0].levelno == logging.INFO and quiet[0].exc_info is None, caplog.records
        assert "RTCDtlsTransport._send_data" in quiet[0].getMessage() and "ConnectionError" in quiet[0].getMessage()
        assert transport() is None, "the log record kept the transport alive"

        # Anyone else's unawaited error still goes to asyncio's handler, traceback and all.
        caplog.clear()
        await _fail_unawaited(_our_send(Marker()))
        [loud] = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert "never retrieved" in loud.getMessage() and loud.exc_info is not None
        assert not [r for r in caplog.records if r.name == loop_errors.__name__]
    finally:
        restore()
    assert loop.get_exception_handler() is None


async def test_a_stray_datagram_on_an_unlabelled_ice_socket_is_one_quiet_line(caplog: pytest.LogCaptureFixture):
    """aioice's window between binding an ICE socket and labelling it with its
    candidate, hit for real: a datagram that is not STUN (here, DTLS-looking bytes)
    sent to a freshly bound aioice protocol. The soak test saw it twice in 1,000
    sessions (a vanished peer's packets on a reused loopback port)."""
    loop = asyncio.get_running_loop()
    restore = loop_errors.install(loop)
    caplog.set_level(logging.INFO)
    ice, sender = None, None
    try:
        ice, _ = await loop.create_datagram_endpoint(lambda: StunProtocol(Connection(ice_controlling=True)),
                                                     local_addr=("127.0.0.1", 0))
        sender, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, remote_addr=ice.get_extra_info("sockname"))
        sender.sendto(b"\x16\xfe\xfd" + bytes(40))
        for _ in range(100):
            if caplog.records:
                break
            await asyncio.sleep(0.01)
        assert [(r.name, r.levelno) for r in caplog.records] == [(loop_errors.__name__, logging.INFO)], caplog.records
        assert "stray datagram" in caplog.records[0].getMessage()
    finally:
        for transport in (ice, sender):
            if transport is not None:
                transport.close()
        restore()
