"""Projects, the pseudonym and UID maps and the audit (shared/deid/projects.py), on SQLite and the real
PostgreSQL; then the API over a real ``pacsbridge api`` process and the CLI against it."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import threading
from pathlib import Path
from typing import Iterator

import pytest
from sqlalchemy import create_engine, delete, select, text, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError

from pacsbridge.shared.core.errors import Conflict, DeidSecretError, InvalidRequest, UnknownProject
from pacsbridge.shared.core.schema import audit_table, deid_patients_table, deid_uids_table
from pacsbridge.shared.deid.keys import Identity, KeyedIdentity, ProjectKey
from pacsbridge.shared.deid.options import ProjectConfig
from pacsbridge.shared.deid.projects import MappedIdentity, ProjectStore
from pacsbridge.shared.jobs.store import JobStore, Node

SECRET = b"s" * 40
OTHER = b"o" * 40


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    eng = create_engine(db_url)
    JobStore(eng).create()  # the migrations: the tables of 0003 and the audit's triggers
    yield eng
    eng.dispose()


@pytest.fixture
def store(engine: Engine) -> ProjectStore:
    return ProjectStore(engine)


def _identity(store: ProjectStore, name: str = "study1") -> MappedIdentity:
    return store.open(name, SECRET).identity


# -- projects -------------------------------------------------------------------------------
def test_create_get_list_update_delete(store):
    p = store.create("study1", {"pseudonyms": {"prefix": "RES", "digits": 6}}, SECRET, "a study", "ada")
    assert p.config.pseudonyms.prefix == "RES" and p.key_check == ProjectKey(SECRET, "study1").check
    assert p.created_by == "ada" and p.patients == 0 and "key_check" not in p.to_dict()
    assert [x.name for x in store.list()] == ["study1"]
    with pytest.raises(Conflict, match="exists already"):
        store.create("study1", {}, SECRET)
    with pytest.raises(InvalidRequest) as info:
        store.create("../x", {}, SECRET)
    assert info.value.field == "name"
    with pytest.raises(InvalidRequest) as info:
        store.create("x", {"pseudonyms": {"digits": 2}}, SECRET)
    assert info.value.field == "config.pseudonyms.digits"
    with pytest.raises(UnknownProject):
        store.get("nope")
    # without a map, anything may change (merged into the current configuration)
    p = store.update("study1", config={"options": {"retain_device_identity": True}, "uid_root": "1.2.3"},
                     description="changed")
    assert p.config.options.retain_device_identity and p.config.uid_root == "1.2.3"
    assert p.config.pseudonyms.prefix == "RES" and p.description == "changed"
    store.delete("study1")
    assert store.list() == []


def test_key_check_refuses_a_wrong_or_missing_secret(store):
    store.create("study1", {}, SECRET)
    assert store.open("study1", SECRET).name == "study1"
    with pytest.raises(DeidSecretError, match="not the secret this project was made with"):
        store.open("study1", OTHER)
    with pytest.raises(UnknownProject):
        store.open("nope", SECRET)
    assert store.check_all(SECRET) == ["study1"]
    with pytest.raises(DeidSecretError, match="study1"):
        store.check_all(OTHER)
    with pytest.raises(DeidSecretError, match="not set"):
        store.check_all(None)
    store.delete("study1")
    assert store.check_all(None) == []  # no project: no secret needed


def test_derivation_changes_and_rotation_are_refused_with_a_map(store, engine):
    store.create("study1", {"pseudonyms": {"names": ["ALPHA", "BETA"]}}, SECRET)
    _identity(store).patient("", "P1")
    for change in ({"uid_root": "1.2.3"}, {"pseudonyms": {"prefix": "X"}}, {"date_shift": {"min_days": -10}},
                   {"pseudonyms": {"names": ["BETA", "ALPHA"]}}, {"pseudonyms": {"names": []}}):
        with pytest.raises(Conflict, match="has a map"):
            store.update("study1", config=change)
    # the options, the risk policy and more names at the end change no derivation
    p = store.update("study1", config={"options": {"dates": "keep"}, "pseudonyms": {"names": ["ALPHA", "BETA", "G"]}})
    assert p.config.options.dates == "keep" and p.config.pseudonyms.names == ["ALPHA", "BETA", "G"]
    # a new key (the same name made again with another secret) and deleting are refused
    with pytest.raises(Conflict, match="key rotation is refused"):
        store.create("study1", {}, OTHER)
    with pytest.raises(Conflict, match="has a map"):
        store.delete("study1")
    # a UID map alone is a map too
    store.create("study2", {}, SECRET)
    _identity(store, "study2").record({"1.2.3": "2.25.1"}, "study")
    with pytest.raises(Conflict):
        store.update("study2", config={"uid_root": "1.2"})


def test_a_node_names_an_existing_project(store, engine):
    jobs = JobStore(engine)
    with pytest.raises(InvalidRequest) as info:
        jobs.add_node(Node("research", "RES", "127.0.0.1", 104, project="nope"))
    assert info.value.field == "project" and "no project" in str(info.value)
    store.create("study1", {}, SECRET)
    jobs.add_node(Node("research", "RES", "127.0.0.1", 104, project="study1", identifiable=False))
    with pytest.raises(InvalidRequest):
        jobs.update_node("research", {"project": "gone"})
    with pytest.raises(Conflict, match="research"):
        store.delete("study1")  # a node's project stays while the node names it
    jobs.update_node("research", {"project": ""})
    store.delete("study1")


# -- the pseudonym map ----------------------------------------------------------------------
def test_patients_are_derived_once_then_looked_up(store, engine):
    store.create("study1", {"pseudonyms": {"prefix": "RES", "digits": 6},
                            "date_shift": {"min_days": -30, "max_days": -1}}, SECRET)
    ident: Identity = _identity(store)
    first = ident.patient("HOSP", "P1")
    key = ProjectKey(SECRET, "study1")
    assert first.pseudonym == key.pseudonym("HOSP", "P1", "RES", 6) and -30 <= first.date_offset <= -1
    assert ident.patient("HOSP", "P1") == first
    assert _identity(store).patient("HOSP", "P1") == first  # another job: the same
    assert _identity(store).patient("", "P1") != first       # another issuer: another patient
    # the map wins over the derivation: a row written by hand (as by an import of an old map) is used
    with engine.begin() as conn:
        conn.execute(update(deid_patients_table).where(deid_patients_table.c.patient_id == "P1")
                     .where(deid_patients_table.c.issuer == "HOSP").values(pseudonym="FROMMAP", date_offset=-7))
    assert _identity(store).patient("HOSP", "P1") == ("FROMMAP", -7)
    rows, total = store.map_rows("study1", patient_id="P1")
    assert total == 2 and {r.pseudonym for r in rows} == {"FROMMAP", key.pseudonym("", "P1", "RES", 6)}
    assert all(r.first_used <= r.last_used for r in rows)
    # the uid is keyed, as the map-less identity derives it
    assert ident.uid("1.2.840.1") == KeyedIdentity(key).uid("1.2.840.1")


def test_a_collision_takes_the_next_attempt(store):
    store.create("study1", {"pseudonyms": {"prefix": "C", "digits": 4}}, SECRET)
    key = ProjectKey(SECRET, "study1")
    ident = _identity(store)
    # patient A holds (given by hand) what patient B's first derivation is
    taken = key.pseudonym("", "B", "C", 4, 0)
    ident.assign("", "A", taken)
    b = ident.patient("", "B")
    assert b.pseudonym == key.pseudonym("", "B", "C", 4, 1) != taken
    assert ident.patient_by_pseudonym(taken).patient_id == "A"


def test_the_names_list_is_used_in_order(store):
    store.create("study1", {"pseudonyms": {"names": ["ALPHA", "BETA", "GAMMA"]}}, SECRET)
    ident = _identity(store)
    ident.assign("", "X", "BETA")  # given by hand: the list skips it
    assert [ident.patient("", p).pseudonym for p in ("P1", "P2", "P1")] == ["ALPHA", "GAMMA", "ALPHA"]
    with pytest.raises(Conflict, match="every one of its 3 pseudonym names is used"):
        ident.patient("", "P3")
    store.update("study1", config={"pseudonyms": {"names": ["ALPHA", "BETA", "GAMMA", "DELTA"]}})
    assert _identity(store).patient("", "P3").pseudonym == "DELTA"


def test_explicit_pseudonyms(store):
    store.create("study1", {}, SECRET)
    ident = _identity(store)
    got = ident.assign("H", "P1", "COHORT-001")
    assert got.pseudonym == "COHORT-001" and got.date_offset == ProjectKey(SECRET, "study1").date_offset(
        "H", "P1", -365, -1)
    assert ident.assign("H", "P1", "COHORT-001") == got  # the same request again
    with pytest.raises(Conflict, match="has the pseudonym 'COHORT-001' already"):
        ident.assign("H", "P1", "COHORT-002")
    with pytest.raises(Conflict, match="belongs to another patient"):
        _identity(store).assign("H", "P2", "COHORT-001")
    with pytest.raises(InvalidRequest):
        ident.assign("H", "P3", "has space")
    assert _identity(store).patient("H", "P1").pseudonym == "COHORT-001"  # the map, not the derivation


def _race(n: int, work) -> list:
    barrier = threading.Barrier(n)
    results: list = [None] * n
    errors: list = []

    def run(i: int) -> None:
        try:
            barrier.wait()
            results[i] = work(i)
        except Exception as exc:  # collected, and the test fails on them
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    return results


def test_concurrent_workers_map_a_patient_once(pg_url):
    eng = create_engine(pg_url, pool_size=10)
    try:
        JobStore(eng).create()
        store = ProjectStore(eng)
        store.create("study1", {"pseudonyms": {"names": [f"N{i}" for i in range(40)]}}, SECRET)
        for _ in range(3):  # each round: 8 workers (each its own MappedIdentity) meet one new patient at once
            got = _race(8, lambda i: store.open("study1", SECRET).identity.patient("", "SAME"))
            assert len(set(got)) == 1
        rows, total = store.map_rows("study1")
        assert total == 1
        # 8 workers, 8 new patients at once, all wanting the first free name: each gets its own
        got = _race(8, lambda i: store.open("study1", SECRET).identity.patient("", f"P{i}"))
        assert len({p.pseudonym for p in got}) == 8
        rows, total = store.map_rows("study1", limit=None)
        assert total == 9 and len({r.pseudonym for r in rows}) == 9
        # recording the same UIDs at once: one row each
        uids = {f"1.2.{i}": f"2.25.{i}" for i in range(300)}
        _race(4, lambda i: store.open("study1", SECRET).identity.record(uids, "instance"))
        assert store.get("study1").uids == 300
    finally:
        eng.dispose()


# -- the UID map ----------------------------------------------------------------------------
def test_record_and_reverse_lookups(store, engine):
    store.create("study1", {"uid_root": "1.2.826.0.1.3680043.10.999"}, SECRET)
    ident = _identity(store)
    study, series = "1.2.3.4", "1.2.3.4.5"
    sops = [f"1.2.3.4.5.{i}" for i in range(1200)]  # more than one batch
    uids = {u: ident.uid(u) for u in (study, series, *sops)}
    assert all(v.startswith("1.2.826.0.1.3680043.10.999.") and len(v) <= 64 for v in uids.values())
    levels = {study: "study", series: "series", **{s: "instance" for s in sops}}
    assert ident.record(uids, levels, "H", "P1") == 1202
    assert ident.record(uids, levels, "H", "P1") == 0  # rows already there are left as they are
    assert ident.record({**uids, "9.9": ident.uid("9.9")}, "other") == 1
    assert ident.original_uid(uids[series]) == series and ident.original_uid("2.25.0") is None
    with engine.connect() as conn:
        row = conn.execute(select(deid_uids_table).where(deid_uids_table.c.original == study)).first()
    assert (row.level, row.issuer, row.patient_id, row.new) == ("study", "H", "P1", uids[study])
    assert store.get("study1").uids == 1203
    p = ident.patient("H", "P1")
    entry = ident.patient_by_pseudonym(p.pseudonym)
    assert (entry.issuer, entry.patient_id, entry.date_offset) == ("H", "P1", p.date_offset)
    assert ident.patient_by_pseudonym("NOBODY") is None
    # another project knows none of it
    store.create("study2", {}, SECRET)
    assert _identity(store, "study2").original_uid(uids[series]) is None


# -- the audit ------------------------------------------------------------------------------
def test_the_audit_is_append_only(store, engine):
    first = store.audit("ada", "map_read", project="study1", target="patient_id=P1", detail="1 row")
    store.audit("job:abc", "push", project="", patient_id="P1", study_uid="1.2.3", target="pacs")
    rows, total = store.audit_rows()
    assert total == 2 and rows[0].action == "push" and rows[1].id == first
    assert store.audit_rows(action="map_read")[0][0].actor == "ada"
    assert store.audit_rows(project="study1")[1] == 1
    assert store.audit_rows(since=rows[0].at + 1)[1] == 0
    # the database itself refuses to change or delete an entry (triggers of migration 0003)
    for statement in (update(audit_table).values(actor="someone else"), delete(audit_table),
                      update(audit_table).where(audit_table.c.id == first).values(detail="")):
        with pytest.raises(DBAPIError, match="append-only"):
            with engine.begin() as conn:
                conn.execute(statement)
    if engine.dialect.name == "postgresql":
        with pytest.raises(DBAPIError, match="append-only"):
            with engine.begin() as conn:
                conn.execute(text("TRUNCATE pacsbridge_audit"))
    assert store.audit_rows()[1] == 2 and store.audit_rows(actor="ada")[0][0].detail == "1 row"


# -- the API, a real `pacsbridge api` process ------------------------------------------------
API_SECRET = "api-secret-" + "x" * 32


@pytest.fixture
def api(tmp_path: Path):
    from .test_api import Server

    s = Server(tmp_path, PACSBRIDGE_DEID_SECRET=API_SECRET)
    yield s
    s.close()


def _audit(api, **params: str) -> list[dict]:
    query = "&".join(f"{k}={v}" for k, v in params.items())
    status, body, _ = api.call("GET", f"/api/v1/audit?{query}")
    assert status == 200, body
    return body["items"]


def test_api_projects_map_and_audit(api, tmp_path):
    config = {"pseudonyms": {"prefix": "RES", "digits": 6}, "options": {"retain_device_identity": True}}
    status, body, headers = api.call("POST", "/api/v1/projects", {"name": "study1", "description": "d",
                                                                  "config": config})
    assert status == 201 and headers["Location"] == "/api/v1/projects/study1", body
    assert body["config"]["pseudonyms"]["prefix"] == "RES" and body["created_by"] == "ada"
    assert "key_check" not in json.dumps(body) and API_SECRET not in json.dumps(body)
    assert api.call("POST", "/api/v1/projects", {"name": "study1"})[0] == 409
    assert api.call("POST", "/api/v1/projects", {"name": "x"}, role="user")[0] == 403
    status, body, _ = api.call("POST", "/api/v1/projects", {"name": "x", "config": {"pseudonyms": {"digits": 99}}})
    assert status == 400 and body["error"]["field"] == "config.pseudonyms.digits"
    status, body, _ = api.call("GET", "/api/v1/projects", role="read")
    assert status == 200 and [p["name"] for p in body["items"]] == ["study1"]
    assert api.call("GET", "/api/v1/projects/nope", role="read")[0] == 404
    assert api.call("GET", "/api/v1/projects/nope/map")[0] == 404
    assert api.call("PATCH", "/api/v1/projects/nope", {"description": "x"})[0] == 404
    status, body, _ = api.call("PATCH", "/api/v1/projects/study1", {"config": {"risk": {"structured_report": "warn"}}})
    assert status == 200 and body["config"]["risk"]["structured_report"] == "warn"
    assert body["config"]["pseudonyms"]["prefix"] == "RES"  # merged, not replaced

    # a node's project must exist
    node = {"name": "research", "ae_title": "RES", "host": "127.0.0.1", "port": 104, "identifiable": False}
    status, body, _ = api.call("POST", "/api/v1/nodes", {**node, "project": "nope"})
    assert status == 400 and body["error"]["field"] == "project" and "no project" in body["error"]["message"]
    assert api.call("POST", "/api/v1/nodes", {**node, "project": "study1"})[0] == 201
    assert api.call("PATCH", "/api/v1/nodes/research", {"project": "gone"})[0] == 400

    # the map is made by a job (here: the store, as a worker would, under the same secret)
    engine = create_engine(api.env["PACSBRIDGE_DATABASE_URL"])
    try:
        ident = ProjectStore(engine).open("study1", API_SECRET.encode()).identity
        patients = {pid: ident.patient("HOSP", pid) for pid in ("P1", "P2", "P,3\"", "=1+2")}
        ident.record({"1.2.3": ident.uid("1.2.3")}, "study", "HOSP", "P1")
    finally:
        engine.dispose()

    # a user (and a read) token is refused the map, and the attempt is audited
    status, body, _ = api.call("GET", "/api/v1/projects/study1/map?patient_id=P1", role="user")
    assert status == 403
    assert api.call("GET", "/api/v1/projects/study1/map", role="read")[0] == 403
    refused = _audit(api, action="map_read_refused")
    assert [(e["actor"], e["project"]) for e in refused] == [("rea", "study1"), ("uma", "study1")]
    assert refused[1]["target"] == "patient_id=P1" and "role user" in refused[1]["detail"]
    assert api.call("GET", "/api/v1/audit", role="user")[0] == 403

    # an admin reads it (JSON, searched, CSV), and every read is audited
    status, body, _ = api.call("GET", "/api/v1/projects/study1/map")
    assert status == 200 and body["total"] == 4
    assert {r["patient_id"]: r["pseudonym"] for r in body["items"]} == {p: v.pseudonym for p, v in patients.items()}
    status, body, _ = api.call("GET", f"/api/v1/projects/study1/map?pseudonym={patients['P2'].pseudonym}")
    assert [r["patient_id"] for r in body["items"]] == ["P2"] and body["items"][0]["date_offset"] == \
        patients["P2"].date_offset
    status, raw, headers = api.call("GET", "/api/v1/projects/study1/map?format=csv")
    assert status == 200 and headers.get_content_type() == "text/csv"
    rows = list(csv.DictReader(io.StringIO(raw.decode())))
    # quoted as CSV; a cell a spreadsheet would run as a formula starts with ' (a number does not)
    assert {r["patient_id"] for r in rows} == {"P1", "P2", "P,3\"", "'=1+2"} and rows[0]["issuer"] == "HOSP"
    assert all(int(r["date_offset"]) < 0 for r in rows)
    import urllib.request

    req = urllib.request.Request(api.url + "/api/v1/projects/study1/map?patient_id=P2",
                                 headers={"Accept": "text/csv", "Authorization": f"Bearer {_token('admin')}"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.headers.get_content_type() == "text/csv"
        assert resp.read().decode().splitlines()[1].startswith("HOSP,P2,")
    reads = _audit(api, action="map_read", project="study1")
    assert len(reads) == 4 and {e["actor"] for e in reads} == {"ada"}
    assert reads[0]["target"] == "csv: patient_id=P2" and reads[0]["patient_id"] == "P2"
    assert _audit(api, action="project_create")[0]["project"] == "study1"

    # with a map: derivations and deletion refused (409), the options still change
    status, body, _ = api.call("PATCH", "/api/v1/projects/study1", {"config": {"uid_root": "1.2.3"}})
    assert status == 409 and "has a map" in body["error"]["message"]
    assert api.call("PATCH", "/api/v1/projects/study1", {"config": {"options": {"dates": "keep"}}})[0] == 200
    status, body, _ = api.call("DELETE", "/api/v1/projects/study1")
    assert status == 409 and "has a map" in body["error"]["message"]
    assert api.call("GET", "/api/v1/projects/study1", role="read")[1]["patients"] == 4


def _token(role: str) -> str:
    from .test_api import TOKENS

    return TOKENS[role]


def test_api_without_the_secret_reads_but_cannot_create(tmp_path):
    from .test_api import Server

    s = Server(tmp_path)  # no PACSBRIDGE_DEID_SECRET
    try:
        status, body, _ = s.call("POST", "/api/v1/projects", {"name": "study1"})
        assert status == 409 and "PACSBRIDGE_DEID_SECRET" in body["error"]["message"], body
        assert s.call("GET", "/api/v1/projects", role="read")[1]["total"] == 0
        assert s.call("GET", "/api/v1/projects/study1", role="read")[0] == 404
    finally:
        s.close()


def test_api_refuses_to_start_with_a_wrong_secret(tmp_path):
    from pacsbridge.api import create_app
    from pacsbridge.shared.core.config import Settings

    settings = Settings(database_url=f"sqlite:///{tmp_path / 'idx.db'}", storage=tmp_path / "data",
                        deid_secret="a" * 40)
    app = create_app({"SETTINGS": settings})
    app.extensions["pacsbridge"].projects.create("study1", {}, b"a" * 40)
    app.extensions["pacsbridge"].close()
    with pytest.raises(DeidSecretError, match="study1"):
        create_app({"SETTINGS": settings.with_(deid_secret="b" * 40)})
    create_app({"SETTINGS": settings}).extensions["pacsbridge"].close()  # the right one starts


def test_cli_projects_over_the_api(api, tmp_path):
    from .test_api import PB

    def pb(*argv: str, role: str = "admin") -> subprocess.CompletedProcess:
        env = {**api.env, "PACSBRIDGE_API_URL": api.url, "PACSBRIDGE_API_TOKEN": _token(role)}
        return subprocess.run(PB + list(argv), env=env, capture_output=True, text=True, timeout=60)

    config = tmp_path / "p.json"
    config.write_text(json.dumps({"trial": {"protocol_id": "PROT-1"}, "pseudonyms": {"prefix": "FILE"}}))
    done = pb("projects", "add", "study1", "--config", str(config), "--dates", "shift", "--prefix", "ANON",
              "--digits", "8", "--uid-root", "1.2.826.0.1.3680043.10.999", "--retain-device-identity",
              "--risk", "structured_report=warn", "--description", "first", "--format", "json")
    assert done.returncode == 0, done.stderr
    made = json.loads(done.stdout)["config"]
    assert made["pseudonyms"]["prefix"] == "ANON" and made["trial"]["protocol_id"] == "PROT-1"  # options win
    assert made["options"]["retain_device_identity"] and made["risk"]["structured_report"] == "warn"
    assert made["uid_root"] == "1.2.826.0.1.3680043.10.999"
    # refused before sending (the model), and by the API (role)
    done = pb("projects", "add", "bad", "--digits", "2")
    assert done.returncode == 2 and "digits" in done.stderr
    done = pb("projects", "add", "other", role="user")
    assert done.returncode == 2 and "403" in done.stderr
    done = pb("projects", "set", "study1", "--no-retain-device-identity", "--max-days", "-5", "--format", "json")
    assert done.returncode == 0, done.stderr
    changed = json.loads(done.stdout)["config"]
    assert not changed["options"]["retain_device_identity"] and changed["date_shift"]["max_days"] == -5
    done = pb("projects", "list", "--format", "csv")
    assert done.returncode == 0 and "study1,first,shift,ANON+8 digits" in done.stdout
    done = pb("projects", "show", "study1")
    assert done.returncode == 0 and "trial.protocol_id" in done.stdout
    node = ("nodes", "add", "research", "--aet", "RES", "--host", "127.0.0.1", "--port", "104", "--no-identifiable")
    done = pb(*node, "--project", "nope")
    assert done.returncode == 2 and "no project called 'nope'" in done.stderr
    assert pb(*node, "--project", "study1").returncode == 0
    node_row = api.call("GET", "/api/v1/nodes/research", role="read")[1]
    assert node_row["project"] == "study1" and node_row["identifiable"] is False

    engine = create_engine(api.env["PACSBRIDGE_DATABASE_URL"])
    try:
        ident = ProjectStore(engine).open("study1", API_SECRET.encode()).identity
        pseudonym = ident.patient("", "P1").pseudonym
        ident.patient("", "P2")
    finally:
        engine.dispose()
    out = tmp_path / "map.csv"
    done = pb("projects", "map", "study1", "--output", str(out))
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader(out.open()))
    assert [r["patient_id"] for r in rows] == ["P1", "P2"] and rows[0]["pseudonym"] == pseudonym
    done = pb("projects", "map", "study1", "--pseudonym", pseudonym, "--format", "json")
    assert [r["patient_id"] for r in json.loads(done.stdout)["items"]] == ["P1"]
    done = pb("projects", "map", "study1", role="user")
    assert done.returncode == 2 and "403" in done.stderr
    assert [e["actor"] for e in _audit(api, project="study1", action="map_read_refused")] == ["uma"]
    assert len(_audit(api, project="study1", action="map_read")) == 2
    done = pb("projects", "delete", "study1")
    assert done.returncode == 2 and "has a map" in done.stderr
    assert pb("projects", "add", "empty").returncode == 0
    assert pb("projects", "delete", "empty").returncode == 0
    assert pb("projects", "show", "empty").returncode == 2
