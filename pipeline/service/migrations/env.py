"""Alembic environment: upgrades run on the connection that ``pipeline.service.db.migrate`` hands
over (inside its transaction). For `alembic revision`, point ``sqlalchemy.url`` at a database."""

from alembic import context
from sqlalchemy import create_engine

from pipeline.service.db import metadata

config = context.config
connection = config.attributes.get("connection")
if connection is not None:
    context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    with create_engine(config.get_main_option("sqlalchemy.url")).begin() as conn:
        context.configure(connection=conn, target_metadata=metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
