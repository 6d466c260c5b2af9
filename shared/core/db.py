"""Database engines for the index: SQLite (embedded default) or PostgreSQL."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine, make_url

from pacsbridge.shared.core.errors import ConfigError

__all__ = ["make_engine"]


def _sqlite_pragmas(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def make_engine(url: str) -> Engine:
    """An Engine for ``url``: ``sqlite:///file.db`` or ``postgresql://...``.

    SQLite gets WAL mode and a busy timeout so that a worker and the CLI can
    share the file; its folder is created. PostgreSQL uses psycopg2 with
    pre-ping, so a restarted server costs a reconnect, not an error.
    """
    try:
        parsed = make_url(url)
    except Exception:
        raise ConfigError(f"PACSBRIDGE_DATABASE_URL={url!r} is not a database URL") from None
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(parsed, connect_args={"timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    if backend == "postgresql":
        if parsed.drivername == "postgresql":
            parsed = parsed.set(drivername="postgresql+psycopg2")
        return create_engine(parsed, pool_pre_ping=True, executemany_mode="values_plus_batch")
    raise ConfigError(f"PACSBRIDGE_DATABASE_URL: unsupported database {backend!r} (use sqlite or postgresql)")
