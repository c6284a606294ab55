"""The live sessions of one server process, and the engine they share."""

from __future__ import annotations

import asyncio

from opentelemetry import trace
from opentelemetry.context import Context

from server.config import ServerConfig
from server.engine import Engine
from server.ice import IceServer, ice_servers_for
from server.metrics import Metrics
from server.recording import RecordingWriter
from server.session import Session
from server.tools import Tool


class SessionRegistry:
    def __init__(self, config: ServerConfig, engine: Engine, tracer: trace.Tracer, tools: dict[str, Tool],
                 metrics: Metrics, capacity: int, recording: RecordingWriter | None = None) -> None:
        self.config = config
        self.engine = engine
        self.tracer = tracer
        self.tools = tools
        self.metrics = metrics
        self.capacity = min(capacity, config.max_sessions)
        self.draining = False  # shutting down: no new sessions
        self.recording = recording  # None: this server does not offer recording
        self._sessions: dict[str, Session] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    @property
    def full(self) -> bool:
        return len(self._sessions) >= self.capacity

    def get(self, session_id: str) -> Session | None:
        return self._sessions.get(session_id)

    @property
    def ready(self) -> bool:
        """Whether a new session would be admitted (readyz, and the router's heartbeat)."""
        return self.engine.alive and self.free > 0 and not self.draining

    @property
    def free(self) -> int:
        return max(0, self.capacity - len(self._sessions))

    def ice_servers_for(self, session_id: str) -> list[IceServer]:
        c = self.config
        return ice_servers_for(c.ice_servers, session_id, c.turn_secret, c.turn_username, c.turn_credential)

    def new_session(self, session_id: str, parent: Context | None, record: bool = False) -> Session:
        session = Session(session_id, self.config, self.engine, self.tracer, parent, self._forget,
                          self.tools, self.metrics, self.ice_servers_for(session_id),
                          self.recording if record else None)
        self._sessions[session_id] = session
        return session

    def _forget(self, session: Session) -> None:
        self._sessions.pop(session.id, None)

    async def close_all(self, reason: str) -> None:
        await asyncio.gather(*(s.close(reason) for s in list(self._sessions.values())))

    async def drain(self, reason: str, timeout_s: float) -> None:
        """Stop admitting, end every session gracefully, and close what is left."""
        self.draining = True
        await asyncio.gather(*(s.end(reason, timeout_s) for s in list(self._sessions.values())))
        await self.close_all(reason)
