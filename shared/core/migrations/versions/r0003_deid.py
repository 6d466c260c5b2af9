"""De-identification (issue 16): projects, the pseudonym and UID maps, the append-only audit, and a
node's default project and whether it may receive identifiable data.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from pacsbridge.shared.core.migrations import ops

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_S = sa.String

#: The audit is append-only: the database itself refuses to change or delete a row.
_SQLITE_TRIGGERS = [
    f"CREATE TRIGGER IF NOT EXISTS pacsbridge_audit_no_{what.lower()} BEFORE {what} ON pacsbridge_audit "
    "BEGIN SELECT RAISE(ABORT, 'pacsbridge_audit is append-only'); END"
    for what in ("UPDATE", "DELETE")
]
_PG_FUNCTION = """CREATE OR REPLACE FUNCTION pacsbridge_audit_append_only() RETURNS trigger AS $$
BEGIN RAISE EXCEPTION 'pacsbridge_audit is append-only'; END; $$ LANGUAGE plpgsql"""
_PG_TRIGGER = """DO $$ BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = 'pacsbridge_audit_append_only') THEN
    CREATE TRIGGER pacsbridge_audit_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON pacsbridge_audit
      FOR EACH STATEMENT EXECUTE FUNCTION pacsbridge_audit_append_only();
  END IF;
END $$"""


def _create(name: str, *columns: sa.Column, indexes: tuple[tuple[str, list[str], bool], ...] = ()) -> None:  # type: ignore[type-arg]
    if ops.has_table(name):
        return
    op.create_table(name, *columns)
    for index, cols, unique in indexes:
        op.create_index(index, name, cols, unique=unique)


def upgrade() -> None:
    # a series' instances withheld by a project's risk policy (quarantined or dropped: not sent)
    ops.add_column("pacsbridge_job_series", sa.Column("quarantined", sa.Integer, nullable=False, server_default="0"))
    ops.add_column("pacsbridge_nodes", sa.Column("project", _S(64), nullable=False, server_default=""))
    ops.add_column("pacsbridge_nodes", sa.Column("identifiable", sa.Boolean, nullable=False, server_default="1"))
    _create(
        "pacsbridge_projects",
        sa.Column("name", _S(64), primary_key=True),
        sa.Column("description", _S(255), nullable=False),
        sa.Column("config", sa.Text, nullable=False),
        sa.Column("key_check", _S(64), nullable=False),
        sa.Column("created_by", _S(64), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    _create(
        "pacsbridge_deid_patients",
        sa.Column("project", _S(64), primary_key=True),
        sa.Column("issuer", _S(64), primary_key=True),
        sa.Column("patient_id", _S(64), primary_key=True),
        sa.Column("pseudonym", _S(64), nullable=False),
        sa.Column("date_offset", sa.Integer, nullable=False),
        sa.Column("first_used", sa.Float, nullable=False),
        sa.Column("last_used", sa.Float, nullable=False),
        indexes=(("pacsbridge_deid_patients_pseudonym", ["project", "pseudonym"], True),),
    )
    _create(
        "pacsbridge_deid_uids",
        sa.Column("project", _S(64), primary_key=True),
        sa.Column("original", _S(64), primary_key=True),
        sa.Column("new", _S(64), nullable=False),
        sa.Column("level", _S(8), nullable=False),
        sa.Column("issuer", _S(64), nullable=False),
        sa.Column("patient_id", _S(64), nullable=False),
        sa.Column("first_used", sa.Float, nullable=False),
        indexes=(("pacsbridge_deid_uids_new", ["project", "new"], True),),
    )
    _create(
        "pacsbridge_audit",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("at", sa.Float, nullable=False),
        sa.Column("actor", _S(64), nullable=False),
        sa.Column("action", _S(32), nullable=False),
        sa.Column("project", _S(64), nullable=False),
        sa.Column("patient_id", _S(64), nullable=False),
        sa.Column("study_uid", _S(64), nullable=False),
        sa.Column("target", _S(255), nullable=False),
        sa.Column("detail", sa.Text, nullable=False),
        indexes=(("ix_pacsbridge_audit_at", ["at"], False), ("ix_pacsbridge_audit_action", ["action"], False),
                 ("ix_pacsbridge_audit_project", ["project"], False)),
    )
    dialect = op.get_bind().dialect.name
    if dialect == "sqlite":
        for statement in _SQLITE_TRIGGERS:
            op.execute(statement)
    elif dialect == "postgresql":
        op.execute(_PG_FUNCTION)
        op.execute(_PG_TRIGGER)


def downgrade() -> None:
    raise NotImplementedError("pacsbridge migrates forward only (docs/migrations.md)")
