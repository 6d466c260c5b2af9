#!/usr/bin/env python
"""The index at millions of instances (issue 19): queries and API pages on a full index against a small one.

Usage::

    python bench/scale.py [--instances 10000000] [--small 10000] [--queries 200] [--limit 100] [--page 1000]
        [--pg-url postgresql+psycopg2://postgres@127.0.0.1:5432/] [--keep]

Steps, for a *full* index (``--instances``; patients, studies and series in the issue's proportions:
20 k patients, 100 k studies, 1 M series per 10 M instances, unless given) and a *small* one (``--small``):

1. A database of its own, ``pacsbridge_bench_scale_<pid>_full`` / ``_small``, created here and dropped at
   the end (``--keep`` keeps them). No other database is touched. ``Index.create()`` makes Conquest's tables
   with every index pacsbridge declares (the migrations included).
2. **Fill** (:func:`fill`): synthetic rows sent with COPY, the image table's secondary indexes dropped first
   and made again after (as a restore does), then ANALYZE. Skewed, hospital-like distributions: studies per
   patient, series per study and instances per series are log-normal (many 1-instance localisers and CR, a
   few 500-slice CT series), study dates over ten years, one accession number per study, a modality per
   series and the study's modalities in StudyModality.
3. **Queries** (:func:`queries`): study level by PatientID, by a one-week StudyDate range (first 100 by key,
   as the API pages) and by AccessionNumber, each ``--queries`` times with random values: median and p99
   in ms (target p99 <= 50 ms), and the EXPLAIN (ANALYZE, BUFFERS) of one of each.
4. **API** (:func:`api_pages`): the real Flask app (its test client) over the same database:
   ``GET /api/v1/studies?limit=100`` first page, and page ``--page`` reached by following ``next``
   (the last page there is, if fewer), each ``--queries`` times (target p99 <= 100 ms); for comparison the
   same deep page read with SQL OFFSET (what ``offset=`` used to cost; the API now caps it at 10,000).

Other sections of the issue's benchmark (ingest on the full index, the reconciler, ``rebuild --missing``)
are separate steps: add a function taking ``(url, counts)`` and returning a dict, and list it in
:data:`SECTIONS`.

Figures on a shared 2-core machine are "taken under load". One JSON line at the end; exit status 1 if
a target was missed (the JSON line says which), 0 otherwise.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from sqlalchemy import create_engine, select, text
from sqlalchemy.engine import Engine, make_url

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import DB_NAME_RE, log  # noqa: E402

ROOT = "1.2.826.0.1.3680043.8.498"
MODALITIES = (("CT", 0.35, 4.0), ("MR", 0.25, 3.0), ("CR", 0.15, 0.0), ("US", 0.1, 1.5), ("PT", 0.05, 4.5),
              ("DX", 0.05, 0.0), ("SR", 0.05, 0.0))  # name, share of series, log-mean of its instances
DAYS = 3650
FIRST_DAY = np.datetime64("2016-01-01")
TARGET_QUERY_P99_MS = 50.0
TARGET_PAGE_P99_MS = 100.0


# -- sizes and distributions ----------------------------------------------------------------
def split(total: int, parts: int, sigma: float, rng: np.random.Generator, weights: np.ndarray | None = None) \
        -> np.ndarray:
    """``total`` items over ``parts`` owners, each at least 1, skewed log-normally (or by ``weights``)."""
    assert total >= parts >= 1
    w = rng.lognormal(0.0, sigma, parts) if weights is None else weights
    share = w / w.sum() * (total - parts)
    counts = np.floor(share).astype(np.int64)
    short = total - parts - int(counts.sum())
    if short:  # the largest remainders get one more (largest remainder method)
        counts[np.argsort(share - counts)[-short:]] += 1
    return 1 + counts


def sizes(instances: int, patients: int | None, studies: int | None, series: int | None) -> dict[str, int]:
    """The issue's proportions (10 M instances: 20 k patients, 100 k studies, 1 M series) unless given."""
    out = {"instances": instances,
           "series": series or max(1, instances // 10),
           "studies": studies or max(1, instances // 100),
           "patients": patients or max(1, instances // 500)}
    if not out["instances"] >= out["series"] >= out["studies"] >= out["patients"]:
        raise SystemExit(f"need instances >= series >= studies >= patients: {out}")
    return out


# -- the database -----------------------------------------------------------------------------
def make_database(server: str, name: str) -> str:
    """Create database ``name`` (ours, new) on ``server``; its URL."""
    if not DB_NAME_RE.match(name):
        raise SystemExit(f"not a plain database name: {name}")
    admin = create_engine(make_url(server).set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        if conn.execute(text("select 1 from pg_database where datname = :n"), {"n": name}).scalar():
            raise SystemExit(f"database {name} exists already: not ours, not touched")
        conn.execute(text(f'CREATE DATABASE "{name}"'))  # a checked plain name
    admin.dispose()
    return make_url(server).set(database=name).render_as_string(hide_password=False)


def drop_database(server: str, name: str) -> None:
    """Drop the database this run created (and only that one: its name carries this run's pid)."""
    admin = create_engine(make_url(server).set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def _copy(engine: Engine, table: str, columns: list[str], lines: Iterator[str], batch: int = 200_000) -> None:
    """COPY ``lines`` (tab-separated, ``\\N`` for NULL) into ``table`` in batches."""
    raw = engine.raw_connection()
    try:
        with raw.cursor() as cur:
            buf: list[str] = []
            for line in lines:
                buf.append(line)
                if len(buf) >= batch:
                    cur.copy_expert(f"COPY {table} ({', '.join(columns)}) FROM STDIN", io.StringIO("".join(buf)))
                    buf.clear()
            if buf:
                cur.copy_expert(f"COPY {table} ({', '.join(columns)}) FROM STDIN", io.StringIO("".join(buf)))
        raw.commit()
    finally:
        raw.close()


def fill(url: str, counts: dict[str, int], seed: int = 19) -> dict[str, Any]:
    """Make the index's tables and fill them with synthetic rows; seconds per step and the values queried."""
    from pacsbridge.shared.core.config import Settings
    from pacsbridge.shared.index.context import open_context

    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    ctx = open_context(Settings(database_url=url, storage=Path(tempfile.gettempdir()) / "pb-scale-unused"))
    ctx.index.create()
    engine = ctx.index.engine
    n_pat, n_study, n_series, n_inst = (counts[k] for k in ("patients", "studies", "series", "instances"))

    studies_of = split(n_study, n_pat, 1.0, rng)                      # studies per patient
    series_of = split(n_series, n_study, 0.8, rng)                    # series per study
    mod_idx = rng.choice(len(MODALITIES), size=n_series, p=[m[1] for m in MODALITIES])
    mod_mu = np.array([m[2] for m in MODALITIES])[mod_idx]
    inst_of = split(n_inst, n_series, 0.0, rng, weights=np.exp(mod_mu + rng.normal(0, 0.7, n_series)))
    study_patient = np.repeat(np.arange(n_pat), studies_of)
    series_study = np.repeat(np.arange(n_study), series_of)
    study_day = rng.integers(0, DAYS, n_study)
    study_dates = [str(d).replace("-", "") for d in (FIRST_DAY + study_day)]
    # UIDs in no particular order of the patients (a real archive's keys are scattered)
    study_uid = [f"{ROOT}.{rng.integers(10**12)}.{i}" for i in range(n_study)]
    series_uid = [f"{ROOT}.{rng.integers(10**12)}.2.{i}" for i in range(n_series)]
    pids = [f"P{i:08d}" for i in range(n_pat)]
    acc = [f"A{i:010d}" for i in rng.permutation(n_study)]
    mods = [MODALITIES[i][0] for i in mod_idx]
    study_mods: list[set[str]] = [set() for _ in range(n_study)]
    for s, m in zip(series_study, mods):
        study_mods[s].add(m)
    tables = {k: str(ctx.index.tables[k].name) for k in ("Patient", "Study", "Series", "Image")}
    log(f"distributions ready ({time.perf_counter() - started:.1f} s): {counts}")

    t = time.perf_counter()
    _copy(engine, tables["Patient"], ["PatientID", "PatientNam", "PatientBir", "PatientSex"],
          (f"{p}\tDOE^{p}\t19{40 + i % 60:02d}0101\t{'MF'[i % 2]}\n" for i, p in enumerate(pids)))
    _copy(engine, tables["Study"], ["StudyInsta", "StudyDate", "StudyTime", "StudyDescr", "AccessionN",
                                    "StudyModal", "PatientNam", "PatientID"],
          (f"{study_uid[s]}\t{study_dates[s]}\t101500\tSTUDY {s % 50}\t{acc[s]}\t{chr(92).join(sorted(study_mods[s]))}"
           f"\tDOE^{pids[study_patient[s]]}\t{pids[study_patient[s]]}\n" for s in range(n_study)))
    _copy(engine, tables["Series"], ["SeriesInst", "SeriesNumb", "SeriesDate", "Modality", "SeriesDesc",
                                     "SeriesPat", "StudyInsta"],
          (f"{series_uid[r]}\t{r % 20 + 1}\t{study_dates[series_study[r]]}\t{mods[r]}\tSERIES {r % 30}"
           f"\t{pids[study_patient[series_study[r]]]}\t{study_uid[series_study[r]]}\n" for r in range(n_series)))
    seconds = {"patients_studies_series": round(time.perf_counter() - t, 1)}
    log(f"patients, studies, series copied ({seconds['patients_studies_series']} s)")

    image = ctx.index.tables["Image"]
    secondary = [ix for ix in image.indexes]
    with engine.begin() as conn:
        for ix in secondary:
            ix.drop(conn)
    t = time.perf_counter()

    def images() -> Iterator[str]:
        inst_series = 0
        for r in range(n_series):
            s = series_study[r]
            pid = pids[study_patient[s]]
            base = f"{ROOT}.{(r * 7919) % 1000003}.3.{r}"
            for k in range(int(inst_of[r])):
                sop = f"{base}.{k + 1}"
                yield (f"{sop}\t1.2.840.10008.5.1.4.1.1.2\t{k + 1}\t{study_dates[s]}\t{pid}\t{series_uid[r]}\t"
                       f"{pid}/{study_uid[s]}/{series_uid[r]}/{sop}.dcm\tMAG0\n")
            inst_series += 1
            if inst_series % 100_000 == 0:
                log(f"  images: {inst_series:,} of {n_series:,} series")

    _copy(engine, tables["Image"], ["SOPInstanc", "SOPClassUI", "ImageNumbe", "ImageDate", "ImagePat",
                                    "SeriesInst", "ObjectFile", "DeviceName"], images())
    seconds["images_copy"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    with engine.begin() as conn:
        for ix in secondary:
            ix.create(conn)
    seconds["images_indexes"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE"))
    seconds["analyze"] = round(time.perf_counter() - t, 1)
    seconds["total"] = round(time.perf_counter() - started, 1)
    with engine.connect() as conn:
        got = conn.execute(text(f"select count(*) from {tables['Image']}")).scalar_one()  # our own table name
        size = conn.execute(text("select pg_database_size(current_database())")).scalar_one()
    assert got == n_inst, (got, n_inst)
    log(f"filled {n_inst:,} instances in {seconds['total']} s ({int(size) // 2**20} MB)")
    engine.dispose()
    samples = {"patients": [pids[i] for i in rng.integers(0, n_pat, 1000)],
               "accessions": [acc[i] for i in rng.integers(0, n_study, 1000)],
               "days": [int(d) for d in rng.integers(0, DAYS - 7, 1000)]}
    return {"seconds": seconds, "database_mb": int(size) // 2**20, "samples": samples}


# -- measures -------------------------------------------------------------------------------
def pct(values: list[float]) -> dict[str, float]:
    """Median and p99 in ms."""
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]
    return {"median_ms": round(statistics.median(ordered) * 1000, 2), "p99_ms": round(p99 * 1000, 2)}


def _day(d: int) -> str:
    return str(FIRST_DAY + d).replace("-", "")


def queries(url: str, filled: dict[str, Any], runs: int) -> dict[str, Any]:
    """Study-level lookups by PatientID, date range and accession, as the API builds them."""
    from pacsbridge.shared.core.config import Settings
    from pacsbridge.shared.index.context import open_context

    ctx = open_context(Settings(database_url=url, storage=Path(tempfile.gettempdir()) / "pb-scale-unused"))
    study = ctx.index.tables["Study"]
    c = study.c
    s = filled["samples"]
    makers: dict[str, Callable[[int], Any]] = {
        "by_patient_id": lambda i: select(study).where(c.PatientID == s["patients"][i % 1000]),
        "by_date_week": lambda i: select(study).where(c.StudyDate >= _day(s["days"][i % 1000]),
                                                      c.StudyDate <= _day(s["days"][i % 1000] + 6))
        .order_by(c.StudyInsta).limit(100),
        "by_accession": lambda i: select(study).where(c.AccessionN == s["accessions"][i % 1000]),
    }
    out: dict[str, Any] = {}
    with ctx.index.engine.connect() as conn:
        for name, make in makers.items():
            times, rows = [], 0
            for i in range(5):
                conn.execute(make(runs + i)).all()  # warm, with other values than those timed
            for i in range(runs):
                stmt = make(i)
                t = time.perf_counter()
                rows += len(conn.execute(stmt).all())
                times.append(time.perf_counter() - t)
            plan = _explain(conn, make(0))
            out[name] = {**pct(times), "rows_per_query": round(rows / runs, 1), "plan": plan}
    ctx.index.engine.dispose()
    return out


def _explain(conn: Any, stmt: Any) -> list[str]:
    """PostgreSQL's EXPLAIN (ANALYZE, BUFFERS) of ``stmt``, parameters rendered as literals."""
    sql = str(stmt.compile(conn, compile_kwargs={"literal_binds": True}))
    return [r[0] for r in conn.execute(text("EXPLAIN (ANALYZE, BUFFERS) " + sql))]


def api_pages(url: str, filled: dict[str, Any], runs: int, limit: int, page: int) -> dict[str, Any]:
    """``GET /api/v1/studies`` through the real Flask app: the first page and page ``page`` by cursor."""
    from pacsbridge.api import create_app
    from pacsbridge.shared.core.config import Settings

    token = "bench-scale-token-0123456789"
    with tempfile.TemporaryDirectory(prefix="pb-scale-") as tmp:
        settings = Settings(database_url=url, storage=Path(tmp) / "data", api_tokens=f"bench:{token}:read",
                            broker_url=f"sqla+sqlite:///{tmp}/broker.db", fsync=False)
        app = create_app({"SETTINGS": settings, "TESTING": True})
        client = app.test_client()
        headers = {"Authorization": f"Bearer {token}"}

        def get(**query: Any) -> dict[str, Any]:
            resp = client.get("/api/v1/studies", query_string=query, headers=headers)
            assert resp.status_code == 200, resp.get_data(as_text=True)[:300]
            return resp.get_json()  # type: ignore[no-any-return]

        def timed(**query: Any) -> dict[str, Any]:
            for _ in range(5):  # warm: the first requests of an app import and compile what they use
                get(**query)
            times = []
            for _ in range(runs):
                t = time.perf_counter()
                get(**query)
                times.append(time.perf_counter() - t)
            return pct(times)

        out: dict[str, Any] = {"first_page": timed(limit=limit)}
        first = get(limit=limit)
        out["first_page"]["total"] = first["total"]
        cursor, reached, t = first["next"], 1, time.perf_counter()
        while cursor and reached < page - 1:
            nxt = get(limit=limit, cursor=cursor)["next"]
            if not nxt:
                break
            cursor, reached = nxt, reached + 1
        walk = time.perf_counter() - t
        if cursor:
            out["deep_page"] = {"page": reached + 1, **timed(limit=limit, cursor=cursor),
                                "walk_seconds": round(walk, 1)}
        pid = filled["samples"]["patients"][0]
        out["by_patient_id"] = timed(limit=limit, PatientID=pid)
        d = filled["samples"]["days"][0]
        out["by_date_week"] = timed(limit=limit, StudyDate=f"{_day(d)}-{_day(d + 6)}")
        app.extensions["pacsbridge"].close()
    # what a deep page by OFFSET costs the database (the API refuses offset beyond 10,000)
    engine = create_engine(url)
    with engine.connect() as conn:
        deep = (out.get("deep_page", {}).get("page", 1) - 1) * limit
        sql = text("SELECT * FROM dicomstudies ORDER BY studyinsta LIMIT :limit OFFSET :offset")
        times = []
        for _ in range(min(runs, 50)):
            t = time.perf_counter()
            conn.execute(sql, {"limit": int(limit), "offset": int(deep)}).all()
            times.append(time.perf_counter() - t)
        out["sql_offset_same_page"] = {"offset": deep, **pct(times)}
        cursor_sql = "SELECT * FROM dicomstudies WHERE studyinsta > :k ORDER BY studyinsta LIMIT :n"
        key = conn.execute(text("SELECT studyinsta FROM dicomstudies ORDER BY studyinsta LIMIT 1 OFFSET :o"),
                           {"o": max(0, deep - 1)}).scalar()
        plan = conn.execute(text("EXPLAIN (ANALYZE, BUFFERS) " + cursor_sql), {"k": key or "", "n": limit}).all()
        out["deep_page_plan"] = [r[0] for r in plan]
    engine.dispose()
    return out


#: More sections of the issue's benchmark: ``(name, function(url, counts, filled) -> dict)``.
SECTIONS: list[tuple[str, Callable[[str, dict[str, int], dict[str, Any]], dict[str, Any]]]] = []


def measure(server: str, label: str, counts: dict[str, int], args: argparse.Namespace) -> dict[str, Any]:
    """Fill one database and take every measure on it; the database is dropped unless ``--keep``."""
    name = f"pacsbridge_bench_scale_{os.getpid()}_{label}"
    url = make_database(server, name)
    try:
        filled = fill(url, counts)
        log(f"{label}: queries")
        result = {"counts": counts, "fill_seconds": filled["seconds"], "database_mb": filled["database_mb"],
                  "queries": queries(url, filled, args.queries)}
        log(f"{label}: API pages")
        result["api"] = api_pages(url, filled, args.queries, args.limit, args.page)
        for section, run in SECTIONS:
            result[section] = run(url, counts, filled)
        return result
    finally:
        if not args.keep:
            drop_database(server, name)


def _print(results: dict[str, dict[str, Any]]) -> None:
    labels = list(results)
    print(f"{'measure':36s}" + "".join(f"{lb + ' median/p99 ms':>28s}" for lb in labels))
    for name in ("by_patient_id", "by_date_week", "by_accession"):
        print(f"{'query ' + name:36s}" + "".join(
            f"{r['queries'][name]['median_ms']:>14} / {r['queries'][name]['p99_ms']:<11}" for r in results.values()))
    for name in ("first_page", "deep_page", "by_patient_id", "by_date_week", "sql_offset_same_page"):
        cells = []
        for r in results.values():
            m = r["api"].get(name)
            cells.append(f"{m['median_ms']:>14} / {m['p99_ms']:<11}" if m else f"{'-':>28s}")
        label = f"API {name}" + (f" (page {results[labels[0]]['api']['deep_page']['page']})"
                                 if name == "deep_page" and "deep_page" in results[labels[0]]["api"] else "")
        print(f"{label:36s}" + "".join(cells))
    for lb, r in results.items():
        print(f"\n== {lb}: {r['counts']}, filled in {r['fill_seconds']} s, {r['database_mb']} MB")
        for name, q in r["queries"].items():
            print(f"-- EXPLAIN {name} ({q['rows_per_query']} rows/query)")
            print("\n".join("   " + line for line in q["plan"]))
        print("-- EXPLAIN API deep page (keyset)")
        print("\n".join("   " + line for line in r["api"]["deep_page_plan"]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--instances", type=int, default=10_000_000)
    p.add_argument("--patients", type=int)
    p.add_argument("--studies", type=int)
    p.add_argument("--series", type=int)
    p.add_argument("--small", type=int, default=10_000, help="instances of the small index (0: none)")
    p.add_argument("--queries", type=int, default=200, help="runs of each query and page")
    p.add_argument("--limit", type=int, default=100, help="rows per API page")
    p.add_argument("--page", type=int, default=1000, help="the deep page (reached by following next)")
    p.add_argument("--pg-url", default="postgresql+psycopg2://postgres@127.0.0.1:5432/",
                   help="the server (the database part is ignored: the run makes its own)")
    p.add_argument("--keep", action="store_true", help="keep the databases (their names are printed)")
    args = p.parse_args(argv)
    runs: dict[str, dict[str, int]] = {"full": sizes(args.instances, args.patients, args.studies, args.series)}
    if args.small:
        runs = {"small": sizes(args.small, None, None, None), **runs}
    results = {label: measure(args.pg_url, label, counts, args) for label, counts in runs.items()}
    _print(results)
    full = results["full"]
    missed = [f"query {n} p99 {q['p99_ms']} ms > {TARGET_QUERY_P99_MS}" for n, q in full["queries"].items()
              if q["p99_ms"] > TARGET_QUERY_P99_MS]
    missed += [f"API {n} p99 {full['api'][n]['p99_ms']} ms > {TARGET_PAGE_P99_MS}"
               for n in ("first_page", "deep_page") if n in full["api"]
               and full["api"][n]["p99_ms"] > TARGET_PAGE_P99_MS]
    summary = {label: {"counts": r["counts"], "fill_seconds": r["fill_seconds"],
                       "queries": {n: {k: v for k, v in q.items() if k != "plan"} for n, q in r["queries"].items()},
                       "api": {n: v for n, v in r["api"].items() if n != "deep_page_plan"}}
               for label, r in results.items()}
    print(json.dumps({"bench": "scale", "under_load": True, "results": summary, "missed": missed}))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
