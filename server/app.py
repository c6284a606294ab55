"""The Starlette application: routes, static page, and the engine's lifetime."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from opentelemetry.sdk.trace import TracerProvider
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from server import signalling, telemetry
from server.config import ServerConfig
from server.engine import Engine, make_model
from server.sessions import SessionRegistry


def create_app(config: ServerConfig, tracer_provider: TracerProvider | None = None) -> Starlette:
    provider = tracer_provider or telemetry.build_tracer_provider()
    model = make_model(config.engine, config.max_sessions, config.checkpoint)  # fail now, not at first request

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        engine = Engine(model)
        engine.start()
        app.state.registry = SessionRegistry(config, engine, provider.get_tracer(telemetry.TRACER_NAME))
        try:
            yield
        finally:
            await app.state.registry.close_all("server shutting down")
            engine.stop()
            provider.force_flush()

    async def index(request: Request) -> Response:
        return FileResponse(config.web_root / "index.html")

    async def healthz(request: Request) -> Response:
        registry: SessionRegistry = request.app.state.registry
        return JSONResponse(
            {
                "status": "ok",
                "engine": registry.engine.model.name,
                "weights": registry.engine.model.weights,
                "sessions": len(registry),
                "max_sessions": config.max_sessions,
                "engine_sessions": registry.engine.session_count,
                "ticks": registry.engine.ticks,
                "last_step_ms": round(registry.engine.last_step_ms, 3),
            }
        )

    routes = [
        Route("/", index),
        Route("/healthz", healthz),
        Route("/v1/sessions", signalling.create_session, methods=["POST"]),
        Route("/v1/sessions/{session_id}", signalling.delete_session, methods=["DELETE"]),
        Route("/v1/sessions/{session_id}", signalling.get_session, methods=["GET"]),
        Mount("/static", StaticFiles(directory=config.web_root), name="static"),
    ]
    return Starlette(routes=routes, lifespan=lifespan)
