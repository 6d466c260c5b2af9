"""pacsbridge's own tables, declared once (docs/architecture.md, contract 3: jobs are rows).

Beside Conquest's tables (whose columns come from ``dicom.sql``, :mod:`.dicomsql`), prefixed so
they never clash with a ``dicom.sql``::

    pacsbridge_nodes          one row per DICOM peer: AE title, address, what it allows, its limits
    pacsbridge_jobs           one row per job: kind, parameters, state, attempts, error, timestamps
    pacsbridge_job_series     per job and series: expected, received, indexed, pushed, failed
    pacsbridge_node_leases    association slots held per node (throttles)
    pacsbridge_node_rates     instances sent per node and second (throttles)
    pacsbridge_stable         series waiting to become stable
    pacsbridge_quarantine     what indexing set aside (a refused instance, a UID of two patients)
    pacsbridge_push_instances per push job and instance: acknowledged or failed
"""

from __future__ import annotations

from sqlalchemy import Boolean, Column, Float, Integer, MetaData, String, Table, Text
from sqlalchemy.engine import Connection

__all__ = ["COUNTERS", "metadata", "nodes_table", "jobs_table", "series_table", "node_leases_table", "node_rates_table",
           "stable_table", "quarantine_table", "instances_table", "upgrade"]

#: The counters of a job's series (columns of ``pacsbridge_job_series``).
COUNTERS = ("expected", "received", "indexed", "pushed", "failed")

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
    # see the job's webhook and worker. Added to older databases by upgrade().
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
    *(Column(c, Integer, nullable=False, default=0) for c in COUNTERS),
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



def upgrade(conn: Connection) -> list[str]:
    """Add the columns of these tables that an older database lacks (each has a server default).

    ``create_all`` makes missing tables only. Returns what was added, as ``table.column``.
    """
    from sqlalchemy import inspect, text
    from sqlalchemy.schema import CreateColumn

    added = []
    insp = inspect(conn)
    for table in metadata.sorted_tables:
        have = {c["name"].lower() for c in insp.get_columns(table.name)}
        for column in table.columns:
            if column.name.lower() not in have:
                # identifiers and types from the metadata above, never from input
                ddl = CreateColumn(column).compile(dialect=conn.dialect)
                conn.execute(text(f"ALTER TABLE {table.name} ADD COLUMN {ddl}"))
                added.append(f"{table.name}.{column.name}")
    return added
