"""Text <-> token ids: UTF-8 bytes, plus markers written as tags in strings.

The markers let text carry structure without a tokenizer:
``<task>calc: 12*34</task>`` is the model asking the background model for work;
``<result>t1: 408</result>`` is a result coming back. In ids each tag is one
marker token; in strings (events, transcripts) it is the tag. Only the server's own
framing is markers: ``literal`` keeps tags in typed text and tool output as bytes.
"""

from __future__ import annotations

import codecs
import re

from model.config import NO_TEXT, RESULT_CLOSE, RESULT_OPEN, TASK_CLOSE, TASK_OPEN

MARKER_TAGS = {TASK_OPEN: "<task>", TASK_CLOSE: "</task>", RESULT_OPEN: "<result>", RESULT_CLOSE: "</result>"}
_TAG_IDS = {tag: token for token, tag in MARKER_TAGS.items()}
_TAG_PATTERN = re.compile("|".join(re.escape(tag) for tag in _TAG_IDS))


def encode(text: str) -> list[int]:
    """A string -> ids: marker tags become marker tokens, the rest UTF-8 bytes. A lone
    surrogate (JSON can escape one: ``"\\ud800"``) is no character and becomes ``?``:
    typed text must not fail a model step."""
    ids: list[int] = []
    position = 0
    for match in _TAG_PATTERN.finditer(text):
        ids += text[position : match.start()].encode("utf-8", "replace")
        ids.append(_TAG_IDS[match.group()])
        position = match.end()
    ids += text[position:].encode("utf-8", "replace")
    return ids


_TAG_STARTS = {tag[:n] for tag in _TAG_IDS for n in range(1, len(tag))}  # "<", "</", "<t", ...
TAG_BREAK = "<\u200b"  # "<" and a zero-width space: reads as "<", encodes as bytes


def literal(text: str) -> str:
    """``text`` as content: each marker tag in it broken (a zero-width space after its
    ``<``), so that ``encode`` keeps it as bytes. Typed text and a tool's output must
    not open or close a result or a task request the model would take for the
    server's: only the server's own framing is markers. So is a tag's beginning at the
    end, which the text joined after it in the same micro-turn could complete."""
    text = _TAG_PATTERN.sub(lambda match: TAG_BREAK + match.group()[1:], text)
    start = text.rfind("<")  # a tag's beginning holds one "<", its first character
    if start >= 0 and text[start:] in _TAG_STARTS:
        text = text[:start] + TAG_BREAK + text[start + 1 :]
    return text


RESULT_LABELS = 9  # a result is labelled t1 … t9 for the model, whatever its task's id


def result_label(task_number: int) -> str:
    """How the model's text input names task ``task_number``'s result (``<result>tN:
    …``). The model copies a result's digits from a fixed distance after their label
    (docs/eval.md, session 8), so the label keeps one length: from the tenth task on,
    labels start again at t1 (the server skips a label a running task holds:
    server/tasks.py). With ``t10`` the digits came a byte later, and a session never
    spoke a result again (docs/eval.md, session 43)."""
    return f"t{(task_number - 1) % RESULT_LABELS + 1}"


def result_input(label: str, result: str) -> str:
    """A background result as the model reads it (the server's and the data's one
    format): ``<result>LABEL: RESULT</result>``, the result's own tags kept as text."""
    return f"<result>{label}: {literal(result)}</result>"


class Decoder:
    """Incremental ids -> string (a character split across micro-turns comes out whole)."""

    def __init__(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def decode(self, ids: list[int]) -> str:
        parts = []
        for token in ids:
            if token < 256:
                parts.append(self._utf8.decode(bytes([token])))
            elif token in MARKER_TAGS:
                parts.append(self._utf8.decode(b"", final=True) + MARKER_TAGS[token])
            # NO_TEXT and unused ids say nothing
        return "".join(parts)


__all__ = ["MARKER_TAGS", "NO_TEXT", "TAG_BREAK", "Decoder", "encode", "literal", "result_input", "result_label"]
