#!/usr/bin/env python
"""Time pyconquest's ``rebuild_database_from_dicom`` on a directory of DICOM files.

Prints exactly one JSON line on stdout, e.g.::

    {"tool": "pyconquest", "files": 200, "seconds": 3.1, "files_per_s": 64.5,
     "rows": 200, ...}

so a comparison benchmark can run it in a subprocess::

    python bench/rebuild_pyconquest.py DATADIR [--limit N]

What is timed is the single call
``rebuild_database_from_dicom(compute_only_missing=False, check_existing=False)``
-- the settings pyconquest's own docstring recommends for an initial rebuild.
It walks ``data_directory`` with ``os.walk``, reads every file completely with
``pydicom.dcmread`` (pixel data included), and issues one ``INSERT`` + commit
per image (plus a lookup/insert per new series, study and patient) into a
SQLite file.  Construction of the ``pyconquest`` object and
``create_standard_dicom_tables()`` are done before the clock starts.

Nothing is left behind: pyconquest writes ``pyconquest_error.log`` into the
current directory *at import time* and the SQLite file wherever it is told, so
the script imports it from inside a temporary working directory that also
holds the database and is deleted afterwards.

``--limit N`` runs on the first N files (sorted by relative path) by
symlinking them into a temporary data directory (same relative layout); the
reported rate can be extrapolated to the full set (``extrapolated_seconds``).

Row counts of DICOMimages/DICOMseries/DICOMstudies/DICOMpatients are queried
from the SQLite file afterwards, and errors pyconquest logged (it swallows
per-file exceptions and only logs them) are counted, so a silent failure shows
up as ``rows`` < ``files`` and ``errors`` > 0 rather than as a fast rate.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

_TABLES = ("DICOMimages", "DICOMseries", "DICOMstudies", "DICOMpatients")
#: One literal query per table (identifiers cannot be bound parameters, so none is built from a string).
_COUNT_SQL = {
    "DICOMimages": "SELECT COUNT(*) FROM DICOMimages",
    "DICOMseries": "SELECT COUNT(*) FROM DICOMseries",
    "DICOMstudies": "SELECT COUNT(*) FROM DICOMstudies",
    "DICOMpatients": "SELECT COUNT(*) FROM DICOMpatients",
}


class _ErrorCollector(logging.Handler):
    """Logging handler that counts ERROR records and keeps the first few."""

    def __init__(self, keep: int = 5) -> None:
        super().__init__(level=logging.ERROR)
        self.count = 0
        self.keep = keep
        self.samples: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1
        if len(self.samples) < self.keep:
            self.samples.append(record.getMessage()[:300])


def _list_files(datadir: Path) -> list[Path]:
    """All regular files below ``datadir``, as sorted relative paths."""
    found = []
    for root, _dirs, files in os.walk(datadir):
        for name in files:
            full = Path(root, name)
            if full.is_file():
                found.append(full.relative_to(datadir))
    return sorted(found)


def _link_subset(datadir: Path, files: list[Path], target: Path) -> None:
    """Symlink ``files`` (relative to ``datadir``) into ``target``."""
    for rel in files:
        dest = target / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.symlink_to((datadir / rel).resolve())


@contextlib.contextmanager
def _chdir(path: Path):
    """Temporarily change the working directory."""
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def _count_rows(db_path: Path) -> dict[str, int | None]:
    """Row count per conquest table (None if the table is missing)."""
    counts: dict[str, int | None] = {}
    conn = sqlite3.connect(db_path)
    try:
        for table in _TABLES:
            try:
                counts[table] = conn.execute(_COUNT_SQL[table]).fetchone()[0]
            except sqlite3.Error:
                counts[table] = None
    finally:
        conn.close()
    return counts


def run(datadir: Path, limit: int | None = None, check_existing: bool = False,
        compute_only_missing: bool = False, tmp_parent: str | None = None,
        keep_db: Path | None = None) -> dict:
    """Run the pyconquest rebuild on ``datadir`` and return the result dict.

    ``keep_db``, if given, receives a copy of the SQLite file for inspection.
    """
    datadir = datadir.resolve()
    if not datadir.is_dir():
        raise SystemExit(f"not a directory: {datadir}")
    all_files = _list_files(datadir)
    selected = all_files if limit is None else all_files[:limit]

    with tempfile.TemporaryDirectory(prefix="bench_pyconquest_", dir=tmp_parent) as tmp:
        tmp = Path(tmp)
        if limit is not None and len(selected) < len(all_files):
            data_dir = tmp / "data"
            data_dir.mkdir()
            _link_subset(datadir, selected, data_dir)
        else:
            data_dir = datadir
        db_path = tmp / "conquest.db"

        with _chdir(tmp):
            # Import here: pyconquest opens ./pyconquest_error.log at import time.
            # (``pyconquest.pyconquest`` is shadowed by the class that the
            # package __init__ re-exports, so fetch the module via importlib.)
            pq_module = importlib.import_module("pyconquest.pyconquest")

            logger = pq_module.log
            # Keep stdout/stderr clean: drop its stderr handler, collect instead.
            for handler in list(logger.handlers):
                if isinstance(handler, logging.StreamHandler) and not isinstance(
                        handler, logging.FileHandler):
                    logger.removeHandler(handler)
            collector = _ErrorCollector()
            logger.addHandler(collector)
            try:
                pq = pq_module.pyconquest(
                    data_directory=str(data_dir),
                    sql_inifile_name=str(tmp / "dicom.sql"),  # absent -> default layout
                    database_filename=str(db_path),
                    loglevel="ERROR",
                )
                pq.create_standard_dicom_tables()
                start = time.perf_counter()
                counter = pq.rebuild_database_from_dicom(
                    compute_only_missing=compute_only_missing,
                    check_existing=check_existing,
                )
                seconds = time.perf_counter() - start
                pq.close_db()
            finally:
                logger.removeHandler(collector)
                for handler in list(logger.handlers):  # release the error log
                    if isinstance(handler, logging.FileHandler):
                        handler.close()
                        logger.removeHandler(handler)

        counts = _count_rows(db_path)
        if keep_db is not None:
            shutil.copyfile(db_path, keep_db)

    rate = counter / seconds if seconds > 0 else None
    result = {
        "tool": "pyconquest",
        "files": counter,
        "seconds": round(seconds, 3),
        "files_per_s": round(rate, 2) if rate else None,
        "rows": counts["DICOMimages"],
        "series_rows": counts["DICOMseries"],
        "study_rows": counts["DICOMstudies"],
        "patient_rows": counts["DICOMpatients"],
        "errors": collector.count,
        "total_files": len(all_files),
        "extrapolated_seconds": (round(len(all_files) / rate, 1) if rate else None),
        "check_existing": check_existing,
        "compute_only_missing": compute_only_missing,
    }
    if collector.samples:
        result["error_samples"] = collector.samples
    return result


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns 0 if every file became a DICOMimages row."""
    parser = argparse.ArgumentParser(
        description="Benchmark pyconquest.rebuild_database_from_dicom; prints one JSON line.")
    parser.add_argument("datadir", type=Path, help="directory with DICOM files (recursive)")
    parser.add_argument("--limit", type=int, default=None,
                        help="only use the first N files (sorted), symlinked into a temp dir")
    parser.add_argument("--check-existing", action="store_true",
                        help="pass check_existing=True (SELECT before each image INSERT)")
    parser.add_argument("--compute-only-missing", action="store_true",
                        help="pass compute_only_missing=True (skip known patient dirs)")
    parser.add_argument("--tmpdir", default=None,
                        help="parent for the temporary cwd/SQLite file (default: system temp; "
                             "e.g. /dev/shm to take fsync cost out of the picture)")
    parser.add_argument("--keep-db", type=Path, default=None, metavar="PATH",
                        help="copy the resulting SQLite database to PATH for inspection")
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be >= 1")

    result = run(args.datadir, limit=args.limit, check_existing=args.check_existing,
                 compute_only_missing=args.compute_only_missing, tmp_parent=args.tmpdir,
                 keep_db=args.keep_db)
    print(json.dumps(result), flush=True)
    for msg in result.get("error_samples", []):
        print(f"pyconquest error: {msg}", file=sys.stderr)
    return 0 if result["rows"] == result["files"] and result["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
