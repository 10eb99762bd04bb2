"""The service's database: the job store's tables, engines for SQLite and PostgreSQL, and the
Alembic migrations that bring a database to the current schema when a replica starts.

SQLite (a file under ``data_dir``) is the embedded default for one machine; PostgreSQL
(``postgresql+psycopg://…``) is for clusters, where any number of job runners on any nodes share
one store. Everything above this module speaks SQLAlchemy Core, the same on both.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from sqlalchemy import (
    BigInteger,
    Column,
    Engine,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    make_url,
    text,
)
from sqlalchemy.engine import URL

metadata = MetaData()

# One row per async job, from its 202 to its last webhook attempt. ``seq`` orders jobs created in
# the same instant (the claim order within a key); the JSON columns hold what the client asked
# for and what came of it.
jobs = Table(
    "jobs",
    metadata,
    Column("seq", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("job_id", String(64), nullable=False, unique=True),
    Column("key_id", String(64), nullable=False),
    Column("state", String(16), nullable=False),
    Column("request_json", Text, nullable=False),
    Column("callback_url", Text),
    Column("result_json", Text),
    Column("error_json", Text),
    Column("created_at", Float(53), nullable=False),
    Column("updated_at", Float(53), nullable=False),
    Column("run_attempts", Integer, nullable=False, server_default="0"),
    Column("lease_owner", String(64)),
    Column("lease_expires_at", Float(53)),
    Column("not_before", Float(53), nullable=False, server_default="0"),
    Column("delivery_state", String(16), nullable=False),
    Column("delivery_attempts", Integer, nullable=False, server_default="0"),
    Column("delivery_next_at", Float(53)),
    Column("delivery_last_status", Integer),
    Column("delivery_last_error", Text),
    Column("idempotency_key", String(255)),
    Column("request_hash", String(64)),
)
Index("jobs_runnable", jobs.c.state, jobs.c.not_before, jobs.c.created_at)
Index("jobs_key_state", jobs.c.key_id, jobs.c.state)
Index("jobs_delivery", jobs.c.delivery_state, jobs.c.delivery_next_at)
Index(
    "jobs_idempotency", jobs.c.key_id, jobs.c.idempotency_key, unique=True,
    sqlite_where=jobs.c.idempotency_key.isnot(None), postgresql_where=jobs.c.idempotency_key.isnot(None),
)

# Audio seconds charged per key and UTC day (day = unix time // 86400): the daily quota survives
# a restart of the Accounting replica.
audio_usage = Table(
    "audio_usage",
    metadata,
    Column("key_id", String(64), primary_key=True),
    Column("day", Integer, primary_key=True),
    Column("audio_s", Float(53), nullable=False),
)

_MIGRATIONS = Path(__file__).with_name("migrations")
# pg_advisory_xact_lock key that serialises schema upgrades of replicas starting together.
_MIGRATION_LOCK = 0x4841524B  # "HARK"


def sqlite_url(path: Path | str) -> str:
    return f"sqlite:///{Path(path)}"


def database_url(url: str) -> URL:
    """``url`` as SQLAlchemy reads it; a bare ``postgresql://`` means psycopg 3 (the driver Hark
    ships), not SQLAlchemy's default psycopg2."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def is_postgres(engine: Engine) -> bool:
    return engine.dialect.name == "postgresql"


def connect(url: str) -> Engine:
    """An engine for ``url``. SQLite: WAL, and write transactions that take the write lock at
    ``BEGIN`` (``BEGIN IMMEDIATE``) so that concurrent writers queue instead of failing on lock
    upgrade; reads begin plainly. PostgreSQL: connections checked before use, so a restarted
    server costs a reconnect, not an error."""
    parsed = database_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(parsed, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _configure(dbapi_connection, _record) -> None:
            dbapi_connection.isolation_level = None  # we say BEGIN ourselves (below)
            dbapi_connection.execute("PRAGMA journal_mode=WAL")
            dbapi_connection.execute("PRAGMA synchronous=NORMAL")
            dbapi_connection.execute("PRAGMA busy_timeout=30000")

        @event.listens_for(engine, "begin")
        def _begin(conn) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("hark_write") else "BEGIN")

        return engine
    if parsed.get_backend_name() != "postgresql":
        raise ValueError(f"Unsupported job database {parsed.get_backend_name()!r}: use sqlite:/// or postgresql+psycopg://")
    return create_engine(parsed, pool_pre_ping=True, pool_size=5, max_overflow=10)


def writer(engine: Engine) -> Engine:
    """``engine`` for read-write transactions (on SQLite they take the write lock at once)."""
    return engine.execution_options(hark_write=True)


def advisory_lock(conn, name: str) -> None:
    """Serialise this PostgreSQL transaction with any other taking the same ``name`` (held to its
    end). SQLite's write transactions are serial already."""
    if conn.dialect.name == "postgresql":
        key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})


def migrate(engine: Engine) -> None:
    """Bring the database to the current schema (``alembic upgrade head``) with the migration
    scripts shipped in this package. Replicas starting together take turns."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(_MIGRATIONS))
    with writer(engine).begin() as conn:
        if is_postgres(engine):
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
        config.attributes["connection"] = conn
        command.upgrade(config, "head")
