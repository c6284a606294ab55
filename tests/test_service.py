"""The service over real WebRTC: text input, background tasks, protocol limits,
capacity, tracing, metrics, and an event loop that never waits for the model."""

from __future__ import annotations

import asyncio
import re
import threading

import httpx
import numpy as np
import pytest
from conftest import running_server, serving
from fake_llm import ANSWER_WORDS, fake_llm_app
from opentelemetry import trace
from waiting import wait_until

from loadtest.peer import Peer
from model.interface import TURN_SAMPLES, TurnInput
from server.config import ServerConfig
from server.tasks import TaskManager
from server.tools import Tool, ToolError

ECHO = dict(engine="echo", ice_host_addresses=["127.0.0.1"])


async def crash(text: str, progress) -> str:
    progress(0.5, "about to fail")
    raise RuntimeError("the tool fell over")


async def hang(text: str, progress) -> str:
    await asyncio.sleep(3600)
    return "never"


async def refuse(text: str, progress) -> str:
    raise ToolError("cannot do that")


FAULTY_TOOLS = {
    "crash": Tool("crash", "raises", crash),
    "hang": Tool("hang", "never returns", hang, timeout_s=0.5),
    "refuse": Tool("refuse", "bad input", refuse),
}


@pytest.fixture
def service(speech):
    with running_server(ServerConfig(**ECHO, max_sessions=4), FAULTY_TOOLS) as server:
        yield server


async def connected(server, speech) -> Peer:
    peer = Peer(server.url, speech)
    await peer.connect()
    await peer.wait_for_event("session.ready")
    return peer


def task_events(peer: Peer, task_id: str) -> list[str]:
    return [e["type"] for _, e in peer.events if e.get("task_id") == task_id]


async def test_text_input_enters_the_model_at_the_next_micro_turn(service, speech):
    peer = await connected(service, speech)
    try:
        turn_before = peer.events_of("turn")[-1]["turn"] if peer.events_of("turn") else -1
        peer.send({"type": "text.input", "text": "hello model"})
        echo = await peer.wait_for_event("user.text")
        assert echo["text"] == "hello model" and echo["v"] == 1 and len(echo["trace_id"]) == 32
        # The echo engine speaks its text input back: the text reached the model.
        heard = await peer.wait_for_event("transcript.delta", text="hello model")
        assert turn_before < heard["turn"] <= turn_before + 3
    finally:
        await peer.close()


async def test_a_client_task_reports_created_progress_done_and_its_result_reaches_the_model(service, speech):
    peer = await connected(service, speech)
    try:
        peer.send({"type": "task.create", "tool": "timer", "input": "2 s: stretch", "ref": "r1"})
        created = await peer.wait_for_event("task.created", ref="r1")
        task_id = created["task_id"]
        assert created["origin"] == "client" and created["tool"] == "timer"
        done = await peer.wait_for_event("task.done", timeout=6, task_id=task_id)
        assert done["result"] == "reminder: stretch"
        kinds = task_events(peer, task_id)
        assert kinds[0] == "task.created" and kinds[-1] == "task.done"
        assert set(kinds[1:-1]) == {"task.progress"} and len(kinds) >= 3
        fractions = [e["fraction"] for e in peer.events_of("task.progress") if e["task_id"] == task_id]
        assert fractions == sorted(fractions) and fractions[-1] == 1.0
        await peer.wait_for_event("transcript.delta", text=f"<result>{task_id}: reminder: stretch</result>")
    finally:
        await peer.close()


async def test_a_sessions_tenth_result_reaches_the_model_labelled_as_its_first(service, speech):
    """The model copies a result's digits from a fixed distance after its label, so
    the label it reads stays one digit (model.text.result_label); the client's task
    ids go on counting."""
    peer = await connected(service, speech)
    try:
        for n in range(1, 11):
            peer.send({"type": "task.create", "tool": "calc", "input": f"{n} * 100", "ref": f"r{n}"})
            done = await peer.wait_for_event("task.done", task_id=f"t{n}")
            assert done["result"] == f"{n * 100}"
        def read_back() -> str:  # the echo engine writes its text input: what the model read
            return "".join(event["text"] for event in peer.events_of("transcript.delta"))

        await wait_until(lambda: "1000" in read_back(), 5, "the tenth result to reach the model")
        assert "<result>t9: 900</result><result>t1: 1000</result>" in read_back() and "t10" not in read_back()
    finally:
        await peer.close()


async def test_a_label_a_running_task_holds_is_skipped():
    """t1, a long task, still runs when the tenth comes: that one is labelled t2, so
    no two running tasks' results come back under one label."""
    release, results, events = asyncio.Event(), [], []

    async def held(text: str, progress) -> str:
        await release.wait()
        return "late"

    async def quick(text: str, progress) -> str:
        return text

    tools = {"held": Tool("held", "waits", held), "quick": Tool("quick", "echoes", quick)}
    manager = TaskManager(tools, lambda kind, **fields: events.append((kind, fields)), results.append,
                          trace.NoOpTracer(), trace.INVALID_SPAN)
    assert manager.create("held", "", origin="client") == "t1"
    for n in range(2, 11):
        assert manager.create("quick", str(n), origin="client") == f"t{n}"
        await wait_until(lambda n=n: len(results) == n - 1, 2, f"task t{n}'s result")
    release.set()
    await wait_until(lambda: manager.running == 0, 2, "t1 to finish")
    labels = [re.match(r"<result>(t\d): (\w+)</result>", text).groups() for text in results]
    assert labels == [*((f"t{n}", str(n)) for n in range(2, 10)), ("t2", "10"), ("t1", "late")]
    await manager.close()
    with pytest.raises(ValueError, match="one result label each"):
        TaskManager(tools, lambda kind, **fields: None, results.append, trace.NoOpTracer(), trace.INVALID_SPAN,
                    max_concurrent=10)


async def test_the_model_can_ask_for_a_task_in_its_text_stream(service, speech):
    peer = await connected(service, speech)
    try:
        # The echo engine repeats its text input as model text, so this is the model asking.
        peer.send({"type": "text.input", "text": "let me check <task>calc: 1234 * 5678</task>"})
        created = await peer.wait_for_event("task.created", origin="model")
        assert created["tool"] == "calc" and created["input"] == "1234 * 5678"
        done = await peer.wait_for_event("task.done", task_id=created["task_id"])
        assert done["result"] == "7006652"
        await peer.wait_for_event("transcript.delta", text=f"<result>{created['task_id']}: 7006652</result>")
        # A name before the colon that is no tool's: the whole request goes to the default
        # tool (here calc, with no chat configured), not refused as an unknown tool.
        peer.send({"type": "text.input", "text": "<task>weather: 2 + 3</task>"})
        second = await peer.wait_for_event("task.created", origin="model", task_id="t2")
        assert second["tool"] == "calc" and second["input"] == "weather: 2 + 3"
        await peer.wait_for_event("task.failed", task_id="t2")  # calc cannot read it: its task fails
        async with httpx.AsyncClient() as client:
            described = (await client.get(peer.session_url)).json()
        assert not peer.events_of("error") and described["protocol_errors"] == 0
    finally:
        await peer.close()


async def test_two_sessions_tasks_never_cross(service, speech):
    a, b = await connected(service, speech), await connected(service, speech)
    try:
        a.send({"type": "task.create", "tool": "calc", "input": "2 + 2", "ref": "a"})
        b.send({"type": "task.create", "tool": "calc", "input": "3 * 3", "ref": "b"})
        done_a = await a.wait_for_event("task.done")
        done_b = await b.wait_for_event("task.done")
        assert done_a["result"] == "4" and done_b["result"] == "9"
        await asyncio.sleep(0.5)
        assert [e["ref"] for e in a.events_of("task.created")] == ["a"]
        assert [e["ref"] for e in b.events_of("task.created")] == ["b"]
        assert len(a.events_of("task.done")) == len(b.events_of("task.done")) == 1
        assert a.events_of("task.done")[0]["trace_id"] != b.events_of("task.done")[0]["trace_id"]
        await a.wait_for_event("transcript.delta", text=f"<result>{done_a['task_id']}: 4</result>")
        assert not any("9" in e["text"] for e in a.events_of("transcript.delta"))
    finally:
        await a.close()
        await b.close()


async def test_cancel_failing_and_hanging_tools_fail_their_task_and_the_session_goes_on(service, speech):
    peer = await connected(service, speech)
    try:
        peer.send({"type": "task.create", "tool": "timer", "input": "30 s", "ref": "long"})
        long_task = (await peer.wait_for_event("task.created", ref="long"))["task_id"]
        peer.send({"type": "task.cancel", "task_id": long_task})
        cancelled = await peer.wait_for_event("task.failed", task_id=long_task)
        assert cancelled["reason"] == "cancelled"

        for tool, reason in (("crash", "tool crashed"), ("hang", "timed out after 0.5 s"), ("refuse", "cannot do that")):
            peer.send({"type": "task.create", "tool": tool, "input": "x", "ref": tool})
            task_id = (await peer.wait_for_event("task.created", ref=tool))["task_id"]
            failed = await peer.wait_for_event("task.failed", timeout=5, task_id=task_id)
            assert reason in failed["reason"], failed

        peer.send({"type": "task.create", "tool": "nope", "input": "x", "ref": "n"})
        unknown = await peer.wait_for_event("error", code="unknown_tool")
        assert unknown["ref"] == "n"
        peer.send({"type": "task.cancel", "task_id": "t999"})
        await peer.wait_for_event("error", code="unknown_task")

        turns_before = len(peer.events_of("turn"))
        await asyncio.sleep(0.6)
        assert len(peer.events_of("turn")) > turns_before, "the session stopped"
        async with httpx.AsyncClient() as client:
            assert (await client.get(peer.session_url)).json()["tasks_running"] == 0
    finally:
        await peer.close()


async def test_tasks_per_session_are_bounded(service, speech):
    peer = await connected(service, speech)
    try:
        for i in range(5):
            peer.send({"type": "task.create", "tool": "timer", "input": "20 s", "ref": f"r{i}"})
        refused = await peer.wait_for_event("error", code="too_many_tasks")
        assert refused["ref"] == "r4"
        assert len(peer.events_of("task.created")) == 4
    finally:
        await peer.close()


@pytest.mark.parametrize(
    ("message", "code"),
    [
        ({"type": "text.input"}, "bad_field"),
        ({"type": "text.input", "text": 5}, "bad_field"),
        ({"type": "text.input", "text": "x" * 2001}, "too_long"),
        ({"type": "task.create", "tool": "calc"}, "bad_field"),
        ({"type": "task.cancel", "task_id": "t1", "extra": 1}, "bad_field"),
        ({"type": "session.update", "metrics_interval_ms": True}, "bad_field"),
        ({"type": "ping", "v": 2}, "bad_version"),
        ("[1, 2]", "bad_message"),
        ("[" * 100_000, "too_large"),
    ],
)
async def test_malformed_messages_get_an_error_and_are_counted(service, speech, message, code):
    peer = await connected(service, speech)
    try:
        peer.send(message)
        error = await peer.wait_for_event("error")
        assert error["code"] == code and error["message"]
        async with httpx.AsyncClient() as client:
            metrics = (await client.get(f"{service.url}/metrics")).text
        assert f'microturn_protocol_errors_total{{code="{code}"' in metrics
    finally:
        await peer.close()


async def test_a_flood_of_messages_is_rate_limited(service, speech):
    peer = await connected(service, speech)
    try:
        for i in range(100):
            peer.send({"type": "ping", "id": i})
        await peer.wait_for_event("error", code="rate_limited")
        await asyncio.sleep(0.5)
        pongs = len(peer.events_of("pong"))
        assert 40 <= pongs < 100
    finally:
        await peer.close()


async def test_metrics_events_and_the_prometheus_endpoint(service, speech):
    peer = await connected(service, speech)
    try:
        peer.send({"type": "session.update", "metrics_interval_ms": 200})
        event = await peer.wait_for_event("metrics")
        assert event["turns_out"] >= 0 and "output_queued_ms" in event
        peer.send({"type": "task.create", "tool": "calc", "input": "1+1"})
        await peer.wait_for_event("task.done")
        async with httpx.AsyncClient() as client:
            text = (await client.get(f"{service.url}/metrics")).text
        for name in ("microturn_step_duration_milliseconds_bucket", "microturn_sessions_active",
                     "microturn_engine_queued_chunks", "microturn_step_deadline_misses_total"):
            assert name in text, name
        tasks = [line for line in text.splitlines() if line.startswith("microturn_tasks_total{")]
        assert any('outcome="done"' in line and 'tool="calc"' in line and line.endswith(" 1.0") for line in tasks)
        active = [line for line in text.splitlines() if line.startswith("microturn_sessions_active")]
        assert active and float(active[0].split()[-1]) == 1.0
    finally:
        await peer.close()


async def test_the_chat_tool_streams_from_an_openai_compatible_server(speech):
    received: list[dict] = []
    with serving(fake_llm_app(received)) as llm_url:
        config = ServerConfig(**ECHO, llm_url=f"{llm_url}/v1", llm_model="tiny-llm", llm_api_key="sekret")
        with running_server(config) as server:
            peer = await connected(server, speech)
            try:
                ready = peer.events_of("session.ready")[0]
                assert "chat" in ready["tools"]
                peer.send({"type": "task.create", "tool": "chat", "input": "What is six times seven?"})
                done = await peer.wait_for_event("task.done", timeout=10)
            finally:
                await peer.close()
    assert done["result"] == "".join(ANSWER_WORDS)
    progress = [e["message"] for e in peer.events_of("task.progress")]
    assert len(progress) == len(ANSWER_WORDS) and progress[-1] == "".join(ANSWER_WORDS)
    body = received[0]["body"]
    assert body["model"] == "tiny-llm" and body["stream"] is True
    assert body["messages"][-1] == {"role": "user", "content": "What is six times seven?"}
    assert received[0]["authorization"] == "Bearer sekret"


async def test_at_capacity_new_sessions_get_503_and_live_ones_keep_their_deadlines(speech):
    with running_server(ServerConfig(**ECHO, capacity=2)) as server:
        a, b = await connected(server, speech), await connected(server, speech)
        try:
            async with httpx.AsyncClient() as client:
                for _ in range(3):
                    refused = await client.post(f"{server.url}/v1/sessions", content=a.pc.localDescription.sdp,
                                                headers={"Content-Type": "application/sdp"})
                    assert refused.status_code == 503 and refused.headers["Retry-After"]
                health = (await client.get(f"{server.url}/healthz")).json()
            assert health["capacity"] == 2 and health["free"] == 0
            start = len(a.events_of("turn")), len(b.events_of("turn"))
            await asyncio.sleep(2.0)
            for peer, before in zip((a, b), start, strict=True):
                turns = peer.events_of("turn")[before:]
                assert len(turns) >= 8, "a live session stalled"
                assert not any(t.get("overran") for t in turns)
                indices = [t["turn"] for t in turns]
                assert indices == list(range(indices[0], indices[0] + len(indices)))
        finally:
            await a.close()
            await b.close()


class CountingSink:
    """Stands in for sessions' WebRTC side when loading the engine directly."""

    span_context = None

    def __init__(self) -> None:
        self.outputs = 0

    def on_output(self, output, info) -> None:
        self.outputs += 1

    def on_step_error(self, turn, message) -> None:
        raise AssertionError(message)


async def test_the_event_loop_keeps_moving_while_the_model_engine_is_saturated(speech):
    """80 extra sessions of the real model are fed straight into the server's engine,
    so its steps take longer than a micro-turn and it never rests; meanwhile the
    server's event loop (measured by the server itself) keeps p99 lag under 50 ms
    (measured 2-5 ms here; a loop that waited for the model would lag by whole
    300 ms steps, and the 80-175 ms outliers CI once saw were full garbage
    collections, now cut by gc.freeze() and by the vocoder no longer deep-copying
    its state) and a WebRTC session keeps receiving turns."""
    config = ServerConfig(engine="model", ice_host_addresses=["127.0.0.1"], capacity=4, max_sessions=96)
    with running_server(config) as server:
        engine = server.app.state.registry.engine
        sinks = {f"load{i}": CountingSink() for i in range(80)}
        for session_id, sink in sinks.items():
            engine.open_session(session_id, sink)
        stop = threading.Event()

        def feed() -> None:
            silence = np.zeros(TURN_SAMPLES, dtype=np.float32)
            turn = 0
            while not stop.wait(0.2):
                for session_id in sinks:
                    engine.submit(TurnInput(session_id, turn, silence))
                turn += 1

        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        peer = await connected(server, speech)
        try:
            await asyncio.sleep(11.0)  # the lag window is the last 10 s
            async with httpx.AsyncClient() as client:
                health = (await client.get(f"{server.url}/healthz")).json()
        finally:
            stop.set()
            feeder.join()
            await peer.close()
            for session_id in sinks:
                engine.close_session(session_id)
    lag = health["loop_lag_ms"]
    print(f"saturated engine: last step {health['last_step_ms']:.0f} ms, overruns {health['overruns']}, loop lag {lag}")
    assert health["last_step_ms"] > 150 and health["overruns"] > 0, "the engine was not saturated"
    assert lag["samples"] >= 150 and lag["p99"] < 50, lag
    assert len(peer.events_of("turn")) >= 10, "the WebRTC session starved"


async def test_traces_run_from_the_page_to_the_tool_call(service, speech):
    trace_id, parent_id = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    # Both begin with a quiet 1.5 s, as calls do: a session that joined off the engine's
    # grid (first frames late on a busy machine) moves back onto it only while both it
    # and the model are quiet (server/alignment.py).
    peer = Peer(service.url, speech, lead_silence_s=1.5)
    await peer.connect(traceparent=f"00-{trace_id}-{parent_id}-01")
    other = Peer(service.url, speech, lead_silence_s=1.5)  # a second session shares model steps
    await other.connect()
    await other.wait_for_event("session.ready")
    try:
        await peer.wait_for_event("session.ready")
        peer.send({"type": "task.create", "tool": "calc", "input": "6*7"})
        # (the trained model may start tasks of its own: wait for ours)
        done = await peer.wait_for_event("task.done", tool="calc", result="42")
        assert done["trace_id"] == trace_id
        await asyncio.sleep(0.6)  # a few more micro-turns of this session
        # ... and live until a step has served both: the task can finish before the
        # second session has joined the engine's grid (its first frames settle its
        # phase), and the fixed wait alone failed about one run in ten.
        for _ in range(50):
            if any(s.name == "model.step" and len(s.links) == 2 for s in service.spans.get_finished_spans()):
                break
            await asyncio.sleep(0.1)
    finally:
        await peer.close()
        await other.close()
    await asyncio.sleep(0.2)
    spans = service.spans.get_finished_spans()
    by_name: dict[str, list] = {}
    for span in spans:
        by_name.setdefault(span.name, []).append(span)
    session = next(s for s in by_name["session"] if format(s.context.trace_id, "032x") == trace_id)
    assert format(session.parent.span_id, "016x") == parent_id and session.parent.is_remote

    turns = [s for s in by_name["microturn"] if s.parent and s.parent.span_id == session.context.span_id]
    assert len(turns) >= 3

    steps = [s for s in by_name["model.step"] if any(l.context.span_id == session.context.span_id for l in s.links)]
    assert len(steps) >= 3
    assert any(len(s.links) == 2 for s in steps), "steps that served both sessions link to both"
    assert all(s.attributes["microturn.batch.size"] == len(s.links) for s in steps)

    task = next(s for s in by_name["background.task"] if s.parent.span_id == session.context.span_id
                and s.attributes["microturn.task.tool"] == "calc")
    assert task.attributes["microturn.task.outcome"] == "done"
    call = next(s for s in by_name["tool.call"] if s.parent.span_id == task.context.span_id)
    assert call.context.trace_id == session.context.trace_id
