#!/venv/bin/python
"""Health check of a pacsbridge container (installed as /usr/local/bin/pacsbridge-healthcheck).

    pacsbridge-healthcheck            find the service running in this container and check it
    pacsbridge-healthcheck listener   the DICOM port (PACSBRIDGE_LISTENER_PORT, 11112) is listening
    pacsbridge-healthcheck worker     the Celery workers of this container answer a ping over the broker
    pacsbridge-healthcheck api [URL]  GET URL (default http://127.0.0.1:8080/healthz) answers 2xx

Exit 0 healthy, 1 not. The listener check reads /proc/net/tcp{,6} instead of connecting, so it
neither shows up in the listener's association log nor gets refused by the peer rules.
"""

from __future__ import annotations

import os
import socket
import sys
import urllib.request
from pathlib import Path

LISTEN = "0A"  # TCP state LISTEN in /proc/net/tcp


def listening(port: int) -> bool:
    """True when a socket of this network namespace listens on ``port``."""
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 3 and fields[3] == LISTEN and int(fields[1].rsplit(":", 1)[1], 16) == port:
                return True
    return False


def check_listener() -> str | None:
    port = int(os.environ.get("PACSBRIDGE_LISTENER_PORT") or 11112)
    return None if listening(port) else f"nothing listens on port {port}"


def _cmdlines() -> list[list[str]]:
    """The command lines of this container's processes, by process id."""
    lines = []
    for proc in sorted(Path("/proc").glob("[0-9]*"), key=lambda p: int(p.name)):
        try:
            raw = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        argv = [a.decode(errors="replace") for a in raw.split(b"\0") if a]
        if argv:
            lines.append(argv)
    return lines


def _pacsbridge_args(argv: list[str]) -> list[str] | None:
    """What follows the ``pacsbridge`` command (script or ``-m pacsbridge.cli``) in ``argv``, else None."""
    for i, arg in enumerate(argv[:4]):
        if os.path.basename(arg) == "pacsbridge" or (arg == "pacsbridge.cli" and i > 0 and argv[i - 1] == "-m"):
            return argv[i + 1:]
    return None


def worker_nodes(host: str) -> set[str]:
    """Celery node names this container's workers use: ``<queue>@host`` for ``worker --queues <queue>``."""
    nodes = set()
    for argv in _cmdlines():
        rest = _pacsbridge_args(argv) or []
        if "worker" in rest and "--queues" in rest[:-1]:
            queue = rest[rest.index("--queues") + 1]
            if queue != "all":
                nodes.add(f"{queue}@{host}")
    return nodes


def check_worker() -> str | None:
    try:
        from pacsbridge.shared.core.celeryapp import make_celery
    except ImportError:
        from pacsbridge.worker.app import make_celery  # type: ignore[no-redef]
    from pacsbridge.shared.core.config import load_settings

    host = socket.gethostname()
    expected = worker_nodes(host)
    app = make_celery(load_settings())
    try:
        if expected:  # answers from exactly these, as soon as they came
            replies = app.control.ping(destination=sorted(expected), timeout=5.0, limit=len(expected))
        else:  # node names unknown: ask everyone, keep this container's
            replies = app.control.ping(timeout=3.0)
    finally:
        app.close()
    answered = {node for reply in replies or [] for node in reply if node.endswith(f"@{host}")}
    if expected and not expected <= answered:
        return f"no answer to a ping from {', '.join(sorted(expected - answered))}"
    if not answered:
        return f"no Celery worker of {host} answered a ping"
    return None


def check_api(url: str | None = None) -> str | None:
    url = url or f"http://127.0.0.1:{os.environ.get('PACSBRIDGE_API_PORT') or 8080}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310 (a local URL)
            return None if 200 <= resp.status < 300 else f"{url}: HTTP {resp.status}"
    except Exception as exc:  # refused, timeout, HTTP error
        return f"{url}: {exc}"


def detect() -> str | None:
    """The service whose process runs in this container, from the processes' command lines."""
    for argv in _cmdlines():
        if any(os.path.basename(a).startswith("gunicorn") for a in argv[:3]):
            return "api"
        rest = [a for a in (_pacsbridge_args(argv) or []) if not a.startswith("-")]
        if rest and rest[0] in ("listener", "worker", "api"):
            return rest[0]
    return None


def main(argv: list[str]) -> int:
    service = argv[0] if argv else detect()
    checks = {"listener": check_listener, "worker": check_worker, "api": check_api}
    if service not in checks:
        print(f"pacsbridge-healthcheck: no pacsbridge service found (got {service!r})", file=sys.stderr)
        return 1
    try:
        problem = checks[service](*argv[1:2])
    except Exception as exc:
        problem = f"{type(exc).__name__}: {exc}"
    if problem:
        print(f"unhealthy {service}: {problem}", file=sys.stderr)
        return 1
    print(f"healthy {service}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
