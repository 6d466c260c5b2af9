"""The API against hostile input and slow clients (issue 14, items 14 to 16): NUL and lone
surrogates in paths, query strings and bodies, what a read token may see, and gunicorn
held by clients that drip their request."""

from __future__ import annotations

import json
import socket
import time
import urllib.request

import pytest

from .test_api import (TOKENS, Server, api_settings, app, assert_error, auth, client,  # noqa: F401 - fixtures
                       snapshot)

NODE = {"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": 4242}


# -- item 15: NUL (and other control characters) in path and query parameters ------------------
@pytest.mark.parametrize("method, path, role", [
    ("get", "/api/v1/jobs/%00", "read"),
    ("get", "/api/v1/jobs/ab%00cd", "read"),
    ("post", "/api/v1/jobs/%00/cancel", "user"),
    ("post", "/api/v1/jobs/%00/retry", "user"),
    ("get", "/api/v1/nodes/a%00b", "read"),
    ("put", "/api/v1/nodes/a%00b", "admin"),
    ("patch", "/api/v1/nodes/a%00b", "admin"),
    ("delete", "/api/v1/nodes/a%00b", "admin"),
    ("post", "/api/v1/nodes/a%00b/echo", "user"),
    ("post", "/api/v1/nodes/a%00b/query", "user"),
    ("get", "/api/v1/studies/1.2%00", "read"),
    ("get", "/api/v1/series/1.2%00", "read"),
    ("get", "/api/v1/instances/1.2%00", "read"),
    ("get", "/api/v1/instances/1.2%00/file", "read"),
    ("get", "/api/v1/nodes/a%01b", "read"),
    ("get", "/api/v1/jobs/%ED%A0%80", "read"),          # a UTF-8-encoded lone surrogate
    ("get", "/api/v1/studies?PatientID=a%00b", "read"),
    ("get", "/api/v1/jobs?node=a%00b", "read"),
    ("get", "/api/v1/jobs?a%00b=1", "read"),
])
def test_nul_in_a_path_or_query_parameter_is_400(client, app, method, path, role):
    before = snapshot(app)
    kwargs = {"json": NODE} if method in ("put", "patch") else {}
    if path.endswith("/query"):
        kwargs = {"json": {"PatientID": "x"}}
    err = assert_error(getattr(client, method)(path, headers=auth(role), **kwargs), 400)
    assert "control character" in err["message"] or "NUL" in err["message"] or "UTF-8" in err["message"]
    assert snapshot(app) == before


def test_nul_in_a_path_over_a_real_socket_is_400(tmp_path):
    """gunicorn in front: the same 400 in the one shape, not a 500."""
    s = Server(tmp_path, gunicorn=True)
    try:
        for path in ("/api/v1/jobs/%00", "/api/v1/nodes/a%00b"):
            status, body, _ = s.call("GET", path, role="read")
            assert status == 400 and body["error"]["status"] == 400, (path, body)
    finally:
        s.close()


# -- item 16: what a read token sees; validation at submit; the listener's metrics address -------
OTHER_USER = "other-user-token-0123456789abcdef"


@pytest.fixture
def two_users_app(api_settings):  # noqa: F811 - the fixture imported above
    from pacsbridge.api import create_app

    settings = api_settings.with_(api_tokens=f"{api_settings.api_tokens},ulf:{OTHER_USER}:user")
    settings = settings.with_(webhook_allow="platform.example")
    application = create_app({"SETTINGS": settings, "TESTING": True})
    yield application
    application.extensions["pacsbridge"].close()


def test_only_the_owner_and_admins_see_a_jobs_webhook_and_worker(two_users_app):
    c = two_users_app.test_client()
    hook = "https://platform.example/hook?key=s3cret"
    resp = c.post("/api/v1/jobs", json={"kind": "import", "path": "batch", "webhook": hook}, headers=auth("user"))
    assert resp.status_code == 202, resp.get_json()
    job_id = resp.get_json()["id"]
    jobs = two_users_app.extensions["pacsbridge"].jobs
    assert jobs.claim(job_id, "worker-host-7:4242") is not None
    jobs.set_webhook_status(job_id, "refused: s3cret host resolves to 10.1.2.3")
    other = {"Authorization": f"Bearer {OTHER_USER}"}
    for headers in (auth("read"), other):
        one = c.get(f"/api/v1/jobs/{job_id}", headers=headers).get_json()
        listed = c.get("/api/v1/jobs", headers=headers).get_json()["items"][0]
        for seen in (one, listed):
            text = json.dumps(seen)
            assert "s3cret" not in text and "worker-host-7" not in text and "4242" not in text, seen
            assert seen["id"] == job_id and seen["state"] == "running"
    for headers in (auth("user"), auth("admin")):  # the owner, and an admin
        one = c.get(f"/api/v1/jobs/{job_id}", headers=headers).get_json()
        listed = c.get("/api/v1/jobs", headers=headers).get_json()["items"][0]
        assert one["webhook"] == hook and one["worker"] == "worker-host-7:4242" and "10.1.2.3" in one["webhook_status"]
        assert listed["webhook"] == hook and listed["worker"] == "worker-host-7:4242"
    # what cancel answers follows the same rule
    cancelled = c.post(f"/api/v1/jobs/{job_id}/cancel", headers=other).get_json()
    assert "s3cret" not in json.dumps(cancelled) and "worker-host-7" not in json.dumps(cancelled)


@pytest.mark.parametrize("body, field", [
    ('{"kind": "import", "path": "a\\udc80b"}', "path"),                        # a lone low surrogate
    ('{"kind": "import", "path": "\\ud800"}', "path"),                          # a lone high surrogate
    ('{"kind": "push", "node": "x\\udfff", "selection": {"PatientID": "P"}}', "node"),
    ('{"kind": "import", "path": "a", "\\ud800": 1}', "body"),                 # in a key
    ('{"kind": "repack", "selection": {"PatientID": "P"}, "dest": "c", "template": "{PatientID|evil}"}',
     "template"),
    ('{"kind": "repack", "selection": {"PatientID": "P"}, "dest": "c", "template": "../{PatientID}"}', "template"),
    ('{"kind": "repack", "selection": {"PatientID": "P"}, "dest": "c", "template": "{Patient-ID}"}', "template"),
])
def test_bad_import_path_or_template_is_refused_at_submit(client, app, body, field):
    before = snapshot(app)
    resp = client.post("/api/v1/jobs", data=body, content_type="application/json", headers=auth("user"))
    err = assert_error(resp, 400, field)
    assert err["message"]
    assert snapshot(app) == before  # no job row


def test_an_emoji_is_still_accepted(client):
    """A surrogate *pair* in JSON is one character: not refused."""
    resp = client.post("/api/v1/jobs", data='{"kind": "import", "path": "caf\\u00e9-\\ud83d\\ude00"}',
                       content_type="application/json", headers=auth("user"))
    assert resp.status_code == 202, resp.get_json()


def _listening_addresses(port: int) -> set[str]:
    """Local addresses of sockets listening on ``port`` (from /proc/net/tcp and tcp6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            addr, _, hexport = local.rpartition(":")
            if state == "0A" and int(hexport, 16) == port:  # 0A: LISTEN
                if len(addr) == 8:
                    found.add(socket.inet_ntoa(bytes.fromhex(addr)[::-1]))
                else:
                    found.add("v6:" + addr)
    return found


@pytest.mark.parametrize("metrics_host, expected", [(None, "127.0.0.1"), ("0.0.0.0", "0.0.0.0")])
def test_listener_metrics_listen_where_the_listener_does(tmp_path, metrics_host, expected):
    import os
    import subprocess
    import sys

    from .test_listener import free_port, wait_port

    port, metrics = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PACSBRIDGE_", "PROMETHEUS_"))}
    env.update({"PACSBRIDGE_STORAGE": str(tmp_path / "data"), "PACSBRIDGE_DATABASE_URL": f"sqlite:///{tmp_path}/i.db",
                "PACSBRIDGE_BROKER_URL": f"sqla+sqlite:///{tmp_path}/b.db", "PACSBRIDGE_LISTENER_HOST": "127.0.0.1",
                "PACSBRIDGE_LISTENER_PORT": str(port), "PACSBRIDGE_LISTENER_METRICS_PORT": str(metrics),
                "PACSBRIDGE_ALLOWED_PEERS": "SENDER"})
    if metrics_host is not None:
        env["PACSBRIDGE_LISTENER_METRICS_HOST"] = metrics_host
    log = open(tmp_path / "listener.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "pacsbridge.cli", "listener", "--processes", "1"], env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_port(port, timeout=60)
        wait_port(metrics, timeout=20)
        assert _listening_addresses(metrics) == {expected}, (tmp_path / "listener.log").read_text()[-2000:]
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10) as resp:
            assert resp.status == 200
    finally:
        import signal

        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_a_database_made_before_job_owners_gets_the_column(db_url):
    """An index made by an older release (no ``owner`` column) keeps working: create() adds it."""
    from sqlalchemy import MetaData, Table, insert

    from pacsbridge.shared.core.db import make_engine
    from pacsbridge.shared.jobs.store import JobStore
    from pacsbridge.shared.core.schema import jobs_table

    engine = make_engine(db_url)
    try:
        old = MetaData()
        Table(jobs_table.name, old, *(c.copy() for c in jobs_table.columns
                                       if c.name not in ("owner", "webhook_status")))
        old.create_all(engine)
        with engine.begin() as conn:
            conn.execute(insert(old.tables[jobs_table.name]).values(
                id="a" * 32, kind="import", node=None, params='{"path": "x"}', dedupe_key="k", state="queued",
                attempts=0, error="", result="{}", webhook="", worker="", cancel_requested=False, created_at=1.0))
        jobs = JobStore(engine)
        jobs.create()
        jobs.create()  # idempotent
        assert jobs.get("a" * 32).owner == "" and jobs.get("a" * 32).webhook_status == ""
        job, _ = jobs.submit("import", {"path": "y"}, owner="uma")
        assert jobs.get(job.id).owner == "uma"
    finally:
        engine.dispose()


def test_bytes_that_are_not_utf8_in_a_path_over_a_real_socket_are_400(tmp_path):
    s = Server(tmp_path, gunicorn=True)
    try:
        for path in ("/api/v1/jobs/%ED%A0%80", "/api/v1/nodes/%FF", "/api/v1/jobs?state=%FF"):
            status, body, _ = s.call("GET", path, role="read")
            assert status == 400 and "UTF-8" in body["error"]["message"], (path, body)
    finally:
        s.close()


# -- item 14: slow clients must not starve the API -----------------------------------------------
def _compose_api_command(port: int) -> list[str]:
    """The api service's command in docker-compose.yml, made to run here on ``port``."""
    import re
    import sys
    from pathlib import Path

    import yaml

    compose = yaml.safe_load((Path(__file__).parents[1] / "docker-compose.yml").read_text())
    cmd = []
    for arg in compose["services"]["api"]["command"]:
        arg = re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", arg)  # compose's defaults
        arg = arg.replace("0.0.0.0:8080", f"127.0.0.1:{port}")
        cmd.append(arg)
    if cmd[0] == "pacsbridge":
        return [sys.executable, "-m", "pacsbridge.cli", *cmd[1:]]
    return [sys.executable, "-m", *cmd]


def test_dripping_clients_do_not_starve_the_api(tmp_path):
    """64 connections that send their request a byte every half second (the compose command,
    started here): /healthz and an authenticated request still answer at once."""
    import os
    import threading

    from .test_listener import free_port, wait_port

    port = free_port()
    s = Server.__new__(Server)  # the same environment as Server, with compose's command
    s.port, s.tmp, s.procs = port, tmp_path, []
    s.env = {k: v for k, v in os.environ.items() if not k.startswith("PACSBRIDGE_")}
    s.env.update({"PACSBRIDGE_DATABASE_URL": f"sqlite:///{tmp_path / 'idx.db'}",
                  "PACSBRIDGE_STORAGE": str(tmp_path / "data"),
                  "PACSBRIDGE_BROKER_URL": f"sqla+sqlite:///{tmp_path / 'broker.db'}",
                  "PACSBRIDGE_API_TOKENS": f"rea:{TOKENS['read']}:read", "PACSBRIDGE_API_HOST": "127.0.0.1",
                  "PACSBRIDGE_API_PORT": str(port), "PACSBRIDGE_LISTENER_PORT": str(free_port())})
    s._start(_compose_api_command(port), "api")
    stop = threading.Event()
    socks: list[socket.socket] = []

    def drip(sock: socket.socket) -> None:
        line = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 1000
        for i in range(len(line)):
            if stop.wait(0.5):
                return
            try:
                sock.send(line[i:i + 1])
            except OSError:
                return

    try:
        wait_port(port, timeout=30)
        assert s.call("GET", "/healthz", role=None)[0] == 200
        threads = []
        for _ in range(64):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            socks.append(sock)
            threads.append(threading.Thread(target=drip, args=(sock,), daemon=True))
        for t in threads:
            t.start()
        time.sleep(2)  # every dripper has sent its first bytes and is being read
        for path, role in (("/healthz", None), ("/api/v1/jobs", "read"), ("/healthz", None)):
            t0 = time.monotonic()
            req = urllib.request.Request(s.url + path, headers=auth(role) if role else {})
            with urllib.request.urlopen(req, timeout=15) as resp:
                assert resp.status == 200
            assert time.monotonic() - t0 < 2.0, (path, time.monotonic() - t0)
    finally:
        stop.set()
        for sock in socks:
            sock.close()
        s.close()


def test_raw_bytes_that_are_not_utf8_in_a_query_string_are_400(tmp_path):
    """Bytes sent as they are (not %-escaped), over a real socket: a 400, never a 500."""
    from .test_listener import wait_port

    s = Server(tmp_path)
    try:
        wait_port(s.port)
        for target in (b"/api/v1/studies?PatientName=\xff\xfe", b"/api/v1/jobs/\xff"):
            with socket.create_connection(("127.0.0.1", s.port), timeout=10) as sock:
                sock.sendall(b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                             b"Authorization: Bearer " + TOKENS["read"].encode() + b"\r\n\r\n")
                answer = b""
                while chunk := sock.recv(65536):
                    answer += chunk
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.split(b" ")[1] == b"400", answer  # waitress refuses such a request line itself
            if b"application/json" in head:
                assert json.loads(body)["error"]["status"] == 400, answer
    finally:
        s.close()


def test_blank_optional_settings_are_unset():
    """compose passes optional settings as "${NAME:- }" (podman-compose 1.0.3 left "${NAME:-}" as it was):
    a blank webhook secret and its _FILE twin are both unset, not "both set"; a blank allow-list is empty."""
    from pacsbridge.shared.core.config import load_settings

    s = load_settings({"PACSBRIDGE_WEBHOOK_SECRET": " ", "PACSBRIDGE_WEBHOOK_SECRET_FILE": " ",
                       "PACSBRIDGE_WEBHOOK_ALLOW": " ", "PACSBRIDGE_LISTENER_METRICS_HOST": " "})
    assert s.webhook_secret == "" and not s.webhook_allow.strip() and s.listener_metrics_host == ""
