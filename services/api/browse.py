"""``/api/v1/patients|studies|series|instances``: browse the Conquest index.

Items are the index rows, keyed by DICOM keyword (``PatientName``, not
Conquest's ``PatientNam``; a ``dicom.sql`` name when the tag has no keyword),
ordered by their key. Every column of a level is a filter, by keyword:

- exact match (``?PatientID=PAT1``, ``?Modality=CT``);
- text columns take ``*`` and ``?`` wildcards, case-insensitive (``?PatientName=smith*``);
- UID columns take UIDs only (digits and dots, anything else is a 400);
- date columns take a DICOM range: ``20240101``, ``20240101-20241231``, ``20240101-``, ``-20241231``.

Besides: ``studies?Modality=CT`` matches a modality among the study's (StudyModality,
``CT\\RTSTRUCT``); ``instances?StudyInstanceUID=`` goes through the series table.
Paging (docs/api.md, "Paging"): ``limit`` (1..1000, default 100); the answer's ``next`` is a cursor
for the following page (``?cursor=``, same filters), null on the last. A keyset page costs the same
at any depth; ``offset`` still works up to 10,000 (deeper is a 400 that points at the cursor).
``total`` counts the matches up to 10,000 and is null beyond, unless ``total=exact`` asks for a
full count (a scan of every match).
Values are always bound parameters: a quote or SQL in a filter is just text that
matches nothing.

``GET /instances/{sop}/file`` sends the stored file (``application/dicom``), after
checking that its path, links resolved, is inside the storage root.
"""

from __future__ import annotations

import mmap
import os
import re
from pathlib import Path
from typing import Any

from flask import Blueprint, Response, g, request, send_file
from pydicom.datadict import keyword_for_tag
from sqlalchemy import and_, literal, or_, select
from werkzeug.security import safe_join

from pacsbridge.shared.core import keyset
from pacsbridge.shared.core.errors import Conflict, InvalidRequest, NotFound, UnsafePath
from pacsbridge.shared.deid.keys import secret
from pacsbridge.shared.deid.outgoing import Outgoing, audit_identifiable
from pacsbridge.shared.deid.profile import DeidentifyError
from pacsbridge.shared.index.records import read_header
from pacsbridge.shared.index.conquest import Index

from . import models
from .contract import READ, operation
from .models import MAX_LIMIT, FileArgs, IndexPage, IndexRow, PageArgs, answer
from .params import args, check_known, paging
from .state import state

__all__ = ["bp", "RESOURCES", "FILTERS"]

bp = Blueprint("browse", __name__)

#: URL resource -> index level.
RESOURCES = {"patients": "Patient", "studies": "Study", "series": "Series", "instances": "Image"}

#: Filters listed in the OpenAPI document (with the shipped dicom.sql every column works).
FILTERS = {
    "patients": ("PatientID", "PatientName", "PatientBirthDate", "PatientSex"),
    "studies": ("PatientID", "PatientName", "StudyInstanceUID", "AccessionNumber", "StudyDate",
                "StudyDescription", "Modality"),
    "series": ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "Modality", "SeriesDescription",
               "SeriesDate", "SeriesNumber"),
    "instances": ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"),
}

#: Query parameters of a page (the others are filters).
_PAGING = ("limit", "offset", "cursor", "total")
#: ``total`` is counted up to this many matches (null beyond, unless ``total=exact``).
TOTAL_CAP = models.TOTAL_CAP
#: The deepest ``offset``: deeper pages are read with the cursor (an offset makes the database skip rows).
MAX_OFFSET = models.MAX_OFFSET

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_DATE_RANGE = re.compile(r"^(?P<lo>[0-9]{8})?(?P<dash>-)?(?P<hi>[0-9]{8})?$")
_MODALITY = re.compile(r"^[A-Z0-9 _]{1,16}$")
_STUDY_MODALITY, _STUDY_UID = 0x00080061, 0x0020000D


def _keyword(col: Any) -> str:
    return keyword_for_tag(col.tag) or col.name


def _level_columns(index: Index, level: str) -> dict[str, Any]:
    """``{keyword: dicom.sql Column}`` of one level."""
    out: dict[str, Any] = {}
    for col in index.schema[level].columns:
        out.setdefault(_keyword(col), col)
    return out


def _escape_like(value: str) -> str:
    return value.replace("!", "!!").replace("%", "!%").replace("_", "!_")


def _condition(column: Any, col: Any, name: str, value: str) -> Any:
    """The WHERE clause for one filter on one dicom.sql column."""
    if col.dicom_type == "DT_UI":
        if len(value) > 64 or not _UID.match(value):
            raise InvalidRequest(f"{value[:80]!r} is not a DICOM UID (digits and dots)", name)
        return column == value
    if col.sql_type == "SQL_C_DATE" or col.dicom_type == "DT_DATE":
        m = _DATE_RANGE.match(value)
        if not m or not (m["lo"] or m["hi"]) or (m["lo"] and m["hi"] and not m["dash"]):
            raise InvalidRequest("a date YYYYMMDD or a range YYYYMMDD-YYYYMMDD, YYYYMMDD-, -YYYYMMDD", name)
        if not m["dash"]:
            return column == m["lo"]
        parts = []
        if m["lo"]:
            parts.append(column >= m["lo"])
        if m["hi"]:
            parts.append(column <= m["hi"])
        return and_(*parts)
    if len(value) > col.length or re.search(r"[\x00-\x1f\x7f\\]", value):
        raise InvalidRequest(f"at most {col.length} printable characters, no backslash", name)
    if "*" in value or "?" in value:
        pattern = _escape_like(value).replace("*", "%").replace("?", "_")
        return column.ilike(pattern, escape="!")
    return column == value


def _list(resource: str, single_key: str | None = None) -> dict[str, Any]:
    level = RESOURCES[resource]
    st = state()
    index = st.ctx.index
    table: Any = index.tables[level]
    cols = _level_columns(index, level)
    extra: set[str] = set()
    if level == "Study":
        extra.add("Modality")
    if level == "Image":
        extra.add("StudyInstanceUID")
    allowed = set(cols) | extra | set(_PAGING)
    if single_key is None:
        check_known(allowed)
    else:
        check_known(())
    limit, offset = paging()
    cursor, exact = _page_args(offset)
    key = index.schema[level].key.column
    conditions = []
    joins = table
    filters = {} if single_key is not None else {k: v for k, v in request.args.items()
                                                     if k not in _PAGING and v != ""}
    if single_key is not None:
        filters[_keyword(index.schema[level].key)] = single_key
    for name, value in filters.items():
        if name in cols:
            col = cols[name]
            if level == "Study" and name == "Modality":
                pass  # Study has no Modality column in the shipped dicom.sql; see below
            else:
                conditions.append(_condition(table.c[col.column], col, name, value))
                continue
        if level == "Study" and name == "Modality":
            sm = index.schema["Study"].by_tag(_STUDY_MODALITY)
            if sm is None:
                raise InvalidRequest("this dicom.sql has no StudyModality column", name)
            if not _MODALITY.match(value):
                raise InvalidRequest(f"{value[:80]!r} is not a modality code (e.g. CT, MR)", name)
            c, v = table.c[sm.column], _escape_like(value)
            conditions.append(or_(c == value, c.like(f"{v}\\%", escape="!"), c.like(f"%\\{v}", escape="!"),
                                  c.like(f"%\\{v}\\%", escape="!")))
        elif level == "Image" and name == "StudyInstanceUID":
            series = index.tables["Series"]
            skey = index.schema["Series"].key.column
            slink = index.schema["Series"].parent
            ilink = index.schema["Image"].parent
            assert slink is not None and ilink is not None
            joins = table.join(series, series.c[skey] == table.c[ilink.column])
            conditions.append(_condition(series.c[slink.column], slink, name, value))
    where = and_(*conditions) if conditions else None
    columns = [table.c[c.column].label(k) for k, c in cols.items()]
    stmt = select(*columns).select_from(joins)
    if where is not None:
        stmt = stmt.where(where)
    where_from = keyset.scope(resource, sorted(filters.items()))
    if cursor:
        stmt = stmt.where(table.c[key] > keyset.decode(cursor, where_from, (str,))[0])
    stmt = stmt.order_by(table.c[key]).limit(limit + 1).offset(offset)
    with index.engine.connect() as conn:
        rows = [dict(r._mapping) for r in conn.execute(stmt)]
        total = None if single_key is not None else _total(conn, joins, where, exact)
    more = len(rows) > limit
    rows = rows[:limit]
    key_kw = _keyword(index.schema[level].key)
    for row in rows:
        for k, v in row.items():
            if isinstance(v, str):
                row[k] = v.rstrip() if k != key_kw else v
        if level == "Image":
            row["file"] = f"/api/v1/instances/{row[key_kw]}/file"
        if level != "Patient":
            row["path"] = f"/api/v1/{resource}/{row[key_kw]}"
    nxt = keyset.encode(where_from, [rows[-1][key_kw]]) if more else None
    return {"items": rows, "total": total, "limit": limit, "offset": offset, "next": nxt}


def _page_args(offset: int) -> tuple[str, bool]:
    """``cursor`` and ``total=exact``; a deep ``offset`` is refused: the cursor pages at any depth."""
    cursor = request.args.get("cursor", "")
    raw_total = request.args.get("total", "")
    if raw_total not in ("", "exact"):
        raise InvalidRequest("expected exact (count every match) or nothing (counted up to "
                             f"{TOTAL_CAP:,}; null beyond)", "total")
    if offset > MAX_OFFSET:
        raise InvalidRequest(f"at most {MAX_OFFSET:,}: page deeper with `cursor` (the `next` of each page)", "offset")
    if cursor and offset:
        raise InvalidRequest("give `cursor` or `offset`, not both (the cursor says where the page starts)", "offset")
    return cursor, raw_total == "exact"


def _total(conn: Any, joins: Any, where: Any, exact: bool) -> int | None:
    """How many rows match: counted exactly with ``total=exact`` (a scan of every match: seconds over
    millions), else counted up to :data:`TOTAL_CAP` and None beyond (a bounded index scan)."""
    rows = select(literal(1)).select_from(joins)
    if where is not None:
        rows = rows.where(where)
    return keyset.count(conn, rows, None if exact else TOTAL_CAP)


_UID_SCHEMA: dict[str, Any] = {"type": "string", "maxLength": 64, "pattern": r"^([0-9]+(\.[0-9]+)*)?$"}
_DATE_SCHEMA: dict[str, Any] = {"type": "string", "pattern": r"^([0-9]{8}|[0-9]{8}-|-[0-9]{8}|[0-9]{8}-[0-9]{8})?$"}


def _filters(resource: str) -> list[dict[str, Any]]:
    """The filters of ``resource`` listed in the document, each as the index's own dicom.sql column takes it
    (its length, whether it holds UIDs or dates): made when the document is asked for."""
    index = state().ctx.index
    level = RESOURCES[resource]
    cols = _level_columns(index, level)
    if level == "Image":
        series = _level_columns(index, "Series")
        cols.setdefault("StudyInstanceUID", series.get("StudyInstanceUID"))
    out = []
    for name in FILTERS[resource]:
        col = cols.get(name)
        if level == "Study" and name == "Modality":
            schema, text = {"type": "string", "pattern": r"^([A-Z0-9 _]{1,16})?$"}, \
                "a modality among the study's (StudyModality)"
        elif col is None:
            continue
        elif col.dicom_type == "DT_UI":
            schema, text = dict(_UID_SCHEMA), "exact UID"
        elif col.sql_type == "SQL_C_DATE" or col.dicom_type == "DT_DATE":
            schema, text = dict(_DATE_SCHEMA), "DICOM date or range (20240101-20241231, 20240101-, -20241231)"
        else:
            schema = {"type": "string", "maxLength": col.length, "pattern": r"^[^\\\x00-\x1f\x7f]*$"}
            text = "exact, or with * and ? wildcards (case-insensitive)"
        out.append({"name": name, "in": "query", "description": text, "schema": schema})
    page = PageArgs.model_json_schema()["properties"]
    out += [{"name": k, "in": "query", "schema": {key: v for key, v in page[k].items() if key != "title"}}
            for k in ("limit",)]
    out += [{"name": "offset", "in": "query", "description": f"rows to skip, at most {MAX_OFFSET:,} (deeper: cursor)",
             "schema": {"type": "integer", "minimum": 0, "maximum": MAX_OFFSET}},
            {"name": "cursor", "in": "query", "description": "the `next` of the page before (same filters)",
             "schema": {"type": "string", "maxLength": keyset.MAX_CURSOR, "pattern": r"^[A-Za-z0-9_-]*$"}},
            {"name": "total", "in": "query", "description": f"exact: count every match (else up to {TOTAL_CAP:,}, "
                                                            "null beyond)",
             "schema": {"type": "string", "enum": ["exact", ""]}}]
    return out


_SOP = {"uid": {"type": "string", "maxLength": 64, "pattern": r"^[0-9]+(\.[0-9]+)*$"}}


def _browse(resource: str) -> Any:
    return operation(f"Browse {resource} in the index", "index", {200: ("a page of index rows", IndexPage)},
                     params=lambda: _filters(resource),
                     description=f"Every column of the level is a filter (by DICOM keyword; those listed are the "
                                 f"usual ones); limit 1 to {MAX_LIMIT}; `next` is the cursor of the "
                                 f"following page; `total` is null beyond {TOTAL_CAP:,} matches unless total=exact.",
                     rules=models.CURSOR_RULES)


def _single(resource: str) -> Any:
    return operation(f"One of the {resource}", "index", {200: ("the index row", IndexRow)}, errors=READ + (404,),
                     path=_SOP)


def _one(resource: str, uid: str) -> dict[str, Any]:
    out = _list(resource, single_key=uid)
    if not out["items"]:
        raise NotFound(f"no {resource.rstrip('s') if resource != 'series' else 'series'} {uid!r} in the index")
    return out["items"][0]  # type: ignore[no-any-return]


@bp.get("/patients")
@_browse("patients")
def patients() -> dict[str, Any]:
    return answer(IndexPage, _list("patients"))  # type: ignore[no-any-return]


@bp.get("/studies")
@_browse("studies")
def studies() -> dict[str, Any]:
    return answer(IndexPage, _list("studies"))  # type: ignore[no-any-return]


@bp.get("/studies/<uid>")
@_single("studies")
def study(uid: str) -> dict[str, Any]:
    return answer(IndexRow, _one("studies", uid))  # type: ignore[no-any-return]


@bp.get("/series")
@_browse("series")
def series_list() -> dict[str, Any]:
    return answer(IndexPage, _list("series"))  # type: ignore[no-any-return]


@bp.get("/series/<uid>")
@_single("series")
def series_one(uid: str) -> dict[str, Any]:
    return answer(IndexRow, _one("series", uid))  # type: ignore[no-any-return]


@bp.get("/instances")
@_browse("instances")
def instances() -> dict[str, Any]:
    return answer(IndexPage, _list("instances"))  # type: ignore[no-any-return]


@bp.get("/instances/<uid>")
@_single("instances")
def instance(uid: str) -> dict[str, Any]:
    return answer(IndexRow, _one("instances", uid))  # type: ignore[no-any-return]


@bp.get("/instances/<uid>/file")
@operation("Download the stored file", "index",
           {200: ("the file as received, or de-identified under `project`",
                  ("application/dicom", {"type": "string", "format": "binary"}))},
           errors=READ + (404, 409), path=_SOP, args=FileArgs)
def instance_file(uid: str) -> Response:
    """The stored file as it was received (``application/dicom``), or, with ``?project=``, de-identified
    under that project (made in memory; its new UIDs recorded in the project's map). Every download is
    audited: who, which patient and study, de-identified or not."""
    a = args(FileArgs)
    if len(uid) > 64 or not _UID.match(uid):
        raise InvalidRequest(f"{uid[:80]!r} is not a DICOM UID (digits and dots)", "sop")
    st = state()
    found = st.ctx.index.lookup_sop([uid])
    if uid not in found:
        raise NotFound(f"no instance {uid!r} in the index")
    relpath, device = found[uid]
    if device != "MAG0" or not relpath:
        raise NotFound(f"instance {uid!r} is indexed outside the storage root ({device}); not served")
    root = st.ctx.storage.root
    joined = safe_join(str(root), relpath)
    if joined is None:
        raise NotFound(f"instance {uid!r}: its indexed path is not inside the storage root; not served")
    try:
        path = st.ctx.storage.absolute(relpath)
    except UnsafePath:
        raise NotFound(f"instance {uid!r}: its indexed path is not inside the storage root; not served") from None
    real, real_root = Path(os.path.realpath(path)), Path(os.path.realpath(root))
    if real_root not in real.parents:
        raise NotFound(f"instance {uid!r}: its file resolves outside the storage root; not served")
    if not real.is_file():
        raise NotFound(f"instance {uid!r}: the file is gone from storage (run `pacsbridge rebuild --prune`)")
    projects = st.projects
    actor = getattr(g, "token_name", "") or ""
    if a.project:
        outgoing = Outgoing(projects.open(a.project, secret(st.ctx.settings)), actor, "download", "API client")
        try:
            made = outgoing(str(real))
        except DeidentifyError as exc:
            raise InvalidRequest(f"instance {uid!r} cannot be de-identified: {exc}", "sop") from None
        finally:
            outgoing.close()
        if made.data is None:
            raise Conflict(f"instance {uid!r} is withheld by project {a.project!r}'s risk policy "
                           f"({made.action}): {made.reason}")
        return Response(made.data, mimetype="application/dicom", headers={
            "Content-Disposition": f'attachment; filename="{made.sop_uid}.dcm"', "Cache-Control": "no-store"})
    with open(real, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        header = read_header(mm, str(real), (0x00100020, 0x0020000D))  # PatientID, StudyInstanceUID
    audit_identifiable(projects, actor, "download", "API client",
                       [(str(header.get("PatientID") or ""), str(header.get("StudyInstanceUID") or ""))])
    return send_file(real, mimetype="application/dicom", as_attachment=True, download_name=f"{uid}.dcm",
                     conditional=True, etag=True, max_age=0)
