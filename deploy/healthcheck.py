#!/venv/bin/python
"""Health check of a pacsbridge container (installed as /usr/local/bin/pacsbridge-healthcheck).

    pacsbridge-healthcheck            find the service running in this container and check it
    pacsbridge-healthcheck listener   the DICOM port (PACSBRIDGE_LISTENER_PORT, 11112) is listening
    pacsbridge-healthcheck worker     the Celery worker of this container answers a ping over the broker
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


def check_worker() -> str | None:
    from pacsbridge.shared.config import load_settings
    from pacsbridge.worker.app import make_celery

    node = f"celery@{socket.gethostname()}"
    app = make_celery(load_settings())
    try:
        replies = app.control.ping(destination=[node], timeout=5.0)
    finally:
        app.close()
    return None if any(node in r for r in replies or []) else f"{node} did not answer a ping"


def check_api(url: str | None = None) -> str | None:
    url = url or f"http://127.0.0.1:{os.environ.get('PACSBRIDGE_API_PORT') or 8080}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310 (a local URL)
            return None if 200 <= resp.status < 300 else f"{url}: HTTP {resp.status}"
    except Exception as exc:  # refused, timeout, HTTP error
        return f"{url}: {exc}"


def detect() -> str | None:
    """The service whose process runs in this container, from the processes' command lines."""
    for proc in sorted(Path("/proc").glob("[0-9]*"), key=lambda p: int(p.name)):
        try:
            argv = [a.decode(errors="replace") for a in (proc / "cmdline").read_bytes().split(b"\0") if a]
        except OSError:
            continue
        names = [os.path.basename(a) for a in argv]
        if any(n.startswith("gunicorn") for n in names[:3]):
            return "api"
        for i, n in enumerate(names[:3]):
            if n == "pacsbridge" or n.endswith("/pacsbridge"):
                rest = [a for a in argv[i + 1:] if not a.startswith("-")]
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
