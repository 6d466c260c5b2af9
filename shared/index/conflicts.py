"""An admin's decision on a UID conflict (one Study, Series or SOP Instance UID under two PatientIDs).

The instance that came second waits in ``<root>/.quarantine/`` (see
:mod:`pacsbridge.shared.index.quarantine`); the one indexed first is untouched until
a decision:

``correct``
    The quarantined instance's PatientID is the right one (a PACS corrected or
    merged the patient and sent the study again). The study that holds the
    conflicting UID follows it: its index rows get the new PatientID, and so do
    its stored files (patient attributes rewritten from the quarantined instance,
    each file moved to the name the template now gives it), so that a rebuild
    gives the same index. Then the quarantined instance is stored (the duplicates
    policy applies, as for any instance), and so is every other open conflict of
    the same patient and study (the rest of the resend), each entry closed too.
``new-patient``
    Another patient who happens to reuse the UIDs: a copy with new Study, Series
    and SOP Instance UIDs (derived from the old UID and the PatientID, so the
    instances of one study stay together) is stored and indexed; the quarantined
    original stays where it is, untouched.
``discard``
    The quarantined file is deleted.

Each decision is logged and kept in the entry (``decision``, ``resolved_by``, ``resolved_at``).
"""

from __future__ import annotations

import io
import logging
import os
from typing import Any

import pydicom
from pydicom.uid import generate_uid

from pacsbridge.shared.core.errors import Conflict
from pacsbridge.shared.index.importer import Importer
from pacsbridge.shared.index.quarantine import Quarantine, discard, file_of

__all__ = ["resolve_conflict", "PATIENT_ATTRIBUTES"]

log = logging.getLogger(__name__)

#: What a correction copies from the quarantined instance into every file of the study.
PATIENT_ATTRIBUTES = ("PatientID", "IssuerOfPatientID", "PatientName", "PatientBirthDate", "PatientSex")


def _encode(ds: Any) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _import_one(ctx: Any, data: bytes, ds: Any) -> str:
    """Store and index an instance given as bytes; returns the reason if it was not indexed."""
    fd, tmp = ctx.storage.temp_file()
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        report = Importer(ctx.index, ctx.storage, workers=1).import_paths([tmp])
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass
    if report.rejected:
        return report.rejected[0][1]
    return ""


def _drop(entry: dict[str, Any], path: Any) -> None:
    """Remove a quarantined file now stored again (never one indexed in place, outside storage)."""
    if not os.path.isabs(str(entry["relpath"])):
        path.unlink(missing_ok=True)


def _study_of(ctx: Any, entry: dict[str, Any]) -> str:
    """The indexed study that holds the entry's conflicting UID."""
    index = ctx.index
    if entry["level"] == "study":
        return str(entry["study_uid"])
    if entry["level"] == "series":
        found = index.files_for(series=[entry["series_uid"]])
    else:
        found = index.files_for(sops=[entry["sop_uid"]])
    if not found or not found[0]["study"]:
        raise Conflict(f"quarantine entry {entry['id']}: the {entry['level']} it clashed with is no longer "
                       "indexed; decide new-patient or discard, or rebuild")
    return str(found[0]["study"])


def _correct(ctx: Any, store: Any, entry: dict[str, Any], by: str) -> dict[str, Any]:
    quarantined = file_of(ctx, entry)
    source = pydicom.dcmread(quarantined)
    patient = {k: source.get(k) for k in PATIENT_ATTRIBUTES}
    study = _study_of(ctx, entry)
    rewritten, moved = [], 0
    for row in ctx.index.files_for(study=study):
        if row["DeviceName"] != "MAG0":
            continue  # a file indexed in place is not ours to rewrite; its rows still follow
        old_rel = row["ObjectFile"]
        path = ctx.storage.absolute(old_rel)
        ds = pydicom.dcmread(path)
        for keyword, value in patient.items():
            if value is None:
                if keyword in ds:
                    del ds[keyword]
            else:
                setattr(ds, keyword, value)
        data = _encode(ds)
        new_rel = ctx.storage.path_for(ds)
        fd, tmp = ctx.storage.temp_file()
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            ctx.storage.settle(out.fileno())
        if new_rel == old_rel:
            os.replace(tmp, path)
        else:
            new_rel = ctx.storage.commit(tmp, new_rel).relpath
            path.unlink(missing_ok=True)
            moved += 1
        rewritten.append(new_rel)
    new_patient = str(entry["patient_id"])
    ctx.index.reassign("Study", study, new_patient)
    report = Importer(ctx.index, ctx.storage, workers=1).reindex_files(rewritten)
    if report.rejected:
        raise Conflict(f"quarantine entry {entry['id']}: the corrected study was not re-indexed whole: "
                       f"{report.rejected[0][0]}: {report.rejected[0][1]}")
    detail = (f"{entry['detail']}; corrected by {by}: study {study} and its {len(rewritten)} stored file(s) now "
              f"PatientID {new_patient!r}")
    reason = _import_one(ctx, quarantined.read_bytes(), source)
    if reason:
        raise Conflict(f"quarantine entry {entry['id']}: the study now follows {new_patient!r}, but the "
                       f"quarantined instance was not indexed: {reason}")
    _drop(entry, quarantined)
    closed = store.close(entry["id"], "correct", by, detail)
    # the rest of the same resend (same patient, same study) clashed for the same reason
    others, _ = store.list(reason="uid_conflict", resolved=False, limit=1000)
    for other in others:
        if other["patient_id"] != new_patient or other["study_uid"] != entry["study_uid"]:
            continue
        path = file_of(ctx, other)
        if not path.is_file():
            continue
        reason = _import_one(ctx, path.read_bytes(), None)
        if not reason:
            _drop(other, path)
            store.close(other["id"], "correct", by, f"{other['detail']}; released by the correction of "
                                                    f"quarantine entry {entry['id']}")
    return closed


def _new_patient(ctx: Any, store: Any, entry: dict[str, Any], by: str) -> dict[str, Any]:
    quarantined = file_of(ctx, entry)
    ds = pydicom.dcmread(quarantined)
    patient = str(ds.get("PatientID", "") or "")
    new = {}
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        old = str(ds.get(keyword, "") or "")
        new[keyword] = generate_uid(entropy_srcs=["pacsbridge new-patient", old, patient])
        setattr(ds, keyword, new[keyword])
    ds.file_meta.MediaStorageSOPInstanceUID = new["SOPInstanceUID"]
    reason = _import_one(ctx, _encode(ds), ds)
    if reason:
        raise Conflict(f"quarantine entry {entry['id']}: the copy with new UIDs was not indexed: {reason}")
    detail = (f"{entry['detail']}; kept as a new instance of PatientID {patient!r} by {by}: "
              + ", ".join(f"{k} {v}" for k, v in new.items()) + "; the original stays in the quarantine area")
    return store.close(entry["id"], "new-patient", by, detail)


def resolve_conflict(ctx: Any, store: Any, entry: dict[str, Any], decision: str, by: str) -> dict[str, Any]:
    """Carry out ``decision`` (``correct``, ``new-patient`` or ``discard``) on an open uid_conflict entry."""
    log.warning("quarantine %d (uid_conflict, %s UID, PatientID %r vs %r): %s decided by %s", entry["id"],
                entry["level"], entry["patient_id"], entry["other_patient_id"], decision, by)
    if decision == "correct":
        return _correct(ctx, store, entry, by)
    if decision == "new-patient":
        return _new_patient(ctx, store, entry, by)
    return discard(ctx, store, entry, by)


def resolve(ctx: Any, entry_id: int, decision: Any, by: str) -> dict[str, Any]:
    """Carry out an admin's decision on an open entry and record it (who, when, what).

    ``ctx`` is a :class:`~pacsbridge.shared.index.context.Context`.

    Raises
    ------
    UnknownQuarantine
    InvalidRequest
        A decision that does not apply to this entry's reason.
    Conflict
        Already resolved, or (``retry``) the database still refuses the instance.
    """
    store = Quarantine(ctx.index.engine)
    entry = store.get(entry_id)
    decision = store.check_decision(entry, decision)
    if entry["resolved"]:
        raise Conflict(f"quarantine entry {entry_id} is already resolved ({entry['decision']})")
    if decision != "discard" and not file_of(ctx, entry).is_file():
        raise Conflict(f"quarantine entry {entry_id}: its file {entry['relpath']!r} is gone; discard the entry")
    if entry["reason"] == "uid_conflict":
        return resolve_conflict(ctx, store, entry, decision, by)
    if decision == "retry":
        report = Importer(ctx.index, ctx.storage, workers=1).reindex_files([entry["relpath"]])
        if report.indexed != 1:
            reason = report.rejected[0][1] if report.rejected else "not indexed"
            if reason.startswith("quarantined:"):  # now refused for another reason, with an entry of its own
                return store.close(entry_id, "retry", by, f"{entry['detail']}; on retry: {reason}")
            raise Conflict(f"quarantine entry {entry_id}: still not indexed: {reason}")
        return store.close(entry_id, "retry", by)
    return discard(ctx, store, entry, by)
