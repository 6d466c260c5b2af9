#!/usr/bin/env python
"""DICOM ingest benchmark: DCMTK storescu into storescp, Orthanc, a no-op SCP and pacsbridge.

Usage::

    python bench/ingest.py [--instances 2000] [--runs 3]
        [--workdir /tmp/pacsbridge-bench-ingest]
        [--targets storescp,orthanc,noop,durable,pacsbridge] [--assocs 1,4]
        [--pg-url postgresql+psycopg2://postgres@127.0.0.1:5432/pacsbridge_bench_ingest]
        [--broker-url redis://127.0.0.1:6379/13] [--noop-processes N] [--quiet-wait 60]
        [--keep-storage] [--set PACSBRIDGE_NAME=VALUE ...]
        [--baseline-exe OTHER_CHECKOUT/.venv/bin/pacsbridge]  (adds the target ``baseline``)

Steps:

1. ``bench/gen_ct.py`` (:func:`gen_ct.generate`, flat layout) writes N
   synthetic 512x512 CT instances into ``WORKDIR/gen`` once (a stamp file
   caches them), and ``WORKDIR/quarters/q0..q3`` hold symlinks to 4 disjoint,
   contiguous quarters of them for the 4-association runs.  Every file is
   read once so that the page cache is warm for all targets alike.
2. For each target, association count and run: a fresh receiver on a free
   port with a fresh storage folder; the clock starts just before the first
   ``storescu -aet BENCH -aec <AET> +sd +r +sp *.dcm 127.0.0.1 PORT DIR``
   (one on ``gen``, or 4 in parallel on the quarters) and "stored" ends when
   the last one exits: stored inst/s = N / that wall time.  Every DCMTK
   process and Orthanc get ``TCP_NODELAY=1``.  Exit codes and ``E:``/``W:``
   lines of storescu are checked, and that N instances arrived:

   - ``storescp``: ``storescp -aet TARGET --fork -od DIR PORT``; N files in DIR.
   - ``orthanc``: Orthanc with its own config and storage; ``/statistics``
     ``CountInstances == N`` (Orthanc answers a C-STORE only once the
     instance is indexed, so stored = indexed for Orthanc).
   - ``noop``: ``bench/noop_scp.py``, a tuned pynetdicom SCP that stores
     nothing (the pynetdicom ceiling); success = every storescu succeeded.
   - ``durable``: ``bench/noop_scp.py --store``, the same SCP whose handler
     only stores each instance durably with pacsbridge's storage code (fsync,
     cache drop; no header read, template or index): the floor of any
     pynetdicom receiver that fsyncs; N files in its storage.
   - ``pacsbridge``: ``pacsbridge listener`` and ``pacsbridge worker`` as
     separate process groups on PostgreSQL (``init --force`` before each
     run) and Redis (the broker db is flushed before each run), with
     ``PACSBRIDGE_FSYNC=1``.  Also "indexed": N / time from the first
     storescu start until ``select count(*) from dicomimages`` reaches N
     (polled every 0.1 s).  Checks: N files in storage, N rows, nothing
     left in ``.incoming``, no task left in the queue.  The listener and
     worker logs stay in ``WORKDIR/logs/<run>/`` and are scanned for errors.

   - ``baseline`` (only with ``--baseline-exe``): the same as ``pacsbridge``, run by
     another checkout's ``pacsbridge`` command (an earlier commit, in a worktree with
     its own venv), so a change is measured against what it changes in the same run:
     ratios ``indexed_vs_baseline`` / ``stored_vs_baseline``.

   Runs go run by run, each target in turn (not all runs of one target, then the
   next), so drift during the benchmark is shared. Nothing is deleted between runs:
   a finished run's files are truncated to 0 bytes (the disk space comes back, the
   inodes stay) and everything is removed at the end (``--keep-storage`` keeps the
   files). On ext4 without a journal, creating a file skips every inode freed in the
   last minutes one by one, so deleting a run's 2,000 files charged 0.4-0.7 ms of
   kernel time to each file the *next* target created; ``create_ms`` records what
   creating a file cost before each run (a warning above 0.2 ms).

   Before each run the script syncs the disks and waits (up to
   ``--quiet-wait`` seconds) for the CPUs to be idle, and records how busy
   they were: other work on the machine would be measured as part of
   whichever target runs at the time.  Once the receiver answers C-ECHO it
   waits for idle CPUs again (phase ``settle_s``), so that a receiver still
   starting (spawned receiver processes, Celery's pool importing) is not
   measured as slow throughput.  Receivers are started in their own sessions and stopped with SIGTERM to
   the process group (SIGKILL after a timeout), always (try/finally).
3. A table of medians and every run per target x associations; the CPU
   each target used per instance while storescu sent (the whole machine's,
   sender included, from ``/proc/stat``, and the receiver's own process
   groups'); the ratios for pacsbridge (stored / noop, indexed / Orthanc,
   stored / durable) against the targets of the issue (4 associations:
   indexed >= 1.0x Orthanc, stored >= 0.8x noop; 1 association: indexed >=
   0.8x Orthanc), with the limit CPU puts on stored / noop where both are
   CPU-bound (noop's machine CPU per instance over pacsbridge's); then one
   final JSON line with everything, machine facts included.

Progress goes to stderr; stdout carries the table and the JSON line.
Exit status: 0 if every check passed (whether or not the targets were met),
1 if a check failed (the JSON line lists the problems), 2 for bad usage.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

from benchlib import (  # noqa: E402  (bench/ is on sys.path)
    count_files, cpu_busy, create_probe, ensure_database, group_stats, host_facts, machine_cpu_s, median,
    pacsbridge_settings, truncate_files,
)

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_WORKDIR = Path("/tmp/pacsbridge-bench-ingest")
DEFAULT_PG_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/pacsbridge_bench_ingest"
DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/13"
TARGETS = ("storescp", "orthanc", "noop", "durable", "pacsbridge", "baseline")
DEFAULT_TARGETS = TARGETS[:-1]
#: Targets that are pacsbridge (listener + worker, indexed rate measured)
PACSBRIDGES = ("pacsbridge", "baseline")
CALLING_AET = "BENCH"
AETS = {"storescp": "TARGET", "orthanc": "ORTHANC", "noop": "NOOP", "durable": "DURABLE", "pacsbridge": "PACSBRIDGE",
        "baseline": "PACSBRIDGE"}
QUARTERS = 4
#: The issue's targets: (associations, ratio name) -> minimum
GOALS = {(4, "indexed_vs_orthanc"): 1.0, (4, "stored_vs_noop"): 0.8, (1, "indexed_vs_orthanc"): 0.8}
POLL_SECONDS = 0.1
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
#: Settings of pacsbridge.listener that the no-op SCP applies too (so "tuned like ours" holds when comparing them)
SHARED_KNOBS = ("PACSBRIDGE_REACTOR", "PACSBRIDGE_RUN_LOOP_DELAY")
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
#: Log lines worth reporting from the pacsbridge services (and the other receivers)
_LOG_ALERT = re.compile(r"\b(ERROR|CRITICAL|FATAL|Traceback|Exception|WARNING)\b|^[EF]: ")


# -- small helpers -----------------------------------------------------------------------
def log(msg: str) -> None:
    """Progress message on stderr (stdout carries the table and the JSON line)."""
    print(f"[ingest] {msg}", file=sys.stderr, flush=True)


def base_env(**extra: str) -> dict[str, str]:
    """The current environment without ``PACSBRIDGE_*`` (except the pynetdicom tuning knobs the no-op SCP
    shares with the listener, :data:`SHARED_KNOBS`), with ``TCP_NODELAY=1``, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACSBRIDGE_") or k in SHARED_KNOBS}
    env["TCP_NODELAY"] = "1"
    env.update(extra)
    return env


def pacsbridge_exe() -> str:
    """Path of the ``pacsbridge`` console script (next to this interpreter, else PATH)."""
    candidate = Path(sys.executable).parent / "pacsbridge"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("pacsbridge")
    if not found:
        raise SystemExit("pacsbridge command not found (activate the venv)")
    return found


def free_ports(count: int = 1) -> list[int]:
    """``count`` distinct TCP ports that are free on every address right now."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def listeners_on(port: int) -> int:
    """How many sockets listen on TCP ``port`` (SO_REUSEPORT gives one per process)."""
    total = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 3 and fields[3] == "0A" and fields[1].rsplit(":", 1)[-1] == f"{port:04X}":
                total += 1
    return total


def echo_ok(aec: str, port: int) -> bool:
    """``echoscu`` from BENCH to ``aec`` answered (exit 0)."""
    proc = subprocess.run(["echoscu", "-q", "-to", "2", "-aet", CALLING_AET, "-aec", aec, "127.0.0.1", str(port)],
                          env=base_env(), capture_output=True, text=True, check=False)
    return proc.returncode == 0


def wait_for(what: str, check: Callable[[], bool], procs: list[subprocess.Popen],
             timeout: float = READY_TIMEOUT, interval: float = 0.05) -> float:
    """Poll ``check`` until true; fail early if one of ``procs`` exits. Returns seconds waited."""
    start = time.perf_counter()
    deadline = start + timeout
    while True:
        if check():
            return time.perf_counter() - start
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"{what}: process {p.args[0] if isinstance(p.args, list) else p.args} "
                                   f"exited with {p.returncode} before it was ready")
        if time.perf_counter() > deadline:
            raise RuntimeError(f"{what}: not ready after {timeout:.0f} s")
        time.sleep(interval)


def stop_group(proc: subprocess.Popen, timeout: float = STOP_TIMEOUT) -> tuple[float, str | None]:
    """SIGTERM the process group of ``proc`` (started with a new session) and wait.

    After ``timeout`` seconds the group is killed with SIGKILL. Returns the
    seconds it took and a problem text if it had to be killed. Members of the
    group that outlive its leader (forked children) are waited for too.
    """
    start = time.perf_counter()
    problem = None
    pgid = proc.pid
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        problem = f"{proc.args} did not stop within {timeout:.0f} s of SIGTERM: killed"
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    # the leader is gone; make sure no member of its group is left behind
    deadline = time.perf_counter() + 10
    while _group_alive(pgid):
        if time.perf_counter() > deadline:
            problem = problem or f"{proc.args}: processes of its group outlived it: killed"
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            time.sleep(0.2)
            break
        time.sleep(0.05)
    return time.perf_counter() - start, problem


def _group_alive(pgid: int) -> bool:
    """Is any non-zombie process in process group ``pgid``?"""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] != "Z":
            return True
    return False


def group_cpu(pgids: set[int]) -> dict[int, float]:
    """CPU seconds (user + system) so far of every live process in the process groups ``pgids``, by pid."""
    return {pid: (int(fields[11]) + int(fields[12])) / CLOCK_TICKS for pid, fields in group_stats(pgids, zombies=True)}


class CpuMeter:
    """CPU spent while storescu sends: the machine's, and the receiver's own processes'.

    The receiver's process groups are sampled every 0.1 s, so that processes that end
    within the window (storescp's forks) count up to their last sample.
    """

    def __init__(self, pgids: set[int]) -> None:
        self.pgids = pgids
        self.start_machine = machine_cpu_s()
        self.start = group_cpu(pgids) if pgids else {}
        self.last = dict(self.start)

    def sample(self) -> None:
        if self.pgids:
            self.last.update(group_cpu(self.pgids))

    def result(self, instances: int) -> dict[str, float]:
        """Milliseconds of CPU per instance: whole machine, and the receiver alone."""
        self.sample()
        machine = machine_cpu_s() - self.start_machine
        out = {"machine_cpu_ms": round(1000 * machine / instances, 3)}
        if self.pgids:
            receiver = sum(v - self.start.get(pid, 0.0) for pid, v in self.last.items())
            out["receiver_cpu_ms"] = round(1000 * receiver / instances, 3)
        return out


def wait_quiet(max_wait: float, threshold: float = 0.15) -> tuple[float, float]:
    """Wait (up to ``max_wait`` s) until the CPUs are mostly idle; return (last busy fraction, seconds waited).

    Other work on the machine (a test suite, a build) would be measured as
    part of whichever target runs at the time.
    """
    start = time.perf_counter()
    busy = cpu_busy()
    while busy > threshold and time.perf_counter() - start < max_wait:
        busy = cpu_busy()
    return busy, round(time.perf_counter() - start, 1)


def scan_log(path: Path, limit: int = 8) -> dict:
    """Lines of a log that look like errors or warnings: total count and the first distinct ones."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return {"file": str(path), "alerts": 0, "samples": []}
    hits = [ln.strip() for ln in lines if _LOG_ALERT.search(ln)]
    samples: list[str] = []
    for ln in hits:
        short = ln[:300]
        if short not in samples:
            samples.append(short)
        if len(samples) >= limit:
            break
    return {"file": str(path), "alerts": len(hits), "samples": samples}


# -- step 1: data ------------------------------------------------------------------------
def prepare_data(workdir: Path, instances: int) -> tuple[Path, list[Path]]:
    """Generated files in ``WORKDIR/gen`` (cached) and ``QUARTERS`` symlink folders."""
    sys.path.insert(0, str(BENCH_DIR))
    from gen_ct import generate  # noqa: E402  (bench/ is not a package)

    gen = workdir / "gen"
    stamp = workdir / "gen.json"
    try:
        cached = json.loads(stamp.read_text()).get("instances")
    except (OSError, ValueError):
        cached = None
    files = sorted(gen.glob("*.dcm")) if gen.is_dir() else []
    if cached == instances and len(files) == instances:
        log(f"reusing {instances} generated files in {gen}")
    else:
        shutil.rmtree(gen, ignore_errors=True)
        stamp.unlink(missing_ok=True)
        log(f"generating {instances} CT instances into {gen} ...")
        t0 = time.perf_counter()
        files = sorted(generate(gen, instances, layout="flat"))
        log(f"generated {len(files)} files in {time.perf_counter() - t0:.1f} s")
        stamp.write_text(json.dumps({"instances": instances}) + "\n")

    quarters_root = workdir / "quarters"
    quarters = []
    bounds = [round(i * len(files) / QUARTERS) for i in range(QUARTERS + 1)]
    wanted = [[f.name for f in files[bounds[q]:bounds[q + 1]]] for q in range(QUARTERS)]
    have = [sorted(p.name for p in (quarters_root / f"q{q}").glob("*.dcm")) for q in range(QUARTERS)]
    if have != wanted:  # made again only when they changed: deleting inodes slows later creates (see one_run)
        shutil.rmtree(quarters_root, ignore_errors=True)
        for q in range(QUARTERS):
            (quarters_root / f"q{q}").mkdir(parents=True)
            for f in files[bounds[q]:bounds[q + 1]]:
                (quarters_root / f"q{q}" / f.name).symlink_to(f)
    quarters = [quarters_root / f"q{q}" for q in range(QUARTERS)]
    log(f"quarters: {[bounds[q + 1] - bounds[q] for q in range(QUARTERS)]} files (symlinks) in {quarters_root}")
    size = 0
    for f in files:
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 20):
                size += len(chunk)
    log(f"warmed page cache: read {len(files)} files, {size / 1e6:.0f} MB")
    return gen, quarters


# -- receivers ---------------------------------------------------------------------------
class Receiver:
    """One fresh receiver for one run: start, wait until ready, check, stop.

    Subclasses set ``name`` and implement :meth:`start` and :meth:`check`.
    """

    name = ""

    def __init__(self, run_dir: Path, log_dir: Path, instances: int) -> None:
        self.run_dir = run_dir
        self.log_dir = log_dir
        self.instances = instances
        self.storage = run_dir / "storage"
        self.port = free_ports(1)[0]
        self.procs: list[subprocess.Popen] = []
        self.phases: dict[str, float] = {}
        self.logs: list[Path] = []

    @property
    def aet(self) -> str:
        return AETS[self.name]

    def spawn(self, label: str, cmd: list[str], env: dict[str, str], cwd: Path | None = None) -> subprocess.Popen:
        """Start ``cmd`` in a new session, output to ``LOGDIR/<label>.log``."""
        path = self.log_dir / f"{label}.log"
        self.logs.append(path)
        with open(path, "wb") as out:
            proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def start(self) -> None:
        raise NotImplementedError

    def wait_ready(self) -> None:
        """Port listening and C-ECHO answered."""
        self.phases["ready_s"] = round(wait_for(
            f"{self.name} on port {self.port}",
            lambda: listeners_on(self.port) >= self.expected_listeners() and echo_ok(self.aet, self.port),
            self.procs), 3)

    def expected_listeners(self) -> int:
        return 1

    def check(self) -> list[str]:
        """Problems found after all storescu exited (empty: all N arrived)."""
        raise NotImplementedError

    def stop(self) -> list[str]:
        """Stop every process (SIGTERM to its group); return problems."""
        problems = []
        t0 = time.perf_counter()
        for proc in self.procs:
            _, problem = stop_group(proc)
            if problem:
                problems.append(problem)
        self.phases["stop_s"] = round(time.perf_counter() - t0, 3)
        return problems


class StorescpReceiver(Receiver):
    """DCMTK ``storescp --fork``: the native reference."""

    name = "storescp"

    def start(self) -> None:
        self.storage.mkdir(parents=True)
        self.spawn("storescp", ["storescp", "-aet", self.aet, "--fork", "-od", str(self.storage), str(self.port)],
                   base_env())

    def check(self) -> list[str]:
        n = count_files(self.storage)
        return [] if n == self.instances else [f"storescp: {n} files in {self.storage}, expected {self.instances}"]


class OrthancReceiver(Receiver):
    """Orthanc (Debian) with its own config, SQLite index and storage; no plugins."""

    name = "orthanc"

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.port, self.http_port = free_ports(2)

    def start(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "pacsbridge-bench", "StorageDirectory": str(self.storage), "IndexDirectory": str(self.storage),
            "DicomAet": self.aet, "DicomPort": self.port, "HttpPort": self.http_port,
            "DicomCheckCalledAet": False, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "Plugins": [],
        }
        cfg = self.run_dir / "orthanc.json"
        cfg.write_text(json.dumps(config, indent=2) + "\n")
        self.spawn("orthanc", ["Orthanc", str(cfg)], base_env(), cwd=self.run_dir)

    def rest(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=5) as resp:
            return json.loads(resp.read())

    def wait_ready(self) -> None:
        def http_ok() -> bool:
            try:
                self.rest("/system")
                return True
            except (urllib.error.URLError, OSError, ValueError):
                return False

        wait_for("orthanc HTTP", http_ok, self.procs)
        super().wait_ready()

    def check(self) -> list[str]:
        try:
            stats = self.rest("/statistics")
        except (urllib.error.URLError, OSError, ValueError) as exc:
            return [f"orthanc: GET /statistics failed: {exc}"]
        n = stats.get("CountInstances")
        return [] if n == self.instances else [f"orthanc: /statistics CountInstances={n}, expected {self.instances}"]


class NoopReceiver(Receiver):
    """``bench/noop_scp.py``: pynetdicom answering success, storing nothing."""

    name = "noop"

    def __init__(self, *args: Any, processes: int) -> None:
        super().__init__(*args)
        self.processes = processes

    def start(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.spawn("noop_scp", [sys.executable, str(BENCH_DIR / "noop_scp.py"), str(self.port), "--aet", self.aet,
                                "--processes", str(self.processes)], base_env())

    def expected_listeners(self) -> int:
        return 1  # one listening socket, shared by its processes (the listener's model)

    def check(self) -> list[str]:
        return []  # nothing is stored: the storescu checks are the check


class DurableReceiver(NoopReceiver):
    """``bench/noop_scp.py --store``: the no-op SCP whose handler only stores, durably, with
    pacsbridge's storage code (no header read, no template, no index): what any pynetdicom
    receiver that fsyncs pays at the least."""

    name = "durable"

    def start(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.spawn("durable_scp", [sys.executable, str(BENCH_DIR / "noop_scp.py"), str(self.port), "--aet", self.aet,
                                   "--processes", str(self.processes), "--store", str(self.storage)], base_env())

    def check(self) -> list[str]:
        n = count_files(self.storage)
        return [] if n == self.instances else [f"durable: {n} files in {self.storage}, expected {self.instances}"]


class PacsbridgeReceiver(Receiver):
    """``pacsbridge listener`` + ``pacsbridge worker`` on PostgreSQL and Redis, fsync on."""

    name = "pacsbridge"
    #: The ``pacsbridge`` arguments run before each start: ``init --force`` empties the index
    #: (``bench/scale.py`` runs plain ``init`` on its full index instead).
    init_args: tuple[str, ...] = ("init", "--force")

    def __init__(self, *args: Any, pg_url: str, broker_url: str, exe: str | None = None) -> None:
        super().__init__(*args)
        self.exe = exe or pacsbridge_exe()
        self.pg_url = pg_url
        self.broker_url = broker_url
        self.env = base_env(
            PACSBRIDGE_STORAGE=str(self.storage),
            PACSBRIDGE_DATABASE_URL=pg_url,
            PACSBRIDGE_BROKER_URL=broker_url,
            PACSBRIDGE_ALLOWED_PEERS=CALLING_AET,
            PACSBRIDGE_LISTENER_PORT=str(self.port),
            PACSBRIDGE_FSYNC="1",
        )
        self.engine: Any = None

    def start(self) -> None:
        import redis
        from sqlalchemy import create_engine

        self.run_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        client = redis.Redis.from_url(self.broker_url)
        try:
            client.flushdb()
        finally:
            client.close()
        init = subprocess.run([self.exe, *self.init_args], env=self.env, capture_output=True, text=True,
                              check=False)
        (self.log_dir / "init.log").write_text(init.stdout + init.stderr)
        if init.returncode != 0:
            raise RuntimeError(f"pacsbridge {' '.join(self.init_args)} failed (exit {init.returncode}): "
                               f"{init.stderr[-2000:]}")
        self.phases["flush_init_s"] = round(time.perf_counter() - t0, 3)
        self.engine = create_engine(self.pg_url, isolation_level="AUTOCOMMIT")
        self.spawn("listener", [self.exe, "listener"], self.env, cwd=self.run_dir)
        self.spawn("worker", [self.exe, "worker"], self.env, cwd=self.run_dir)

    def expected_listeners(self) -> int:
        return 1  # one listening socket, shared by the receiver processes

    def wait_ready(self) -> None:
        worker_log = self.log_dir / "worker.log"

        def worker_ready() -> bool:
            try:
                # the indexing worker: "index@host ready." (one Celery worker per role since the jobs issue)
                return re.search(r"\b(?:index|celery)@\S+ ready\.", worker_log.read_text(errors="replace")) is not None
            except OSError:
                return False

        t0 = time.perf_counter()
        super().wait_ready()
        wait_for("pacsbridge worker", worker_ready, self.procs)
        self.phases["ready_s"] = round(time.perf_counter() - t0, 3)

    def indexed(self) -> int:
        """``select count(*) from dicomimages``."""
        from sqlalchemy import text

        with self.engine.connect() as conn:
            return int(conn.execute(text("select count(*) from dicomimages")).scalar())

    def check(self) -> list[str]:
        import redis

        problems = []
        n = count_files(self.storage)
        if n != self.instances:
            problems.append(f"pacsbridge: {n} files in storage {self.storage}, expected {self.instances}")
        rows = self.indexed()
        if rows != self.instances:
            problems.append(f"pacsbridge: {rows} rows in dicomimages, expected {self.instances}")
        incoming = self.storage / ".incoming"
        left = count_files(incoming, skip_dot=False) if incoming.is_dir() else 0
        if left:
            problems.append(f"pacsbridge: {left} files left in {incoming}")
        client = redis.Redis.from_url(self.broker_url)
        try:
            queued = client.llen("pacsbridge")
        finally:
            client.close()
        if queued:
            problems.append(f"pacsbridge: {queued} tasks still queued in the broker")
        return problems

    def stop(self) -> list[str]:
        problems = super().stop()
        if self.engine is not None:
            self.engine.dispose()
        return problems


# -- sending -----------------------------------------------------------------------------
def send(aec: str, port: int, dirs: list[Path], log_dir: Path, instances: int,
         probe: Callable[[], int] | None = None, pgids: set[int] | None = None) -> tuple[dict, list[str]]:
    """Run one storescu per folder in parallel; time them; poll ``probe`` for "indexed".

    Returns (timings, problems). ``stored_s`` runs from the first storescu start
    to the last exit; ``indexed_s`` from the first start until ``probe()``
    (polled every 0.1 s) reaches ``instances``. Over the same "stored" window,
    ``machine_cpu_ms`` and ``receiver_cpu_ms`` (processes in ``pgids``): CPU per instance.
    """
    env = base_env()
    procs: list[subprocess.Popen] = []
    ends: list[float | None] = [None] * len(dirs)
    outs = [log_dir / f"storescu-{k}.log" for k in range(len(dirs))]
    stored = threading.Event()
    timeout = max(300.0, instances / 5)
    problems: list[str] = []

    def waiter(k: int) -> None:
        procs[k].wait()
        ends[k] = time.perf_counter()
        if all(e is not None for e in ends):
            stored.set()  # the last storescu is done: the CPU meter stops here

    threads = []
    result: dict[str, Any] = {}
    meter = CpuMeter(pgids or set())

    def meter_loop() -> None:
        while not stored.wait(0.1):
            meter.sample()
        result.update(meter.result(instances))

    sampler = threading.Thread(target=meter_loop, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    try:
        for k, folder in enumerate(dirs):
            with open(outs[k], "wb") as out:
                procs.append(subprocess.Popen(
                    ["storescu", "-aet", CALLING_AET, "-aec", aec, "+sd", "+r", "+sp", "*.dcm", "127.0.0.1",
                     str(port), str(folder)], env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT))
            th = threading.Thread(target=waiter, args=(k,), daemon=True)
            th.start()
            threads.append(th)
        if probe is not None:
            last, last_change, backlog = -1, time.perf_counter(), None
            while True:
                count = probe()
                now = time.perf_counter()
                if count >= instances:
                    result["indexed_s"] = now - t0
                    break
                if count != last:
                    last, last_change = count, now
                done = all(e is not None for e in ends)
                if done and backlog is None:
                    backlog = instances - count
                if (done and now - last_change > 60) or now - t0 > timeout:
                    problems.append(f"indexed count stuck at {count} of {instances} "
                                    f"({now - t0:.0f} s after the first storescu start)")
                    break
                time.sleep(POLL_SECONDS)
            result["not_indexed_when_stored"] = backlog if backlog is not None else 0
        for th in threads:
            th.join(max(0.0, timeout - (time.perf_counter() - t0)))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
                problems.append(f"storescu {p.args[-1]} killed after {timeout:.0f} s")
        stored.set()  # also when a storescu could not start: the meter must not sample forever
    for th in threads:
        th.join()
    sampler.join()
    finished = [e for e in ends if e is not None]
    if finished:
        result["stored_s"] = max(finished) - t0
    result["storescu_exit"] = [p.returncode for p in procs]
    for k, p in enumerate(procs):
        text = outs[k].read_text(errors="replace")
        bad = [ln for ln in text.splitlines() if ln.startswith(("E:", "F:", "W:"))]
        if p.returncode != 0 or bad:
            problems.append(f"storescu {p.args[-1]}: exit {p.returncode}, {len(bad)} E/F/W lines, e.g. "
                            f"{bad[:3]} (log {outs[k]})")
    return result, problems


# -- one run -----------------------------------------------------------------------------
def one_run(args: argparse.Namespace, target: str, assocs: int, run: int, gen: Path,
            quarters: list[Path]) -> tuple[dict, list[str], list[dict]]:
    """Fresh receiver, send all N, check, stop. Returns (result, problems, log scans)."""
    name = f"{target}-a{assocs}-r{run}"
    run_dir = args.workdir / "runs" / name
    log_dir = args.workdir / "logs" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.rmtree(log_dir, ignore_errors=True)
    log_dir.mkdir(parents=True)
    os.sync()  # start every run without the previous run's dirty pages
    create_ms = create_probe(args.workdir / "runs" / "probes" / name)
    busy, waited = wait_quiet(args.quiet_wait)
    common = (run_dir, log_dir, args.instances)
    receiver: Receiver
    if target == "storescp":
        receiver = StorescpReceiver(*common)
    elif target == "orthanc":
        receiver = OrthancReceiver(*common)
    elif target == "noop":
        receiver = NoopReceiver(*common, processes=args.noop_processes)
    elif target == "durable":
        receiver = DurableReceiver(*common, processes=args.noop_processes)
    else:
        receiver = PacsbridgeReceiver(*common, pg_url=args.pg_url, broker_url=args.broker_url,
                                      exe=args.baseline_exe if target == "baseline" else None)
        receiver.name = target
        receiver.env.update(args.pacsbridge_env)
    dirs = [gen] if assocs == 1 else quarters
    problems: list[str] = []
    timing: dict = {}
    t_start = time.perf_counter()
    try:
        receiver.start()
        receiver.wait_ready()
        # the receiver answering is not the receiver settled: spawned receiver processes and
        # Celery's pool may still be importing, and that start-up CPU would be measured as
        # throughput; every target gets the same wait for idle CPUs before the clock starts
        busy_ready, settled = wait_quiet(args.quiet_wait)
        receiver.phases["settle_s"] = settled
        receiver.phases["cpu_busy_at_start"] = round(busy_ready, 2)
        probe = receiver.indexed if isinstance(receiver, PacsbridgeReceiver) else None
        timing, errs = send(receiver.aet, receiver.port, dirs, log_dir, args.instances, probe,
                            pgids={p.pid for p in receiver.procs})
        problems += errs
        problems += receiver.check()
    except Exception as exc:  # noqa: BLE001 - one failed run must not stop the others
        problems.append(f"{name}: {type(exc).__name__}: {exc}")
    finally:
        problems += receiver.stop()
    scans = [s for s in (scan_log(p) for p in receiver.logs) if s["alerts"]]
    result: dict[str, Any] = {"target": target, "assocs": assocs, "run": run, "port": receiver.port,
                              "cpu_busy_before": busy, "waited_for_quiet_s": waited, "create_ms": create_ms,
                              "phases": receiver.phases, "storescu_exit": timing.get("storescu_exit")}
    for key in ("machine_cpu_ms", "receiver_cpu_ms"):
        if key in timing:
            result[key] = timing[key]
    if "stored_s" in timing:
        result["stored_s"] = round(timing["stored_s"], 3)
        result["stored_per_s"] = round(args.instances / timing["stored_s"], 1)
    if "indexed_s" in timing:
        result["indexed_s"] = round(timing["indexed_s"], 3)
        result["indexed_per_s"] = round(args.instances / timing["indexed_s"], 1)
        result["not_indexed_when_stored"] = timing.get("not_indexed_when_stored")
    if target == "orthanc" and "stored_per_s" in result and not problems:
        result["indexed_per_s"] = result["stored_per_s"]  # Orthanc answers after indexing
    result["ok"] = not problems
    result["wall_s"] = round(time.perf_counter() - t_start, 1)
    if not args.keep_storage:
        truncate_files(run_dir)
    return result, problems, scans


# -- report -----------------------------------------------------------------------------
def tool_version(cmd: list[str]) -> str | None:
    """First line of ``cmd``'s output that has a version number in it."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in (proc.stdout + proc.stderr).splitlines():
        if re.search(r"\d+\.\d+", line):
            return line.strip().strip("$").strip()
    return None


def machine_facts(args: argparse.Namespace) -> dict:
    """nproc, CPU, memory, kernel, and the versions of everything involved."""
    facts: dict[str, Any] = host_facts(
        ("pacsbridge", "pynetdicom", "pydicom", "celery", "kombu", "redis", "sqlalchemy", "psycopg2-binary"))
    facts.update({"loadavg_at_start": os.getloadavg(), "dcmtk": tool_version(["storescu", "--version"]),
                  "orthanc": tool_version(["Orthanc", "--version"])})
    if set(PACSBRIDGES) & set(args.targets):
        try:
            import redis

            client = redis.Redis.from_url(args.broker_url)
            facts["redis_server"] = client.info("server").get("redis_version")
            client.close()
        except Exception as exc:  # noqa: BLE001 - a fact, not a check
            facts["redis_server"] = f"unknown ({exc})"
    facts["noop_processes"] = args.noop_processes
    # the listener gets no PACSBRIDGE_* from this environment (base_env), only what --set gives
    facts["pacsbridge_listener_processes"] = int(args.pacsbridge_env.get("PACSBRIDGE_LISTENER_PROCESSES") or 0) or \
        2 * (os.cpu_count() or 1)
    return facts


def _ratio(top: dict, bottom: dict, key: str) -> float | None:
    """``top[key] / bottom[key]`` to 0.01, or None where either is missing."""
    return round(top[key] / bottom[key], 2) if top.get(key) and bottom.get(key) else None


def summarize(results: list[dict], targets: list[str], assocs_list: list[int]) -> tuple[dict, dict, dict]:
    """Medians per target x associations, pacsbridge ratios and goals."""
    table: dict[str, dict[str, dict]] = {}
    for target in targets:
        for a in assocs_list:
            runs = [r for r in results if r["target"] == target and r["assocs"] == a]
            stored = [r["stored_per_s"] for r in runs if r["ok"] and "stored_per_s" in r]
            indexed = [r["indexed_per_s"] for r in runs if r["ok"] and "indexed_per_s" in r]
            table.setdefault(target, {})[str(a)] = {
                "stored_per_s": median(stored), "stored_runs": [r.get("stored_per_s") for r in runs],
                "indexed_per_s": median(indexed), "indexed_runs": [r.get("indexed_per_s") for r in runs],
                "failed_runs": sum(1 for r in runs if not r["ok"]),
                "machine_cpu_ms": median_ms([r["machine_cpu_ms"] for r in runs if r["ok"] and "machine_cpu_ms" in r]),
                "receiver_cpu_ms": median_ms([r["receiver_cpu_ms"] for r in runs
                                              if r["ok"] and "receiver_cpu_ms" in r]),
            }
    ratios: dict[str, dict] = {}
    goals: dict[str, dict] = {}
    for a in assocs_list:
        pb = table.get("pacsbridge", {}).get(str(a), {})
        noop = table.get("noop", {}).get(str(a), {})
        durable = table.get("durable", {}).get(str(a), {})
        orth = table.get("orthanc", {}).get(str(a), {})
        base = table.get("baseline", {}).get(str(a), {})
        r = {
            "indexed_vs_baseline": _ratio(pb, base, "indexed_per_s"),
            "stored_vs_baseline": _ratio(pb, base, "stored_per_s"),
            "stored_vs_noop": _ratio(pb, noop, "stored_per_s"),
            "indexed_vs_orthanc": _ratio(pb, orth, "indexed_per_s"),
            "stored_vs_orthanc": _ratio(pb, orth, "stored_per_s"),
            "stored_vs_durable": _ratio(pb, durable, "stored_per_s"),
            "durable_vs_noop": _ratio(durable, noop, "stored_per_s"),
            # where both are CPU-bound, stored/noop cannot exceed this: the no-op's CPU per instance
            # (machine-wide, sender included) over pacsbridge's
            "cpu_bound_stored_vs_noop": _ratio(noop, pb, "machine_cpu_ms"),
        }
        ratios[str(a)] = r
        for (ga, gname), minimum in GOALS.items():
            if ga == a:
                goals[f"{gname}_{a}assoc"] = {"min": minimum, "value": r[gname],
                                              "met": r[gname] is not None and r[gname] >= minimum}
    return table, ratios, goals


def median_ms(values: list[float]) -> float | None:
    """Median to 0.01 ms, or None for no values."""
    return round(statistics.median(values), 2) if values else None


def fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


def print_table(args: argparse.Namespace, results: list[dict], table: dict, ratios: dict, goals: dict) -> None:
    """The human-readable report on stdout."""
    print(f"\ningest benchmark: {args.instances} synthetic 512x512 CT instances (~0.5 MB), DCMTK storescu "
          f"sender, TCP_NODELAY=1, {args.runs} run(s) each, nproc={os.cpu_count()}")
    print("inst/s; stored = N / storescu wall time (first start -> last exit); indexed = N / (first start -> "
          "N rows in dicomimages); Orthanc answers after indexing, so its indexed = stored")
    print(f"{'target':<11} {'assoc':>5} {'stored med':>10} {'indexed med':>11}   runs stored | runs indexed")
    for target, per in table.items():
        for a, row in per.items():
            stored_runs = " ".join(fmt(v) for v in row["stored_runs"])
            indexed_runs = " ".join(fmt(v) for v in row["indexed_runs"]) if target in PACSBRIDGES else ""
            failed = f"  ({row['failed_runs']} FAILED)" if row["failed_runs"] else ""
            print(f"{target:<11} {a:>5} {fmt(row['stored_per_s']):>10} "
                  f"{fmt(row['indexed_per_s']) if target in (*PACSBRIDGES, 'orthanc') else '':>11}   "
                  f"{stored_runs} | {indexed_runs}{failed}")
    print("\nCPU per instance while storescu sends (ms, medians): whole machine (sender included) / the "
          "receiver's own processes")
    for target, per in table.items():
        for a, row in per.items():
            print(f"  {target:<11} {a} assoc: machine {row['machine_cpu_ms']} / receiver {row['receiver_cpu_ms']}")
    if "pacsbridge" in table:
        print("\npacsbridge ratios (medians):")
        for a, r in ratios.items():
            print(f"  {a} assoc: stored/noop {r['stored_vs_noop']}, indexed/orthanc {r['indexed_vs_orthanc']}, "
                  f"stored/orthanc {r['stored_vs_orthanc']}, stored/durable {r['stored_vs_durable']}; "
                  f"durable/noop {r['durable_vs_noop']}; CPU-bound limit of stored/noop "
                  f"(noop machine CPU / pacsbridge's) {r['cpu_bound_stored_vs_noop']}"
                  + (f"; against baseline: indexed {r['indexed_vs_baseline']}, stored {r['stored_vs_baseline']}"
                     if r["indexed_vs_baseline"] is not None else ""))
        print("targets of the issue:")
        for name, g in goals.items():
            print(f"  {name}: {g['value']} (need >= {g['min']}): {'MET' if g['met'] else 'NOT MET'}")
    pb_runs = [r for r in results if r["target"] in PACSBRIDGES]
    if pb_runs:
        print("\npacsbridge per run: stored s, indexed s, rows not yet indexed when storescu finished, "
              "startup (flush+init, ready) and stop s")
        for r in pb_runs:
            ph = r["phases"]
            print(f"  {r['target']} a{r['assocs']} r{r['run']}: stored {r.get('stored_s', '-')} s, "
                  f"indexed {r.get('indexed_s', '-')}"
                  f" s, backlog {r.get('not_indexed_when_stored', '-')}, init {ph.get('flush_init_s', '-')} s, "
                  f"ready {ph.get('ready_s', '-')} s, stop {ph.get('stop_s', '-')} s")
    slow = [r for r in results if r.get("create_ms", 0) > 0.2]
    if slow:
        print(f"WARNING: creating a file cost over 0.2 ms before {len(slow)} run(s) (inodes freed in the last "
              "minutes, ext4 without a journal): "
              + ", ".join(f"{r['target']}-a{r['assocs']}-r{r['run']} {r['create_ms']} ms" for r in slow))
    busy = [r for r in results if r.get("cpu_busy_before", 0) > 0.2]
    if busy:
        print(f"WARNING: other load on the machine before {len(busy)} run(s): "
              + ", ".join(f"{r['target']}-a{r['assocs']}-r{r['run']} {r['cpu_busy_before']:.0%}" for r in busy))
    print()


# -- main ------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    parser = argparse.ArgumentParser(
        description="C-STORE ingest rate of storescp, Orthanc, a no-op pynetdicom SCP and pacsbridge "
                    "(DCMTK storescu sender, 1 and 4 associations).")
    parser.add_argument("--instances", type=int, default=2000, help="CT instances (default: 2000)")
    parser.add_argument("--runs", type=int, default=3, help="runs per target and association count (default: 3)")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                        help=f"generated files, storage and logs (default: {DEFAULT_WORKDIR})")
    parser.add_argument("--baseline-exe", default=None,
                        help="another checkout's pacsbridge command: adds the target 'baseline' (see the docstring)")
    parser.add_argument("--targets", default=",".join(DEFAULT_TARGETS),
                        help=f"comma-separated subset of {','.join(TARGETS)} (default: all)")
    parser.add_argument("--assocs", default="1,4", help="association counts, each 1 or 4 (default: 1,4)")
    parser.add_argument("--pg-url", default=DEFAULT_PG_URL,
                        help=f"pacsbridge's PostgreSQL index, created if missing (default: {DEFAULT_PG_URL})")
    parser.add_argument("--broker-url", default=DEFAULT_BROKER_URL,
                        help=f"pacsbridge's Redis broker, FLUSHED before each run (default: {DEFAULT_BROKER_URL})")
    parser.add_argument("--noop-processes", type=int, default=2 * (os.cpu_count() or 1),
                        help="processes of the no-op and durable SCPs (default: the listener's, two per core)")
    parser.add_argument("--quiet-wait", type=float, default=60.0,
                        help="before each run, wait up to this many seconds for the CPUs to be idle "
                             "(other load is reported; default: 60)")
    parser.add_argument("--keep-storage", action="store_true",
                        help="keep each run's stored files (default: emptied after its checks, removed at "
                             "the end)")
    parser.add_argument("--set", action="append", default=[], metavar="PACSBRIDGE_NAME=VALUE",
                        help="a setting for pacsbridge's listener and worker, for before/after runs "
                             "(e.g. PACSBRIDGE_DROP_CACHE=0); repeatable")
    args = parser.parse_args(argv)
    args.pacsbridge_env = pacsbridge_settings(parser, args.set)
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    try:
        args.assocs = [int(a) for a in args.assocs.split(",") if a.strip()]
    except ValueError:
        parser.error("--assocs: expected numbers, e.g. 1,4")
    if args.baseline_exe and "baseline" not in args.targets:
        args.targets.append("baseline")
    if not args.targets or any(t not in TARGETS for t in args.targets):
        parser.error(f"--targets: choose from {','.join(TARGETS)}")
    if "baseline" in args.targets and not (args.baseline_exe and os.access(args.baseline_exe, os.X_OK)):
        parser.error("--targets baseline needs --baseline-exe: another checkout's pacsbridge command")
    if not args.assocs or any(a not in (1, QUARTERS) for a in args.assocs):
        parser.error(f"--assocs: each must be 1 or {QUARTERS}")
    if args.instances < QUARTERS or args.runs < 1 or args.noop_processes < 1:
        parser.error(f"--instances >= {QUARTERS}, --runs >= 1 and --noop-processes >= 1 required")
    for tool in ("storescu", "storescp", "echoscu") + (("Orthanc",) if "orthanc" in args.targets else ()):
        if shutil.which(tool) is None:
            parser.error(f"{tool} not found (apt-get install dcmtk orthanc)")

    args.workdir = args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    facts = machine_facts(args)
    problems: list[str] = []
    log_issues: list[dict] = []
    results: list[dict] = []
    t_all = time.perf_counter()
    if (args.workdir / "runs").exists():
        log(f"removing the runs of an earlier invocation in {args.workdir / 'runs'} (creating files may be slow "
            "for the next minutes on ext4 without a journal: see create_ms)")
        shutil.rmtree(args.workdir / "runs", ignore_errors=True)
    try:
        gen, quarters = prepare_data(args.workdir, args.instances)
        if set(PACSBRIDGES) & set(args.targets):
            facts["postgres_server"] = ensure_database(args.pg_url)
        # run by run, every target in turn: whatever drifts during the benchmark (page cache, the
        # host) is shared by all targets instead of falling on the last ones
        for run in range(1, args.runs + 1):
            for target in args.targets:
                for assocs in args.assocs:
                    result, errs, scans = one_run(args, target, assocs, run, gen, quarters)
                    results.append(result)
                    problems += errs
                    for s in scans:
                        log_issues.append({"run": f"{target}-a{assocs}-r{run}", **s})
                    log(f"{target} {assocs} assoc run {run}: stored {result.get('stored_per_s', '-')} inst/s"
                        + (f", indexed {result.get('indexed_per_s', '-')} inst/s" if target in PACSBRIDGES else "")
                        + f" (run wall {result['wall_s']} s, phases {result['phases']}, "
                          f"CPU busy before {result['cpu_busy_before']:.0%}"
                          + (f" after waiting {result['waited_for_quiet_s']} s" if result['waited_for_quiet_s'] > 1
                             else "") + ")"
                        + (f"; PROBLEMS: {errs}" if errs else "")
                        + (f"; log alerts: {sum(s['alerts'] for s in scans)}" if scans else ""))
    except (RuntimeError, OSError, ValueError) as exc:
        problems.append(f"{type(exc).__name__}: {exc}")
        log(f"ERROR: {exc}")
    except KeyboardInterrupt:
        problems.append("interrupted")
        log("interrupted")

    if not args.keep_storage:
        shutil.rmtree(args.workdir / "runs", ignore_errors=True)
    table, ratios, goals = summarize(results, args.targets, args.assocs)
    print_table(args, results, table, ratios, goals)
    for p in problems:
        print(f"PROBLEM: {p}")
    for issue in log_issues:
        print(f"LOG {issue['run']} {Path(issue['file']).name}: {issue['alerts']} alert lines, e.g.")
        for line in issue["samples"][:4]:
            print(f"    {line}")
    summary = {
        "instances": args.instances, "runs": args.runs, "targets": args.targets, "assocs": args.assocs,
        "sender": "DCMTK storescu +sd +r +sp *.dcm, TCP_NODELAY=1; 4 assoc = 4 storescu on 4 disjoint quarters",
        "results": table, "pacsbridge_ratios": ratios, "goals": goals,
        "all_goals_met": bool(goals) and all(g["met"] for g in goals.values()),
        "run_details": results, "problems": problems, "log_issues": log_issues,
        "total_seconds": round(time.perf_counter() - t_all, 1), "workdir": str(args.workdir),
        "pacsbridge_settings": args.pacsbridge_env,
        "machine": facts,
    }
    print(json.dumps(summary), flush=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
