"""Delete patients, studies or series: their index rows, their stored files, and an audit entry.

The order, series by series, and why
------------------------------------
1. **Rows, with the audit entry, in one transaction.** The series' image rows, its arrivals, the series
   row (and, once empty, its study's and patient's rows) are deleted, and an audit entry (``delete``)
   naming every file the rows pointed at is written in the same transaction: either all of it
   commits or none of it.
2. **Then the files.** Each path comes from the index and is checked to lie inside the storage root
   (:meth:`~.storage.Storage.absolute`); it is unlinked through descriptors of its folders opened
   without following links (:func:`~.storage.open_folder`), so a link swapped in cannot lead outside.
   Folders left empty go too (never the root or storage's own folders).

A crash between 1 and 2 leaves files without rows, never rows pointing at missing files: nothing that
reads the index (a push, ``/instances/{uid}/file``) meets a missing file, and ``rebuild --prune`` has
nothing to prune. The files left are not lost track of: the audit entry names them, and running the
same deletion again (the job is retried, or taken over by another worker once its heartbeat stops)
unlinks them first (:func:`finish_pending`). Until then ``rebuild --missing`` would index them again
(it takes storage as the truth), which is why the job finishes them before anything else.

Files first and rows second would be the other order: a crash in between leaves rows pointing at
missing files, which only a full ``rebuild --prune`` (a walk of the whole storage) notices.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from sqlalchemy import and_, delete, func, select, update
from sqlalchemy.engine import Connection

from pacsbridge.shared.core.errors import InvalidRequest, UnsafePath
from pacsbridge.shared.core.schema import arrivals_table, audit_table
from pacsbridge.shared.index.conquest import Index
from pacsbridge.shared.index.storage import OWN_FOLDERS, Storage, open_folder

__all__ = ["KEYS", "SeriesPlan", "Report", "plan", "delete_series", "finish_pending", "remove", "unlink_files"]

log = logging.getLogger(__name__)

#: What a deletion may be asked by, and the index level each names.
KEYS = {"PatientID": "Patient", "StudyInstanceUID": "Study", "SeriesInstanceUID": "Series"}
#: The audit's action for one series deleted.
ACTION = "delete"


@dataclass(frozen=True)
class SeriesPlan:
    """One series a deletion takes away."""

    series_uid: str
    study_uid: str
    patient_id: str
    instances: int


@dataclass
class Report:
    """What a deletion did."""

    series: int = 0
    instances: int = 0
    files_removed: int = 0
    files_missing: int = 0  #: the row's file was not there (already gone)
    files_refused: int = 0  #: the row's path was not inside the storage root: left alone, and logged
    files_failed: int = 0  #: unlink failed (permissions, read-only storage): left, and logged
    finished_earlier: int = 0  #: files of an earlier, interrupted run of the same deletion
    studies: int = 0
    patients: int = 0
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "errors"}
        out["errors"] = self.errors[:20]
        return out


def _columns(index: Index) -> dict[str, Any]:
    s = index.schema
    return {"ikey": s["Image"].key.column, "ilink": s["Image"].parent.column,  # type: ignore[union-attr]
            "skey": s["Series"].key.column, "slink": s["Series"].parent.column,  # type: ignore[union-attr]
            "spid": index._patient_column("Series"), "stkey": s["Study"].key.column,
            "stpid": index._patient_column("Study"), "pkey": s["Patient"].key.column}


def plan(index: Index, key: str, values: Sequence[str]) -> list[SeriesPlan]:
    """The series a deletion by ``key`` (:data:`KEYS`) takes away, with their instance counts.

    Raises
    ------
    InvalidRequest
        ``key`` is not one of :data:`KEYS`, or this dicom.sql has no PatientID in DICOMSeries.
    """
    if key not in KEYS:
        raise InvalidRequest(f"expected one of {', '.join(KEYS)}", "selection")
    c = _columns(index)
    ser, img = index.tables["Series"], index.tables["Image"]
    if key == "PatientID" and c["spid"] is None:
        raise InvalidRequest("this dicom.sql has no PatientID column in DICOMSeries", "selection")
    column = {"PatientID": ser.c[c["spid"]] if c["spid"] else None, "StudyInstanceUID": ser.c[c["slink"]],
              "SeriesInstanceUID": ser.c[c["skey"]]}[key]
    patient = ser.c[c["spid"]] if c["spid"] else None
    out: list[SeriesPlan] = []
    with index.engine.connect() as conn:
        for i in range(0, len(values), 500):
            chunk = list(values[i:i + 500])
            rows = conn.execute(select(ser.c[c["skey"]], ser.c[c["slink"]], *([patient] if patient is not None else []))
                                .where(column.in_(chunk)).order_by(ser.c[c["skey"]])).all()
            for r in rows:
                n = conn.execute(select(func.count()).select_from(img)
                                 .where(img.c[c["ilink"]] == r[0])).scalar_one()
                out.append(SeriesPlan(r[0], r[1] or "", (r[2] or "") if len(r) > 2 else "", int(n)))
    return out


def delete_series(index: Index, series: SeriesPlan, actor: str, tag: str, conn: Connection) -> list[str]:
    """Step 1 for one series, in the caller's transaction: its rows go and the audit names its files.

    ``tag`` marks the audit entry as this deletion's (``job <id>``, ``cli <user> <time>``), for
    :func:`finish_pending`. Returns the stored files (MAG0) the rows pointed at.
    """
    c = _columns(index)
    img, ser = index.tables["Image"], index.tables["Series"]
    rows = conn.execute(select(img.c[c["ikey"]], img.c.ObjectFile, img.c.DeviceName)
                        .where(img.c[c["ilink"]] == series.series_uid)).all()
    files = sorted({r[1] for r in rows if r[1] and (r[2] or "MAG0") == "MAG0"})
    conn.execute(delete(img).where(img.c[c["ilink"]] == series.series_uid))
    conn.execute(delete(arrivals_table).where(arrivals_table.c.series_uid == series.series_uid))
    sops = [r[0] for r in rows]
    for i in range(0, len(sops), 500):  # arrivals recorded without their series
        conn.execute(delete(arrivals_table).where(arrivals_table.c.sop_uid.in_(sops[i:i + 500])))
    conn.execute(delete(ser).where(ser.c[c["skey"]] == series.series_uid))
    conn.execute(audit_table.insert().values(
        at=time.time(), actor=actor[:64], action=ACTION, project="", patient_id=series.patient_id[:64],
        study_uid=series.study_uid[:64], target=f"{tag} series {series.series_uid}"[:255],
        detail=json.dumps({"instances": len(rows), "files": files})))
    return files


def _emptied(index: Index, studies: set[str], patients: set[str], conn: Connection) -> tuple[int, int]:
    """Study rows left without a series and patient rows left without a study go; a study that keeps
    series gets its modalities (ModalitiesInStudy) from them again. Returns (studies, patients) removed."""
    c = _columns(index)
    study, ser, pat = index.tables["Study"], index.tables["Series"], index.tables["Patient"]
    removed_studies = removed_patients = 0
    for uid in sorted(studies):
        left = conn.execute(select(ser.c[c["skey"]]).where(ser.c[c["slink"]] == uid).limit(1)).first()
        if left is None:
            if c["stpid"] is not None:
                patients |= {r[0] for r in conn.execute(select(study.c[c["stpid"]]).where(study.c[c["stkey"]] == uid))
                             if r[0] is not None}
            removed_studies += conn.execute(delete(study).where(study.c[c["stkey"]] == uid)).rowcount
        elif index._study_modality is not None and index._series_modality is not None:
            kinds = sorted({r[0] for r in conn.execute(select(ser.c[index._series_modality])
                                                       .where(ser.c[c["slink"]] == uid)) if r[0]})
            text = "\\".join(kinds)[:index._study_modality_len or None]
            conn.execute(update(study).where(study.c[c["stkey"]] == uid).values({index._study_modality: text}))
    if c["stpid"] is not None:
        for pid in sorted(patients):
            if conn.execute(select(study.c[c["stkey"]]).where(study.c[c["stpid"]] == pid).limit(1)).first() is None:
                removed_patients += conn.execute(delete(pat).where(pat.c[c["pkey"]] == pid)).rowcount
    return removed_studies, removed_patients


def unlink_files(storage: Storage, relpaths: Sequence[str], report: Report) -> None:
    """Step 2: remove the files rows pointed at, each checked to be inside the root, and the folders
    they leave empty. A path outside the root (a row written by hand, say) is refused and logged."""
    root = storage.root
    folders: set[tuple[str, ...]] = set()
    for rel in relpaths:
        try:
            storage.absolute(rel)  # relative, no '..', inside the root once links are resolved
            parts = rel.replace("\\", "/").split("/")
            if parts[0] in OWN_FOLDERS:
                raise UnsafePath(f"{rel!r} is in storage's own folder {parts[0]}")
            fd = open_folder(root, parts[:-1], create=False)  # links never followed
        except UnsafePath as exc:
            report.files_refused += 1
            report.errors.append(str(exc))
            log.warning("delete: %s; left alone", exc)
            continue
        except FileNotFoundError:
            report.files_missing += 1
            continue
        except OSError as exc:
            report.files_failed += 1
            report.errors.append(f"{rel}: {exc.strerror or exc}")
            continue
        try:
            os.unlink(parts[-1], dir_fd=fd)
            report.files_removed += 1
            folders.add(tuple(parts[:-1]))
        except FileNotFoundError:
            report.files_missing += 1
        except OSError as exc:
            report.files_failed += 1
            report.errors.append(f"{rel}: {exc.strerror or exc}")
            log.error("delete: cannot remove %s: %s", rel, exc)
        finally:
            os.close(fd)
    for folder in sorted(folders, key=len, reverse=True):
        _prune(storage, list(folder))


def _prune(storage: Storage, parts: list[str]) -> None:
    """Remove ``parts`` and its parents while they are empty (never the root, never a link)."""
    while parts and parts[0] not in OWN_FOLDERS:
        try:
            parent = open_folder(storage.root, parts[:-1], create=False)
        except (OSError, UnsafePath):
            return
        try:
            os.rmdir(parts[-1], dir_fd=parent)
        except OSError:  # not empty (another series, or an instance arriving), or gone already
            return
        finally:
            os.close(parent)
        storage._made.discard(storage.root.joinpath(*parts))
        parts = parts[:-1]


def finish_pending(index: Index, storage: Storage, tag: str, report: Report) -> None:
    """Unlink what an earlier run of this deletion (``tag``) took out of the index but may not have
    unlinked (it stopped between the two steps): the audit entries it wrote name those files."""
    with index.engine.connect() as conn:
        rows = conn.execute(select(audit_table.c.detail).where(and_(
            audit_table.c.action == ACTION, audit_table.c.target.like(f"{_like(tag)} series %", escape="!")))).all()
    for (detail,) in rows:
        try:
            files = list(json.loads(detail).get("files", []))
        except (ValueError, AttributeError):
            continue
        earlier = Report()  # most are gone already: that is the normal case, not counted as missing
        unlink_files(storage, [f for f in files if isinstance(f, str)], earlier)
        report.finished_earlier += earlier.files_removed
        report.files_refused += earlier.files_refused
        report.files_failed += earlier.files_failed
        report.errors += earlier.errors


def _like(text: str) -> str:
    return text.replace("!", "!!").replace("%", "!%").replace("_", "!_")


def remove(index: Index, storage: Storage, key: str, values: Sequence[str], actor: str, tag: str, *,
           cancel: threading.Event | None = None,
           progress: Callable[[SeriesPlan, Report], None] | None = None) -> tuple[list[SeriesPlan], Report]:
    """Delete what ``key``/``values`` select (see the module docstring for the order), series by series.

    ``tag`` names this deletion in the audit (the same tag again finishes an interrupted run first);
    ``progress`` is called after each series; ``cancel`` stops between series (what is deleted stays
    deleted). Returns the plan and the report.
    """
    report = Report()
    finish_pending(index, storage, tag, report)
    series = plan(index, key, values)
    studies = set(values) if key == "StudyInstanceUID" else set()
    patients = set(values) if key == "PatientID" else set()
    for one in series:
        if cancel is not None and cancel.is_set():
            break
        with index.engine.begin() as conn:
            files = delete_series(index, one, actor, tag, conn)
        report.series += 1
        report.instances += one.instances
        studies.add(one.study_uid)
        if one.patient_id:
            patients.add(one.patient_id)
        unlink_files(storage, files, report)
        if progress is not None:
            progress(one, report)
    if not (cancel is not None and cancel.is_set()):
        if key == "PatientID":  # studies of the patient that have no series at all
            c = _columns(index)
            study = index.tables["Study"]
            if c["stpid"] is not None:
                with index.engine.connect() as conn:
                    studies |= {r[0] for r in conn.execute(select(study.c[c["stkey"]])
                                                           .where(study.c[c["stpid"]].in_(list(values))))}
        with index.engine.begin() as conn:
            report.studies, report.patients = _emptied(index, studies - {""}, patients, conn)
    return series, report
