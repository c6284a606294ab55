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
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiortc
from OpenSSL import SSL

log = logging.getLogger(__name__)

ExceptionHandler = Callable[[asyncio.AbstractEventLoop, dict[str, Any]], object]

_AIORTC_DIR = str(Path(aiortc.__file__).parent)
_TEARDOWN_ERRORS = (ConnectionError, SSL.Error)


def is_aiortc_teardown_race(context: dict[str, Any]) -> bool:
    """An aiortc task (its coroutine is aiortc's code) that failed sending on a
    transport being closed."""
    task = context.get("future")
    if not isinstance(task, asyncio.Task) or not isinstance(context.get("exception"), _TEARDOWN_ERRORS):
        return False
    code = getattr(task.get_coro(), "cr_code", None)
    return code is not None and code.co_filename.startswith(_AIORTC_DIR)


def install(loop: asyncio.AbstractEventLoop) -> Callable[[], None]:
    """Handle ``loop``'s unawaited errors as above; returns a function that puts the
    previous handler back (the server's shutdown calls it)."""
    previous = loop.get_exception_handler()

    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if is_aiortc_teardown_race(context):
            # Strings only: a record holding the exception would hold its frames too.
            log.info("aiortc's %s failed on a closing transport (%s); harmless",
                     context["future"].get_coro().__qualname__, repr(context["exception"])[:200])
        elif previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handle)
    return lambda: loop.set_exception_handler(previous)
