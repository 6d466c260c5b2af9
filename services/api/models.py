"""What the API answers, and the query strings it reads, as pydantic models.

Request bodies are the shared models (:class:`~pacsbridge.shared.dicom.node.NodeModel`,
:class:`~pacsbridge.shared.dicom.query.QueryModel`, :data:`~pacsbridge.shared.jobs.spec.JobRequest`):
the CLI and the worker validate with them too. The answers here are the API's own. A view hands its
answer through :func:`answer`: the model checks it (an answer the document does not describe is a
bug, and fails loudly) and the document (:mod:`.contract`) is generated from the same models.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, RootModel

from pacsbridge.shared.core.models import TEXT_PATTERN, Model, refuse
from pacsbridge.shared.deid.options import PROJECT_NAME_PATTERN, ProjectConfig
from pacsbridge.shared.dicom.node import NodeModel
from pacsbridge.shared.index.quarantine import REASONS
from pacsbridge.shared.jobs.store import KINDS, STATES
from pacsbridge.shared.nodes.credentials import MAX_SECRET

__all__ = ["answer", "Out", "ErrorBody", "NodeOut", "NodeSecret", "NodeList", "Echo", "FindResult", "JobOut",
           "JobSubmitted", "JobList", "IndexRow", "IndexPage", "QuarantineEntry", "QuarantineList",
           "QuarantineDecision",
           "Health", "Args", "JobListArgs", "QuarantineArgs", "PageArgs", "SINCE_PATTERN", "MAX_LIMIT",
           "DEFAULT_LIMIT", "MAX_OFFSET", "TOTAL_CAP", "CURSOR_RULES", "ListArgs", "ProjectOut", "ProjectList",
           "ProjectCreate",
           "ProjectPatch", "MapRow", "MapPage",
           "MapArgs", "AuditRow", "AuditPage", "AuditArgs"]

MAX_LIMIT = 1000
DEFAULT_LIMIT = 100
#: The deepest ``offset`` of a list that pages by cursor: deeper, the database would skip rows one by one.
MAX_OFFSET = 10_000
#: ``total`` is counted up to this many matches (null beyond, unless ``total=exact``).
TOTAL_CAP = 10_000
#: What a cursor must be beyond its pattern (the document's rules of each list that pages by cursor).
CURSOR_RULES = ("cursor: the `next` of a page of this same list (same filters), as it is (`cursor`)",
                "cursor and offset: not both (`offset`)")


class Out(BaseModel):
    """An answer: every field it has is described (``additionalProperties: false``)."""

    model_config = ConfigDict(extra="forbid")


def answer(model: type[BaseModel], data: Any) -> Any:
    """``data`` as ``model`` describes it, keys as the view made them (none added, none dropped)."""
    return model.model_validate(data).model_dump(mode="json", exclude_unset=True)


# -- errors -----------------------------------------------------------------------------
class Problem(Out):
    """One problem of a cohort file: the row as the user sees it (the header is row 1 of a CSV or xlsx;
    the object's place, from 1, in JSON), the column as written ("" for the whole row or file)."""

    row: int
    column: str
    message: str


class ErrorDetail(Out):
    status: int
    message: str
    path: str
    field: str = Field("", description="the input field to blame, if one is")
    dimse_status: int = Field(0, description="the DIMSE status a peer answered (502)")
    problems: list[Problem] = Field(default_factory=list, description="every problem of an uploaded cohort file, "
                                                                      "by row and column (400)")


class ErrorBody(Out):
    """Every error the API answers (:mod:`pacsbridge.api.errors`)."""

    error: ErrorDetail


# -- nodes ------------------------------------------------------------------------------
class NodeOut(NodeModel):
    """A node, and where it is."""

    path: str
    web_secret_stored: bool = Field(
        False, description="a DICOMweb secret is stored for it (PUT /nodes/{name}/secret); the secret itself is "
                           "never returned")


class NodeSecret(Model):
    """``PUT /nodes/{name}/secret``: the node's DICOMweb password or token, kept encrypted."""

    help = {"secret": f"1 to {MAX_SECRET} printable ASCII characters or spaces (a password or a bearer token)"}

    secret: Annotated[str, Field(min_length=1, max_length=MAX_SECRET, pattern=r"^[\x20-\x7e]+$")] = Field(
        description="the password (web_auth basic) or token (bearer); sealed with PACSBRIDGE_SECRET_KEY")


class NodeList(Out):
    items: list[NodeOut]
    total: int


class Echo(Out):
    node: str
    ok: bool
    seconds: float
    checked_at: float


class FindResult(Out):
    node: str
    level: str
    query: dict[str, Any] = Field(description="the query as run (normalised)")
    count: int
    truncated: bool = Field(description="more matched than the API returns (10,000)")
    results: list[dict[str, Any]] = Field(description="the peer's answers, keyed by DICOM keyword")


# -- jobs -------------------------------------------------------------------------------
class SeriesProgressOut(Out):
    series_uid: str
    study_uid: str
    patient_id: str
    modality: str
    description: str
    expected: int
    received: int
    indexed: int
    pushed: int
    failed: int
    quarantined: int = Field(0, description="withheld by the project's risk policy (not sent)")
    state: str
    error: str


class CancelAnswer(Out):
    outcome: Literal["cancelled", "finished", "requested"]
    message: str


class JobOut(Out):
    """A job (``series`` only when one job is read; ``enqueued`` after a retry; ``cancel`` after a cancel)."""

    id: str
    kind: Literal[KINDS]  # type: ignore[valid-type]
    node: str | None
    params: dict[str, Any]
    state: Literal[STATES]  # type: ignore[valid-type]
    attempts: int
    error: str
    result: dict[str, Any]
    webhook: str = Field(description="empty unless the token is the owner's or an admin's")
    worker: str = Field(description="host:pid; empty unless the token is the owner's or an admin's")
    owner: str = Field(description="name of the token that submitted the job")
    webhook_status: str = Field(description="queued, sent, retry n, failed or refused, with the reason "
                                            "(owner and admins)")
    cancel_requested: bool
    created_at: float
    started_at: float | None
    heartbeat_at: float | None
    finished_at: float | None
    totals: dict[str, int]
    path: str
    series: list[SeriesProgressOut] = None  # type: ignore[assignment]
    enqueued: bool = None  # type: ignore[assignment]
    cancel: CancelAnswer = Field(None, description="the answer to a cancel: what happened")  # type: ignore[assignment]


class JobSubmitted(Out):
    id: str
    path: str
    state: Literal[STATES]  # type: ignore[valid-type]
    created: bool = Field(description="false: an equal job was queued or running already; this is that job")
    enqueued: bool | None = Field(description="false: the broker was unreachable, the job waits queued; "
                                              "null: an existing job")
    job: JobOut


class JobList(Out):
    items: list[JobOut]
    total: int | None = Field(description="how many match; null when more than 10,000 do and total=exact "
                                          "was not asked")
    limit: int
    offset: int
    next: str | None = Field(description="the cursor of the next page (?cursor=), null on the last page")


# -- the index --------------------------------------------------------------------------
class IndexRow(RootModel[dict[str, str | int | float | None]]):
    """An index row keyed by DICOM keyword; ``path`` and (instances) ``file`` link onwards."""


class IndexPage(Out):
    """A page of index rows. ``next`` continues it (``?cursor=``, the same filters); ``total`` is exact up to
    10,000 matches and null beyond, unless ``total=exact`` was asked (docs/api.md, "Paging")."""

    items: list[dict[str, str | int | float | None]]
    total: int | None = Field(description="how many match; null when more than 10,000 do and total=exact "
                                          "was not asked")
    limit: int
    offset: int
    next: str | None = Field(description="the cursor of the next page (?cursor=), null on the last page")


# -- quarantine -------------------------------------------------------------------------
class QuarantineEntry(Out):
    id: int
    relpath: str = Field(description="the file, relative to the storage root")
    reason: Literal[REASONS]  # type: ignore[valid-type]
    detail: str = Field(description="the database's refusal, or which UID clashes")
    level: str = Field(description="uid_conflict: study, series or image")
    sop_uid: str
    series_uid: str
    study_uid: str
    patient_id: str
    other_patient_id: str
    original_relpath: str
    attempts: int
    created_at: float
    resolved_at: float | None
    resolved_by: str
    decision: str
    resolved: bool
    path: str


class QuarantineList(Out):
    items: list[QuarantineEntry]
    total: int | None = Field(description="how many match; null when more than 10,000 do and total=exact "
                                          "was not asked")
    limit: int
    offset: int
    next: str | None = Field(description="the cursor of the next page (?cursor=), null on the last page")


class QuarantineDecision(Model):
    """``index_failed``: retry or discard; ``uid_conflict``: correct (this instance's PatientID wins, every row
    of the UID follows it), new-patient (kept as a new stored file with new UIDs) or discard. A decision
    that does not fit the entry's reason is a 400 (a rule between the body and the entry)."""

    decision: Literal["retry", "discard", "correct", "new-patient"]


# -- health -----------------------------------------------------------------------------
class Check(Out):
    ok: bool
    seconds: float
    error: str = ""
    required: bool = True


class DiskCheck(Check):
    """The storage's free space against ``PACSBRIDGE_DISK_MIN_FREE``: ``ok`` false below it (the listener
    answers 0xA700 then). Reported only (``required`` false): browsing and jobs that only read go on."""

    free_bytes: int = 0
    total_bytes: int = 0
    min_free_bytes: int = 0
    low: bool = False


class Checks(Out):
    database: Check
    broker: Check
    listener: Check
    disk: DiskCheck


class Health(Out):
    status: Literal["ok", "failing"]
    checks: Checks


# -- query strings ----------------------------------------------------------------------
class Args(Model):
    """Query-string parameters: each at most once, at most 256 characters, no unknown name."""


def _whole_number(value: Any) -> Any:
    import re

    if isinstance(value, str):
        if not re.fullmatch(r"[0-9]{1,12}", value):
            raise refuse("expected a whole number")
        return int(value)
    return value


#: ``since``: Unix seconds, or an ISO 8601 date or date-time (of a day that exists: 29 February of a
#: leap year only, which the pattern cannot say).
_MMDD = "((0[1-9]|1[0-2])-(0[1-9]|1[0-9]|2[0-8])|(0[13-9]|1[0-2])-(29|30)|(0[13578]|1[02])-31|02-29)"
SINCE_PATTERN = (r"^([0-9]{1,10}(\.[0-9]{1,9})?|([0-9]{3}[1-9]|[0-9]{2}[1-9]0|[0-9][1-9]00|[1-9]000)-" + _MMDD +
                 r"([T ]([01][0-9]|2[0-3]):[0-5][0-9](:[0-5][0-9](\.[0-9]{1,6})?)?"
                 r"(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])?)?)?$")

Limit = Annotated[int, Field(ge=1, le=MAX_LIMIT), BeforeValidator(_whole_number)]
Offset = Annotated[int, Field(ge=0, le=10**9), BeforeValidator(_whole_number)]


class PageArgs(Args):
    help = {"limit": f"expected 1 to {MAX_LIMIT}", "offset": f"expected 0 to {10**9}"}

    limit: Limit = Field(DEFAULT_LIMIT, description=f"1 to {MAX_LIMIT}")
    offset: Offset = 0


class ListArgs(PageArgs):
    """A list that may be long: paged by ``cursor`` (the ``next`` of the page before), ``offset`` at most
    10,000, ``total`` counted up to 10,000 unless ``total=exact`` (docs/api.md, "Paging")."""

    rules: ClassVar[tuple[str, ...]] = CURSOR_RULES
    help = {**PageArgs.help, "offset": f"expected 0 to {MAX_OFFSET} (deeper: follow `next` with `cursor`)",
            "cursor": "the `next` of a page, as it is", "total": "expected exact or nothing"}

    offset: Annotated[int, Field(ge=0, le=MAX_OFFSET), BeforeValidator(_whole_number)] = Field(
        0, description=f"rows to skip, at most {MAX_OFFSET:,} (deeper pages: `cursor`)")
    cursor: Annotated[str, Field(max_length=256, pattern=r"^[A-Za-z0-9_-]*$")] = Field(
        "", description="the `next` of the page before (same filters)")
    total: Literal["exact", ""] = Field("", description=f"exact: count every match (else up to {TOTAL_CAP:,}, "
                                                        "null beyond)")


class JobListArgs(ListArgs):
    rules: ClassVar[tuple[str, ...]] = ("since: a 29 February only in a leap year (`since`)", *CURSOR_RULES)

    help = {**ListArgs.help, "state": f"expected one of {', '.join(STATES)}",
            "kind": f"expected one of {', '.join(KINDS)}", "node": "a node name has at most 64 characters",
            "since": "Unix seconds or an ISO 8601 date/time"}

    state: Literal[STATES] = None  # type: ignore[valid-type]
    kind: Literal[KINDS] = None  # type: ignore[valid-type]
    node: Annotated[str, Field(max_length=64, pattern=TEXT_PATTERN)] = Field(  # type: ignore[assignment]
        None, description="'' = any")
    since: Annotated[str, Field(max_length=64, pattern=SINCE_PATTERN)] = Field(  # type: ignore[assignment]
        None, description="Unix seconds or ISO 8601 (2024-05-01, 2024-05-01T10:00:00Z)")


class FileArgs(Args):
    help = {"project": "a project name: letters, digits, '_', '.', '-' (at most 64)"}

    project: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")] = Field(  # type: ignore[assignment]
        None, description="de-identify the file under this project (else the file as received, audited)")


class QuarantineArgs(ListArgs):
    help = {**ListArgs.help, "reason": f"expected one of {', '.join(REASONS)}", "resolved": "expected true or false"}

    reason: Literal[(*REASONS, "")] = Field(None, description="'' = any")  # type: ignore[valid-type]
    resolved: Literal["true", "false", ""] = Field(None, description="'' = either")  # type: ignore[arg-type]


# -- de-identification projects --------------------------------------------------------------
_ProjectName = Annotated[str, Field(min_length=1, max_length=64, pattern=PROJECT_NAME_PATTERN)]
_Description = Annotated[str, Field(max_length=255, pattern=TEXT_PATTERN)]


class ProjectOut(Out):
    """A project: its configuration and the size of its map (its key, and the key's check value, never)."""

    name: str
    description: str
    config: ProjectConfig
    created_by: str = Field(description="the token that created it")
    created_at: float
    updated_at: float
    patients: int = Field(description="rows of its pseudonym map")
    uids: int = Field(description="rows of its UID map")
    path: str


class ProjectList(Out):
    items: list[ProjectOut]
    total: int


class ProjectCreate(Model):
    """``POST /projects``: a new project (the API's ``PACSBRIDGE_DEID_SECRET`` makes its key check value)."""

    help = {"name": "letters, digits, '_', '.', '-' (at most 64, starting with a letter or digit)",
            "description": "at most 255 characters, no control characters"}

    name: _ProjectName
    description: _Description = ""
    config: ProjectConfig = Field(default_factory=lambda: ProjectConfig.model_validate({}))


class ProjectPatch(Model):
    """``PATCH /projects/{name}``: the description, and changes merged into the configuration (objects key by
    key, lists and values replaced)."""

    help = {"description": "at most 255 characters, no control characters"}

    description: _Description | None = None
    config: dict[str, Any] | None = Field(
        None, description="merged into the current configuration; the result must be a valid ProjectConfig. "
                          "uid_root, pseudonyms and date_shift cannot change while the project has a map (409), "
                          "except more names at the end of pseudonyms.names")


class MapRow(Out):
    issuer: str = Field(description="IssuerOfPatientID ('' when none)")
    patient_id: str = Field(description="the original PatientID")
    pseudonym: str
    date_offset: int = Field(description="days added to every date of the patient")
    first_used: float
    last_used: float


class MapPage(Out):
    """A page of a project's pseudonym map (every read is audited)."""

    project: str
    items: list[MapRow]
    total: int
    limit: int
    offset: int


class MapArgs(PageArgs):
    help = {**PageArgs.help, "patient_id": "at most 64 characters", "pseudonym": "at most 64 characters",
            "format": "expected json or csv"}

    patient_id: Annotated[str, Field(max_length=64, pattern=TEXT_PATTERN)] = Field(  # type: ignore[assignment]
        None, description="only this original PatientID")
    pseudonym: Annotated[str, Field(max_length=64, pattern=TEXT_PATTERN)] = Field(  # type: ignore[assignment]
        None, description="only this pseudonym")
    format: Literal["json", "csv"] = Field(
        None, description="csv: the whole map (or `limit` rows) as CSV; also chosen by `Accept: text/csv`")  # type: ignore[arg-type]


class AuditRow(Out):
    id: int
    at: float
    actor: str = Field(description="the API token, job, or listener that acted")
    action: str
    project: str
    patient_id: str
    study_uid: str
    target: str
    detail: str


class AuditPage(Out):
    items: list[AuditRow]
    total: int
    limit: int
    offset: int


class AuditArgs(PageArgs):
    rules: ClassVar[tuple[str, ...]] = ("since: a 29 February only in a leap year (`since`)",)

    help = {**PageArgs.help, "action": "at most 32 characters", "project": "at most 64 characters",
            "actor": "at most 64 characters", "since": "Unix seconds or an ISO 8601 date/time"}

    action: Annotated[str, Field(max_length=32, pattern=TEXT_PATTERN)] = Field(  # type: ignore[assignment]
        None, description="e.g. map_read, map_read_refused, project_create")
    project: Annotated[str, Field(max_length=64, pattern=TEXT_PATTERN)] = None  # type: ignore[assignment]
    actor: Annotated[str, Field(max_length=64, pattern=TEXT_PATTERN)] = None  # type: ignore[assignment]
    since: Annotated[str, Field(max_length=64, pattern=SINCE_PATTERN)] = Field(  # type: ignore[assignment]
        None, description="Unix seconds or ISO 8601 (2024-05-01, 2024-05-01T10:00:00Z)")
