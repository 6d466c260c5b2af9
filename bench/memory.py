#!/usr/bin/env python
"""Memory over a long ingest: do the listener, the worker and the API stay flat? (issue 19)

Usage::

    python bench/memory.py [--instances 1000000] [--every 50000] [--senders 4] [--max-seconds S]
        [--workdir /tmp/pacsbridge-bench-memory]
        [--pg-url postgresql+psycopg2://postgres@127.0.0.1:5432/pacsbridge_bench_memory]
        [--broker-url redis://127.0.0.1:6379/12] [--backlog 2000] [--set PACSBRIDGE_NAME=VALUE ...]

What it does:

1. ``pacsbridge listener``, ``pacsbridge worker`` and ``pacsbridge api`` run as real
   processes, each in its own process group, on a PostgreSQL database of their own
   (created if missing, ``init --force``) and a Redis db of their own (flushed): the
   start, readiness and stop of bench/ingest.py (:class:`ingest.PacsbridgeReceiver`).
2. ``--senders`` pynetdicom SCU processes make small CT instances on the fly (32x32
   pixels, about 2.6 kB, every one a new SOP Instance UID; 100 per series, 10 studies
   per patient) and C-STORE them, a new association every 5,000. They wait while more
   than ``--backlog`` instances are sent but not indexed, so that what is measured is
   the services' memory, not a queue that grows because the sender is faster.
3. A thread deletes each instance's file from storage once it is indexed (keyset over
   ``pacsbridge_arrivals``, a few seconds behind), so the disk stays bounded; the
   index rows stay. Another thread calls the API's list routes (``/studies?limit=100``,
   ``/jobs``, ``/patients``) with a read token in a loop for the whole run.
4. Every ``--every`` indexed instances the RSS of each service is summed over its
   process group from ``/proc`` (listener parent + receivers; worker parent + Celery
   children; the API) and printed. The slope is fitted by least squares (MB per
   100,000 instances) over the samples after the warm-up: not the first, and none taken
   before ``--warmup-s`` (default: the reconciler's period + 30 s; its first periodic pass
   reads the journal lines of a whole period, 5,000 at a time, a step of a few MB in the
   listener's RSS that stays as its high-water mark); target: <= 5 MB per 100 k for each
   service. The slope over every sample is printed too.

Progress goes to stderr; stdout carries the table and one JSON line.
Exit status: 0 if the run completed without problems (whether or not the targets were met),
1 if something failed, 2 for bad usage.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from benchlib import count_files, ensure_database, group_stats, host_facts, log, pacsbridge_settings  # noqa: E402  (bench/ is on sys.path)
from ingest import CALLING_AET, PacsbridgeReceiver, free_ports, scan_log, wait_for  # noqa: E402

DEFAULT_WORKDIR = Path("/tmp/pacsbridge-bench-memory")
DEFAULT_PG_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/pacsbridge_bench_memory"
DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/12"
#: The issue's target: RSS slope after warm-up, MB per 100,000 instances, per service
SLOPE_TARGET_MB = 5.0
#: The services measured, in the order they are started (their process groups)
SERVICES = ("listener", "worker", "api")
#: PACSBRIDGE_RECONCILE_SECONDS's default: the listener's reconciler reads the journal lines of a
#: period in one pass (journal.CHUNK_LINES at a time), so the listener's RSS steps up a little at its
#: first pass
DEFAULT_RECONCILE_S = 300.0
PER_ASSOCIATION = 5000
#: The senders' DIMSE and network timeouts (s): a loaded machine stalls now and then
SENDER_TIMEOUT = 300.0
#: Unanswered C-STOREs or refused associations a sender tolerates in a row. Most likely pynetdicom's own
#: association loop (these senders are plain pynetdicom) now and then takes a C-STORE's response and drops
#: it, the race pacsbridge's waiting reactor closes (docs/listener-and-workers.md, PACSBRIDGE_REACTOR; not
#: proven here): the listener then sees a silent peer, every store answered, and aborts after its network
#: timeout; the instance is sent again. At 1,000
#: instances/s that was 73 times in 597,000 (2026-12-05); counted over the whole run, 21 stopped a sender.
MAX_RETRIES = 20
PER_SERIES = 100
SERIES_PER_STUDY = 1
STUDIES_PER_PATIENT = 10
API_TOKEN = "bench-memory-token-0123456789"
API_ROUTES = ("/api/v1/studies?limit=100", "/api/v1/jobs", "/api/v1/patients?limit=100")
#: Seconds between two rounds of API_ROUTES (a steady load, not a saturating one)
API_PAUSE = 0.2
#: Seconds the deleter stays behind the newest arrival (workers commit batches out of order)
DELETE_LAG = 5.0
PAGE = os.sysconf("SC_PAGE_SIZE")


# -- /proc ------------------------------------------------------------------------------
def group_rss(pgid: int) -> tuple[float, int]:
    """(MB resident, processes) of every live process in process group ``pgid``."""
    pages = [int(fields[21]) for _, fields in group_stats({pgid})]
    return round(sum(pages) * PAGE / 1e6, 1), len(pages)


def slope_per_100k(points: list[tuple[int, float]]) -> float | None:
    """Least-squares slope of MB over instances, in MB per 100,000 instances (None below 2 points)."""
    if len(points) < 2:
        return None
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if not sxx:
        return None
    sxy = sum((x - mx) * (y - my) for x, y in points)
    return round(sxy / sxx * 100_000, 2)


# -- the sender (separate processes) ----------------------------------------------------
def _template(rows: int = 32) -> Any:
    """A small CT instance (the shape of tests/helpers.py's ``make_instance``)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.PatientName = "Bench^Memory"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyDate = "20240102"
    ds.StudyTime = "101112"
    ds.Modality = "CT"
    ds.SeriesNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.Rows = ds.Columns = rows
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = bytes(rows * rows * 2)
    return ds


def sender(port: int, aec: str, number: int, count: int, sent: Any, retries: Any, indexed: Any, backlog: int,
           stop: Any) -> None:
    """C-STORE ``count`` new instances to ``port``; sender ``number`` of several (its own patients).

    A C-STORE that gets no answer (the machine stalled past the DIMSE timeout and the association
    was aborted) is sent again on a new association, as a real SCU would, and counted in ``retries``.
    """
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
    from pynetdicom import AE

    from pynetdicom import evt

    from pacsbridge.shared.dicom.compat.reactor import on_conn_open

    # TCP_NODELAY (and pynetdicom's shorter poll delay), as DCMTK gets TCP_NODELAY=1 in bench/ingest.py:
    # without it each 2.6 kB C-STORE waited for the delayed ACK of Nagle's algorithm (21 against 250
    # instances/s per association, measured). pacsbridge's own tuning, through its pynetdicom layer.
    ae = AE(ae_title=CALLING_AET)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.dimse_timeout = ae.network_timeout = SENDER_TIMEOUT
    ds = _template()
    done = failures = 0
    while done < count and not stop.is_set():
        assoc = ae.associate("127.0.0.1", port, ae_title=aec, evt_handlers=[(evt.EVT_CONN_OPEN, on_conn_open)])
        if not assoc.is_established:
            failures += 1
            if failures > MAX_RETRIES:
                raise SystemExit(f"sender {number}: association to {aec}:{port} refused or aborted")
            time.sleep(1)
            continue
        try:
            for _ in range(min(PER_ASSOCIATION, count - done)):
                while sent.value - indexed.value > backlog and not stop.is_set():
                    time.sleep(0.05)
                if stop.is_set():
                    break
                if done % PER_SERIES == 0 and "SOPInstanceUID" not in ds:
                    ds.SeriesInstanceUID = generate_uid()
                    if done % (PER_SERIES * SERIES_PER_STUDY) == 0:
                        ds.StudyInstanceUID = generate_uid()
                        study = done // (PER_SERIES * SERIES_PER_STUDY)
                        ds.PatientID = f"MEM{number}-{study // STUDIES_PER_PATIENT:06d}"
                if "SOPInstanceUID" not in ds:
                    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
                ds.InstanceNumber = done % PER_SERIES + 1
                status = assoc.send_c_store(ds)
                if not status or status.Status != 0:
                    failures += 1
                    with retries.get_lock():
                        retries.value += 1
                    if failures > MAX_RETRIES:
                        raise SystemExit(f"sender {number}: C-STORE answered "
                                         f"{status.Status if status else 'nothing'} {failures} times")
                    break  # the same instance again, on a new association
                del ds.SOPInstanceUID  # the next one gets a new UID
                failures = 0  # MAX_RETRIES bounds failures in a row, not over a run of a million
                done += 1
                with sent.get_lock():
                    sent.value += 1
        finally:
            if assoc.is_established:
                assoc.release()


# -- threads in this process --------------------------------------------------------------
class Deleter(threading.Thread):
    """Unlink the files of indexed instances (``pacsbridge_arrivals``), a few seconds behind."""

    def __init__(self, engine: Any, storage: Path) -> None:
        super().__init__(daemon=True, name="deleter")
        self.engine = engine
        self.storage = storage
        self.stop = threading.Event()
        self.deleted = 0
        self.after = 0.0  # keyset: the newest arrived_at whose file is gone
        self.error: str | None = None

    def run(self) -> None:
        from sqlalchemy import text

        query = text("select arrived_at, object_file from pacsbridge_arrivals where arrived_at > :after "
                     "and arrived_at < :before order by arrived_at limit 5000")
        while not self.stop.wait(1.0):
            try:
                with self.engine.connect() as conn:
                    rows = conn.execute(query, {"after": self.after, "before": time.time() - DELETE_LAG}).all()
            except Exception as exc:  # noqa: BLE001 - reported, the run goes on
                self.error = f"{type(exc).__name__}: {exc}"
                continue
            self.unlink(rows)
        # at the end everything sent is indexed: no need to stay behind
        while True:
            with self.engine.connect() as conn:
                rows = conn.execute(query, {"after": self.after, "before": time.time() + 3600}).all()
            if not rows:
                break
            self.unlink(rows)

    def unlink(self, rows: list[Any]) -> None:
        """Delete the files of ``rows`` (arrived_at, object_file); move the keyset on."""
        for arrived_at, rel in rows:
                try:
                    os.unlink(self.storage / rel)
                    self.deleted += 1
                except FileNotFoundError:
                    pass
                self.after = max(self.after, arrived_at)


class ApiLoad(threading.Thread):
    """GET the API's list routes with a read token in a loop."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True, name="api-load")
        self.base = f"http://127.0.0.1:{port}"
        self.stop = threading.Event()
        self.requests = 0
        self.failures: list[str] = []

    def run(self) -> None:
        while not self.stop.is_set():
            for route in API_ROUTES:
                req = urllib.request.Request(self.base + route, headers={"Authorization": f"Bearer {API_TOKEN}"})
                try:
                    with urllib.request.urlopen(req, timeout=30) as resp:
                        resp.read()
                    self.requests += 1
                except (urllib.error.URLError, OSError) as exc:
                    if len(self.failures) < 10:
                        self.failures.append(f"{route}: {exc}")
            self.stop.wait(API_PAUSE)


# -- the run ---------------------------------------------------------------------------
def start_api(receiver: PacsbridgeReceiver) -> int:
    """``pacsbridge api`` on a free port next to the listener and worker; returns the port."""
    port = free_ports(1)[0]
    env = dict(receiver.env, PACSBRIDGE_API_TOKENS=f"bench:{API_TOKEN}:read")
    receiver.spawn("api", [receiver.exe, "api", "--port", str(port)], env, cwd=receiver.run_dir)

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    wait_for("pacsbridge api", healthy, receiver.procs)
    return port


def sample(receiver: PacsbridgeReceiver, indexed: int, t0: float, extra: dict) -> dict:
    """RSS of each service's process group now."""
    row: dict[str, Any] = {"indexed": indexed, "elapsed_s": round(time.perf_counter() - t0, 1), **extra}
    for label, proc in zip(SERVICES, receiver.procs):
        mb, procs = group_rss(proc.pid)
        row[f"{label}_mb"] = mb
        row[f"{label}_procs"] = procs
    return row


def count_indexed(engine: Any) -> int:
    from sqlalchemy import text

    with engine.connect() as conn:
        return int(conn.execute(text("select count(*) from pacsbridge_arrivals")).scalar())


def run(args: argparse.Namespace) -> tuple[list[dict], dict, list[str]]:
    """Start everything, send, sample; returns (samples, counters, problems)."""
    run_dir = args.workdir / "run"
    log_dir = args.workdir / "logs"
    shutil.rmtree(run_dir, ignore_errors=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    receiver = PacsbridgeReceiver(run_dir, log_dir, args.instances, pg_url=args.pg_url, broker_url=args.broker_url)
    receiver.env.update(args.pacsbridge_env)
    ctx = multiprocessing.get_context("spawn")
    sent, retries, indexed_v, stop = ctx.Value("q", 0), ctx.Value("q", 0), ctx.Value("q", 0), ctx.Event()
    senders: list[Any] = []
    samples: list[dict] = []
    problems: list[str] = []
    counters: dict[str, Any] = {}
    deleter = api_load = None
    try:
        receiver.start()
        receiver.wait_ready()
        api_port = start_api(receiver)
        deleter = Deleter(receiver.engine, receiver.storage)
        api_load = ApiLoad(api_port)
        deleter.start()
        api_load.start()
        t0 = time.perf_counter()
        samples.append(sample(receiver, 0, t0, {"sent": 0}))
        log(f"started: {samples[0]}")
        share = [args.instances // args.senders + (1 if k < args.instances % args.senders else 0)
                 for k in range(args.senders)]
        for k, count in enumerate(share):
            p = ctx.Process(target=sender, args=(receiver.port, receiver.aet, k, count, sent, retries, indexed_v,
                                                 args.backlog, stop), daemon=True)
            p.start()
            senders.append(p)
        next_mark = args.every
        last_change, last_indexed = time.perf_counter(), 0
        while True:
            indexed = count_indexed(receiver.engine)
            indexed_v.value = indexed
            now = time.perf_counter()
            if indexed != last_indexed:
                last_change, last_indexed = now, indexed
            while indexed >= next_mark:
                row = sample(receiver, indexed, t0, {"sent": sent.value, "deleted": deleter.deleted,
                                                     "api_requests": api_load.requests})
                samples.append(row)
                log(f"sample: {row}")
                next_mark += args.every
            if indexed >= args.instances:
                break
            if args.max_seconds and now - t0 > args.max_seconds and not stop.is_set():
                log(f"--max-seconds {args.max_seconds} reached: no more sending, waiting for the backlog")
                stop.set()
                counters["stopped_early"] = True
            if stop.is_set() and indexed >= sent.value and all(not p.is_alive() for p in senders):
                samples.append(sample(receiver, indexed, t0, {"sent": sent.value, "deleted": deleter.deleted,
                                                              "api_requests": api_load.requests}))
                log(f"final sample: {samples[-1]}")
                break
            dead = [p for p in senders if p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"a sender exited with {dead[0].exitcode} (see stderr)")
            for label, proc in zip(SERVICES, receiver.procs):
                if proc.poll() is not None:
                    raise RuntimeError(f"pacsbridge {label} exited with {proc.returncode}")
            if now - last_change > 120:
                raise RuntimeError(f"nothing indexed for 120 s (indexed {indexed}, sent {sent.value})")
            time.sleep(0.5)
        counters["seconds"] = round(time.perf_counter() - t0, 1)
        counters["indexed"] = samples[-1]["indexed"]
        counters["indexed_per_s"] = round(counters["indexed"] / counters["seconds"], 1)
    except (RuntimeError, OSError) as exc:
        problems.append(f"{type(exc).__name__}: {exc}")
        log(f"ERROR: {exc}")
    except KeyboardInterrupt:
        problems.append("interrupted")
    finally:
        stop.set()
        for p in senders:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
        for thread in (deleter, api_load):
            if thread is not None:
                thread.stop.set()
                thread.join(timeout=60)
        counters.update(sent=sent.value, sender_retries=retries.value)
        if deleter is not None:
            counters.update(deleted=deleter.deleted, deleter_error=deleter.error)
        if api_load is not None:
            counters.update(api_requests=api_load.requests, api_failures=api_load.failures)
            problems += [f"api: {f}" for f in api_load.failures]
        if receiver.storage.is_dir():
            counters["files_left_in_storage"] = count_files(receiver.storage)
        problems += receiver.stop()
        counters["log_issues"] = [s for s in (scan_log(p) for p in receiver.logs) if s["alerts"]]
    return samples, counters, problems


def warmed_up(samples: list[dict], warmup_s: float) -> list[dict]:
    """The samples after the warm-up: from the second on (the first is taken at the start), and
    taken ``warmup_s`` or later (after the listener's first periodic reconciler pass)."""
    return [s for s in samples[2:] if s["elapsed_s"] >= warmup_s]


def slopes(samples: list[dict]) -> dict[str, float | None]:
    """MB per 100 k instances for each service, least squares over ``samples``."""
    return {label: slope_per_100k([(s["indexed"], s[f"{label}_mb"]) for s in samples]) for label in SERVICES}


def report(args: argparse.Namespace, samples: list[dict], counters: dict, problems: list[str]) -> dict:
    """Table on stdout; returns the summary."""
    fit = warmed_up(samples, args.warmup_s)
    fitted = slopes(fit)
    every = slopes(samples[1:])
    print(f"\nmemory benchmark: {args.instances} small CT instances (32x32, ~2.6 kB, new SOP Instance UID each), "
          f"{args.senders} pynetdicom senders, files deleted once indexed; RSS summed per process group")
    print(f"{'indexed':>9} {'sent':>9} {'s':>7}  {'listener MB':>11} {'worker MB':>9} {'api MB':>7}  procs l/w/a")
    for s in samples:
        print(f"{s['indexed']:>9} {s.get('sent', 0):>9} {s['elapsed_s']:>7}  {s['listener_mb']:>11} "
              f"{s['worker_mb']:>9} {s['api_mb']:>7}  {s['listener_procs']}/{s['worker_procs']}/{s['api_procs']}")
    print(f"slope after warm-up (least squares over the {len(fit)} samples from {args.warmup_s:.0f} s on, not the "
          f"first), MB per 100 k instances (target <= {SLOPE_TARGET_MB}); in brackets over every sample but the "
          "one at the start:")
    goals = {}
    for label, value in fitted.items():
        met = value is not None and value <= SLOPE_TARGET_MB
        goals[label] = {"slope_mb_per_100k": value, "met": met, "slope_all_samples": every[label]}
        print(f"  {label}: {value} {'MET' if met else 'NOT MET' if value is not None else '(too few samples)'} "
              f"[{every[label]}]")
    print(f"counters: { {k: v for k, v in counters.items() if k != 'log_issues'} }")
    for p in problems:
        print(f"PROBLEM: {p}")
    for issue in counters.get("log_issues", []):
        print(f"LOG {Path(issue['file']).name}: {issue['alerts']} alert lines, e.g.")
        for line in issue["samples"][:4]:
            print(f"    {line}")
    return {"instances": args.instances, "every": args.every, "warmup_s": args.warmup_s, "senders": args.senders,
            "samples": samples,
            "slopes": goals, "counters": counters, "problems": problems, "pacsbridge_settings": args.pacsbridge_env,
            "machine": host_facts(("pacsbridge", "pynetdicom", "pydicom", "celery", "sqlalchemy", "waitress"))}


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    parser = argparse.ArgumentParser(description="RSS of pacsbridge's listener, worker and API over a long ingest "
                                                 "of small instances (issue 19).")
    parser.add_argument("--instances", type=int, default=1_000_000, help="instances to send (default: 1000000)")
    parser.add_argument("--every", type=int, default=50_000, help="sample RSS every N indexed (default: 50000)")
    parser.add_argument("--senders", type=int, default=4, help="pynetdicom sender processes (default: 4)")
    parser.add_argument("--max-seconds", type=float, default=0,
                        help="stop sending after this many seconds, index the backlog, take a last sample "
                             "(default: 0, no limit)")
    parser.add_argument("--warmup-s", type=float, default=None,
                        help="the slope is fitted over samples taken this many seconds or later (default: the "
                             "reconciler's period + 30 s, after its first periodic pass)")
    parser.add_argument("--backlog", type=int, default=2000,
                        help="senders wait while more than this many are sent but not indexed (default: 2000)")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                        help=f"storage and logs (default: {DEFAULT_WORKDIR})")
    parser.add_argument("--pg-url", default=DEFAULT_PG_URL,
                        help=f"pacsbridge's PostgreSQL index, created if missing, re-initialised "
                             f"(default: {DEFAULT_PG_URL})")
    parser.add_argument("--broker-url", default=DEFAULT_BROKER_URL,
                        help=f"pacsbridge's Redis broker db, FLUSHED at the start (default: {DEFAULT_BROKER_URL})")
    parser.add_argument("--set", action="append", default=[], metavar="PACSBRIDGE_NAME=VALUE",
                        help="a setting for the listener, worker and API; repeatable")
    args = parser.parse_args(argv)
    args.pacsbridge_env = pacsbridge_settings(parser, args.set)
    if args.warmup_s is None:
        period = float(args.pacsbridge_env.get("PACSBRIDGE_RECONCILE_SECONDS", DEFAULT_RECONCILE_S))
        args.warmup_s = period + 30
    if args.instances < 1 or args.every < 1 or args.senders < 1 or args.backlog < 1:
        parser.error("--instances, --every, --senders and --backlog must be >= 1")
    if shutil.which("echoscu") is None:
        parser.error("echoscu not found (apt-get install dcmtk): readiness is checked with C-ECHO")
    args.workdir = args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    ensure_database(args.pg_url)
    samples, counters, problems = run(args)
    summary = report(args, samples, counters, problems)
    print(json.dumps(summary), flush=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
