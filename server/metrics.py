"""Metrics: OpenTelemetry instruments, exported Prometheus-style at ``/metrics``.

Each app gets its own registry, so several servers in one process (the tests)
do not mix their numbers.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import Resource
from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest

from server import telemetry as tm

STEP_BUCKETS_MS = (5, 10, 20, 40, 60, 80, 100, 120, 150, 200, 300, 500, 1000)


class Metrics:
    def __init__(self, active_sessions: Callable[[], int], queued_chunks: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        # process_cpu_seconds_total, resident memory, open fds: what the load test
        # reads to report server CPU per session, and what leak checks watch.
        ProcessCollector(registry=self.registry)
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
        # Export the counters from the start (at zero) so dashboards and alerts see them.
        self.deadline_misses.add(0)
        self.rejected_sessions.add(0, {tm.ATTR_REASON: "at_capacity"})
        meter.create_observable_gauge(tm.METRIC_ACTIVE_SESSIONS, [_observe(active_sessions)],
                                      description="live sessions")
        meter.create_observable_gauge(tm.METRIC_QUEUED_CHUNKS, [_observe(queued_chunks)],
                                      description="input chunks waiting for a model step")

        self.loop_lag = meter.create_histogram(
            tm.METRIC_LOOP_LAG, unit="ms", description="how late the event loop wakes a 50 ms sleep",
            explicit_bucket_boundaries_advisory=(1, 2, 5, 10, 20, 50, 100, 200, 500),
        )
        self.recent_loop_lag_ms: deque[float] = deque(maxlen=200)  # the last 10 s

    async def watch_loop_lag(self, period_s: float = 0.05) -> None:
        """Runs on the event loop for the server's life: a blocked loop shows up here."""
        while True:
            started = time.monotonic()  # not loop.time(): uvloop's is in whole milliseconds
            await asyncio.sleep(period_s)
            lag_ms = max(0.0, (time.monotonic() - started - period_s) * 1000)
            self.loop_lag.record(lag_ms)
            self.recent_loop_lag_ms.append(lag_ms)

    def loop_lag_summary(self) -> dict[str, float]:
        lags = sorted(self.recent_loop_lag_ms)
        if not lags:
            return {}
        return {"p50": round(lags[len(lags) // 2], 2), "p99": round(lags[min(len(lags) - 1, int(len(lags) * 0.99))], 2),
                "max": round(lags[-1], 2), "samples": len(lags)}

    def render(self) -> bytes:
        """The Prometheus text exposition of every instrument."""
        return generate_latest(self.registry)

    def shutdown(self) -> None:
        self.provider.shutdown()


def _observe(read: Callable[[], int]) -> Callable[[CallbackOptions], list[Observation]]:
    return lambda options: [Observation(read())]
