"""The background model's tools: calculator, clock, timer, and an LLM over an
OpenAI-compatible chat-completions API.

A tool is an async function ``run(input, progress) -> result``; ``progress(fraction,
message)`` reports how far it got. Tools raise ``ToolError`` for bad input; any
other exception is a crash. Either way only that task fails.
"""

from __future__ import annotations

import ast
import asyncio
import json
import operator
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx

Progress = Callable[[float | None, str], None]


class ToolError(Exception):
    """The input cannot be handled; the message says why."""


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    run: Callable[[str, Progress], Awaitable[str]]
    timeout_s: float = 30.0


# -- calculator --------------------------------------------------------------------

_WORDS = {
    "divided by": "/", "over": "/", "times": "*", "multiplied by": "*", "plus": "+", "minus": "-",
    "to the power of": "**", "×": "*", "÷": "/", "^": "**",
}
_BINARY = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_MAX_EXPONENT = 1_000
_MAX_MAGNITUDE = 1e100


def calculate(expression: str) -> int | float:
    """Evaluate arithmetic by walking its syntax tree: numbers and + - * / // % ** only."""
    text = expression.strip().rstrip("?=. ").lower()
    for words, symbol in _WORDS.items():
        text = text.replace(words, symbol)
    if not text or len(text) > 200:
        raise ToolError("an expression of 1 to 200 characters, please")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        raise ToolError(f"not arithmetic: {expression!r}") from None
    return _evaluate(tree.body)


def _evaluate(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > _MAX_EXPONENT:
            raise ToolError("exponent too large")
        try:
            value = _BINARY[type(node.op)](left, right)
        except ZeroDivisionError:
            raise ToolError("division by zero") from None
        if isinstance(value, complex) or abs(value) > _MAX_MAGNITUDE:
            raise ToolError("result out of range")
        return value
    raise ToolError(f"not allowed in arithmetic: {type(node).__name__}")


def _format_number(value: int | float) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.10g}" if isinstance(value, float) else str(value)


async def calculator(text: str, progress: Progress) -> str:
    return _format_number(calculate(text))


# -- clock and timer ---------------------------------------------------------------------

async def clock(text: str, progress: Progress) -> str:
    """The local time as people say it, "9:41" (twelve-hour, as the model was taught)."""
    now = time.localtime()
    return f"{(now.tm_hour - 1) % 12 + 1}:{now.tm_min:02d}"


_NUMBER_WORDS = {word: n for n, word in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty".split())}
_NUMBER_WORDS.update({"thirty": 30, "forty": 40, "fifty": 50, "sixty": 60})
_UNITS = {"s": 1, "sec": 1, "second": 1, "seconds": 1, "secs": 1, "m": 60, "min": 60, "minute": 60, "minutes": 60}
_MAX_TIMER_S = 3_600


def parse_duration(text: str) -> float:
    """'10', '10 s', 'ten seconds', 'in 2 minutes' -> seconds."""
    for found in re.finditer(r"(\d+(?:\.\d+)?|[a-z]+)\s*(s|secs?|seconds?|m|mins?|minutes?)?\b", text.lower()):
        amount, unit = found.groups()
        value = float(amount) if amount[0].isdigit() else _NUMBER_WORDS.get(amount)
        if value is not None:
            seconds = value * _UNITS.get(unit or "s", 1)
            if not 0 < seconds <= _MAX_TIMER_S:
                raise ToolError(f"a timer runs for up to {_MAX_TIMER_S} seconds")
            return seconds
    raise ToolError(f"no duration in {text!r}")


async def timer(text: str, progress: Progress) -> str:
    """'10 s: stretch' waits ten seconds, reporting progress, then returns the reminder."""
    when, _, message = text.partition(":")
    seconds = parse_duration(when)
    started = time.monotonic()
    while (left := seconds - (time.monotonic() - started)) > 0:
        await asyncio.sleep(min(1.0, left))
        elapsed = min(seconds, time.monotonic() - started)
        progress(elapsed / seconds, f"{seconds - elapsed:.0f} s left")
    return f"reminder: {message.strip()}" if message.strip() else f"{_format_number(seconds)} seconds are up"


# -- LLM -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ChatBackend:
    """An OpenAI-compatible ``/chat/completions`` endpoint, streamed."""

    base_url: str  # e.g. http://127.0.0.1:8080/v1
    model: str
    api_key: str | None = None
    max_tokens: int = 256
    system_prompt: str = "You help a voice assistant. Answer in one or two short spoken sentences."

    async def __call__(self, text: str, progress: Progress) -> str:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        body = {
            "model": self.model,
            "stream": True,
            "max_tokens": self.max_tokens,
            "messages": [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": text}],
        }
        answer: list[str] = []
        async with httpx.AsyncClient(timeout=httpx.Timeout(30.0, connect=5.0)) as client:
            async with client.stream("POST", self.base_url.rstrip("/") + "/chat/completions",
                                     json=body, headers=headers) as response:
                if response.status_code != 200:
                    detail = (await response.aread()).decode("utf-8", "replace")[:200]
                    raise ToolError(f"LLM backend answered HTTP {response.status_code}: {detail}")
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    delta = _delta_text(data)
                    if delta:
                        answer.append(delta)
                        tokens = len(answer)
                        progress(min(0.95, tokens / self.max_tokens), "".join(answer)[-200:])
        if not answer:
            raise ToolError("the LLM returned no text")
        return "".join(answer).strip()


def _delta_text(data: str) -> str:
    try:
        chunk = json.loads(data)
        return chunk["choices"][0].get("delta", {}).get("content") or ""
    except (json.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError):
        raise ToolError(f"unexpected stream chunk from the LLM: {data[:100]!r}") from None


def default_tools(chat: ChatBackend | None = None) -> dict[str, Tool]:
    tools = [
        Tool("calc", "arithmetic, e.g. '1234 * 5678'", calculator, timeout_s=2.0),
        Tool("clock", "the current time", clock, timeout_s=2.0),
        Tool("timer", "'10 s: message' — reminds you later", timer, timeout_s=_MAX_TIMER_S + 5),
    ]
    if chat is not None:
        tools.append(Tool("chat", f"ask {chat.model}", chat, timeout_s=60.0))
    return {tool.name: tool for tool in tools}

