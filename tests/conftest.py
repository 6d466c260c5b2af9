"""Fixtures: the embedded SQLite index and the real PostgreSQL, side by side.

SQLAlchemy and pacsbridge are imported where a fixture runs, not here: pytest loads this file for every
test, and ``tests/test_architecture.py`` must run on a fresh clone with pytest alone (docs/testing.md).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import pytest

if TYPE_CHECKING:
    from pacsbridge.shared.core.config import Settings
    from pacsbridge.shared.index.context import Context

#: The machine's PostgreSQL (trust auth); .ci/run starts it.
PG_ADMIN_URL = os.environ.get("PACSBRIDGE_TEST_PG", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres")


def _pg_database() -> Iterator[str]:
    from sqlalchemy import create_engine, text

    name = f"pacsbridge_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))  # name is ours, not user input
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"),
                         {"n": name})
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh database on the real PostgreSQL, dropped afterwards."""
    yield from _pg_database()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Each test using it runs once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'conquest.db'}"
    else:
        yield from _pg_database()


@pytest.fixture
def settings(db_url: str, tmp_path: Path) -> Settings:
    from pacsbridge.shared.core.config import Settings

    return Settings(database_url=db_url, storage=tmp_path / "data", fsync=False)


@pytest.fixture
def ctx(settings: Settings) -> Iterator[Context]:
    from pacsbridge.shared.index.context import open_context

    context = open_context(settings)
    context.index.create()
    context.storage.ensure()
    yield context
    context.index.engine.dispose()


def cli_env(settings: Settings) -> dict[str, str]:
    """Environment for running the ``pacsbridge`` command against ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACSBRIDGE_")}
    env.update({"PACSBRIDGE_DATABASE_URL": settings.database_url, "PACSBRIDGE_STORAGE": str(settings.storage),
                "PACSBRIDGE_FSYNC": "0"})
    return env
