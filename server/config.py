"""Server settings: one dataclass, filled from the command line."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from server.engine import BATCH_WINDOW_S
from server.events import MAX_MESSAGE_BYTES, MAX_TEXT_CHARS

WEB_ROOT = Path(__file__).resolve().parent.parent / "web"
# The trained tiny checkpoint shipped in the repository (docs/training.md); served by
# default. ``--checkpoint random`` serves random weights instead.
SHIPPED_CHECKPOINT = Path(__file__).resolve().parent.parent / "checkpoints" / "tiny"


def default_checkpoint() -> str | None:
    return str(SHIPPED_CHECKPOINT) if (SHIPPED_CHECKPOINT / "config.json").exists() else None


@dataclass(slots=True)
class ServerConfig:
    engine: str = "model"
    checkpoint: str | None = field(default_factory=default_checkpoint)  # a model.weights directory; None: random
    max_sessions: int = 32
    device: str = "cpu"  # where the model steps: "cpu", or "cuda" (bf16, xformers when installed)
    # ICE: STUN/TURN URLs (none unless configured) and extra host-candidate
    # addresses such as 127.0.0.1 for loopback-only networks (see ice.py).
    ice_servers: list[str] = field(default_factory=list)
    ice_host_addresses: list[str] = field(default_factory=list)
    # TURN credentials: a secret shared with the TURN server (coturn use-auth-secret)
    # gives every session its own short-lived pair; else one static pair.
    turn_secret: str | None = None
    turn_username: str | None = None
    turn_credential: str | None = None
    # Signalling auth (server/auth.py): static bearer tokens and/or an HMAC secret
    # for tokens minted by ``microturn token``. Neither set: signalling is open.
    auth_tokens: list[str] = field(default_factory=list)
    auth_secret: str | None = None
    # Origins whose pages may call signalling cross-origin (CORS); "*" for any.
    cors_origins: list[str] = field(default_factory=list)
    max_viewers_per_session: int = 4
    # Multi-node: report free capacity to ``microturn router`` at ``router_url``,
    # reachable by clients at ``advertise_url``.
    router_url: str | None = None
    advertise_url: str | None = None
    heartbeat_period_s: float = 1.0
    # Outgoing audio waits this long after running dry (absorbs step jitter). Part of
    # every reply's latency: 40 ms put echo's p99 server-added latency at 78 ms, 20 ms
    # at 57 ms, with no underruns either way (loadtest, 2 peers, docs/benchmarks.md).
    playout_delay_ms: float = 20.0
    # The engine steps once every session has a chunk, or this long after the first
    # arrived: sessions whose chunks close further apart never share a step.
    batch_window_ms: float = BATCH_WINDOW_S * 1000
    # Incoming audio: packets aiortc's jitter buffer holds before releasing (aiortc: 4).
    jitter_prefetch: int = 1
    # Outgoing audio as mono Opus encoded by the track (see media_out.py); False hands
    # aiortc raw frames (its stereo encoder), kept for A/B benchmarks.
    pre_encode_opus: bool = True
    # A sender silent this long is treated as stalled: its clock advances with silence.
    stall_after_s: float = 0.5
    # A session whose peer has not connected by then is closed.
    connect_timeout_s: float = 15.0
    # A connected peer that has sent nothing (no audio, no message) for this long has
    # vanished (closed its laptop, lost its network): its slot is freed. Much sooner
    # than ICE consent expiry (30 s). Clients that send no audio must ping.
    peer_timeout_s: float = 5.0
    # Sessions end after this long (``session.ending``, then a drain): a slot is not
    # held for ever by a forgotten tab. 0: no limit.
    max_session_s: float = 3600.0
    # On SIGTERM (or the max duration) a session is told ``session.ending`` and given
    # this long to finish the reply being spoken and its running tasks.
    drain_timeout_s: float = 10.0
    max_offer_bytes: int = 64 * 1024
    gil_switch_interval_s: float = 0.001
    # Admission: sessions beyond ``capacity`` get 503. None: measured at start-up as
    # the count at which a model step reaches ``capacity_budget`` of the 200 ms turn.
    capacity: int | None = None
    capacity_budget: float = 0.6
    # Data channel and background model limits.
    messages_per_second: float = 20.0
    message_burst: float = 40.0
    max_message_bytes: int = MAX_MESSAGE_BYTES
    max_text_chars: int = MAX_TEXT_CHARS  # one text.input
    # Text (typed, and background results) waiting to enter the model, which reads 4
    # bytes a micro-turn (20 a second; 8 in the gpu preset): a text.input that would
    # take it past this is refused, not queued.
    max_text_backlog_bytes: int = 8 * 1024
    max_tasks_per_session: int = 4
    # Session recordings (server/recording.py): off unless a directory is given, and
    # then only for sessions whose client asks (the page's consent box: ?record=1).
    record_dir: str | None = None
    # OpenAI-compatible chat backend for the background model (the `chat` tool).
    llm_url: str | None = None
    llm_model: str = "gpt-4o-mini"
    llm_api_key: str | None = None
    web_root: Path = WEB_ROOT
