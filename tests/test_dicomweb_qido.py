"""DICOMweb nodes and the QIDO-RS searcher.

Against a real Orthanc with its DICOMweb plugin (the same Orthanc answers C-FIND, so every QIDO-RS answer
is compared with the C-FIND searcher's), and against small servers of the test's own for what Orthanc
does not do: a server that ignores ``limit``/``offset``, one that caps its answers with a ``Warning``
header, one that wants a bearer token.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator

import pytest
from pydicom.uid import generate_uid

from pacsbridge.shared.core.errors import ConfigError, DicomWebError, DimseError, InvalidRequest
from pacsbridge.shared.dicom.dimse import echo, find_all
from pacsbridge.shared.dicom.node import Node
from pacsbridge.shared.dicom.query import RETURN_KEYS, Query
from pacsbridge.shared.nodes.credentials import resolve_secret
from pacsbridge.shared.nodes.dicomweb import QidoSearcher
from pacsbridge.shared.nodes.searchers import searcher_for, uses_qido
from pacsbridge.shared.nodes.sources import DimseSearcher

from .helpers import make_instance
from .orthanc import Orthanc
from .test_api import api_settings, app, assert_error, auth, client  # noqa: F401  (fixtures)

CALLING = "PACSBRIDGE"
_UID_KEY = {"patient": "PatientID", "study": "StudyInstanceUID", "series": "SeriesInstanceUID",
            "image": "SOPInstanceUID"}


# -- the archive: Orthanc with DICOMweb, loaded with generated studies ---------------------------
class Archive:
    def __init__(self, pacs: Orthanc, uids: dict[str, str]) -> None:
        self.pacs = pacs
        self.uids = uids
        self.node = Node.from_dict({"name": "orthanc", "ae_title": pacs.aet, "host": "127.0.0.1",
                                    "port": pacs.dicom_port, "web_url": pacs.web_url})


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Archive]:
    work = tmp_path_factory.mktemp("qido")
    pacs = Orthanc(work / "orthanc", modalities={"pb": (CALLING, "127.0.0.1", 1)}, dicomweb=True).start()
    uids: dict[str, str] = {}
    # (key, patient id, name, date, [(modality, instances) per series])
    studies = [("A", "WEB001", "DOE^JOHN", "20240110", [("CT", 3), ("CT", 2)]),
               ("B", "WEB001", "DOE^JOHN", "20240301", [("MR", 2)]),
               ("C", "WEB002", "DOE^JANE", "20240615", [("CT", 1)]),
               ("D", "OTHER03", "ROE^RICHARD", "20231231", [("CT", 2), ("SR", 1)])]
    files = []
    for key, pid, name, date, series in studies:
        uids[key] = generate_uid()
        for n, (modality, count) in enumerate(series):
            uids[f"{key}{n}"] = generate_uid()
            for i in range(count):
                path = work / "files" / f"{key}{n}_{i}.dcm"
                make_instance(path, PatientID=pid, PatientName=name, StudyDate=date, Modality=modality,
                              StudyInstanceUID=uids[key], SeriesInstanceUID=uids[f"{key}{n}"],
                              StudyDescription=f"study {key}", InstanceNumber=i + 1)
                files.append(path)
    pacs.upload(files)
    try:
        yield Archive(pacs, uids)
    finally:
        pacs.stop()


QUERIES = [
    {"PatientID": "WEB001"},
    {"PatientName": "DOE*"},                      # wildcards
    {"PatientID": "WEB00?"},
    {"PatientID": "*03"},
    {"min_study_date": "20240101", "max_study_date": "20240331"},   # date ranges, closed and open
    {"min_study_date": "20240201"},
    {"max_study_date": "20240110"},
    {"Modality": "MR"},
    # Orthanc 1.7's plugin does not decode its query: a space (+, %20) or ^ (%5E) matches nothing there
    {"StudyDescription": "study?C"},
    {"StudyInstanceUID": ["{A}", "{C}"]},         # UID list matching
    {"level": "series", "StudyInstanceUID": "{A}"},
    {"level": "series", "PatientID": "WEB*", "Modality": "CT"},
    {"level": "series", "SeriesInstanceUID": "{D1}"},
    {"level": "image", "StudyInstanceUID": "{A}", "SeriesInstanceUID": "{A0}"},
    {"level": "image", "PatientID": "OTHER03"},
    {"level": "patient", "PatientName": "DOE*"},
    {"PatientID": "NOBODY"},
    {"PatientID": "WEB001", "include_fields": ["StudyDescription"]},
]


def _query(spec: dict[str, Any], uids: dict[str, str]) -> Query:
    def fill(value: Any) -> Any:
        if isinstance(value, list):
            return [fill(v) for v in value]
        return value.format(**uids) if isinstance(value, str) else value

    return Query.from_dict({k: fill(v) for k, v in spec.items()})


@pytest.mark.parametrize("spec", QUERIES, ids=[json.dumps(q, sort_keys=True) for q in QUERIES])
def test_qido_answers_what_c_find_answers(archive, spec):
    query = _query(spec, archive.uids)
    web = QidoSearcher(archive.node).find(query)
    dimse = find_all(archive.node, query, CALLING, query.level)
    key = _UID_KEY[query.level]
    assert sorted(r[key] for r in web) == sorted(r[key] for r in dimse)
    assert not web.truncated
    by_uid = {r[key]: r for r in dimse}
    for found in web:  # the values both give are the same values, in the same form
        other = by_uid[found[key]]
        for name in RETURN_KEYS[query.level] + query.include_fields:
            if found.get(name) is not None and other.get(name) is not None:
                assert found[name] == other[name], (name, found[name], other[name])
    if query.include_fields:
        assert sorted(r.get("StudyDescription") for r in web) == ["study A", "study B"]


@pytest.mark.parametrize("spec", [{"PatientName": "DOE*"}, {"min_study_date": "20231201"},
                                  {"SeriesInstanceUID": ["{A1}", "{D0}"]}, {"SOPInstanceUID": "{sop}"}])
def test_the_plan_is_the_c_find_plan(archive, spec):
    uids = dict(archive.uids)
    uids["sop"] = find_all(archive.node, Query(level="image", SeriesInstanceUID=(uids["A0"],)), CALLING)[1][
        "SOPInstanceUID"]
    query = _query(spec, uids)

    def plan(searcher: Any) -> list[tuple[Any, ...]]:
        return sorted((r.study_uid, r.series_uid, r.patient_id, r.modality, r.expected, r.sops)
                      for r in searcher.plan(query))

    web = plan(QidoSearcher(archive.node))
    assert web and web == plan(DimseSearcher(archive.node, CALLING))
    qido = QidoSearcher(archive.node)
    refs = qido.plan(_query({"StudyInstanceUID": "{A}"}, uids))
    assert sorted(r.expected for r in refs) == [2, 3]
    assert {len(qido.instances(r)) for r in refs} == {2, 3}


def test_paging_with_a_small_limit_gives_everything_once(archive):
    query = Query(level="image", PatientID="*")
    everything = QidoSearcher(archive.node).find(query)
    assert len(everything) == 11
    paged = QidoSearcher(archive.node, limit=2)
    found = paged.find(query)
    assert sorted(r["SOPInstanceUID"] for r in found) == sorted(r["SOPInstanceUID"] for r in everything)
    assert paged.requests == 6  # five full pages of 2, then a short one
    capped = QidoSearcher(archive.node, limit=2).find(query, max_results=5)
    assert len(capped) == 5 and capped.truncated


def test_searcher_for_follows_web_url_and_prefer(archive):
    both = archive.node
    assert uses_qido(both) and isinstance(searcher_for(both, CALLING), QidoSearcher)
    dimse_first = Node.from_dict({**both.to_dict(), "prefer": "c-get,wado-rs"})
    assert isinstance(searcher_for(dimse_first, CALLING), DimseSearcher)
    dimse_only = Node.from_dict({**both.to_dict(), "web_url": ""})
    assert isinstance(searcher_for(dimse_only, CALLING), DimseSearcher)
    web_only = Node.from_dict({"name": "web", "ae_title": "", "host": "", "port": 0, "web_url": both.web_url,
                               "prefer": "c-move"})
    assert isinstance(searcher_for(web_only, CALLING), QidoSearcher)
    assert web_only.preferences() == [] and both.preferences() == ["wado-rs", "c-get", "c-move"]


# -- a DICOMweb-only node, and its secrets -------------------------------------------------------
def test_a_dicomweb_only_node_and_its_rules():
    web = Node.from_dict({"name": "web", "ae_title": "", "host": "", "port": 0, "web_url": "https://x.example/dw"})
    assert not web.has_dimse and web.has_web and web.service_url("qido") == "https://x.example/dw"
    with pytest.raises(DimseError, match="DICOMweb only"):
        echo(web, CALLING, timeout=2)
    base = {"name": "n", "ae_title": "PACS", "host": "h", "port": 104}
    for bad, field in (({"ae_title": ""}, "ae_title"),                     # no AE title, no web_url
                       ({"ae_title": "", "web_url": "http://h/dw"}, "ae_title"),  # a port, no AE title
                       ({"port": 0}, "port"),
                       ({"web_url": "ftp://h/dw"}, "web_url"),
                       ({"web_auth": "basic", "web_secret": "S"}, "web_user"),
                       ({"web_secret": "../etc/passwd"}, "web_secret"),
                       ({"web_secret": "a/b"}, "web_secret"),
                       ({"prefer": "wado-rs,ftp"}, "prefer")):
        with pytest.raises(InvalidRequest) as info:
            Node.from_dict({**base, **bad})
        assert info.value.field == field, bad


def test_secrets_by_name_from_the_environment_or_the_secrets_folder(tmp_path, monkeypatch):
    (tmp_path / "PB_TEST_FILE_SECRET").write_text("from-a-file\n")
    monkeypatch.setenv("PB_TEST_ENV_SECRET", "from-the-env")
    assert resolve_secret("PB_TEST_ENV_SECRET", tmp_path) == "from-the-env"
    assert resolve_secret("PB_TEST_FILE_SECRET", tmp_path) == "from-a-file"
    (tmp_path / "inner").mkdir()
    for bad in ("../PB_TEST_FILE_SECRET", "inner/../PB_TEST_FILE_SECRET", "/etc/passwd", "..", ""):
        with pytest.raises(ConfigError, match="not a plain name"):
            resolve_secret(bad, tmp_path / "inner")
    with pytest.raises(ConfigError, match="PB_TEST_MISSING") as info:
        resolve_secret("PB_TEST_MISSING", tmp_path)
    assert "from-" not in str(info.value)


# -- servers of the test's own ---------------------------------------------------------------------
def _study(uid: str, date: str) -> dict[str, Any]:
    return {"0020000D": {"vr": "UI", "Value": [uid]}, "00080020": {"vr": "DA", "Value": [date]},
            "00100020": {"vr": "LO", "Value": ["FAKE"]}}


def _in_range(date: str, criterion: str) -> bool:
    if not criterion:
        return True
    lo, sep, hi = criterion.partition("-")
    if not sep:
        return date == lo
    return (not lo or date >= lo) and (not hi or date <= hi)


class FakeQido:
    """A QIDO-RS server with 20 studies, one every 10 days from 2024-01-01, and a misbehaviour.

    ``mode``: ``ignore`` (answers every study whatever ``limit``/``offset``), ``cap`` (at most ``cap``
    studies, the first ones, with a ``Warning`` header, whatever the offset), ``cap-silent`` (the same
    without the header, nothing after them), ``redirect-same`` / ``redirect-other`` (a 302 to ``/moved...``
    on 127.0.0.1 / on localhost, another origin), ``ok``. ``token``: the
    bearer token it wants (401 otherwise). Every request's path, query and headers are kept.
    """

    def __init__(self, mode: str = "ok", cap: int = 3, token: str = "") -> None:
        self.mode, self.cap, self.token = mode, cap, token
        self.busy = 0  # answer this many requests 503 with Retry-After: 1 first
        start = dt.date(2024, 1, 1)
        self.studies = [(generate_uid(), (start + dt.timedelta(days=10 * i)).strftime("%Y%m%d")) for i in range(20)]
        self.seen: list[tuple[str, dict[str, list[str]], dict[str, str]]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                url = urllib.parse.urlsplit(self.path)
                params = urllib.parse.parse_qs(url.query)
                fake.seen.append((url.path, params, dict(self.headers)))
                if fake.mode.startswith("redirect") and not url.path.startswith("/moved"):
                    host = "127.0.0.1" if fake.mode == "redirect-same" else "localhost"  # another origin
                    self.send_response(302)
                    self.send_header("Location", f"http://{host}:{self.server.server_address[1]}/moved{self.path}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if fake.busy:
                    fake.busy -= 1
                    self.send_response(503)
                    self.send_header("Retry-After", "1")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if fake.token and self.headers.get("Authorization") != f"Bearer {fake.token}":
                    self.send_response(401)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                match = [_study(u, d) for u, d in fake.studies
                         if _in_range(d, params.get("StudyDate", [""])[0])]
                limit = int(params.get("limit", ["0"])[0]) or len(match)
                offset = int(params.get("offset", ["0"])[0])
                warning = ""
                if fake.mode == "ignore":
                    page = match
                elif fake.mode == "cap" and len(match) > fake.cap:
                    page, warning = match[:fake.cap], "299 fake: There are additional results that can be requested"
                elif fake.mode == "cap-silent":
                    page = match[:fake.cap] if offset == 0 else []
                else:
                    page = match[offset:offset + limit]
                body = json.dumps(page).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(body)))
                if warning:
                    self.send_header("Warning", warning)
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/dicom-web"

    def node(self, **more: Any) -> Node:
        return Node.from_dict({"name": "fake", "ae_title": "", "host": "", "port": 0, "web_url": self.url,
                               "web_timeout": 5, **more})

    def __enter__(self) -> "FakeQido":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_server_that_ignores_limit_and_offset_stops_with_an_error():
    with FakeQido("ignore") as fake:
        searcher = QidoSearcher(fake.node(), limit=5)
        started = time.monotonic()
        with pytest.raises(DicomWebError, match="ignores QIDO-RS paging"):
            searcher.studies(Query(PatientID="FAKE"))
        assert searcher.requests == 2 and time.monotonic() - started < 5
        assert [p["offset"] for _, p, _ in fake.seen] == [["0"], ["20"]]
        assert fake.seen[0][1]["limit"] == ["5"]


def test_a_server_that_caps_its_answers_is_split_by_date_range():
    with FakeQido("cap", cap=3) as fake:
        searcher = QidoSearcher(fake.node(), limit=100)
        query = Query(PatientID="FAKE", min_study_date=dt.date(2024, 1, 1),
                      max_study_date=dt.date(2024, 12, 31))
        found = searcher.studies(query)
        assert sorted(s["StudyInstanceUID"] for s in found) == sorted(u for u, _ in fake.studies)
        assert searcher.splits >= 6
        # the same capped answer without a Warning: PACSBRIDGE_FIND_LIMIT says it is cut short
        fake.mode = "cap-silent"
        assert len(QidoSearcher(fake.node(), limit=100).studies(query)) == 3  # nothing tells
        silent = QidoSearcher(fake.node(), limit=100, find_limit=3)
        assert len(silent.studies(query)) == 20 and silent.splits >= 6
    # a single day still capped: an error that says so, not a silent loss
    with FakeQido("cap", cap=0) as fake:
        fake.studies = [(generate_uid(), "20240105") for _ in range(3)]
        with pytest.raises(DicomWebError, match="single day 2024-01-05"):
            QidoSearcher(fake.node()).studies(Query(PatientID="FAKE", min_study_date=dt.date(
                2024, 1, 5), max_study_date=dt.date(2024, 1, 5)))


def test_bearer_auth_sends_the_token_named_by_the_node(monkeypatch, tmp_path):
    monkeypatch.setenv("PB_TEST_QIDO_TOKEN", "tok-0123456789")
    with FakeQido("ok", token="tok-0123456789") as fake:
        node = fake.node(web_auth="bearer", web_secret="PB_TEST_QIDO_TOKEN")
        assert len(QidoSearcher(node).find(Query(PatientID="FAKE"))) == 20
        assert fake.seen[-1][2]["Authorization"] == "Bearer tok-0123456789"
        assert fake.seen[-1][2]["Host"] == f"127.0.0.1:{fake.server.server_address[1]}"
        monkeypatch.setenv("PB_TEST_QIDO_TOKEN", "wrong-token")
        with pytest.raises(DicomWebError, match="HTTP 401"):
            QidoSearcher(node).find(Query(PatientID="FAKE"))
        monkeypatch.delenv("PB_TEST_QIDO_TOKEN")
        with pytest.raises(ConfigError, match="PB_TEST_QIDO_TOKEN"):
            QidoSearcher(node)


def test_redirects_are_followed_to_the_same_origin_only(monkeypatch):
    monkeypatch.setenv("PB_TEST_QIDO_TOKEN", "tok-0123456789")
    with FakeQido("redirect-same", token="tok-0123456789") as fake:
        node = fake.node(web_auth="bearer", web_secret="PB_TEST_QIDO_TOKEN")
        assert len(QidoSearcher(node).find(Query(PatientID="FAKE"))) == 20
        assert fake.seen[-1][0] == "/moved/dicom-web/studies"
        fake.mode = "redirect-other"
        fake.seen.clear()
        with pytest.raises(DicomWebError, match="another origin"):
            QidoSearcher(node).find(Query(PatientID="FAKE"))
        assert [p for p, _, _ in fake.seen] == ["/dicom-web/studies"]  # the token never went to localhost


def test_a_busy_server_is_asked_again_after_retry_after_then_given_up():
    with FakeQido("ok") as fake:
        fake.busy = 2
        started = time.monotonic()
        searcher = QidoSearcher(fake.node())
        assert len(searcher.find(Query(PatientID="FAKE"))) == 20
        assert searcher.requests == 3 and 2 <= time.monotonic() - started < 10
        fake.busy = 10
        with pytest.raises(DicomWebError, match="HTTP 503"):
            QidoSearcher(fake.node()).find(Query(PatientID="FAKE"))
        assert fake.busy == 6  # three retries, then the error


# -- the API ------------------------------------------------------------------------------------------
def test_a_dicomweb_node_through_the_api_never_shows_its_secret(client, archive, monkeypatch):  # noqa: F811
    secret = "the-secret-value-0123456789"
    monkeypatch.setenv("PB_TEST_API_TOKEN", secret)
    node = {"name": "web", "ae_title": "", "host": "", "port": 0, "web_url": archive.pacs.web_url,
            "web_auth": "bearer", "web_secret": "PB_TEST_API_TOKEN"}
    resp = client.post("/api/v1/nodes", json=node, headers=auth("admin"))
    assert resp.status_code == 201, resp.get_json()
    for path in ("/api/v1/nodes/web", "/api/v1/nodes"):
        got = client.get(path, headers=auth("read"))
        assert got.status_code == 200 and secret not in got.get_data(as_text=True)
    body = client.get("/api/v1/nodes/web", headers=auth("read")).get_json()
    assert body["web_secret"] == "PB_TEST_API_TOKEN" and body["prefer"] == "wado-rs,c-get,c-move"
    assert body["web_verify"] is True and body["web_timeout"] == 60
    # a query through it is QIDO-RS, with C-FIND's answer
    found = client.post("/api/v1/nodes/web/query", json={"PatientID": "WEB001"}, headers=auth("user")).get_json()
    assert found["count"] == 2 and {r["StudyInstanceUID"] for r in found["results"]} == {
        archive.uids["A"], archive.uids["B"]}
    images = client.post("/api/v1/nodes/web/query", json={"level": "image", "PatientID": "OTHER03"},
                         headers=auth("user")).get_json()
    assert images["count"] == 3
    # DIMSE through it: refused clearly (502, the peer cannot do it)
    err = assert_error(client.post("/api/v1/nodes/web/echo", headers=auth("user")), 502)
    assert "DICOMweb only" in err["message"]
    # its secret gone: the query says which secret is missing, not a 500
    monkeypatch.delenv("PB_TEST_API_TOKEN")
    err = assert_error(client.post("/api/v1/nodes/web/query", json={"PatientID": "WEB001"},
                                   headers=auth("user")), 502)
    assert "PB_TEST_API_TOKEN" in err["message"]
    # PATCH turns it into a DIMSE node too; the rule is checked on the whole node
    assert_error(client.patch("/api/v1/nodes/web", json={"port": 104}, headers=auth("admin")), 400, "ae_title")
    changed = client.patch("/api/v1/nodes/web", json={"ae_title": archive.pacs.aet, "host": "127.0.0.1",
                                                      "port": archive.pacs.dicom_port}, headers=auth("admin"))
    assert changed.status_code == 200 and changed.get_json()["web_url"] == archive.pacs.web_url
    assert_error(client.post("/api/v1/nodes", json={**node, "name": "bad", "web_secret": "../x"},
                             headers=auth("admin")), 400, "web_secret")


def test_cli_nodes_add_takes_the_dicomweb_options():
    from pacsbridge.cli import build_parser

    args = build_parser().parse_args(["nodes", "add", "web", "--web-url", "http://h:8042/dicom-web",
                                      "--web-auth", "bearer", "--web-secret", "PACS_TOKEN", "--no-web-verify",
                                      "--prefer", "wado-rs,c-move"])
    assert (args.web_url, args.web_auth, args.web_secret, args.web_verify, args.prefer) == (
        "http://h:8042/dicom-web", "bearer", "PACS_TOKEN", False, "wado-rs,c-move")


