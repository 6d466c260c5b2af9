"""Helpers shared by the benchmark scripts (run from the repository: ``python bench/X.py``)."""

from __future__ import annotations

import re
import statistics
import sys

__all__ = ["DB_NAME_RE", "log", "median", "ensure_database", "host_facts"]

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


def host_facts(packages: tuple[str, ...], key: str = "{}") -> dict:
    """nproc, CPU model, memory, Python and the versions of ``packages`` (named by ``key``)."""
    import os
    import platform
    from importlib.metadata import PackageNotFoundError, version
    from pathlib import Path

    facts: dict = {
        "nproc": os.cpu_count(),
        "nproc_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                facts["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                facts["mem_gb"] = round(int(line.split()[1]) / 1024 / 1024, 1)
                break
    except OSError:
        pass
    for pkg in packages:
        try:
            facts[key.format(pkg)] = version(pkg)
        except PackageNotFoundError:
            pass
    return facts
