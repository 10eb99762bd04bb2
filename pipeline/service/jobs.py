"""Durable async jobs: a small store interface and its SQL implementation (SQLite or PostgreSQL).

A job row is written before the client gets its 202. Runners *claim* jobs with a lease they keep
renewing; a job whose lease ran out (its runner died, the app restarted) is claimed again. A job
that reached ``completed`` or ``failed`` is never run again. Webhook delivery state lives in the
same row, so pending deliveries survive restarts too.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy import and_, case, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError

from pipeline.core.errors import RateLimited
from pipeline.service import db
from pipeline.service.db import jobs

# Internal states; the API shows queued and running as "processing".
QUEUED, RUNNING, COMPLETED, FAILED = "queued", "running", "completed", "failed"
# Delivery states.
NO_CALLBACK, PENDING, DELIVERED, DELIVERY_FAILED = "none", "pending", "delivered", "failed"
IDEMPOTENCY_WINDOW_S = 24 * 3600


@dataclass(frozen=True)
class Job:
    job_id: str
    key_id: str
    state: str
    request: dict[str, Any]  # {"url" | "audio_blob", "params": {...}}
    callback_url: str | None
    result: dict[str, Any] | None
    error: dict[str, Any] | None
    created_at: float
    run_attempts: int
    delivery_state: str
    delivery_attempts: int
    delivery_next_at: float | None
    delivery_last_status: int | None
    delivery_last_error: str | None

    @property
    def api_status(self) -> str:
        return {QUEUED: "processing", RUNNING: "processing"}.get(self.state, self.state)

    @property
    def webhook_id(self) -> str:
        # Stable across retries, so receivers can de-duplicate.
        return f"msg_{self.job_id}"

    def payload(self) -> dict[str, Any]:
        """The object of ``API.md``: what ``GET /v1/jobs/{id}`` returns and the webhook carries."""
        body: dict[str, Any] = {"job_id": self.job_id, "status": self.api_status}
        if self.state == COMPLETED:
            body["result"] = self.result
        elif self.state == FAILED:
            body["error"] = self.error
        return body


class JobStore(Protocol):
    def create(self, key_id: str, request: dict, callback_url: str | None,
               idempotency_key: str | None = None, request_hash: str | None = None, max_active: int = 0) -> Job: ...
    def get(self, job_id: str) -> Job | None: ...
    def find_idempotent(self, key_id: str, idempotency_key: str) -> tuple[Job, str] | None: ...
    def claim(self, worker: str, lease_s: float) -> Job | None: ...
    def renew(self, job_id: str, worker: str, lease_s: float) -> bool: ...
    def finish(self, job_id: str, worker: str, *, result: dict | None = None, error: dict | None = None) -> bool: ...
    def requeue(self, job_id: str, worker: str, delay_s: float, count_attempt: bool = True) -> bool: ...
    def forget_idempotency(self, older_than_s: float = IDEMPOTENCY_WINDOW_S) -> None: ...
    def uploads_in_use(self) -> set[str]: ...
    def due_deliveries(self, limit: int) -> list[Job]: ...
    def claim_delivery(self, job_id: str, attempts_seen: int, hold_s: float) -> bool: ...
    def delivery_result(self, job_id: str, *, delivered: bool, status: int | None, error: str | None,
                        next_at: float | None) -> None: ...
    def counts(self) -> dict[str, int]: ...


class DuplicateIdempotencyKey(Exception):
    """Another request of the same key made a job with this ``Idempotency-Key`` at the same time."""


class SqlJobStore:
    """The job store on SQLAlchemy Core: SQLite for one machine (several processes may share the
    file), PostgreSQL for a cluster, where claims take ``FOR UPDATE SKIP LOCKED`` so that any
    number of runners on any nodes claim each job exactly once. The schema is migrated to the
    current version (Alembic) when the store opens."""

    def __init__(self, url: str, clock: Callable[[], float] = time.time) -> None:
        self.engine = db.connect(url)
        self._write = db.writer(self.engine)
        self._postgres = db.is_postgres(self.engine)
        self._clock = clock
        db.migrate(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    @staticmethod
    def _job(row) -> Job | None:
        if row is None:
            return None
        row = row._mapping
        return Job(
            job_id=row["job_id"], key_id=row["key_id"], state=row["state"],
            request=json.loads(row["request_json"]), callback_url=row["callback_url"],
            result=json.loads(row["result_json"]) if row["result_json"] else None,
            error=json.loads(row["error_json"]) if row["error_json"] else None,
            created_at=row["created_at"], run_attempts=row["run_attempts"],
            delivery_state=row["delivery_state"], delivery_attempts=row["delivery_attempts"],
            delivery_next_at=row["delivery_next_at"], delivery_last_status=row["delivery_last_status"],
            delivery_last_error=row["delivery_last_error"],
        )

    def create(self, key_id, request, callback_url, idempotency_key=None, request_hash=None, max_active=0) -> Job:
        """A queued job; ``RATE_LIMITED`` if ``key_id`` already has ``max_active`` jobs queued or
        running (0 = no limit). Counted and written in one transaction, serialised per key: concurrent
        submits of one key cannot overshoot. ``DuplicateIdempotencyKey`` if the same key's
        ``idempotency_key`` raced in from another request."""
        now = self._clock()
        job_id = f"job_{uuid.uuid4().hex}"
        try:
            with self._write.begin() as conn:
                if max_active:
                    db.advisory_lock(conn, f"jobs:{key_id}")
                    active = conn.execute(
                        select(func.count()).select_from(jobs)
                        .where(jobs.c.key_id == key_id, jobs.c.state.in_((QUEUED, RUNNING)))
                    ).scalar_one()
                    if active >= max_active:
                        raise RateLimited(
                            f"Over {max_active} queued or running jobs for this key: wait for some to finish",
                            retry_after=5,
                        )
                if idempotency_key is not None:
                    # Past its window the key is free again, whether or not the sweep has run.
                    conn.execute(
                        update(jobs).values(idempotency_key=None).where(
                            jobs.c.key_id == key_id, jobs.c.idempotency_key == idempotency_key,
                            jobs.c.created_at <= now - IDEMPOTENCY_WINDOW_S,
                        )
                    )
                conn.execute(insert(jobs).values(
                    job_id=job_id, key_id=key_id, state=QUEUED, request_json=json.dumps(request),
                    callback_url=callback_url, created_at=now, updated_at=now,
                    delivery_state=NO_CALLBACK if callback_url is None else PENDING,
                    idempotency_key=idempotency_key, request_hash=request_hash,
                ))
        except IntegrityError:
            if idempotency_key is None:
                raise
            raise DuplicateIdempotencyKey(idempotency_key) from None
        return self.get(job_id)

    def get(self, job_id: str) -> Job | None:
        with self.engine.connect() as conn:
            return self._job(conn.execute(select(jobs).where(jobs.c.job_id == job_id)).first())

    def find_idempotent(self, key_id: str, idempotency_key: str) -> tuple[Job, str] | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(jobs).where(
                jobs.c.key_id == key_id, jobs.c.idempotency_key == idempotency_key,
                jobs.c.created_at > self._clock() - IDEMPOTENCY_WINDOW_S,
            )).first()
        return None if row is None else (self._job(row), row.request_hash)

    def forget_idempotency(self, older_than_s: float = IDEMPOTENCY_WINDOW_S) -> None:
        with self._write.begin() as conn:
            conn.execute(update(jobs).values(idempotency_key=None).where(
                jobs.c.idempotency_key.isnot(None), jobs.c.created_at < self._clock() - older_than_s))

    def uploads_in_use(self) -> set[str]:
        """The uploaded audio that queued and running jobs still need (their ``audio_blob``)."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(jobs.c.request_json).where(jobs.c.state.in_((QUEUED, RUNNING)))).scalars()
            requests = [json.loads(raw) for raw in rows]
        return {url for request in requests if (url := request.get("audio_blob") or request.get("audio_path"))}

    def claim(self, worker: str, lease_s: float) -> Job | None:
        now = self._clock()
        runs = jobs.alias("runs")
        # Fair across keys: the runnable job of the key with the fewest jobs running now,
        # oldest first within a key. One key's thousand queued jobs do not starve the others.
        running_now = (
            select(func.count()).select_from(runs)
            .where(runs.c.key_id == jobs.c.key_id, runs.c.state == RUNNING, runs.c.lease_expires_at >= now)
            .scalar_subquery()
        )
        pick = (
            select(jobs.c.job_id)
            .where(or_(and_(jobs.c.state == QUEUED, jobs.c.not_before <= now),
                       and_(jobs.c.state == RUNNING, jobs.c.lease_expires_at < now)))
            .order_by(running_now, jobs.c.created_at, jobs.c.seq)
            .limit(1)
        )
        if self._postgres:
            # Rows another runner is claiming right now are skipped, not waited for; a row whose
            # claim committed meanwhile is re-checked against the WHERE above (no double claim).
            pick = pick.with_for_update(skip_locked=True, of=jobs)
        with self._write.begin() as conn:
            job_id = conn.execute(pick).scalar()
            if job_id is None:
                return None
            conn.execute(update(jobs).where(jobs.c.job_id == job_id).values(
                state=RUNNING, lease_owner=worker, lease_expires_at=now + lease_s,
                run_attempts=jobs.c.run_attempts + 1, updated_at=now,
            ))
        return self.get(job_id)

    def _held(self, job_id: str, worker: str):
        return (jobs.c.job_id == job_id, jobs.c.state == RUNNING, jobs.c.lease_owner == worker)

    def renew(self, job_id: str, worker: str, lease_s: float) -> bool:
        now = self._clock()
        with self._write.begin() as conn:
            done = conn.execute(update(jobs).where(*self._held(job_id, worker))
                                .values(lease_expires_at=now + lease_s, updated_at=now))
        return done.rowcount == 1

    def finish(self, job_id: str, worker: str, *, result=None, error=None) -> bool:
        """Record the outcome, only if ``worker`` still holds the job (else someone took over)."""
        now = self._clock()
        with self._write.begin() as conn:
            done = conn.execute(update(jobs).where(*self._held(job_id, worker)).values(
                state=COMPLETED if error is None else FAILED,
                result_json=json.dumps(result) if result is not None else None,
                error_json=json.dumps(error) if error is not None else None,
                lease_owner=None, lease_expires_at=None, updated_at=now,
                delivery_next_at=case((jobs.c.delivery_state == PENDING, now), else_=None),
            ))
        return done.rowcount == 1

    def requeue(self, job_id: str, worker: str, delay_s: float, count_attempt: bool = True) -> bool:
        """Back to the queue after ``delay_s``; ``count_attempt=False`` gives the run back (the
        workers were busy: no fault of the job's)."""
        now = self._clock()
        with self._write.begin() as conn:
            done = conn.execute(update(jobs).where(*self._held(job_id, worker)).values(
                state=QUEUED, lease_owner=None, lease_expires_at=None, not_before=now + delay_s, updated_at=now,
                run_attempts=jobs.c.run_attempts - (0 if count_attempt else 1),
            ))
        return done.rowcount == 1

    def due_deliveries(self, limit: int) -> list[Job]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(jobs).where(jobs.c.delivery_state == PENDING, jobs.c.state.in_((COMPLETED, FAILED)),
                                   jobs.c.delivery_next_at <= self._clock())
                .order_by(jobs.c.delivery_next_at).limit(limit)
            ).all()
        return [self._job(r) for r in rows]

    def claim_delivery(self, job_id: str, attempts_seen: int, hold_s: float) -> bool:
        """Take the delivery of ``job_id`` for ``hold_s`` (if no other runner took it since its
        ``delivery_attempts`` was ``attempts_seen``): several runners share the store, and one
        webhook attempt must go out once."""
        now = self._clock()
        with self._write.begin() as conn:
            done = conn.execute(update(jobs).where(
                jobs.c.job_id == job_id, jobs.c.delivery_state == PENDING,
                jobs.c.delivery_attempts == attempts_seen, jobs.c.delivery_next_at <= now,
            ).values(delivery_next_at=now + hold_s))
        return done.rowcount == 1

    def delivery_result(self, job_id, *, delivered, status, error, next_at) -> None:
        state = DELIVERED if delivered else (PENDING if next_at is not None else DELIVERY_FAILED)
        with self._write.begin() as conn:
            conn.execute(update(jobs).where(jobs.c.job_id == job_id).values(
                delivery_state=state, delivery_attempts=jobs.c.delivery_attempts + 1, delivery_next_at=next_at,
                delivery_last_status=status, delivery_last_error=error, updated_at=self._clock(),
            ))

    def counts(self) -> dict[str, int]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(jobs.c.state, func.count()).group_by(jobs.c.state)).all()
        return {state: n for state, n in rows}


def open_job_store(settings) -> SqlJobStore:
    """The store ``settings`` name: ``database_url``, else SQLite in ``data_dir``."""
    return SqlJobStore(settings.job_database_url)
