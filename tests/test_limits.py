"""Every limit is configurable and each refusal is a clear error: sessions (503 +
JSON), message size and rate, text length and tasks per session (``error`` events).
The session duration limit is in test_lifecycle.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator

import httpx
import numpy as np
import pytest
from conftest import running_server
from waiting import wait_until

from loadtest.peer import Peer, SignallingError
from server.cli import OWN_OPTIONS, build_parser, main
from server.config import ServerConfig

TIGHT = ServerConfig(engine="echo", ice_host_addresses=["127.0.0.1"], max_sessions=1, max_text_chars=10,
                     max_message_bytes=300, max_tasks_per_session=1, messages_per_second=5, message_burst=8)


# The model reads typed text 4 bytes a micro-turn: a backlog of 15 fills in a message.
BACKLOG_15 = ServerConfig(engine="model", checkpoint=None, ice_host_addresses=["127.0.0.1"],
                          max_text_backlog_bytes=15)


@contextlib.asynccontextmanager
async def ready_session(config: ServerConfig, speech: np.ndarray) -> AsyncIterator[Peer]:
    """One peer, its session ready, on a real server with ``config``."""
    with running_server(config) as server:
        peer = Peer(server.url, speech)
        await peer.connect()
        await peer.wait_for_event("session.ready")
        yield peer


async def test_configured_limits_refuse_with_clear_errors_and_the_session_goes_on(speech):
    with running_server(TIGHT) as server:
        peer = Peer(server.url, speech)
        await peer.connect()
        await peer.wait_for_event("session.ready")
        second = Peer(server.url, speech)
        with pytest.raises(SignallingError, match="at_capacity") as refused:  # past max_sessions=1
            await second.connect()
        await second.close(delete=False)
        assert refused.value.status == 503

        peer.send({"type": "text.input", "text": "short"})  # within the limit
        peer.send({"type": "text.input", "text": "far too long for ten"})
        peer.send(json.dumps({"type": "ping", "id": "x" * 400}))  # over 300 bytes
        peer.send({"type": "task.create", "tool": "timer", "input": "5 s: one", "ref": "a"})
        peer.send({"type": "task.create", "tool": "timer", "input": "5 s: two", "ref": "b"})
        await peer.wait_for_event("error", ref="b")
        codes = [e["code"] for e in peer.events_of("error")]
        assert codes == ["too_long", "too_large", "too_many_tasks"], codes
        assert "limited to 10 characters" in peer.events_of("error")[0]["message"]
        assert [e["text"] for e in peer.events_of("user.text")] == ["short"]

        for i in range(30):  # the rate limit: a burst of 8, then 5 a second
            peer.send({"type": "ping", "id": i})
        await peer.wait_for_event("error", code="rate_limited")
        async with httpx.AsyncClient() as client:
            described = (await client.get(peer.session_url)).json()
        assert described["connection_state"] == "connected"
        assert described["protocol_errors"] >= 4
        await peer.close()


async def test_the_models_own_refused_request_is_reported_but_is_no_protocol_error(speech):
    """The echo engine repeats text input as model text, so these are the model asking
    for two tasks where one may run: the second is refused with an error saying the
    model asked, and the client is not charged with a protocol error for it."""
    async with ready_session(ServerConfig(engine="echo", ice_host_addresses=["127.0.0.1"], max_tasks_per_session=1),
                             speech) as peer:
        peer.send({"type": "text.input", "text": "<task>timer: 5 s: one</task><task>timer: 5 s: two</task>"})
        refused = await peer.wait_for_event("error", code="too_many_tasks")
        async with httpx.AsyncClient() as client:
            described = (await client.get(peer.session_url)).json()
        await peer.close()
    assert refused["origin"] == "model" and described["protocol_errors"] == 0
    assert [e["input"] for e in peer.events_of("task.created")] == ["5 s: one"]


async def test_typed_text_the_model_has_not_read_is_bounded_and_refused_until_it_has(speech):
    """The model reads typed text a few bytes a micro-turn (4 in tiny), so a client
    typing faster would grow a backlog without end, and every step with it. Past the
    limit a text.input is refused with a clear error, and taken again once read."""
    async with ready_session(BACKLOG_15, speech) as peer:

        def answers() -> int:
            return len(peer.events_of("user.text")) + len(peer.events_of("error"))

        peer.send({"type": "text.input", "text": "x" * 17})  # over the whole limit: never takeable
        peer.send({"type": "text.input", "text": "0123456789"})  # 10 bytes: within 15
        # 20 waiting: refused (even if one micro-turn, 4 bytes, was read in between).
        peer.send({"type": "text.input", "text": "abcdefghij"})
        refused = await peer.wait_for_event("error", code="text_backlog")
        # At 4 bytes a micro-turn the first is read within a few turns; until then, refused.
        while not any(e["text"] == "abcdefghij" for e in peer.events_of("user.text")):
            assert len(peer.events_of("error")) < 40, "the backlog was never read"
            before = answers()
            peer.send({"type": "text.input", "text": "abcdefghij"})
            await wait_until(lambda before=before: answers() > before, 5, "an answer to the text")  # one at a time
            await asyncio.sleep(0.2)
        async with httpx.AsyncClient() as client:
            described = (await client.get(peer.session_url)).json()
        await peer.close()
    too_long = peer.events_of("error")[0]
    assert too_long["code"] == "too_long" and "more than the model may have waiting (15)" in too_long["message"]
    waiting = re.match(r"(\d+) bytes of text \(typed, and background results\) are still waiting", refused["message"])
    assert waiting and 6 <= int(waiting[1]) <= 10, refused  # the first text, unread (or barely begun)
    assert [e["text"] for e in peer.events_of("user.text")] == ["0123456789", "abcdefghij"]
    assert described["connection_state"] == "connected" and described["text_inputs"] == 2, described


async def test_a_background_result_the_model_has_no_room_for_fails_its_task(speech):
    """Background results join the same bounded backlog as typed text: a tool that
    finishes faster than the model reads would otherwise grow its queue without end.
    A result that does not fit fails its task (no task.done, no text for the model)."""
    async with ready_session(BACKLOG_15, speech) as peer:
        peer.send({"type": "text.input", "text": "0123456789abcd"})  # 14 of 15; read at 4 a micro-turn
        peer.send({"type": "task.create", "tool": "calc", "input": "1+1", "ref": "a"})  # "<result>t1: 2</result>": 7
        failed = await peer.wait_for_event("task.failed")
        assert failed["task_id"] == "t1" and failed["reason"].startswith("text_backlog: its result (7 bytes)"), failed

        async def waiting() -> int:
            async with httpx.AsyncClient() as client:
                return (await client.get(peer.session_url)).json()["text_waiting"]

        for _ in range(50):  # the model reads the typed text in four micro-turns
            if await waiting() == 0:
                break
            await asyncio.sleep(0.2)
        peer.send({"type": "task.create", "tool": "calc", "input": "2+2", "ref": "b"})
        done = await peer.wait_for_event("task.done")
        described_waiting = await waiting()
        await peer.close()
    assert done["task_id"] == "t2" and done["result"] == "4"
    assert [e["task_id"] for e in peer.events_of("task.failed")] == ["t1"] and not peer.events_of("error")
    assert 0 <= described_waiting <= 7


def test_each_command_with_its_own_options_reaches_its_parser(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    listed = re.search(r"positional arguments:\n\s+\{([a-z,]+)\}", capsys.readouterr().out)
    assert exited.value.code == 0 and listed, "the top-level help lists no subcommands"
    commands = set(listed.group(1).split(","))  # the subcommands the top parser offers
    assert set(OWN_OPTIONS) <= commands and {"serve", "token", "bench"} <= commands
    for command in OWN_OPTIONS:
        with pytest.raises(SystemExit) as exited:
            main([command, "--help"])
        assert exited.value.code == 0 and capsys.readouterr().out.startswith(f"usage: microturn {command} ")


def test_every_limit_has_a_command_line_flag():
    args = build_parser().parse_args([
        "serve", "--max-sessions", "3", "--max-session-s", "60", "--peer-timeout-s", "2", "--drain-timeout-s", "4",
        "--max-message-bytes", "2048", "--messages-per-second", "7", "--message-burst", "9",
        "--max-tasks-per-session", "2", "--max-text-chars", "100", "--max-offer-bytes", "9000",
    ])
    assert (args.max_sessions, args.max_session_s, args.peer_timeout_s, args.drain_timeout_s) == (3, 60, 2, 4)
    assert (args.max_message_bytes, args.messages_per_second, args.message_burst) == (2048, 7, 9)
    assert (args.max_tasks_per_session, args.max_text_chars, args.max_offer_bytes) == (2, 100, 9000)


@pytest.mark.parametrize("tasks", ["0", "10"])
def test_more_tasks_at_once_than_result_labels_is_refused_at_start(tasks, capsys):
    """Each running task's result comes back under its own label, t1 … t9 (model.text.result_label)."""
    with pytest.raises(SystemExit):
        main(["serve", "--max-tasks-per-session", tasks])
    assert "--max-tasks-per-session must be in [1, 9]" in capsys.readouterr().err
