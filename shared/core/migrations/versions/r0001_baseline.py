"""Baseline: pacsbridge's tables as commit 9650286 made them (before the hardening issue).

The jobs and nodes, the throttles' leases and rates, stable detection, the arrivals, and the push
instances (which that version made at run time, when a worker first pushed). Each table is created
only if missing, so a database made before the migrations keeps what it has (docs/migrations.md).
Frozen: a later change is a new revision, never an edit here. Each of these tables kept the columns
of its first commit until 9650286 (``git log -S``), so creating what is missing brings any earlier
database to this revision too.

Revision ID: 0001
Revises:
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa

from pacsbridge.shared.core.migrations import ops

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_S = sa.String


def upgrade() -> None:
    ops.create_table(
        "pacsbridge_nodes",
        sa.Column("name", _S(64), primary_key=True),
        sa.Column("ae_title", _S(16), nullable=False),
        sa.Column("host", _S(255), nullable=False),
        sa.Column("port", sa.Integer, nullable=False),
        sa.Column("retrieve", _S(8), nullable=False),
        sa.Column("move_destination", _S(16), nullable=False),
        sa.Column("allow_find", sa.Boolean, nullable=False),
        sa.Column("allow_move", sa.Boolean, nullable=False),
        sa.Column("allow_get", sa.Boolean, nullable=False),
        sa.Column("allow_store", sa.Boolean, nullable=False),
        sa.Column("max_associations", sa.Integer, nullable=False),
        sa.Column("max_rate", sa.Float, nullable=False),
        sa.Column("move_window", _S(11), nullable=False),
        sa.Column("description", _S(255), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    ops.create_table(
        "pacsbridge_jobs",
        sa.Column("id", _S(32), primary_key=True),
        sa.Column("kind", _S(16), nullable=False, index=True),
        sa.Column("node", _S(64), nullable=True, index=True),
        sa.Column("params", sa.Text, nullable=False),
        sa.Column("dedupe_key", _S(64), nullable=False, index=True),
        sa.Column("state", _S(16), nullable=False, index=True),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("error", sa.Text, nullable=False),
        sa.Column("result", sa.Text, nullable=False),
        sa.Column("webhook", _S(2048), nullable=False),
        sa.Column("worker", _S(255), nullable=False),
        sa.Column("cancel_requested", sa.Boolean, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False, index=True),
        sa.Column("enqueued_at", sa.Float, nullable=True),
        sa.Column("started_at", sa.Float, nullable=True),
        sa.Column("heartbeat_at", sa.Float, nullable=True),
        sa.Column("finished_at", sa.Float, nullable=True),
    )
    ops.create_table(
        "pacsbridge_job_series",
        sa.Column("job_id", _S(32), primary_key=True),
        sa.Column("series_uid", _S(64), primary_key=True),
        sa.Column("study_uid", _S(64), nullable=False),
        sa.Column("patient_id", _S(64), nullable=False),
        sa.Column("modality", _S(16), nullable=False),
        sa.Column("description", _S(64), nullable=False),
        *(sa.Column(c, sa.Integer, nullable=False) for c in ("expected", "received", "indexed", "pushed", "failed")),
        sa.Column("state", _S(16), nullable=False),
        sa.Column("error", sa.Text, nullable=False),
    )
    ops.create_table(
        "pacsbridge_node_leases",
        sa.Column("node", _S(64), primary_key=True),
        sa.Column("slot", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("holder", _S(128), nullable=False),
        sa.Column("acquired_at", sa.Float, nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
    )
    ops.create_table(
        "pacsbridge_node_rates",
        sa.Column("node", _S(64), primary_key=True),
        sa.Column("next_at", sa.Float, nullable=False),
    )
    ops.create_table(
        "pacsbridge_stable",
        sa.Column("level", _S(8), primary_key=True),
        sa.Column("uid", _S(64), primary_key=True),
        sa.Column("study_uid", _S(64), nullable=False),
        sa.Column("patient_id", _S(64), nullable=False),
        sa.Column("instances", sa.Integer, nullable=False),
        sa.Column("last_arrival", sa.Float, nullable=False),
        sa.Column("stable_at", sa.Float, nullable=True, index=True),
    )
    ops.create_table(
        "pacsbridge_arrivals",
        sa.Column("sop_uid", _S(64), primary_key=True, autoincrement=False),
        sa.Column("series_uid", _S(64), index=True),
        sa.Column("study_uid", _S(64), index=True),
        sa.Column("patient_id", _S(64)),
        sa.Column("calling_ae", _S(16)),
        sa.Column("association", _S(36)),
        sa.Column("arrived_at", sa.Float, index=True),
        sa.Column("object_file", _S(255)),
    )
    ops.create_table(
        "pacsbridge_push_instances",
        sa.Column("job_id", _S(32), primary_key=True),
        sa.Column("sop_uid", _S(64), primary_key=True),
        sa.Column("series_uid", _S(64), nullable=False),
        sa.Column("outcome", _S(8), nullable=False),
        sa.Column("status", sa.Integer, nullable=True),
        sa.Column("error", sa.Text, nullable=False),
        sa.Column("fallback", sa.Integer, nullable=False),
        sa.Column("at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    raise NotImplementedError("pacsbridge migrates forward only (docs/migrations.md)")
