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


class AsrMetrics:
    """The ASR replica's scheduler: a ``SchedulerObserver`` on its own registry (``GET /metrics``
    appends it to the app's)."""

    def __init__(self, replica: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r, labels = self.registry, ["replica"]
        self._replica = replica
        self.windows_queued = Gauge("hark_asr_windows_queued", "Windows waiting for a decoding step", labels, registry=r)
        self.batch_windows = Histogram(
            "hark_asr_batch_windows", "Windows decoded in one step", labels,
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32, 64), registry=r,
        )
        self.batch_audio_seconds = Counter("hark_asr_audio_seconds_decoded", "Audio seconds decoded", labels, registry=r)
        self.queue_seconds = Histogram(
            "hark_asr_queue_seconds", "Time from a request's arrival to its first window's step", labels,
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300), registry=r,
        )
        self.real_time_factor = Histogram(
            "hark_asr_real_time_factor", "Time in the ASR replica divided by audio duration, per request", labels,
            buckets=(0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 5.0), registry=r,
        )

    def step(self, windows: int, audio_s: float, queued_windows: int) -> None:
        self.windows_queued.labels(self._replica).set(queued_windows - windows)
        self.batch_windows.labels(self._replica).observe(windows)
        self.batch_audio_seconds.labels(self._replica).inc(audio_s)

    def queued(self, wait_s: float) -> None:
        self.queue_seconds.labels(self._replica).observe(wait_s)

    def answered(self, audio_s: float, elapsed_s: float) -> None:
        if audio_s > 0:
            self.real_time_factor.labels(self._replica).observe(elapsed_s / audio_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)
