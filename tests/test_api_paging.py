"""Keyset paging of the index's list routes (issue 19): the ``next`` cursor walks every row exactly once
while rows are being inserted, a bad cursor is a 400, ``total`` is bounded. On SQLite and the real
PostgreSQL (the ``db_url`` fixture), through Flask's test client on the real app."""

from __future__ import annotations

import base64
import json
import random
from pathlib import Path
from typing import Any

import pytest

from pacsbridge.api import browse
from pacsbridge.shared.core import keyset
from pacsbridge.shared.index.importer import Importer
from pacsbridge.shared.index.quarantine import Quarantine

from .helpers import make_instance
from .test_api import api_settings, app, assert_error, auth, client  # noqa: F401  (fixtures)

ROOT = "1.2.826.0.1.3680043.8.498.77"
KEYS = {"patients": "PatientID", "studies": "StudyInstanceUID", "series": "SeriesInstanceUID",
        "instances": "SOPInstanceUID"}


def _write(folder: Path, numbers: list[int]) -> None:
    """Instance ``n``: study n // 3 (of patient study % 5), its own series and SOP; UIDs in no order of n
    (a scrambled or random prefix), so that new rows land before and after any reader's place."""
    for n in numbers:
        tail, study = random.randrange(10**6), n // 3
        make_instance(folder / f"{n}.dcm", PatientID=f"PP{study % 5}",
                      StudyInstanceUID=f"{ROOT}.1.{study * 62 % 97}.{study}",
                      SeriesInstanceUID=f"{ROOT}.2.{tail}.{n}", SOPInstanceUID=f"{ROOT}.3.{tail}.{n}",
                      StudyDate=f"202401{1 + study % 28:02d}")


def _import(ctx: Any, folder: Path) -> None:
    report = Importer(ctx.index, ctx.storage, workers=1).import_paths([folder])
    assert not report.rejected


def _page(client: Any, resource: str, **query: Any) -> dict[str, Any]:
    resp = client.get(f"/api/v1/{resource}", query_string=query, headers=auth("read"))
    assert resp.status_code == 200, resp.get_data(as_text=True)
    return resp.get_json()  # type: ignore[no-any-return]


@pytest.mark.parametrize("resource", ["studies", "series", "instances"])
def test_the_cursor_gives_every_row_once_while_rows_arrive(client, app, tmp_path, resource):  # noqa: F811
    ctx = app.extensions["pacsbridge"].ctx
    random.seed(19)
    _write(tmp_path / "first", list(range(40)))
    _import(ctx, tmp_path / "first")
    key = KEYS[resource]
    there = {row[key] for row in _page(client, resource, limit=1000)["items"]}
    assert len(there) >= 13

    seen: list[str] = []
    page = _page(client, resource, limit=4)
    batch = 0
    while True:
        seen += [row[key] for row in page["items"]]
        assert len(page["items"]) <= 4
        if page["next"] is None:
            break
        batch += 1
        if batch <= 5:  # rows arrive between pages: before and after the reader's place
            folder = tmp_path / f"more{batch}"
            _write(folder, list(range(100 * batch, 100 * batch + 6)))
            _import(ctx, folder)
        page = _page(client, resource, limit=4, cursor=page["next"])
    assert len(seen) == len(set(seen)), "a row came twice"
    assert there <= set(seen), "a row that was there from the start was missed"


def test_the_cursor_keeps_the_filters_and_offset_pages_still_work(client, app, tmp_path):  # noqa: F811
    ctx = app.extensions["pacsbridge"].ctx
    _write(tmp_path / "in", list(range(30)))
    _import(ctx, tmp_path / "in")
    every = _page(client, "series", PatientID="PP2", limit=1000)  # studies 2 and 7: instances 6-8, 21-23
    assert every["total"] == 6 and every["next"] is None
    walked, page = [], _page(client, "series", PatientID="PP2", limit=4)
    while True:
        walked += page["items"]
        assert page["total"] == 6
        if not page["next"]:
            break
        page = _page(client, "series", PatientID="PP2", limit=4, cursor=page["next"])
    assert walked == every["items"]
    by_offset = _page(client, "series", PatientID="PP2", limit=4, offset=4)["items"]
    assert by_offset == every["items"][4:]
    dated = _page(client, "studies", StudyDate="20240101-20240110", limit=2)
    assert dated["next"] and all("20240101" <= s["StudyDate"] <= "20240110" for s in dated["items"])


def test_total_is_counted_up_to_the_cap_or_exactly_when_asked(client, app, tmp_path, monkeypatch):  # noqa: F811
    ctx = app.extensions["pacsbridge"].ctx
    _write(tmp_path / "in", list(range(12)))
    _import(ctx, tmp_path / "in")
    assert _page(client, "instances", limit=5)["total"] == 12
    monkeypatch.setattr(browse, "TOTAL_CAP", 10)  # the cap is 10,000: too many files to make here
    capped = _page(client, "instances", limit=5)
    assert capped["total"] is None and len(capped["items"]) == 5 and capped["next"]
    assert _page(client, "instances", limit=5, total="exact")["total"] == 12
    assert _page(client, "instances", PatientID="PP1", limit=5)["total"] == 3  # study 1: under the cap


def _b64(value: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


def test_a_bad_cursor_or_a_deep_offset_is_a_clear_400(client, app, tmp_path):  # noqa: F811
    ctx = app.extensions["pacsbridge"].ctx
    _write(tmp_path / "in", list(range(12)))  # 4 studies
    _import(ctx, tmp_path / "in")
    good = _page(client, "studies", limit=2)["next"]
    other_list = _page(client, "studies", StudyDate="20240101-", limit=1)
    assert good and other_list["next"]
    scope = keyset.scope("studies", [])
    bad = ["not a cursor!", "%%%", "x" * 600, _b64({"a": 1}), _b64([1, scope]), _b64([2, scope, ["1.2"]]),
           _b64([1, scope, [3]]), _b64([1, scope, ["1.2", "3"]]), _b64([1, scope, [None]]),
           base64.urlsafe_b64encode(b"\xff\xfe").decode()]
    for cursor in bad:
        err = assert_error(client.get("/api/v1/studies", query_string={"cursor": cursor}, headers=auth("read")),
                           400, "cursor")
        assert "cursor" in err["message"], cursor
    # a cursor of one list is refused by another (same resource, other filters; or another resource)
    assert_error(client.get("/api/v1/studies", query_string={"cursor": other_list["next"]},
                            headers=auth("read")), 400, "cursor")
    assert_error(client.get("/api/v1/series", query_string={"cursor": good}, headers=auth("read")), 400, "cursor")
    assert_error(client.get("/api/v1/studies", query_string={"cursor": good, "offset": 2}, headers=auth("read")),
                 400, "offset")
    err = assert_error(client.get("/api/v1/studies", query_string={"offset": 10_001}, headers=auth("read")),
                       400, "offset")
    assert "cursor" in err["message"]
    assert _page(client, "studies", offset=10_000)["items"] == []
    assert_error(client.get("/api/v1/studies", query_string={"total": "all"}, headers=auth("read")), 400, "total")
    # a cursor that fits still works after all that: nothing was changed by the refusals
    assert len(_page(client, "studies", limit=2, cursor=good)["items"]) == 2


def _walk(client: Any, path: str, limit: int, between: Any = None, **query: Any) -> list[dict[str, Any]]:
    """Every item of a list, page by page through ``next``; ``between()`` runs after each page."""
    out: list[dict[str, Any]] = []
    page = _page(client, path, limit=limit, **query)
    while True:
        out += page["items"]
        if not page["next"]:
            return out
        if between is not None:
            between()
        page = _page(client, path, limit=limit, cursor=page["next"], **query)


def test_jobs_and_quarantine_page_by_cursor_newest_first_while_rows_arrive(client, app):  # noqa: F811
    st = app.extensions["pacsbridge"]
    made = [st.jobs.submit("import", {"path": f"batch-{i}"})[0].id for i in range(9)]
    extra = iter(range(100, 200))
    arrived: list[str] = []
    jobs = _walk(client, "jobs", 2, lambda: arrived.append(st.jobs.submit("import", {"path": f"b{next(extra)}"})[0].id))
    ids = [j["id"] for j in jobs]
    assert len(ids) == len(set(ids)) and set(made) <= set(ids) and len(arrived) == 4
    assert [j["created_at"] for j in jobs] == sorted((j["created_at"] for j in jobs), reverse=True)
    assert _page(client, "jobs", limit=3, state="queued")["total"] == 13
    mine = _walk(client, "jobs", 2, kind="import", state="queued")
    assert [j["id"] for j in mine] == [j["id"] for j in _page(client, "jobs", limit=100, state="queued")["items"]]

    store = Quarantine(st.ctx.index.engine)
    first = [store.add("index_failed", f".quarantine/x{i}.dcm", "refused") for i in range(7)]
    more = iter(range(50, 99))
    entries = _walk(client, "quarantine", 3,
                    lambda: store.add("index_failed", f".quarantine/y{next(more)}.dcm", "refused"))
    got = [e["id"] for e in entries]
    assert len(got) == len(set(got)) and set(first) <= set(got)
    assert_error(client.get("/api/v1/quarantine", query_string={"cursor": "garbage!"}, headers=auth("read")),
                 400, "cursor")
    jobs_cursor = _page(client, "jobs", limit=1)["next"]
    assert_error(client.get("/api/v1/quarantine", query_string={"cursor": jobs_cursor}, headers=auth("read")),
                 400, "cursor")
    assert_error(client.get("/api/v1/jobs", query_string={"cursor": jobs_cursor, "offset": 1},
                            headers=auth("read")), 400, "offset")
    assert_error(client.get("/api/v1/jobs", query_string={"offset": 10_001}, headers=auth("read")), 400, "offset")
    assert _page(client, "jobs", limit=1, total="exact")["total"] == 13
