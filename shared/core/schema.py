"""Every table of the index database, declared here and nowhere else (docs/migrations.md).

Conquest's tables (DICOMPatients, DICOMStudies, DICOMSeries, DICOMImages, DICOMWorkList) take their
columns from a ``dicom.sql`` (:mod:`.dicomsql`), so they are built from the parsed file by
:func:`conquest_tables`. pacsbridge's own tables are fixed, declared below on :data:`metadata`, and
prefixed so they never clash with a ``dicom.sql``::

    pacsbridge_nodes          one row per DICOM peer: AE title, address, DICOMweb URLs, what it allows, its limits
    pacsbridge_jobs           one row per job: kind, parameters, state, attempts, error, timestamps
    pacsbridge_job_series     per job and series: expected, received, indexed, pushed, failed
    pacsbridge_node_leases    association slots held per node (throttles)
    pacsbridge_node_rates     instances sent per node and second (throttles)
    pacsbridge_stable         series waiting to become stable
    pacsbridge_quarantine     what indexing set aside (a refused instance, a UID of two patients)
    pacsbridge_push_instances per push job and instance: acknowledged or failed
    pacsbridge_arrivals       who sent each instance, and when (jobs, stable-study detection)
    pacsbridge_cohorts        per cohort job: the input's form, what follows the retrieve, mass transfer
    pacsbridge_cohort_rows    per cohort and input row: its cells, what the query found, its transfer

A change to them is a migration (:mod:`.migrations`): :func:`pacsbridge.shared.core.migrations.upgrade`
brings any older database to what this module declares, and a test fails when the two differ.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import CHAR, Boolean, Column, Float, Index, Integer, MetaData, String, Table, Text
from sqlalchemy.sql.elements import quoted_name

from pacsbridge.shared.core.dicomsql import Schema, TableDef

__all__ = ["COUNTERS", "metadata", "nodes_table", "jobs_table", "series_table", "node_leases_table", "node_rates_table",
           "stable_table", "quarantine_table", "instances_table", "arrivals_table", "projects_table",
           "deid_patients_table", "deid_uids_table", "audit_table", "cohorts_table", "cohort_rows_table",
           "conquest_tables", "ident"]

#: The counters of a job's series (columns of ``pacsbridge_job_series``).
COUNTERS = ("expected", "received", "indexed", "pushed", "failed", "quarantined")

metadata = MetaData()

nodes_table = Table(
    "pacsbridge_nodes", metadata,
    Column("name", String(64), primary_key=True),
    Column("ae_title", String(16), nullable=False),
    Column("host", String(255), nullable=False),
    Column("port", Integer, nullable=False),
    Column("retrieve", String(8), nullable=False, default="move"),
    Column("move_destination", String(16), nullable=False, default=""),
    Column("allow_find", Boolean, nullable=False, default=True),
    Column("allow_move", Boolean, nullable=False, default=True),
    Column("allow_get", Boolean, nullable=False, default=True),
    Column("allow_store", Boolean, nullable=False, default=True),
    Column("max_associations", Integer, nullable=False, default=2),
    Column("max_rate", Float, nullable=False, default=0.0),
    Column("move_window", String(11), nullable=False, default=""),
    Column("description", String(255), nullable=False, default=""),
    # de-identification (0003): the project everything sent to it is de-identified under ("": none), and
    # whether it may receive identifiable data (a research node: false, so a job to it needs a project)
    Column("project", String(64), nullable=False, default="", server_default=""),
    Column("identifiable", Boolean, nullable=False, default=True, server_default="1"),
    # DICOMweb (0005): the endpoint, how to authenticate (the NAME of a secret, never one), TLS, timeout,
    # and the retrieve operations in order of preference
    *[Column(c, String(2048), nullable=False, default="", server_default="")
      for c in ("web_url", "qido_url", "wado_url", "wado_uri_url", "stow_url")],
    Column("web_auth", String(8), nullable=False, default="none", server_default="none"),
    Column("web_user", String(255), nullable=False, default="", server_default=""),
    Column("web_secret", String(128), nullable=False, default="", server_default=""),
    Column("web_verify", Boolean, nullable=False, default=True, server_default="1"),
    Column("web_ca_bundle", String(1024), nullable=False, default="", server_default=""),
    Column("web_timeout", Float, nullable=False, default=60.0, server_default="60"),
    Column("prefer", String(64), nullable=False, default="wado-rs,c-get,c-move",
           server_default="wado-rs,c-get,c-move"),
    # (0006) the DICOMweb secret stored for it, encrypted with PACSBRIDGE_SECRET_KEY ('' = none; never returned)
    Column("web_secret_sealed", Text, nullable=False, default="", server_default=""),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
)

jobs_table = Table(
    "pacsbridge_jobs", metadata,
    Column("id", String(32), primary_key=True),
    Column("kind", String(16), nullable=False, index=True),
    Column("node", String(64), nullable=True, index=True),
    Column("params", Text, nullable=False),
    Column("dedupe_key", String(64), nullable=False, index=True),
    Column("state", String(16), nullable=False, index=True),
    Column("attempts", Integer, nullable=False, default=0),
    Column("error", Text, nullable=False, default=""),
    Column("result", Text, nullable=False, default="{}"),
    Column("webhook", String(2048), nullable=False, default=""),
    Column("worker", String(255), nullable=False, default=""),
    # the name of the API token that submitted the job ("" from the CLI or a rule): it, and admins,
    # see the job's webhook and worker. Added to older databases by migration 0002.
    Column("owner", String(64), nullable=False, default="", server_default=""),
    # what became of the webhook: queued, sent (status), retrying (why), failed or refused (why)
    Column("webhook_status", String(512), nullable=False, default="", server_default=""),
    Column("cancel_requested", Boolean, nullable=False, default=False),
    Column("created_at", Float, nullable=False, index=True),
    Column("enqueued_at", Float, nullable=True),
    Column("started_at", Float, nullable=True),
    Column("heartbeat_at", Float, nullable=True),
    Column("finished_at", Float, nullable=True),
)

series_table = Table(
    "pacsbridge_job_series", metadata,
    Column("job_id", String(32), primary_key=True),
    Column("series_uid", String(64), primary_key=True),
    Column("study_uid", String(64), nullable=False, default=""),
    Column("patient_id", String(64), nullable=False, default=""),
    Column("modality", String(16), nullable=False, default=""),
    Column("description", String(64), nullable=False, default=""),
    *(Column(c, Integer, nullable=False, default=0) for c in COUNTERS if c != "quarantined"),
    Column("quarantined", Integer, nullable=False, default=0, server_default="0"),  # 0003
    Column("state", String(16), nullable=False, default="queued"),
    Column("error", Text, nullable=False, default=""),
)

# Per-node limits shared by every worker (pacsbridge.shared.nodes.throttle): one row per held
# association slot (a lease that expires if its holder dies), and the rate limiter's clock.
node_leases_table = Table(
    "pacsbridge_node_leases", metadata,
    Column("node", String(64), primary_key=True),
    Column("slot", Integer, primary_key=True),
    Column("holder", String(128), nullable=False),
    Column("acquired_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
)

node_rates_table = Table(
    "pacsbridge_node_rates", metadata,
    Column("node", String(64), primary_key=True),
    Column("next_at", Float, nullable=False),
)

# Series and studies seen arriving, and when they went quiet (pacsbridge.worker.stable).
stable_table = Table(
    "pacsbridge_stable", metadata,
    Column("level", String(8), primary_key=True),          # "series" or "study"
    Column("uid", String(64), primary_key=True),
    Column("study_uid", String(64), nullable=False, default=""),
    Column("patient_id", String(64), nullable=False, default=""),
    Column("instances", Integer, nullable=False, default=0),
    Column("last_arrival", Float, nullable=False),
    Column("stable_at", Float, nullable=True, index=True),
)

# What indexing set aside (pacsbridge.shared.index.quarantine): an instance whose rows the database
# refused (index_failed), or one whose UID is already indexed under another patient (uid_conflict).
quarantine_table = Table(
    "pacsbridge_quarantine", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("relpath", String(255), nullable=False, index=True),  # where the file lies, relative to the root
    Column("reason", String(16), nullable=False, index=True),    # index_failed | uid_conflict
    Column("detail", Text, nullable=False, default=""),
    Column("level", String(8), nullable=False, default=""),      # uid_conflict: study, series or image
    Column("sop_uid", String(64), nullable=False, default="", index=True),
    Column("series_uid", String(64), nullable=False, default=""),
    Column("study_uid", String(64), nullable=False, default=""),
    Column("patient_id", String(64), nullable=False, default=""),        # of this instance
    Column("other_patient_id", String(64), nullable=False, default=""),  # already indexed under the UID
    Column("original_relpath", String(255), nullable=False, default=""),
    Column("attempts", Integer, nullable=False, default=1),
    Column("created_at", Float, nullable=False, index=True),
    Column("resolved_at", Float, nullable=True, index=True),
    Column("resolved_by", String(64), nullable=False, default=""),
    Column("decision", String(16), nullable=False, default=""),
)


#: One row per instance of a push job that ended: acknowledged (``stored``) or ``failed``.
instances_table = Table(
    "pacsbridge_push_instances", metadata,
    Column("job_id", String(32), primary_key=True),
    Column("sop_uid", String(64), primary_key=True),
    Column("series_uid", String(64), nullable=False, default=""),
    Column("outcome", String(8), nullable=False),
    Column("status", Integer, nullable=True),
    Column("error", Text, nullable=False, default=""),
    Column("fallback", Integer, nullable=False, default=0),
    Column("at", Float, nullable=False),
)


# -- de-identification (migration 0003, shared/deid) -----------------------------------------------
#: A research project: how data leaving under it is de-identified (``config``: the JSON of
#: :class:`pacsbridge.shared.deid.options.ProjectConfig`) and the check value of its key (never the key).
projects_table = Table(
    "pacsbridge_projects", metadata,
    Column("name", String(64), primary_key=True),
    Column("description", String(255), nullable=False, default=""),
    Column("config", Text, nullable=False),
    Column("key_check", String(64), nullable=False),
    Column("created_by", String(64), nullable=False, default=""),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
)

#: The pseudonym map: one row per (project, issuer, original PatientID).
deid_patients_table = Table(
    "pacsbridge_deid_patients", metadata,
    Column("project", String(64), primary_key=True),
    Column("issuer", String(64), primary_key=True),        # IssuerOfPatientID ("" when none)
    Column("patient_id", String(64), primary_key=True),    # the original
    Column("pseudonym", String(64), nullable=False),
    Column("date_offset", Integer, nullable=False),        # days added to every date of the patient
    Column("first_used", Float, nullable=False),
    Column("last_used", Float, nullable=False),
    Index("pacsbridge_deid_patients_pseudonym", "project", "pseudonym", unique=True),
)

#: Original -> new UIDs of everything sent under a project (the way back for results that come home).
deid_uids_table = Table(
    "pacsbridge_deid_uids", metadata,
    Column("project", String(64), primary_key=True),
    Column("original", String(64), primary_key=True),
    Column("new", String(64), nullable=False),
    Column("level", String(8), nullable=False, default=""),   # study | series | instance | other
    Column("issuer", String(64), nullable=False, default=""),
    Column("patient_id", String(64), nullable=False, default=""),
    Column("first_used", Float, nullable=False),
    Index("pacsbridge_deid_uids_new", "project", "new", unique=True),
)

#: Append-only (no code updates or deletes it; PostgreSQL and SQLite triggers refuse it): every read of
#: a map, every re-identification, every way out of identifiable data.
audit_table = Table(
    "pacsbridge_audit", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", Float, nullable=False, index=True),
    Column("actor", String(64), nullable=False, default=""),     # API token name, job id, or "listener"
    Column("action", String(32), nullable=False, index=True),    # e.g. map_read, reidentify, push, repack
    Column("project", String(64), nullable=False, default="", index=True),
    Column("patient_id", String(64), nullable=False, default=""),
    Column("study_uid", String(64), nullable=False, default=""),
    Column("target", String(255), nullable=False, default=""),   # node, folder, or what was read
    Column("detail", Text, nullable=False, default=""),
)


# -- cohorts (migration 0004, shared/cohorts) ---------------------------------------------------------
#: A cohort is a job of kind ``cohort`` (same id): what its input looked like (to hand back its failed
#: rows in the same form), whether its transfer was asked for, what follows each retrieve, a mass transfer.
cohorts_table = Table(
    "pacsbridge_cohorts", metadata,
    Column("job_id", String(32), primary_key=True),
    Column("format", String(8), nullable=False),                  # csv | xlsx | json
    Column("form", Text, nullable=False),                         # JSON: headers as written, delimiter ...
    Column("transfer", Boolean, nullable=False, default=False),  # False: a dry run (query only) so far
    Column("then", Text, nullable=False, default="{}"),           # JSON: {} | {"push": node} | {"repack": {...}}
    Column("mass", Text, nullable=False, default=""),             # JSON of a mass transfer, "" for rows
    Column("created_at", Float, nullable=False),
)

#: One row per input row (or mass-transfer chunk): its cells as written, what the query found, how its
#: transfer went (counters summed over its child jobs).
cohort_rows_table = Table(
    "pacsbridge_cohort_rows", metadata,
    Column("job_id", String(32), primary_key=True),
    Column("number", Integer, primary_key=True, autoincrement=False),  # as the user sees it in the file
    Column("cells", Text, nullable=False),                        # JSON: header as written -> text
    Column("spec", Text, nullable=False),                         # JSON of the parsed row
    Column("duplicate_of", Integer, nullable=True),
    Column("state", String(16), nullable=False),
    Column("reason", Text, nullable=False, default=""),
    Column("patient_id", String(64), nullable=False, default=""),
    Column("issuer", String(64), nullable=False, default=""),
    Column("studies", Text, nullable=False, default="[]"),         # JSON: what the query found
    *(Column(c, Integer, nullable=False, default=0)
      for c in ("series", "expected", "held", "received", "sent", "quarantined", "failed")),
    Column("children", Text, nullable=False, default="[]"),       # JSON: ids of its retrieve/push/repack jobs
    Column("updated_at", Float, nullable=False),
    Index("pacsbridge_cohort_rows_state", "job_id", "state"),
)


# Not Conquest's: who sent each instance, and when (jobs and stable-study detection). With the index
# (Index.tables["Arrival"]): ``init --force`` empties it with Conquest's tables.
arrivals_table = Table(
    "pacsbridge_arrivals", metadata,
    Column("sop_uid", String(64), primary_key=True, autoincrement=False),
    Column("series_uid", String(64), index=True),
    Column("study_uid", String(64), index=True),
    Column("patient_id", String(64)),
    Column("calling_ae", String(16)),
    Column("association", String(36)),
    Column("arrived_at", Float, index=True),
    Column("object_file", String(255)),
)


# -- Conquest's tables, from a dicom.sql ----------------------------------------------------------
#: Tag of PatientID (0010,0020).
_PATIENT_ID = 0x00100020
#: Columns queried by value beyond the keys and links, by level: StudyDate (0008,0020) and
#: AccessionNumber (0008,0050) of a study (docs/index-and-storage.md, "Indexes").
_QUERIED = {"Study": (0x00080020, 0x00080050)}


def ident(name: str) -> quoted_name:
    """An identifier SQLAlchemy renders unquoted (PostgreSQL folds it)."""
    return quoted_name(name, quote=False)


def _sa_type(col: Any) -> Any:
    if col.sql_type == "SQL_C_DATE":
        return CHAR(8)
    if col.length > 1000:
        return Text()
    return String(col.length)


def _conquest_table(metadata: MetaData, tdef: TableDef, fold: bool) -> Table:
    def name(n: str) -> quoted_name:
        return ident(n.lower() if fold else n)

    def col(n: str, *args: Any, **kw: Any) -> Column:  # type: ignore[type-arg]
        return Column(name(n), *args, key=n, **kw)

    cols = []
    for i, c in enumerate(tdef.columns):
        primary = i == 0 and tdef.level != "WorkList"
        cols.append(col(c.column, _sa_type(c), primary_key=primary, nullable=not primary, autoincrement=False))
    cols += [col("AccessTime", Integer), col("qTimeStamp", Integer), col("qFlags", Integer),
             col("qSpare", String(64))]
    if tdef.level == "Image":
        cols += [col("ObjectFile", String(255)), col("DeviceName", String(32))]
    table = Table(name(tdef.table), metadata, *cols)
    lower = tdef.table.lower()
    parent = tdef.parent
    if parent is not None:
        # Conquest indexes the link to the parent, and (parent, key) pairs
        Index(ident(f"{lower}_{parent.column.lower()}"), table.c[parent.column])
        Index(ident(f"{lower}_{parent.column.lower()}_key"), table.c[parent.column], table.c[tdef.key.column])
    pid = tdef.by_tag(_PATIENT_ID)
    if tdef.level in ("Series", "Image") and pid is not None and pid is not parent:
        Index(ident(f"{lower}_{pid.column.lower()}"), table.c[pid.column])
    if tdef.level == "Image":
        Index(ident(f"{lower}_objectfile"), table.c["ObjectFile"])
    for tag in _QUERIED.get(tdef.level, ()):
        # what the API's browse and cohorts look studies up by (revision 0006 adds them to older indexes)
        queried = tdef.by_tag(tag)
        if queried is not None and queried is not tdef.key and queried is not parent:
            Index(ident(f"{lower}_{queried.column.lower()}"), table.c[queried.column])
    return table


def conquest_tables(schema: Schema, fold: bool = False, metadata: MetaData | None = None) -> dict[str, Table]:
    """Conquest's tables for every section of a parsed ``dicom.sql``, by level, on ``metadata``.

    Identifiers are never quoted, so PostgreSQL folds them to lower case exactly as it does in a
    user's hand-written SQL. ``fold`` gives lower-case names (PostgreSQL); SQLite keeps Conquest's
    spelling, so ``select *`` returns ``SeriesInst`` as pyconquest code expects. Column keys are
    always Conquest's spelling. Their columns follow the user's file, so no migration names them:
    :func:`pacsbridge.shared.core.migrations.upgrade` creates what the database lacks of them.
    """
    metadata = MetaData() if metadata is None else metadata
    return {level: _conquest_table(metadata, tdef, fold) for level, tdef in schema.tables.items()}
