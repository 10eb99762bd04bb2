"""Accounting deployment: the one place that holds per-key limits and the app's metrics.

Exactly one replica (the builder refuses more), so every ingress replica sees the same counts.
Its methods are coroutines: they run one at a time on the replica's event loop, so the book needs
no lock. The audio charged per key and day is also written to the job database and read back
after a restart; the rolling minute and in-flight slots are in memory and start afresh.
"""

from __future__ import annotations

from ray import serve

from deployments import replica_info

from deployments.metrics import ServiceMetrics
from pipeline.core.errors import HarkError
from pipeline.service.limits import Lease, book_from_settings
from pipeline.service.usage import AudioUsageLedger
from pipeline.core.settings import Settings


@serve.deployment(
    name="Accounting",
    num_replicas=1,
    max_ongoing_requests=1000,
    ray_actor_options={"num_cpus": 0.05},
)
class AccountingDeployment:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._book = book_from_settings(settings, usage=AudioUsageLedger(settings.job_database_url))
        self._metrics = ServiceMetrics()
        self._metrics.in_flight.set_function(self._book.in_flight)
        self._refusals_seen = dict(self._book.refusals)

    def _count_refusals(self) -> None:
        for limit, count in self._book.refusals.items():
            if count > self._refusals_seen[limit]:
                self._metrics.rate_limited.labels(limit).inc(count - self._refusals_seen[limit])
                self._refusals_seen[limit] = count

    async def admit(self, key_id: str) -> Lease:
        try:
            lease = self._book.admit(key_id)
        except HarkError:
            self._count_refusals()
            raise
        return lease

    async def reserve_audio(self, key_id: str, seconds: float) -> str:
        try:
            return self._book.reserve_audio(key_id, seconds)
        except HarkError:
            self._count_refusals()
            raise

    async def extend_audio(self, key_id: str, reservation_id: str, seconds: float) -> None:
        try:
            self._book.extend_audio(key_id, reservation_id, seconds)
        except HarkError:
            self._count_refusals()
            raise

    async def settle_audio(self, key_id: str, reservation_id: str, seconds: float) -> None:
        self._book.settle_audio(key_id, reservation_id, seconds)
        self._metrics.audio_seconds.inc(seconds)

    async def cancel_audio(self, key_id: str, reservation_id: str) -> None:
        self._book.cancel_audio(key_id, reservation_id)

    async def release(self, lease_id: str, key_id: str) -> None:
        self._book.release(lease_id, key_id)

    async def job_lease_lost(self, when: str) -> None:
        self._metrics.job_leases_lost.labels(when).inc()

    async def record(self, route: str, status: int, code: str, elapsed_s: float, audio_s: float) -> None:
        self._metrics.requests.labels(route, str(status), code).inc()
        self._metrics.request_seconds.labels(route).observe(elapsed_s)
        if audio_s > 0:
            self._metrics.real_time_factor.observe(elapsed_s / audio_s)

    async def metrics_text(self) -> bytes:
        return self._metrics.render()

    def describe(self) -> dict:
        return replica_info(self._settings)
