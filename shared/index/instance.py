"""One stored instance, found through the index: what a push, a repack or an export reads."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

__all__ = ["Instance"]


class Instance(NamedTuple):
    """One stored instance of a selection."""

    sop_uid: str
    series_uid: str
    study_uid: str
    path: Path  #: absolute, checked
    object_file: str  #: as indexed (ObjectFile)
    device: str  #: MAG0 or EXTERN
    sop_class: str = ""  #: from the index when its dicom.sql has the column, else ""
    patient_id: str = ""
