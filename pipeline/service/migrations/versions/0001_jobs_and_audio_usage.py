"""The job store and per-key daily audio usage.

Revision ID: 0001
Revises:
Create Date: 2026-12-02

A SQLite job store made before migrations existed (the hand-written schema, without ``seq``) is
adopted: its rows are copied into the new table in their original order.
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_COPIED = (
    "job_id, key_id, state, request_json, callback_url, result_json, error_json, created_at, updated_at,"
    " run_attempts, lease_owner, lease_expires_at, not_before, delivery_state, delivery_attempts,"
    " delivery_next_at, delivery_last_status, delivery_last_error, idempotency_key, request_hash"
)


def upgrade() -> None:
    bind = op.get_bind()
    adopt = "jobs" in sa.inspect(bind).get_table_names()
    if adopt:
        for index in ("jobs_runnable", "jobs_key_state", "jobs_delivery", "jobs_idempotency"):
            op.execute(f"DROP INDEX IF EXISTS {index}")
        op.rename_table("jobs", "jobs_before_migrations")
    op.create_table(
        "jobs",
        sa.Column("seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.String(64), nullable=False, unique=True),
        sa.Column("key_id", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("request_json", sa.Text(), nullable=False),
        sa.Column("callback_url", sa.Text()),
        sa.Column("result_json", sa.Text()),
        sa.Column("error_json", sa.Text()),
        sa.Column("created_at", sa.Float(53), nullable=False),
        sa.Column("updated_at", sa.Float(53), nullable=False),
        sa.Column("run_attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("lease_owner", sa.String(64)),
        sa.Column("lease_expires_at", sa.Float(53)),
        sa.Column("not_before", sa.Float(53), nullable=False, server_default="0"),
        sa.Column("delivery_state", sa.String(16), nullable=False),
        sa.Column("delivery_attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("delivery_next_at", sa.Float(53)),
        sa.Column("delivery_last_status", sa.Integer()),
        sa.Column("delivery_last_error", sa.Text()),
        sa.Column("idempotency_key", sa.String(255)),
        sa.Column("request_hash", sa.String(64)),
    )
    op.create_index("jobs_runnable", "jobs", ["state", "not_before", "created_at"])
    op.create_index("jobs_key_state", "jobs", ["key_id", "state"])
    op.create_index("jobs_delivery", "jobs", ["delivery_state", "delivery_next_at"])
    not_null = sa.text("idempotency_key IS NOT NULL")
    op.create_index("jobs_idempotency", "jobs", ["key_id", "idempotency_key"], unique=True,
                    sqlite_where=not_null, postgresql_where=not_null)
    if adopt:
        op.execute(f"INSERT INTO jobs ({_COPIED}) SELECT {_COPIED} FROM jobs_before_migrations ORDER BY rowid")
        op.drop_table("jobs_before_migrations")
    op.create_table(
        "audio_usage",
        sa.Column("key_id", sa.String(64), primary_key=True),
        sa.Column("day", sa.Integer(), primary_key=True),
        sa.Column("audio_s", sa.Float(53), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("audio_usage")
    op.drop_table("jobs")
