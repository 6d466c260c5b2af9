"""A node's DICOMweb secret stored sealed (PUT /nodes/<name>/secret, PACSBRIDGE_SECRET_KEY), and TLS to a
DICOMweb node (web_verify, web_ca_bundle), against Orthanc's DICOMweb behind a server of the tests' own
(tests/webserver.py) that checks the Authorization header, or serves HTTPS with a certificate made here.

Both HTTP stacks are used by each retrieve of a DICOMweb-only node: QIDO-RS through
:func:`~pacsbridge.shared.nodes.dicomweb.web_session` and WADO-RS through the
:class:`~pacsbridge.shared.nodes.webhttp.WebClient`; each is also checked on its own.
"""

from __future__ import annotations

import base64
import logging
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select

from pacsbridge.api import create_app
from pacsbridge.shared.core.config import Settings
from pacsbridge.shared.core.errors import ConfigError, WebError
from pacsbridge.shared.core.schema import nodes_table
from pacsbridge.shared.dicom.node import Node
from pacsbridge.shared.dicom.query import Query
from pacsbridge.shared.index.storage import OWN_FOLDERS
from pacsbridge.shared.nodes.credentials import node_secret, seal, unseal
from pacsbridge.shared.nodes.dicomweb import QidoSearcher
from pacsbridge.shared.nodes.wado import web_client_for
from pacsbridge.worker import runner

from .helpers import make_instance
from .orthanc import Orthanc
from .test_api import api_settings, app, assert_error, auth, client  # noqa: F401  (fixtures)
from .webserver import Handler, WebServer

KEY = "node-secrets-test-key-" + "0123456789abcdef" * 2
SECRET = "s3cr3t-Pa55w0rd-that-must-never-show-0123"
PATIENT = "SEALED1"


class Archive:
    def __init__(self, pacs: Orthanc, study: str, sops: set[str]) -> None:
        self.pacs, self.study, self.sops = pacs, study, sops


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Archive]:
    """One Orthanc with DICOMweb holding one study of two series (3 instances)."""
    work = tmp_path_factory.mktemp("sealed")
    pacs = Orthanc(work / "orthanc", dicomweb=True).start()
    study, files = generate_uid(), []
    for s, count in enumerate((2, 1)):
        series = generate_uid()
        for i in range(count):
            files.append(work / "files" / f"{s}_{i}.dcm")
            make_instance(files[-1], rows=8, PatientID=PATIENT, StudyInstanceUID=study, SeriesInstanceUID=series,
                          InstanceNumber=i + 1)
    pacs.upload(files)
    try:
        yield Archive(pacs, study, pacs.sop_uids())
    finally:
        pacs.stop()


def forward(pacs: Orthanc, expected: str | None = None) -> Any:
    """A route passing every request on to Orthanc; with ``expected``, only those whose Authorization header
    is exactly that (others: 401)."""
    def route(h: Handler) -> None:
        if expected is not None and h.headers.get("Authorization") != expected:
            h.send_body(401, b"unauthorized", "text/plain", {"WWW-Authenticate": "Basic"})
            return
        keep = {k: v for k, v in h.headers.items() if k.lower() in ("accept", "content-type")}
        req = urllib.request.Request(pacs.url + h.path, data=h.body or None, method=h.command, headers=keep)
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                h.send_body(resp.status, resp.read(), resp.headers.get("Content-Type", "text/plain"))
        except urllib.error.HTTPError as exc:
            h.send_body(exc.code, exc.read(), exc.headers.get("Content-Type", "text/plain"))
    return route


def stored_sops(settings: Settings) -> set[str]:
    import pydicom

    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
            for p in settings.storage.rglob("*.dcm") if not set(p.parts) & set(OWN_FOLDERS)}


def retrieve(app: Any, node: str) -> Any:
    """A retrieve job of the archive's patient from ``node``, run in this process with the API's context."""
    st = app.extensions["pacsbridge"]
    job, _ = st.jobs.submit("retrieve", {"query": {"PatientID": PATIENT}}, node=node)
    return runner.run_job(job.id, st.ctx, st.jobs)


@pytest.fixture
def keyed(api_settings: Settings) -> Iterator[Any]:  # noqa: F811
    """The API (SQLite, then PostgreSQL) of a deployment with PACSBRIDGE_SECRET_KEY."""
    application = create_app({"SETTINGS": api_settings.with_(secret_key=KEY), "TESTING": True})
    yield application
    application.extensions["pacsbridge"].close()


def web_only(name: str, url: str, **fields: Any) -> dict[str, Any]:
    return {"name": name, "ae_title": "", "host": "", "port": 0, "web_url": url, **fields}


# -- sealed secrets -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["basic", "bearer"])
def test_a_stored_secret_authenticates_query_and_retrieve_and_is_never_shown(keyed, archive, kind):
    client = keyed.test_client()
    expected = ("Basic " + base64.b64encode(f"reader:{SECRET}".encode()).decode() if kind == "basic"
                else f"Bearer {SECRET}")
    with WebServer() as srv:
        srv.route("*", forward(archive.pacs, expected))
        node = web_only("web", srv.url + "/dicom-web", web_auth=kind, web_user="reader" if kind == "basic" else "")
        resp = client.post("/api/v1/nodes", json=node, headers=auth("admin"))  # first the node (no secret yet)
        assert resp.status_code == 201 and resp.get_json()["web_secret_stored"] is False, resp.get_json()
        # without a secret a request says how to give it one
        no = assert_error(client.post("/api/v1/nodes/web/query", json={"PatientID": PATIENT},
                                      headers=auth("user")), 502)
        assert "no secret" in no["message"] and "/api/v1/nodes/web/secret" in no["message"]
        assert not srv.requests

        resp = client.put("/api/v1/nodes/web/secret", json={"secret": SECRET}, headers=auth("admin"))
        assert resp.status_code == 204 and resp.get_data() == b""
        for path in ("/api/v1/nodes", "/api/v1/nodes/web"):
            got = client.get(path, headers=auth("read"))
            assert got.status_code == 200 and SECRET not in got.get_data(as_text=True)
        body = client.get("/api/v1/nodes/web", headers=auth("read")).get_json()
        assert body["web_secret_stored"] is True and body["web_secret"] == ""
        assert "web_secret_sealed" not in body
        # a change of another field keeps it
        patched = client.patch("/api/v1/nodes/web", json={"description": "sealed"}, headers=auth("admin"))
        assert patched.get_json()["web_secret_stored"] is True and SECRET not in patched.get_data(as_text=True)

        # in the database: only the ciphertext, which this key opens
        st = keyed.extensions["pacsbridge"]
        with st.jobs.engine.connect() as conn:
            row = conn.execute(select(nodes_table).where(nodes_table.c.name == "web")).one()._mapping
        assert SECRET not in str(dict(row)) and base64.b64encode(SECRET.encode()).decode()[:12] not in str(dict(row))
        assert row["web_secret_sealed"].startswith("gAAAAA")  # a Fernet token
        assert unseal(row["web_secret_sealed"], KEY, "web") == SECRET

        found = client.post("/api/v1/nodes/web/query", json={"PatientID": PATIENT}, headers=auth("user"))
        assert found.status_code == 200 and found.get_json()["count"] == 1, found.get_json()
        done = retrieve(keyed, "web")  # QIDO-RS (requests session), then WADO-RS (WebClient)
        assert done is not None and done.state == "succeeded", (done.error, done.result)
        assert stored_sops(st.settings) == archive.sops
        seen = {r.headers.get("authorization") for r in srv.requests}
        assert seen == {expected}, seen  # every request, QIDO and WADO, carried it
        assert any("/series/" in r.path for r in srv.requests)  # WADO-RS was asked too

        # forgotten: the node is back to "no secret"; a second DELETE is a 204 too (idempotent)
        assert client.delete("/api/v1/nodes/web/secret", headers=auth("admin")).status_code == 204
        assert client.get("/api/v1/nodes/web", headers=auth("read")).get_json()["web_secret_stored"] is False
        assert client.delete("/api/v1/nodes/web/secret", headers=auth("admin")).status_code == 204


def test_a_stored_secret_wins_over_a_name_and_a_changed_key_is_a_clear_error(keyed, archive, monkeypatch):
    monkeypatch.setenv("PB_TEST_SEALED_NAMED", "the-named-one")
    client = keyed.test_client()
    st = keyed.extensions["pacsbridge"]
    node = web_only("web", archive.pacs.web_url, web_auth="bearer", web_secret="PB_TEST_SEALED_NAMED")
    assert client.post("/api/v1/nodes", json=node, headers=auth("admin")).status_code == 201
    assert node_secret(st.jobs.get_node("web"), st.settings) == "the-named-one"
    assert client.put("/api/v1/nodes/web/secret", json={"secret": SECRET}, headers=auth("admin")).status_code == 204
    stored = st.jobs.get_node("web")
    assert node_secret(stored, st.settings) == SECRET
    assert SECRET not in repr(stored) and stored.web_secret_sealed not in repr(stored)

    other = st.settings.with_(secret_key="another-key-" + "f" * 32)
    for attempt in (lambda: node_secret(stored, other), lambda: QidoSearcher(stored, settings=other)):
        with pytest.raises(ConfigError) as info:
            attempt()
        assert "'web'" in str(info.value) and "key changed" in str(info.value) and SECRET not in str(info.value)
    with pytest.raises(WebError, match="key changed") as info:
        web_client_for(stored, other)
    assert str(info.value).count("node 'web'") == 1
    with pytest.raises(ConfigError, match="PACSBRIDGE_SECRET_KEY is not set"):
        node_secret(stored, st.settings.with_(secret_key=""))


def test_secret_routes_refuse_what_they_should(keyed, client, caplog):  # noqa: F811
    caplog.set_level(logging.DEBUG)
    admin = keyed.test_client()
    assert admin.post("/api/v1/nodes", json=web_only("web", "http://127.0.0.1:9/dw"),
                      headers=auth("admin")).status_code == 201
    for role in ("user", "read"):
        assert_error(admin.put("/api/v1/nodes/web/secret", json={"secret": SECRET}, headers=auth(role)), 403)
        assert_error(admin.delete("/api/v1/nodes/web/secret", headers=auth(role)), 403)
    assert_error(admin.put("/api/v1/nodes/web/secret", json={"secret": SECRET}), 401)
    assert_error(admin.put("/api/v1/nodes/nope/secret", json={"secret": SECRET}, headers=auth("admin")), 404)
    assert_error(admin.delete("/api/v1/nodes/nope/secret", headers=auth("admin")), 404)
    assert admin.delete("/api/v1/nodes/web/secret", headers=auth("admin")).status_code == 204  # none stored
    for bad in ({"secret": SECRET + "\n"}, {"secret": "tab\there" + SECRET}, {"secret": "x" * 4097},
                {"secret": ""}, {"secret": 12345}, {}, {"secret": SECRET, "other": 1}, {"secret": "café" + SECRET}):
        err = assert_error(admin.put("/api/v1/nodes/web/secret", json=bad, headers=auth("admin")), 400)
        assert SECRET not in str(err)
    assert admin.put("/api/v1/nodes/web/secret", json={"secret": "x" * 4096},
                     headers=auth("admin")).status_code == 204
    assert keyed.extensions["pacsbridge"].jobs.get_node("web").web_secret_stored

    # the same database served without PACSBRIDGE_SECRET_KEY (conftest's API): 409 saying so
    err = assert_error(client.put("/api/v1/nodes/web/secret", json={"secret": SECRET}, headers=auth("admin")), 409)
    assert "PACSBRIDGE_SECRET_KEY is not set" in err["message"]
    assert SECRET not in caplog.text


def test_a_refused_secret_fails_the_request_without_showing_it_in_answers_or_logs(keyed, archive, caplog):
    caplog.set_level(logging.DEBUG)
    client = keyed.test_client()
    with WebServer() as srv:
        srv.route("*", forward(archive.pacs, "Bearer some-other-token"))
        assert client.post("/api/v1/nodes", json=web_only("web", srv.url + "/dicom-web", web_auth="bearer"),
                           headers=auth("admin")).status_code == 201
        assert client.put("/api/v1/nodes/web/secret", json={"secret": SECRET},
                          headers=auth("admin")).status_code == 204
        resp = client.post("/api/v1/nodes/web/query", json={"PatientID": PATIENT}, headers=auth("user"))
        err = assert_error(resp, 502)
        assert "401" in err["message"]
        done = retrieve(keyed, "web")
        assert done is not None and done.state == "failed" and "401" in (done.error or ""), done.error
        assert srv.requests and all(r.headers.get("authorization") == f"Bearer {SECRET}" for r in srv.requests)
    assert SECRET not in resp.get_data(as_text=True) and SECRET not in str(done.result) + (done.error or "")
    assert SECRET not in caplog.text
    assert not stored_sops(keyed.extensions["pacsbridge"].settings)


def test_seal_is_keyed_and_fresh():
    a, b = seal(SECRET, KEY), seal(SECRET, KEY)
    assert a != b and SECRET not in a  # a new IV each time: equal secrets do not look equal
    assert unseal(a, KEY, "n") == unseal(b, KEY, "n") == SECRET
    with pytest.raises(ConfigError, match="key changed"):
        unseal(a, KEY + "x", "n")
    with pytest.raises(ConfigError, match="not set"):
        seal(SECRET, "")


def test_the_key_setting_is_checked_and_read_from_a_file(tmp_path):
    with pytest.raises(Exception, match="at least 32 printable ASCII"):
        Settings(secret_key="short")
    (tmp_path / "key").write_text(KEY + "\n")
    assert Settings(secret_key_file=tmp_path / "key").secret_key == KEY
    assert KEY not in repr(Settings(secret_key=KEY))
    assert "PACSBRIDGE_SECRET_KEY" not in Settings(secret_key=KEY).environ()


# -- TLS ------------------------------------------------------------------------------------------------------
def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A test CA and a certificate for 127.0.0.1 it signed (the openssl command, no shell)."""
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=pacsbridge test CA", cwd=d)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "srv.key", "-out", "srv.csr",
             "-subj", "/CN=127.0.0.1", cwd=d)
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
                               "keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
                               "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n")
    _openssl("x509", "-req", "-in", "srv.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "srv.pem", "-days", "2", "-extfile", "ext.cnf", cwd=d)
    return {"ca": d / "ca.pem", "cert": d / "srv.pem", "key": d / "srv.key"}


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")  # web_verify false: urllib3 says so
def test_tls_verification_of_a_dicomweb_node_in_both_http_stacks(keyed, archive, pki, monkeypatch):
    """Verified by default (a certificate of a private CA is refused, by QIDO and WADO alike, with what to do;
    a job fails with it and stores nothing); the node's CA bundle makes it trusted; web_verify false trusts
    anything, even with a bundle (as WebClient always did: QIDO verified against the bundle then). The test
    CA is nowhere else, and REQUESTS_CA_BUNDLE (set on many machines, this one too) must not replace it."""
    import requests.certs

    monkeypatch.setenv("REQUESTS_CA_BUNDLE", requests.certs.where())  # the system's CAs, as on many machines
    client = keyed.test_client()
    st = keyed.extensions["pacsbridge"]
    with WebServer(tls=(str(pki["cert"]), str(pki["key"]))) as srv:
        srv.route("*", forward(archive.pacs))
        url = srv.url + "/dicom-web"
        assert url.startswith("https://")
        cases = {"strict": {}, "ca": {"web_ca_bundle": str(pki["ca"])}, "off": {"web_verify": False},
                 "off-with-ca": {"web_verify": False, "web_ca_bundle": str(pki["ca"])}}
        for name, fields in cases.items():
            assert client.post("/api/v1/nodes", json=web_only(name, url, **fields),
                               headers=auth("admin")).status_code == 201

        # verified against the system's CAs: refused by each stack, with the reason
        strict = st.jobs.get_node("strict")
        with pytest.raises(Exception, match="CERTIFICATE_VERIFY_FAILED"):
            QidoSearcher(strict, settings=st.settings).find(Query(PatientID=PATIENT))
        with web_client_for(strict, st.settings) as web, pytest.raises(WebError, match="certificate") as info:
            web.request("GET", f"{url}/studies/{archive.study}/metadata")
        assert "web_ca_bundle" in str(info.value) and "web_verify" in str(info.value)
        err = assert_error(client.post("/api/v1/nodes/strict/query", json={"PatientID": PATIENT},
                                       headers=auth("user")), 502)
        assert "CERTIFICATE_VERIFY_FAILED" in err["message"]
        served = len(srv.requests)
        done = retrieve(keyed, "strict")
        assert done is not None and done.state == "failed", done.state
        assert "CERTIFICATE_VERIFY_FAILED" in (done.error or ""), done.error
        assert len(srv.requests) == served and not stored_sops(st.settings)  # nothing was asked, nothing stored

        # the test CA as the node's bundle, or no verification: both stacks work
        for name in ("ca", "off", "off-with-ca"):
            node = st.jobs.get_node(name)
            assert len(QidoSearcher(node, settings=st.settings).find(Query(PatientID=PATIENT))) == 1
            with web_client_for(node, st.settings) as web:
                assert web.request("GET", f"{url}/studies/{archive.study}/metadata").status_code == 200
        done = retrieve(keyed, "ca")
        assert done is not None and done.state == "succeeded", (done.error, done.result)
        assert stored_sops(st.settings) == archive.sops


# -- the CLI --------------------------------------------------------------------------------------------------
def test_the_cli_stores_a_secret_from_stdin_and_forgets_it(tmp_path):
    import sqlite3

    from .test_api import PB, TOKENS, Server

    server = Server(tmp_path, PACSBRIDGE_SECRET_KEY=KEY)
    try:
        assert server.call("POST", "/api/v1/nodes", web_only("web", "http://127.0.0.1:9/dw", web_auth="bearer"))[0] \
            == 201
        env = {**server.env, "PACSBRIDGE_API_URL": server.url, "PACSBRIDGE_API_TOKEN": TOKENS["admin"]}

        def cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
            return subprocess.run(PB + ["nodes", *args], input=stdin, env=env, capture_output=True, text=True,
                                  timeout=60)

        done = cli("secret", "web", stdin=SECRET + "\n")  # `echo "$TOKEN" | pacsbridge nodes secret web`
        assert done.returncode == 0 and "secret stored" in done.stderr, done.stderr
        assert SECRET not in done.stdout + done.stderr
        assert server.call("GET", "/api/v1/nodes/web", role="read")[1]["web_secret_stored"] is True
        with sqlite3.connect(tmp_path / "idx.db") as db:
            (sealed,) = db.execute("select web_secret_sealed from pacsbridge_nodes where name='web'").fetchone()
        assert unseal(sealed, KEY, "web") == SECRET  # the line, without its newline

        bad = cli("secret", "web", stdin="two\tparts\n")
        assert bad.returncode != 0 and "printable ASCII" in bad.stderr, bad.stderr
        assert cli("secret", "web", "--delete").returncode == 0
        assert server.call("GET", "/api/v1/nodes/web", role="read")[1]["web_secret_stored"] is False
        assert cli("secret", "web", "--delete").returncode == 0  # again: nothing to forget, not an error
        gone = cli("secret", "nope", "--delete")
        assert gone.returncode != 0 and "no node called 'nope'" in gone.stderr, gone.stderr
        env["PACSBRIDGE_API_TOKEN"] = TOKENS["user"]
        refused = cli("secret", "web", stdin=SECRET + "\n")
        assert refused.returncode != 0 and SECRET not in refused.stderr
    finally:
        server.close()
    assert SECRET not in (tmp_path / "api.log").read_text()
