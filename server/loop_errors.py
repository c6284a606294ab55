"""The event loop's handler for errors nothing awaited: aiortc's own teardown races
get one quiet line; everything else goes on to the handler that was there before.

aiortc sends SCTP retransmissions from tasks it never awaits (a T3 timer starts
``RTCSctpTransport._transmit``). When a session closes while one of them is
mid-send — typical for a peer that vanished, whose unacknowledged events are
being retransmitted — DTLS shuts down under it and the task fails with OpenSSL's
"protocol is shutdown" (or a ``ConnectionError``). asyncio then logs "Task
exception was never retrieved" at ERROR with the traceback: an alarming line for
a harmless race, and the traceback's frames keep the whole session alive for as
long as a log handler keeps the record (pytest's log capture does; the soak test
found one session in ~1,000 retained that way).

aioice binds each ICE socket and only then labels its protocol with its candidate;
a datagram that is not STUN and arrives in between (a vanished peer's DTLS or RTP,
still sent to a loopback port the kernel has just handed to a new session) fails
with ``AttributeError: ... 'local_candidate'`` in ``StunProtocol.datagram_received``.
The datagram was not for this session anyway: one quiet line too (seen twice in a
1,000-session soak run).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aioice
import aiortc
from OpenSSL import SSL

log = logging.getLogger(__name__)

ExceptionHandler = Callable[[asyncio.AbstractEventLoop, dict[str, Any]], object]

_AIORTC_DIR = str(Path(aiortc.__file__).parent)
_AIOICE_DIR = str(Path(aioice.__file__).parent)
_TEARDOWN_ERRORS = (ConnectionError, SSL.Error)


def is_aiortc_teardown_race(context: dict[str, Any]) -> bool:
    """An aiortc task (its coroutine is aiortc's code) that failed sending on a
    transport being closed."""
    task = context.get("future")
    if not isinstance(task, asyncio.Task) or not isinstance(context.get("exception"), _TEARDOWN_ERRORS):
        return False
    code = getattr(task.get_coro(), "cr_code", None)
    return code is not None and code.co_filename.startswith(_AIORTC_DIR)


def is_aioice_unlabelled_socket(context: dict[str, Any]) -> bool:
    """A non-STUN datagram that reached an ICE socket before aioice gave it its candidate."""
    error = context.get("exception")
    if not isinstance(error, AttributeError) or error.name != "local_candidate":
        return False
    frame = error.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    return frame is not None and frame.tb_frame.f_code.co_filename.startswith(_AIOICE_DIR)


def install(loop: asyncio.AbstractEventLoop) -> Callable[[], None]:
    """Handle ``loop``'s unawaited errors as above; returns a function that puts the
    previous handler back (the server's shutdown calls it)."""
    previous = loop.get_exception_handler()

    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if is_aiortc_teardown_race(context):
            # Strings only: a record holding the exception would hold its frames too.
            log.info("aiortc's %s failed on a closing transport (%s); harmless",
                     context["future"].get_coro().__qualname__, repr(context["exception"])[:200])
        elif is_aioice_unlabelled_socket(context):
            log.info("a stray datagram reached an ICE socket before aioice labelled it; dropped")
        elif previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handle)
    return lambda: loop.set_exception_handler(previous)
