"""Server settings: one dataclass, filled from the command line."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

WEB_ROOT = Path(__file__).resolve().parent.parent / "web"


@dataclass(slots=True)
class ServerConfig:
    engine: str = "model"
    checkpoint: str | None = None  # a directory from model.weights; random weights when None
    max_sessions: int = 32
    # ICE: STUN/TURN URLs (none unless configured) and extra host-candidate
    # addresses such as 127.0.0.1 for loopback-only networks (see ice.py).
    ice_servers: list[str] = field(default_factory=list)
    ice_host_addresses: list[str] = field(default_factory=list)
    # Outgoing audio waits this long after running dry (absorbs step jitter).
    playout_delay_ms: float = 40.0
    # A sender silent this long is treated as stalled: its clock advances with silence.
    stall_after_s: float = 0.5
    max_offer_bytes: int = 64 * 1024
    web_root: Path = WEB_ROOT
