"""Indexes for the index's query paths at millions of rows (issue 19): a study by its date (a range) and by
its accession number. Keys and links (PatientID, the UIDs) were indexed already (Conquest's own indexes).

Conquest's tables take their names from the ``dicom.sql`` in use, which no revision can know: this one
indexes the shipped file's names (``DICOMStudies.StudyDate``, ``DICOMStudies.AccessionN``) when the table
and column exist and the index does not; for any other file, the completion step after the revisions
creates the same indexes by tag (``conquest_tables``). A fresh database has no Conquest tables yet when
the revisions run: the completion step makes them with their indexes.

The one revision with a ``downgrade``: it only adds indexes, which hold no data, so dropping them loses
nothing (docs/migrations.md). On PostgreSQL an administrator may create them first with ``CREATE INDEX
CONCURRENTLY`` under the same names (no write lock on a busy index); this revision then finds them.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04
"""

from __future__ import annotations

from alembic import op
from sqlalchemy import inspect

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

#: (index, table, column): written out, as a revision is frozen. Names are constants, never input.
INDEXES = (("dicomstudies_studydate", "dicomstudies", "studydate"),
           ("dicomstudies_accessionn", "dicomstudies", "accessionn"))


def _tables() -> dict[str, str]:
    """``{lower-case name: name}`` of the database's tables (SQLite keeps Conquest's case, PostgreSQL folds)."""
    return {n.lower(): n for n in inspect(op.get_bind()).get_table_names()}


def upgrade() -> None:
    tables = _tables()
    insp = inspect(op.get_bind())
    for index, table, column in INDEXES:
        name = tables.get(table)
        if name is None:
            continue
        columns = {c["name"].lower(): c["name"] for c in insp.get_columns(name)}
        have = {str(ix["name"]).lower() for ix in insp.get_indexes(name)}
        if column in columns and index not in have:
            op.create_index(index, name, [columns[column]])


def downgrade() -> None:
    tables = _tables()
    insp = inspect(op.get_bind())
    for index, table, _column in INDEXES:
        name = tables.get(table)
        if name is not None and index in {str(ix["name"]).lower() for ix in insp.get_indexes(name)}:
            op.drop_index(index, table_name=name)
