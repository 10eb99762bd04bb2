"""Prometheus metrics of the ingress process (``GET /metrics``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

REQUESTS = Counter(
    "hark_requests", "HTTP requests answered", ["route", "status", "code"], registry=REGISTRY
)
AUDIO_SECONDS = Counter(
    "hark_audio_seconds", "Seconds of audio transcribed", registry=REGISTRY
)
REAL_TIME_FACTOR = Histogram(
    "hark_real_time_factor",
    "Processing time divided by audio duration, per transcription",
    buckets=(0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 5.0),
    registry=REGISTRY,
)
REQUEST_SECONDS = Histogram(
    "hark_request_seconds",
    "Wall time of POST /v1/listen",
    buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 60, 120, 300, 900),
    registry=REGISTRY,
)
IN_FLIGHT = Gauge("hark_requests_in_flight", "Transcriptions being processed", registry=REGISTRY)
