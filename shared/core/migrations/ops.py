"""Operations for revisions that may find their work done (see :mod:`pacsbridge.shared.core.migrations`).

A database made before the migrations existed is upgraded from the first revision, and may hold any
of the tables and columns that revision adds: each operation here looks before it acts.
"""

from __future__ import annotations

from typing import Any

from alembic import op
from sqlalchemy import Column, inspect

__all__ = ["has_table", "has_column", "create_table", "add_column"]


def has_table(name: str) -> bool:
    """True when the database has table ``name``."""
    return inspect(op.get_bind()).has_table(name)


def has_column(table: str, column: str) -> bool:
    """True when table ``table`` has a column ``column`` (without case)."""
    return column.lower() in {c["name"].lower() for c in inspect(op.get_bind()).get_columns(table)}


def create_table(name: str, *columns: Any) -> None:
    """``op.create_table`` (with the indexes of ``index=True`` columns) unless the table exists."""
    if not has_table(name):
        op.create_table(name, *columns)


def add_column(table: str, column: Column) -> None:  # type: ignore[type-arg]
    """``op.add_column`` unless the column exists. A NOT NULL column needs a ``server_default``."""
    if not has_column(table, column.name):
        op.add_column(table, column)
