"""The hardening issue's tables (commit 74b95e8): the quarantine, a job's owner and webhook status.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa

from pacsbridge.shared.core.migrations import ops

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_S = sa.String


def upgrade() -> None:
    # the API token that submitted the job, and what became of its webhook: "" for the jobs before
    ops.add_column("pacsbridge_jobs", sa.Column("owner", _S(64), nullable=False, server_default=""))
    ops.add_column("pacsbridge_jobs", sa.Column("webhook_status", _S(512), nullable=False, server_default=""))
    ops.create_table(
        "pacsbridge_quarantine",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("relpath", _S(255), nullable=False, index=True),
        sa.Column("reason", _S(16), nullable=False, index=True),
        sa.Column("detail", sa.Text, nullable=False),
        sa.Column("level", _S(8), nullable=False),
        sa.Column("sop_uid", _S(64), nullable=False, index=True),
        sa.Column("series_uid", _S(64), nullable=False),
        sa.Column("study_uid", _S(64), nullable=False),
        sa.Column("patient_id", _S(64), nullable=False),
        sa.Column("other_patient_id", _S(64), nullable=False),
        sa.Column("original_relpath", _S(255), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False, index=True),
        sa.Column("resolved_at", sa.Float, nullable=True, index=True),
        sa.Column("resolved_by", _S(64), nullable=False),
        sa.Column("decision", _S(16), nullable=False),
    )


def downgrade() -> None:
    raise NotImplementedError("pacsbridge migrates forward only (docs/migrations.md)")
