"""${message}

Revision ID: ${up_revision}
Revises: ${down_revision | comma,n}
Create Date: ${create_date}
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from pacsbridge.shared.core.migrations import ops

revision = ${repr(up_revision)}
down_revision = ${repr(down_revision)}
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Write it so that it may find its work done (ops.create_table, ops.add_column)."""
    ${upgrades if upgrades else "pass"}


def downgrade() -> None:
    raise NotImplementedError("pacsbridge migrates forward only (docs/migrations.md)")
