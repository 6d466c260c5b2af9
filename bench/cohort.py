#!/usr/bin/env python
"""Cohort benchmark: an N-row cohort (one AccessionNumber a row) against Orthanc, vs N plain retrieve jobs.

Usage::

    python bench/cohort.py [--rows 1000] [--runs 2] [--workdir /tmp/pacsbridge-bench-cohort]
        [--pg-url postgresql+psycopg2://postgres@127.0.0.1:5432/pacsbridge_bench_cohort]
        [--max-associations 2] [--job-concurrency 2]

One Orthanc (TCP_NODELAY=1) holds N small studies (one series of 2 or 3 generated CT, an
AccessionNumber each, 4 studies a patient). Per run, two targets in turn (A B A B ...), each with a
fresh index (PostgreSQL, the database's tables dropped), fresh storage and a fresh stack
(``pacsbridge listener`` + ``pacsbridge worker --job-concurrency J``, its own Redis) that has gone
idle before the clock starts:

- ``cohort``: the rows as a CSV file, read as ``POST /cohorts`` reads it, written to the store, the
  cohort job sent to the worker: **query** = until the dry run has finished (the validated report:
  every row found, with its series and instance counts); then started as ``POST /cohorts/<id>/start``
  does: **transfer** = until it has finished, every instance indexed (its child retrieves end when
  their instances are indexed).
- ``retrieves``: the same N studies as N retrieve jobs (``{"query": {"AccessionNumber": ...}}``),
  submitted and sent to the worker at once: until all have finished.

The node allows ``--max-associations`` associations; the worker runs ``--job-concurrency`` jobs at
once (a cohort runs ``max_associations`` rows at once in its one job slot). Reports seconds per run,
medians, and the cohort's overhead on top of the retrieves: ``(query + transfer) / retrieves - 1``
(the target is at most 10 %), and the transfer stage alone against the retrieves. The machine is
shared: other work may run at the same time (``busy`` is the CPU load measured before each run).

``--status`` measures instead what a user sees of a large cohort while it runs (issue 17: "the API
answers a cohort's status in well under a second while it runs")::

    python bench/cohort.py --status [--rows 10000] [--found 100] [--poll 0.25]

The API as it is deployed (gunicorn, 2 workers) and a ``pacsbridge worker`` (Redis broker of its own,
PostgreSQL) in front of the same Orthanc: a CSV of ``--rows`` rows, ``--found`` of them naming a study
Orthanc holds and the rest an accession it does not, is uploaded as ``POST /cohorts`` (multipart, with
``start``): **submit** = until the 202 (the whole file read and validated, its rows written). Then,
until the cohort has finished (queried, and the found rows pulled by C-GET), ``GET /cohorts/<id>`` is
asked every ``--poll`` s and, every 10th time, a page of 100 rows (``?rows=1&state=not_found``): their
latencies (p50, p95, max) by stage, over HTTP with a read token. Meanwhile the established connections
to Orthanc's DICOM port are counted from ``/proc/net/tcp`` (the PACS's load, which must stay within the
node's ``--max-associations``): ``pacs_associations_max`` the most seen in two samples 2 ms apart,
``pacs_connections_peak`` the most in any one (which may count a released association's connection
for the instant it takes to close: ``tests.orthanc.ConnectionSampler``). At the end, the report and
the failed rows are downloaded (CSV) and timed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import cpu_busy, ensure_database, host_facts, log, median  # noqa: E402
from retrieve import settle  # noqa: E402

FINISHED = ("succeeded", "partial", "failed", "cancelled")


def generate(root: Path, rows: int) -> tuple[list[str], int]:
    """``rows`` studies of 2 or 3 small CT under ``root`` (once); their accession numbers, instances."""
    from pydicom.uid import generate_uid

    from tests.helpers import make_instance

    stamp = root / ".done"
    if stamp.exists():
        data = json.loads(stamp.read_text())
        if data["rows"] == rows:
            return data["accessions"], data["instances"]
    subprocess.run(["rm", "-rf", str(root)], check=True)
    accessions, n = [], 0
    for k in range(rows):
        acc = f"BCH{k:06d}"
        study, series = generate_uid(), generate_uid()
        for i in range(2 + k % 2):
            make_instance(root / f"{k // 100:03d}" / f"{acc}-{i}.dcm", rows=16, PatientID=f"BCHP{k // 4:05d}",
                          PatientName=f"Bench^{k // 4}", AccessionNumber=acc, StudyInstanceUID=study,
                          SeriesInstanceUID=series, StudyDate=f"2024{1 + k % 12:02d}{1 + k % 28:02d}",
                          SeriesNumber=1, InstanceNumber=i + 1)
            n += 1
        accessions.append(acc)
    stamp.write_text(json.dumps({"rows": rows, "accessions": accessions, "instances": n}))
    return accessions, n


def fresh_database(pg_url: str) -> None:
    """Drop every table of the benchmark's own database (its name comes from --pg-url, checked)."""
    from sqlalchemy import create_engine, text

    engine = create_engine(pg_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text("drop schema public cascade"))
        conn.execute(text("create schema public"))
    engine.dispose()


def job_finished(jobs, job_id: str) -> bool:  # type: ignore[no-untyped-def]
    return jobs.get(job_id, with_series=False).state in FINISHED  # type: ignore[no-any-return]


def retrieves_finished(jobs, n: int) -> bool:  # type: ignore[no-untyped-def]
    return sum(jobs.list(kind="retrieve", state=s, limit=1)[1] for s in FINISHED) >= n  # type: ignore[no-any-return]


def wait(timeout: float, what: str, predicate, *args) -> None:  # type: ignore[no-untyped-def]
    """Until ``predicate(*args)``, polled every 50 ms."""
    deadline = time.perf_counter() + timeout
    while not predicate(*args):
        if time.perf_counter() > deadline:
            raise SystemExit(f"{what}: not done after {timeout} s")
        time.sleep(0.05)


def _pct(values: list[float], q: float) -> float | None:
    """The ``q`` quantile of ``values`` in milliseconds (nearest rank), or None."""
    if not values:
        return None
    ordered = sorted(values)
    return round(1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)


def status_main(args: argparse.Namespace, work: Path) -> int:
    """``--status``: the latency of a cohort's status while it runs (see the module docstring)."""
    import urllib.request
    import uuid

    from pacsbridge.shared.core.config import Settings
    from pacsbridge.shared.index.context import open_context
    from tests.orthanc import ConnectionSampler, Orthanc
    from tests.servers import ThrowawayRedis
    from tests.test_api import TOKENS, Server

    found = min(args.found, args.rows)
    log(f"generating {found} studies")
    accessions, n = generate(work / f"gen{found}", found)
    pg_version = ensure_database(args.pg_url)
    fresh_database(args.pg_url)
    tmp = work / "status"
    subprocess.run(["rm", "-rf", str(tmp)], check=True)
    tmp.mkdir(parents=True)
    ctx = open_context(Settings(database_url=args.pg_url, storage=tmp / "data"))
    ctx.index.create()
    ctx.index.engine.dispose()
    pacs = Orthanc(work / f"orthanc-status{found}", modalities={"pb": ("PACSBRIDGE", "127.0.0.1", 11112)})
    redis = ThrowawayRedis()
    redis.start()
    server = None
    try:
        pacs.start()
        if pacs.instance_count() < n:
            pacs.upload(sorted((work / f"gen{found}").rglob("*.dcm")))
        assert pacs.instance_count() >= n, pacs.instance_count()
        server = Server(tmp, database_url=args.pg_url, gunicorn=True, PACSBRIDGE_BROKER_URL=redis.url,
                        PACSBRIDGE_COHORT_MAX_ROWS=str(max(50_000, args.rows)))
        status, body, _ = server.call("POST", "/api/v1/nodes", {
            "name": "pacs", "ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port, "retrieve": "get",
            "max_associations": args.max_associations})
        assert status == 201, body
        server.worker("--job-concurrency", str(args.job_concurrency))
        time.sleep(3)  # the worker's start-up, not in the figures
        missing = [f"NOPE{k:06d}" for k in range(args.rows - found)]
        names = accessions + missing
        random.Random(17).shuffle(names)  # the found rows spread over the file
        csv = ("AccessionNumber\r\n" + "".join(f"{a}\r\n" for a in names)).encode()
        busy = cpu_busy(1.0)
        load_before = Path("/proc/loadavg").read_text().split()[:3]

        def get(path: str, role: str = "read") -> tuple[float, bytes]:
            req = urllib.request.Request(server.url + path, headers={"Authorization": f"Bearer {TOKENS[role]}"})
            t0 = time.perf_counter()
            with urllib.request.urlopen(req, timeout=60) as resp:
                data = resp.read()
            return time.perf_counter() - t0, data

        boundary = uuid.uuid4().hex
        parts = b"".join(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
            for k, v in (("node", "pacs"), ("start", "true")))
        parts += (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="cohort.csv"\r\n'
                  "Content-Type: text/csv\r\n\r\n").encode() + csv + f"\r\n--{boundary}--\r\n".encode()
        req = urllib.request.Request(server.url + "/api/v1/cohorts", data=parts, method="POST", headers={
            "Authorization": f"Bearer {TOKENS['user']}", "Content-Type": f"multipart/form-data; boundary={boundary}"})
        with ConnectionSampler(pacs.dicom_port) as sampler:
            t0 = time.perf_counter()
            with urllib.request.urlopen(req, timeout=600) as resp:
                submitted = json.loads(resp.read())
            t_submit = time.perf_counter() - t0
            cid = submitted["id"]
            assert submitted["rows"] == args.rows, submitted
            log(f"submitted {args.rows} rows in {t_submit:.2f} s; polling")
            latencies: dict[str, list[float]] = {}
            pages: list[float] = []
            polls = 0
            deadline = time.perf_counter() + args.timeout
            while True:
                took, data = get(f"/api/v1/cohorts/{cid}")
                view = json.loads(data)
                polls += 1
                if view["state"] in FINISHED:
                    break
                latencies.setdefault(view["stage"], []).append(took)
                if polls % 10 == 0:
                    pages.append(get(f"/api/v1/cohorts/{cid}?rows=1&state=not_found&limit=100")[0])
                    log(f"{view['stage']}: {view['states']}")
                if time.perf_counter() > deadline:
                    raise SystemExit(f"cohort not done after {args.timeout} s: {view['states']}")
                time.sleep(args.poll)
            t_total = time.perf_counter() - t0
        assert view["state"] == "partial" and view["states"] == {"done": found, "not_found": args.rows - found}, view
        assert view["totals"]["received"] == n, view["totals"]
        t_report, report = get(f"/api/v1/cohorts/{cid}/report?format=csv")
        t_failed, failed = get(f"/api/v1/cohorts/{cid}/failed", role="user")
        assert report.count(b"\n") == args.rows + 1 and failed.count(b"\n") == args.rows - found + 1
        load_after = Path("/proc/loadavg").read_text().split()[:3]
    finally:
        if server is not None:
            server.close()
        redis.stop()
        pacs.stop()
    every = [x for v in latencies.values() for x in v]
    out = {"mode": "status", "rows": args.rows, "found": found, "instances": n,
           "max_associations": args.max_associations, "job_concurrency": args.job_concurrency, "postgresql": pg_version,
           "host": host_facts(("pynetdicom", "gunicorn", "flask")), "busy_before": busy,
           "loadavg_before": load_before, "loadavg_after": load_after,
           "submit_s": round(t_submit, 2), "until_finished_s": round(t_total, 1),
           "status_ms": {stage: {"n": len(v), "p50": _pct(v, 0.5), "p95": _pct(v, 0.95), "max": _pct(v, 1.0)}
                         for stage, v in {**latencies, "all": every}.items()},
           "rows_page_100_ms": {"n": len(pages), "p50": _pct(pages, 0.5), "p95": _pct(pages, 0.95),
                                "max": _pct(pages, 1.0)},
           "report_csv_s": round(t_report, 2), "failed_csv_s": round(t_failed, 2),
           "pacs_associations_max": sampler.most, "pacs_connections_peak": sampler.peak,
           "pacs_samples": sampler.samples}
    print(json.dumps(out, indent=2, default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--status", action="store_true", help="the status latency of a large cohort while it runs")
    ap.add_argument("--found", type=int, default=100, help="--status: rows naming a study Orthanc holds")
    ap.add_argument("--poll", type=float, default=0.25, help="--status: seconds between status requests")
    ap.add_argument("--rows", type=int, default=None, help="rows (default 1000; --status: 10000)")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--workdir", default="/tmp/pacsbridge-bench-cohort")
    ap.add_argument("--pg-url", default="postgresql+psycopg2://postgres@127.0.0.1:5432/pacsbridge_bench_cohort")
    ap.add_argument("--max-associations", type=int, default=2, help="the PACS node's association limit")
    ap.add_argument("--job-concurrency", type=int, default=2, help="jobs the worker runs at once")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds a target may take")
    args = ap.parse_args(argv)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    if args.rows is None:
        args.rows = 10_000 if args.status else 1000
    if args.status:
        return status_main(args, work)

    from pacsbridge.shared.cohorts import sheets
    from pacsbridge.shared.cohorts.store import CohortRow, CohortStore
    from pacsbridge.shared.core.celeryapp import RUN_JOB_TASK, make_celery
    from pacsbridge.shared.dicom.node import Node
    from pacsbridge.shared.index.context import open_context
    from pacsbridge.shared.jobs.store import JobStore
    from tests.orthanc import Orthanc, free_port
    from tests.test_listener import Stack

    log(f"generating {args.rows} studies")
    accessions, n = generate(work / f"gen{args.rows}", args.rows)
    pg_version = ensure_database(args.pg_url)
    env = {**os.environ, "TCP_NODELAY": "1"}
    port = free_port()  # the listener's, the same for every stack (Orthanc knows it)
    pacs = Orthanc(work / f"orthanc{args.rows}", modalities={"pb": ("PACSBRIDGE", "127.0.0.1", port)})
    pacs.start()
    results: dict[str, list[float]] = {"query": [], "transfer": [], "cohort": [], "retrieves": []}
    busy: list[float] = []
    job_seconds: dict[str, list[float]] = {"cohort": [], "retrieves": []}  # a retrieve job's own run, median
    try:
        if pacs.instance_count() < n:
            log("uploading to Orthanc")
            subprocess.run(["storescu", "-aet", "BENCH", "-aec", "ORTHANC", "+sd", "+r", "127.0.0.1",
                            str(pacs.dicom_port), str(work / f"gen{args.rows}")], env=env, check=False,
                           capture_output=True)
        if pacs.instance_count() < n:  # storescu gave up on some: send the rest over REST
            pacs.upload(sorted(p for p in (work / f"gen{args.rows}").rglob("*.dcm")))
        assert pacs.instance_count() >= n, pacs.instance_count()
        csv = ("AccessionNumber\n" + "".join(f"{a}\n" for a in accessions)).encode()

        for run in range(args.runs):
            for target in ("cohort", "retrieves"):
                fresh_database(args.pg_url)
                stack = Stack(work / f"stack-{run}-{target}", database_url=args.pg_url,
                              PACSBRIDGE_ALLOWED_PEERS="ORTHANC@127.0.0.1", PACSBRIDGE_RETRIEVE_WAIT_SECONDS="60",
                              PACSBRIDGE_RECONCILE_SECONDS="300", PACSBRIDGE_RECONCILE_MIN_AGE="30")
                stack.port = port
                stack.env["PACSBRIDGE_LISTENER_PORT"] = str(port)
                subprocess.run(["rm", "-rf", str(stack.settings.storage)], check=True)
                ctx = open_context(stack.settings)
                try:
                    ctx.index.create()
                    ctx.storage.ensure()
                    jobs = JobStore(ctx.index.engine)
                    jobs.add_node(Node(name="pacs", ae_title="ORTHANC", host="127.0.0.1", port=pacs.dicom_port,
                                       max_associations=args.max_associations))
                    stack.start("listener")
                    stack.start("worker", "--job-concurrency", str(args.job_concurrency))
                    settle({p.pid for p in stack.procs.values()})
                    celery = make_celery(stack.settings.with_(broker_url=stack.env["PACSBRIDGE_BROKER_URL"]))
                    busy.append(cpu_busy(0.3))
                    if target == "cohort":
                        store = CohortStore(ctx.index.engine)
                        t0 = time.perf_counter()
                        sheet = sheets.read_sheet(csv, filename="cohort.csv")
                        rows = [CohortRow(number=r.number, cells=r.cells, spec=r.spec.to_dict(),
                                          duplicate_of=r.duplicate_of) for r in sheet.rows]
                        job, _ = jobs.submit("cohort", {"rows": f"bench-{run}"}, node="pacs")
                        store.create(job.id, format=sheet.format, rows=rows, transfer=False,
                                     form={"format": sheet.format, "headers": sheet.headers, "dialect": sheet.dialect})
                        celery.send_task(RUN_JOB_TASK, [job.id])
                        wait(args.timeout, "query", job_finished, jobs, job.id)
                        t_query = time.perf_counter() - t0
                        dry = jobs.get(job.id, with_series=False)
                        assert dry.state == "succeeded", (dry.state, dry.error)
                        assert store.counts(job.id) == {"found": args.rows}, store.counts(job.id)
                        assert store.totals(job.id)["expected"] == n
                        t1 = time.perf_counter()
                        store.set_transfer(job.id, True)  # POST /cohorts/<id>/start
                        jobs.retry(job.id, states=("succeeded",))
                        celery.send_task(RUN_JOB_TASK, [job.id])
                        wait(args.timeout, "transfer", job_finished, jobs, job.id)
                        t_transfer = time.perf_counter() - t1
                        done = jobs.get(job.id, with_series=False)
                        assert done.state == "succeeded", (done.state, done.error)
                        results["query"].append(t_query)
                        results["transfer"].append(t_transfer)
                        results["cohort"].append(t_query + t_transfer)
                        log(f"run {run} cohort: query {t_query:.1f} s, transfer {t_transfer:.1f} s")
                    else:
                        t0 = time.perf_counter()
                        ids = [jobs.submit("retrieve", {"query": {"AccessionNumber": a}}, node="pacs")[0].id
                               for a in accessions]
                        for job_id in ids:
                            celery.send_task(RUN_JOB_TASK, [job_id])
                        wait(args.timeout, "retrieves", retrieves_finished, jobs, len(ids))
                        dt = time.perf_counter() - t0
                        ok = jobs.list(kind="retrieve", state="succeeded", limit=1)[1]
                        assert ok == len(ids), f"{ok} of {len(ids)} retrieves succeeded"
                        results["retrieves"].append(dt)
                        log(f"run {run} retrieves: {dt:.1f} s")
                    spans = [j.finished_at - j.started_at for j in jobs.list(kind="retrieve", limit=args.rows + 10)[0]
                             if j.finished_at and j.started_at]
                    job_seconds[target].append(round(statistics.median(spans), 3))
                    sops = [r[0] for r in ctx.index.run_sql("select SOPInstanc from DICOMImages")[1]]
                    assert len(sops) == len(set(sops)) == n, (len(sops), len(set(sops)), n)
                finally:
                    stack.close()
                    ctx.index.engine.dispose()
    finally:
        pacs.stop()
    med = {k: median(v) for k, v in results.items()}
    overhead = (round(med["cohort"] / med["retrieves"] - 1, 3)
                if med["cohort"] and med["retrieves"] else None)
    transfer_only = (round(med["transfer"] / med["retrieves"] - 1, 3)
                     if med["transfer"] and med["retrieves"] else None)
    report = {"rows": args.rows, "instances": n, "runs": args.runs, "max_associations": args.max_associations,
              "job_concurrency": args.job_concurrency, "postgresql": pg_version,
              "host": host_facts(("pynetdicom", "pydicom", "celery")), "busy_before_runs": busy,
              "seconds": {k: [round(x, 2) for x in v] for k, v in results.items()}, "median_s": med,
              "retrieve_job_median_s": job_seconds,
              "cohort_overhead": overhead, "transfer_stage_overhead": transfer_only, "target_overhead": 0.10}
    print(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
