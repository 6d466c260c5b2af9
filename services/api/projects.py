"""``/api/v1/projects`` and ``/api/v1/audit``: de-identification projects, their maps, and the audit.

Reading projects needs role ``read`` (the configuration is shown; the key and its check value never);
creating, changing and deleting them ``admin``. A project's map (original PatientID -> pseudonym) is
for admins only, as JSON or CSV, and **every read of it is audited** (``map_read``), and so is every
attempt by a lower token (``map_read_refused``, answered 403). The audit is admin-only too.

The API needs the de-identification secret (``PACSBRIDGE_DEID_SECRET``) only to create a project (its
key check value); without it, creating one answers 409 saying so, and the rest works.
See :mod:`pacsbridge.shared.deid.projects`.
"""

from __future__ import annotations

import csv
import io
import logging
from typing import Any

from flask import Blueprint, Response, g, request

from pacsbridge.shared.core.errors import DeidSecretError
from pacsbridge.shared.core.models import check
from pacsbridge.shared.deid.keys import secret
from pacsbridge.shared.deid.options import PROJECT_NAME_PATTERN
from pacsbridge.shared.deid.projects import Project

from .auth import Token, requires
from .contract import READ, WRITE, operation
from .errors import ApiError
from .models import (AuditArgs, AuditPage, MapArgs, MapPage, ProjectCreate, ProjectList, ProjectOut, ProjectPatch,
                     answer)
from .params import args, check_known, json_object, since_arg
from .state import state

__all__ = ["bp", "MAP_COLUMNS"]

log = logging.getLogger(__name__)

bp = Blueprint("projects", __name__)

#: The columns of the map's CSV, in order.
MAP_COLUMNS = ("issuer", "patient_id", "pseudonym", "date_offset", "first_used", "last_used")
_NAME = {"name": {"type": "string", "minLength": 1, "maxLength": 64, "pattern": PROJECT_NAME_PATTERN}}
#: What a configuration must satisfy that its schema cannot say.
CONFIG_RULES = ("config.date_shift: min_days is not after max_days, and they are not both 0 (`config.date_shift`)",)


def _path(name: str) -> str:
    return f"/api/v1/projects/{name}"


def _out(project: Project) -> dict[str, Any]:
    return answer(ProjectOut, {**project.to_dict(), "path": _path(project.name)})  # type: ignore[no-any-return]


def _actor() -> str:
    return str(g.get("token_name", "") or "?")


@bp.get("/projects")
@operation("List de-identification projects", "projects", {200: ("projects", ProjectList)})
def list_projects() -> dict[str, Any]:
    check_known(())
    found = state().projects.list()
    return answer(ProjectList, {"items": [_out(p) for p in found], "total": len(found)})  # type: ignore[no-any-return]


@bp.post("/projects")
@requires("admin")
@operation("Create a project", "projects", {201: ("created", ProjectOut)}, errors=WRITE + (409,), body=ProjectCreate,
           rules=CONFIG_RULES,
           description="409 when the name is taken (a project made again under another secret would be a new key: "
                       "refused), or when the API has no PACSBRIDGE_DEID_SECRET to make the project's key check "
                       "value with.")
def create_project() -> tuple[dict[str, Any], int, dict[str, str]]:
    check_known(())
    body = check(ProjectCreate, json_object())
    st = state()
    try:
        key_secret = secret(st.settings)
    except DeidSecretError as exc:
        raise ApiError(409, f"{exc}; creating a project needs it here (its key check value is made from it)") \
            from None
    project = st.projects.create(body.name, body.config, key_secret, body.description, _actor())
    st.projects.audit(_actor(), "project_create", project=project.name, detail=project.config.model_dump_json())
    return _out(project), 201, {"Location": _path(project.name)}


@bp.get("/projects/<name>")
@operation("Read a project", "projects", {200: ("the project", ProjectOut)}, errors=READ + (404,), path=_NAME)
def get_project(name: str) -> dict[str, Any]:
    check_known(())
    return _out(state().projects.get(name))


@bp.patch("/projects/<name>")
@requires("admin")
@operation("Change a project's description or configuration", "projects", {200: ("changed", ProjectOut)},
           errors=WRITE + (404, 409), body=ProjectPatch, path=_NAME,
           rules=("`config` is merged into the current configuration (objects key by key, lists and values "
                  "replaced), and the result must be a valid ProjectConfig (`config.<field>`)", *CONFIG_RULES),
           description="409 when the change touches uid_root, pseudonyms or date_shift while the project has a "
                       "map (its patients would get other pseudonyms, offsets or UIDs); more names appended to "
                       "pseudonyms.names are allowed.")
def update_project(name: str) -> dict[str, Any]:
    check_known(())
    st = state()
    st.projects.get(name)  # 404 before 400s about the body
    body = check(ProjectPatch, json_object())
    project = st.projects.update(name, config=body.config, description=body.description)
    st.projects.audit(_actor(), "project_change", project=name, detail=project.config.model_dump_json())
    return _out(project)


@bp.delete("/projects/<name>")
@requires("admin")
@operation("Delete a project", "projects", {204: ("deleted", None)}, errors=(400, 401, 403, 404, 409, 503),
           path=_NAME, description="409 while it has a map (the only way back to the originals) or a node names it.")
def delete_project(name: str) -> Response:
    check_known(())
    st = state()
    st.projects.delete(name)
    st.projects.audit(_actor(), "project_delete", project=name)
    return Response(status=204)


def _map_refused(token: Token) -> None:
    """A lower token asked for a map: audited before the 403."""
    name = (request.view_args or {}).get("name", "")
    query = request.query_string.decode("latin-1")[:255]
    log.warning("token %r (role %s) was refused the map of project %r", token.name, token.role, name)
    state().projects.audit(token.name, "map_read_refused", project=str(name)[:64], target=query,
                           detail=f"role {token.role}: answered 403")


#: Text cells a spreadsheet would run as a formula (OWASP "CSV injection"): a PatientID comes from
#: whatever a DICOM sender wrote, and the map's CSV is opened by people in spreadsheets.
_FORMULA = ("=", "+", "-", "@", "\t", "\r")


def _cell(value: Any) -> Any:
    """A text cell that starts like a formula gets a leading ``'`` (numbers are left as they are)."""
    return "'" + value if isinstance(value, str) and value.startswith(_FORMULA) else value


def _wants_csv(fmt: str | None) -> bool:
    if fmt:
        return fmt == "csv"
    best = request.accept_mimetypes.best_match(["application/json", "text/csv"])
    return best == "text/csv" and request.accept_mimetypes["text/csv"] > request.accept_mimetypes["application/json"]


@bp.get("/projects/<name>/map")
@requires("admin", refused=_map_refused)
@operation("Read a project's pseudonym map (audited)", "projects",
           {200: ("the map (JSON, or CSV with ?format=csv or Accept: text/csv)",
                  [MapPage, ("text/csv", {"type": "string"})])},
           errors=READ + (403, 404), path=_NAME, args=MapArgs,
           description="Original PatientID (and issuer) -> pseudonym and date offset, by first use; `patient_id` "
                       "and `pseudonym` search it. Every read is audited (`map_read`), and so is an attempt by a "
                       "token below admin (`map_read_refused`, 403). CSV: every matching row unless `limit` is given.")
def read_map(name: str) -> Any:
    a = args(MapArgs)
    st = state()
    as_csv = _wants_csv(a.format)
    limit = a.limit if (not as_csv or "limit" in request.args) else None
    rows, total = st.projects.map_rows(name, patient_id=a.patient_id or None, pseudonym=a.pseudonym or None,
                                       limit=limit, offset=a.offset)
    searched = ", ".join(f"{k}={v}" for k, v in (("patient_id", a.patient_id), ("pseudonym", a.pseudonym)) if v)
    st.projects.audit(_actor(), "map_read", project=name, patient_id=a.patient_id or "",
                      target=f"{'csv' if as_csv else 'json'}{': ' + searched if searched else ''}",
                      detail=f"{len(rows)} of {total} row(s), offset {a.offset}")
    if as_csv:
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(MAP_COLUMNS)
        writer.writerows([_cell(getattr(r, c)) for c in MAP_COLUMNS] for r in rows)
        return Response(out.getvalue(), mimetype="text/csv",
                        headers={"Content-Disposition": f'attachment; filename="{name}-map.csv"',
                                 "Cache-Control": "no-store"})
    return answer(MapPage, {"project": name, "items": [r._asdict() for r in rows], "total": total,  # type: ignore[no-any-return]
                            "limit": a.limit, "offset": a.offset})


@bp.get("/audit")
@requires("admin")
@operation("Read the audit, newest first", "projects", {200: ("a page of entries", AuditPage)},
           errors=READ + (403,), args=AuditArgs, rules=AuditArgs.rules,
           description="Every read of a map (and refused attempt), every change of a project, and every way out "
                       "of data (push, repack, export, download) as the jobs record them. Append-only.")
def read_audit() -> dict[str, Any]:
    a = args(AuditArgs)
    items, total = state().projects.audit_rows(action=a.action or None, project=a.project or None,
                                               actor=a.actor or None, since=since_arg(), limit=a.limit,
                                               offset=a.offset)
    return answer(AuditPage, {"items": [e._asdict() for e in items], "total": total,  # type: ignore[no-any-return]
                              "limit": a.limit, "offset": a.offset})
