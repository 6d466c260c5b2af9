"""Turn a job's *selection* into the stored instances it names.

A selection (validated by :mod:`pacsbridge.shared.jobs.spec`) is one of::

    {"PatientID": [...]}          every instance of these patients
    {"StudyInstanceUID": [...]}   ... of these studies
    {"SeriesInstanceUID": [...]}  ... of these series
    {"job": "<job id>"}           the series of that job's progress rows (what a retrieve brought)

:func:`resolve` reads the index with bound-parameter SQLAlchemy Core queries
on the Conquest tables and returns one :class:`Instance` per image row, with
the absolute path of its file: ``MAG0`` rows are relative to the storage root
and checked to stay inside it (after resolving symlinks); ``EXTERN`` rows
(``import --in-place``) carry an absolute path. A row whose path is unsafe or
unusable is not dropped: it comes back in :attr:`Selection.rejected` with the
reason, so a job can report it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

from sqlalchemy import select

from pacsbridge.shared.core.errors import Conflict, InvalidRequest, PacsbridgeError
from pacsbridge.shared.index.conquest import Index
from pacsbridge.shared.index.instance import Instance
from pacsbridge.shared.jobs.store import JobStore
from pacsbridge.shared.index.storage import Storage

__all__ = ["Instance", "Selection", "resolve", "describe", "CHUNK"]

#: Values per ``IN (...)`` list (SQLite allows 999 bound parameters per statement by default).
CHUNK = 500

_SOP_CLASS = 0x00080016
_PATIENT_ID = 0x00100020


class Selection(NamedTuple):
    """What a selection resolved to."""

    instances: list[Instance]
    rejected: list[tuple[str, str]]  #: (SOPInstanceUID, reason) of index rows that cannot be used

    def by_series(self) -> dict[str, list[Instance]]:
        """Instances grouped by series, in the order of :attr:`instances`."""
        out: dict[str, list[Instance]] = {}
        for inst in self.instances:
            out.setdefault(inst.series_uid, []).append(inst)
        return out


def describe(selection: Mapping[str, Any]) -> str:
    """A short human description (``2 PatientID``, ``job 0123abcd``)."""
    (key, value), = selection.items()
    if key == "job":
        return f"job {value}"
    values = [value] if isinstance(value, str) else list(value)
    return f"{len(values)} {key}" if len(values) != 1 else f"{key} {values[0]}"


def _chunks(values: Sequence[str], n: int = CHUNK) -> Iterable[list[str]]:
    for i in range(0, len(values), n):
        yield list(values[i:i + n])


def _rows(index: Index, key: str, values: Sequence[str]) -> list[dict[str, Any]]:
    """Image rows joined to their series, filtered by one level's key (bound parameters)."""
    img, ser = index.tables["Image"], index.tables["Series"]
    schema = index.schema
    ikey = schema["Image"].key.column
    ilink = schema["Image"].parent.column  # type: ignore[union-attr]
    skey = schema["Series"].key.column
    slink = schema["Series"].parent.column  # type: ignore[union-attr]
    sop_class = schema["Image"].by_tag(_SOP_CLASS)
    pid = schema["Series"].by_tag(_PATIENT_ID)
    cols = [img.c[ikey].label("sop"), img.c[ilink].label("series"), ser.c[slink].label("study"),
            img.c.ObjectFile.label("object_file"), img.c.DeviceName.label("device")]
    if sop_class is not None:
        cols.append(img.c[sop_class.column].label("sop_class"))
    if pid is not None:
        cols.append(ser.c[pid.column].label("patient_id"))
    if key == "PatientID":
        if pid is None:
            raise InvalidRequest("this dicom.sql has no PatientID column in DICOMSeries", "selection.PatientID")
        column = ser.c[pid.column]
    elif key == "StudyInstanceUID":
        column = ser.c[slink]
    elif key == "SeriesInstanceUID":
        column = img.c[ilink]
    else:  # pragma: no cover - callers pass the keys above
        raise InvalidRequest(f"unknown key {key!r}", "selection")
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    with index.engine.connect() as conn:
        for chunk in _chunks(sorted(set(values))):
            stmt = (select(*cols).select_from(img.join(ser, ser.c[skey] == img.c[ilink], isouter=True))
                    .where(column.in_(chunk)).order_by(img.c[ilink], img.c[ikey]))
            for r in conn.execute(stmt):
                row = dict(r._mapping)
                if row["sop"] not in seen:
                    seen.add(row["sop"])
                    out.append(row)
    out.sort(key=lambda r: (r.get("study") or "", r["series"] or "", r["sop"]))
    return out


def _path(storage: Storage, object_file: str | None, device: str | None, real_root: str) -> Path:
    """The absolute path of an indexed file; raises PacsbridgeError or ValueError when unusable."""
    if not object_file:
        raise ValueError("no ObjectFile in the index")
    if (device or "MAG0") == "MAG0":
        path = storage.absolute(object_file)  # UnsafePath for '..', absolute or escaping paths
        real = os.path.realpath(path)
        if not real.startswith(real_root + os.sep):
            raise ValueError("resolves outside the storage root")
        return path
    if device == "EXTERN":
        path = Path(object_file)
        if not path.is_absolute() or ".." in path.parts or "\x00" in object_file:
            raise ValueError(f"EXTERN path {object_file!r} is not a plain absolute path")
        return path
    raise ValueError(f"unknown DeviceName {device!r}")


def resolve(index: Index, storage: Storage, selection: Mapping[str, Any],
            jobs: JobStore | None = None) -> Selection:
    """The stored instances a selection names, with checked absolute paths.

    Parameters
    ----------
    index, storage
        The installation's index and storage.
    selection : mapping
        A validated selection (see the module docstring).
    jobs : JobStore, optional
        Needed for ``{"job": id}``.

    Raises
    ------
    InvalidRequest
        The selection is malformed, or names a job without ``jobs``.
    UnknownJob
        ``{"job": id}`` names no job.
    Conflict
        ``{"job": id}`` names a job that is still queued or running.
    """
    if not isinstance(selection, Mapping) or len(selection) != 1:
        raise InvalidRequest("an object with exactly one key", "selection")
    (key, value), = selection.items()
    if key == "job":
        if jobs is None:
            raise InvalidRequest("a job selection needs the job store", "selection.job")
        source = jobs.get(str(value))
        if source.state in ("queued", "running"):
            # what it brought is not complete yet: acting on part of it would look like success
            raise Conflict(f"job {source.id} is still {source.state}; select its series when it has ended")
        series = [s.series_uid for s in source.series]
        rows = _rows(index, "SeriesInstanceUID", series) if series else []
    elif key in ("PatientID", "StudyInstanceUID", "SeriesInstanceUID"):
        values = [value] if isinstance(value, str) else list(value)
        if not values or not all(isinstance(v, str) for v in values):
            raise InvalidRequest("a value or a list of values", f"selection.{key}")
        rows = _rows(index, key, values)
    else:
        raise InvalidRequest(f"unknown key {key!r}", "selection")
    real_root = os.path.realpath(storage.root)
    instances: list[Instance] = []
    rejected: list[tuple[str, str]] = []
    for row in rows:
        try:
            path = _path(storage, row["object_file"], row["device"], real_root)
        except (PacsbridgeError, ValueError) as exc:
            rejected.append((row["sop"], f"{row['object_file']!r}: {exc}"))
            continue
        instances.append(Instance(row["sop"], row["series"] or "", row.get("study") or "", path,
                                  row["object_file"], row["device"] or "MAG0", row.get("sop_class") or "",
                                  row.get("patient_id") or ""))
    return Selection(instances, rejected)
