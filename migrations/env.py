"""Alembic environment: runs on the connection dspyflow hands over, or on the URL setting."""

from alembic import context

from storage.db import database_url, get_engine, schema_lock
from storage.models import Base

config = context.config
target_metadata = Base.metadata


def run() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        # dspyflow's own upgrade: the caller already holds the schema lock.
        context.configure(
            connection=connection, target_metadata=target_metadata, render_as_batch=True
        )
        with context.begin_transaction():
            context.run_migrations()
        return
    # The `alembic` command: take the same schema lock that processes bootstrapping an
    # empty database take, so the two never create tables at the same time.
    url = config.get_main_option("sqlalchemy.url") or database_url()
    with schema_lock(get_engine(url)) as conn:
        context.configure(connection=conn, target_metadata=target_metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()


run()
