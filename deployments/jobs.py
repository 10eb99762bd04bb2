"""Jobs deployment: owns the durable job store, runs jobs and delivers their webhooks.

One replica. Jobs are claimed from the store with a renewed lease, so after a restart (or if this
replica dies) a job left running is claimed again once its lease runs out; a finished job is never
run again. Deliveries are retried from the store's state, so they survive restarts too.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
import uuid
from pathlib import Path

from ray import serve

from deployments import replica_info
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from deployments.compose import Composer
from pipeline.core.errors import HarkError, NotFound, ServiceUnavailable
from pipeline.audio.fetch import UrlGuard
from pipeline.service.jobs import Job, SqliteJobStore
from pipeline.transcription.schemas import ListenParams
from pipeline.core.settings import Settings
from pipeline.service.webhooks import Attempt, backoff_s, deliver, webhook_signer

logger = logging.getLogger("ray.serve")
POLL_S = 0.25
BUSY_RETRY_S = 5.0
# Runs of one job that ended with a worker dead before the job fails: audio that crashes the
# ASR replica must not crash it forever. Busy workers (queues full) do not use up runs.
MAX_RUN_ATTEMPTS = 5


@serve.deployment(
    name="Jobs",
    num_replicas=1,
    max_ongoing_requests=1000,
    ray_actor_options={"num_cpus": 0.05},
)
class JobsDeployment:
    def __init__(
        self,
        settings: Settings,
        fetch: DeploymentHandle,
        asr: DeploymentHandle,
        diarization: DeploymentHandle,
        accounting: DeploymentHandle,
    ) -> None:
        self._settings = settings
        self._store = SqliteJobStore(settings.data_dir / "jobs.sqlite3")
        self._audio_dir = settings.data_dir / "audio"
        self._audio_dir.mkdir(parents=True, exist_ok=True)
        self._fetch = fetch
        self._composer = Composer(asr, diarization, accounting)
        self._guard = UrlGuard.from_settings(settings.allow_private_urls, settings.url_allowlist)
        self._signer = webhook_signer(settings.webhook_secret) if settings.webhook_secret else None
        self._worker = f"runner-{uuid.uuid4().hex[:12]}"
        self._delivering: set[str] = set()
        self._tasks: list[asyncio.Task] = []

    def _ensure_loops(self) -> None:
        # Started from the first call or health check, on the replica's event loop.
        if not self._tasks:
            loop = asyncio.get_running_loop()
            self._tasks = [loop.create_task(self._run_loop()), loop.create_task(self._delivery_loop())]

    async def check_health(self) -> None:
        self._ensure_loops()
        for task in self._tasks:
            if task.done():
                raise RuntimeError(f"job loop stopped: {task.exception()!r}")

    # ---- API ------------------------------------------------------------------------------------

    async def submit(self, key_id: str, params: dict, url: str | None, audio: bytes | None,
                     callback_url: str | None, idempotency_key: str | None = None,
                     request_hash: str | None = None) -> dict:
        """Write the job (and its uploaded audio) durably; return the API payload."""
        self._ensure_loops()
        request: dict = {"params": params}
        if audio is not None:
            path = self._audio_dir / f"upload-{uuid.uuid4().hex}.bin"
            await asyncio.to_thread(_write_durably, path, audio)
            request["audio_path"] = str(path)
        else:
            request["url"] = url
        try:
            job = await asyncio.to_thread(
                self._store.create, key_id, request, callback_url, idempotency_key, request_hash
            )
        except sqlite3.IntegrityError:
            # The same Idempotency-Key raced in twice: the first one's job is the answer.
            if "audio_path" in request:
                Path(request["audio_path"]).unlink(missing_ok=True)
            found = await asyncio.to_thread(self._store.find_idempotent, key_id, idempotency_key)
            if found is None:
                raise
            job = found[0]
        return job.payload()

    async def find_idempotent(self, key_id: str, idempotency_key: str) -> tuple[dict, str] | None:
        found = await asyncio.to_thread(self._store.find_idempotent, key_id, idempotency_key)
        return None if found is None else (found[0].payload(), found[1])

    async def get(self, job_id: str, key_id: str) -> dict:
        job = await asyncio.to_thread(self._store.get, job_id)
        if job is None or job.key_id != key_id:  # another key's job does not exist for you
            raise NotFound(f"No job {job_id!r}")
        body = job.payload()
        if job.callback_url is not None:
            body["delivery"] = {
                "state": job.delivery_state,
                "attempts": job.delivery_attempts,
                "last_status": job.delivery_last_status,
                "last_error": job.delivery_last_error,
            }
        return body

    def describe(self) -> dict:
        return replica_info(self._settings)


    # ---- running jobs ---------------------------------------------------------------------------

    async def _run_loop(self) -> None:
        slots = asyncio.Semaphore(self._settings.jobs_concurrency)
        while True:
            await slots.acquire()
            try:
                job = await asyncio.to_thread(self._store.claim, self._worker, self._settings.jobs_lease_s)
            except Exception:
                logger.exception("claiming a job failed")
                job = None
            if job is None:
                slots.release()
                await asyncio.sleep(POLL_S)
                continue
            task = asyncio.get_running_loop().create_task(self._run(job))
            task.add_done_callback(lambda _: slots.release())

    async def _heartbeat(self, job_id: str) -> None:
        while True:
            await asyncio.sleep(self._settings.jobs_lease_s / 3)
            if not await asyncio.to_thread(self._store.renew, job_id, self._worker, self._settings.jobs_lease_s):
                return

    async def _run(self, job: Job) -> None:
        heartbeat = asyncio.get_running_loop().create_task(self._heartbeat(job.job_id))
        outcome: dict = {}
        try:
            params = ListenParams.parse(job.request["params"])
            if "audio_path" in job.request:
                data = await asyncio.to_thread(Path(job.request["audio_path"]).read_bytes)
                audio = await self._fetch.from_bytes.remote(data)
            else:
                audio = await self._fetch.from_url.remote(job.request["url"])
            started = time.perf_counter()
            transcript, outcome["result"] = await self._composer.transcribe(
                audio, params, job.key_id, f"req_{uuid.uuid4().hex}"
            )
            logger.info("job %s transcribed %.1f s in %.1f s", job.job_id, transcript.duration_s, time.perf_counter() - started)
        except BaseException as exc:  # noqa: BLE001
            if isinstance(exc, asyncio.CancelledError):
                raise
            err = exc.cause if isinstance(exc, RayTaskError) and isinstance(exc.cause, BaseException) else exc
            busy = isinstance(err, (BackPressureError, ServiceUnavailable))
            if busy or (isinstance(err, RayActorError) and job.run_attempts < MAX_RUN_ATTEMPTS):
                # Busy, or a worker died: back to the queue, untouched; only deaths use up runs.
                heartbeat.cancel()
                await asyncio.to_thread(
                    self._store.requeue, job.job_id, self._worker, BUSY_RETRY_S, count_attempt=not busy
                )
                return
            if isinstance(err, RayActorError):
                err = ServiceUnavailable(f"The ASR worker died on this job {job.run_attempts} times")
            if not isinstance(err, HarkError):
                logger.exception("job %s failed unexpectedly", job.job_id, exc_info=err)
                err = HarkError("Internal error")
            outcome["error"] = err.to_body()
        finally:
            heartbeat.cancel()
        if await asyncio.to_thread(self._store.finish, job.job_id, self._worker, **outcome):
            if "audio_path" in job.request:
                Path(job.request["audio_path"]).unlink(missing_ok=True)

    # ---- webhooks -------------------------------------------------------------------------------

    async def _delivery_loop(self) -> None:
        last_sweep = 0.0
        while True:
            if time.monotonic() - last_sweep > 600:
                # Idempotency keys older than 24 h may be used again.
                await asyncio.to_thread(self._store.forget_idempotency)
                last_sweep = time.monotonic()
            try:
                due = await asyncio.to_thread(self._store.due_deliveries, 32)
            except Exception:
                logger.exception("reading due deliveries failed")
                due = []
            for job in due:
                if job.job_id not in self._delivering:
                    self._delivering.add(job.job_id)
                    task = asyncio.get_running_loop().create_task(self._deliver(job))
                    task.add_done_callback(lambda _, j=job.job_id: self._delivering.discard(j))
            await asyncio.sleep(POLL_S)

    async def _deliver(self, job: Job) -> None:
        s = self._settings
        if self._signer is None:
            attempt = Attempt(False, retry=False, error="HARK_WEBHOOK_SECRET is not set: deliveries cannot be signed")
        else:
            try:
                attempt = await asyncio.to_thread(
                    deliver, job.callback_url, job.payload(), job.webhook_id, self._signer, self._guard,
                    s.webhook_timeout_s,
                )
            except Exception as exc:  # noqa: BLE001 - a bug here must not re-send every 0.25 s
                logger.exception("webhook delivery for %s raised", job.job_id)
                attempt = Attempt(False, retry=True, error=f"{type(exc).__name__}: {exc}")
        attempts_made = job.delivery_attempts + 1
        next_at = None
        if not attempt.delivered and attempt.retry and attempts_made < s.webhook_max_attempts:
            wait = backoff_s(attempts_made, s.webhook_backoff_base_s, s.webhook_backoff_max_s)
            if attempt.retry_after_s is not None:
                wait = max(wait, min(attempt.retry_after_s, s.webhook_backoff_max_s))
            next_at = time.time() + wait
        if not attempt.delivered:
            logger.info("webhook for %s: attempt %d failed (%s)", job.job_id, attempts_made, attempt.error)
        await asyncio.to_thread(
            self._store.delivery_result, job.job_id, delivered=attempt.delivered, status=attempt.status,
            error=attempt.error, next_at=next_at,
        )


def _write_durably(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        import os

        os.fsync(f.fileno())
    tmp.rename(path)
