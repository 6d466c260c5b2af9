"""The schema's migrations (docs/migrations.md): any older database is brought to head, every row kept.

The fixtures under fixtures/schema/ are databases made by the code of two older commits, with rows in
every table (fixtures/schema/make_fixtures.py made them): 9650286, before the hardening issue (no
quarantine, no job owner or webhook status, no push instances table: no push had run), and 74b95e8,
after it (and after a push). Neither has a version table: they were made before the migrations.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import MetaData, create_engine, event, func, insert, inspect, select, text
from sqlalchemy.engine import Engine

from pacsbridge.shared.core import migrations
from pacsbridge.shared.core.config import Settings
from pacsbridge.shared.core.dicomsql import default_dicom_sql, load_schema
from pacsbridge.shared.core.schema import conquest_tables, jobs_table, metadata, quarantine_table
from pacsbridge.shared.index.context import open_context
from pacsbridge.shared.index.importer import Importer

from .conftest import cli_env
from .helpers import TEST_FILES

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "schema"
MADE_BY = ["before-hardening-9650286", "after-hardening-74b95e8"]
EXE = [sys.executable, "-m", "pacsbridge.cli"]


def _cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*EXE, *args], env=cli_env(settings), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc


def _load(url: str, made_by: str) -> None:
    """Load a fixture as the old pacsbridge left it (its own dump, run as is)."""
    if url.startswith("sqlite"):
        sql = (FIXTURES / f"{made_by}.sqlite.sql").read_text(encoding="utf-8")
        with sqlite3.connect(url.removeprefix("sqlite:///")) as conn:
            conn.executescript(sql)
        return
    sql = (FIXTURES / f"{made_by}.postgresql.sql").read_text(encoding="utf-8")
    engine = create_engine(url)
    raw = engine.raw_connection()
    try:
        with raw.cursor() as cur:
            cur.execute(sql)  # pg_dump's own text, ours (no parameter)
        raw.commit()
    finally:
        raw.close()
        engine.dispose()


def _snapshot(engine: Engine) -> dict[str, tuple[list[str], list[tuple[Any, ...]]]]:
    """Every table's columns and rows (sorted), by lower-case table name."""
    meta = MetaData()
    meta.reflect(engine)
    out = {}
    with engine.connect() as conn:
        for table in meta.sorted_tables:
            columns = [c.name.lower() for c in table.columns]
            rows = sorted(conn.execute(select(table)).all(), key=repr)
            out[table.name.lower()] = (columns, [tuple(r) for r in rows])
    return out


def _project(snapshot: tuple[list[str], list[tuple[Any, ...]]], columns: list[str]) -> list[tuple[Any, ...]]:
    have, rows = snapshot
    at = [have.index(c) for c in columns]
    return sorted((tuple(row[i] for i in at) for row in rows), key=repr)


@pytest.mark.parametrize("made_by", MADE_BY)
def test_an_older_database_upgrades_with_every_row_intact(made_by, db_url, tmp_path):
    settings = Settings(database_url=db_url, storage=tmp_path / "data", fsync=False)
    _load(db_url, made_by)
    engine = create_engine(db_url)
    before = _snapshot(engine)
    assert len(before) >= 12 and sum(len(rows) for _, rows in before.values()) >= 30
    assert all(rows for _, rows in before.values()), "the fixture has rows in every table"
    assert migrations.VERSION_TABLE not in before  # made before the migrations
    if made_by.startswith("before"):
        assert "pacsbridge_quarantine" not in before and "owner" not in before["pacsbridge_jobs"][0]

    proc = _cli(settings, "init")
    assert "upgraded: migrated from nothing to " + migrations.head() in proc.stderr

    after = _snapshot(engine)
    # every old table, column and row is still there, value for value
    for name, (columns, rows) in before.items():
        assert name in after, name
        assert set(columns) <= set(after[name][0]), name
        assert _project(after[name], columns) == rows, name
    # every table and column of the current schema is there
    conquest = conquest_tables(load_schema(), fold=engine.dialect.name == "postgresql")
    for table in [*metadata.sorted_tables, *conquest.values()]:
        assert {c.name.lower() for c in table.columns} <= set(after[table.name.lower()][0]), table.name
    # the columns added to old rows hold their defaults
    with engine.connect() as conn:
        assert migrations.current(conn) == migrations.head()
        owners = conn.execute(select(jobs_table.c.owner, jobs_table.c.webhook_status)).all()
        assert len(owners) == 2 and (made_by.startswith("after") or set(owners) == {("", "")})
        # and the tables work: a new quarantine entry gets a fresh id (the sequence carried over)
    with engine.begin() as conn:
        old_ids = set(conn.execute(select(quarantine_table.c.id)).scalars())
        new_id = conn.execute(insert(quarantine_table).values(relpath="x", reason="index_failed", created_at=1.0)
                              .returning(quarantine_table.c.id)).scalar_one()
        assert new_id not in old_ids

    # a second init changes nothing: no DDL, the same rows
    ddl: list[str] = []
    ctx = open_context(settings)
    event.listen(ctx.index.engine, "before_cursor_execute",
                 lambda _c, _cur, statement, *_a: ddl.append(statement)
                 if statement.lstrip().upper().startswith(("CREATE", "ALTER", "DROP", "INSERT", "UPDATE")) else None)
    assert ctx.index.create() == []
    assert ddl == []
    ctx.index.engine.dispose()
    again = _snapshot(engine)
    assert again.keys() == after.keys() and all(again[n][0] == after[n][0] for n in after)

    # init --force empties the index (Conquest's tables, the arrivals) and keeps jobs and nodes
    _cli(settings, "init", "--force")
    forced = _snapshot(engine)
    for name in ("dicomimages", "dicompatients", "pacsbridge_arrivals"):
        assert forced[name][1] == [], name
    for name in ("pacsbridge_jobs", "pacsbridge_nodes", "pacsbridge_job_series", "pacsbridge_stable"):
        assert forced[name] == again[name], name
    with engine.connect() as conn:
        assert migrations.current(conn) == migrations.head()
    engine.dispose()


def test_the_migrations_make_what_schema_declares(db_url):
    """A fresh database at head is what shared/core/schema.py declares: a table or column added there
    without a revision fails here (Alembic's own comparison, as ``alembic check`` makes it)."""
    engine = create_engine(db_url)
    with engine.begin() as conn:
        assert migrations.upgrade(conn) == [f"migrated from nothing to {migrations.head()}"]
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={
            "include_name": lambda name, kind, _parent: kind != "table" or name in metadata.tables})
        assert compare_metadata(context, metadata) == []
        assert {n for n in inspect(conn).get_table_names()} == {*metadata.tables, migrations.VERSION_TABLE}
    engine.dispose()


def test_a_user_dicom_sql_with_an_extra_column_migrates(db_url, tmp_path):
    """An index made with one dicom.sql, then init with a user's file that has one column more: the
    column is added, the rows are kept, and a rebuild fills it."""
    settings = Settings(database_url=db_url, storage=tmp_path / "data", fsync=False)
    ctx = open_context(settings)
    ctx.index.create()
    ctx.storage.ensure()
    Importer(ctx.index, ctx.storage, workers=1).import_paths([TEST_FILES / "CT_small.dcm", TEST_FILES / "MR_small.dcm"])
    ctx.index.engine.dispose()
    engine = create_engine(db_url)
    before = _snapshot(engine)
    assert len(before["dicomimages"][1]) == 2

    text_ = default_dicom_sql().replace(
        '{ 0x0008, 0x0016, "SOPClassUID", 64, SQL_C_CHAR, DT_UI },',
        '{ 0x0008, 0x0016, "SOPClassUID", 64, SQL_C_CHAR, DT_UI },\n'
        '\t{ 0x0018, 0x0050, "SliceThickness", 16, SQL_C_CHAR, DT_STR },')
    mine = tmp_path / "my-dicom.sql"
    mine.write_text(text_, encoding="utf-8")
    proc = _cli(settings, "--dicom-sql", str(mine), "init")
    assert "added DICOMImages.SliceThick" in proc.stderr.replace("dicomimages.slicethick", "DICOMImages.SliceThick")

    after = _snapshot(engine)
    assert "slicethick" in after["dicomimages"][0]
    for name, (columns, rows) in before.items():
        assert _project(after[name], columns) == rows, name
    assert {r[after["dicomimages"][0].index("slicethick")] for r in after["dicomimages"][1]} == {None}
    # the new column is filled by a rebuild from the stored files, as any column
    ctx = open_context(Settings(database_url=db_url, storage=tmp_path / "data", fsync=False, dicom_sql=mine))
    assert ctx.index.create() == []
    Importer(ctx.index, ctx.storage, workers=1).rebuild()
    _, rows = ctx.index.run_sql("select SliceThick from DICOMImages where SliceThick is not null")
    assert sorted(r[0] for r in rows) == ["0.8000", "5.000000"]  # MR_small, CT_small
    ctx.index.engine.dispose()
    # and init with the shipped file again keeps the column and its values (never dropped)
    _cli(settings, "init")
    with engine.connect() as conn:
        table = "dicomimages" if engine.dialect.name == "postgresql" else "DICOMImages"
        assert conn.execute(text(f"select count(SliceThick) from {table}")).scalar() == 2
        assert conn.execute(select(func.count()).select_from(text(table))).scalar() == 2
    engine.dispose()


def test_a_database_migrated_by_a_newer_pacsbridge_is_refused(tmp_path):
    """A revision this version does not know: refused with a message that says so, nothing changed."""
    from pacsbridge.shared.core.errors import IndexError_

    url = f"sqlite:///{tmp_path / 'newer.db'}"
    ctx = open_context(Settings(database_url=url, storage=tmp_path / "data", fsync=False))
    ctx.index.create()
    with ctx.index.engine.begin() as conn:
        conn.execute(text(f"UPDATE {migrations.VERSION_TABLE} SET version_num = '9999'"))
    with pytest.raises(IndexError_, match="revision 9999.*newer pacsbridge"):
        ctx.index.create()
    with ctx.index.engine.connect() as conn:
        assert migrations.current(conn) == "9999"
    ctx.index.engine.dispose()


def _index_names(engine: Engine, table: str) -> set[str]:
    insp = inspect(engine)
    name = next(n for n in insp.get_table_names() if n.lower() == table)
    return {str(ix["name"]).lower() for ix in insp.get_indexes(name)}


def test_the_query_indexes_upgrade_and_downgrade_keeping_the_rows(db_url, tmp_path):
    """Revision 0007 (a study by date and by accession, issue 19): an index at 0006 without them gets them,
    every row kept; its downgrade drops them and only them, and the next start adds them again."""
    from alembic import command

    settings = Settings(database_url=db_url, storage=tmp_path / "data", fsync=False)
    ctx = open_context(settings)
    ctx.index.create()
    ctx.storage.ensure()
    assert Importer(ctx.index, ctx.storage, workers=1).import_paths([TEST_FILES / "CT_small.dcm"]).stored == 1
    wanted = {"dicomstudies_studydate", "dicomstudies_accessionn"}
    at_head = _index_names(ctx.index.engine, "dicomstudies")
    assert wanted <= at_head and "dicomstudies_patientid" in at_head

    with ctx.index.engine.begin() as conn:
        command.downgrade(migrations.config(conn), "0006")
    with ctx.index.engine.connect() as conn:
        assert migrations.current(conn) == "0006"
    assert _index_names(ctx.index.engine, "dicomstudies") == at_head - wanted
    before = _snapshot(ctx.index.engine)

    with ctx.index.engine.begin() as conn:
        done = migrations.upgrade(conn, list(ctx.index.tables.values()))
    assert done == ["migrated from 0006 to 0007"]  # the revision made them: nothing left for the completion
    assert _index_names(ctx.index.engine, "dicomstudies") == at_head
    after = _snapshot(ctx.index.engine)
    assert after.pop(migrations.VERSION_TABLE) == (["version_num"], [("0007",)])
    before.pop(migrations.VERSION_TABLE)
    assert after == before and after["dicomimages"][1]
    ctx.index.engine.dispose()


def test_head_read_from_the_scripts_is_alembics():
    """head() reads the revision lines of the scripts instead of loading Alembic (each command's start)."""
    from pacsbridge.shared.core.migrations import _alembic_head, head

    assert head() == _alembic_head()
