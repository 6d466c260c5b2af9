#!/usr/bin/env python3
"""End-to-end test of docker-compose.yml, run for real with podman-compose (``make compose-test``).

1. installs what is missing from Debian's packages (podman, podman-compose, runc, catatonit, netavark,
   aardvark-dns, iptables, debootstrap, docker-compose, dcmtk) and writes /etc/containers/containers.conf if
   there is none (netavark as network backend: service names resolve through aardvark-dns), and
   removes CNI's stale default bridge if podman once ran with CNI here (its route hides netavark's);
2. builds the base image (deploy/base-image.sh, skipped when it exists), then every image with
   ``podman-compose -f docker-compose.yml -f compose.podman.yml build``;
3. ``up -d`` (with deploy/compose.test-sink.yml) with a generated database password and API tokens
   (a user's, and an admin's to add the sink node), two listeners, three workers, unusual host ports
   (the machine's own PostgreSQL and Redis are never touched: those two are not published), and a
   certificate pair made by ``deploy/tls-selfsigned.sh`` (a throwaway CA) for the TLS front;
4. waits for the listener (DCMTK ``echoscu``) and the API through the TLS front (``GET /healthz``
   over HTTPS, trusting only the generated CA), checks that the same request without that CA fails
   verification, that plain HTTP to the HTTPS port gets no API answer and that the API container
   publishes no port (plain HTTP to the API only inside the compose network), checks that an unknown
   AE title is refused, sends pydicom's example files with DCMTK ``storescu`` (one JPEG file in its
   own association, to see it stored as sent), and checks that every instance is indexed in the
   containers' PostgreSQL (``pacsbridge sql`` in a worker) and listed by ``GET /api/v1/studies`` (HTTPS);
   runs every container's health check (``podman healthcheck run``);
5. scale-out (two listeners, ``COMPOSE_TEST_WORKERS`` workers, one storage volume): the worker replicas
   have distinct host names (their Celery names); ``COMPOSE_TEST_INSTANCES`` synthetic CT instances
   (bench/gen_ct.py) go in through both listeners at once (4 associations) and must each be stored once
   and indexed once (DICOMImages rows = distinct SOPs = distinct files = files in storage, and the
   ``indexed`` counts of the index tasks in the workers' logs add up to N, plus what a reconciler
   re-queued); the CPU each container's cgroup used per instance is printed (idle use subtracted);
   then one push job per series, spread over the workers, sends them to the sink
   (deploy/compose_test_sink.py, a node with ``max_associations`` 1 and ``max_rate`` 50/s), whose log
   must show every instance once, never more associations storing at once than allowed, associations
   from more than one worker container, and the rate;
6. always ``down -v`` and removes the project's network, volumes and containers (also on Ctrl-C).

Exit status 0 when everything passed, 1 with the reason otherwise. Logs of every step are kept in
a temporary folder when something failed (its path is printed).

Settings: COMPOSE_TEST_PROJECT (pacsbridge-ci), COMPOSE_TEST_DICOM_PORT (31112), COMPOSE_TEST_DICOM_PORT2
(31113, the second listener), COMPOSE_TEST_HTTPS_PORT (38443), COMPOSE_TEST_WORKERS (3),
COMPOSE_TEST_INSTANCES (200; 0 skips the scale-out part), COMPOSE_TEST_SINK_ASSOCIATIONS (1),
COMPOSE_TEST_REQUIRE_API (0: when the
API cannot be created yet, the index is checked with SQL only; 1: the API must answer),
COMPOSE_TEST_KEEP=1 (leave the stack running, for debugging; ``down`` it yourself).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROJECT = os.environ.get("COMPOSE_TEST_PROJECT", "pacsbridge-ci")
DICOM_PORT = int(os.environ.get("COMPOSE_TEST_DICOM_PORT", "31112"))
DICOM_PORT2 = int(os.environ.get("COMPOSE_TEST_DICOM_PORT2", "31113"))  # the second listener (listener-2)
HTTPS_PORT = int(os.environ.get("COMPOSE_TEST_HTTPS_PORT", "38443"))
WORKERS = int(os.environ.get("COMPOSE_TEST_WORKERS", "3"))
#: synthetic CT instances (0.5 MB each) sent through both listeners, indexed, then pushed to the sink
INSTANCES = int(os.environ.get("COMPOSE_TEST_INSTANCES", "200"))
#: the sink node's limits: SINK_ASSOCIATIONS at a time (1; more shows the check sees overlaps when they
#: are allowed), at most SINK_RATE instances per second
SINK_ASSOCIATIONS = int(os.environ.get("COMPOSE_TEST_SINK_ASSOCIATIONS", "1"))
SINK_RATE = 50.0
REQUIRE_API = os.environ.get("COMPOSE_TEST_REQUIRE_API", "0") == "1"
KEEP = os.environ.get("COMPOSE_TEST_KEEP", "0") == "1"
COMPOSE = ["podman-compose", "-p", PROJECT, "-f", "docker-compose.yml", "-f", "compose.podman.yml",
           "-f", "deploy/compose.test-sink.yml"]
# netavark + aardvark-dns: without them (they are only Recommends of podman) podman falls back to CNI,
# where containers cannot resolve each other's service names ("postgres", "redis")
# (netavark sets up the bridge with iptables, which none of them depends on: without it every
# container with a network fails to start, "netavark: No such file or directory")
DEBS = ["podman", "podman-compose", "runc", "catatonit", "netavark", "aardvark-dns", "iptables", "debootstrap",
        "docker-compose", "dcmtk"]
CONTAINERS_CONF = Path("/etc/containers/containers.conf")
CONTAINERS_CONF_TEXT = """\
# written by pacsbridge's deploy/compose_test.py: rootful podman without systemd
[containers]
default_ulimits = []
[engine]
cgroup_manager = "cgroupfs"
runtime = "runc"
[network]
network_backend = "netavark"
"""
OUR_AE, THEIR_AE = "CITEST", "PACSBRIDGE"
# pydicom's bundled files: four uncompressed instances of four patients in one association,
# then a JPEG Baseline one in a second association (stored as sent, not transcoded)
PLAIN_FILES = ["CT_small.dcm", "MR_small.dcm", "rtplan.dcm", "rtdose.dcm"]
JPEG_FILE = "SC_rgb_jpeg_dcmtk.dcm"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"


class Failure(Exception):
    """A check failed: the message says which and why."""


class Run:
    """Runs commands with their output in a log folder, and times the phases."""

    def __init__(self) -> None:
        self.logdir = Path(tempfile.mkdtemp(prefix="pacsbridge-compose-test-"))
        self.tls = self.logdir / "tls"  # deploy/tls-selfsigned.sh writes the pair and the CA here
        self.env = self._env()
        self.env["PACSBRIDGE_TLS_DIR"] = str(self.tls)
        self.phases: list[tuple[str, float]] = []
        self.t0 = time.monotonic()
        self.notes: list[str] = []

    @staticmethod
    def _env() -> dict[str, str]:
        """The caller's environment without settings that compose would pick up, plus the test's."""
        drop = ("PACSBRIDGE_", "POSTGRES_", "COMPOSE_FILE", "COMPOSE_PROJECT_NAME", "BASE_IMAGE")
        env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
        env.update({
            "POSTGRES_PASSWORD": secrets.token_hex(16),
            # a user's token for the checks, an admin's to add the sink node
            "PACSBRIDGE_API_TOKENS": f"ci:{secrets.token_hex(16)},ciadmin:{secrets.token_hex(16)}:admin",
            "PACSBRIDGE_ALLOWED_PEERS": OUR_AE,
            "PACSBRIDGE_LISTENER_PUBLISH": f"127.0.0.1:{DICOM_PORT}",
            "PACSBRIDGE_HTTPS_PUBLISH": f"127.0.0.1:{HTTPS_PORT}",
            "PACSBRIDGE_WORKERS": str(WORKERS),
            "PACSBRIDGE_LISTENER2": "1",
            "PACSBRIDGE_LISTENER2_PUBLISH": f"127.0.0.1:{DICOM_PORT2}",
            # an image of this project's own: another checkout's test run builds its own
            "PACSBRIDGE_IMAGE": f"localhost/{PROJECT}:latest",
            "PACSBRIDGE_RECONCILE_MIN_AGE": "5",
            "BUILDAH_FORMAT": "docker",  # keep the images' HEALTHCHECK (the OCI format drops it)
            "TCP_NODELAY": "1",  # DCMTK: no Nagle delay on small PDUs
            "DEBIAN_FRONTEND": "noninteractive",
        })
        return env

    @property
    def token(self) -> str:
        return self.env["PACSBRIDGE_API_TOKENS"].split(",")[0].split(":")[1]

    @property
    def admin_token(self) -> str:
        return self.env["PACSBRIDGE_API_TOKENS"].split(",")[1].split(":")[1]

    def phase(self, name: str) -> None:
        """Start the phase ``name`` (the previous one ends)."""
        now = time.monotonic()
        print(f"[{now - self.t0:6.1f} s] {name}", flush=True)
        self.phases.append((name, now))

    def timings(self) -> str:
        end = time.monotonic()
        marks = self.phases + [("end", end)]
        parts = [f"{name} {marks[i + 1][1] - t:.1f} s" for i, (name, t) in enumerate(self.phases)]
        return f"total {end - self.t0:.1f} s: " + ", ".join(parts)

    def __call__(self, argv: list[str], log: str, check: bool = True, timeout: float = 900,
                 capture: bool = False, quiet_fail: bool = False) -> subprocess.CompletedProcess:
        """Run ``argv`` (no shell) in the repository; its output goes to ``<logdir>/<log>.log``."""
        path = self.logdir / f"{log}.log"
        with open(path, "a", encoding="utf-8") as out:
            out.write(f"$ {' '.join(argv)}\n")
            out.flush()
            try:
                proc = subprocess.run(argv, cwd=ROOT, env=self.env, timeout=timeout, text=True,
                                      stdin=subprocess.DEVNULL,
                                      stdout=subprocess.PIPE if capture else out, stderr=out)
            except FileNotFoundError:
                raise Failure(f"{argv[0]}: not installed") from None
            except subprocess.TimeoutExpired:
                raise Failure(f"`{' '.join(argv[:4])} ...` did not finish in {timeout:.0f} s (log: {path})") from None
            if capture:
                out.write(proc.stdout)
            out.write(f"[exit {proc.returncode}]\n")
        if check and proc.returncode != 0:
            tail = "" if quiet_fail else "\n" + "\n".join(path.read_text(errors="replace").splitlines()[-25:])
            raise Failure(f"`{' '.join(argv[:6])}` exited with {proc.returncode} (log: {path}){tail}")
        return proc


# -- settings ---------------------------------------------------------------------------------
#: PACSBRIDGE_* names in the code that docker-compose.yml does not pass (the env example says why)
NOT_PASSED = {"PACSBRIDGE_CONFIG", "PACSBRIDGE_DICOM_SQL", "PACSBRIDGE_AFTER_STORE", "PACSBRIDGE_API_HOST",
              "PACSBRIDGE_API_URL", "PACSBRIDGE_API_TOKEN", "PACSBRIDGE_INIT_DB"}
#: names that are not settings (a placeholder in documentation)
NOT_SETTINGS = {"PACSBRIDGE_NAME"}


def check_settings() -> list[str]:
    """Settings the code reads that docker-compose.yml or deploy/pacsbridge.env.example lacks."""
    import re

    names: set[str] = set()
    for folder in ("pacsbridge", "shared", "services"):
        for path in (ROOT / folder).rglob("*.py"):
            names |= set(re.findall(r"\bPACSBRIDGE_[A-Z0-9_]*[A-Z0-9]\b", path.read_text(errors="replace")))
    # the settings model declares each as a field `name: type = _f(...)` (PACSBRIDGE_NAME)
    model = (ROOT / "shared" / "core" / "config.py").read_text()
    names |= {"PACSBRIDGE_" + f.upper() for f in re.findall(r"^    ([a-z][a-z0-9_]*): [^=]+= _f\(", model, re.M)}
    names -= NOT_SETTINGS
    text = (ROOT / "docker-compose.yml").read_text()
    # passed to the services (`NAME: ...`), or read by compose itself (`${NAME:-default}`)
    compose = (set(re.findall(r"^\s+(PACSBRIDGE_[A-Z0-9_]+):", text, re.M))
               | set(re.findall(r"\$\{(PACSBRIDGE_[A-Z0-9_]+)", text)))
    example = (ROOT / "deploy" / "pacsbridge.env.example").read_text()
    problems = [f"{n}: read by the code, not passed by docker-compose.yml"
                for n in sorted(names - compose - NOT_PASSED)]
    problems += [f"{n}: not described in deploy/pacsbridge.env.example" for n in sorted(names)
                 if not re.search(rf"\b{n}\b", example)]
    return problems


# -- setup -------------------------------------------------------------------------------------
def install_packages(run: Run) -> None:
    missing = [p for p in DEBS if subprocess.run(["dpkg-query", "-W", "-f=${Status}", p], capture_output=True,
                                                  text=True).stdout.strip() != "install ok installed"]
    if not missing:
        return
    if os.geteuid() != 0:
        raise Failure(f"missing Debian packages {' '.join(missing)}: install them as root")
    print(f"  installing {' '.join(missing)}", flush=True)
    run(["apt-get", "update", "-q"], "apt")
    run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing], "apt")


def drop_stale_cni_bridge() -> None:
    """Remove CNI's default bridge when netavark is the backend.

    A machine where podman once ran with CNI keeps ``cni-podman0`` with a route to
    10.88.0.0/16, the subnet of netavark's default network too. Replies to build
    containers then go to that dead bridge: no DNS, no PyPI, and ``podman-compose build``
    hangs in pip. Nothing uses the CNI bridge once netavark is the backend.
    """
    backend = subprocess.run(["podman", "info", "--format", "{{.Host.NetworkBackend}}"], capture_output=True,
                             text=True, check=False).stdout.strip()
    if backend != "netavark":
        return
    if subprocess.run(["ip", "link", "show", "cni-podman0"], capture_output=True, check=False).returncode != 0:
        return
    done = subprocess.run(["ip", "link", "delete", "cni-podman0"], capture_output=True, text=True, check=False)
    if done.returncode == 0:
        print("  removed the stale CNI bridge cni-podman0 (its route hid netavark's default network)", flush=True)
    else:
        print(f"  note: could not remove the stale CNI bridge cni-podman0: {done.stderr.strip()}", flush=True)


def containers_conf() -> None:
    if CONTAINERS_CONF.exists():
        text = CONTAINERS_CONF.read_text()
        if text.startswith(CONTAINERS_CONF_TEXT.splitlines()[0]) and text != CONTAINERS_CONF_TEXT:
            CONTAINERS_CONF.write_text(CONTAINERS_CONF_TEXT)  # ours, from an older version of this script
            print(f"  updated {CONTAINERS_CONF}", flush=True)
            return
        if "network_backend" not in text:
            print(f"  note: {CONTAINERS_CONF} sets no network_backend: with CNI, service names may not "
                  "resolve between containers", flush=True)
        if "default_ulimits" not in text:
            print(f"  note: {CONTAINERS_CONF} has no `default_ulimits = []`: `podman run` may fail here with "
                  "'error setting rlimits'", flush=True)
        return
    if os.geteuid() != 0:
        raise Failure(f"{CONTAINERS_CONF} is missing and only root can write it")
    CONTAINERS_CONF.parent.mkdir(parents=True, exist_ok=True)
    CONTAINERS_CONF.write_text(CONTAINERS_CONF_TEXT)
    print(f"  wrote {CONTAINERS_CONF}", flush=True)


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def pydicom_files() -> dict[str, dict[str, str]]:
    """The files to send (from the folder of pydicom's bundled test files), with their UIDs."""
    try:
        import pydicom
    except ImportError:
        raise Failure("pydicom is needed to pick the files to send: run with the project's venv "
                      "(make compose-test)") from None
    folder = Path(pydicom.__file__).parent / "data" / "test_files"
    found = {p.name: p for p in folder.glob("*.dcm")}
    files = {}
    for name in PLAIN_FILES + [JPEG_FILE]:
        if name not in found:
            raise Failure(f"{name} is not in {folder}")
        ds = pydicom.dcmread(found[name], stop_before_pixels=True)
        files[name] = {"path": str(found[name]), "sop": str(ds.SOPInstanceUID), "study": str(ds.StudyInstanceUID),
                       "ts": str(ds.file_meta.TransferSyntaxUID)}
    return files


# -- the stack ---------------------------------------------------------------------------------
def project_ids(run: Run, kind: str) -> list[str]:
    label = f"label=io.podman.compose.project={PROJECT}"
    if kind == "container":
        argv = ["podman", "ps", "-a", "-q", "--filter", label]
    else:
        argv = ["podman", "volume", "ls", "-q", "--filter", label]
    out = run(argv, "cleanup", check=False, capture=True).stdout
    return out.split()


def teardown(run: Run) -> None:
    """down -v, then whatever podman-compose 1.0.3 leaves: the network, and anything half-made."""
    ids = project_ids(run, "container")
    if ids:  # all at once (down stops them one by one)
        run(["podman", "stop", "-t", "10", *ids], "down", check=False, timeout=120)
    run([*COMPOSE, "down", "-v"], "down", check=False, timeout=300)
    ids = project_ids(run, "container")
    if ids:
        run(["podman", "rm", "-f", "-t", "2", *ids], "cleanup", check=False)
    vols = project_ids(run, "volume")
    if vols:
        run(["podman", "volume", "rm", "-f", *vols], "cleanup", check=False)
    if run(["podman", "network", "exists", f"{PROJECT}_default"], "cleanup", check=False).returncode == 0:
        run(["podman", "network", "rm", "-f", f"{PROJECT}_default"], "cleanup", check=False)


def container_states(run: Run) -> dict[str, str]:
    out = run(["podman", "ps", "-a", "--format", "json", "--filter", f"label=io.podman.compose.project={PROJECT}"],
              "ps", capture=True).stdout
    return {(c["Names"][0] if isinstance(c["Names"], list) else c["Names"]): c["State"]
            for c in json.loads(out or "[]")}


def name(service: str, n: int = 1) -> str:
    return f"{PROJECT}_{service}_{n}"


def expected_containers() -> list[str]:
    return [name("postgres"), name("redis"), name("listener"), name("listener-2"), name("api"), name("proxy"),
            name("sink")] + [name("worker", i) for i in range(1, WORKERS + 1)]


def check_running(run: Run, allow_down: tuple[str, ...] = ()) -> None:
    states = container_states(run)
    bad = {c: states.get(c, "missing") for c in expected_containers()
           if states.get(c) != "running" and c not in allow_down}
    if bad:
        raise Failure("containers not running: " + ", ".join(f"{c} ({s})" for c, s in bad.items()))


def wait_for(what: str, probe, timeout: float, run: Run, allow_down: tuple[str, ...] = ()) -> float:
    """Call ``probe()`` until it returns true; fail after ``timeout`` s or when a container died."""
    start = time.monotonic()
    while True:
        if probe():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise Failure(f"{what}: not ready after {timeout:.0f} s")
        check_running(run, allow_down)
        time.sleep(1)


def http(url: str, token: str | None = None, context: ssl.SSLContext | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10, context=context) as resp:
            return resp.status, resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8", "replace")
    except (OSError, urllib.error.URLError):
        return 0, ""


def storescu(run: Run, files: list[str], extra: list[str], log: str) -> int:
    proc = run(["storescu", "-v", *extra, "-aet", OUR_AE, "-aec", THEIR_AE, "127.0.0.1", str(DICOM_PORT), *files],
               log, check=False, timeout=120)
    text = (run.logdir / f"{log}.log").read_text(errors="replace")
    ok = text.count("Received Store Response (Success)")
    if proc.returncode != 0 or ok != len(files):
        raise Failure(f"storescu: {ok} of {len(files)} instances stored, exit {proc.returncode} "
                      f"(log: {run.logdir / (log + '.log')})\n" + "\n".join(text.splitlines()[-15:]))
    return ok


def indexed_sops(run: Run) -> dict[str, str]:
    proc = run(["podman", "exec", name("worker"), "pacsbridge", "sql",
                "select SOPInstanc, ObjectFile from DICOMImages", "--format", "json"],
               "sql", check=False, capture=True)
    if proc.returncode != 0:
        return {}
    rows = json.loads(proc.stdout or "[]")
    return {str(r.get("sopinstanc") or r.get("SOPInstanc")): str(r.get("objectfile") or r.get("ObjectFile"))
            for r in rows}


def published_ports(run: Run, container: str) -> list[str]:
    """``podman port``: the container's ports published on the host (``8443/tcp -> 127.0.0.1:38443``)."""
    out = run(["podman", "port", container], "ports", capture=True).stdout
    return [line.strip() for line in out.splitlines() if line.strip()]


def check_tls_front(run: Run, base: str) -> None:
    """HTTPS is the only way to the API from the host: verified TLS, no plain HTTP, no API port."""
    try:
        with urllib.request.urlopen(f"{base}/healthz", timeout=10):  # the system's CAs only
            raise Failure("the TLS front's certificate verified without the generated CA")
    except urllib.error.URLError as exc:
        if not isinstance(exc.reason, ssl.SSLCertVerificationError):
            raise Failure(f"HTTPS without the generated CA failed, but not on verification: {exc.reason!r}") from None
    print("  without the generated CA: certificate verify failed", flush=True)
    status, body = http(f"http://127.0.0.1:{HTTPS_PORT}/healthz")
    if status == 200 or '"ok"' in body or '"checks"' in body:
        raise Failure(f"plain HTTP to the HTTPS port reached the API ({status}): {body[:200]}")
    print(f"  plain HTTP to the HTTPS port: {status} (no API answer)", flush=True)
    api_ports = published_ports(run, name("api"))
    if api_ports:
        raise Failure(f"the API container publishes {api_ports}: plain HTTP must stay inside the compose network")
    proxy_ports = published_ports(run, name("proxy"))
    if proxy_ports != [f"8443/tcp -> 127.0.0.1:{HTTPS_PORT}"]:
        raise Failure(f"the proxy publishes {proxy_ports}, expected only 8443/tcp on 127.0.0.1:{HTTPS_PORT}")
    print(f"  the API container publishes no port; the proxy only {proxy_ports[0]}", flush=True)


def api_can_start(run: Run) -> tuple[bool, str]:
    """Whether ``pacsbridge.api.create_app()`` works in the image (the API may not be written yet)."""
    proc = run(["podman", "exec", name("worker"), "python", "-c",
                "from pacsbridge.api import create_app; create_app()"], "api-probe", check=False, capture=True)
    if proc.returncode == 0:
        return True, ""
    lines = (run.logdir / "api-probe.log").read_text(errors="replace").strip().splitlines()
    return False, next((line for line in reversed(lines) if line and not line.startswith("[exit")), "?")


def dump_logs(run: Run) -> None:
    for c in expected_containers():
        proc = run(["podman", "logs", "--tail", "25", c], f"logs-{c}", check=False)
        if proc.returncode == 0:
            text = (run.logdir / f"logs-{c}.log").read_text(errors="replace").splitlines()[1:-1]
            print(f"---- {c} (last lines) ----\n" + "\n".join(text), file=sys.stderr)


# -- scale-out: two listeners and WORKERS workers on one storage --------------------------------------
def http_json(method: str, url: str, token: str, context: ssl.SSLContext, body: object = None) -> tuple[int, object]:
    """An API call with a JSON body and answer: ``(status, decoded answer or text)``."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30, context=context) as resp:
            status, text = resp.status, resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        status, text = exc.code, exc.read().decode("utf-8", "replace")
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def sql(run: Run, query: str) -> list[dict[str, object]]:
    """Rows of ``query`` on the containers' index (``pacsbridge sql`` in the first worker), keys in lower case."""
    proc = run(["podman", "exec", name("worker"), "pacsbridge", "sql", query, "--format", "json"], "sql", capture=True)
    return [{str(k).lower(): v for k, v in row.items()} for row in json.loads(proc.stdout or "[]")]


def cpu_seconds(run: Run, container: str) -> float:
    """CPU time used so far by every process of ``container`` (its cgroup: v2 ``cpu.stat``, or v1 ``cpuacct``)."""
    for path, scale in (("/sys/fs/cgroup/cpu.stat", 1e-6), ("/sys/fs/cgroup/cpuacct/cpuacct.usage", 1e-9),
                        ("/sys/fs/cgroup/cpu,cpuacct/cpuacct.usage", 1e-9)):
        proc = run(["podman", "exec", container, "cat", path], "cpu", check=False, capture=True)
        if proc.returncode != 0:
            continue
        text = proc.stdout
        if path.endswith("cpu.stat"):
            text = next((line.split()[1] for line in text.splitlines() if line.startswith("usage_usec ")), "")
        try:
            return int(text.strip()) * scale
        except ValueError:
            continue
    raise Failure(f"CPU time of {container}: no cgroup CPU counter readable in the container")


def send_parallel(run: Run, groups: list[tuple[int, list[str]]], log: str) -> None:
    """Send each group of files to its port in its own ``storescu`` (association), all at once."""
    procs = []
    for i, (port, files) in enumerate(groups):
        path = run.logdir / f"{log}-{i}.log"
        out = open(path, "w", encoding="utf-8")
        argv = ["storescu", "-v", "-aet", OUR_AE, "-aec", THEIR_AE, "127.0.0.1", str(port), *files]
        procs.append((subprocess.Popen(argv, cwd=ROOT, env=run.env, stdin=subprocess.DEVNULL, stdout=out,
                                       stderr=subprocess.STDOUT, text=True), out, path, len(files)))
    for proc, out, path, n in procs:
        try:
            code = proc.wait(timeout=600)
        finally:
            out.close()
        ok = path.read_text(errors="replace").count("Received Store Response (Success)")
        if code != 0 or ok != n:
            raise Failure(f"storescu: {ok} of {n} instances stored, exit {code} (log: {path})")


def container_log(container: str) -> str:
    """Everything ``container`` wrote so far, stdout and stderr (where Celery and the listener log)."""
    proc = subprocess.run(["podman", "logs", container], capture_output=True, text=True, timeout=120, check=False)
    return proc.stdout + proc.stderr


def index_reports(container: str) -> list[int]:
    """The ``indexed`` count of every index task the container's Celery workers finished (their log)."""
    import re

    found = re.findall(r"index_files\[[^\]]+\] succeeded in [0-9.e-]+s: \{'indexed': (\d+)", container_log(container))
    return [int(n) for n in found]


def reconciler_queued(container: str) -> int:
    """Instances the container's reconciler queued again (its log): indexing them twice is allowed."""
    import re

    return sum(int(n) for n in re.findall(r"reconciler: (\d+) stored instances were not indexed",
                                          container_log(container)))


def scale_out(run: Run, api_ok: bool) -> None:
    """Both listeners and every worker at once: each instance stored and indexed exactly once, the CPU
    each took, then pushed to the sink node (one association, SINK_RATE/s) by jobs on every worker."""
    if INSTANCES <= 0:
        return
    run.phase(f"scale-out: {INSTANCES} CT instances through 2 listeners, {WORKERS} workers")
    sys.path.insert(0, str(ROOT))
    import pydicom
    from bench.gen_ct import generate

    paths = [str(p) for p in generate(run.logdir / "ct", INSTANCES, patients=4, series_per_study=2, seed=19)]
    series: dict[str, list[str]] = {}
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID", "SeriesInstanceUID"])
        series.setdefault(str(ds.SeriesInstanceUID), []).append(str(ds.SOPInstanceUID))
    sops = {sop for uids in series.values() for sop in uids}
    rows_before = int(sql(run, "select count(*) as n from DICOMImages")[0]["n"])  # type: ignore[call-overload]
    listeners = [name("listener"), name("listener-2")]
    workers = [name("worker", i) for i in range(1, WORKERS + 1)]
    reports_before = {c: len(index_reports(c)) for c in workers}
    # each replica's host name names its Celery workers (index@%h ...) and its job and lease holders
    hosts = {c: run(["podman", "exec", c, "hostname"], "hostname", capture=True).stdout.strip() for c in workers}
    if len(set(hosts.values())) != WORKERS:
        raise Failure(f"worker replicas share host names (their Celery names would clash): {hosts}")
    for c, host in hosts.items():
        if f"index@{host} ready" not in container_log(c):
            raise Failure(f"{c}: no Celery worker index@{host} ready in its log")

    shared = [name("postgres"), name("redis")]
    measured = listeners + workers + shared
    # what the containers burn idle (reconcilers, Celery's heartbeats, health probes), to subtract
    idle0 = {c: cpu_seconds(run, c) for c in measured}
    t_idle = time.monotonic()
    time.sleep(5)
    idle1 = {c: cpu_seconds(run, c) for c in measured}
    idle_rate = {c: (idle1[c] - idle0[c]) / (time.monotonic() - t_idle) for c in idle0}

    # four associations at once, two per listener
    cpu0 = {c: cpu_seconds(run, c) for c in measured}
    t0 = time.monotonic()
    groups = [(DICOM_PORT if i % 2 == 0 else DICOM_PORT2, paths[i::4]) for i in range(4)]
    send_parallel(run, groups, "storescu-scale")
    stored_s = time.monotonic() - t0
    want = rows_before + INSTANCES
    state: dict[str, object] = {}

    def indexed() -> bool:
        row = sql(run, "select count(*) as n, count(distinct SOPInstanc) as sops, count(distinct ObjectFile) as files "
                       "from DICOMImages")[0]
        state.update(row)
        return int(row["n"]) >= want  # type: ignore[call-overload]

    try:
        wait_for("indexing the scale-out instances", indexed, 300, run)
    except Failure:
        raise Failure(f"not all indexed after 300 s: {state} (want {want} rows)") from None
    indexed_s = time.monotonic() - t0
    cpu1 = {c: cpu_seconds(run, c) for c in measured}
    took = {c: max(0.0, cpu1[c] - cpu0[c] - idle_rate[c] * indexed_s) for c in cpu0}
    print(f"  {INSTANCES} instances stored in {stored_s:.1f} s (4 associations over 2 listeners), all indexed "
          f"after {indexed_s:.1f} s", flush=True)
    time.sleep(3)  # late duplicates, if any, would show now
    indexed()
    if not (int(state["n"]) == int(state["sops"]) == int(state["files"]) == want):  # type: ignore[call-overload]
        raise Failure(f"DICOMImages after the scale-out ingest: {state}, expected {want} rows, SOPs and files")
    ours = sql(run, "select count(*) as n from DICOMImages where SOPInstanc in (" +
               ",".join(f"'{s}'" for s in sorted(sops)) + ")")[0]  # UIDs we generated: digits and dots
    if int(ours["n"]) != INSTANCES:  # type: ignore[call-overload]
        raise Failure(f"{ours['n']} of the {INSTANCES} instances sent are in DICOMImages")
    stored = run(["podman", "exec", name("worker"), "find", "/data", "-path", "/data/.*", "-prune", "-o",
                  "-type", "f", "-print"], "find", capture=True).stdout.split()
    if len(stored) != want:
        raise Failure(f"{len(stored)} files in storage for {want} instances (a copy stored twice, or one lost)")
    per_worker = {c: index_reports(c)[reports_before[c]:] for c in workers}
    done = sum(sum(v) for v in per_worker.values())
    again = sum(reconciler_queued(c) for c in listeners)
    if not INSTANCES <= done <= INSTANCES + again:
        raise Failure(f"index tasks indexed {done} files for {INSTANCES} instances sent (reconcilers re-queued "
                      f"{again}): some were indexed twice, or missed")
    spread = ", ".join(f"{c.rsplit('_', 1)[-1]}: {sum(v)} in {len(v)} tasks" for c, v in per_worker.items())
    print(f"  DICOMImages: {want} rows = {want} distinct SOPs = {want} distinct files = files in storage; "
          f"index tasks indexed {done} ({spread})", flush=True)
    listener_cpu = sum(took[c] for c in listeners)
    worker_cpu = sum(took[c] for c in workers)
    mb = sum(os.path.getsize(p) for p in paths) / INSTANCES / 1e6
    per = {k: 1000 * v / INSTANCES for k, v in (("listeners", listener_cpu), ("workers (indexing)", worker_cpu),
                                                 ("postgres", took[shared[0]]), ("redis", took[shared[1]]))}
    text = ", ".join(f"{k} {v:.1f} ms" for k, v in per.items())
    print(f"  CPU per instance ({mb:.2f} MB CT, idle use subtracted; taken under load): {text}", flush=True)
    run.notes.append(f"CPU per instance: {text} ({INSTANCES} x {mb:.2f} MB CT, {indexed_s:.1f} s to indexed; "
                     "under load)")

    if not api_ok:
        run.notes.append("node limits not checked: the API cannot start")
        return
    run.phase(f"scale-out: push to SINK (association limit {SINK_ASSOCIATIONS}, {SINK_RATE:g}/s) "
              f"from {WORKERS} workers")
    base = f"https://localhost:{HTTPS_PORT}/api/v1"
    ca = ssl.create_default_context(cafile=str(run.tls / "ca.pem"))
    status, answer = http_json("POST", f"{base}/nodes", run.admin_token, ca, {
        "name": "SINK", "ae_title": "SINK", "host": "sink", "port": 11112, "max_associations": SINK_ASSOCIATIONS,
        "max_rate": SINK_RATE})
    if status >= 300:
        raise Failure(f"POST /nodes answered {status}: {answer}")
    jobs = []
    for uid in series:  # a job per series, so that every worker gets some
        status, answer = http_json("POST", f"{base}/jobs", run.token, ca,
                                   {"kind": "push", "node": "SINK", "selection": {"SeriesInstanceUID": uid}})
        if status >= 300 or not isinstance(answer, dict):
            raise Failure(f"POST /jobs (push) answered {status}: {answer}")
        jobs.append(str(answer.get("id") or answer.get("ID")))
    t0 = time.monotonic()
    states: dict[str, str] = {}

    def finished() -> bool:
        for job in jobs:
            if states.get(job) in ("succeeded", "partial", "failed", "cancelled"):
                continue
            _, answer = http_json("GET", f"{base}/jobs/{job}", run.token, ca)
            states[job] = str(answer.get("state")) if isinstance(answer, dict) else "?"
        return all(s in ("succeeded", "partial", "failed", "cancelled") for s in states.values()) and \
            len(states) == len(jobs)

    wait_for("push jobs", finished, 300, run)
    pushed_s = time.monotonic() - t0
    if set(states.values()) != {"succeeded"}:
        raise Failure(f"push jobs: {states}")
    lines = [json.loads(line) for line in container_log(name("sink")).splitlines() if line.startswith("{")]
    stores = [e for e in lines if e["ev"] == "store"]
    got: dict[str, int] = {}
    for e in stores:
        got[e["sop"]] = got.get(e["sop"], 0) + 1
    if set(got) != sops or any(n != 1 for n in got.values()):
        twice = sorted(s for s, n in got.items() if n > 1)[:3]
        raise Failure(f"the sink got {len(got)} distinct of {len(sops)} instances, {len(twice)}+ twice ({twice})")
    # an association holds its slot from before it is established until after its last store: at no
    # moment may more than max_associations of these spans be open
    spans: dict[int, list[float]] = {}
    peers: dict[int, str] = {}
    for e in lines:
        if e["ev"] == "est":
            spans[e["a"]] = [e["t"], e["t"]]
            peers[e["a"]] = e["peer"]
        elif e["ev"] == "store":
            spans[e["a"]][1] = e["t"]
    marks = sorted([(a, 1) for a, _ in spans.values()] + [(b, -1) for _, b in spans.values()],
                   key=lambda m: (m[0], m[1]))  # at equal times the end first: touching is no overlap
    most = held = 0
    for _, step in marks:
        held += step
        most = max(most, held)
    if most > SINK_ASSOCIATIONS:
        raise Failure(f"node SINK allows {SINK_ASSOCIATIONS} association(s), but {most} were storing at once")
    if len(set(peers.values())) < 2:
        raise Failure(f"every association to SINK came from one address ({set(peers.values())}): the jobs did not "
                      f"spread over the {WORKERS} workers, so the limit was not tried across containers")
    times = sorted(e["t"] for e in stores)
    floor = 0.9 * (len(times) - 1) / SINK_RATE
    if times[-1] - times[0] < floor:
        raise Failure(f"{len(times)} instances reached SINK in {times[-1] - times[0]:.2f} s: faster than "
                      f"{SINK_RATE:g}/s allows ({floor:.2f} s at least)")
    print(f"  {len(jobs)} push jobs: {len(got)} instances, each once, in {len(spans)} associations from "
          f"{len(set(peers.values()))} worker containers, at most {most} at once; "
          f"{len(times) / max(1e-9, times[-1] - times[0]):.1f}/s (limit {SINK_RATE:g}/s); {pushed_s:.1f} s", flush=True)


# -- the test ----------------------------------------------------------------------------------
def test(run: Run) -> None:
    problems = check_settings()
    if problems:
        raise Failure("settings out of step with the code:\n  " + "\n  ".join(problems))
    run.phase("packages and containers.conf")
    install_packages(run)
    containers_conf()
    drop_stale_cni_bridge()
    if (ROOT / ".env").exists():
        raise Failure(f"{ROOT / '.env'} exists: podman-compose 1.0.3 lets it override the test's settings "
                      "(password, token, ports); move it away for the test")
    for port in (DICOM_PORT, DICOM_PORT2, HTTPS_PORT):
        if not port_free(port):
            raise Failure(f"127.0.0.1:{port} is in use: set COMPOSE_TEST_DICOM_PORT(2) / COMPOSE_TEST_HTTPS_PORT")
    files = pydicom_files()
    teardown(run)  # what a killed earlier run may have left

    # the documented way to make a pair for a try; clients trust its ca.pem, nothing else
    run(["sh", "deploy/tls-selfsigned.sh", str(run.tls)], "tls")
    for f in ("cert.pem", "key.pem", "ca.pem"):
        if not (run.tls / f).is_file():
            raise Failure(f"deploy/tls-selfsigned.sh did not write {f}")

    run.phase("base image")
    run(["bash", "deploy/base-image.sh"], "base-image", timeout=900)

    run.phase("podman-compose build")
    run([*COMPOSE, "build"], "build", timeout=1200)

    run.phase("podman-compose up -d")
    run([*COMPOSE, "up", "-d"], "up", timeout=300)

    run.phase("listener ready (echoscu)")

    def echo() -> bool:
        return run(["echoscu", "-aet", OUR_AE, "-aec", THEIR_AE, "127.0.0.1", str(DICOM_PORT)], "echoscu",
                   check=False).returncode == 0

    waited = wait_for("listener (C-ECHO)", echo, 180, run, allow_down=(name("api"),))
    print(f"  C-ECHO answered after {waited:.1f} s", flush=True)
    waited = wait_for("listener-2 (C-ECHO)", lambda: run(["echoscu", "-aet", OUR_AE, "-aec", THEIR_AE, "127.0.0.1",
                                                          str(DICOM_PORT2)], "echoscu", check=False).returncode == 0,
                      120, run, allow_down=(name("api"),))
    print(f"  the second listener (port {DICOM_PORT2}) answered C-ECHO after {waited:.1f} s more", flush=True)
    if run(["echoscu", "-aet", "INTRUDER", "-aec", THEIR_AE, "127.0.0.1", str(DICOM_PORT)], "echoscu-intruder",
           check=False).returncode == 0:
        raise Failure("the listener accepted C-ECHO from AE INTRUDER, which PACSBRIDGE_ALLOWED_PEERS does not list")
    print("  unknown AE title INTRUDER refused", flush=True)

    run.phase("api ready through the TLS front (/healthz over HTTPS)")
    api_ok, why = api_can_start(run)
    base = f"https://localhost:{HTTPS_PORT}"
    ca = ssl.create_default_context(cafile=str(run.tls / "ca.pem"))
    if api_ok:
        waited = wait_for("api GET /healthz over HTTPS", lambda: http(f"{base}/healthz", context=ca)[0] == 200, 120,
                          run)
        print(f"  https://localhost:{HTTPS_PORT}/healthz answered 200 after {waited:.1f} s (verified "
              "with the generated CA)", flush=True)
        check_tls_front(run, base)
    elif REQUIRE_API:
        raise Failure(f"the API cannot start: {why}")
    else:
        run.notes.append(f"API not checked: create_app() fails in the image ({why}); index checked with SQL only")
        print(f"  API not ready ({why}): checking the index with SQL only", flush=True)

    run.phase("storescu")
    plain = [files[n]["path"] for n in PLAIN_FILES]
    storescu(run, plain, [], "storescu")
    storescu(run, [files[JPEG_FILE]["path"]], ["-xy"], "storescu-jpeg")  # propose JPEG Baseline
    print(f"  {len(files)} instances stored (2 associations)", flush=True)

    run.phase("indexed (pacsbridge sql in a worker)")
    want = {f["sop"] for f in files.values()}
    state: dict[str, dict[str, str]] = {"rows": {}}

    def all_indexed() -> bool:
        state["rows"] = indexed_sops(run)
        return want <= set(state["rows"])

    try:
        waited = wait_for("indexing", all_indexed, 120, run, allow_down=() if api_ok else (name("api"),))
    except Failure:
        raise Failure(f"not indexed after 120 s: {sorted(want - set(state['rows']))}") from None
    print(f"  all {len(want)} SOP instances in DICOMImages after {waited:.1f} s", flush=True)
    jpeg = files[JPEG_FILE]
    proc = run(["podman", "exec", name("listener"), "python", "-c",
                "import sys, pydicom; print(pydicom.dcmread(sys.argv[1], stop_before_pixels=True)"
                ".file_meta.TransferSyntaxUID)", f"/data/{state['rows'][jpeg['sop']]}"], "stored-ts", capture=True)
    if proc.stdout.strip() != JPEG_BASELINE:
        raise Failure(f"{JPEG_FILE} was stored as {proc.stdout.strip()}, not as sent ({JPEG_BASELINE})")
    print("  the JPEG instance is stored as sent (JPEG Baseline)", flush=True)

    if api_ok:
        run.phase("api: GET /api/v1/studies")
        status, _ = http(f"{base}/api/v1/studies", context=ca)
        if status != 401:
            raise Failure(f"GET /api/v1/studies without a token answered {status}, not 401")
        status, body = http(f"{base}/api/v1/studies?limit=1000", run.token, context=ca)
        if status != 200:
            raise Failure(f"GET /api/v1/studies answered {status}: {body[:300]}")
        missing = sorted({f["study"] for f in files.values() if f["study"] not in body})
        if missing:
            raise Failure(f"GET /api/v1/studies does not list the studies {missing}: {body[:300]}")
        print(f"  {len({f['study'] for f in files.values()})} studies listed; 401 without a token", flush=True)

    run.phase("health checks (podman healthcheck run)")
    # podman runs health checks from systemd timers, absent here: run each one, as docker would,
    # until it passes (a worker started last may still be starting)
    deadline = time.monotonic() + 60
    # the proxy (caddy) has no health check of its own: the HTTPS requests above are its check
    # nor has the test's sink (its image's check is pacsbridge's)
    unchecked = (name("proxy"), name("sink")) if api_ok else (name("proxy"), name("sink"), name("api"))
    pending = [c for c in expected_containers() if c not in unchecked]
    while pending:
        pending = [c for c in pending
                   if run(["podman", "healthcheck", "run", c], "healthcheck", check=False).returncode != 0]
        if pending and time.monotonic() > deadline:
            raise Failure(f"health check still failing after 60 s in {', '.join(pending)} "
                          f"(log: {run.logdir / 'healthcheck.log'})")
        if pending:
            time.sleep(2)
    check_running(run, allow_down=() if api_ok else (name("api"),))
    checked = [c for c in expected_containers() if c not in unchecked]
    print(f"  {len(checked)} containers healthy (the proxy and the test's sink have no health check)", flush=True)

    scale_out(run, api_ok)


def main() -> int:
    run = Run()
    interrupted = {"signal": None}

    def on_signal(signum, _frame):  # type: ignore[no-untyped-def]
        interrupted["signal"] = signum
        raise KeyboardInterrupt

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    print(f"compose test: project {PROJECT}, DICOM 127.0.0.1:{DICOM_PORT}, HTTPS 127.0.0.1:{HTTPS_PORT}, "
          f"{WORKERS} workers; logs in {run.logdir}", flush=True)
    ok = False
    try:
        test(run)
        ok = True
    except Failure as exc:
        print(f"\nFAILED: {exc}", file=sys.stderr, flush=True)
        if shutil.which("podman"):
            dump_logs(run)
    except KeyboardInterrupt:
        print(f"\ninterrupted{' by signal %d' % interrupted['signal'] if interrupted['signal'] else ''}",
              file=sys.stderr, flush=True)
    finally:
        # a second Ctrl-C / SIGTERM must not skip the cleanup
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        if KEEP:
            print(f"COMPOSE_TEST_KEEP=1: the stack is left running; stop it with: "
                  f"{' '.join(COMPOSE)} down -v && podman network rm {PROJECT}_default", flush=True)
        elif shutil.which("podman-compose"):
            run.phase("down -v")
            try:
                teardown(run)
                left = project_ids(run, "container") + project_ids(run, "volume")
                if left:
                    print(f"FAILED: cleanup left {left}", file=sys.stderr)
                    ok = False
            except Failure as exc:
                print(f"FAILED: cleanup: {exc}", file=sys.stderr)
                ok = False
    print(run.timings(), flush=True)
    for note in run.notes:
        print(f"note: {note}", flush=True)
    if ok:
        shutil.rmtree(run.logdir, ignore_errors=True)
        print("compose test passed", flush=True)
        return 0
    print(f"compose test FAILED (logs: {run.logdir})", file=sys.stderr, flush=True)
    return 1


if __name__ == "__main__":
    if sys.argv[1:] == ["--check-settings"]:
        found = check_settings()
        print("\n".join(found) if found else "every PACSBRIDGE_* setting the code reads is in docker-compose.yml "
              "and deploy/pacsbridge.env.example")
        sys.exit(1 if found else 0)
    sys.exit(main())
