"""Background tasks of one session: slow work that runs beside the conversation.

A task is asked for by the client (``task.create``) or by the model, which writes
``<task>TOOL: INPUT</task>`` in its text stream (``TaskRequestParser`` finds them).
Each task runs as an asyncio task with the tool's timeout; it reports
``task.created``, ``task.progress``, then ``task.done`` or ``task.failed``. A
result goes back to the model as text input, ``<result>LABEL: RESULT</result>``, at
the session's next micro-turn, so the model can speak it (or, if the model already
has more text waiting than the session allows, the task fails: ``text_backlog``).
The label is the id up to t9, then the next of t1 … t9 that no running task holds
(``model.text.result_label``); tags inside RESULT stay text (``model.text.result_input``).

A tool that raises, returns something other than text, or outlives its timeout
fails its own task (``task.failed`` with the reason) and nothing else; one that
ignores being cancelled is left behind rather than waited for, so its task still
fails on time and frees its place.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from opentelemetry import trace

from model.text import RESULT_LABELS, result_input, result_label
from server import telemetry as tm
from server.tools import Progress, Tool, ToolError

log = logging.getLogger(__name__)

Emit = Callable[..., None]  # emit(event_type, **fields)


class TaskError(Exception):
    """A task that cannot be created; ``code`` goes into the error event."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


@dataclass
class _Task:
    task_id: str
    label: str  # what the model's text input calls its result (model.text.result_label)
    tool: str
    origin: str  # "client" or "model"
    runner: asyncio.Task[None] | None = None
    outcome: str = "cancelled"  # what _run concluded; a task cancelled before its first step never ran it


class TaskManager:
    def __init__(self, tools: dict[str, Tool], emit: Emit, deliver_result: Callable[[str], None],
                 tracer: trace.Tracer, parent: trace.Span, max_concurrent: int = 4,
                 on_finish: Callable[[str, str], None] | None = None) -> None:
        self.tools = tools
        self.max_concurrent = max_concurrent
        self._emit = emit
        self._deliver_result = deliver_result
        self._tracer = tracer
        self._parent = parent
        self._on_finish = on_finish or (lambda tool, outcome: None)
        if not 1 <= max_concurrent <= RESULT_LABELS:
            raise ValueError(f"max_concurrent {max_concurrent}: 1 to {RESULT_LABELS}, one result label each")
        self._running: dict[str, _Task] = {}
        self._ids = itertools.count(1)
        self._labels = itertools.count(1)

    @property
    def running(self) -> int:
        return len(self._running)

    def create(self, tool_name: str, tool_input: str, origin: str, ref: str | None = None) -> str:
        tool = self.tools.get(tool_name)
        if tool is None:
            raise TaskError("unknown_tool", f"no tool {tool_name!r}; tools: {', '.join(sorted(self.tools))}")
        if len(self._running) >= self.max_concurrent:
            raise TaskError("too_many_tasks", f"at most {self.max_concurrent} tasks run at once per session")
        task = _Task(f"t{next(self._ids)}", self._free_label(), tool_name, origin)
        self._running[task.task_id] = task
        fields: dict[str, Any] = {"task_id": task.task_id, "tool": tool_name, "input": tool_input, "origin": origin}
        if ref is not None:
            fields["ref"] = ref
        self._emit("task.created", **fields)
        task.runner = asyncio.ensure_future(self._run(task, tool, tool_input))
        task.runner.add_done_callback(lambda _, task=task: self._finished(task))
        return task.task_id

    def _free_label(self) -> str:
        """The next label in turn (t1 … t9, then t1 again) that no running task holds:
        the id itself for a session's first nine tasks, and never one a running task's
        result will also come back under (a 10-minute timer may outlast nine sums)."""
        held = {task.label for task in self._running.values()}
        while (label := result_label(next(self._labels))) in held:  # ends: create() lets at most 8 be held
            pass
        return label

    def cancel(self, task_id: str) -> bool:
        task = self._running.get(task_id)
        if task is None or task.runner is None:
            return False
        task.runner.cancel()
        return True

    async def close(self) -> None:
        runners = [t.runner for t in self._running.values() if t.runner is not None]
        for runner in runners:
            runner.cancel()
        await asyncio.gather(*runners, return_exceptions=True)

    def _finished(self, task: _Task) -> None:
        """Every task ends here, however it ended: its place is freed and its outcome
        counted. ``_run`` swallows its own cancellation, so a runner that ends cancelled
        was cancelled before its first step (a ``task.cancel`` in the same burst as its
        ``task.create``): nothing has said that it failed yet."""
        if task.runner is not None and task.runner.cancelled():
            self._emit("task.failed", task_id=task.task_id, tool=task.tool, reason="cancelled")
        self._running.pop(task.task_id, None)
        self._on_finish(task.tool, task.outcome)

    async def _run(self, task: _Task, tool: Tool, tool_input: str) -> None:
        context = trace.set_span_in_context(self._parent)
        with self._tracer.start_as_current_span(
            tm.SPAN_BACKGROUND_TASK, context=context,
            attributes={tm.ATTR_TASK_ID: task.task_id, tm.ATTR_TOOL: tool.name, tm.ATTR_TASK_ORIGIN: task.origin},
        ) as span:
            task.outcome = "failed"
            try:
                with self._tracer.start_as_current_span(tm.SPAN_TOOL_CALL, attributes={tm.ATTR_TOOL: tool.name}):
                    result = await _call(tool, tool_input, self._progress(task))
                if not isinstance(result, str):
                    raise ToolError(f"tool returned {type(result).__name__}, not text")
                # Delivered first: a result the model has no room for fails its task. Its
                # text is content: tags in it (an LLM's answer may have any) stay bytes.
                self._deliver_result(result_input(task.label, result))
                task.outcome = "done"
                self._emit("task.done", task_id=task.task_id, tool=tool.name, result=result)
            except asyncio.CancelledError:
                task.outcome = "cancelled"
                self._emit("task.failed", task_id=task.task_id, tool=tool.name, reason="cancelled")
            except TimeoutError:
                self._emit("task.failed", task_id=task.task_id, tool=tool.name,
                           reason=f"timed out after {tool.timeout_s:g} s")
            except ToolError as exc:
                self._emit("task.failed", task_id=task.task_id, tool=tool.name, reason=str(exc))
            except TaskError as exc:  # its result was refused
                self._emit("task.failed", task_id=task.task_id, tool=tool.name, reason=f"{exc.code}: {exc.message}")
            except Exception as exc:  # a crashing tool fails its task, nothing else
                log.exception("tool %s crashed", tool.name)
                self._emit("task.failed", task_id=task.task_id, tool=tool.name, reason=f"tool crashed: {exc!r}")
            finally:  # its place is freed in _finished
                span.set_attribute(tm.ATTR_TASK_OUTCOME, task.outcome)

    def _progress(self, task: _Task) -> Callable[[float | None, str], None]:
        def report(fraction: float | None, message: str) -> None:
            if task.task_id in self._running:
                value = None if fraction is None else round(min(max(fraction, 0.0), 1.0), 3)
                self._emit("task.progress", task_id=task.task_id, fraction=value, message=message)

        return report


async def _call(tool: Tool, tool_input: str, progress: Progress) -> object:
    """``tool.run``'s result, or TimeoutError at its timeout even if the tool ignores
    cancellation (``asyncio.timeout`` would wait for such a tool for ever)."""
    call = asyncio.ensure_future(tool.run(tool_input, progress))
    try:
        done, _ = await asyncio.wait({call}, timeout=tool.timeout_s)
    finally:
        if not call.done():  # timed out, or this task was cancelled
            call.cancel()
            call.add_done_callback(_forget)
    if not done:
        raise TimeoutError
    return call.result()


def _forget(call: asyncio.Future[object]) -> None:
    """Retrieve an abandoned call's outcome, so asyncio does not log it as never retrieved."""
    if not call.cancelled():
        call.exception()


_REQUEST = re.compile(r"<task>(.*?)</task>", re.DOTALL)
_MAX_PENDING = 4_096  # model text kept while waiting for a closing tag


class TaskRequestParser:
    """Finds ``<task>TOOL: INPUT</task>`` in the model's text as it streams in. A
    request without a known tool's name before its colon goes whole to ``default_tool``
    ("weather: Paris" is a question for the chat model, not an unknown tool)."""

    def __init__(self, default_tool: str, tools: Collection[str]) -> None:
        self.default_tool = default_tool
        self.tools = frozenset(tools)
        self._pending = ""

    def feed(self, text: str) -> list[tuple[str, str]]:
        """Model text delta -> the (tool, input) requests it completed."""
        self._pending += text
        requests = []
        end = 0
        for match in _REQUEST.finditer(self._pending):
            body = match.group(1).strip()
            tool, sep, tool_input = body.partition(":")
            if sep and tool.strip() in self.tools:
                requests.append((tool.strip(), tool_input.strip()))
            else:
                requests.append((self.default_tool, body))
            end = match.end()
        rest = self._pending[end:]
        start = rest.rfind("<task>")
        # Keep only what may still become a request.
        self._pending = rest[start:][-_MAX_PENDING:] if start >= 0 else rest[-len("<task>"):]
        return requests
