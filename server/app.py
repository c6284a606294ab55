"""The Starlette application: routes, static page, and the engine's lifetime."""

from __future__ import annotations

import asyncio
import gc
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from server import loop_errors, signalling, telemetry
from server.auth import BearerAuth, Verifier
from server.capacity import measure_capacity
from server.config import ServerConfig
from server.engine import Engine, StepInfo, make_model
from server.metrics import Metrics
from server.recording import RecordingWriter
from server.router import leave_router, report_capacity
from server.rtp_tuning import validate_jitter_prefetch
from server.sessions import SessionRegistry
from server.tools import ChatBackend, Tool, default_tools
from server.whip import EXPOSED_HEADERS, JSON_HTTP_ERRORS


def create_app(config: ServerConfig, tracer_provider: TracerProvider | None = None,
               extra_tools: dict[str, Tool] | None = None) -> Starlette:
    """The whole server as an ASGI app. ``extra_tools`` adds background-model tools
    (deployments with their own tools; tests with faulty ones)."""
    validate_jitter_prefetch(config.jitter_prefetch)  # a bad setting fails here, not in every offer
    provider = tracer_provider or telemetry.build_tracer_provider()
    model = make_model(config.engine, config.max_sessions, config.checkpoint, config.device)  # fail now, not at first request

    tracer = provider.get_tracer(telemetry.TRACER_NAME)
    chat = ChatBackend(config.llm_url, config.llm_model, config.llm_api_key) if config.llm_url else None
    tools = default_tools(chat) | (extra_tools or {})

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # The engine thread's Python glue holds the GIL between torch kernels; a
        # shorter switch interval (default 5 ms) lets the event loop — which paces
        # outgoing audio — get it back sooner. Measured: p99 loop lag with a
        # saturated engine, see docs/benchmarks.md.
        sys.setswitchinterval(config.gil_switch_interval_s)
        restore_exception_handler = loop_errors.install(asyncio.get_running_loop())
        if config.capacity is not None:
            capacity, measured = config.capacity, {}
        else:  # off the loop: the probe steps the model for a second or two
            capacity, measured = await asyncio.to_thread(
                measure_capacity, model, config.max_sessions, config.capacity_budget)
        holder: dict[str, SessionRegistry] = {}
        metrics = Metrics(lambda: len(holder["registry"]), lambda: engine.queued_chunks)
        engine = Engine(model, batch_window_s=config.batch_window_ms / 1000, tracer=tracer,
                        on_step=lambda info: _record_step(metrics, info))
        engine.start()
        # Imports, the model and the probe made hundreds of thousands of objects that live
        # as long as the server; a full collection stops every thread while it scans them
        # (65-160 ms measured). Frozen, full collections scan only what sessions made.
        gc.freeze()
        recording = RecordingWriter(config.record_dir) if config.record_dir else None
        holder["registry"] = app.state.registry = SessionRegistry(config, engine, tracer, tools, metrics, capacity,
                                                                  recording)
        app.state.metrics = metrics
        app.state.capacity_probe = measured
        background = [asyncio.ensure_future(metrics.watch_loop_lag())]
        if config.router_url:
            background.append(asyncio.ensure_future(report_capacity(config, app.state.registry)))
        try:
            yield
        finally:
            # SIGTERM: uvicorn has stopped accepting connections; tell the router (which
            # then sends no one here) and every client, let replies and tasks finish
            # (bounded; heartbeats go on saying "not ready"), then flush what must not be lost.
            app.state.registry.draining = True  # before the leave beat: no later beat says "ready"
            if config.router_url:
                await leave_router(config, app.state.registry)
            await app.state.registry.drain("server_shutdown", config.drain_timeout_s)
            for task in background:
                task.cancel()
            if recording is not None:  # every queued record and manifest on disk
                await asyncio.to_thread(recording.close, 10.0)
            engine.stop()
            provider.force_flush()
            metrics.shutdown()
            restore_exception_handler()

    async def index(request: Request) -> Response:
        return FileResponse(config.web_root / "index.html")

    async def healthz(request: Request) -> Response:
        registry: SessionRegistry = request.app.state.registry
        alive = registry.engine.alive
        return JSONResponse(
            status_code=200 if alive else 503,
            content={
                "status": "ok" if alive else "engine stopped",
                "engine": registry.engine.model.name,
                "weights": registry.engine.model.weights,
                "decoding": registry.engine.model.decoding,
                "sessions": len(registry),
                "capacity": registry.capacity,
                "free": max(registry.capacity - len(registry), 0),
                "capacity_probe_ms": request.app.state.capacity_probe,
                "engine_sessions": registry.engine.session_count,
                "ticks": registry.engine.ticks,
                "last_step_ms": round(registry.engine.last_step_ms, 3),
                "overruns": registry.engine.overruns,
                "loop_lag_ms": request.app.state.metrics.loop_lag_summary(),
            },
        )

    async def readyz(request: Request) -> Response:
        """Readiness: ready while a new session would be admitted. A full server leaves
        a load balancer's pool (or Kubernetes' Service) without dropping its calls,
        whose media flows to the pod directly."""
        registry: SessionRegistry = request.app.state.registry
        ready = registry.ready
        return JSONResponse({"ready": ready, "free": registry.free, "capacity": registry.capacity,
                             "sessions": len(registry)}, status_code=200 if ready else 503)

    async def metrics_endpoint(request: Request) -> Response:
        return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    routes = [
        Route("/", index),
        Route("/healthz", healthz),
        Route("/metrics", metrics_endpoint),
        Route("/readyz", readyz),
        Route("/v1/sessions", signalling.create_session, methods=["POST"]),
        Route("/v1/sessions", signalling.session_options, methods=["OPTIONS"]),
        Route("/v1/sessions/{session_id}", signalling.patch_resource, methods=["PATCH"]),
        Route("/v1/sessions/{session_id}", signalling.delete_resource, methods=["DELETE"]),
        Route("/v1/sessions/{session_id}", signalling.get_session, methods=["GET"]),
        Route("/v1/sessions/{session_id}/whep", signalling.create_viewer, methods=["POST"]),
        Route("/v1/sessions/{session_id}/whep/{viewer_id}", signalling.patch_resource, methods=["PATCH"]),
        Route("/v1/sessions/{session_id}/whep/{viewer_id}", signalling.delete_resource, methods=["DELETE"]),
        Mount("/static", StaticFiles(directory=config.web_root), name="static"),
    ]
    return Starlette(routes=routes, lifespan=lifespan, middleware=signalling_middleware(config),
                     exception_handlers=JSON_HTTP_ERRORS)


def signalling_middleware(config: ServerConfig) -> list[Middleware]:
    """CORS outermost, so refusals (401) are readable cross-origin too; then auth."""
    middleware = []
    if config.cors_origins:
        middleware.append(Middleware(
            CORSMiddleware, allow_origins=config.cors_origins,
            allow_methods=["GET", "POST", "PATCH", "DELETE", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type", "If-Match", "traceparent", "tracestate"],
            expose_headers=EXPOSED_HEADERS, max_age=600,
        ))
    middleware.append(Middleware(BearerAuth, verifier=Verifier(config.auth_tokens, config.auth_secret)))
    return middleware


def _record_step(metrics: Metrics, info: StepInfo) -> None:
    """Engine thread: OpenTelemetry instruments are thread-safe."""
    metrics.step_duration.record(info.step_ms)
    if info.overran:
        metrics.deadline_misses.add(1)
