"""Async jobs: written durably before the 202, run with a renewed lease, results delivered by
signed webhooks with retries.

Jobs are claimed from the store with a lease that a heartbeat renews, so after a restart (or if
the runner dies) a job left running is claimed again once its lease runs out; a finished job is
never run again. Deliveries are retried from the store's state, so they survive restarts too.
The runner is framework-free: audio comes through an ``AudioSource``, transcription through the
``TranscriptionFlow``, quotas through a ``Meter`` per key (Serve handles in the service).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from standardwebhooks import Webhook

from pipeline.audio.urls import UrlGuard
from pipeline.core.errors import (
    HarkError,
    InvalidParameter,
    NotFound,
    ServiceUnavailable,
    WorkerLost,
    error_from_body,
)
from pipeline.core.settings import Settings
from pipeline.core.types import Audio
from pipeline.service.blobs import BlobStore, StoredAudio
from pipeline.service.job_request import JobRequest
from pipeline.service.jobs import DuplicateIdempotencyKey, Job, JobStore
from pipeline.service.limits import key_limits
from pipeline.service.webhooks import Attempt, backoff_s, deliver, webhook_signer
from pipeline.transcription.flow import Meter, TranscriptionFlow
from pipeline.transcription.schemas import ListenParams

logger = logging.getLogger(__name__)
POLL_S = 0.25
BUSY_RETRY_S = 5.0
# Runs of one job that ended with a worker dead before the job fails: audio that crashes the
# ASR replica must not crash it forever. Busy workers (queues full) do not use up runs.
MAX_RUN_ATTEMPTS = 5


# An upload no job needs is deleted once it is this old: far longer than any request takes from
# its upload to its decode, or to its job's creation.
ORPHAN_UPLOAD_S = 3600.0


class AudioSource(Protocol):
    """A job's audio: fetched from its URL, or its upload read from the blob store."""

    async def from_url(self, url: str) -> Audio: ...

    async def from_blob(self, url: str) -> Audio: ...


class LeaseLost(Exception):
    """Another runner holds the job now: this run must stop, and charge nothing."""


class _LeasedMeter:
    """A key's meter that charges a job's run only while the runner still holds its lease, so a
    job taken over by another runner is never charged twice."""

    def __init__(self, meter: Meter, holds_lease: Callable[[], Awaitable[bool]]) -> None:
        self._meter, self._holds_lease = meter, holds_lease

    async def reserve(self, duration_s: float) -> str:
        return await self._meter.reserve(duration_s)

    async def extend(self, reservation: str, duration_s: float) -> None:
        await self._meter.extend(reservation, duration_s)

    async def settle(self, reservation: str, duration_s: float) -> None:
        if not await self._holds_lease():
            await self._meter.cancel(reservation)
            raise LeaseLost("charge")
        await self._meter.settle(reservation, duration_s)

    async def cancel(self, reservation: str) -> None:
        await self._meter.cancel(reservation)


class JobRunner:
    def __init__(self, settings: Settings, store: JobStore, audio: AudioSource, flow: TranscriptionFlow,
                 meter_for: Callable[[str], Meter],
                 on_lease_lost: Callable[[str, str], Awaitable[None]] | None = None) -> None:
        self._settings = settings
        self._store = store
        self._blobs = BlobStore(settings.job_blob_url)
        self._audio = audio
        self._flow = flow
        self._meter_for = meter_for
        self._guard = UrlGuard.from_settings(settings.allow_private_urls, settings.url_allowlist)
        self._signers: dict[str, Webhook | None] = {}
        default_limits, per_key_limits = key_limits(settings)
        self._active_jobs_for = lambda key: per_key_limits.get(key, default_limits).active_jobs
        self._worker = f"runner-{uuid.uuid4().hex[:12]}"
        self._on_lease_lost = on_lease_lost
        # Store calls (claims, results, delivery polls), lease renewals and webhook DNS lookups each
        # have their own threads: however many receivers are slow, and however long the other store
        # calls take on a loaded machine, a renewal never waits behind them for its lease to run out
        # (another runner would then run the job again).
        self._db = ThreadPoolExecutor(max_workers=2, thread_name_prefix="hark-jobs-store")
        self._leases = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hark-jobs-lease")
        self._dns = ThreadPoolExecutor(max_workers=4, thread_name_prefix="hark-webhook-dns")
        self._delivering: set[str] = set()
        self._tasks: list[asyncio.Task] = []  # the run and delivery loops
        self._inflight: set[asyncio.Task] = set()  # job runs and webhook attempts under way
        self._stopping = False

    def start(self) -> None:
        """Start the run and delivery loops on the running event loop (once)."""
        if not self._tasks:
            loop = asyncio.get_running_loop()
            self._tasks = [loop.create_task(self._run_loop()), loop.create_task(self._delivery_loop())]

    async def stop(self, drain_s: float) -> None:
        """Stop claiming jobs and deliveries; give the runs and webhook attempts under way
        ``drain_s`` to finish, then hand the jobs still running back to the queue with their run
        uncounted, so that another runner takes them at once instead of after their lease (a
        replica's graceful shutdown: an upgrade, a downscale). A webhook attempt cut short is
        sent again by whichever runner takes its delivery next. A run that fails while the runner
        stops goes back to the queue too: the app may be going down around it (a whole-app upgrade
        or delete stops the ASR replicas as well)."""
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._inflight:
            inflight = len(self._inflight)
            _, late = await asyncio.wait(set(self._inflight), timeout=drain_s)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
            logger.info("job runner stopped: %d of %d runs and webhook attempts ended in the drain, %d cut short "
                        "(their jobs are back in the queue)", inflight - len(late), inflight, len(late))

    def _track(self, coro: Awaitable[None]) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)
        return task

    def check_health(self) -> None:
        self.start()
        for task in self._tasks:
            if task.done():
                raise RuntimeError(f"job loop stopped: {task.exception()!r}")

    def _signer_for(self, key_id: str) -> Webhook | None:
        """Each key's deliveries are signed with its own secret (else the global one)."""
        if key_id not in self._signers:
            secret = self._settings.webhook_secret_for(key_id)
            self._signers[key_id] = webhook_signer(secret.get_secret_value()) if secret is not None else None
        return self._signers[key_id]

    async def _call(self, fn: Callable, *args, **kwargs):
        """A store call on the store's own threads."""
        return await asyncio.get_running_loop().run_in_executor(self._db, functools.partial(fn, *args, **kwargs))

    # ---- API ------------------------------------------------------------------------------------

    async def submit(self, request: JobRequest) -> dict:
        """Write the job (and its uploaded audio) durably; return the API payload.

        A repeated ``Idempotency-Key`` (same key, same request, within 24 h) returns the job it
        made first; the same key with a different request is refused. An upload already in the
        blob store (``StoredAudio``) is the runner's from here: kept with the new job, or deleted.
        """
        kept = False
        try:
            payload, kept = await self._submit(request)
            return payload
        finally:
            if not kept and isinstance(request.audio, StoredAudio):
                await asyncio.shield(self._drop_audio({"audio_blob": request.audio.url}))

    async def _submit(self, request: JobRequest) -> tuple[dict, bool]:
        """The payload, and whether a new job keeps ``request``'s stored upload."""
        self.start()
        # Once, and off the event loop: it hashes the upload (up to max_file_mb).
        digest = await asyncio.to_thread(lambda: request.digest)
        if request.idempotency_key:
            if len(request.idempotency_key) > 255:
                raise InvalidParameter("Idempotency-Key is longer than 255 characters", param="Idempotency-Key")
            found = await self._call(self._store.find_idempotent, request.key_id, request.idempotency_key)
            if found is not None:
                job, stored_digest = found
                if stored_digest != digest:
                    raise InvalidParameter("This Idempotency-Key was used with a different request",
                                           param="Idempotency-Key")
                return job.payload(), False
        stored: dict = {"params": request.params.model_dump(mode="json")}
        # Durable before the 202, where every runner of the cluster can read it.
        if isinstance(request.audio, StoredAudio):
            await asyncio.to_thread(BlobStore.make_durable, request.audio.url)
            stored["audio_blob"] = request.audio.url
        elif request.audio is not None:
            stored["audio_blob"] = await asyncio.to_thread(self._blobs.put, request.audio)
        else:
            stored["url"] = request.url
        try:
            job = await self._call(
                self._store.create, request.key_id, stored, request.params.callback_url, request.idempotency_key, digest,
                self._active_jobs_for(request.key_id),
            )
        except HarkError:
            await self._drop_audio(stored)
            raise
        except DuplicateIdempotencyKey:
            # The same Idempotency-Key raced in twice: the first one's job is the answer.
            await self._drop_audio(stored)
            found = await self._call(self._store.find_idempotent, request.key_id, request.idempotency_key)
            if found is None:
                raise
            return found[0].payload(), False
        return job.payload(), True

    async def result(self, job_id: str, key_id: str) -> dict:
        """The job's result once it has ended, or its error raised (how a request that has an
        Idempotency-Key but no callback_url is answered)."""
        payload = await self.get(job_id, key_id)
        while payload["status"] == "processing":
            await asyncio.sleep(POLL_S)
            payload = await self.get(job_id, key_id)
        if payload["status"] == "failed":
            raise error_from_body(payload["error"])
        return payload["result"]

    async def sweep_uploads(self, older_than_s: float = ORPHAN_UPLOAD_S) -> list[str]:
        """Delete uploads that nothing will read: no queued or running job needs them, and they
        were last written over ``older_than_s`` ago. They are left by a replica that died: an
        ingress in the middle of a request (its upload is otherwise deleted once decoded), a runner
        between a job's end and the deletion of its audio. Returns what it deleted."""
        try:
            in_use = {url.rsplit("/", 1)[-1] for url in await self._call(self._store.uploads_in_use)}
            # Listed after the jobs were read: an upload of a job made since then is newer than the cut.
            old = await asyncio.to_thread(self._blobs.written_before, time.time() - older_than_s)
        except Exception:  # noqa: BLE001 - tried again at the next sweep
            logger.exception("looking for left-over uploads failed")
            return []
        orphans = [url for url in old if url.rsplit("/", 1)[-1] not in in_use]
        for url in orphans:
            await self._drop_audio({"audio_blob": url})
        if orphans:
            logger.info("deleted %d left-over uploads", len(orphans))
        return orphans

    async def _drop_audio(self, request: dict) -> None:
        """Delete a job's uploaded audio (it ran, or the job was never made)."""
        url = request.get("audio_blob") or request.get("audio_path")
        if url is not None:
            try:
                await asyncio.to_thread(BlobStore.delete, url)
            except Exception:  # noqa: BLE001 - a leftover upload is not worth failing a job for
                logger.exception("deleting %s failed", url)

    async def get(self, job_id: str, key_id: str) -> dict:
        job = await self._call(self._store.get, job_id)
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

    # ---- running jobs ---------------------------------------------------------------------------

    async def _run_loop(self) -> None:
        slots = asyncio.Semaphore(self._settings.jobs_concurrency)
        while True:
            await slots.acquire()
            claim = asyncio.ensure_future(self._call(self._store.claim, self._worker, self._settings.jobs_lease_s))
            try:
                job = await asyncio.shield(claim)
            except asyncio.CancelledError:
                # The runner stops (stop()) while a claim is in the store's hands: a job it took
                # goes straight back, or it would sit "running" until its lease ran out.
                with contextlib.suppress(Exception):
                    if (taken := await claim) is not None:
                        await self._call(self._store.requeue, taken.job_id, self._worker, 0.0, count_attempt=False)
                raise
            except Exception:
                logger.exception("claiming a job failed")
                job = None
            if job is None:
                slots.release()
                await asyncio.sleep(POLL_S)
                continue
            self._track(self._run(job)).add_done_callback(lambda _: slots.release())

    async def _heartbeat(self, job_id: str) -> None:
        """Renew the lease until it is lost (then return). A renewal that fails (the database away
        for a moment) is tried again at the next beat: the lease may well still hold, and the run
        goes on unless another runner has taken the job meanwhile."""
        while True:
            await asyncio.sleep(self._settings.jobs_lease_s / 3)
            try:
                if not await self._renew(job_id):
                    return
            except Exception:  # noqa: BLE001 - logged; the next beat tries again
                logger.warning("job %s: renewing its lease failed; trying again at the next beat", job_id,
                               exc_info=True)

    async def _renew(self, job_id: str) -> bool:
        return await asyncio.get_running_loop().run_in_executor(
            self._leases, self._store.renew, job_id, self._worker, self._settings.jobs_lease_s)

    async def _lease_lost(self, job: Job, when: str) -> None:
        logger.warning("job %s: lease lost %s; another runner holds it now, this run stops uncharged",
                       job.job_id, {"running": "while running", "charge": "before its charge",
                                    "finish": "at its finish"}.get(when, when))
        if self._on_lease_lost is not None:
            with contextlib.suppress(Exception):
                await self._on_lease_lost(job.job_id, when)

    async def _run(self, job: Job) -> None:
        work = asyncio.ensure_future(self._transcribe(job))
        heartbeat = asyncio.ensure_future(self._heartbeat(job.job_id))
        try:
            await asyncio.wait({work, heartbeat}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            # The runner stops: the job goes back to the queue now, uncharged, its run given back.
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await work
            await self._call(self._store.requeue, job.job_id, self._worker, 0.0, count_attempt=False)
            raise
        finally:
            heartbeat.cancel()
        if not work.done():  # the heartbeat ended: the lease is gone
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await work
            await self._lease_lost(job, "running")
            return
        try:
            result, error = work.result()
        except LeaseLost as lost:
            await self._lease_lost(job, str(lost))
            return
        except _Requeue as requeue:
            await self._call(self._store.requeue, job.job_id, self._worker, BUSY_RETRY_S,
                             count_attempt=requeue.count_attempt and not self._stopping)
            return
        if error is not None and self._stopping:
            await self._call(self._store.requeue, job.job_id, self._worker, 0.0, count_attempt=False)
            return
        if await self._call(self._store.finish, job.job_id, self._worker, result=result, error=error):
            await self._drop_audio(job.request)
        else:
            await self._lease_lost(job, "finish")

    async def _transcribe(self, job: Job) -> tuple[dict | None, dict | None]:
        """(result, error) of one run; raises ``_Requeue`` to give the job back untouched."""
        try:
            params = ListenParams.parse(job.request["params"])
            if "audio_blob" in job.request or "audio_path" in job.request:
                # audio_path: a job accepted before uploads went to the blob store.
                audio = await self._audio.from_blob(job.request.get("audio_blob") or job.request["audio_path"])
            else:
                audio = await self._audio.from_url(job.request["url"])
            started = time.perf_counter()
            meter = _LeasedMeter(self._meter_for(job.key_id), lambda: self._renew(job.job_id))
            outcome = await self._flow.run(audio, params, request_id=f"req_{uuid.uuid4().hex}", meter=meter)
            logger.info("job %s transcribed %.1f s in %.1f s", job.job_id, outcome.transcript.duration_s,
                        time.perf_counter() - started)
            return outcome.body, None
        except (asyncio.CancelledError, LeaseLost):
            raise
        except Exception as err:  # noqa: BLE001 - every failure is the job's outcome
            died = isinstance(err, WorkerLost)
            busy = isinstance(err, ServiceUnavailable) and not died
            if busy or (died and job.run_attempts < MAX_RUN_ATTEMPTS):
                # Busy, or a worker died: back to the queue, untouched; only deaths use up runs.
                if died:
                    logger.warning("job %s: a worker it needed died (run %d of at most %d); it goes back to the "
                                   "queue", job.job_id, job.run_attempts, MAX_RUN_ATTEMPTS)
                raise _Requeue(count_attempt=not busy) from None
            if died:
                err = ServiceUnavailable(f"The ASR worker died on this job {job.run_attempts} times")
            if not isinstance(err, HarkError):
                logger.exception("job %s failed unexpectedly", job.job_id, exc_info=err)
                err = HarkError("Internal error")
            return None, err.to_body()

    # ---- webhooks -------------------------------------------------------------------------------

    async def _delivery_loop(self) -> None:
        last_sweep = 0.0
        concurrency = self._settings.webhook_concurrency
        while True:
            if time.monotonic() - last_sweep > 600:
                # Idempotency keys older than 24 h may be used again.
                await self._call(self._store.forget_idempotency)
                await self.sweep_uploads()
                last_sweep = time.monotonic()
            free = concurrency - len(self._delivering)
            try:
                # Those in flight are still due: ask for enough to find `free` others.
                due = await self._call(self._store.due_deliveries, free + len(self._delivering)) if free > 0 else []
            except Exception:
                logger.exception("reading due deliveries failed")
                due = []
            for job in due:
                if job.job_id not in self._delivering and len(self._delivering) < concurrency:
                    self._delivering.add(job.job_id)
                    self._track(self._deliver(job)).add_done_callback(
                        lambda _, j=job.job_id: self._delivering.discard(j))
            await asyncio.sleep(POLL_S)

    async def _deliver(self, job: Job) -> None:
        s = self._settings
        # Other runners read the same due deliveries: the one that takes it sends this attempt.
        if not await self._call(self._store.claim_delivery, job.job_id, job.delivery_attempts, s.webhook_timeout_s + 30):
            return
        signer = self._signer_for(job.key_id)
        if signer is None:
            attempt = Attempt(False, retry=False, error="No webhook secret for this key: deliveries cannot be signed")
        else:
            try:
                attempt = await deliver(job.callback_url, job.payload(), job.webhook_id, signer, self._guard,
                                        s.webhook_timeout_s, resolver=self._dns)
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
        await self._call(
            self._store.delivery_result, job.job_id, delivered=attempt.delivered, status=attempt.status,
            error=attempt.error, next_at=next_at,
        )


class _Requeue(Exception):
    def __init__(self, count_attempt: bool) -> None:
        super().__init__()
        self.count_attempt = count_attempt
