#!/usr/bin/env python
"""Push benchmark: DCMTK storescu vs a pacsbridge push job, both into DCMTK ``storescp --fork``.

Usage::

    python bench/push.py [--instances 2000] [--runs 3] [--assocs 1,4]
        [--workdir /tmp/pacsbridge-bench-push]
        [--pg-url postgresql+psycopg2://postgres@127.0.0.1:5432/pacsbridge_bench_push]
        [--quiet-wait 60] [--profile] [--project]

Steps:

1. ``bench/gen_ct.py`` writes N synthetic 512x512 CT (explicit VR little
   endian, ~0.5 MB each) into ``WORKDIR/gen`` (cached), and pacsbridge imports
   them into ``WORKDIR/storage`` with its index on PostgreSQL (the tables are
   recreated; the import is reused while it holds N instances). The stored
   files are read once (warm page cache) and ``WORKDIR/quarters/q0..q3`` hold
   symlinks to 4 disjoint quarters of them for 4 storescu in parallel.
2. Per run, sender (``storescu`` / ``pacsbridge``) and association count
   (1 or 4), a fresh ``storescp -aet TARGET --fork -od DIR PORT`` on a free
   port. Every DCMTK process runs with ``TCP_NODELAY=1``.

   - ``storescu``: ``storescu -aet BENCH -aec TARGET +sd +r +sp *.dcm`` on the
     storage tree (1) or on the 4 quarters in parallel (4); wall time from the
     first start to the last exit; exit codes and ``E:``/``W:`` lines checked.
   - ``pacsbridge``: a node ``TARGET`` with ``max_associations`` = 1 or 4 and a
     push job of all the patients, run by :func:`pacsbridge.worker.runner.run_job`
     in this process (what the worker's ``run_job`` task calls); wall time of
     ``run_job`` (claim, selection, file meta, sending, progress rows, finish).
   - Checks: N files in DIR, storescu exit 0 / job ``succeeded`` with N acknowledged.

   Before each run the disks are synced and the script waits (up to
   ``--quiet-wait`` s) for idle CPUs, and records how busy they were.
3. ``--profile`` runs one more pacsbridge push (1 association) with cProfile in
   the sending thread and reports process CPU time against wall time and the
   top functions: where the time goes.

Knobs read by the push code (set them in the environment of this script):
``PACSBRIDGE_PUSH_FAST=0`` sends with pynetdicom's own ``send_c_store`` (one
queued P-DATA per PDU) instead of :class:`pacsbridge.shared.dicom.compat.store.FastStore`;
``PACSBRIDGE_PUSH_PROCESSES=1`` runs each association in its own sender
process; ``PACSBRIDGE_RUN_LOOP_DELAY`` is pynetdicom's polling delay.

stdout: a table of medians and every run, the ratio pacsbridge / storescu per
association count (target >= 0.5), then one JSON line with everything.
Exit status 0 when every check passed (whether or not the target was met), 1 otherwise.

``--project`` adds a third sender, ``pacsbridge+deid``, interleaved with the two above in every
run: the same push job with ``"project": "bench"``, a project made anew (default
``ProjectConfig``, a fixed benchmark secret), so that each file is de-identified in memory as it
leaves (issue 16; target: at least 0.7x the plain pacsbridge push, ``deid ratio`` in the report).
The project's map is emptied before each of its runs, so every run derives and records the
pseudonyms and UIDs as a first push of a study does (the audit is append-only and only grows). One
received file per run must carry a pseudonym, not an original PatientID.

De-identification alone, against dicognito, pydicom/deid and dcmanon, is ``bench/deidentify.py``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from benchlib import ensure_database, host_facts, log, median, wait_quiet  # noqa: E402

DEFAULT_WORKDIR = Path("/tmp/pacsbridge-bench-push")
DEFAULT_PG_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/pacsbridge_bench_push"
AET = "TARGET"
CALLING = "BENCH"
GOAL = 0.5
#: A push de-identified under a project at least this fraction of a plain push (issue 16).
DEID_GOAL = 0.7
PROJECT = "bench"
#: A fixed secret for ``--project``: the benchmark de-identifies synthetic data only.
DEID_SECRET = "pacsbridge-benchmark-secret-synthetic-data-only"


def env_nodelay() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACSBRIDGE_")}
    env["TCP_NODELAY"] = "1"
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- data ------------------------------------------------------------------------------
def prepare(args: argparse.Namespace):  # noqa: ANN201 - returns (ctx, patients, quarters)
    from gen_ct import generate

    from pacsbridge.shared.core.config import Settings
    from pacsbridge.shared.index.context import open_context
    from pacsbridge.shared.index.importer import Importer

    gen = args.workdir / "gen"
    files = sorted(gen.glob("*.dcm")) if gen.is_dir() else []
    if len(files) != args.instances:
        shutil.rmtree(gen, ignore_errors=True)
        log(f"generating {args.instances} CT instances into {gen} ...")
        files = generate(gen, args.instances, layout="flat")
    ensure_database(args.pg_url)
    settings = Settings(database_url=args.pg_url, storage=args.workdir / "storage", fsync=False, ae_title=CALLING,
                        deid_secret=DEID_SECRET)
    ctx = open_context(settings)
    ctx.index.create()
    if ctx.index.count() != args.instances or len(ctx.storage.walk()) != args.instances:
        log("importing into pacsbridge (PostgreSQL index) ...")
        ctx.index.create(force=True)
        shutil.rmtree(settings.storage, ignore_errors=True)
        ctx.storage.ensure()
        t0 = time.perf_counter()
        report = Importer(ctx.index, ctx.storage).import_paths([gen])
        log(f"imported {report.stored} in {time.perf_counter() - t0:.1f} s; rejected {len(report.rejected)}")
    stored = [ctx.storage.root / rel for rel in ctx.storage.walk()]
    size = 0
    for f in stored:  # warm the page cache for both senders alike
        size += len(f.read_bytes())
    log(f"{len(stored)} stored files, {size / 1e6:.0f} MB read (page cache warm)")
    quarters_root = args.workdir / "quarters"
    shutil.rmtree(quarters_root, ignore_errors=True)
    quarters = []
    for q in range(4):
        folder = quarters_root / f"q{q}"
        folder.mkdir(parents=True)
        for i, f in enumerate(stored[q::4]):
            (folder / f"{i:06d}.dcm").symlink_to(f)
        quarters.append(folder)
    patients = sorted({r[0] for r in ctx.index.run_sql("select PatientID from DICOMPatients")[1]})
    return ctx, patients, quarters


# -- receiver -----------------------------------------------------------------------------
class Storescp:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        self.port = free_port()
        self.log = open(folder.parent / f"{folder.name}.storescp.log", "wb")
        self.proc = subprocess.Popen(["storescp", "-aet", AET, "--fork", "-od", str(folder), str(self.port)],
                                     env=env_nodelay(), stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if subprocess.run(["echoscu", "-q", "-to", "2", "-aet", CALLING, "-aec", AET, "127.0.0.1",
                               str(self.port)], env=env_nodelay(), capture_output=True).returncode == 0:
                return
            time.sleep(0.1)
        raise SystemExit("storescp did not answer C-ECHO")

    def received(self) -> int:
        return sum(1 for p in self.folder.iterdir() if p.is_file())

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
        self.log.close()
        shutil.rmtree(self.folder, ignore_errors=True)


# -- senders ------------------------------------------------------------------------------
def run_storescu(port: int, dirs: list[Path], logdir: Path) -> tuple[float, list[str]]:
    procs, outs = [], []
    t0 = time.perf_counter()
    for k, folder in enumerate(dirs):
        out = logdir / f"storescu-{k}.log"
        outs.append(out)
        with open(out, "wb") as fh:
            procs.append(subprocess.Popen(["storescu", "-aet", CALLING, "-aec", AET, "+sd", "+r", "+sp", "*.dcm",
                                           "127.0.0.1", str(port), str(folder)], env=env_nodelay(),
                                          stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
    for p in procs:
        p.wait()
    seconds = time.perf_counter() - t0
    problems = []
    for p, out in zip(procs, outs):
        bad = [ln for ln in out.read_text(errors="replace").splitlines() if ln.startswith(("E:", "F:", "W:"))]
        if p.returncode != 0 or bad:
            problems.append(f"storescu exit {p.returncode}, {bad[:2]}")
    return seconds, problems


def run_push(ctx, jobs, patients: list[str], port: int, assocs: int, tag: str,
             project: str = "") -> tuple[float, dict, list[str]]:
    from pacsbridge.worker import runner
    from pacsbridge.shared.dicom.node import Node

    name = f"bench-{tag}".replace("+", "-")
    jobs.add_node(Node(name, AET, "127.0.0.1", port, max_associations=assocs))
    params: dict = {"selection": {"PatientID": patients}}
    if project:
        params["project"] = project
    job, _ = jobs.submit("push", params, node=name)
    cpu0 = os.times()
    t0 = time.perf_counter()
    done = runner.run_job(job.id, ctx, jobs)
    seconds = time.perf_counter() - t0
    cpu1 = os.times()
    problems = []
    if done is None or done.state != "succeeded":
        problems.append(f"push job {job.id}: {done.state if done else 'not run'} {done.error if done else ''}")
    result = dict(done.result) if done else {}
    result.pop("failures", None)
    result["process_cpu_s"] = round((cpu1.user - cpu0.user) + (cpu1.system - cpu0.system), 2)
    return seconds, result, problems


def profile_push(ctx, jobs, patients: list[str], workdir: Path, top: int = 25) -> dict:
    """One push (1 association) with cProfile in the sending thread: where the time goes."""
    from pacsbridge.shared.nodes import pusher as pushmod

    prof = cProfile.Profile()
    original = pushmod._Sender._run

    def profiled(self: Any) -> None:
        prof.enable()
        try:
            original(self)
        finally:
            prof.disable()

    pushmod._Sender._run = profiled  # benchmark instrumentation only
    scp = Storescp(workdir / "recv-profile")
    try:
        seconds, result, problems = run_push(ctx, jobs, patients, scp.port, 1, "profile")
    finally:
        pushmod._Sender._run = original
        scp.stop()
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf)
    stats.sort_stats("tottime").print_stats(top)
    return {"seconds": round(seconds, 2), "result": result, "problems": problems,
            "sender_thread_top_tottime": buf.getvalue()}


# -- de-identified push (--project) -------------------------------------------------------------
def fresh_project(ctx) -> None:  # noqa: ANN001
    """The project :data:`PROJECT` (default configuration) with an empty map, made anew."""
    from pacsbridge.shared.deid.options import ProjectConfig
    from pacsbridge.shared.deid.projects import ProjectStore

    store = ProjectStore(ctx.index.engine)
    clear_map(ctx)
    if store.exists(PROJECT):
        store.delete(PROJECT)
    store.create(PROJECT, ProjectConfig(), DEID_SECRET.encode("ascii"), created_by="bench")


def clear_map(ctx) -> None:  # noqa: ANN001
    """Empty :data:`PROJECT`'s map (pseudonyms and UIDs); the audit is append-only and only grows."""
    from pacsbridge.shared.core import schema

    with ctx.index.engine.begin() as conn:
        for table in (schema.deid_uids_table, schema.deid_patients_table):
            conn.execute(table.delete().where(table.c.project == PROJECT))


def leaks(folder: Path, patients: list[str], tag: str) -> list[str]:
    """One received file must carry a pseudonym, not an original PatientID."""
    import pydicom

    files = sorted(p for p in folder.iterdir() if p.is_file())
    if not files:
        return []
    ds = pydicom.dcmread(files[len(files) // 2], stop_before_pixels=True)
    return [f"{tag}: {files[len(files) // 2].name} holds the original PatientID {ds.PatientID}"] \
        if str(ds.get("PatientID", "")) in set(patients) else []


# -- main ---------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--instances", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--assocs", default="1,4")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--pg-url", default=DEFAULT_PG_URL)
    parser.add_argument("--quiet-wait", type=float, default=60.0)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--project", action="store_true",
                        help=f"also push de-identified under a project {PROJECT!r} (sender pacsbridge+deid)")
    args = parser.parse_args(argv)
    senders = ("storescu", "pacsbridge") + (("pacsbridge+deid",) if args.project else ())
    assocs_list = [int(a) for a in args.assocs.split(",")]
    if any(a not in (1, 4) for a in assocs_list):
        parser.error("--assocs: 1 and/or 4")
    args.workdir.mkdir(parents=True, exist_ok=True)

    from pacsbridge.shared.jobs.store import JobStore

    ctx, patients, quarters = prepare(args)
    jobs = JobStore(ctx.index.engine)
    from pacsbridge.shared.core import schema as jobsmod

    with ctx.index.engine.begin() as conn:  # fresh nodes and jobs for this invocation
        for table in (jobsmod.instances_table, jobsmod.series_table, jobsmod.jobs_table,
                      jobsmod.node_leases_table, jobsmod.node_rates_table, jobsmod.nodes_table):
            conn.execute(table.delete())
    if args.project:
        fresh_project(ctx)
    runs: list[dict] = []
    problems: list[str] = []
    logdir = args.workdir / "logs"
    logdir.mkdir(exist_ok=True)
    for run in range(args.runs):
        for assocs in assocs_list:
            for sender in senders:
                tag = f"{sender}-a{assocs}-r{run}"
                if sender == "pacsbridge+deid":
                    clear_map(ctx)  # every run derives and records, as a first push of the study does
                busy = wait_quiet(args.quiet_wait)
                scp = Storescp(args.workdir / f"recv-{tag}")
                try:
                    if sender == "storescu":
                        dirs = [ctx.storage.root] if assocs == 1 else quarters
                        seconds, bad = run_storescu(scp.port, dirs, logdir)
                        extra: dict = {}
                    else:
                        project = PROJECT if sender == "pacsbridge+deid" else ""
                        seconds, extra, bad = run_push(ctx, jobs, patients, scp.port, assocs, tag, project)
                    got = scp.received()
                    if sender == "pacsbridge+deid":
                        bad += leaks(scp.folder, patients, tag)
                finally:
                    scp.stop()
                if got != args.instances:
                    bad.append(f"{tag}: storescp holds {got} of {args.instances}")
                problems += bad
                rate = args.instances / seconds
                runs.append({"sender": sender, "assocs": assocs, "run": run, "seconds": round(seconds, 2),
                             "inst_s": round(rate, 1), "cpu_busy_before": busy, **extra})
                log(f"{tag}: {rate:.0f} inst/s ({seconds:.1f} s){'; ' + '; '.join(bad) if bad else ''}")
    table: dict[str, dict[int, float | None]] = {}
    for sender in senders:
        table[sender] = {a: median([r["inst_s"] for r in runs if r["sender"] == sender and r["assocs"] == a])
                         for a in assocs_list}
    ratios = {a: (round(table["pacsbridge"][a] / table["storescu"][a], 2)
                  if table["pacsbridge"][a] and table["storescu"][a] else None) for a in assocs_list}
    print(f"push of {args.instances} CT (512x512, explicit VR LE) into storescp --fork; median of {args.runs} "
          "run(s), inst/s")
    print(f"{'sender':<16}" + "".join(f"{f'{a} assoc':>12}" for a in assocs_list) + "   runs")
    for sender in senders:
        every = ", ".join(f"a{r['assocs']}:{r['inst_s']:.0f}" for r in runs if r["sender"] == sender)
        print(f"{sender:<16}" + "".join(f"{table[sender][a] or 0:>12.1f}" for a in assocs_list) + f"   {every}")
    print(f"{'ratio':<16}" + "".join(f"{ratios[a] or 0:>12.2f}" for a in assocs_list) +
          f"   (pacsbridge / storescu; target >= {GOAL})")
    deid_ratios = {a: (round(table["pacsbridge+deid"][a] / table["pacsbridge"][a], 2)
                       if table["pacsbridge+deid"][a] and table["pacsbridge"][a] else None)
                   for a in assocs_list} if args.project else {}
    if deid_ratios:
        print(f"{'deid ratio':<16}" + "".join(f"{deid_ratios[a] or 0:>12.2f}" for a in assocs_list) +
              f"   (pacsbridge+deid / pacsbridge; target >= {DEID_GOAL})")
    prof = profile_push(ctx, jobs, patients, args.workdir) if args.profile else None
    if prof:
        print("\nprofile of one pacsbridge push (1 association), sending thread, by own time:")
        print(prof["sender_thread_top_tottime"])
        problems += prof["problems"]
    facts = host_facts(("pacsbridge", "pynetdicom", "pydicom", "sqlalchemy", "psycopg2-binary"))
    facts["loadavg"] = os.getloadavg()
    profile_summary = {k: v for k, v in (prof or {}).items() if k != "sender_thread_top_tottime"}
    print(json.dumps({"benchmark": "push", "instances": args.instances, "medians": table, "ratios": ratios,
                      "goal": GOAL, "deid_ratios": deid_ratios, "deid_goal": DEID_GOAL, "runs": runs,
                      "profile": profile_summary, "problems": problems, "machine": facts}))
    ctx.index.engine.dispose()
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
