#!/usr/bin/env python
"""DICOMweb benchmark: WADO-RS retrieve and STOW-RS push, against our C-GET and a plain dicomweb-client.

Usage::

    python bench/dicomweb.py [--instances 2000] [--runs 3] [--workdir /tmp/pacsbridge-bench-dicomweb]
        [--pg-url postgresql+psycopg2://postgres@127.0.0.1:5432/pacsbridge_bench_dicomweb]
        [--targets wado-rs,c-get,client-wado,stow,client-stow] [--max-associations 2] [--batch 50]

One Orthanc with its DICOMweb plugin (``tests/orthanc.py``, ``dicomweb=True``) holds N synthetic CT
(``bench/gen_ct.py``: one patient, one study, two series). Per run the targets go in turn (A B C D E,
A B C D E ...), each fresh (an empty index and storage, an empty output folder, a new destination Orthanc):

- ``wado-rs`` (a): a retrieve job with mode ``wado-rs`` from a DICOMweb-only node (QIDO-RS to plan,
  WADO-RS to pull, stored and indexed by the job), run by :func:`pacsbridge.worker.runner.run_job`; ends when
  the job is ``succeeded``: all N in the index.
- ``c-get`` (b): the same study by a retrieve job with mode ``get`` from a DIMSE-only node (C-FIND, C-GET).
- ``client-wado`` (c): a plain dicomweb-client loop: ``search_for_series``, then ``iter_series`` per series
  (``transfer-syntax=*``, as ours) and each dataset written with pydicom's ``dcmwrite``. No index: an
  upper-bound-ish peer.
- ``stow`` (d): a push job of the N instances (imported once into a second pacsbridge index) to a fresh
  Orthanc with DICOMweb, by STOW-RS (the node is DICOMweb-only).
- ``client-stow`` (e): a plain dicomweb-client ``store_instances`` loop, batches of ``--batch`` datasets read
  with pydicom, to a fresh Orthanc.

Every target runs in a child process of its own (``--child``), which reports its wall time (of the job or
the loop only, not of its imports), and its peak RSS (``VmHWM`` of ``/proc/self/status``) against its RSS
just before: the memory of the process that runs the pacsbridge job, for (a) and (d). Not
``resource.getrusage(RUSAGE_SELF).ru_maxrss``: Linux keeps it across ``execve``, so a child's figure is at
least what its parent (this script, ~120 MB with its imports) held when it forked.

Reports inst/s per run, medians, the ratios a/b, a/c, d/e, the peak RSS of every run and the load
average before each. The machine is shared: other work may run at the same time.
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
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import DB_NAME_RE, ensure_database, host_facts, log, median  # noqa: E402

#: our AE title, as the source Orthanc knows it (C-GET)
CALLING = "PACSBRIDGE"
TARGETS = ("wado-rs", "c-get", "client-wado", "stow", "client-stow")
#: what each target's figure is compared with
RATIOS = {"wado-rs/c-get": ("wado-rs", "c-get"), "wado-rs/client-wado": ("wado-rs", "client-wado"),
          "stow/client-stow": ("stow", "client-stow")}
_FRESH_TABLES = ("dicomimages", "dicomseries", "dicomstudies", "dicompatients", "pacsbridge_arrivals",
                 "pacsbridge_job_series", "pacsbridge_push_instances", "pacsbridge_jobs", "pacsbridge_nodes",
                 "pacsbridge_node_leases", "pacsbridge_node_rates")


def _rss_kb(field: str = "VmRSS") -> int:
    """This process's resident set now (``VmRSS``) or at its peak (``VmHWM``), in kB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


# -- the children: one target, one run, timed without their imports ----------------------------------
def _context(spec: dict[str, Any]):  # noqa: ANN202 - (ctx, jobs)
    from pacsbridge.shared.core.config import Settings
    from pacsbridge.shared.index.context import open_context
    from pacsbridge.shared.jobs.store import JobStore

    settings = Settings(database_url=spec["pg_url"], storage=Path(spec["storage"]), fsync=True,
                        ae_title=CALLING)
    ctx = open_context(settings)
    return ctx, JobStore(ctx.index.engine)


def child_retrieve(spec: dict[str, Any]) -> dict[str, Any]:
    """(a) / (b): a retrieve job into a fresh index and storage."""
    from sqlalchemy import inspect, text

    from pacsbridge.shared.dicom.node import Node
    from pacsbridge.worker import runner

    shutil.rmtree(spec["storage"], ignore_errors=True)
    ctx, jobs = _context(spec)
    ctx.index.create()
    ctx.storage.ensure()
    present = {t.lower(): t for t in inspect(ctx.index.engine).get_table_names()}
    with ctx.index.engine.begin() as conn:  # a fresh index each time
        for table in _FRESH_TABLES:
            if table in present:
                conn.execute(text(f'truncate table "{present[table]}" cascade'))  # names of ours
    if spec["target"] == "wado-rs":
        node = Node(name="web", ae_title="", host="", port=0, web_url=spec["web_url"],
                    max_associations=spec["max_associations"])
    else:
        node = Node(name="dimse", ae_title="ORTHANC", host="127.0.0.1", port=spec["dicom_port"],
                    max_associations=spec["max_associations"])
    jobs.add_node(node)
    mode = "wado-rs" if spec["target"] == "wado-rs" else "get"
    job, _ = jobs.submit("retrieve", {"query": {"PatientID": spec["patient"]}, "mode": mode}, node=node.name)
    rss0 = _rss_kb()
    t0 = time.perf_counter()
    done = runner.run_job(job.id, ctx, jobs)
    seconds = time.perf_counter() - t0
    ok = done is not None and done.state == "succeeded" and done.result.get("indexed") == spec["n"]
    count = ctx.index.count()
    ctx.index.engine.dispose()
    return {"seconds": seconds, "ok": ok and count == spec["n"], "rss_before_kb": rss0,
            "state": done.state if done else None, "error": done.error if done else "not run",
            "result": {k: v for k, v in (done.result if done else {}).items()
                       if k in ("mode", "series", "indexed", "suboperations", "notes", "repulls")},
            "indexed": count}


def child_client_wado(spec: dict[str, Any]) -> dict[str, Any]:
    """(c): dicomweb-client ``iter_series`` per series, each dataset to a file with ``dcmwrite``."""
    from dicomweb_client.api import DICOMwebClient
    from pydicom import dcmwrite

    out = Path(spec["out"])
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    client = DICOMwebClient(spec["web_url"])
    rss0 = _rss_kb()
    t0 = time.perf_counter()
    written = 0
    for series in client.search_for_series(spec["study_uid"]):
        uid = series["0020000E"]["Value"][0]
        for ds in client.iter_series(spec["study_uid"], uid, media_types=(("application/dicom", "*"),)):
            dcmwrite(out / f"{ds.SOPInstanceUID}.dcm", ds, enforce_file_format=True)
            written += 1
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "ok": written == spec["n"], "rss_before_kb": rss0, "written": written}


def child_stow(spec: dict[str, Any]) -> dict[str, Any]:
    """(d): a push job of every stored instance to a DICOMweb-only node (STOW-RS)."""
    from pacsbridge.shared.core import schema
    from pacsbridge.shared.dicom.node import Node
    from pacsbridge.worker import runner

    ctx, jobs = _context(spec)
    with ctx.index.engine.begin() as conn:  # fresh nodes and jobs; the index and storage stay
        for table in (schema.instances_table, schema.series_table, schema.jobs_table,
                      schema.node_leases_table, schema.node_rates_table, schema.nodes_table):
            conn.execute(table.delete())
    jobs.add_node(Node(name="dest", ae_title="", host="", port=0, web_url=spec["web_url"],
                       max_associations=spec["max_associations"]))
    job, _ = jobs.submit("push", {"selection": {"PatientID": [spec["patient"]]}}, node="dest")
    rss0 = _rss_kb()
    t0 = time.perf_counter()
    done = runner.run_job(job.id, ctx, jobs)
    seconds = time.perf_counter() - t0
    ok = done is not None and done.state == "succeeded" and done.result.get("acknowledged") == spec["n"]
    ctx.index.engine.dispose()
    return {"seconds": seconds, "ok": ok, "rss_before_kb": rss0, "state": done.state if done else None,
            "error": done.error if done else "not run",
            "result": {k: v for k, v in (done.result if done else {}).items()
                       if k in ("protocol", "acknowledged", "failed", "associations")}}


def child_client_stow(spec: dict[str, Any]) -> dict[str, Any]:
    """(e): dicomweb-client ``store_instances``, ``batch`` datasets read with pydicom per request."""
    from dicomweb_client.api import DICOMwebClient
    from pydicom import dcmread

    files = sorted(Path(spec["gen"]).glob("*.dcm"))
    client = DICOMwebClient(spec["web_url"])
    rss0 = _rss_kb()
    t0 = time.perf_counter()
    stored = 0
    for i in range(0, len(files), spec["batch"]):
        answer = client.store_instances([dcmread(f) for f in files[i:i + spec["batch"]]])
        stored += len(getattr(answer, "ReferencedSOPSequence", []))  # a pydicom Dataset
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "ok": stored == spec["n"], "rss_before_kb": rss0, "stored": stored}


CHILDREN = {"wado-rs": child_retrieve, "c-get": child_retrieve, "client-wado": child_client_wado,
            "stow": child_stow, "client-stow": child_client_stow}


def child(spec: dict[str, Any]) -> int:
    out = CHILDREN[spec["target"]](spec)
    out["peak_rss_kb"] = _rss_kb("VmHWM")
    print("RESULT " + json.dumps(out, default=str))
    return 0


def run_child(spec: dict[str, Any], logfile: Path) -> dict[str, Any]:
    env = {**os.environ, "TCP_NODELAY": "1"}
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          env=env, timeout=3600)
    logfile.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        return {"ok": False, "seconds": 0.0, "error": f"child exited {proc.returncode}: {proc.stderr[-800:]}"}
    return json.loads(lines[-1][len("RESULT "):])


# -- the parent ---------------------------------------------------------------------------------------
def fresh_database(pg_url: str) -> None:
    """Drop and create the retrieve database: each child then only empties its tables (a table dropped under
    the migrations' version row would not be made again)."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    url = make_url(pg_url)
    if not url.database or not DB_NAME_RE.match(url.database):
        raise SystemExit(f"--pg-url must be a postgresql URL with a plain database name: {pg_url}")
    admin = create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            quoted = conn.dialect.identifier_preparer.quote_identifier(url.database)
            conn.execute(text(f"DROP DATABASE IF EXISTS {quoted} WITH (FORCE)"))
    finally:
        admin.dispose()
    ensure_database(pg_url)


def prepare_push_index(gen: Path, pg_url: str, storage: Path, n: int) -> None:
    """Import the N generated files into the push index (reused while it holds N)."""
    from pacsbridge.shared.core.config import Settings
    from pacsbridge.shared.index.context import open_context
    from pacsbridge.shared.index.importer import Importer

    ensure_database(pg_url)
    ctx = open_context(Settings(database_url=pg_url, storage=storage, fsync=False, ae_title=CALLING))
    ctx.index.create()
    if ctx.index.count() != n or len(ctx.storage.walk()) != n:
        log("importing into the push index ...")
        ctx.index.create(force=True)
        shutil.rmtree(storage, ignore_errors=True)
        ctx.storage.ensure()
        report = Importer(ctx.index, ctx.storage).import_paths([gen])
        log(f"imported {report.stored}; rejected {len(report.rejected)}")
    for rel in ctx.storage.walk():  # a warm page cache for (d) and (e) alike
        (ctx.storage.root / rel).read_bytes()
    ctx.index.engine.dispose()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--instances", type=int, default=2000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workdir", default="/tmp/pacsbridge-bench-dicomweb")
    ap.add_argument("--pg-url", default="postgresql+psycopg2://postgres@127.0.0.1:5432/pacsbridge_bench_dicomweb")
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--max-associations", type=int, default=2,
                    help="the nodes' max_associations (concurrent requests / associations)")
    ap.add_argument("--batch", type=int, default=50, help="datasets per store_instances call (client-stow)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(json.loads(args.child))
    targets = [t for t in args.targets.split(",") if t]
    unknown = set(targets) - set(TARGETS)
    if unknown:
        ap.error(f"unknown target(s) {', '.join(sorted(unknown))}: use {', '.join(TARGETS)}")
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)

    import pydicom
    from gen_ct import generate

    from tests.orthanc import Orthanc

    gen = work / "gen"
    files = sorted(gen.glob("*.dcm")) if gen.is_dir() else []
    if len(files) != args.instances:
        shutil.rmtree(gen, ignore_errors=True)
        log(f"generating {args.instances} CT")
        files = generate(gen, args.instances, patients=1, series_per_study=2, layout="flat")
    n = len(files)
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    patient, study_uid = str(first.PatientID), str(first.StudyInstanceUID)
    fresh_database(args.pg_url)
    push_pg = args.pg_url + "_push"
    if {"stow", "client-stow"} & set(targets):
        prepare_push_index(gen, push_pg, work / "push-storage", n)
    results: dict[str, list[float]] = {t: [] for t in targets}
    runs: list[dict[str, Any]] = []
    problems: list[str] = []
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    env = {**os.environ, "TCP_NODELAY": "1"}
    pacs = Orthanc(work / "orthanc", modalities={"pb": (CALLING, "127.0.0.1", 104)}, dicomweb=True)
    pacs.start()
    if pacs.instance_count() > n:  # kept from an invocation with more (or other) instances: start it afresh
        log(f"Orthanc holds {pacs.instance_count()} instances, not {n}: emptied and loaded again")
        pacs.stop()
        shutil.rmtree(work / "orthanc")
        pacs = Orthanc(work / "orthanc", modalities={"pb": (CALLING, "127.0.0.1", 104)}, dicomweb=True)
        pacs.start()
    try:
        if pacs.instance_count() < n:
            log("uploading to Orthanc")
            subprocess.run(["storescu", "-aet", "BENCH", "-aec", "ORTHANC", "+sd", "+r", "127.0.0.1",
                            str(pacs.dicom_port), str(gen)], env=env, check=False, capture_output=True)
        if pacs.instance_count() < n:  # storescu gave up on some: send the rest over REST
            pacs.upload(files)
        assert pacs.instance_count() >= n, pacs.instance_count()
        base = {"n": n, "patient": patient, "study_uid": study_uid, "max_associations": args.max_associations,
                "batch": args.batch, "gen": str(gen)}
        for run in range(args.runs):
            for target in targets:
                spec = {**base, "target": target}
                dest = None
                if target in ("wado-rs", "c-get"):
                    spec.update(pg_url=args.pg_url, storage=str(work / "storage"), web_url=pacs.web_url,
                                dicom_port=pacs.dicom_port)
                elif target == "client-wado":
                    spec.update(out=str(work / "client-out"), web_url=pacs.web_url)
                else:  # a fresh destination each time
                    shutil.rmtree(work / "dest", ignore_errors=True)
                    dest = Orthanc(work / "dest", aet="DEST", dicomweb=True).start()
                    spec.update(pg_url=push_pg, storage=str(work / "push-storage"), web_url=dest.web_url)
                subprocess.run(["sync"], check=False)
                load = os.getloadavg()
                try:
                    out = run_child(spec, logs / f"run{run}-{target}.log")
                    if dest is not None and out.get("ok"):
                        held = dest.instance_count()
                        if held != n:
                            out.update(ok=False, error=f"the destination holds {held} of {n}")
                finally:
                    if dest is not None:
                        dest.stop()
                rate = n / out["seconds"] if out.get("ok") and out["seconds"] else 0.0
                if out.get("ok"):
                    results[target].append(rate)
                else:
                    problems.append(f"run {run} {target}: {out.get('error') or out}")
                peak = out.get("peak_rss_kb", 0) / 1024
                runs.append({"run": run, "target": target, "load_before": [round(x, 2) for x in load],
                             "inst_per_s": round(rate, 1), "seconds": round(out.get("seconds", 0.0), 2),
                             "peak_rss_mb": round(peak, 1),
                             "rss_before_mb": round(out.get("rss_before_kb", 0) / 1024, 1),
                             **{k: out[k] for k in ("result", "state", "error") if out.get(k)}})
                log(f"run {run} {target}: {rate:.1f} inst/s, peak RSS {peak:.0f} MB "
                    f"(load before {load[0]:.2f})")
    finally:
        pacs.stop()
    medians = {t: median(r) for t, r in results.items()}
    ratios = {name: round(medians[a] / medians[b], 2) for name, (a, b) in RATIOS.items()
              if medians.get(a) and medians.get(b)}
    peaks = {t: max((r["peak_rss_mb"] for r in runs if r["target"] == t), default=None) for t in targets}
    report = {"instances": n, "runs": args.runs, "max_associations": args.max_associations, "batch": args.batch,
              "host": host_facts(("pydicom", "dicomweb-client", "requests")),
              "inst_per_s": {t: [round(v, 1) for v in r] for t, r in results.items()},
              "median": medians, "ratios": ratios, "peak_rss_mb": peaks, "every_run": runs,
              "problems": problems}
    print(json.dumps(report, indent=2, default=str))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
