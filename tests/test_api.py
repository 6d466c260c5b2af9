"""The HTTP API: Flask's test client on SQLite and the real PostgreSQL, schemathesis against the
served OpenAPI document, a real server process driven over HTTP, and a job run by a real worker."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, update

from pacsbridge.api import create_app
from pacsbridge.shared.core.config import Settings
from pacsbridge.shared.index.context import open_context
from pacsbridge.shared.index.importer import Importer
from pacsbridge.shared.jobs.store import SeriesProgress
from pacsbridge.shared.core.schema import jobs_table, nodes_table, series_table

from .helpers import TEST_FILES, make_instance
from .test_listener import free_port, wait_port

TOKENS = {"admin": "admin-token-0123456789abcdef", "user": "user-token-0123456789abcdef",
          "read": "read-token-0123456789abcdef", "old": "old-token-0123456789abcdef"}
TOKEN_SPEC = (f"ada:{TOKENS['admin']}:admin, uma:{TOKENS['user']}, rea:{TOKENS['read']}:read,"
              f"old:{TOKENS['old']}:admin:2020-01-01")
PB = [sys.executable, "-m", "pacsbridge.cli"]


def auth(role: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[role]}"}


@pytest.fixture
def api_settings(settings: Settings, tmp_path: Path) -> Settings:
    (tmp_path / "import").mkdir()
    return settings.with_(api_tokens=TOKEN_SPEC, broker_url=f"sqla+sqlite:///{tmp_path / 'broker.db'}",
                          import_root=tmp_path / "import", export_root=tmp_path / "export",
                          listener_port=free_port(), webhook_allow="platform.example")


@pytest.fixture
def app(api_settings: Settings):
    application = create_app({"SETTINGS": api_settings, "TESTING": True})
    yield application
    application.extensions["pacsbridge"].close()


@pytest.fixture
def client(app):
    return app.test_client()


def snapshot(app) -> tuple[Any, ...]:
    """Rows of every table the API writes, and every file in storage."""
    st = app.extensions["pacsbridge"]
    with st.jobs.engine.connect() as conn:
        counts = tuple(conn.execute(select(func.count()).select_from(t)).scalar_one()
                       for t in (nodes_table, jobs_table, series_table, st.ctx.index.tables["Image"]))
        nodes = sorted(tuple(r) for r in conn.execute(select(nodes_table)))
        jobs = sorted(tuple(r) for r in conn.execute(select(jobs_table)))
    files = sorted(str(p) for p in st.settings.storage.rglob("*") if p.is_file())
    return counts, nodes, jobs, files


def assert_error(resp, status: int, field: str | None = None) -> dict[str, Any]:
    assert resp.status_code == status, resp.get_data(as_text=True)
    assert resp.mimetype == "application/json"
    body = resp.get_json()
    assert set(body) == {"error"}
    err = body["error"]
    assert err["status"] == status and err["message"] and err["path"].startswith("/")
    if field is not None:
        assert err.get("field") == field, err
    return err


NODE = {"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": 4242}


# -- auth -------------------------------------------------------------------------------
def test_tokens_and_roles(client):
    resp = client.get("/api/v1/nodes")
    assert_error(resp, 401)
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert_error(client.get("/api/v1/nodes", headers={"Authorization": "Bearer wrong-token-0123456789"}), 401)
    assert_error(client.get("/api/v1/nodes", headers={"Authorization": f"Basic {TOKENS['read']}"}), 401)
    expired = assert_error(client.get("/api/v1/nodes", headers=auth("old")), 401)
    assert "expired" in expired["message"]
    assert client.get("/api/v1/nodes", headers=auth("read")).status_code == 200
    # read may not submit jobs, user may not change nodes; admin may
    assert_error(client.post("/api/v1/jobs", json={"kind": "import", "path": "x"}, headers=auth("read")), 403)
    assert_error(client.post("/api/v1/nodes", json=NODE, headers=auth("user")), 403)
    assert_error(client.delete("/api/v1/nodes/pacs", headers=auth("user")), 403)
    assert client.post("/api/v1/nodes", json=NODE, headers=auth("admin")).status_code == 201
    # public routes
    for path in ("/healthz", "/metrics", "/api/v1/openapi.json"):
        assert client.get(path).status_code == 200, path


def test_no_tokens_configured_means_closed(api_settings, caplog):
    with caplog.at_level(logging.WARNING, logger="pacsbridge.api"):
        app = create_app({"SETTINGS": api_settings.with_(api_tokens="")})
    assert "PACSBRIDGE_API_TOKENS is empty" in caplog.text
    c = app.test_client()
    for method, path in (("get", "/api/v1/nodes"), ("get", "/api/v1/jobs"), ("post", "/api/v1/jobs"),
                         ("get", "/api/v1/studies")):
        assert_error(getattr(c, method)(path, headers=auth("admin")), 401)
    assert c.get("/healthz").status_code == 200
    app.extensions["pacsbridge"].close()


def test_malformed_token_setting_is_refused(api_settings):
    from pacsbridge.shared.core.errors import ConfigError

    for bad in ("justaname", "a:short", f"a:{TOKENS['read']}:root", f"a:{TOKENS['read']}:read:tomorrow",
                f"a:{TOKENS['read']},a:{TOKENS['user']}"):
        with pytest.raises(ConfigError) as info:
            create_app({"SETTINGS": api_settings.with_(api_tokens=bad)})
        assert TOKENS["read"] not in str(info.value)


# -- nodes ------------------------------------------------------------------------------
def test_nodes_crud(client):
    resp = client.post("/api/v1/nodes", json=NODE, headers=auth("admin"))
    assert resp.status_code == 201 and resp.headers["Location"] == "/api/v1/nodes/pacs"
    assert resp.get_json()["retrieve"] == "move"
    assert_error(client.post("/api/v1/nodes", json=NODE, headers=auth("admin")), 409)
    listed = client.get("/api/v1/nodes", headers=auth("read")).get_json()
    assert listed["total"] == 1 and listed["items"][0]["ae_title"] == "ORTHANC"
    resp = client.patch("/api/v1/nodes/pacs", json={"max_associations": 4, "retrieve": "get"}, headers=auth("admin"))
    assert resp.status_code == 200 and resp.get_json()["max_associations"] == 4
    assert client.get("/api/v1/nodes/pacs", headers=auth("read")).get_json()["retrieve"] == "get"
    resp = client.put("/api/v1/nodes/pacs", json={"ae_title": "PACS2", "host": "10.0.0.2", "port": 104},
                      headers=auth("admin"))
    node = resp.get_json()
    assert node["ae_title"] == "PACS2" and node["max_associations"] == 2 and node["retrieve"] == "move"
    assert_error(client.put("/api/v1/nodes/pacs", json={**NODE, "name": "other"}, headers=auth("admin")), 400, "name")
    assert_error(client.patch("/api/v1/nodes/nope", json={"port": 1}, headers=auth("admin")), 404)
    # a node used by an active job cannot go
    job = client.post("/api/v1/jobs", json={"kind": "push", "node": "pacs", "selection": {"PatientID": "P1"}},
                      headers=auth("user")).get_json()
    assert_error(client.delete("/api/v1/nodes/pacs", headers=auth("admin")), 409)
    client.post(f"/api/v1/jobs/{job['id']}/cancel", headers=auth("user"))
    assert client.delete("/api/v1/nodes/pacs", headers=auth("admin")).status_code == 204
    assert_error(client.get("/api/v1/nodes/pacs", headers=auth("read")), 404)


# -- the contract (issue 15 item 3) -------------------------------------------------------
def test_the_document_is_generated_from_every_route_and_the_models(client, app, api_settings):
    from pacsbridge.api.contract import document
    from pacsbridge.shared.dicom.node import AET_PATTERN
    from pacsbridge.shared.jobs.spec import REQUESTS

    doc = client.get("/api/v1/openapi.json").get_json()
    assert doc["openapi"] == "3.1.0"
    documented = {(path, method) for path, item in doc["paths"].items() for method in item}
    routes = {(rule.rule.replace("<", "{").replace(">", "}"), method.lower()) for rule in app.url_map.iter_rules()
              if rule.endpoint != "static" for method in rule.methods - {"HEAD", "OPTIONS"}}
    assert documented == routes and len(routes) == 49
    schemas = doc["components"]["schemas"]
    # an AE title, or '' for a DICOMweb-only node (issue 18)
    assert [s.get("pattern", s.get("const")) for s in schemas["NodeModel"]["properties"]["ae_title"]["anyOf"]] \
        == [AET_PATTERN, ""]
    assert {ref["$ref"].rsplit("/", 1)[1] for ref in
            doc["paths"]["/api/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]["oneOf"]} \
        == {m.__name__ for m in REQUESTS.values()}
    assert schemas["QueryModel"]["additionalProperties"] is False
    # a route nobody described fails the document, instead of missing from it
    other = create_app({"SETTINGS": api_settings, "TESTING": True})
    other.add_url_rule("/api/v1/undescribed", "undescribed", lambda: "")
    with other.app_context(), pytest.raises(RuntimeError, match="undescribed"):
        document(other)
    other.extensions["pacsbridge"].close()


# -- bad input: a clear 4xx in the one shape, nothing changed -----------------------------
BAD = [
    ("post", "/api/v1/nodes", {"data": "{not json", "content_type": "application/json"}, 400, "body"),
    ("post", "/api/v1/nodes", {"data": "[1, 2]", "content_type": "application/json"}, 400, "body"),
    ("post", "/api/v1/nodes", {"data": "name=x", "content_type": "application/x-www-form-urlencoded"}, 415, None),
    ("post", "/api/v1/nodes", {"json": {**NODE, "colour": "red"}}, 400, "colour"),
    ("post", "/api/v1/nodes", {"json": {**NODE, "port": "4242"}}, 400, "port"),
    ("post", "/api/v1/nodes", {"json": {**NODE, "port": True}}, 400, "port"),
    ("post", "/api/v1/nodes", {"json": {**NODE, "name": "../etc"}}, 400, "name"),
    ("post", "/api/v1/nodes", {"json": {**NODE, "name": "pacs\n"}}, 400, "name"),
    ("post", "/api/v1/nodes", {"json": {**NODE, "ae_title": "A" * 17}}, 400, "ae_title"),
    ("post", "/api/v1/nodes", {"data": json.dumps({**NODE, "description": "x" * (10 * 1024 * 1024)}),
                               "content_type": "application/json"}, 413, None),
    ("put", "/api/v1/nodes/known", {"json": {"ae_title": "X", "host": "h", "port": 70000}}, 400, "port"),
    ("patch", "/api/v1/nodes/known", {"json": {"name": "renamed"}}, 400, "name"),
    ("delete", "/api/v1/nodes/unknown", {}, 404, None),
    ("post", "/api/v1/nodes/unknown/echo", {}, 404, None),
    ("post", "/api/v1/nodes/known/query", {"json": {"PatientID": "x", "Colour": "red"}}, 400, "Colour"),
    ("post", "/api/v1/nodes/known/query", {"json": {}}, 400, "query"),
    ("post", "/api/v1/nodes/known/query", {"json": {"StudyInstanceUID": "1.2'; drop table x"}}, 400,
     "StudyInstanceUID"),
    ("post", "/api/v1/jobs", {"json": {"kind": "retrieve", "node": "unknown", "query": {"PatientID": "P"}}}, 404, None),
    ("post", "/api/v1/jobs", {"json": {"kind": "teleport"}}, 400, "kind"),
    ("post", "/api/v1/jobs", {"json": {"kind": "import", "path": "../../etc"}}, 400, "path"),
    ("post", "/api/v1/jobs", {"json": {"kind": "import", "path": "/etc"}}, 400, "path"),
    ("post", "/api/v1/jobs", {"json": {"kind": "import", "path": "a", "extra": 1}}, 400, "extra"),
    ("post", "/api/v1/jobs", {"json": {"kind": "import", "path": 5}}, 400, "path"),
    ("post", "/api/v1/jobs", {"json": {"kind": "import", "path": "a", "webhook": "file:///etc/passwd"}}, 400,
     "webhook"),
    ("post", "/api/v1/jobs", {"json": {"kind": "push", "node": "known", "selection": {"PatientID": "P1",
                                                                                      "job": "x"}}}, 400, "selection"),
    ("post", "/api/v1/jobs", {"data": "x" * (10 * 1024 * 1024), "content_type": "application/json"}, 413, None),
    ("get", "/api/v1/jobs/0123456789abcdef0123456789abcdef", {}, 404, None),
    ("post", "/api/v1/jobs/0123456789abcdef0123456789abcdef/cancel", {}, 404, None),
    ("post", "/api/v1/jobs/' OR 1=1 --/retry", {}, 404, None),
    ("get", "/api/v1/jobs?state=' OR 1=1 --", {}, 400, "state"),
    ("get", "/api/v1/jobs?limit=0", {}, 400, "limit"),
    ("get", "/api/v1/jobs?limit=abc", {}, 400, "limit"),
    ("get", "/api/v1/jobs?since=yesterday", {}, 400, "since"),
    ("get", "/api/v1/jobs?colour=red", {}, 400, "colour"),
    ("get", "/api/v1/studies?StudyInstanceUID=1' OR '1'='1", {}, 400, "StudyInstanceUID"),
    ("get", "/api/v1/studies?StudyDate=2024-01-01'--", {}, 400, "StudyDate"),
    ("get", "/api/v1/studies?Modality=CT' OR 1=1 --", {}, 400, "Modality"),
    ("get", "/api/v1/series?ObjectFile=x", {}, 400, "ObjectFile"),
    ("get", "/api/v1/instances?offset=-1", {}, 400, "offset"),
    ("get", "/api/v1/instances/1.2.3/file", {}, 404, None),
    ("get", "/api/v1/instances/..%2F..%2Fetc%2Fpasswd/file", {}, 404, None),
    ("get", "/api/v1/instances/1.2' OR '1'='1/file", {}, 400, "sop"),
    ("get", "/api/v1/nowhere", {}, 404, None),
    ("delete", "/api/v1/jobs", {}, 405, None),
]


@pytest.mark.parametrize("method, path, kwargs, status, field", BAD, ids=[f"{m} {p[:50]} {s}" for m, p, _, s, _ in BAD])
def test_bad_input_is_refused_and_changes_nothing(client, app, method, path, kwargs, status, field):
    assert client.post("/api/v1/nodes", json={**NODE, "name": "known"}, headers=auth("admin")).status_code == 201
    before = snapshot(app)
    resp = getattr(client, method)(path, headers=auth("admin"), **kwargs)
    assert_error(resp, status, field)
    assert snapshot(app) == before


def test_quotes_and_sql_in_text_filters_match_nothing(client, app, ctx, tmp_path):
    Importer(ctx.index, ctx.storage, workers=1).import_paths([_instances(tmp_path, 3)])
    before = snapshot(app)
    for value in ("' OR 1=1 --", "x'; DROP TABLE DICOMImages; --", '"', "%", "_", "P%"):
        for resource in ("patients", "studies", "series", "instances"):
            resp = client.get(f"/api/v1/{resource}", query_string={"PatientID": value}, headers=auth("read"))
            assert resp.status_code == 200 and resp.get_json()["total"] == 0, (resource, value)
    assert snapshot(app) == before
    assert client.get("/api/v1/instances", headers=auth("read")).get_json()["total"] == 3


# -- jobs -------------------------------------------------------------------------------
def test_jobs_submit_dedupe_list_cancel_retry(client, app):
    client.post("/api/v1/nodes", json=NODE, headers=auth("admin"))
    body = {"kind": "retrieve", "node": "pacs", "query": {"PatientID": "P1", "min_study_date": "20240101"},
            "webhook": "https://platform.example/hook"}
    t0 = time.time()
    resp = client.post("/api/v1/jobs", json=body, headers=auth("user"))
    assert resp.status_code == 202
    first = resp.get_json()
    assert first["created"] and first["enqueued"] is True and first["state"] == "queued"
    assert first["path"] == f"/api/v1/jobs/{first['id']}" == resp.headers["Location"]
    again = client.post("/api/v1/jobs", json=body, headers=auth("user"))
    assert again.status_code == 200 and again.get_json()["id"] == first["id"] and not again.get_json()["created"]
    imp = client.post("/api/v1/jobs", json={"kind": "import", "path": "batch"}, headers=auth("user")).get_json()

    jobs = app.extensions["pacsbridge"].jobs
    jobs.set_series(first["id"], [SeriesProgress("1.2.3", study_uid="1.2", expected=10, received=4, indexed=3)])
    got = client.get(first["path"], headers=auth("read")).get_json()
    assert got["series"][0]["series_uid"] == "1.2.3" and got["totals"]["expected"] == 10
    assert got["params"]["query"]["PatientID"] == "P1" and got["webhook"] == ""  # only its owner sees it
    assert client.get(first["path"], headers=auth("user")).get_json()["webhook"] == "https://platform.example/hook"

    page = client.get("/api/v1/jobs?limit=1", headers=auth("read")).get_json()
    assert page["total"] == 2 and len(page["items"]) == 1 and page["items"][0]["id"] == imp["id"]
    assert "series" not in page["items"][0]
    page2 = client.get("/api/v1/jobs?limit=1&offset=1", headers=auth("read")).get_json()
    assert page2["items"][0]["id"] == first["id"]
    assert [j["id"] for j in client.get("/api/v1/jobs?kind=import", headers=auth("read")).get_json()["items"]] == \
        [imp["id"]]
    assert client.get("/api/v1/jobs?node=pacs", headers=auth("read")).get_json()["total"] == 1
    assert client.get(f"/api/v1/jobs?since={t0 - 60}", headers=auth("read")).get_json()["total"] == 2
    assert client.get(f"/api/v1/jobs?since={t0 + 3600}", headers=auth("read")).get_json()["total"] == 0
    assert client.get("/api/v1/jobs?since=2000-01-01T00:00:00Z", headers=auth("read")).get_json()["total"] == 2

    assert_error(client.post(f"{first['path']}/retry", headers=auth("user")), 409)  # queued: nothing to retry
    cancelled = client.post(f"{first['path']}/cancel", headers=auth("user")).get_json()
    assert cancelled["state"] == "cancelled"
    assert client.get("/api/v1/jobs?state=cancelled", headers=auth("read")).get_json()["total"] == 1
    assert_error(client.post(f"{first['path']}/cancel", headers=auth("user")), 409)
    retried = client.post(f"{first['path']}/retry", headers=auth("user"))
    assert retried.status_code == 202 and retried.get_json()["state"] == "queued"
    assert retried.get_json()["enqueued"] is True
    assert retried.get_json()["series"][0]["received"] == 4  # progress kept


def test_broker_down_keeps_the_job_queued(api_settings, caplog):
    app = create_app({"SETTINGS": api_settings.with_(broker_url=f"redis://127.0.0.1:{free_port()}/0")})
    c = app.test_client()
    with caplog.at_level(logging.WARNING):
        resp = c.post("/api/v1/jobs", json={"kind": "import", "path": "batch"}, headers=auth("user"))
    assert resp.status_code == 202
    body = resp.get_json()
    assert body["enqueued"] is False and body["state"] == "queued"
    assert "stays queued" in caplog.text
    assert app.extensions["pacsbridge"].jobs.get(body["id"]).state == "queued"
    health = c.get("/healthz")
    assert health.status_code == 503
    checks = health.get_json()["checks"]
    assert checks["database"]["ok"] and not checks["broker"]["ok"] and checks["broker"]["error"]
    app.extensions["pacsbridge"].close()


def test_database_down_is_503(api_settings, tmp_path):
    app = create_app({"SETTINGS": api_settings})
    st = app.extensions["pacsbridge"]
    from pacsbridge.shared.core.db import make_engine

    st.jobs.engine = make_engine("postgresql://postgres@127.0.0.1:1/none")  # nobody listens there
    c = app.test_client()
    assert_error(c.get("/api/v1/jobs", headers=auth("read")), 503)
    health = c.get("/healthz")
    assert health.status_code == 503 and not health.get_json()["checks"]["database"]["ok"]
    assert "pacsbridge_jobs{" not in c.get("/metrics").get_data(as_text=True)
    st.jobs.engine.dispose()
    st.close()


# -- the index --------------------------------------------------------------------------
def _instances(tmp_path: Path, n: int) -> Path:
    folder = tmp_path / "in"
    study = "1.2.826.0.1.3680043.8.498.1"
    for i in range(n):
        k = 1 if i < 2 else i  # instances 0 and 1 share a study; patient PB0 has two studies
        make_instance(folder / f"{i}.dcm", PatientID=f"PB{int(i == 3)}", PatientName=f"Smith^Ann{int(i == 3)}",
                      StudyInstanceUID=study if i < 2 else f"{study}.{i}", StudyDate=f"2024010{k}",
                      Modality="CT" if i else "MR", SeriesInstanceUID=f"{study}.9{i}",
                      SOPInstanceUID=f"{study}.7{i}")
    return folder


def test_browse_filters_paging_and_download(client, app, ctx, tmp_path):
    folder = _instances(tmp_path, 4)
    shutil_copy = TEST_FILES / "CT_small.dcm"
    (folder / "ct_small.dcm").write_bytes(shutil_copy.read_bytes())
    report = Importer(ctx.index, ctx.storage, workers=1).import_paths([folder])
    assert report.stored == 5 and not report.rejected
    get = lambda path, **q: client.get(path, query_string=q, headers=auth("read")).get_json()  # noqa: E731

    patients = get("/api/v1/patients")
    assert patients["total"] == 3 and {"PatientID", "PatientName"} <= set(patients["items"][0])
    assert {p["PatientID"] for p in get("/api/v1/patients", PatientName="smith*")["items"]} == {"PB0", "PB1"}
    assert get("/api/v1/patients", PatientName="Smith^Ann?")["total"] == 2
    studies = get("/api/v1/studies", PatientID="PB0")
    assert studies["total"] == 2 and all(s["PatientID"] == "PB0" for s in studies["items"])
    assert get("/api/v1/studies", StudyDate="20240102-20240103")["total"] == 2
    assert get("/api/v1/studies", StudyDate="20240101")["total"] == 1
    assert get("/api/v1/studies", StudyDate="20240101-")["total"] == 3
    assert get("/api/v1/studies", Modality="MR")["total"] == 1
    both = get("/api/v1/studies", StudyInstanceUID="1.2.826.0.1.3680043.8.498.1")["items"][0]
    assert set(both["ModalitiesInStudy"].split("\\")) == {"CT", "MR"}
    assert get("/api/v1/studies", Modality="CT")["total"] == 4  # 3 of ours + CT_small
    series = get("/api/v1/series", Modality="CT", limit=2)
    assert series["total"] == 4 and len(series["items"]) == 2 and series["limit"] == 2
    rest = get("/api/v1/series", Modality="CT", limit=2, offset=2)["items"]
    assert not {s["SeriesInstanceUID"] for s in rest} & {s["SeriesInstanceUID"] for s in series["items"]}
    inst = get("/api/v1/instances", StudyInstanceUID="1.2.826.0.1.3680043.8.498.1")
    assert inst["total"] == 2
    sop = "1.2.826.0.1.3680043.8.498.1.70"
    one = get(f"/api/v1/instances/{sop}")
    assert one["SOPInstanceUID"] == sop and one["file"] == f"/api/v1/instances/{sop}/file"
    assert get(f"/api/v1/series/{one['SeriesInstanceUID']}")["Modality"] == "MR"
    assert get(f"/api/v1/studies/{both['StudyInstanceUID']}")["PatientID"] == "PB0"
    assert_error(client.get("/api/v1/studies/1.2.3.4", headers=auth("read")), 404)

    resp = client.get(one["file"], headers=auth("read"))
    assert resp.status_code == 200 and resp.mimetype == "application/dicom"
    assert resp.data == ctx.storage.absolute(ctx.index.lookup_sop([sop])[sop][0]).read_bytes()
    import pydicom

    ct = pydicom.dcmread(shutil_copy, stop_before_pixels=True).SOPInstanceUID
    assert client.get(f"/api/v1/instances/{ct}/file", headers=auth("read")).data == shutil_copy.read_bytes()


def test_download_never_leaves_the_storage_root(client, app, ctx, tmp_path):
    Importer(ctx.index, ctx.storage, workers=1).import_paths([_instances(tmp_path, 3)])
    secret = tmp_path / "secret.dcm"
    secret.write_bytes(b"not for you")
    images = ctx.index.tables["Image"]
    sops = sorted(ctx.index.lookup_sop(["1.2.826.0.1.3680043.8.498.1.7%d" % i for i in range(3)]))
    with ctx.index.engine.begin() as conn:  # a tampered index row, and a link planted in storage
        conn.execute(update(images).where(images.c.SOPInstanc == sops[0]).values(ObjectFile="../secret.dcm"))
        conn.execute(update(images).where(images.c.SOPInstanc == sops[1]).values(ObjectFile="link.dcm"))
        conn.execute(update(images).where(images.c.SOPInstanc == sops[2]).values(ObjectFile=str(secret),
                                                                               DeviceName="EXTERN"))
    (ctx.storage.root / "link.dcm").symlink_to(secret)
    for sop in sops:
        resp = client.get(f"/api/v1/instances/{sop}/file", headers=auth("read"))
        assert_error(resp, 404)
        assert b"not for you" not in resp.data


# -- metrics ----------------------------------------------------------------------------
def test_metrics_count_requests_and_jobs(client):
    client.get("/api/v1/jobs", headers=auth("read"))
    client.get("/api/v1/jobs/abc", headers=auth("read"))
    client.post("/api/v1/jobs", json={"kind": "import", "path": "p"}, headers=auth("user"))
    text = client.get("/metrics").get_data(as_text=True)
    assert 'pacsbridge_api_requests_total{method="GET",route="/api/v1/jobs/<job_id>",status="404"} 1.0' in text
    assert 'pacsbridge_api_requests_total{method="POST",route="/api/v1/jobs",status="202"} 1.0' in text
    assert 'pacsbridge_api_request_seconds_count{method="GET",route="/api/v1/jobs"} 1.0' in text
    assert 'pacsbridge_jobs{state="queued"} 1.0' in text


# -- a real server, driven over HTTP ---------------------------------------------------------
class Server:
    """``pacsbridge api`` (or gunicorn) as a process on a free port, plus a worker if asked."""

    def __init__(self, tmp_path: Path, database_url: str | None = None, gunicorn: bool = False,
                 gunicorn_args: tuple[str, ...] = (), **extra_env: str) -> None:
        self.port = free_port()
        self.tmp = tmp_path
        (tmp_path / "import").mkdir(exist_ok=True)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PACSBRIDGE_")}
        self.env.update({
            "PACSBRIDGE_DATABASE_URL": database_url or f"sqlite:///{tmp_path / 'idx.db'}",
            "PACSBRIDGE_STORAGE": str(tmp_path / "data"), "PACSBRIDGE_FSYNC": "0",
            "PACSBRIDGE_BROKER_URL": f"sqla+sqlite:///{tmp_path / 'broker.db'}",
            "PACSBRIDGE_IMPORT_ROOT": str(tmp_path / "import"), "PACSBRIDGE_API_TOKENS": TOKEN_SPEC,
            "PACSBRIDGE_LISTENER_PORT": str(free_port()), "PACSBRIDGE_IMPORT_WORKERS": "1",
            "PACSBRIDGE_API_PORT": str(self.port),
        })
        self.env.update(extra_env)
        self.procs: list[subprocess.Popen] = []
        cmd = ([sys.executable, "-m", "gunicorn", "-w", "2", "-b", f"127.0.0.1:{self.port}", *gunicorn_args,
                "pacsbridge.api:create_app()"] if gunicorn else PB + ["api"])
        self._start(cmd, "api")
        wait_port(self.port)

    def _start(self, cmd: list[str], name: str) -> None:
        log = open(self.tmp / f"{name}.log", "w")
        self.procs.append(subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True))

    def worker(self, *extra: str) -> None:
        self._start(PB + ["worker", "--concurrency", "1", *extra], "worker")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def call(self, method: str, path: str, body: Any = None, role: str | None = "admin") -> tuple[int, Any, Any]:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else {}
        if role:
            headers.update(auth(role))
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                raw, status, hdrs = resp.read(), resp.status, resp.headers
        except urllib.error.HTTPError as exc:
            raw, status, hdrs = exc.read(), exc.code, exc.headers
        if hdrs.get_content_type() == "application/json":
            return status, json.loads(raw), hdrs
        return status, raw, hdrs

    def close(self) -> None:
        import signal

        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture
def server(tmp_path):
    s = Server(tmp_path, PACSBRIDGE_DEID_SECRET="schemathesis-secret-" + "0" * 32,  # projects can be made
               PACSBRIDGE_SECRET_KEY="schemathesis-key-" + "1" * 32)  # and node secrets stored
    yield s
    s.close()


#: The operations whose body (or query string) has rules JSON Schema cannot say (a date range's order, one
#: matching key, a node name equal to the path's ...): their description lists them, and only for them a
#: schema-valid request may get a 400 in schemathesis' positive phase.
RULES_BEYOND_SCHEMA = {"POST /api/v1/jobs", "GET /api/v1/jobs", "POST /api/v1/nodes/{name}/query",
                       "POST /api/v1/nodes", "PUT /api/v1/nodes/{name}", "PATCH /api/v1/nodes/{name}",
                       "POST /api/v1/quarantine/{entry_id}/resolve", "PATCH /api/v1/projects/{name}",
                       "POST /api/v1/projects", "GET /api/v1/audit", "POST /api/v1/projects/{name}/results",
                       "POST /api/v1/cohorts",
                       # a cursor is the `next` of a page of the same list: a random one matching its pattern is
                       # a 400 (issue 19)
                       "GET /api/v1/patients", "GET /api/v1/studies", "GET /api/v1/series", "GET /api/v1/instances",
                       "GET /api/v1/quarantine"}


@pytest.mark.timeout(600)
def test_schemathesis_finds_nothing(server, tmp_path):
    """Fuzz every operation of the served document with valid and invalid data (bounded: 10 examples per
    operation and phase): valid data is accepted, invalid data refused, every answer as documented."""
    from pacsbridge.api.contract import CROSS_FIELD

    doc = server.call("GET", "/api/v1/openapi.json", role=None)[1]
    ruled = {f"{method.upper()} {path}" for path, item in doc["paths"].items() for method, op in item.items()
             if op.get(CROSS_FIELD)}
    assert ruled == RULES_BEYOND_SCHEMA
    for name in ruled:  # each rule is said in the operation's description
        method, path = name.split(" ")
        op = doc["paths"][path][method.lower()]
        assert all(rule in op["description"] for rule in op[CROSS_FIELD]), name
    config = tmp_path / "schemathesis.toml"
    # 502 is what an unreachable node is (a created node pointing nowhere); the document lists it.
    text = ('[checks.not_a_server_error]\nexpected-statuses = ["2xx", "3xx", "4xx", "502"]\n'
            "[checks.positive_data_acceptance]\nenabled = true\n"
            "[checks.negative_data_rejection]\nenabled = true\n"
            '[generation]\nmode = "all"\n')
    for name in sorted(ruled):
        text += (f'[[operations]]\ninclude-name = "{name}"\n[operations.checks.positive_data_acceptance]\n'
                 'expected-statuses = ["2xx", "3xx", "400", "401", "403", "404", "409", "429", "5xx"]\n')
    config.write_text(text)
    proc = subprocess.run([str(Path(sys.executable).parent / "schemathesis"), "--config-file", str(config), "run",
                           f"{server.url}/api/v1/openapi.json", "-n", "10", "--seed", "7", "--request-timeout", "20",
                           "-H", f"Authorization: Bearer {TOKENS['admin']}"],
                          capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stdout[-8000:]
    assert " passed" in proc.stdout and "Tested: 48" in proc.stdout


def test_real_server_over_http(server):
    status, body, headers = server.call("GET", "/api/v1/nodes", role=None)
    assert status == 401 and body["error"]["status"] == 401 and headers["WWW-Authenticate"].startswith("Bearer")
    assert server.call("POST", "/api/v1/nodes", NODE, role="read")[0] == 403
    status, body, headers = server.call("POST", "/api/v1/nodes", NODE)
    assert status == 201 and headers["Location"] == "/api/v1/nodes/pacs"
    assert server.call("GET", "/api/v1/nodes/pacs", role="read")[1]["ae_title"] == "ORTHANC"
    status, health, _ = server.call("GET", "/healthz", role=None)
    assert status == 200 and health["checks"]["listener"]["ok"] is False  # reported, not required
    doc = server.call("GET", "/api/v1/openapi.json", role=None)[1]
    assert doc["openapi"].startswith("3.") and "/api/v1/jobs/{job_id}/cancel" in doc["paths"]
    # a request that is bad JSON over a real socket
    req = urllib.request.Request(server.url + "/api/v1/jobs", data=b"{nope", method="POST",
                                 headers={"Content-Type": "application/json", **auth("user")})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=10)
    assert info.value.code == 400 and json.loads(info.value.read())["error"]["field"] == "body"


def test_gunicorn_serves_the_factory(tmp_path):
    s = Server(tmp_path, gunicorn=True)
    try:
        assert s.call("GET", "/healthz", role=None)[0] == 200
        assert s.call("GET", "/api/v1/jobs", role="read")[1]["total"] == 0
        assert s.call("GET", "/api/v1/jobs", role=None)[0] == 401
    finally:
        s.close()


def test_metrics_count_the_requests_of_every_gunicorn_worker(tmp_path):
    """Two gunicorn workers, each answering some of the requests: /metrics, whichever worker answers it,
    counts every request (prometheus multiprocess mode).

    A sync worker serves one connection at a time, and left to itself one worker may take all of them
    (it did, on a loaded machine). So one connection holds a worker with a half-sent request while the
    other worker answers 59 requests, then completes it: both workers have answered, for certain."""
    import re
    import socket

    folder = tmp_path / "metrics"
    s = Server(tmp_path, gunicorn=True, gunicorn_args=("-c", "python:pacsbridge.api.gunicorn_conf"),
               PROMETHEUS_MULTIPROC_DIR=str(folder))
    try:
        folder.mkdir(exist_ok=True)
        (folder / "counter_999999.db").write_bytes(b"stale")  # a file of an earlier run: removed at start
        s.close()
        s = Server(tmp_path, gunicorn=True, gunicorn_args=("-c", "python:pacsbridge.api.gunicorn_conf"),
                   PROMETHEUS_MULTIPROC_DIR=str(folder))
        held = socket.create_connection(("127.0.0.1", s.port), timeout=30)
        held.sendall(b"GET /api/v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # a worker now waits for the rest
        time.sleep(0.5)
        statuses = [s.call("GET", "/api/v1/jobs", role="read")[0] for _ in range(59)]  # the other worker
        assert statuses == [200] * 59
        held.sendall(f"Authorization: Bearer {TOKENS['read']}\r\nConnection: close\r\n\r\n".encode())
        answer = b""
        while chunk := held.recv(65536):
            answer += chunk
        held.close()
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
        workers = {p.name for p in folder.glob("counter_*.db")}
        assert len(workers) == 2 and "counter_999999.db" not in workers, workers  # both workers answered
        for _ in range(4):  # whichever worker answers the scrape, it counts all 60
            text = s.call("GET", "/metrics", role=None)[1].decode()
            assert 'pacsbridge_api_requests_total{method="GET",route="/api/v1/jobs",status="200"} 60.0' in text, \
                text[:3000]
            count = re.search(r'pacsbridge_api_request_seconds_count\{method="GET",route="/api/v1/jobs"\} (\S+)', text)
            assert count and float(count.group(1)) == 60.0
            assert 'pacsbridge_jobs{state="queued"} 0.0' in text
    finally:
        s.close()


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_import_job_runs_on_a_real_worker(tmp_path, database, request):
    db = None
    if database == "postgresql":
        db = request.getfixturevalue("pg_url")
    s = Server(tmp_path, database_url=db)
    try:
        batch = tmp_path / "import" / "batch-1"
        files = [make_instance(batch / f"{i}.dcm", PatientID="JOBPAT", rows=16) for i in range(4)]
        (batch / "junk.txt").write_text("not dicom")
        s.worker()
        status, sub, _ = s.call("POST", "/api/v1/jobs", {"kind": "import", "path": "batch-1"}, role="user")
        assert status == 202 and sub["enqueued"] is True
        deadline = time.monotonic() + 90
        job = sub["job"]
        while time.monotonic() < deadline and job["state"] in ("queued", "running"):
            time.sleep(0.5)
            job = s.call("GET", sub["path"], role="read")[1]
        assert job["state"] == "partial", job  # the junk file is reported, the instances are in
        assert job["result"]["rejected"] == 1 and job["finished_at"] and job["attempts"] == 1
        assert "junk.txt" in job["result"]["rejected_files"][0]
        page = s.call("GET", "/api/v1/instances?PatientID=JOBPAT", role="read")[1]
        assert page["total"] == 4
        assert {i["SOPInstanceUID"] for i in page["items"]} == {ds.SOPInstanceUID for ds in files}
        for i, ds in enumerate(files):
            status, data, headers = s.call("GET", f"/api/v1/instances/{ds.SOPInstanceUID}/file", role="read")
            assert status == 200 and headers.get_content_type() == "application/dicom"
            assert data == (batch / f"{i}.dcm").read_bytes()
        # the same request again: the finished job is not active any more, so a new one is made
        assert s.call("POST", "/api/v1/jobs", {"kind": "import", "path": "batch-1"}, role="user")[0] == 202
        done = s.call("GET", "/api/v1/jobs?kind=import", role="read")[1]
        assert done["total"] == 2
    finally:
        s.close()


# -- nodes against a real Orthanc ---------------------------------------------------------------
def test_echo_and_query_a_real_orthanc(client, tmp_path):
    from .orthanc import Orthanc

    with Orthanc(tmp_path / "orthanc", modalities={"pb": ("PACSBRIDGE", "127.0.0.1", free_port())}) as pacs:
        files = [make_instance(tmp_path / "o" / f"{i}.dcm", PatientID="ORTH1", Modality="CT",
                               StudyDescription="chest") for i in range(3)]
        pacs.upload(tmp_path / "o" / f"{i}.dcm" for i in range(3))
        node = {"name": "orthanc", "ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port}
        assert client.post("/api/v1/nodes", json=node, headers=auth("admin")).status_code == 201
        echo = client.post("/api/v1/nodes/orthanc/echo", headers=auth("user"))
        assert echo.status_code == 200 and echo.get_json()["ok"] and echo.get_json()["seconds"] > 0
        assert_error(client.post("/api/v1/nodes/orthanc/echo", headers=auth("read")), 403)
        found = client.post("/api/v1/nodes/orthanc/query", json={"PatientID": "ORTH1"}, headers=auth("user"))
        body = found.get_json()
        assert found.status_code == 200 and body["level"] == "study" and body["count"] == 3
        assert {r["StudyInstanceUID"] for r in body["results"]} == {ds.StudyInstanceUID for ds in files}
        series = client.post("/api/v1/nodes/orthanc/query", headers=auth("user"),
                             json={"level": "series", "StudyInstanceUID": files[0].StudyInstanceUID}).get_json()
        assert series["count"] == 1 and series["results"][0]["Modality"] == "CT"
        images = client.post("/api/v1/nodes/orthanc/query", headers=auth("user"),
                             json={"level": "image", "PatientID": "ORTH*"}).get_json()
        assert {r["SOPInstanceUID"] for r in images["results"]} == {ds.SOPInstanceUID for ds in files}
        assert client.post("/api/v1/nodes/orthanc/query", json={"PatientID": "NOBODY"},
                           headers=auth("user")).get_json()["count"] == 0
        client.patch("/api/v1/nodes/orthanc", json={"allow_find": False}, headers=auth("admin"))
        assert_error(client.post("/api/v1/nodes/orthanc/query", json={"PatientID": "ORTH1"}, headers=auth("user")),
                     409)
    # Orthanc stopped: the peer's failure is a 502 with the reason
    client.patch("/api/v1/nodes/orthanc", json={"allow_find": True}, headers=auth("admin"))
    err = assert_error(client.post("/api/v1/nodes/orthanc/echo", headers=auth("user")), 502)
    assert "orthanc" in err["message"]
    client.patch("/api/v1/nodes/orthanc", json={"host": "no-such-host.invalid"}, headers=auth("admin"))
    assert_error(client.post("/api/v1/nodes/orthanc/query", json={"PatientID": "X"}, headers=auth("user")), 502)


def test_an_unbounded_repack_template_is_a_400_at_submit(client, app):
    """Issue 14 item 10: {PatientID:>50000000} took 43 s and 480 MB per instance in the worker."""
    before = snapshot(app)
    for template in ("{PatientID:>50000000}/x.dcm", "{SeriesNumber:.100000f}.dcm", "{PatientID|md5:x}.dcm"):
        resp = client.post("/api/v1/jobs", headers=auth("user"), json={
            "kind": "repack", "selection": {"PatientID": "P1"}, "dest": "d", "template": template})
        assert_error(resp, 400, "template")
    assert snapshot(app) == before  # no job row written


def test_echo_and_query_of_a_node_that_answers_half_an_associate_ac(client, monkeypatch):
    """A node that sends the first bytes of an A-ASSOCIATE-AC and holds the connection: echo and query
    answer a JSON 502 naming the fault within their deadline (it held the request until the node closed;
    under gunicorn the worker was killed after 30 s and the client got an HTML 500)."""
    import threading

    from pacsbridge.api import nodes as api_nodes

    from .servers import HalfAssociatePeer

    monkeypatch.setattr(api_nodes, "ECHO_SECONDS", 2.0)
    monkeypatch.setattr(api_nodes, "QUERY_SECONDS", (2.0, 3.0))
    with HalfAssociatePeer() as peer:
        node = {"name": "half", "ae_title": "HALF", "host": "127.0.0.1", "port": peer.port}
        assert client.post("/api/v1/nodes", json=node, headers=auth("admin")).status_code == 201
        for path, body in (("/api/v1/nodes/half/echo", None), ("/api/v1/nodes/half/query", {"PatientID": "X"})):
            out: list = []

            def call() -> None:
                t0 = time.monotonic()
                out.append((client.post(path, json=body, headers=auth("user")), time.monotonic() - t0))  # noqa: B023 (called and joined within the iteration)

            t = threading.Thread(target=call, daemon=True)
            t.start()
            t.join(20)
            assert not t.is_alive(), f"{path}: no answer after 20 s"
            resp, seconds = out[0]
            err = assert_error(resp, 502)
            assert "12 of the 190 bytes of its A-ASSOCIATE-AC" in err["message"], err
            assert seconds < 4.5, seconds
        assert peer.connections == 2


def test_cancel_answers_what_happened(client, app, ctx, tmp_path, monkeypatch):
    """Cancelling a running job answers once the worker stopped it (it answered `running` and the job went
    on); a job whose worker does not stop in time gets 202 saying the cancel is requested, not done."""
    import threading

    from pacsbridge.api import jobs as api_jobs
    from pacsbridge.worker import runner

    from .servers import HalfAssociatePeer

    Importer(ctx.index, ctx.storage, workers=1).import_paths([_instances(tmp_path, 2)])
    st = app.extensions["pacsbridge"]
    with HalfAssociatePeer() as peer:
        node = {"name": "half", "ae_title": "HALF", "host": "127.0.0.1", "port": peer.port}
        assert client.post("/api/v1/nodes", json=node, headers=auth("admin")).status_code == 201
        job = client.post("/api/v1/jobs", json={"kind": "push", "node": "half", "selection": {"PatientID": "PB0"}},
                          headers=auth("user")).get_json()
        worker = threading.Thread(target=runner.run_job, args=(job["id"], st.ctx, st.jobs), daemon=True)
        worker.start()
        deadline = time.monotonic() + 20
        while peer.connections == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert st.jobs.get(job["id"]).state == "running"
        resp = client.post(f"/api/v1/jobs/{job['id']}/cancel", headers=auth("user"))
        worker.join(10)
    body = resp.get_json()
    assert resp.status_code == 200, body
    assert body["state"] == "cancelled" and body["cancel"]["outcome"] == "cancelled", body
    assert "stopped" in body["cancel"]["message"]
    # a running row no worker looks at: the answer says the cancel is only requested
    monkeypatch.setattr(api_jobs, "CANCEL_WAIT_SECONDS", 0.5)
    other = client.post("/api/v1/jobs", json={"kind": "push", "node": "half", "selection": {"PatientID": "PB1"}},
                        headers=auth("user")).get_json()
    assert st.jobs.claim(other["id"], "elsewhere:1") is not None
    resp = client.post(f"/api/v1/jobs/{other['id']}/cancel", headers=auth("user"))
    body = resp.get_json()
    assert resp.status_code == 202 and body["state"] == "running" and body["cancel_requested"], body
    assert body["cancel"]["outcome"] == "requested" and "elsewhere:1" in body["cancel"]["message"], body
    queued = client.post("/api/v1/jobs", json={"kind": "push", "node": "half", "selection": {"PatientID": "PB0"}},
                         headers=auth("user")).get_json()
    body = client.post(f"/api/v1/jobs/{queued['id']}/cancel", headers=auth("user")).get_json()
    assert body["state"] == "cancelled" and body["cancel"]["outcome"] == "cancelled", body
