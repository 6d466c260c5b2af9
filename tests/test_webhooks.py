"""Webhooks (issue 14, item 3): only to destinations an admin allowed, checked at submit and again
at send time after resolving the name, no redirects, a short timeout, sent from a queue of their
own (never in a job slot), retried with backoff and signed. The receiver is a real local HTTP
server; the jobs run on a real worker process."""

from __future__ import annotations

import hashlib
import hmac
import http.server
import json
import threading
import time

import pytest

from .helpers import make_instance
from .test_api import Server, api_settings, assert_error, auth, snapshot  # noqa: F401 - a fixture

SECRET = "webhook-secret-0123456789abcdef"


class Receiver(http.server.ThreadingHTTPServer):
    """Records every POST; ``/redirect`` answers 302, ``/flaky`` 500 once, ``/slow`` sleeps."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self.flaky_failures = 1
        self.slow_seconds = 30.0
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def paths(self) -> list[str]:
        with self.lock:
            return [r["path"] for r in self.requests]

    def close(self) -> None:
        self.shutdown()
        self.server_close()


class _Handler(http.server.BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with self.server.lock:
            self.server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body,
                                         "at": time.time()})
            failing = self.path == "/flaky" and self.server.flaky_failures > 0
            if failing:
                self.server.flaky_failures -= 1
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/target")
        elif self.path == "/slow":
            time.sleep(self.server.slow_seconds)
            self.send_response(204)
        elif failing:
            self.send_response(500)
        else:
            self.send_response(204)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def verify(headers: dict[str, str], body: bytes, secret: str = SECRET, tolerance: float = 300) -> dict:
    """What a receiver does (the snippet in docs/api.md): check the signature and the timestamp."""
    fields = dict(part.split("=", 1) for part in headers["X-Pacsbridge-Signature"].split(","))
    timestamp = int(fields["t"])
    expected = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(expected, fields["v1"]), "signature does not verify"
    assert abs(time.time() - timestamp) < tolerance, "too old: a replay?"
    return json.loads(body)


# -- at submit ------------------------------------------------------------------------------------
def _app(api_settings, allow: str):  # noqa: F811
    from pacsbridge.api import create_app

    settings = api_settings.with_(webhook_allow=allow) if allow else api_settings
    return create_app({"SETTINGS": settings, "TESTING": True})


@pytest.mark.parametrize("allow, url, reason", [
    ("", "http://127.0.0.1:{port}/tools/shutdown", "PACSBRIDGE_WEBHOOK_ALLOW"),        # off by default
    ("platform.example", "http://127.0.0.1:{port}/tools/shutdown", "not allowed"),   # not listed
    ("platform.example", "http://2130706433/", "dotted"),                            # decimal 127.0.0.1
    ("127.0.0.0/8", "http://2130706433/", "dotted"),                                 # even when listed
    ("127.0.0.0/8", "http://0177.0.0.1/", "dotted"),                                 # octal
    ("127.0.0.0/8", "http://0x7f000001/", "dotted"),                                 # hex
    ("127.0.0.0/8", "http://127.1/", "dotted"),                                      # short form
    ("localhost", "http://localhost:{port}/hook", "loopback"),                       # a listed name, loopback
    ("10.0.0.0/8", "http://169.254.169.254/latest/meta-data", "not allowed"),        # cloud metadata
    ("127.0.0.1", "http://user:pw@127.0.0.1:{port}/hook", "user"),                   # credentials in the URL
    ("127.0.0.1", "ftp://127.0.0.1/hook", "http"),
])
def test_a_webhook_to_a_destination_not_allowed_is_400_at_submit(api_settings, receiver, allow, url,  # noqa: F811
                                                                 reason):
    app = _app(api_settings, allow)
    try:
        before = snapshot(app)
        body = {"kind": "import", "path": "batch", "webhook": url.format(port=receiver.server_address[1])}
        err = assert_error(app.test_client().post("/api/v1/jobs", json=body, headers=auth("user")), 400, "webhook")
        assert reason in err["message"], err
        assert snapshot(app) == before
    finally:
        app.extensions["pacsbridge"].close()
    assert receiver.paths() == []


@pytest.mark.parametrize("allow, url", [
    ("127.0.0.1", "http://127.0.0.1:{port}/hook"),
    ("127.0.0.0/8", "http://127.0.0.1:{port}/hook"),
    ("127.0.0.1", "http://[::ffff:127.0.0.1]:{port}/hook"),
    ("platform.example, 127.0.0.1", "https://platform.example/hook"),    # a listed name: checked again at send
    ("*.example", "https://hooks.platform.example/x"),
])
def test_a_webhook_to_an_allowed_destination_is_accepted(api_settings, receiver, allow, url):  # noqa: F811
    app = _app(api_settings, allow)
    try:
        body = {"kind": "import", "path": "batch", "webhook": url.format(port=receiver.server_address[1])}
        resp = app.test_client().post("/api/v1/jobs", json=body, headers=auth("user"))
        assert resp.status_code == 202, resp.get_json()
    finally:
        app.extensions["pacsbridge"].close()


def test_a_malformed_allow_list_stops_the_api(api_settings):  # noqa: F811
    from pacsbridge.shared.core.errors import ConfigError

    with pytest.raises(ConfigError, match="PACSBRIDGE_WEBHOOK_ALLOW"):
        _app(api_settings, "10.0.0.0/33")


# -- at send time -------------------------------------------------------------------------------
def test_send_checks_the_resolved_address_and_follows_no_redirect(receiver):
    from pacsbridge.shared.jobs import webhooks

    port = receiver.server_address[1]
    policy = webhooks.Policy.parse("localhost")  # a listed name that resolves to loopback (a rebinding)
    with pytest.raises(webhooks.WebhookRefused, match="loopback"):
        webhooks.deliver(f"http://localhost:{port}/hook", b"{}", policy, SECRET.encode(), timeout=2)
    allowed = webhooks.Policy.parse("127.0.0.1")
    with pytest.raises(webhooks.WebhookRefused, match="302"):  # permanent: never retried
        webhooks.deliver(f"{receiver.base}/redirect", b"{}", allowed, SECRET.encode(), timeout=2)
    assert receiver.paths() == ["/redirect"]  # /target never asked for
    t0 = time.monotonic()
    with pytest.raises(webhooks.WebhookFailed):  # transient: retried later
        webhooks.deliver(f"{receiver.base}/slow", b"{}", allowed, SECRET.encode(), timeout=1)
    assert time.monotonic() - t0 < 3
    status = webhooks.deliver(f"{receiver.base}/ok", b'{"a": 1}', allowed, SECRET.encode(), timeout=2)
    assert status == 204
    last = receiver.requests[-1]
    assert verify(last["headers"], last["body"]) == {"a": 1}
    assert last["headers"]["X-Pacsbridge-Event"] == "job.finished"
    with pytest.raises(AssertionError):
        verify(last["headers"], last["body"], secret="another-secret-0123456789")


def test_https_goes_to_the_checked_address_and_checks_the_certificate_against_the_name(tmp_path, monkeypatch):
    """A TLS receiver with a certificate for ``localhost``: sent when the name matches (SNI and the
    check use the URL's name, the connection the checked address), refused when it does not."""
    import ssl
    import subprocess

    from pacsbridge.shared.jobs import webhooks

    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # the test's CA, for ssl.create_default_context()
    r = Receiver()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    r.socket = context.wrap_socket(r.socket, server_side=True)
    try:
        port = r.server_address[1]
        policy = webhooks.Policy.parse("127.0.0.0/8, ::1")  # localhost by its addresses
        status = webhooks.deliver(f"https://localhost:{port}/tls", b'{"tls": true}', policy, SECRET.encode(),
                                  timeout=5)
        assert status == 204 and r.requests[-1]["headers"]["Host"] == f"localhost:{port}"
        assert verify(r.requests[-1]["headers"], r.requests[-1]["body"]) == {"tls": True}
        with pytest.raises(webhooks.WebhookFailed, match="certificate|CERTIFICATE"):
            webhooks.deliver(f"https://127.0.0.1:{port}/tls", b"{}", policy, SECRET.encode(), timeout=5)
        assert len(r.requests) == 1
    finally:
        r.close()


# -- a real worker --------------------------------------------------------------------------------
def _wait(s: Server, path: str, timeout: float = 90) -> dict:
    deadline = time.monotonic() + timeout
    job = s.call("GET", path, role="admin")[1]
    while time.monotonic() < deadline and job["state"] in ("queued", "running"):
        time.sleep(0.2)
        job = s.call("GET", path, role="admin")[1]
    return job


def test_webhooks_from_a_real_worker(tmp_path, receiver):
    """Signed, retried after a 500, a redirect not followed, and a slow receiver holds no job slot:
    the next job (one job slot only) finishes while the slow webhook is still waiting."""
    s = Server(tmp_path, PACSBRIDGE_WEBHOOK_ALLOW="127.0.0.1", PACSBRIDGE_WEBHOOK_SECRET=SECRET,
               PACSBRIDGE_WEBHOOK_TIMEOUT="3")
    try:
        for name in ("a", "b", "c", "d"):
            make_instance(tmp_path / "import" / name / "one.dcm", PatientID=f"HOOK{name}")
        s.worker("--job-concurrency", "1")
        submitted = {}
        for name, path in (("a", "/flaky"), ("b", "/redirect")):
            status, sub, _ = s.call("POST", "/api/v1/jobs", {"kind": "import", "path": name,
                                                             "webhook": receiver.base + path}, role="user")
            assert status == 202, sub
            submitted[name] = sub
        for name in ("a", "b"):
            assert _wait(s, submitted[name]["path"])["state"] == "succeeded"
        # a slow receiver: job c's webhook hangs, job d (no webhook) must not wait for it
        status, sub_c, _ = s.call("POST", "/api/v1/jobs", {"kind": "import", "path": "c",
                                                           "webhook": receiver.base + "/slow"}, role="user")
        assert _wait(s, sub_c["path"])["state"] == "succeeded"
        deadline = time.monotonic() + 30
        while "/slow" not in receiver.paths() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "/slow" in receiver.paths(), (tmp_path / "worker.log").read_text()[-3000:]
        t0 = time.monotonic()
        status, sub_d, _ = s.call("POST", "/api/v1/jobs", {"kind": "import", "path": "d"}, role="user")
        assert _wait(s, sub_d["path"])["state"] == "succeeded"
        assert time.monotonic() - t0 < 6, time.monotonic() - t0  # the old inline webhook held the slot 10 s
        # the flaky receiver: a 500, then a retry that got through, both signed
        deadline = time.monotonic() + 30
        while receiver.paths().count("/flaky") < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        flaky = [r for r in receiver.requests if r["path"] == "/flaky"]
        assert len(flaky) == 2, (receiver.paths(), (tmp_path / "worker.log").read_text()[-3000:])
        assert flaky[1]["at"] - flaky[0]["at"] >= 0.5  # backed off
        for r in flaky:
            job = verify(r["headers"], r["body"])
            assert job["id"] == submitted["a"]["id"] and job["state"] == "succeeded"
        # the redirect: asked once, never followed, never retried
        time.sleep(2)
        assert receiver.paths().count("/redirect") == 1 and "/target" not in receiver.paths()
        # what became of each webhook: for the owner (and admins), not for a read token
        status_of = {n: s.call("GET", submitted[n]["path"], role="user")[1]["webhook_status"] for n in ("a", "b")}
        assert status_of["a"] == "sent: answered 204", status_of
        assert status_of["b"].startswith("refused: answered 302"), status_of
        assert s.call("GET", submitted["b"]["path"], role="read")[1]["webhook_status"] == ""
    finally:
        s.close()
