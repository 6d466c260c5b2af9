#!/usr/bin/env python
"""Compare ``pacsbridge rebuild`` (PostgreSQL) with pyconquest's rebuild on the same files.

Usage::

    python bench/rebuild.py [--instances 2000] [--runs 3]
        [--workdir /tmp/pacsbridge-bench-rebuild]
        [--pg-url postgresql+psycopg2://postgres@127.0.0.1:5432/pacsbridge_bench]
        [--workers N] [--no-pyconquest]

Steps:

1. ``bench/gen_ct.py`` writes N synthetic 512x512 CT instances into
   ``WORKDIR/gen`` (cached: reused while a stamp file says the count matches),
   and ``pacsbridge import`` stores them into ``WORKDIR/storage`` with a
   throw-away SQLite index (``PACSBRIDGE_FSYNC=0``), which gives the
   ``<PatientID>/<Study>/<Series>/<SOP>.dcm`` layout (also cached).
2. The PostgreSQL database named in ``--pg-url`` is created if missing.  Each
   run does ``pacsbridge --database URL --storage ROOT init --force`` and then
   times ``pacsbridge ... rebuild --format json`` as a subprocess: the
   headline files/s is N / wall time of that process (interpreter start and
   imports included); the rate pacsbridge reports itself
   (``files_per_second``) is shown next to it.  Each run checks
   ``indexed == N``, ``rejected == 0`` and ``select count(*) from
   dicomimages == N``.
3. ``bench/rebuild_pyconquest.py`` times pyconquest on the same files, the
   same number of runs, each right after a pacsbridge run (the tools in turn,
   so that a shared machine's load weighs on both alike; the 1-minute load
   average after each run is in the JSON).  pyconquest wants one folder per patient under its
   data directory; the storage root already is that (its first level is the
   PatientID), which is used if pyconquest indexes all N files from it,
   otherwise a symlink tree of the stored files is built and used instead.
   pyconquest's rate is its in-process rate (its own timer, process start and
   imports *not* included), so the ratio is conservative for pacsbridge.
4. A table (median of the runs, every run listed) and one final JSON line.

The page cache cannot be dropped here; every file is read once before timing
so that caches are warm for both tools alike, and the output says so.

Exit status: 0 if every check passed, 1 if a check failed (the JSON line
lists the problems), 2 for bad usage.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from sqlalchemy import create_engine, text

from benchlib import count_files, ensure_database, host_facts, median, read_stamp, warm_cache, write_stamp  # noqa: E402  (bench/ is on sys.path)

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_WORKDIR = Path("/tmp/pacsbridge-bench-rebuild")
DEFAULT_PG_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/pacsbridge_bench"
TARGET_FILES_PER_S = 1000
TARGET_RATIO = 15  #: issue 19: in-process, against pyconquest in-process
TARGET_RATIO_WALL = 5  #: the whole pacsbridge process against pyconquest in-process
_INDEX_TABLES = ("dicomimages", "dicomseries", "dicomstudies", "dicompatients")


# -- small helpers -----------------------------------------------------------------------
def log(msg: str) -> None:
    """Progress message on stderr (stdout carries the table and the JSON line)."""
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def pacsbridge_exe() -> str:
    """Path of the ``pacsbridge`` console script (next to this interpreter, else PATH)."""
    candidate = Path(sys.executable).parent / "pacsbridge"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("pacsbridge")
    if not found:
        raise SystemExit("pacsbridge command not found (activate the venv)")
    return found


def clean_env(**extra: str) -> dict[str, str]:
    """The current environment without ``PACSBRIDGE_*`` settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACSBRIDGE_")}
    env.update(extra)
    return env


def run_cmd(cmd: list[str], env: dict[str, str] | None = None,
            ok_codes: tuple[int, ...] = (0,)) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``cmd`` (no shell), capture output; return it and its wall time in s.

    Raises ``RuntimeError`` with the command, exit code and stderr tail if the
    exit code is not in ``ok_codes``.
    """
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if proc.returncode not in ok_codes:
        raise RuntimeError(
            f"command failed (exit {proc.returncode}): {' '.join(cmd)}\n"
            f"--- stderr ---\n{proc.stderr[-4000:]}\n--- stdout ---\n{proc.stdout[-2000:]}")
    return proc, wall


def parse_json_object(stdout: str) -> dict:
    """The JSON object in ``stdout`` (pacsbridge prints it indented, over many lines)."""
    start = stdout.find("{")
    if start < 0:
        raise ValueError(f"no JSON object in output: {stdout[:500]!r}")
    return json.loads(stdout[start:])


def parse_json_line(stdout: str) -> dict:
    """The last line of ``stdout`` that is a JSON object."""
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError(f"no JSON line in output: {stdout[:500]!r}")


# -- step 1: data ------------------------------------------------------------------------
def prepare_generated(workdir: Path, instances: int) -> Path:
    """Synthetic CT files in ``WORKDIR/gen`` (flat), generated once per instance count."""
    gen = workdir / "gen"
    stamp = workdir / "gen.json"
    if read_stamp(stamp).get("instances") == instances and count_files(gen) == instances:
        log(f"reusing {instances} generated files in {gen}")
        return gen
    shutil.rmtree(gen, ignore_errors=True)
    stamp.unlink(missing_ok=True)
    log(f"generating {instances} CT instances into {gen} ...")
    proc, wall = run_cmd([sys.executable, str(BENCH_DIR / "gen_ct.py"), str(gen),
                          "--instances", str(instances), "--layout", "flat"])
    log(proc.stdout.strip() or f"generated in {wall:.1f} s")
    write_stamp(stamp, {"instances": instances})
    return gen


def prepare_storage(workdir: Path, gen: Path, instances: int) -> Path:
    """``pacsbridge import`` the generated files into ``WORKDIR/storage`` (cached)."""
    storage = workdir / "storage"
    stamp = workdir / "storage.json"
    if read_stamp(stamp).get("instances") == instances and count_files(storage) == instances:
        log(f"reusing pacsbridge storage {storage}")
        return storage
    shutil.rmtree(storage, ignore_errors=True)
    stamp.unlink(missing_ok=True)
    sqlite = workdir / "import-index.sqlite"
    sqlite.unlink(missing_ok=True)
    env = clean_env(PACSBRIDGE_STORAGE=str(storage),
                    PACSBRIDGE_DATABASE_URL=f"sqlite:///{sqlite}",
                    PACSBRIDGE_FSYNC="0")
    log(f"pacsbridge import {gen} -> {storage} ...")
    proc, wall = run_cmd([pacsbridge_exe(), "import", str(gen), "--format", "json"], env=env,
                         ok_codes=(0, 1))
    report = parse_json_object(proc.stdout)
    stored = count_files(storage)
    log(f"imported in {wall:.1f} s: stored={report.get('stored')} indexed={report.get('indexed')} "
        f"rejected={report.get('rejected')} duplicate={report.get('duplicate')}; {stored} files in storage")
    if proc.returncode != 0 or report.get("rejected") or stored != instances:
        raise RuntimeError(f"import incomplete: exit {proc.returncode}, report "
                           f"{json.dumps({k: v for k, v in report.items() if k != 'rejections'})}, "
                           f"{stored} files in storage, first rejections "
                           f"{report.get('rejections', [])[:5]}")
    sqlite.unlink(missing_ok=True)  # only needed for the import step
    write_stamp(stamp, {"instances": instances})
    return storage


def symlink_tree(storage: Path, target: Path) -> Path:
    """Symlink every (non-dot) stored file into ``target`` with the same relative path."""
    shutil.rmtree(target, ignore_errors=True)
    for folder, dirs, files in os.walk(storage):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel = Path(folder).relative_to(storage)
        for name in files:
            if name.startswith("."):
                continue
            dest = target / rel / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.symlink_to(Path(folder, name).resolve())
    return target


# -- step 2: PostgreSQL + pacsbridge ------------------------------------------------------
def index_counts(pg_url: str) -> dict[str, int]:
    """Row counts of the four index tables in PostgreSQL."""
    engine = create_engine(pg_url)
    try:
        with engine.connect() as conn:
            # t comes from the fixed tuple of index tables, never from input
            return {t: int(conn.execute(text(f"select count(*) from {t}")).scalar())
                    for t in _INDEX_TABLES}
    finally:
        engine.dispose()


def pacsbridge_run(pg_url: str, storage: Path, instances: int,
                   workers: int | None) -> tuple[dict, list[str]]:
    """``init --force`` then a timed ``rebuild``; return (run result, problems)."""
    exe = pacsbridge_exe()
    base = [exe, "--database", pg_url, "--storage", str(storage)]
    env = clean_env()
    run_cmd(base + ["init", "--force"], env=env)
    cmd = base + ["rebuild", "--format", "json"]
    if workers is not None:
        cmd += ["--workers", str(workers)]
    proc, wall = run_cmd(cmd, env=env, ok_codes=(0, 1))
    report = parse_json_object(proc.stdout)
    counts = index_counts(pg_url)
    problems = []
    if proc.returncode != 0:
        problems.append(f"pacsbridge rebuild exit {proc.returncode}: {' '.join(cmd)}")
    if report.get("indexed") != instances:
        problems.append(f"pacsbridge indexed {report.get('indexed')} != {instances}")
    if report.get("rejected"):
        problems.append(f"pacsbridge rejected {report['rejected']} files, e.g. "
                        f"{report.get('rejections', [])[:3]}")
    if counts["dicomimages"] != instances:
        problems.append(f"select count(*) from dicomimages = {counts['dicomimages']} != {instances}")
    result = {
        "workers": workers,
        "wall_seconds": round(wall, 3),
        "files_per_s": round(instances / wall, 1),
        "inprocess_seconds": report.get("seconds"),
        "inprocess_files_per_s": report.get("files_per_second"),
        "indexed": report.get("indexed"),
        "rejected": report.get("rejected"),
        "rows": counts,
    }
    return result, problems


# -- step 3: pyconquest --------------------------------------------------------------------
def pyconquest_run(datadir: Path, instances: int) -> tuple[dict, list[str]]:
    """One ``bench/rebuild_pyconquest.py`` run; return (its JSON + wall time, problems)."""
    cmd = [sys.executable, str(BENCH_DIR / "rebuild_pyconquest.py"), str(datadir)]
    proc, wall = run_cmd(cmd, ok_codes=(0, 1))
    result = parse_json_line(proc.stdout)
    result["wall_seconds"] = round(wall, 3)
    problems = []
    if proc.returncode != 0 or result.get("rows") != instances or result.get("files") != instances:
        problems.append(f"pyconquest: exit {proc.returncode}, files={result.get('files')}, "
                        f"rows={result.get('rows')}, errors={result.get('errors')} (expected {instances}); "
                        f"samples {result.get('error_samples', [])[:3]}")
    return result, problems


def pyconquest_datadir(workdir: Path, storage: Path, instances: int) -> tuple[Path, dict, list[str]]:
    """Pick pyconquest's data dir: the storage root if it indexes all N, else a symlink tree.

    Returns (data dir, the first run's result if it counts, problems of that run).
    """
    first, problems = pyconquest_run(storage, instances)
    if not problems:
        log("pyconquest indexes all files straight from the storage root")
        return storage, first, []
    log(f"pyconquest on the storage root was incomplete ({problems[0]}); using a symlink tree")
    tree = symlink_tree(storage, workdir / "pyconquest-data")
    return tree, {}, []


# -- report -----------------------------------------------------------------------------
def machine_facts() -> dict:
    """nproc, CPU model, memory, Python and library versions."""
    return host_facts(("pacsbridge", "pyconquest", "pydicom", "sqlalchemy", "psycopg2-binary", "psycopg2"),
                      key="{}_version")


def print_table(instances: int, pb_runs: list[dict], pq_runs: list[dict]) -> None:
    """Human-readable table: every run, then the medians."""
    print(f"\nrebuild benchmark, {instances} CT instances (512x512, ~0.5 MB each)")
    print("caches: WARM for both tools (page cache cannot be dropped here; "
          "every file was read once before timing)")
    print(f"{'tool':<12} {'run':>4} {'wall s':>8} {'files/s':>9} {'in-proc s':>10} {'in-proc f/s':>12}")
    for i, r in enumerate(pb_runs, 1):
        print(f"{'pacsbridge':<12} {i:>4} {r['wall_seconds']:>8.2f} {r['files_per_s']:>9.1f} "
              f"{r['inprocess_seconds'] or 0:>10.2f} {r['inprocess_files_per_s'] or 0:>12.1f}")
    for i, r in enumerate(pq_runs, 1):
        print(f"{'pyconquest':<12} {i:>4} {r['wall_seconds']:>8.2f} {'':>9} "
              f"{r['seconds']:>10.2f} {r['files_per_s'] or 0:>12.1f}")
    if pb_runs:
        print(f"{'pacsbridge':<12} {'med':>4} {'':>8} {median([r['files_per_s'] for r in pb_runs]):>9.1f} "
              f"{'':>10} {median([r['inprocess_files_per_s'] or 0 for r in pb_runs]):>12.1f}")
    if pq_runs:
        print(f"{'pyconquest':<12} {'med':>4} {'':>8} {'':>9} {'':>10} "
              f"{median([r['files_per_s'] or 0 for r in pq_runs]):>12.1f}")
    print("pacsbridge files/s = N / wall time of the `pacsbridge rebuild` process (start-up included); "
          "pyconquest files/s = its in-process rate (start-up excluded)\n")


def summarize(args: argparse.Namespace, pb_runs: list[dict], pq_runs: list[dict],
              problems: list[str], facts: dict) -> dict:
    """The final JSON object."""
    pb = median([r["files_per_s"] for r in pb_runs])
    pb_inproc = median([r["inprocess_files_per_s"] or 0 for r in pb_runs])
    pq = median([r["files_per_s"] or 0 for r in pq_runs])
    return {
        "instances": args.instances,
        "pacsbridge_files_per_s": pb,
        "pacsbridge_runs": [r["files_per_s"] for r in pb_runs],
        "pacsbridge_inprocess_files_per_s": pb_inproc,
        "pacsbridge_inprocess_runs": [r["inprocess_files_per_s"] for r in pb_runs],
        "pacsbridge_workers": args.workers if args.workers is not None else "default",
        "pyconquest_files_per_s": pq,
        "pyconquest_runs": [r["files_per_s"] for r in pq_runs],
        "loadavg_runs": [r.get("loadavg") for r in pb_runs + pq_runs],
        "ratio": round(pb / pq, 2) if pb and pq else None,
        "ratio_inprocess": round(pb_inproc / pq, 2) if pb_inproc and pq else None,
        "target_files_per_s": TARGET_FILES_PER_S,
        "target_ratio": TARGET_RATIO,
        "meets_target_files_per_s": bool(pb and pb >= TARGET_FILES_PER_S),
        "target_ratio_wall": TARGET_RATIO_WALL,
        "meets_target_ratio": bool(pb_inproc and pq and pb_inproc / pq >= TARGET_RATIO),
        "meets_target_ratio_wall": bool(pb and pq and pb / pq >= TARGET_RATIO_WALL),
        "caches": "warm (both tools)",
        "database": "postgresql (pacsbridge) / sqlite (pyconquest)",
        "machine": facts,
        "problems": problems,
    }


# -- main ------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    parser = argparse.ArgumentParser(
        description="Time `pacsbridge rebuild` (PostgreSQL) against pyconquest on synthetic CT.")
    parser.add_argument("--instances", type=int, default=2000, help="CT instances (default: 2000)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per tool (default: 3)")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                        help=f"cache for generated files and storage (default: {DEFAULT_WORKDIR})")
    parser.add_argument("--pg-url", default=DEFAULT_PG_URL,
                        help=f"PostgreSQL index database, created if missing (default: {DEFAULT_PG_URL})")
    parser.add_argument("--workers", type=int, default=None,
                        help="pass --workers N to pacsbridge rebuild (default: its own default)")
    parser.add_argument("--no-pyconquest", action="store_true", help="skip the pyconquest runs")
    args = parser.parse_args(argv)
    if args.instances < 1 or args.runs < 1:
        parser.error("--instances and --runs must be >= 1")
    if args.workers is not None and args.workers < 1:
        parser.error("--workers must be >= 1")

    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    facts = machine_facts()
    problems: list[str] = []
    pb_runs: list[dict] = []
    pq_runs: list[dict] = []
    try:
        gen = prepare_generated(workdir, args.instances)
        storage = prepare_storage(workdir, gen, args.instances)
        facts["postgres_version"] = ensure_database(args.pg_url)
        files, size = warm_cache(storage)
        log(f"warmed page cache: read {files} files, {size / 1e6:.0f} MB")

        datadir: Path | None = None
        for i in range(args.runs):  # the tools in turn, so that the machine's load weighs on both alike
            result, errs = pacsbridge_run(args.pg_url, storage, args.instances, args.workers)
            result["loadavg"] = round(os.getloadavg()[0], 2)
            pb_runs.append(result)
            problems += errs
            log(f"pacsbridge run {i + 1}/{args.runs}: {result['wall_seconds']:.2f} s wall, "
                f"{result['files_per_s']} files/s (in-process {result['inprocess_files_per_s']}, "
                f"load {result['loadavg']})" + (f"; PROBLEMS: {errs}" if errs else ""))
            if args.no_pyconquest:
                continue
            if datadir is None:
                datadir, first, errs = pyconquest_datadir(workdir, storage, args.instances)
                facts["pyconquest_datadir"] = str(datadir)
                if first:
                    first["loadavg"] = round(os.getloadavg()[0], 2)
                    pq_runs.append(first)
                    log(f"pyconquest run 1/{args.runs}: {first['seconds']:.2f} s, {first['files_per_s']} files/s")
                    continue
            result, errs = pyconquest_run(datadir, args.instances)
            result["loadavg"] = round(os.getloadavg()[0], 2)
            pq_runs.append(result)
            problems += errs
            log(f"pyconquest run {len(pq_runs)}/{args.runs}: {result['seconds']:.2f} s, "
                f"{result['files_per_s']} files/s (load {result['loadavg']})" + (f"; PROBLEMS: {errs}" if errs else ""))
    except (RuntimeError, ValueError) as exc:
        problems.append(str(exc))
        log(f"ERROR: {exc}")

    print_table(args.instances, pb_runs, pq_runs)
    for p in problems:
        print(f"PROBLEM: {p}")
    print(json.dumps(summarize(args, pb_runs, pq_runs, problems, facts)), flush=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
