"""The Conquest-compatible index (DICOMPatients / Studies / Series / Images).

Its tables are declared by :func:`pacsbridge.shared.core.schema.conquest_tables`
from a parsed ``dicom.sql``, and made or brought up to date by the migrations
(:meth:`Index.create`). Identifiers are never quoted, so PostgreSQL folds them
to lower case exactly as it does in a user's hand-written SQL, and
``select SeriesInst from DICOMSeries`` runs unchanged on SQLite and on
PostgreSQL.

Writes follow Conquest: each instance upserts its image, series, study and
patient rows keyed on the first column; a value absent from a new instance
never erases one already stored; StudyModality accumulates the modalities of
the study's series. Upserts are idempotent and run many instances per
transaction, rows locked in key order (parents first) so that concurrent
workers cannot deadlock.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
import time
from typing import Any, Iterable, Iterator, Sequence

from sqlalchemy import (MetaData, String, Table, bindparam, func, inspect, literal, select, text, union_all,
                        update)
from sqlalchemy.engine import Connection, Engine

from pacsbridge.shared.core.dicomsql import LEVELS, Schema
from pacsbridge.shared.core.errors import IndexError_, QueryError
from pacsbridge.shared.core.schema import arrivals_table, conquest_tables, ident
from pacsbridge.shared.index.records import Rows

__all__ = ["Index", "ident"]

log = logging.getLogger(__name__)

#: Tag of StudyModality (0008,0061) and Modality (0008,0060).
_STUDY_MODALITY = 0x00080061
_MODALITY = 0x00080060
_PATIENT_ID = 0x00100020


_PLAIN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})
_ROW_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r", "\x00": "\t", "\x01": "\\N"})


def _copy_text(value: Any) -> str:
    """One value in COPY's text format: NULL is ``\\N``; backslash, tab and line ends escaped."""
    if value is None:
        return "\\N"
    return str(value).translate(_COPY_ESCAPES)


def _merge_modalities(*values: str | None) -> str | None:
    seen: list[str] = []
    for value in values:
        for part in (value or "").split("\\"):
            part = part.strip()
            if part and part not in seen:
                seen.append(part)
    return "\\".join(seen) or None


class Index:
    """The index database of one pacsbridge installation.

    Parameters
    ----------
    engine : Engine
        SQLite or PostgreSQL (see :func:`pacsbridge.shared.core.db.make_engine`).
    schema : Schema
        The parsed ``dicom.sql``.
    """

    def __init__(self, engine: Engine, schema: Schema) -> None:
        self.engine = engine
        self.schema = schema
        self.dialect = engine.dialect.name
        #: Conquest's tables, from the dicom.sql (on a MetaData of their own)
        self.metadata = MetaData()
        self.tables: dict[str, Table] = conquest_tables(schema, fold=self.dialect == "postgresql",
                                                        metadata=self.metadata)
        # not Conquest's: who sent each instance, and when (for jobs and stable-study detection)
        self.tables["Arrival"] = arrivals_table
        insert: Any
        if self.dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        elif self.dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert  # type: ignore[no-redef]
        else:  # pragma: no cover - make_engine refuses others
            raise IndexError_(f"unsupported database {self.dialect}")
        self._insert = insert
        self._upserts = {level: self._upsert_statement(level) for level in LEVELS}
        self._copy_sql = ({level: self._copy_statements(level) for level in LEVELS}
                          if self.dialect == "postgresql" else {})
        st = schema["Study"].by_tag(_STUDY_MODALITY)
        mo = schema["Series"].by_tag(_MODALITY)
        self._study_modality: Any = st.column if st is not None else None
        self._study_modality_len = st.length if st is not None else 0
        self._series_modality: Any = mo.column if mo is not None else None

    # -- schema -------------------------------------------------------------
    def create(self, force: bool = False) -> list[str]:
        """Bring the database to the current schema (the migrations, docs/migrations.md); returns what was done.

        Every table is made or completed: pacsbridge's (jobs, nodes, ...) by the revisions,
        Conquest's from this index's ``dicom.sql`` (a column the file has and the table lacks is
        added). Nothing is dropped, except with ``force``, pyconquest's
        ``create_standard_dicom_tables``: it empties the index (Conquest's tables and the
        arrivals), never the storage, and never the tables of nodes and jobs.
        """
        from sqlalchemy.exc import DBAPIError

        from pacsbridge.shared.core import migrations

        index = [*self.metadata.sorted_tables, arrivals_table]
        for attempt in range(5):
            try:
                with self.engine.begin() as conn:
                    return migrations.upgrade(conn, index, drop=index if force else ())
            except DBAPIError:
                # another process (a second API or worker process starting at the same moment) was
                # creating the same table, and the lock did not cover it: check again
                if attempt == 4:
                    raise
                time.sleep(0.1 * (attempt + 1))
        raise AssertionError("unreachable")  # pragma: no cover

    def exists(self) -> bool:
        """True when the image table exists."""
        names = {n.lower() for n in inspect(self.engine).get_table_names()}
        return self.schema["Image"].table.lower() in names

    def check_columns(self) -> list[str]:
        """Columns the schema defines but the database lacks (an old dicom.sql): none after :meth:`create`,
        which adds them, except a key column of another dicom.sql (``init --force`` and ``rebuild``)."""
        insp = inspect(self.engine)
        missing = []
        for level in LEVELS:
            table = self.tables[level]
            have = {c["name"].lower() for c in insp.get_columns(str(table.name))}
            missing += [f"{table.name}.{c.key}" for c in table.columns if c.name.lower() not in have]
        return missing

    # -- writes -------------------------------------------------------------
    def _upsert_statement(self, level: str) -> Any:
        table = self.tables[level]
        key = self.schema[level].key.column
        stmt: Any = self._insert(table)
        keep_first = {"qTimeStamp", "AccessTime", "qFlags", "qSpare"}
        changes = {c: func.coalesce(stmt.excluded[c.key], c)
                   for c in table.columns if c.key != key and c.key not in keep_first}
        modality = self._study_modality_col(table) if level == "Study" else None
        if modality:  # set afterwards from the series, see _update_study_modalities
            changes.pop(table.c[modality], None)
        stmt = stmt.on_conflict_do_update(index_elements=[table.c[key]], set_=changes)
        if self.dialect == "postgresql":
            # with RETURNING, SQLAlchemy batches an ON CONFLICT executemany into multi-row
            # VALUES ("insertmanyvalues"); without it psycopg2 makes one round trip per row
            stmt = stmt.returning(table.c[key])
        return stmt

    def _copy_statements(self, level: str) -> tuple[str, str, str]:
        """PostgreSQL: (create the staging table, COPY into it, upsert from it) for one level.

        The staging table is a temporary table of the session, emptied at commit, named after the
        table and its columns (a column added later gives another name, never a stale table).
        Identifiers are the dicom.sql's, which its parser admits only as plain identifiers.
        """
        table = self.tables[level]
        names = [str(c.name) for c in table.columns]
        for name in [str(table.name), *names]:
            if not _PLAIN.fullmatch(name):
                raise IndexError_(f"{name!r} is not a plain identifier")
        key = str(table.c[self.schema[level].key.column].name)
        digest = hashlib.blake2b(",".join(names).encode(), digest_size=4).hexdigest()
        stage = f"pb_stage_{str(table.name).lower()}_{digest}"
        keep = {str(table.c[k].name) for k in ("qTimeStamp", "AccessTime", "qFlags", "qSpare")}
        modality = self._study_modality_col(table) if level == "Study" else None
        if modality:  # set afterwards from the series, see _update_study_modalities
            keep.add(str(table.c[modality].name))
        cols = ", ".join(names)
        changes = ", ".join(f"{n} = COALESCE(EXCLUDED.{n}, t.{n})" for n in names if n != key and n not in keep)
        create = f"CREATE TEMP TABLE IF NOT EXISTS {stage} (LIKE {table.name}) ON COMMIT DELETE ROWS"
        copy = f"COPY {stage} ({cols}) FROM STDIN"
        upsert = (f"INSERT INTO {table.name} AS t ({cols}) SELECT {cols} FROM {stage} ORDER BY {key} "
                  f"ON CONFLICT ({key}) DO UPDATE SET {changes}; DELETE FROM {stage}")
        return create, copy, upsert

    def _copy_upsert(self, conn: Connection, level: str, columns: list[str], params: list[dict[str, Any]]) -> None:
        """PostgreSQL: upsert ``params`` through COPY into a staging table and one INSERT ... SELECT.

        Four times faster than a multi-row INSERT of the same rows (measured on 2,000 CT: the
        server parses one short statement instead of 27 parameters per row). The same rows, the same
        ``ON CONFLICT`` as :meth:`_upsert_statement`; errors come out as SQLAlchemy's (a refused value
        is a ``DataError``, an outage an ``OperationalError``), so batches are split or retried alike.
        """
        from sqlalchemy.exc import DBAPIError

        create, copy, upsert = self._copy_sql[level]
        buf = io.StringIO()
        last = len(columns) - 1
        for row in params:
            values = [row[c] for c in columns]
            # one translate per row: NUL stands for the tab between values and \x01 for NULL ...
            line = "\x00".join(["\x01" if v is None else v if type(v) is str else str(v) for v in values])
            if line.count("\x00") == last and line.count("\x01") == values.count(None):
                buf.write(line.translate(_ROW_ESCAPES))
            else:  # ... unless a value holds one of them (the database refuses a NUL anyway)
                buf.write("\t".join(_copy_text(v) for v in values))
            buf.write("\n")
        buf.seek(0)
        raw = conn.connection.dbapi_connection
        assert raw is not None
        dbapi = conn.dialect.loaded_dbapi
        cur: Any = raw.cursor()
        try:
            cur.execute(create)
            cur.copy_expert(copy, buf)
            cur.execute(upsert)
        except dbapi.Error as exc:
            raise DBAPIError.instance(copy, None, exc, dbapi.Error, dialect=conn.dialect) from exc
        finally:
            cur.close()

    def _study_modality_col(self, table: Table) -> str | None:
        col = self.schema["Study"].by_tag(_STUDY_MODALITY)
        return col.column if col is not None else None

    @staticmethod
    def _merge(rows: Iterable[dict[str, Any]], key: str) -> dict[Any, dict[str, Any]]:
        merged: dict[Any, dict[str, Any]] = {}
        for row in rows:
            have = merged.get(row[key])
            if have is None:
                merged[row[key]] = dict(row)
            else:
                for k, v in row.items():
                    if v is not None:
                        have[k] = v
        return merged

    def upsert(self, batch: Sequence[Rows], conn: Connection | None = None) -> int:
        """Index a batch of instances in one transaction; returns the number of images.

        Idempotent: indexing the same instances again changes nothing.
        """
        if not batch:
            return 0
        if conn is None:
            with self.engine.begin() as own:
                return self.upsert(batch, own)
        now = int(time.time())
        study_modalities: dict[str, str | None] = {}
        for level in LEVELS:  # parents first, keys sorted: a fixed lock order
            key = self.schema[level].key.column
            merged = self._merge((rows[level] for rows in batch), key)
            if level == "Study" and self._study_modality:
                study_modalities = {k: r.get(self._study_modality) for k, r in merged.items()}
            columns = [c.key for c in self.tables[level].columns]
            params = []
            for k in sorted(merged):
                row = merged[k]
                params.append({c: row.get(c) for c in columns} | {"qTimeStamp": now})
            if self.dialect == "postgresql":
                self._copy_upsert(conn, level, columns, params)
            else:
                conn.execute(self._upserts[level], params)
        if self._study_modality and self._series_modality:
            self._update_study_modalities(conn, study_modalities)
        return len({rows["Image"][self.schema["Image"].key.column] for rows in batch})

    def _update_study_modalities(self, conn: Connection, from_instances: dict[str, str | None]) -> None:
        studies, series = self.tables["Study"], self.tables["Series"]
        skey = self.schema["Study"].key.column
        link = self.schema["Series"].parent.column  # type: ignore[union-attr]
        keys = sorted(from_instances)
        found: dict[str, list[str | None]] = {k: [] for k in keys}
        existing = conn.execute(
            select(studies.c[skey], studies.c[self._study_modality]).where(studies.c[skey].in_(keys))).all()
        for k, value in existing:
            found[k].append(value)
        for k, modality in conn.execute(
                select(series.c[link], series.c[self._series_modality])
                .where(series.c[link].in_(keys)).order_by(series.c[link], series.c[self.schema["Series"].key.column])
        ).all():
            found[k].append(modality)
        params = []
        for k in keys:
            merged = _merge_modalities(*found[k], from_instances[k])
            if merged is not None:
                params.append({"k": k, "m": merged[: self._study_modality_len]})
        if params:
            conn.execute(update(studies).where(studies.c[skey] == bindparam("k"))
                         .values({studies.c[self._study_modality]: bindparam("m")}), params)

    def record_arrivals(self, arrivals: Sequence[dict[str, Any]], conn: Connection | None = None) -> None:
        """Remember who sent each instance and when (the latest arrival wins)."""
        if not arrivals:
            return
        if conn is None:
            with self.engine.begin() as own:
                return self.record_arrivals(arrivals, own)
        table = self.tables["Arrival"]
        latest = {a["sop_uid"]: a for a in sorted(arrivals, key=lambda a: a["arrived_at"])}
        stmt: Any = self._insert(table)
        stmt = stmt.on_conflict_do_update(
            index_elements=[table.c.sop_uid],
            set_={c: stmt.excluded[c.key] for c in table.columns if c.key != "sop_uid"},
            where=stmt.excluded.arrived_at >= table.c.arrived_at)
        if self.dialect == "postgresql":
            stmt = stmt.returning(table.c.sop_uid)  # batched, see _upsert_statement
        conn.execute(stmt, [latest[k] for k in sorted(latest)])

    # -- reads --------------------------------------------------------------
    def count(self, level: str = "Image") -> int:
        """Rows in one table."""
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(self.tables[level])).scalar_one())

    def object_files(self, device: str = "MAG0") -> set[str]:
        """ObjectFile of every image on ``device``."""
        images = self.tables["Image"]
        with self.engine.connect() as conn:
            rows = conn.execute(select(images.c.ObjectFile).where(images.c.DeviceName == device))
            return {r[0] for r in rows}

    def object_files_among(self, paths: Sequence[str], device: str = "MAG0") -> set[str]:
        """Those of ``paths`` that are the ObjectFile of an image on ``device`` (one query per 500,
        on the ObjectFile index): ``rebuild --missing`` a chunk of its walk at a time."""
        images = self.tables["Image"]
        out: set[str] = set()
        with self.engine.connect() as conn:
            for i in range(0, len(paths), 500):
                chunk = list(paths[i:i + 500])
                out.update(r[0] for r in conn.execute(
                    select(images.c.ObjectFile).where(images.c.DeviceName == device)
                    .where(images.c.ObjectFile.in_(chunk))))
        return out

    def iter_object_files(self, page: int = 1000,
                          device: str = "MAG0") -> Iterator[list[tuple[str, str]]]:
        """``[(SOPInstanceUID, ObjectFile), ...]`` of the images on ``device``, a page at a time in key
        order (keyset: each page one indexed range query), so that a walk of 20 M rows holds one page."""
        images = self.tables["Image"]
        key = images.c[self.schema["Image"].key.column]
        last = None
        while True:
            stmt = select(key, images.c.ObjectFile).where(images.c.DeviceName == device)
            if last is not None:
                stmt = stmt.where(key > last)
            with self.engine.connect() as conn:
                rows = [(r[0], r[1]) for r in conn.execute(stmt.order_by(key).limit(page))]
            if not rows:
                return
            yield rows
            last = rows[-1][0]

    def lookup_sop(self, sop_uids: Sequence[str]) -> dict[str, tuple[str, str]]:
        """``{SOPInstanceUID: (ObjectFile, DeviceName)}`` for those already indexed."""
        images = self.tables["Image"]
        key = self.schema["Image"].key.column
        out: dict[str, tuple[str, str]] = {}
        with self.engine.connect() as conn:
            for i in range(0, len(sop_uids), 500):
                chunk = list(sop_uids[i:i + 500])
                for sop, path, dev in conn.execute(
                        select(images.c[key], images.c.ObjectFile, images.c.DeviceName)
                        .where(images.c[key].in_(chunk))):
                    out[sop] = (path, dev)
        return out

    def owners(self, studies: Sequence[str], series: Sequence[str],
               sops: Sequence[str]) -> tuple[dict[str, dict[str, str | None]], dict[str, tuple[str, str]]]:
        """The PatientID each given UID is indexed under, in one round trip:
        ``({"Study"|"Series"|"Image": {uid: patient}}, {sop: (ObjectFile, DeviceName)})``.

        UIDs not indexed are absent; a level whose table has no PatientID column is empty
        (its UIDs are still looked up for the second dict, which is :meth:`lookup_sop`'s).
        """
        out: dict[str, dict[str, str | None]] = {"Study": {}, "Series": {}, "Image": {}}
        files: dict[str, tuple[str, str]] = {}
        studies, series, sops = sorted(set(studies)), sorted(set(series)), sorted(set(sops))
        with self.engine.connect() as conn:
            for i in range(0, max(len(studies), len(series), len(sops)), 500):
                parts = []
                for level, uids in (("Study", studies[i:i + 500]), ("Series", series[i:i + 500]),
                                    ("Image", sops[i:i + 500])):
                    pid = self._patient_column(level)
                    if not uids or (pid is None and level != "Image"):
                        continue
                    table, key = self.tables[level], self.schema[level].key.column
                    patient = table.c[pid] if pid is not None else literal(None, String())
                    where_ = table.c[key].in_(uids)
                    if level == "Image":
                        parts.append(select(literal(level).label("level"), table.c[key].label("uid"),
                                            patient.label("patient"), table.c.ObjectFile.label("f"),
                                            table.c.DeviceName.label("d")).where(where_))
                    else:
                        parts.append(select(literal(level).label("level"), table.c[key].label("uid"),
                                            patient.label("patient"), literal(None, String()).label("f"),
                                            literal(None, String()).label("d")).where(where_))
                if not parts:
                    continue
                stmt = parts[0] if len(parts) == 1 else union_all(*parts)
                for level, uid, patient, path, device in conn.execute(stmt):
                    if level == "Image":
                        files[uid] = (path, device)
                        if self._patient_column("Image") is None:
                            continue
                    out[level][uid] = patient
        return out, files

    def _patient_column(self, level: str) -> str | None:
        tdef = self.schema[level]
        col = tdef.parent if level == "Study" else tdef.by_tag(_PATIENT_ID)
        return col.column if col is not None else None

    def reassign(self, level: str, uid: str, patient: str, conn: Connection | None = None) -> int:
        """Give a study, series or image and everything under it PatientID ``patient`` (a correction).

        Returns the number of image rows that now say ``patient``.
        """
        if conn is None:
            with self.engine.begin() as own:
                return self.reassign(level, uid, patient, own)
        study, series, image = self.tables["Study"], self.tables["Series"], self.tables["Image"]
        skey, sekey, ikey = (self.schema[lv].key.column for lv in ("Study", "Series", "Image"))
        selink = self.schema["Series"].parent.column  # type: ignore[union-attr]
        ilink = self.schema["Image"].parent.column  # type: ignore[union-attr]
        if level == "Study":
            series_uids = [r[0] for r in conn.execute(select(series.c[sekey]).where(series.c[selink] == uid))]
            sops = [r[0] for r in conn.execute(select(image.c[ikey]).where(image.c[ilink].in_(series_uids)))] \
                if series_uids else []
        elif level == "Series":
            series_uids = [uid]
            sops = [r[0] for r in conn.execute(select(image.c[ikey]).where(image.c[ilink] == uid))]
        else:
            series_uids, sops = [], [uid]
        spid = self._patient_column("Study")
        before = set()
        if level == "Study" and spid is not None:
            before = {r[0] for r in conn.execute(select(study.c[spid]).where(study.c[skey] == uid))} - {patient}
        changes = [("Study", [uid] if level == "Study" else []), ("Series", series_uids), ("Image", sops)]
        for lv, uids in changes:
            pid = self._patient_column(lv)
            if pid is None or not uids:
                continue
            table, key = self.tables[lv], self.schema[lv].key.column
            for i in range(0, len(uids), 500):
                conn.execute(update(table).where(table.c[key].in_(uids[i:i + 500])).values({table.c[pid]: patient}))
        patients, pkey = self.tables["Patient"], self.schema["Patient"].key.column
        for old in before:  # the patient the study was taken from, if nothing of theirs is left
            if spid is not None and conn.execute(select(study.c[skey]).where(study.c[spid] == old).limit(1)).first() \
                    is None:
                conn.execute(patients.delete().where(patients.c[pkey] == old))
        return len(sops)

    def files_for(self, *, patient: str | None = None, study: str | None = None,
                  series: Sequence[str] | None = None, sops: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """Image rows (ObjectFile, DeviceName, keys) selected by patient, study, series or SOP UIDs.

        Values are bound parameters; nothing is pasted into SQL.
        """
        img, ser = self.tables["Image"], self.tables["Series"]
        ikey = self.schema["Image"].key.column
        ilink = self.schema["Image"].parent.column  # type: ignore[union-attr]
        skey = self.schema["Series"].key.column
        slink = self.schema["Series"].parent.column  # type: ignore[union-attr]
        pid = self.schema["Series"].by_tag(_PATIENT_ID)
        stmt = select(img.c[ikey].label("sop"), img.c[ilink].label("series"), img.c.ObjectFile.label("ObjectFile"),
                      img.c.DeviceName.label("DeviceName"),
                      ser.c[slink].label("study")).join(ser, ser.c[skey] == img.c[ilink], isouter=True)
        if patient is not None:
            if pid is None:
                raise QueryError("this dicom.sql has no PatientID column in DICOMSeries")
            stmt = stmt.where(ser.c[pid.column] == patient)
        if study is not None:
            stmt = stmt.where(ser.c[slink] == study)
        if series is not None:
            stmt = stmt.where(img.c[ilink].in_(list(series)))
        if sops is not None:
            stmt = stmt.where(img.c[ikey].in_(list(sops)))
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(stmt.order_by(img.c[ilink], img.c[ikey]))]

    def delete_images(self, sop_uids: Sequence[str]) -> int:
        """Remove image rows (not files): used when pruning rows whose file is gone."""
        images = self.tables["Image"]
        key = self.schema["Image"].key.column
        n = 0
        with self.engine.begin() as conn:
            for i in range(0, len(sop_uids), 500):
                n += conn.execute(images.delete().where(images.c[key].in_(list(sop_uids[i:i + 500])))).rowcount
        return n

    def run_sql(self, sql: str, write: bool = False) -> tuple[list[str], list[tuple[Any, ...]]]:
        """Run a user's SQL (Conquest/pyconquest queries) and return (columns, rows).

        The statement runs in a transaction that is rolled back unless
        ``write`` is true, so a stray UPDATE cannot change the index by accident.

        Raises
        ------
        QueryError
            The database refused the statement; the message is the database's.
        """
        with self.engine.connect() as conn:
            trans = conn.begin()
            try:
                result = conn.exec_driver_sql(sql)
                if result.returns_rows:
                    columns = list(result.keys())
                    rows = [tuple(r) for r in result.all()]
                else:
                    columns, rows = ["rows affected"], [(result.rowcount,)]
            except Exception as exc:
                trans.rollback()
                orig = getattr(exc, "orig", exc)
                raise QueryError(str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__) \
                    from None
            if write:
                trans.commit()
            else:
                trans.rollback()
            return columns, rows

    def series_summary(self) -> tuple[list[str], list[tuple[Any, ...]]]:
        """pyconquest's ``dicom_series_summary``: series per modality for each patient."""
        ser = self.tables["Series"]
        pid = self.schema["Series"].by_tag(_PATIENT_ID)
        mod = self._series_modality
        if pid is None or mod is None:
            raise QueryError("this dicom.sql has no PatientID or Modality column in DICOMSeries")
        img = self.tables["Image"]
        ilink = self.schema["Image"].parent.column  # type: ignore[union-attr]
        skey = self.schema["Series"].key.column
        with self.engine.connect() as conn:
            per = conn.execute(select(ser.c[pid.column], ser.c[mod], func.count())
                               .group_by(ser.c[pid.column], ser.c[mod])).all()
            images: dict[Any, int] = dict(conn.execute(select(ser.c[pid.column], func.count())
                                       .select_from(img.join(ser, ser.c[skey] == img.c[ilink]))
                                       .group_by(ser.c[pid.column])).all())
        standard = ["CT", "MR", "PT", "RTSTRUCT", "RTDOSE", "RTPLAN"]
        modalities = standard + sorted({m or "?" for _, m, _ in per} - set(standard))
        table: dict[str, dict[str, int]] = {}
        for patient, modality, n in per:
            table.setdefault(patient or "", {})[modality or "?"] = n
        columns = ["PatientID"] + [f"nr{m}" for m in modalities] + ["images"]
        rows = [tuple([p] + [table[p].get(m, 0) for m in modalities] + [images.get(p, 0)])
                for p in sorted(table)]
        return columns, rows


def ping(engine: Engine) -> None:
    """Raise if the database cannot answer ``SELECT 1``."""
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
