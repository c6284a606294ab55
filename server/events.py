"""The data-channel protocol: JSON events on the channel named ``events``.

Every message is one JSON object with a ``type``; the server stamps its own with
the protocol version ``v``. Client messages are validated here and nowhere else:
anything malformed raises :class:`ProtocolError`, which the session turns into an
``error`` event — the connection stays up. See docs/protocol.md.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

PROTOCOL_VERSION = 1
CHANNEL_LABEL = "events"
MAX_MESSAGE_BYTES = 16 * 1024
MAX_TEXT_CHARS = 2_000
MAX_TASK_INPUT_CHARS = 4_000

# Client -> server messages: for each type, its fields as (accepted types, required).
_ANY_JSON = (str, int, float, bool, type(None))
CLIENT_SCHEMAS: dict[str, dict[str, tuple[tuple[type, ...], bool]]] = {
    "ping": {"id": (_ANY_JSON, False), "t": (_ANY_JSON, False)},
    "text.input": {"text": ((str,), True)},
    "task.create": {"tool": ((str,), True), "input": ((str,), True), "ref": ((str,), False)},
    "task.cancel": {"task_id": ((str,), True)},
    "session.update": {"metrics_interval_ms": ((int,), False)},
}
_LIMITS = {"text": MAX_TEXT_CHARS, "input": MAX_TASK_INPUT_CHARS, "tool": 64, "ref": 128, "task_id": 64}


class ProtocolError(Exception):
    """A client message that cannot be accepted; ``code`` is machine-readable."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def server_event(event_type: str, **fields: Any) -> str:
    """Encode one server -> client event."""
    return json.dumps({"v": PROTOCOL_VERSION, "type": event_type, **fields}, separators=(",", ":"))


def error_event(code: str, message: str, **fields: Any) -> str:
    return server_event("error", code=code, message=message, **fields)


def _reject_constant(name: str) -> Any:
    # Python's json reads NaN and Infinity, which are not JSON: echoed back (a ping's
    # id and t) they would make the server's own events unparsable by a browser.
    raise ProtocolError("bad_json", f"not valid JSON: {name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 reads as inf: the same trap as Infinity
        raise ProtocolError("bad_json", f"not valid JSON: {text[:32]} is out of range")
    return value


def _shown(text: str, limit: int = 64) -> str:
    """A client's string quoted in an error, cut short: errors stay small."""
    return repr(text[:limit]) + ("..." if len(text) > limit else "")


def parse_client_message(raw: str | bytes, max_bytes: int = MAX_MESSAGE_BYTES,
                         max_text_chars: int = MAX_TEXT_CHARS) -> dict[str, Any]:
    """Decode and validate one client message; any failure is a ProtocolError.
    ``max_bytes`` and ``max_text_chars`` (a text.input's length) are the server's limits."""
    if isinstance(raw, bytes):
        raise ProtocolError("binary_not_supported", "messages are JSON text, not binary")
    if len(raw.encode("utf-8", "surrogatepass")) > max_bytes:
        raise ProtocolError("too_large", f"messages are limited to {max_bytes} bytes")
    try:
        message = json.loads(raw, parse_float=_finite_float, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise ProtocolError("bad_json", f"not valid JSON: {exc}") from None
    except ValueError:  # int() refuses over 4300 digits; escaping here would kill the channel
        raise ProtocolError("bad_json", "not valid JSON: a number has too many digits") from None
    except RecursionError:
        raise ProtocolError("bad_json", "not valid JSON: nested too deeply") from None
    if not isinstance(message, dict):
        raise ProtocolError("bad_message", "a message is a JSON object")
    message_type = message.get("type")
    if not isinstance(message_type, str):
        raise ProtocolError("bad_message", "a message needs a string 'type'")
    schema = CLIENT_SCHEMAS.get(message_type)
    if schema is None:
        raise ProtocolError("unknown_type", f"unknown message type {_shown(message_type)}")
    version = message.get("v", PROTOCOL_VERSION)
    if isinstance(version, bool) or version != PROTOCOL_VERSION:  # True == 1 in Python
        raise ProtocolError("bad_version", f"this server speaks protocol v{PROTOCOL_VERSION}")
    for name in message.keys() - schema.keys() - {"type", "v"}:
        raise ProtocolError("bad_field", f"{message_type}: unknown field {_shown(name)}")
    for name, (types, required) in schema.items():
        if name not in message:
            if required:
                raise ProtocolError("bad_field", f"{message_type}: missing field {name!r}")
            continue
        value = message[name]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise ProtocolError("bad_field", f"{message_type}: field {name!r} has the wrong type")
        limit = max_text_chars if name == "text" else _LIMITS.get(name)
        if limit is not None and isinstance(value, str) and len(value) > limit:
            raise ProtocolError("too_long", f"{message_type}: field {name!r} is limited to {limit} characters")
    return message


class RateLimit:
    """Token bucket: ``rate`` messages a second on average, bursts up to ``burst``."""

    def __init__(self, rate: float = 20.0, burst: float = 40.0) -> None:
        self.rate, self.burst = rate, burst
        self._tokens = burst
        self._updated = time.monotonic()

    def allow(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._updated) * self.rate)
        self._updated = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True
