"""Alembic's environment: migrate the connection pacsbridge hands over (no alembic.ini, no offline mode)."""

from __future__ import annotations

from alembic import context

from pacsbridge.shared.core.migrations import VERSION_TABLE
from pacsbridge.shared.core.schema import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("pacsbridge's migrations run through pacsbridge.shared.core.migrations.upgrade "
                       "(`pacsbridge init`), with a connection")

context.configure(
    connection=connection,
    target_metadata=metadata,  # what autogenerate compares with (python -m pacsbridge.shared.core.migrations)
    version_table=VERSION_TABLE,
    # SQLite alters a table by copying it: a revision's op.batch_alter_table does that there
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
