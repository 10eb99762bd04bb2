"""Audio seconds charged per key and UTC day, kept in the job database, so that a restart of the
Accounting replica (or of the whole app) does not hand every key a fresh daily quota."""

from __future__ import annotations

import logging

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from pipeline.core.errors import ServiceUnavailable
from pipeline.service import db
from pipeline.service.db import audio_usage

logger = logging.getLogger(__name__)


class AudioUsageLedger:
    """What ``LimitBook`` reads when it first sees a key on a day, and adds to at every charge."""

    def __init__(self, url: str) -> None:
        self.engine = db.connect(url)
        self._write = db.writer(self.engine)
        db.migrate(self.engine)

    def charged(self, key_id: str, day: int) -> float:
        """Seconds charged to ``key_id`` on ``day`` (unix time // 86400); 503 while the database is
        unreachable (a quota that cannot be read is not enforced as zero)."""
        try:
            with self.engine.connect() as conn:
                found = conn.execute(
                    select(audio_usage.c.audio_s).where(audio_usage.c.key_id == key_id, audio_usage.c.day == day)
                ).scalar()
        except Exception as exc:  # noqa: BLE001 - any database failure is the same outage to a caller
            logger.exception("reading audio usage failed")
            raise ServiceUnavailable("The usage database is unreachable", retry_after=5) from exc
        return found or 0.0

    def charge(self, key_id: str, day: int, seconds: float) -> None:
        """Add ``seconds``. A failure is logged, not raised: the work was done and its answer must
        reach the caller; the replica's own count still holds the charge until it restarts."""
        insert = pg_insert if db.is_postgres(self.engine) else sqlite_insert
        stmt = insert(audio_usage).values(key_id=key_id, day=day, audio_s=seconds)
        stmt = stmt.on_conflict_do_update(
            index_elements=[audio_usage.c.key_id, audio_usage.c.day],
            set_={"audio_s": audio_usage.c.audio_s + stmt.excluded.audio_s},
        )
        try:
            with self._write.begin() as conn:
                conn.execute(stmt)
        except Exception:  # noqa: BLE001
            logger.exception("recording %.1f s of audio for %s failed", seconds, key_id)
