"""Helpers shared by the benchmark scripts (run from the repository: ``python bench/X.py``)."""

from __future__ import annotations

import argparse

import json
import os
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Iterator

__all__ = ["DB_NAME_RE", "log", "median", "ensure_database", "host_facts", "count_files", "read_stamp",
           "write_stamp", "warm_cache", "cpu_ticks", "machine_cpu_s", "cpu_busy", "wait_quiet", "PROBE_FILES",
           "create_probe", "truncate_files"]

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


def count_files(root: Path, skip_dot: bool = True) -> int:
    """Regular files below ``root`` (dot-files/-folders skipped unless ``skip_dot`` is False)."""
    total = 0
    for _folder, dirs, files in os.walk(root):
        if skip_dot:
            dirs[:] = [d for d in dirs if not d.startswith(".")]
        total += sum(1 for f in files if not (skip_dot and f.startswith(".")))
    return total


def read_stamp(path: Path) -> dict:
    """A cache stamp (JSON) or ``{}``."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def write_stamp(path: Path, data: dict) -> None:
    """Write a cache stamp (JSON)."""
    path.write_text(json.dumps(data) + "\n")


def warm_cache(root: Path) -> tuple[int, int]:
    """Read every file below ``root`` once (follows symlinks); return (files, bytes)."""
    files = size = 0
    for folder, _dirs, names in os.walk(root):
        for name in names:
            with open(os.path.join(folder, name), "rb") as fh:
                while chunk := fh.read(1 << 20):
                    size += len(chunk)
            files += 1
    return files, size


def cpu_ticks() -> tuple[int, int]:
    """``(total, idle)`` clock ticks of all cores so far (``/proc/stat``; idle includes iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    return sum(fields), fields[3] + fields[4]


def machine_cpu_s() -> float:
    """Busy CPU seconds of the whole machine so far, all cores."""
    total, idle = cpu_ticks()
    return (total - idle) / os.sysconf("SC_CLK_TCK")


def cpu_busy(seconds: float = 0.5) -> float:
    """Fraction of all CPU time that was busy over ``seconds`` (from /proc/stat): other load on the box."""
    total0, idle0 = cpu_ticks()
    time.sleep(seconds)
    total1, idle1 = cpu_ticks()
    return round(1 - (idle1 - idle0) / max(1, total1 - total0), 2)


def wait_quiet(max_wait: float, threshold: float = 0.15) -> float:
    """Sync the disks, then wait (up to ``max_wait`` s) for mostly idle CPUs; return the last busy fraction.

    Other work on the machine would be measured as part of whichever command runs at the time.
    """
    os.sync()
    start = time.perf_counter()
    busy = cpu_busy()
    while busy > threshold and time.perf_counter() - start < max_wait:
        busy = cpu_busy()
    return busy


#: Empty files the create probe makes before each run.
PROBE_FILES = 200


def create_probe(folder: Path) -> float:
    """Milliseconds to create one empty file in a new folder ``folder`` (mean of :data:`PROBE_FILES`).

    On ext4 without a journal (this project's CI machines), creating a file skips,
    one by one, every inode freed in the last 1-5 minutes (``recently_deleted()``
    in ``find_inode_bit``): after a run's 2,000 files were deleted the next target paid
    0.4-0.7 ms of kernel time per file it created (0.02 ms otherwise), whichever target
    came next. The runs therefore delete nothing (:func:`truncate_files`), and this
    probe records what creating a file cost before each run. Its files stay (deleting
    them would be the very thing it measures).
    """
    folder.mkdir(parents=True)
    t0 = time.perf_counter()
    for i in range(PROBE_FILES):
        os.close(os.open(folder / f"p{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    return round((time.perf_counter() - t0) / PROBE_FILES * 1e3, 3)


def truncate_files(root: Path) -> None:
    """Give back the disk space of a finished run but keep its inodes (see :func:`create_probe`)."""
    for folder, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            try:
                if not os.path.islink(path):
                    os.truncate(path, 0)
            except OSError:
                pass


def group_stats(pgids: set[int], zombies: bool = False) -> "Iterator[tuple[int, list[str]]]":
    """``(pid, fields of /proc/<pid>/stat after the command)`` of every process in the process groups
    ``pgids``, zombies only if asked (``fields[2]`` is the group, ``[11]``/``[12]`` user/system ticks,
    ``[21]`` the RSS in pages)."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        if int(fields[2]) in pgids and (zombies or fields[0] != "Z"):
            yield int(entry.name), fields


def pacsbridge_settings(parser: "argparse.ArgumentParser", items: list[str]) -> dict[str, str]:
    """``--set PACSBRIDGE_NAME=VALUE`` options as a mapping (a bad one is the parser's usage error)."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.startswith("PACSBRIDGE_"):
            parser.error(f"--set {item!r}: expected PACSBRIDGE_NAME=VALUE")
        out[name] = value
    return out
