"""The schema's migrations: Alembic, run by pacsbridge itself (docs/migrations.md).

:func:`upgrade` brings any database to what :mod:`pacsbridge.shared.core.schema` declares, inside the
caller's transaction: ``pacsbridge init`` calls it through ``Index.create``, and so does every
service when it starts. No ``alembic.ini``: the scripts are package data (``script_location``
``pacsbridge.shared.core:migrations``) and the connection is handed to ``env.py`` in
``Config.attributes``.

Two kinds of tables, two ways:

- pacsbridge's own tables (``pacsbridge_*``) are versioned: one revision per change under
  ``versions/``, the revision reached kept in ``pacsbridge_alembic_version``. Every revision is
  written so that it may find its work done already (:mod:`.ops`: create a table only if missing,
  add a column only if missing). That is the baseline logic: a database made before the
  migrations existed has no version table, and is upgraded from the first revision, which keeps
  every table and row it finds and adds only what is missing; nothing is ever dropped.
- Conquest's tables take their columns from the user's ``dicom.sql``, which may change on any
  day, so no revision can name them: after the revisions, :func:`complete` compares them with the
  parsed ``dicom.sql`` and creates the missing tables, columns and indexes (every time; it is a
  no-op when nothing is missing). A column the file no longer has is kept.
"""

from __future__ import annotations

import functools
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from sqlalchemy import Column, Table, inspect, select, text
from sqlalchemy import column as column_clause
from sqlalchemy import table as table_clause
from sqlalchemy.engine import Connection

from pacsbridge.shared.core.errors import IndexError_

if TYPE_CHECKING:
    from alembic.config import Config

# Alembic is imported where it is used: importing the index (every command, every worker child)
# does not pay for it, only a start that migrates or checks the revision.

__all__ = ["SCRIPTS", "VERSION_TABLE", "config", "head", "revisions", "current", "upgrade", "complete"]

log = logging.getLogger(__name__)

#: Where Alembic finds ``env.py`` and ``versions/`` (package resources, installed or not).
SCRIPTS = "pacsbridge.shared.core:migrations"
#: The revision a database has reached; prefixed like every table of ours, so that it never meets
#: an ``alembic_version`` of another application sharing the database.
VERSION_TABLE = "pacsbridge_alembic_version"
#: PostgreSQL advisory lock held while migrating: processes starting together wait for each other.
_LOCK_KEY = 0x7061637362726467


def config(conn: Connection | None = None) -> Config:
    """Alembic's configuration, without a file; ``conn`` is the connection ``env.py`` migrates."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", SCRIPTS)
    cfg.set_main_option("file_template", "r%%(rev)s_%%(slug)s")
    if conn is not None:
        cfg.attributes["connection"] = conn
    return cfg


_REVISION = re.compile(r'^(down_revision|revision)\s*=\s*(None|"([^"]*)")\s*$', re.M)


@functools.cache
def head() -> str:
    """The newest revision.

    Every command and service start asks this (to see whether the database is up to date), and
    loading Alembic's script directory to answer took 0.15 to 0.6 s of each ``pacsbridge`` command.
    So the revision scripts' ``revision = "..."`` and ``down_revision = "..."`` lines are read as
    text: the head is the one revision no other one revises. Anything else (no script, several
    heads, a line not written that way) asks Alembic.
    """
    folder = Path(__file__).resolve().parent / "versions"
    names, downs = set(), set()
    for script in folder.glob("r*.py"):
        found = dict((m.group(1), m.group(3)) for m in _REVISION.finditer(script.read_text("utf-8")))
        if "revision" not in found or "down_revision" not in found:
            return _alembic_head()
        names.add(found["revision"])
        downs.add(found["down_revision"])
    heads = names - downs
    return heads.pop() if len(heads) == 1 else _alembic_head()


def _alembic_head() -> str:
    from alembic.script import ScriptDirectory

    found = ScriptDirectory.from_config(config()).get_current_head()
    assert found is not None, "no revision under migrations/versions"
    return found


@functools.cache
def revisions() -> frozenset[str]:
    """Every revision this pacsbridge knows."""
    from alembic.script import ScriptDirectory

    return frozenset(s.revision for s in ScriptDirectory.from_config(config()).walk_revisions())


def current(conn: Connection) -> str | None:
    """The revision ``conn``'s database has reached; None before any (new, or made before migrations)."""
    if not inspect(conn).has_table(VERSION_TABLE):
        return None
    # what MigrationContext.get_current_revision reads, without its log lines at every start
    query: Any = select(column_clause("version_num")).select_from(table_clause(VERSION_TABLE))
    found: list[str] = list(conn.execute(query).scalars())
    return found[0] if len(found) == 1 else None if not found else ",".join(sorted(found))


def _lock(conn: Connection) -> None:
    """Serialise migrations: two processes starting at once must not both create a table."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK_KEY})
    elif conn.dialect.name == "sqlite":
        # pysqlite runs DDL outside a transaction until one is begun: take the write lock now, so
        # the whole upgrade is one transaction and a second process waits (busy_timeout) for it
        dbapi = conn.connection.dbapi_connection
        if dbapi is not None and not dbapi.in_transaction:  # type: ignore[attr-defined]
            conn.exec_driver_sql("BEGIN IMMEDIATE")


def upgrade(conn: Connection, tables: Sequence[Table] = (), drop: Iterable[Table] = ()) -> list[str]:
    """Bring ``conn``'s database to head, then :func:`complete` ``tables``; returns what was done.

    ``drop`` are tables to empty first by dropping and making them again (``pacsbridge init
    --force``: Conquest's tables and the arrivals, never the jobs). Runs in the caller's
    transaction (all or nothing on PostgreSQL and SQLite) and holds a lock while it runs.
    """
    drop = list(drop)
    if not drop and current(conn) == head() and not complete(conn, tables, apply=False):
        # up to date: read only, no lock. Every worker task and sweep comes here; a write lock
        # taken each time made processes wait on each other, and a Celery parent that forked its
        # pool while its sweeper held SQLite's lock left the children unable to ever take it
        return []
    _lock(conn)
    done: list[str] = []
    was = current(conn)
    if was != head():
        if was is not None and was not in revisions():
            raise IndexError_(f"the database is at revision {was}, which this pacsbridge does not know (it knows "
                              f"up to {head()}): a newer pacsbridge migrated it; run that version")
        if was is None:
            ours = [n for n in inspect(conn).get_table_names() if n.lower().startswith("pacsbridge_")]
            if ours:
                log.warning("the database was made before migrations (%d pacsbridge tables, no %s): its tables "
                            "and rows are kept, what is missing is added", len(ours), VERSION_TABLE)
        from alembic import command

        command.upgrade(config(conn), "head")
        done.append(f"migrated from {was or 'nothing'} to {head()}")
        log.info("database migrated from %s to %s", was or "nothing", head())
    for table in reversed(list(drop)):
        table.drop(conn, checkfirst=True)
    return done + complete(conn, tables)


def complete(conn: Connection, tables: Sequence[Table], apply: bool = True) -> list[str]:
    """Create what the database lacks of ``tables``: the table, a column, an index. Never drops.

    With ``apply=False`` only say what would be done.

    For Conquest's tables, whose columns come from a ``dicom.sql``: a user's file with a column more
    migrates too. Names are compared without case (PostgreSQL folds them, SQLite ignores it).
    """
    done: list[str] = []
    if not tables:
        return done
    insp = inspect(conn)
    present = {n.lower(): n for n in insp.get_table_names()}
    ops: Any = None
    for table in tables:
        name = present.get(str(table.name).lower())
        if name is None:
            if apply:
                table.create(conn)
            done.append(f"created {table.name}")
            continue
        have = {c["name"].lower() for c in insp.get_columns(name)}
        lacking: set[str] = set()  # key columns of another key than the table was made with
        for column in table.columns:
            if column.name.lower() in have:
                continue
            if column.primary_key:
                lacking.add(column.name.lower())
                if apply:  # said once, by the run that applies (a dry run is every task's check)
                    log.warning("%s has no column %s, the key of this dicom.sql: `pacsbridge init --force` and "
                                "`pacsbridge rebuild` remake the index", name, column.name)
                continue
            if not apply:
                done.append(f"added {name}.{column.name}")
                continue
            if ops is None:
                from alembic.operations import Operations
                from alembic.runtime.migration import MigrationContext

                ops = Operations(MigrationContext.configure(conn))
            ops.add_column(name, Column(column.name, column.type, nullable=True))
            done.append(f"added {name}.{column.name}")
        indexes = {str(ix["name"]).lower() for ix in insp.get_indexes(name)}
        for index in table.indexes:
            if index.name is not None and str(index.name).lower() not in indexes \
                    and not any(c.name.lower() in lacking for c in index.columns):
                if apply:
                    index.create(conn)
                done.append(f"created index {index.name}")
    return done
