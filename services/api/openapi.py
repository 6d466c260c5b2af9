"""The OpenAPI 3 document of the API, written by hand, served at ``/api/v1/openapi.json``.

It is checked by schemathesis in the tests (``tests/test_api.py``): every
route, body and answer here must match what the code does.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint

from pacsbridge import __version__
from pacsbridge.shared.jobs.store import KINDS, STATES

from .auth import requires
from .browse import FILTERS
from .params import SINCE_PATTERN

__all__ = ["bp", "document"]

bp = Blueprint("openapi", __name__)

_TEXT = r"^[^\x00-\x1f\x7f]*$"
_QTEXT = r"^ *[^\\\x00-\x1f\x7f]{0,64} *$"
_UID = r"^[0-9]+(\.[0-9]+)*$"
_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
_AET = r"^ {0,15}[\x21-\x5b\x5d-\x7e][\x20-\x5b\x5d-\x7e]{0,15}$"
_DATE = (r"^((1[0-9]|20)[0-9][0-9](0[1-9]|1[0-2])(0[1-9]|1[0-9]|2[0-8])"
         r"|(1[0-9]|20)[0-9][0-9]-(0[1-9]|1[0-2])-(0[1-9]|1[0-9]|2[0-8]))?$")
_REL = r"^(?!/)(?!.*(^|/)\.\.(/|$))(?=.*[^ ])[^\x00-\x1f\x7f\\]{1,255}$"
_JOB_ID = r"^[0-9a-f]{32}$"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    return {str(c): {"$ref": f"#/components/responses/E{c}"} for c in codes}


_ERROR_TEXT = {
    400: "Bad request: malformed JSON, unknown field or parameter, wrong type or value, a control character "
         "(NUL ...) or bytes that are not UTF-8 in a path or query parameter, a lone surrogate in the body "
         "(`field` names it)",
    401: "No token, an unknown or expired token",
    403: "The token's role may not do this",
    404: "No such resource",
    405: "Method not allowed on this path",
    409: "Conflicts with the current state",
    413: "The body is larger than 1 MB",
    415: "The body is not application/json",
    502: "The DICOM peer refused, failed or could not be reached",
    503: "The index database is unavailable",
}

_UIDS = {"nullable": True, "anyOf": [
    {"type": "string", "maxLength": 64, "pattern": r"^([0-9]+(\.[0-9]+)*)?$"},
    {"type": "array", "maxItems": 1000, "items": {"type": "string", "maxLength": 64, "pattern": _UID}}]}

_QUERY_PROPS: dict[str, Any] = {
    "level": {"type": "string", "enum": ["patient", "study", "series", "image",
                                         "PATIENT", "STUDY", "SERIES", "IMAGE"], "default": "study"},
    **{k: {"type": "string", "nullable": True, "pattern": _QTEXT}
       for k in ("PatientID", "PatientName", "AccessionNumber", "StudyDescription")},
    "Modality": {"type": "string", "nullable": True, "pattern": r"^ *[A-Z0-9 _]{0,16} *$"},
    "StudyInstanceUID": _UIDS, "SeriesInstanceUID": _UIDS, "SOPInstanceUID": _UIDS,
    "min_study_date": {"type": "string", "nullable": True, "pattern": _DATE,
                       "description": "YYYYMMDD or YYYY-MM-DD"},
    "max_study_date": {"type": "string", "nullable": True, "pattern": _DATE},
    "include_fields": {"type": "array", "maxItems": 50,
                       "items": {"type": "string", "enum": ["PatientAge", "PatientSex", "ReferringPhysicianName",
                                                           "InstitutionName", "BodyPartExamined",
                                                           "StationName", "Manufacturer"]},
                       "description": "extra DICOM keywords to return (any non-sequence keyword is accepted)"},
}

_NODE_PROPS: dict[str, Any] = {
    "name": {"type": "string", "pattern": _NAME},
    "ae_title": {"type": "string", "pattern": _AET, "maxLength": 16},
    "host": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": r"^[A-Za-z0-9.:_-]+$"},
    "port": {"type": "integer", "minimum": 1, "maximum": 65535},
    "retrieve": {"type": "string", "enum": ["move", "get"], "default": "move"},
    "move_destination": {"type": "string", "pattern": r"^([\x20-\x5b\x5d-\x7e]{1,16})?$",
                         "description": "C-MOVE destination AE ('' = our own AE title)"},
    "allow_find": {"type": "boolean"}, "allow_move": {"type": "boolean"},
    "allow_get": {"type": "boolean"}, "allow_store": {"type": "boolean"},
    "max_associations": {"type": "integer", "minimum": 1, "maximum": 64},
    "max_rate": {"type": "number", "minimum": 0, "description": "instances/s, 0 = unlimited"},
    "move_window": {"type": "string",
                    "pattern": r"^(([01][0-9]|2[0-3]):[0-5][0-9]-([01][0-9]|2[0-3]):[0-5][0-9])?$",
                    "description": "HH:MM-HH:MM when C-MOVE is allowed ('' = any time)"},
    "description": {"type": "string", "maxLength": 255, "pattern": _TEXT},
}

_SELECTION = {
    "type": "object", "minProperties": 1, "maxProperties": 1, "additionalProperties": False,
    "properties": {
        "PatientID": {"anyOf": [
            {"type": "string", "minLength": 1, "maxLength": 64, "pattern": r"^[^\\\x00-\x1f\x7f*?]+$"},
            {"type": "array", "minItems": 1, "maxItems": 10000,
             "items": {"type": "string", "minLength": 1, "maxLength": 64, "pattern": r"^[^\\\x00-\x1f\x7f*?]+$"}}]},
        **{k: {"anyOf": [{"type": "string", "maxLength": 64, "pattern": _UID},
                         {"type": "array", "minItems": 1, "maxItems": 10000,
                          "items": {"type": "string", "maxLength": 64, "pattern": _UID}}]}
           for k in ("StudyInstanceUID", "SeriesInstanceUID")},
        "job": {"type": "string", "pattern": _JOB_ID},
    },
    "description": "exactly one of PatientID, StudyInstanceUID, SeriesInstanceUID (a value or a list) or job "
                   "(what a retrieve job brought)",
}

_WEBHOOK = {"type": "string", "nullable": True, "maxLength": 2048, "pattern": r"^(https?://[^/?#\x00-\x20\x7f]+.*)?$",
            "description": "called with the finished job (POST, JSON, signed: X-Pacsbridge-Signature); only a "
                           "destination in PACSBRIDGE_WEBHOOK_ALLOW, else 400"}


def _job_request(kind: str, props: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {"type": "object", "additionalProperties": False, "required": ["kind", *required],
            "properties": {"kind": {"type": "string", "enum": [kind]}, **props, "webhook": _WEBHOOK}}


_NODE_REF = {"type": "string", "minLength": 1, "maxLength": 64, "description": "name of a configured node"}

SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object", "required": ["error"], "additionalProperties": False,
        "properties": {"error": {
            "type": "object", "required": ["status", "message", "path"],
            "properties": {
                "status": {"type": "integer"}, "message": {"type": "string"},
                "field": {"type": "string", "description": "the input field to blame, if one is"},
                "path": {"type": "string"},
                "dimse_status": {"type": "integer", "description": "the DIMSE status a peer answered (502)"},
            }}},
    },
    "NodeInput": {"type": "object", "additionalProperties": False, "required": ["name", "ae_title", "host", "port"],
                  "properties": _NODE_PROPS},
    "NodeReplace": {"type": "object", "additionalProperties": False, "required": ["ae_title", "host", "port"],
                    "properties": _NODE_PROPS,
                    "description": "every field; those left out take their defaults; name, if given, must match"},
    "NodePatch": {"type": "object", "additionalProperties": False, "properties": _NODE_PROPS,
                  "description": "only the fields to change"},
    "Node": {"type": "object", "required": list(_NODE_PROPS) + ["path"],
             "properties": {**{k: {"type": v["type"]} for k, v in _NODE_PROPS.items()}, "path": {"type": "string"}}},
    "NodeList": {"type": "object", "required": ["items", "total"],
                 "properties": {"items": {"type": "array", "items": _ref("Node")}, "total": {"type": "integer"}}},
    "Echo": {"type": "object", "required": ["node", "ok", "seconds"],
             "properties": {"node": {"type": "string"}, "ok": {"type": "boolean"}, "seconds": {"type": "number"},
                            "checked_at": {"type": "number"}}},
    "Query": {"type": "object", "additionalProperties": False, "properties": _QUERY_PROPS,
              "description": "dicomtrolley's query model: at least one matching key; PatientID / PatientName "
                             "take * and ? wildcards; min_study_date <= max_study_date"},
    "FindResult": {"type": "object", "required": ["node", "level", "count", "results"],
                   "properties": {"node": {"type": "string"}, "level": {"type": "string"},
                                  "query": {"type": "object"}, "count": {"type": "integer"},
                                  "truncated": {"type": "boolean"},
                                  "results": {"type": "array", "items": {"type": "object"}}}},
    "JobRequest": {"oneOf": [
        _job_request("retrieve", {"node": _NODE_REF, "query": _ref("Query"),
                                  "mode": {"type": "string", "nullable": True, "enum": ["move", "get", None]}},
                     ["node", "query"]),
        _job_request("push", {"node": _NODE_REF, "selection": _SELECTION}, ["node", "selection"]),
        _job_request("repack", {"selection": _SELECTION,
                                "dest": {"type": "string", "pattern": _REL,
                                         "description": "relative to PACSBRIDGE_EXPORT_ROOT"},
                                "template": {"type": "string", "minLength": 1, "maxLength": 1024},
                                "link": {"type": "boolean"}}, ["selection", "dest"]),
        _job_request("import", {"path": {"type": "string", "pattern": _REL,
                                         "description": "relative to PACSBRIDGE_IMPORT_ROOT"}}, ["path"]),
    ]},
    "SeriesProgress": {"type": "object", "required": ["series_uid", "expected", "received", "indexed", "pushed",
                                                      "failed", "state", "error"],
                       "properties": {k: {"type": "integer"} if k in ("expected", "received", "indexed", "pushed",
                                                                         "failed") else {"type": "string"}
                                      for k in ("series_uid", "study_uid", "patient_id", "modality", "description",
                                                "expected", "received", "indexed", "pushed", "failed", "state",
                                                "error")}},
    "Job": {"type": "object",
            "required": ["id", "kind", "state", "params", "attempts", "error", "created_at", "totals", "path"],
            "properties": {
                "id": {"type": "string"}, "kind": {"type": "string", "enum": list(KINDS)},
                "node": {"type": "string", "nullable": True}, "params": {"type": "object"},
                "state": {"type": "string", "enum": list(STATES)}, "attempts": {"type": "integer"},
                "error": {"type": "string"}, "result": {"type": "object"},
                "webhook": {"type": "string", "description": "empty unless the token is the owner's or an admin's"},
                "worker": {"type": "string", "description": "host:pid; empty unless the token is the owner's or "
                                                            "an admin's"},
                "owner": {"type": "string", "description": "name of the token that submitted the job"},
                "webhook_status": {"type": "string", "description": "queued, sent, retry n, failed or refused, "
                                                                    "with the reason (owner and admins)"},
                "cancel_requested": {"type": "boolean"},
                "created_at": {"type": "number"},
                **{k: {"type": "number", "nullable": True} for k in ("started_at", "heartbeat_at", "finished_at")},
                "totals": {"type": "object", "additionalProperties": {"type": "integer"}},
                "path": {"type": "string"},
                "series": {"type": "array", "items": _ref("SeriesProgress")},
                "enqueued": {"type": "boolean"},
                "cancel": {"type": "object", "description": "the answer to a cancel: what happened",
                           "properties": {"outcome": {"type": "string",
                                                      "enum": ["cancelled", "finished", "requested"]},
                                          "message": {"type": "string"}}},
            }},
    "JobSubmitted": {"type": "object", "required": ["id", "path", "state", "created", "enqueued"],
                     "properties": {"id": {"type": "string"}, "path": {"type": "string"},
                                    "state": {"type": "string", "enum": list(STATES)},
                                    "created": {"type": "boolean"},
                                    "enqueued": {"type": "boolean", "nullable": True,
                                                 "description": "false: the broker was unreachable, the job "
                                                                "waits queued; null: an existing job"},
                                    "job": _ref("Job")}},
    "JobList": {"type": "object", "required": ["items", "total", "limit", "offset"],
                "properties": {"items": {"type": "array", "items": _ref("Job")}, "total": {"type": "integer"},
                               "limit": {"type": "integer"}, "offset": {"type": "integer"}}},
    "IndexRow": {"type": "object", "additionalProperties": {"type": "string", "nullable": True},
                 "description": "an index row keyed by DICOM keyword; `path` and (instances) `file` link onwards"},
    "IndexPage": {"type": "object", "required": ["items", "total", "limit", "offset"],
                  "properties": {"items": {"type": "array", "items": _ref("IndexRow")}, "total": {"type": "integer"},
                                 "limit": {"type": "integer"}, "offset": {"type": "integer"}}},
    "QuarantineEntry": {
        "type": "object",
        "required": ["id", "relpath", "reason", "detail", "sop_uid", "series_uid", "study_uid", "patient_id",
                     "other_patient_id", "created_at", "resolved", "resolved_at", "resolved_by", "decision", "path"],
        "properties": {
            "id": {"type": "integer"},
            "relpath": {"type": "string", "description": "the file, relative to the storage root"},
            "reason": {"type": "string", "enum": ["index_failed", "uid_conflict"]},
            "detail": {"type": "string", "description": "the database's refusal, or which UID clashes"},
            "level": {"type": "string", "description": "uid_conflict: study, series or image"},
            **{k: {"type": "string"} for k in ("sop_uid", "series_uid", "study_uid", "patient_id",
                                                "other_patient_id", "original_relpath", "resolved_by",
                                                "decision", "path")},
            "attempts": {"type": "integer"}, "created_at": {"type": "number"},
            "resolved": {"type": "boolean"}, "resolved_at": {"type": "number", "nullable": True},
        }},
    "QuarantineList": {"type": "object", "required": ["items", "total", "limit", "offset"],
                       "properties": {"items": {"type": "array", "items": _ref("QuarantineEntry")},
                                      "total": {"type": "integer"}, "limit": {"type": "integer"},
                                      "offset": {"type": "integer"}}},
    "QuarantineDecision": {"type": "object", "additionalProperties": False, "required": ["decision"],
                           "properties": {"decision": {
                               "type": "string", "enum": ["retry", "discard", "correct", "new-patient"],
                               "description": "index_failed: retry or discard; uid_conflict: correct (this "
                                              "instance's PatientID wins, every row of the UID follows it), "
                                              "new-patient (kept as a new stored file with new UIDs) or discard"}}},
    "Check": {"type": "object", "required": ["ok", "seconds"],
              "properties": {"ok": {"type": "boolean"}, "seconds": {"type": "number"}, "error": {"type": "string"},
                             "required": {"type": "boolean"}}},
    "Health": {"type": "object", "required": ["status", "checks"],
               "properties": {"status": {"type": "string", "enum": ["ok", "failing"]},
                              "checks": {"type": "object", "required": ["database", "broker", "listener"],
                                         "properties": {k: _ref("Check") for k in ("database", "broker",
                                                                                    "listener")}}}},
}

_PAGING = [
    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}},
    {"name": "offset", "in": "query", "schema": {"type": "integer", "minimum": 0, "maximum": 1000000000,
                                                 "default": 0}},
]

_FILTER_SCHEMAS = {
    "uid": {"type": "string", "maxLength": 64, "pattern": r"^([0-9]+(\.[0-9]+)*)?$"},
    "date": {"type": "string", "pattern": r"^([0-9]{8}|[0-9]{8}-|-[0-9]{8}|[0-9]{8}-[0-9]{8})?$"},
    "modality": {"type": "string", "pattern": r"^([A-Z0-9 _]{1,16})?$"},
}
#: Column lengths of the shipped dicom.sql (a longer value is a 400).
_TEXT_LENGTH = {"PatientID": 64, "PatientName": 64, "PatientSex": 16, "AccessionNumber": 16,
                "StudyDescription": 64, "SeriesDescription": 64, "SeriesNumber": 12, "Modality": 16}


def _filter_kind(resource: str, name: str) -> str:
    if name.endswith("UID"):
        return "uid"
    if name.endswith("Date"):
        return "date"
    if name == "Modality" and resource == "studies":
        return "modality"
    return "text"


def _browse_params(resource: str) -> list[dict[str, Any]]:
    params = []
    for name in FILTERS[resource]:
        kind = _filter_kind(resource, name)
        desc = {"uid": "exact UID", "date": "DICOM date or range (20240101-20241231)",
                "modality": "modality code", "text": "exact, or with * and ? wildcards (case-insensitive)"}[kind]
        schema = _FILTER_SCHEMAS.get(kind) or {"type": "string", "maxLength": _TEXT_LENGTH[name],
                                                "pattern": r"^[^\\\x00-\x1f\x7f]*$"}
        params.append({"name": name, "in": "query", "description": desc, "schema": schema})
    return params + _PAGING


def _path_param(name: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": schema or {"type": "string", "minLength": 1}}


_NODE_NAME = _path_param("name", {"type": "string", "minLength": 1, "maxLength": 64, "pattern": _NAME})
_JOB = _path_param("job_id", {"type": "string", "minLength": 1, "maxLength": 64, "pattern": r"^[0-9a-zA-Z]+$"})
_ENTRY = _path_param("entry_id", {"type": "string", "minLength": 1, "maxLength": 12, "pattern": r"^[0-9]+$"})
_SOP = _path_param("uid", {"type": "string", "maxLength": 64, "pattern": _UID})

_READ = _errors(400, 401, 503)
_WRITE = _errors(400, 401, 403, 413, 415, 503)


def _op(summary: str, responses: dict[str, Any], tag: str, *, body: dict[str, Any] | None = None,
        params: list[dict[str, Any]] | None = None, public: bool = False) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "tags": [tag], "responses": responses}
    if body is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    if params:
        op["parameters"] = params
    if public:
        op["security"] = []
    return op


def _paths() -> dict[str, Any]:
    p: dict[str, Any] = {}
    p["/healthz"] = {"get": _op("Health of database, broker and listener", {
        "200": _json(_ref("Health"), "database and broker answer"),
        "503": _json(_ref("Health"), "the database or the broker does not answer")}, "health", public=True)}
    p["/metrics"] = {"get": _op("Prometheus metrics", {
        "200": {"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}}},
        "health", public=True)}
    p["/api/v1/openapi.json"] = {"get": _op("This document", {
        "200": _json({"type": "object"}, "OpenAPI 3 document")}, "meta", public=True)}
    p["/api/v1/nodes"] = {
        "get": _op("List nodes", {"200": _json(_ref("NodeList"), "nodes"), **_READ}, "nodes"),
        "post": _op("Create a node (admin)", {"201": _json(_ref("Node"), "created"), **_WRITE, **_errors(409)},
                    "nodes", body=_ref("NodeInput")),
    }
    p["/api/v1/nodes/{name}"] = {
        "parameters": [_NODE_NAME],
        "get": _op("Read a node", {"200": _json(_ref("Node"), "the node"), **_READ, **_errors(404)}, "nodes"),
        "put": _op("Replace a node (admin)", {"200": _json(_ref("Node"), "replaced"), **_WRITE, **_errors(404)},
                   "nodes", body=_ref("NodeReplace")),
        "patch": _op("Change some fields of a node (admin)", {"200": _json(_ref("Node"), "changed"), **_WRITE,
                                                              **_errors(404)}, "nodes", body=_ref("NodePatch")),
        "delete": _op("Delete a node (admin)", {"204": {"description": "deleted"}, **_errors(400, 401, 403, 404, 409,
                                                                                            503)}, "nodes"),
    }
    p["/api/v1/nodes/{name}/echo"] = {"parameters": [_NODE_NAME], "post": _op(
        "C-ECHO the node", {"200": _json(_ref("Echo"), "the node answered"), **_errors(400, 401, 403, 404, 502,
                                                                                       503)}, "nodes")}
    p["/api/v1/nodes/{name}/query"] = {"parameters": [_NODE_NAME], "post": _op(
        "C-FIND on the node", {"200": _json(_ref("FindResult"), "matches"), **_WRITE,
                               **_errors(404, 409, 502)}, "nodes", body=_ref("Query"))}
    p["/api/v1/jobs"] = {
        "get": _op("List jobs, newest first", {"200": _json(_ref("JobList"), "a page of jobs"), **_READ}, "jobs",
                   params=[{"name": "state", "in": "query", "schema": {"type": "string", "enum": list(STATES)}},
                           {"name": "kind", "in": "query", "schema": {"type": "string", "enum": list(KINDS)}},
                           {"name": "node", "in": "query", "schema": {"type": "string", "maxLength": 64}},
                           {"name": "since", "in": "query", "description": "Unix seconds or ISO 8601",
                            "schema": {"type": "string", "maxLength": 64,
                                       "pattern": SINCE_PATTERN}},
                           *_PAGING]),
        "post": _op("Submit a job", {
            "202": _json(_ref("JobSubmitted"), "a new job, queued"),
            "200": _json(_ref("JobSubmitted"), "an equal job is already queued or running: that job"),
            **_WRITE, **_errors(404)}, "jobs", body=_ref("JobRequest")),
    }
    p["/api/v1/jobs/{job_id}"] = {"parameters": [_JOB], "get": _op(
        "A job with per-series progress", {"200": _json(_ref("Job"), "the job"), **_READ, **_errors(404)}, "jobs")}
    p["/api/v1/jobs/{job_id}/cancel"] = {"parameters": [_JOB], "post": _op(
        "Cancel a job", {"200": _json(_ref("Job"), "cancelled (queued, or stopped by its worker within 5 s), "
                                                   "or it ended first; `cancel` says which"),
                         "202": _json(_ref("Job"), "still running: asked to stop (`cancel.outcome` requested)"),
                         **_errors(400, 401, 403, 404, 409, 503)}, "jobs")}
    p["/api/v1/jobs/{job_id}/retry"] = {"parameters": [_JOB], "post": _op(
        "Queue a failed, partial or cancelled job again", {"202": _json(_ref("Job"), "queued again"),
                                                          **_errors(400, 401, 403, 404, 409, 503)}, "jobs")}
    p["/api/v1/quarantine"] = {"get": _op("What indexing set aside, newest first", {
        "200": _json(_ref("QuarantineList"), "a page of entries"), **_READ}, "quarantine",
        params=[{"name": "reason", "in": "query", "schema": {"type": "string",
                                                             "enum": ["index_failed", "uid_conflict"]}},
                {"name": "resolved", "in": "query", "schema": {"type": "string", "enum": ["true", "false"]}},
                *_PAGING])}
    p["/api/v1/quarantine/{entry_id}"] = {"parameters": [_ENTRY], "get": _op(
        "One quarantine entry", {"200": _json(_ref("QuarantineEntry"), "the entry"), **_READ, **_errors(404)},
        "quarantine")}
    p["/api/v1/quarantine/{entry_id}/resolve"] = {"parameters": [_ENTRY], "post": _op(
        "Decide on an entry (admin; audited)", {"200": _json(_ref("QuarantineEntry"), "resolved"), **_WRITE,
                                                **_errors(404, 409)}, "quarantine", body=_ref("QuarantineDecision"))}
    for resource in ("patients", "studies", "series", "instances"):
        p[f"/api/v1/{resource}"] = {"get": _op(f"Browse {resource} in the index", {
            "200": _json(_ref("IndexPage"), "a page of index rows"), **_READ}, "index",
            params=_browse_params(resource))}
    for resource in ("studies", "series", "instances"):
        p[f"/api/v1/{resource}/{{uid}}"] = {"parameters": [_SOP], "get": _op(
            f"One of the {resource}", {"200": _json(_ref("IndexRow"), "the index row"), **_READ, **_errors(404)},
            "index")}
    p["/api/v1/instances/{uid}/file"] = {"parameters": [_SOP], "get": _op(
        "Download the stored file", {
            "200": {"description": "the file as received", "content": {
                "application/dicom": {"schema": {"type": "string", "format": "binary"}}}},
            **_READ, **_errors(404)}, "index")}
    return p


def document() -> dict[str, Any]:
    """The OpenAPI document."""
    return {
        "openapi": "3.0.3",
        "info": {"title": "pacsbridge API", "version": __version__,
                 "description": "Nodes, jobs and the Conquest index of a pacsbridge installation. Every error is "
                                "`{\"error\": {\"status\", \"message\", \"field\"?, \"path\"}}`. Roles: read < user "
                                "(jobs, echo, query) < admin (nodes, quarantine decisions)."},
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "paths": _paths(),
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "a token of PACSBRIDGE_API_TOKENS"}},
            "schemas": SCHEMAS,
            "responses": {f"E{c}": _json(_ref("Error"), text) for c, text in _ERROR_TEXT.items()},
        },
    }


@bp.get("/openapi.json")
@requires("public")
def openapi_json() -> dict[str, Any]:
    return document()
