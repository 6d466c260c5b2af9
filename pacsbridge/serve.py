"""``pacsbridge serve``: listener, worker and API together, on the embedded default, for a first try.

Each service runs as its own process, with exactly the command a compose
service runs (``pacsbridge listener`` / ``worker`` / ``api``) and the same
environment. With nothing configured that means: the SQLite index
``./conquest.db``, storage in ``./data``, and kombu's SQLAlchemy transport on
``./pacsbridge-broker.db`` (a real broker that needs no server). Ctrl-C (or
SIGTERM) stops all of them; if one of them dies, the others are stopped too.
"""

from __future__ import annotations

import argparse
import errno
import os
import re
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from pacsbridge.shared.core.config import Settings
from pacsbridge.shared.core.errors import ConfigError
from pacsbridge.shared.core.supervise import Supervisor

__all__ = ["main", "DEFAULT_FIRST_TRY_PEERS"]

#: Who may store to a first-try listener: any calling AE title (DCMTK's STORESCU / ECHOSCU,
#: pynetdicom's PYNETDICOM, an Orthanc...), from this machine only; the listener logs a warning.
DEFAULT_FIRST_TRY_PEERS = "*@127.0.0.1"
#: The API token of ``pacsbridge serve`` (when PACSBRIDGE_API_TOKENS is unset), kept in the folder
#: it runs in (next to the demo's ``conquest.db``), readable by its owner only, reused on every start.
TOKEN_FILE = "pacsbridge-token"
_TOKEN = re.compile(r"^[\x21-\x7e]{16,512}$")  # what PACSBRIDGE_API_TOKENS accepts (no ':' or ',')


def _kept_token(path: Path) -> str:
    """The token kept in ``path``, or a new one written there (mode 0600)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd) as f:
            token = f.read().strip()
        if _TOKEN.match(token) and ":" not in token and "," not in token:
            if os.stat(path).st_mode & 0o077:
                os.chmod(path, 0o600)
            return token
        print(f"pacsbridge serve: {path} does not hold a usable token; writing a new one", file=sys.stderr)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror or exc} (the API token of `pacsbridge serve`)") from None
    token = secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(token + "\n")
    return token


def _cli_command() -> str:
    """How to call ``pacsbridge`` from here: the name if it is on PATH, else the path of the venv's script."""
    exe = Path(sys.executable).with_name("pacsbridge")
    if not exe.exists():
        return f"{shlex.quote(sys.executable)} -m pacsbridge.cli"
    found = shutil.which("pacsbridge")
    if found and Path(found).resolve() == exe.resolve():
        return "pacsbridge"
    try:
        return shlex.quote(str(exe.absolute().relative_to(Path.cwd())))  # make demo: .venv/bin/pacsbridge
    except ValueError:
        return shlex.quote(str(exe.absolute()))


def _wait_port(host: str, port: int, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> bool:
    host = "127.0.0.1" if host in ("0.0.0.0", "") else host
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex((host, port)) == 0:
                return True
        time.sleep(0.2)
    return False


def _check_ports(settings: Settings) -> None:
    """Refuse to start when a port is taken (another ``pacsbridge serve`` running, say): before the
    demo data is indexed into a database that the running one may be using, and before a banner."""
    wanted = [("DICOM listener", "PACSBRIDGE_LISTENER_PORT", settings.listener_host, settings.listener_port),
              ("HTTP API", "PACSBRIDGE_API_PORT", settings.api_host, settings.api_port)]
    if settings.listener_port == settings.api_port:
        raise ConfigError(f"PACSBRIDGE_LISTENER_PORT and PACSBRIDGE_API_PORT are both {settings.api_port}")
    for what, name, host, port in wanted:
        try:
            infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
            with socket.socket(infos[0][0], socket.SOCK_STREAM) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the services do: TIME_WAIT is fine
                s.bind(infos[0][4])
        except OSError as exc:
            why = "is already in use" if exc.errno == errno.EADDRINUSE else f"cannot be used ({exc.strerror or exc})"
            raise ConfigError(f"port {port} of the {what} ({name}) {why} on {host or '*'}; is another "
                              f"`pacsbridge serve` running? Stop it, or choose another port: {name}=...") from None


def _hide_password(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _banner(settings: Settings, env: dict[str, str], token: str | None) -> str:
    api = f"http://{'127.0.0.1' if settings.api_host in ('0.0.0.0', '') else settings.api_host}:{settings.api_port}"
    auth = f'-H "Authorization: Bearer {token}" ' if token else '-H "Authorization: Bearer $TOKEN" '
    lines = [
        "",
        "pacsbridge is running. Ctrl-C stops it.",
        f"  DICOM listener  AE {settings.ae_title} on port {settings.listener_port}"
        f"  (allowed peers: {env['PACSBRIDGE_ALLOWED_PEERS'] or 'nobody'})",
        f"  HTTP API        {api}/api/v1   (OpenAPI: {api}/api/v1/openapi.json, health: {api}/healthz)",
        f"  index           {_hide_password(settings.database_url)}",
        f"  storage         {Path(settings.storage).resolve()}",
        f"  broker          {env['PACSBRIDGE_BROKER_URL']}",
    ]
    if token:
        lines.append(f"  API token       {token}   (kept in ./{TOKEN_FILE}, mode 0600, and reused; "
                     "PACSBRIDGE_API_TOKENS sets your own)")
    lines += [
        "",
        "Try:",
        f"  storescu -aec {settings.ae_title} 127.0.0.1 {settings.listener_port} some.dcm",
        f"  curl -s {auth}{api}/api/v1/studies",
        f"  curl -s {auth}-H 'Content-Type: application/json' {api}/api/v1/nodes \\",
        "       -d '{\"name\": \"pacs\", \"ae_title\": \"ORTHANC\", \"host\": \"127.0.0.1\", \"port\": 4242}'",
        f"  curl -s {auth}-H 'Content-Type: application/json' {api}/api/v1/jobs \\",
        "       -d '{\"kind\": \"retrieve\", \"node\": \"pacs\", \"query\": {\"PatientID\": \"12345\"}}'",
        f"  PACSBRIDGE_API_URL={api} PACSBRIDGE_API_TOKEN={token or '$TOKEN'} {_cli_command()} jobs",
        "",
    ]
    if not token:
        lines.insert(-1, "  ($TOKEN: one of the tokens of PACSBRIDGE_API_TOKENS)")
    return "\n".join(lines)


def main(settings: Settings, args: argparse.Namespace | None = None) -> int:
    """Start the three services and supervise them until Ctrl-C."""
    # here, not at the top: the command line builds serve's parser for every command, and Celery's
    # import took a quarter of a second of each (rebuild, import, sql ...)
    from pacsbridge.shared.core.celeryapp import DEFAULT_BROKER

    _check_ports(settings)
    env = dict(os.environ)
    # every setting the services must share, the command line's (--dicom-sql, --special-columns ...) too
    env.update(settings.environ())
    env["PACSBRIDGE_DATABASE_URL"] = settings.database_url
    env["PACSBRIDGE_STORAGE"] = str(settings.storage)
    env["PACSBRIDGE_BROKER_URL"] = settings.broker_url or DEFAULT_BROKER
    # the first-try defaults, unless set (in the environment, even empty, or in the PACSBRIDGE_CONFIG file)
    sources = getattr(args, "setting_sources", None) or {}
    if "PACSBRIDGE_ALLOWED_PEERS" not in os.environ and sources.get("allowed_peers", "default") == "default":
        env["PACSBRIDGE_ALLOWED_PEERS"] = DEFAULT_FIRST_TRY_PEERS
    if "PACSBRIDGE_REQUIRE_CALLED_AE" not in os.environ and sources.get("require_called_ae", "default") == "default":
        env["PACSBRIDGE_REQUIRE_CALLED_AE"] = "0"  # DCMTK's and pynetdicom's default ANY-SCP too (a warning says so)
    token = None
    if not settings.api_tokens:
        token = _kept_token(Path(TOKEN_FILE))
        env["PACSBRIDGE_API_TOKENS"] = f"serve:{token}:admin"
    workers = str(getattr(args, "workers", None) or 2)

    from pacsbridge.shared.index.context import open_context

    ctx = open_context(settings)
    ctx.index.create()
    ctx.storage.ensure()
    if getattr(args, "demo", False):
        import pydicom

        from pacsbridge.shared.index.importer import Importer

        folder = Path(os.path.dirname(pydicom.__file__)) / "data" / "test_files"
        report = Importer(ctx.index, ctx.storage, workers=settings.import_workers).import_paths([folder])
        print(f"demo data: {report.stored + report.indexed + report.duplicate} of pydicom's test files indexed, "
              f"{len(report.rejected)} rejected (not DICOM, truncated or without UIDs)", file=sys.stderr)
    ctx.index.engine.dispose()

    me = [sys.executable, "-m", "pacsbridge.cli"]
    commands = {
        "listener": me + ["listener", "--processes", "1"],
        "worker": me + ["worker", "--concurrency", workers],
        "api": me + ["api"],
    }
    sup = Supervisor(own_groups=True)
    try:
        procs = {name: sup.start(name, cmd, env) for name, cmd in commands.items()}
        ready = (_wait_port(settings.listener_host, settings.listener_port, procs["listener"])
                 and _wait_port(settings.api_host, settings.api_port, procs["api"])
                 and sup.ended() is None)  # a port that answers but whose service has exited is someone else's
        if not ready:
            print(f"pacsbridge serve: {sup.ended() or 'a service'} did not start; stopping", file=sys.stderr)
            return 3
        print(_banner(settings, env, token), file=sys.stderr, flush=True)
        ended = sup.watch()
        if ended is not None:
            print(f"pacsbridge serve: {ended} exited with {procs[ended].returncode}; stopping the others",
                  file=sys.stderr)
            return 3
        print("pacsbridge serve: stopping", file=sys.stderr)
        return 0
    finally:
        for name in sup.stop_all(grace=20.0):
            print(f"pacsbridge serve: {name} did not stop in 20 s; killed it", file=sys.stderr)


def add_parser(sub: "argparse._SubParsersAction[argparse.ArgumentParser]", func: object) -> None:
    """The ``serve`` verb."""
    p = sub.add_parser("serve", help="run listener, worker and API together (first try)",
                       description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--workers", type=int, default=None, help="worker processes (default 2)")
    p.add_argument("--demo", action="store_true", help="index pydicom's bundled example files first")
    p.set_defaults(func=func)
