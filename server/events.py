"""The data-channel protocol: JSON events on the channel named ``events``.

Every message is one JSON object with a ``type``; the server stamps its own with
the protocol version ``v``. Client messages are validated here and nowhere else:
anything malformed raises :class:`ProtocolError`, which the session turns into an
``error`` event — the connection stays up. See docs/protocol.md.
"""

from __future__ import annotations

import json
from typing import Any

PROTOCOL_VERSION = 1
CHANNEL_LABEL = "events"
MAX_MESSAGE_BYTES = 16 * 1024

# Client -> server message types understood by this version.
CLIENT_TYPES = frozenset({"ping"})


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


def parse_client_message(raw: str | bytes) -> dict[str, Any]:
    """Decode and validate one client message."""
    if isinstance(raw, bytes):
        raise ProtocolError("binary_not_supported", "messages are JSON text, not binary")
    if len(raw.encode("utf-8", "surrogatepass")) > MAX_MESSAGE_BYTES:
        raise ProtocolError("too_large", f"messages are limited to {MAX_MESSAGE_BYTES} bytes")
    try:
        message = json.loads(raw)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ProtocolError("bad_json", f"not valid JSON: {exc}") from None
    if not isinstance(message, dict):
        raise ProtocolError("bad_message", "a message is a JSON object")
    message_type = message.get("type")
    if not isinstance(message_type, str):
        raise ProtocolError("bad_message", "a message needs a string 'type'")
    if message_type not in CLIENT_TYPES:
        raise ProtocolError("unknown_type", f"unknown message type {message_type!r}")
    version = message.get("v", PROTOCOL_VERSION)
    if version != PROTOCOL_VERSION:
        raise ProtocolError("bad_version", f"this server speaks protocol v{PROTOCOL_VERSION}")
    return message
