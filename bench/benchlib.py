"""Helpers shared by the benchmark scripts (run from the repository: ``python bench/X.py``)."""

from __future__ import annotations

import re
import statistics
import sys

__all__ = ["DB_NAME_RE", "log", "median", "ensure_database"]

#: A database name the scripts accept (it ends up in CREATE DATABASE).
DB_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


def log(msg: str) -> None:
    """Progress on stderr, so stdout stays the report."""
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def median(values: list[float]) -> float | None:
    """Median rounded to 0.1, or None for no values."""
    return round(statistics.median(values), 1) if values else None


def ensure_database(pg_url: str) -> str:
    """Create the database named in ``pg_url`` if missing (AUTOCOMMIT); return the server version."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    url = make_url(pg_url)
    name = url.database
    if not url.drivername.startswith("postgresql") or not name or not DB_NAME_RE.match(name):
        raise SystemExit(f"--pg-url must be a postgresql URL with a plain database name: {pg_url}")
    admin = create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            version = conn.execute(text("show server_version")).scalar()
            exists = conn.execute(text("select 1 from pg_database where datname = :n"), {"n": name}).scalar()
            if not exists:
                quoted = conn.dialect.identifier_preparer.quote_identifier(name)
                conn.execute(text(f"CREATE DATABASE {quoted}"))
                log(f"created database {name}")
    finally:
        admin.dispose()
    return str(version)
