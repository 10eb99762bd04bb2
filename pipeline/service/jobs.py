"""Durable async jobs: a small store interface and its SQLite implementation.

A job row is written before the client gets its 202. Runners *claim* jobs with a lease they keep
renewing; a job whose lease ran out (its runner died, the app restarted) is claimed again. A job
that reached ``completed`` or ``failed`` is never run again. Webhook delivery state lives in the
same row, so pending deliveries survive restarts too.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pipeline.core.errors import RateLimited

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
    request: dict[str, Any]  # {"url" | "audio_path", "params": {...}}
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
    def due_deliveries(self, limit: int) -> list[Job]: ...
    def delivery_result(self, job_id: str, *, delivered: bool, status: int | None, error: str | None,
                        next_at: float | None) -> None: ...
    def counts(self) -> dict[str, int]: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    key_id TEXT NOT NULL,
    state TEXT NOT NULL,
    request_json TEXT NOT NULL,
    callback_url TEXT,
    result_json TEXT,
    error_json TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    run_attempts INTEGER NOT NULL DEFAULT 0,
    lease_owner TEXT,
    lease_expires_at REAL,
    not_before REAL NOT NULL DEFAULT 0,
    delivery_state TEXT NOT NULL,
    delivery_attempts INTEGER NOT NULL DEFAULT 0,
    delivery_next_at REAL,
    delivery_last_status INTEGER,
    delivery_last_error TEXT,
    idempotency_key TEXT,
    request_hash TEXT
);
CREATE INDEX IF NOT EXISTS jobs_runnable ON jobs (state, not_before, created_at);
CREATE INDEX IF NOT EXISTS jobs_key_state ON jobs (key_id, state);
CREATE INDEX IF NOT EXISTS jobs_delivery ON jobs (delivery_state, delivery_next_at);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_idempotency ON jobs (key_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
"""


class SqliteJobStore:
    """SQLite in WAL mode: several processes on one machine may share the file."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._clock = clock
        self._local = threading.local()
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA busy_timeout=30000")
            db.execute("PRAGMA synchronous=NORMAL")
            self._local.db = db
        return db

    def _tx(self):
        return _Transaction(self._connect())

    @staticmethod
    def _job(row: sqlite3.Row | None) -> Job | None:
        if row is None:
            return None
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
        running (0 = no limit). Counted and written in one transaction: concurrent submits of one
        key cannot overshoot."""
        now = self._clock()
        job_id = f"job_{uuid.uuid4().hex}"
        with self._tx() as db:
            if max_active:
                (active,) = db.execute(
                    "SELECT COUNT(*) FROM jobs WHERE key_id=? AND state IN (?,?)", (key_id, QUEUED, RUNNING)
                ).fetchone()
                if active >= max_active:
                    raise RateLimited(
                        f"Over {max_active} queued or running jobs for this key: wait for some to finish",
                        retry_after=5,
                    )
            if idempotency_key is not None:
                # Past its window the key is free again, whether or not the sweep has run.
                db.execute(
                    "UPDATE jobs SET idempotency_key=NULL WHERE key_id=? AND idempotency_key=? AND created_at<=?",
                    (key_id, idempotency_key, now - IDEMPOTENCY_WINDOW_S),
                )
            db.execute(
                "INSERT INTO jobs (job_id, key_id, state, request_json, callback_url, created_at, updated_at,"
                " delivery_state, idempotency_key, request_hash) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (job_id, key_id, QUEUED, json.dumps(request), callback_url, now, now,
                 NO_CALLBACK if callback_url is None else PENDING, idempotency_key, request_hash),
            )
        return self.get(job_id)

    def get(self, job_id: str) -> Job | None:
        return self._job(self._connect().execute("SELECT * FROM jobs WHERE job_id=?", (job_id,)).fetchone())

    def find_idempotent(self, key_id: str, idempotency_key: str) -> tuple[Job, str] | None:
        row = self._connect().execute(
            "SELECT * FROM jobs WHERE key_id=? AND idempotency_key=? AND created_at>?",
            (key_id, idempotency_key, self._clock() - IDEMPOTENCY_WINDOW_S),
        ).fetchone()
        return None if row is None else (self._job(row), row["request_hash"])

    def forget_idempotency(self, older_than_s: float = IDEMPOTENCY_WINDOW_S) -> None:
        with self._tx() as db:
            db.execute("UPDATE jobs SET idempotency_key=NULL WHERE created_at<?", (self._clock() - older_than_s,))

    def claim(self, worker: str, lease_s: float) -> Job | None:
        now = self._clock()
        with self._tx() as db:
            # Fair across keys: the runnable job of the key with the fewest jobs running now,
            # oldest first within a key. One key's thousand queued jobs do not starve the others.
            row = db.execute(
                "SELECT job_id FROM jobs AS j"
                " WHERE (j.state=? AND j.not_before<=?) OR (j.state=? AND j.lease_expires_at<?)"
                " ORDER BY (SELECT COUNT(*) FROM jobs AS r WHERE r.key_id=j.key_id AND r.state=?"
                "           AND r.lease_expires_at>=?), j.created_at, j.rowid LIMIT 1",
                (QUEUED, now, RUNNING, now, RUNNING, now),
            ).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE jobs SET state=?, lease_owner=?, lease_expires_at=?, run_attempts=run_attempts+1,"
                " updated_at=? WHERE job_id=?",
                (RUNNING, worker, now + lease_s, now, row["job_id"]),
            )
        return self.get(row["job_id"])

    def renew(self, job_id: str, worker: str, lease_s: float) -> bool:
        now = self._clock()
        with self._tx() as db:
            cur = db.execute(
                "UPDATE jobs SET lease_expires_at=?, updated_at=? WHERE job_id=? AND state=? AND lease_owner=?",
                (now + lease_s, now, job_id, RUNNING, worker),
            )
        return cur.rowcount == 1

    def finish(self, job_id: str, worker: str, *, result=None, error=None) -> bool:
        """Record the outcome, only if ``worker`` still holds the job (else someone took over)."""
        now = self._clock()
        state = COMPLETED if error is None else FAILED
        with self._tx() as db:
            cur = db.execute(
                "UPDATE jobs SET state=?, result_json=?, error_json=?, lease_owner=NULL, lease_expires_at=NULL,"
                " updated_at=?, delivery_next_at=CASE WHEN delivery_state=? THEN ? ELSE NULL END"
                " WHERE job_id=? AND state=? AND lease_owner=?",
                (state, json.dumps(result) if result is not None else None,
                 json.dumps(error) if error is not None else None, now, PENDING, now, job_id, RUNNING, worker),
            )
        return cur.rowcount == 1

    def requeue(self, job_id: str, worker: str, delay_s: float, count_attempt: bool = True) -> bool:
        """Back to the queue after ``delay_s``; ``count_attempt=False`` gives the run back (the
        workers were busy: no fault of the job's)."""
        now = self._clock()
        with self._tx() as db:
            cur = db.execute(
                "UPDATE jobs SET state=?, lease_owner=NULL, lease_expires_at=NULL, not_before=?, updated_at=?,"
                " run_attempts=run_attempts-? WHERE job_id=? AND state=? AND lease_owner=?",
                (QUEUED, now + delay_s, now, 0 if count_attempt else 1, job_id, RUNNING, worker),
            )
        return cur.rowcount == 1

    def due_deliveries(self, limit: int) -> list[Job]:
        rows = self._connect().execute(
            "SELECT * FROM jobs WHERE delivery_state=? AND state IN (?,?) AND delivery_next_at<=?"
            " ORDER BY delivery_next_at LIMIT ?",
            (PENDING, COMPLETED, FAILED, self._clock(), limit),
        ).fetchall()
        return [self._job(r) for r in rows]

    def delivery_result(self, job_id, *, delivered, status, error, next_at) -> None:
        state = DELIVERED if delivered else (PENDING if next_at is not None else DELIVERY_FAILED)
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET delivery_state=?, delivery_attempts=delivery_attempts+1, delivery_next_at=?,"
                " delivery_last_status=?, delivery_last_error=?, updated_at=? WHERE job_id=?",
                (state, next_at, status, error, self._clock(), job_id),
            )

    def counts(self) -> dict[str, int]:
        rows = self._connect().execute("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state").fetchall()
        return {r["state"]: r["n"] for r in rows}


class _Transaction:
    """BEGIN IMMEDIATE … COMMIT: one writer at a time, across processes."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> sqlite3.Connection:
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type, exc, tb) -> None:
        self.db.execute("COMMIT" if exc_type is None else "ROLLBACK")
