"""Metrics: OpenTelemetry instruments, exported Prometheus-style at ``/metrics``.

Each app gets its own registry, so several servers in one process (the tests)
do not mix their numbers.
"""

from __future__ import annotations

from collections.abc import Callable

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import Resource
from prometheus_client import CollectorRegistry, generate_latest

from server import telemetry as tm

STEP_BUCKETS_MS = (5, 10, 20, 40, 60, 80, 100, 120, 150, 200, 300, 500, 1000)


class Metrics:
    def __init__(self, active_sessions: Callable[[], int], queued_chunks: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        reader = PrometheusMetricReader(registry=self.registry)
        self.provider = MeterProvider(metric_readers=[reader], resource=Resource.create({"service.name": "microturn"}))
        meter = self.provider.get_meter(tm.TRACER_NAME)
        self.step_duration = meter.create_histogram(
            tm.METRIC_STEP_DURATION, unit="ms", description="model step duration",
            explicit_bucket_boundaries_advisory=STEP_BUCKETS_MS,
        )
        self.deadline_misses = meter.create_counter(tm.METRIC_DEADLINE_MISSES, description="steps over 200 ms")
        self.tasks = meter.create_counter(tm.METRIC_TASKS, description="background tasks finished")
        self.protocol_errors = meter.create_counter(tm.METRIC_PROTOCOL_ERRORS, description="refused client messages")
        self.rejected_sessions = meter.create_counter(tm.METRIC_REJECTED_SESSIONS, description="refused sessions")
        meter.create_observable_gauge(tm.METRIC_ACTIVE_SESSIONS, [_observe(active_sessions)],
                                      description="live sessions")
        meter.create_observable_gauge(tm.METRIC_QUEUED_CHUNKS, [_observe(queued_chunks)],
                                      description="input chunks waiting for a model step")

    def render(self) -> bytes:
        """The Prometheus text exposition of every instrument."""
        return generate_latest(self.registry)

    def shutdown(self) -> None:
        self.provider.shutdown()


def _observe(read: Callable[[], int]) -> Callable[[CallbackOptions], list[Observation]]:
    return lambda options: [Observation(read())]
