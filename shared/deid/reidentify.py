"""Results that come home: an instance a research platform computed on de-identified data (a SEG, an
RTSTRUCT, an SR ...) made identifiable again, next to the original study.

:func:`reidentify` maps the instance back through the project's map (the way MONAI Deploy's
re-identifier does; none of the other peers has it):

- the patient: its PatientID is a pseudonym of the project (else refused); the patient and study
  attributes are restored from a stored original of the study (``original_header``), so the result
  files under the original patient and study exactly;
- every UID the project made (any depth, file meta included) becomes its original again; every
  *reference* (an element of a ``Referenced...`` or source/derivation sequence, and every
  StudyInstanceUID) must be one the project made, else the instance is refused with the UIDs that are
  not in the map. The instance's own new UIDs (its SOP Instance, Series, a new Frame of Reference) are
  kept: they name new objects, which identify nobody;
- every date and date-time moved back by the patient's offset (when the project shifts dates);
- PatientIdentityRemoved becomes NO; the de-identification method and the clinical trial attributes
  (group 0012) go.

Pixel data and everything else are kept as the platform made them. The caller stores and indexes
the result and audits the re-identification.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from pydicom import Dataset, dcmread
from pydicom.dataelem import DataElement
from pydicom.errors import InvalidDicomError
from pydicom.filewriter import dcmwrite
from pydicom.uid import UID_dictionary

from pacsbridge.shared.core.errors import InvalidDataset
from pacsbridge.shared.deid.profile import shift_dates

__all__ = ["reidentify", "Reidentified", "ProjectMap", "RESTORED"]

#: Patient and General Study attributes taken from the stored original (absent there: removed here).
RESTORED = ("PatientName", "PatientID", "IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence",
            "PatientBirthDate", "PatientBirthTime", "PatientSex", "OtherPatientIDsSequence", "PatientComments",
            "StudyDate", "StudyTime", "AccessionNumber", "IssuerOfAccessionNumberSequence", "StudyID",
            "ReferringPhysicianName", "StudyDescription", "PhysiciansOfRecord", "NameOfPhysiciansReadingStudy")
#: Sequences whose UIDs are references to what was sent (each must be in the map).
_REFERENCE_PREFIXES = ("Referenced", "SourceImage", "SourceInstance", "DerivationImage", "SourceSeries",
                       "StudiesContainingOtherReferencedInstances")
_UI = "UI"


class _Entry(Protocol):
    issuer: str
    patient_id: str
    date_offset: int


class ProjectMap(Protocol):
    """The reverse lookups of a project's map (:class:`pacsbridge.shared.deid.projects.MappedIdentity`)."""

    def original_uid(self, new: str) -> str | None: ...

    def patient_by_pseudonym(self, pseudonym: str) -> Any: ...


@dataclass
class Reidentified:
    """An instance made identifiable again."""

    data: bytes          # the Part 10 file to store
    patient_id: str      # the original patient
    issuer: str
    study_uid: str       # the original study
    sop_uid: str         # the instance's own (kept) SOP Instance UID
    mapped: int          # UIDs mapped back to their originals


def _refuse(reason: str) -> InvalidDataset:
    return InvalidDataset("returned instance", reason)


def reidentify(source: bytes, project: str, map_: ProjectMap, shift_back: bool,
               original_header: Callable[[str], Dataset | None]) -> Reidentified:
    """Re-identify one returned instance (see the module docstring).

    Parameters
    ----------
    source : bytes
        The instance as the platform sent it (a Part 10 file).
    project : str
        The project's name (for messages).
    map_ : ProjectMap
        The project's map.
    shift_back : bool
        The project shifted dates (``options.dates == "shift"``): move them back.
    original_header : callable
        ``original_header(study_uid)``: the header of a stored instance of that original study, or None.

    Raises
    ------
    InvalidDataset
        Not DICOM; a patient, study or reference this project did not send (the UIDs named); the
        original study is no longer stored.
    """
    try:
        ds = dcmread(io.BytesIO(source))
    except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError) as exc:
        raise _refuse(f"not a DICOM instance: {exc}") from None
    pseudonym = str(ds.get("PatientID", "") or "")
    entry = map_.patient_by_pseudonym(pseudonym) if pseudonym else None
    if entry is None:
        raise _refuse(f"patient {pseudonym!r} was not de-identified under project {project!r}")
    study = str(ds.get("StudyInstanceUID", "") or "")
    original_study = map_.original_uid(study) if study else None
    if original_study is None:
        raise _refuse(f"study {study!r} was not sent under project {project!r}")
    header = original_header(original_study)
    if header is None:
        raise _refuse(f"the original of study {study!r} is no longer stored")

    cache: dict[str, str | None] = {}

    def back(uid: str) -> str | None:
        if uid not in cache:
            cache[uid] = None if uid in UID_dictionary else map_.original_uid(uid)
        return cache[uid]

    unresolved: list[str] = []
    mapped = 0

    def walk(data: Dataset, in_reference: bool) -> None:
        nonlocal mapped
        for elem in list(data):
            keyword = elem.keyword or ""
            if elem.VR == "SQ":
                reference = in_reference or keyword.startswith(_REFERENCE_PREFIXES)
                for item in elem.value or []:
                    walk(item, reference)
                continue
            if elem.VR == _UI and elem.value:
                values = list(elem.value) if elem.VM > 1 else [elem.value]
                out = []
                for value in map(str, values):
                    original = back(value)
                    if original is not None:
                        mapped += 1
                        out.append(original)
                    else:
                        must = (in_reference or keyword == "StudyInstanceUID") and value not in UID_dictionary
                        if must and keyword not in ("ReferencedSOPClassUID", "SOPClassUID"):
                            unresolved.append(f"{keyword or elem.tag}={value}")
                        out.append(value)
                elem.value = out if elem.VM > 1 else out[0]
            elif shift_back and elem.VR in ("DA", "DT") and elem.value:
                moved = shift_dates(elem.value, elem.VR, -entry.date_offset)
                if moved is not None:
                    elem.value = moved

    walk(ds, False)
    if unresolved:
        listed = ", ".join(unresolved[:5]) + (f" and {len(unresolved) - 5} more" if len(unresolved) > 5 else "")
        raise _refuse(f"references not sent under project {project!r}: {listed}")
    for keyword in RESTORED:
        if keyword in header:
            ds[keyword] = DataElement(header[keyword].tag, header[keyword].VR, header[keyword].value)
        elif keyword in ds:
            del ds[keyword]
    for tag in [t for t in ds.keys() if t.group == 0x0012]:  # clinical trial, the method and its codes
        del ds[tag]
    ds.PatientIdentityRemoved = "NO"
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "MediaStorageSOPInstanceUID" in meta:
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    out = io.BytesIO()
    dcmwrite(out, ds, enforce_file_format=True)
    return Reidentified(out.getvalue(), entry.patient_id, entry.issuer, original_study, str(ds.SOPInstanceUID),
                        mapped)
