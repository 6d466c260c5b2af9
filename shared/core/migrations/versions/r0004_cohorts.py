"""Cohorts (issue 17): a cohort job's input form and options, and its rows.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from pacsbridge.shared.core.migrations import ops

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_S = sa.String


def upgrade() -> None:
    ops.create_table(
        "pacsbridge_cohorts",
        sa.Column("job_id", _S(32), primary_key=True),
        sa.Column("format", _S(8), nullable=False),
        sa.Column("form", sa.Text, nullable=False),
        sa.Column("transfer", sa.Boolean, nullable=False),
        sa.Column("then", sa.Text, nullable=False),
        sa.Column("mass", sa.Text, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    if not ops.has_table("pacsbridge_cohort_rows"):
        op.create_table(
            "pacsbridge_cohort_rows",
            sa.Column("job_id", _S(32), primary_key=True),
            sa.Column("number", sa.Integer, primary_key=True, autoincrement=False),
            sa.Column("cells", sa.Text, nullable=False),
            sa.Column("spec", sa.Text, nullable=False),
            sa.Column("duplicate_of", sa.Integer, nullable=True),
            sa.Column("state", _S(16), nullable=False),
            sa.Column("reason", sa.Text, nullable=False),
            sa.Column("patient_id", _S(64), nullable=False),
            sa.Column("issuer", _S(64), nullable=False),
            sa.Column("studies", sa.Text, nullable=False),
            *(sa.Column(c, sa.Integer, nullable=False)
              for c in ("series", "expected", "held", "received", "sent", "quarantined", "failed")),
            sa.Column("children", sa.Text, nullable=False),
            sa.Column("updated_at", sa.Float, nullable=False),
        )
        op.create_index("pacsbridge_cohort_rows_state", "pacsbridge_cohort_rows", ["job_id", "state"])


def downgrade() -> None:
    raise NotImplementedError("pacsbridge migrates forward only (docs/migrations.md)")
