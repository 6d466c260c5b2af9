"""What each kind of job takes, checked before a job row is written.

A request (an API body, or what the CLI builds) is a JSON object::

    {"kind": "retrieve", "node": "pacs", "query": {...}, "mode": "move"|"get"|"wado-rs"|"wado-uri", "webhook": "https://..."}
    {"kind": "push",     "node": "dest", "selection": {...}, "project": "lung-2026"}
    {"kind": "repack",   "selection": {...}, "dest": "cohort-1", "template": "px-repack", "link": false,
                         "project": "lung-2026"}
    {"kind": "import",   "path": "incoming/batch-7"}

A *selection* names what we hold: ``{"PatientID": [...]}``, ``{"StudyInstanceUID": [...]}``,
``{"SeriesInstanceUID": [...]}`` or ``{"job": "<id of a retrieve job>"}`` (what it brought).

:func:`validate` returns ``(kind, node, params, webhook)``; ``params`` is what the
runner of that kind reads (:mod:`pacsbridge.worker.runner`), checked again there by
:func:`check_params`. Each kind is a pydantic model (:class:`RetrieveRequest` ...;
:data:`JobRequest` is their union on ``kind``): the API, the CLI and the worker validate with
them, and the API's OpenAPI document is generated from them. Paths (``dest``,
``path``) are relative to ``PACSBRIDGE_EXPORT_ROOT`` / ``PACSBRIDGE_IMPORT_ROOT``
and may not climb out of them.

``project`` (push, repack) names a de-identification project (:mod:`pacsbridge.shared.deid`): what
leaves is de-identified under it. A push to a node with a default project uses the node's when the
request names none, and a node that may not receive identifiable data (``identifiable`` false) takes
no push without a project (:func:`effective_project`).
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import Annotated, Any, Literal, Mapping, Union

from pydantic import ConfigDict, Field, ValidationInfo, field_validator, model_validator

from pacsbridge.shared.core.errors import ConfigError, InvalidRequest
from pacsbridge.shared.core.models import TEXT_PATTERN, Model, check, refuse
from pacsbridge.shared.deid.options import PROJECT_NAME_PATTERN
from pacsbridge.shared.dicom.node import Node
from pacsbridge.shared.dicom.query import UID_PATTERN, QueryModel
from pacsbridge.shared.index.storage import Template
from pacsbridge.shared.jobs import webhooks

__all__ = ["validate", "check_params", "effective_project", "SELECTION_KEYS", "safe_relative", "Selection",
           "RetrieveRequest", "PushRequest", "RepackRequest", "ImportRequest", "DeleteRequest", "JobRequest",
           "REQUESTS", "PARAMS", "REL_PATTERN"]

SELECTION_KEYS = ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "job")
_ID = re.compile(r"^[0-9a-f]{32}\Z")
#: A path relative to its root: no leading '/', no '..' part, not only spaces, no backslash or control character.
REL_PATTERN = r"^(?!/)(?!.*(^|/)\.\.(/|$))(?=.*[^ ])[^\x00-\x1f\x7f\\]{1,255}$"


_REL_HELP = ("a relative path that stays inside its root: no leading '/', no '..', at most 255 printable "
             "characters, no backslash")


def safe_relative(value: Any, field: str) -> str:
    """A relative POSIX path without ``..``, absolute parts or control characters."""
    if not isinstance(value, str) or not value.strip(" "):
        raise InvalidRequest("expected a relative path", field)
    if len(value) > 255 or re.search(r"[\x00-\x1f\x7f\\]", value):
        raise InvalidRequest("at most 255 printable characters, no backslash", field)
    path = PurePosixPath(value)
    if path.is_absolute() or any(part in ("..", "") for part in path.parts):
        raise InvalidRequest("must stay inside its root: no leading '/', no '..'", field)
    return str(path)


_PID = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[^\\\x00-\x1f\x7f*?]+$")]
_UIDV = Annotated[str, Field(min_length=1, max_length=64, pattern=UID_PATTERN)]
_VALUES = "one value or a list of 1 to 10,000 values of at most 64 characters"


class Selection(Model):
    """What we hold: exactly one of the keys (``minProperties``/``maxProperties`` 1 in the document)."""

    model_config = ConfigDict(json_schema_extra={"minProperties": 1, "maxProperties": 1})
    help = {"PatientID": "exact patient IDs (no wildcards, backslash or control characters): " + _VALUES,
            "StudyInstanceUID": "DICOM UIDs (digits and dots): " + _VALUES,
            "SeriesInstanceUID": "DICOM UIDs (digits and dots): " + _VALUES,
            "job": "a job id (32 hex digits)"}

    PatientID: _PID | Annotated[list[_PID], Field(min_length=1, max_length=10000)] = None  # type: ignore[assignment]
    StudyInstanceUID: _UIDV | Annotated[list[_UIDV], Field(min_length=1, max_length=10000)] = None  # type: ignore[assignment]
    SeriesInstanceUID: _UIDV | Annotated[list[_UIDV], Field(min_length=1, max_length=10000)] = None  # type: ignore[assignment]
    job: Annotated[str, Field(pattern=r"^[0-9a-f]{32}$", description="what this retrieve job brought")] = None  # type: ignore[assignment]

    @model_validator(mode="before")
    @classmethod
    def _one_key(cls, value: Any) -> Any:
        if not isinstance(value, Mapping) or len(value) != 1:
            raise InvalidRequest(f"an object with exactly one of {', '.join(SELECTION_KEYS)}", "selection")
        (key, _), = value.items()
        if key not in SELECTION_KEYS:
            raise InvalidRequest(f"unknown key {key!r}; expected one of {', '.join(SELECTION_KEYS)}", "selection")
        return value

    def to_params(self) -> dict[str, Any]:
        key = next(k for k in SELECTION_KEYS if getattr(self, k) is not None)
        value = getattr(self, key)
        return {key: [value] if isinstance(value, str) and key != "job" else value}


_Webhook = Annotated[str, Field(max_length=2048,
                                pattern=r"^([hH][tT][tT][pP][sS]?://[^/?#\x00-\x20\x7f]+[^\x00-\x20\x7f]*)?$")]
_NodeRef = Annotated[str, Field(min_length=1, max_length=64, pattern=TEXT_PATTERN,
                                description="the name of a configured node (404 if there is none)")]
_ProjectRef = Annotated[str, Field(pattern=PROJECT_NAME_PATTERN,
                                   description="a de-identification project: what leaves is de-identified under it "
                                               "(404 if there is none)")]


class _Job(Model):
    help = {"node": "the name of a configured node",
            "mode": "'move', 'get', 'wado-rs' or 'wado-uri' (default: the node's own)",
            "link": "true (hard links) or false (copies)", "template": "a preset name or a template string",
            "webhook": "an http(s) URL of at most 2048 characters, without spaces or control characters",
            "dest": _REL_HELP, "path": _REL_HELP}

    webhook: _Webhook | None = Field(
        None, description="called with the finished job (POST, JSON, signed: X-Pacsbridge-Signature); only a "
                          "destination that PACSBRIDGE_WEBHOOK_ALLOW lists, else 400")

    @field_validator("webhook")
    @classmethod
    def _webhook(cls, value: str | None, info: ValidationInfo) -> str | None:
        if not value:
            return value
        policy = (info.context or {}).get("webhook_policy")
        if policy is None:  # the form only; the API passes its allow-list, and the sender checks again
            webhooks.parse_url(value)
        else:  # a listed name that does not resolve now is checked again when sent
            webhooks.check_url(value, policy, strict_resolve=False)
        return value

    def to_params(self) -> dict[str, Any]:
        raise NotImplementedError


class RetrieveRequest(_Job):
    """Retrieve what a query finds on a node (C-MOVE or C-GET), indexing it as it arrives."""

    kind: Literal["retrieve"]
    node: _NodeRef
    query: QueryModel
    mode: Literal["move", "get", "wado-rs", "wado-uri"] | None = Field(
        None, description="C-MOVE, C-GET, WADO-RS or WADO-URI (default: the node's own)")

    def to_params(self) -> dict[str, Any]:
        params: dict[str, Any] = {"query": self.query.to_query().to_dict()}
        if self.mode:
            params["mode"] = self.mode
        return params


class PushRequest(_Job):
    """C-STORE what we hold to a node."""

    kind: Literal["push"]
    node: _NodeRef
    selection: Selection
    project: _ProjectRef | None = None

    def to_params(self) -> dict[str, Any]:
        params: dict[str, Any] = {"selection": self.selection.to_params()}
        if self.project:
            params["project"] = self.project
        return params


class RepackRequest(_Job):
    """Copy or hard-link what we hold into a tree under PACSBRIDGE_EXPORT_ROOT."""

    kind: Literal["repack"]
    selection: Selection
    dest: Annotated[str, Field(pattern=REL_PATTERN, description="relative to PACSBRIDGE_EXPORT_ROOT")]
    template: Annotated[str, Field(min_length=1, max_length=1024, pattern=TEXT_PATTERN)] = Field(
        "px-repack", description="a storage template or a preset name (a template that does not parse is a 400)")
    link: bool = Field(False, description="hard links instead of copies (not with a project: the files are new)")
    project: _ProjectRef | None = None

    model_config = ConfigDict(regex_engine="python-re")  # REL_PATTERN looks ahead

    @model_validator(mode="after")
    def _no_link_with_project(self) -> "RepackRequest":
        if self.project and self.link:
            raise InvalidRequest("a de-identified repack writes new files: it cannot hard-link", "link")
        return self

    @field_validator("dest")
    @classmethod
    def _dest(cls, value: str) -> str:
        return safe_relative(value, "dest")

    @field_validator("template")
    @classmethod
    def _template(cls, value: str) -> str:
        try:  # the runner's own check, now: a bad template is a 400, not a job that fails later
            Template(value)
        except ConfigError as exc:
            raise refuse(str(exc)) from None
        return value

    def to_params(self) -> dict[str, Any]:
        params = {"selection": self.selection.to_params(), "dest": self.dest, "template": self.template,
                  "link": self.link}
        if self.project:
            params["project"] = self.project
        return params


class ImportRequest(_Job):
    """Import files already under PACSBRIDGE_IMPORT_ROOT."""

    kind: Literal["import"]
    path: Annotated[str, Field(pattern=REL_PATTERN, description="relative to PACSBRIDGE_IMPORT_ROOT")]

    model_config = ConfigDict(regex_engine="python-re")  # REL_PATTERN looks ahead

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        return safe_relative(value, "path")

    def to_params(self) -> dict[str, Any]:
        return {"path": self.path}


#: A job request, one model per kind (``kind`` tells which).
JobRequest = Annotated[Union[RetrieveRequest, PushRequest, RepackRequest, ImportRequest],
                       Field(discriminator="kind")]
REQUESTS: dict[str, type[_Job]] = {"retrieve": RetrieveRequest, "push": PushRequest, "repack": RepackRequest,
                                   "import": ImportRequest}
#: Fields of a request that are not the runner's params.
_NOT_PARAMS = {"kind", "node", "webhook"}


def _spec_field(loc: tuple[Any, ...]) -> str:
    """Where an error is: ``path``; ``selection.PatientID``; a query's own field by its name (``PatientID``)."""
    names = [str(p) for p in loc if isinstance(p, str)]
    if not names:
        return "body"
    if names[0] == "query":
        return names[1] if len(names) > 1 else "query"
    if names[0] == "selection":
        return f"selection.{names[1]}" if len(names) > 1 and names[1] in SELECTION_KEYS else "selection"
    return names[0]


def validate(body: Any, webhook_policy: webhooks.Policy | None = None
             ) -> tuple[str, str | None, dict[str, Any], str]:
    """Check a job request; ``webhook_policy`` (``PACSBRIDGE_WEBHOOK_ALLOW``) checks where its webhook goes.

    Returns
    -------
    (kind, node, params, webhook)

    Raises
    ------
    InvalidRequest
        Unknown kind or field, wrong type, unsafe path; the field is named.
    """
    if not isinstance(body, Mapping):
        raise InvalidRequest("a job request must be a JSON object", "body")
    kind = body.get("kind")
    if not isinstance(kind, str) or kind not in REQUESTS:
        raise InvalidRequest(f"expected one of {', '.join(REQUESTS)}", "kind")
    model = REQUESTS[kind]
    unknown = sorted(set(body) - set(model.model_fields))
    if unknown:
        raise InvalidRequest(f"unknown field(s) for a {kind} job: {', '.join(map(repr, unknown))}; "
                             f"known: {', '.join(sorted(model.model_fields))}", unknown[0])
    request = check(model, body, context={"webhook_policy": webhook_policy}, rename=_spec_field)
    node = getattr(request, "node", None)
    return kind, node, request.to_params(), request.webhook or ""


class DeleteRequest(_Job):
    """Delete patients, studies or series from the index and the storage. Not a body of ``POST /jobs``: the
    API's ``DELETE`` routes (admins only) submit it, and the worker checks its params with it."""

    kind: Literal["delete"]
    selection: Selection

    @field_validator("selection")
    @classmethod
    def _what_we_hold(cls, value: Selection) -> Selection:
        if value.job is not None:
            raise InvalidRequest("a deletion names patients, studies or series, not a job", "selection")
        return value

    def to_params(self) -> dict[str, Any]:
        return {"selection": self.selection.to_params()}


#: What the runner of each kind reads from ``params`` (the request without kind, node and webhook).
PARAMS: dict[str, type[_Job]] = {**REQUESTS, "delete": DeleteRequest}


def check_params(kind: str, params: Mapping[str, Any]) -> None:
    """The worker's check of a job row's ``params`` with the models the API checked them with.

    A row written by hand, or by an older release, that the models refuse fails the job with the
    field named, before anything is fetched or written. Kinds without a request model (``index``) pass.
    """
    model = PARAMS.get(kind)
    if model is None:
        return
    body: dict[str, Any] = {**params, "kind": kind}
    if "node" in model.model_fields:
        body["node"] = "-"  # the row's node column is checked by the store, not here
    check(model, body, field="params", rename=_spec_field)


def effective_project(node: Node | None, requested: str | None) -> str:
    """The project a job sending to ``node`` de-identifies under: the request's, else the node's
    default (``""``: none, identifiable data).

    Raises
    ------
    InvalidRequest
        ``node`` may not receive identifiable data (``identifiable`` false) and no project applies.
    """
    project = requested or (node.project if node is not None else "")
    if node is not None and not node.identifiable and not project:
        raise InvalidRequest(f"node {node.name!r} receives de-identified data only: name a project "
                             "(or give the node a default project)", "project")
    return project
