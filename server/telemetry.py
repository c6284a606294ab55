"""Tracing: every span and attribute name, defined once, and the provider set-up.

Configured by the standard environment variables: ``OTEL_TRACES_EXPORTER``
(``none`` by default here, or a comma list of ``console`` and ``otlp``),
``OTEL_EXPORTER_OTLP_*``, ``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``,
``OTEL_TRACES_SAMPLER``.
"""

from __future__ import annotations

import os

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

TRACER_NAME = "microturn"

# Spans
SPAN_SESSION = "session"  # root of one WebRTC session, continues the page's traceparent
SPAN_MICROTURN = "microturn"  # one session's micro-turn: chunk closed -> output queued
SPAN_MODEL_STEP = "model.step"  # one batched model call, linked to the sessions it served
SPAN_BACKGROUND_TASK = "background.task"  # one task of the background model, child of its session
SPAN_TOOL_CALL = "tool.call"  # the tool doing the task's work

# Attributes
ATTR_SESSION_ID = "microturn.session.id"
ATTR_ENGINE = "microturn.engine"
ATTR_TURN = "microturn.turn"
ATTR_TICK = "microturn.tick"
ATTR_BATCH_SIZE = "microturn.batch.size"
ATTR_STEP_MS = "microturn.step.ms"
ATTR_OVERRAN = "microturn.step.overran"
ATTR_QUEUE_MS = "microturn.output.queued_ms"
ATTR_CLOSE_REASON = "microturn.session.close_reason"
ATTR_TASK_ID = "microturn.task.id"
ATTR_TOOL = "microturn.task.tool"
ATTR_TASK_ORIGIN = "microturn.task.origin"
ATTR_TASK_OUTCOME = "microturn.task.outcome"

# Metrics (OpenTelemetry instrument names; /metrics shows them Prometheus-style)
METRIC_STEP_DURATION = "microturn.step.duration"  # histogram, ms
METRIC_DEADLINE_MISSES = "microturn.step.deadline_misses"  # counter
METRIC_ACTIVE_SESSIONS = "microturn.sessions.active"  # gauge
METRIC_QUEUED_CHUNKS = "microturn.engine.queued_chunks"  # gauge: chunks waiting for a step
METRIC_TASKS = "microturn.tasks"  # counter, by tool and outcome
METRIC_PROTOCOL_ERRORS = "microturn.protocol.errors"  # counter, by code
METRIC_REJECTED_SESSIONS = "microturn.sessions.rejected"  # counter, by reason
METRIC_LOOP_LAG = "microturn.loop.lag"  # histogram, ms: how late the event loop runs
ATTR_OUTCOME = "outcome"
ATTR_CODE = "code"
ATTR_REASON = "reason"


def build_tracer_provider(extra_processors: list[SpanProcessor] | None = None) -> TracerProvider:
    """A tracer provider built from the ``OTEL_*`` environment variables.

    The app takes its tracer from the provider it is given rather than from the
    process-global one, so tests can each use their own in-memory exporter
    (passed through ``extra_processors``). ``microturn serve`` also installs it
    globally for libraries that trace on their own.
    """
    provider = TracerProvider(resource=Resource.create({"service.name": _service_name()}))
    for name in _exporter_names():
        if name == "console":
            provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
        elif name == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        elif name != "none":
            raise ValueError(f"OTEL_TRACES_EXPORTER: unsupported exporter {name!r}")
    for processor in extra_processors or []:
        provider.add_span_processor(processor)
    return provider


def _service_name() -> str:
    return os.environ.get("OTEL_SERVICE_NAME", "microturn")


def _exporter_names() -> list[str]:
    raw = os.environ.get("OTEL_TRACES_EXPORTER", "none")
    return [name.strip() for name in raw.split(",") if name.strip()]
