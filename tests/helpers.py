"""Test helpers: small real DICOM files with chosen attributes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

TEST_FILES = Path(os.path.dirname(pydicom.__file__)) / "data" / "test_files"


def pydicom_test_files() -> list[Path]:
    """Every file of pydicom's bundled test data (globbed: no download)."""
    return sorted(p for p in TEST_FILES.rglob("*") if p.is_file())


def readable_test_files() -> list[Path]:
    """The bundled files pydicom reads without force and that carry the three UIDs."""
    out = []
    for p in pydicom_test_files():
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True)
        except Exception:
            continue
        if all(str(ds.get(k, "") or "").strip() for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")):
            out.append(p)
    return out


def make_instance(path: Path | None = None, *, rows: int = 8, **attrs: Any) -> Dataset:
    """A small CT instance; ``attrs`` override keywords. Written to ``path`` if given."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "PB0001"
    ds.PatientName = "Test^Patient"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyDate = "20240102"
    ds.StudyTime = "101112"
    ds.Modality = "CT"
    ds.SeriesNumber = 3
    ds.InstanceNumber = 7
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.Rows = rows
    ds.Columns = rows
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = bytes(rows * rows * 2)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for key, value in attrs.items():
        if value is None:
            if key in ds:
                delattr(ds, key)
        else:
            setattr(ds, key, value)
    if "SOPInstanceUID" in attrs and attrs["SOPInstanceUID"]:
        ds.file_meta.MediaStorageSOPInstanceUID = attrs["SOPInstanceUID"]
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
    return ds
