"""Prometheus metrics of the whole app, kept in the one Accounting replica (``GET /metrics``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("hark_requests", "HTTP requests answered", ["route", "status", "code"], registry=r)
        self.audio_seconds = Counter("hark_audio_seconds", "Seconds of audio transcribed", registry=r)
        self.real_time_factor = Histogram(
            "hark_real_time_factor",
            "Request wall time divided by audio duration, per transcription",
            buckets=(0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 5.0),
            registry=r,
        )
        self.request_seconds = Histogram(
            "hark_request_seconds",
            "Wall time of answered requests",
            ["route"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 60, 120, 300, 900),
            registry=r,
        )
        self.in_flight = Gauge("hark_requests_in_flight", "Admitted requests not yet answered (queue depth)", registry=r)
        self.job_leases_lost = Counter(
            "hark_job_leases_lost", "Job runs stopped uncharged because another runner took the job over",
            ["when"], registry=r,
        )
        self.rate_limited = Counter("hark_rate_limited", "Requests refused by a per-key limit", ["limit"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
