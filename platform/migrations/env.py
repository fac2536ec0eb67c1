"""Alembic environment: migrations run on the connection that `indai.platform.db.upgrade` passes."""
from alembic import context

from indai.platform.db import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
