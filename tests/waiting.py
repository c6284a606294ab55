"""Waiting for a condition in an async test: poll until it holds or a deadline passes.

A fixed sleep followed by a count asserts on timing by accident: a stalled CI machine
delivers the same frames later, not fewer of them. Tests wait for what they mean."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


async def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "the condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        await asyncio.sleep(0.05)
