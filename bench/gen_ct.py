#!/usr/bin/env python
"""Generate realistic synthetic CT studies as DICOM Part 10 files.

Every file is a single-frame CT Image Storage instance
(1.2.840.10008.5.1.4.1.1.2) encoded as Explicit VR Little Endian, with
512x512 16-bit pixel data (about 0.5 MB per file) and the patient / study /
series / image attributes a real scanner would write.

The instances are spread over ``patients`` patients, one study per patient
(``--studies-per-patient`` to change that) and ``series_per_study`` series per
study; slices within a series are contiguous axial positions sharing one
Frame of Reference.

Pixel data is a cheap anthropomorphic phantom (air, body ellipse, fat rim,
lungs, spine, an "organ" whose size changes along z) computed once; each slice
adds one of a small pool of pre-computed noise fields, a z-dependent organ and
an instance-specific marker, so 2,000 files are written in seconds and no two
slices are byte-identical.

Usage::

    python bench/gen_ct.py OUTDIR --instances 2000 [--patients 10]
        [--series-per-study 2] [--seed 0] [--layout flat|nested]

or from Python::

    from bench.gen_ct import generate
    paths = generate("/tmp/ct", 2000, patients=10, series_per_study=2, seed=0)

UIDs come from :func:`pydicom.uid.generate_uid` and are therefore unique on
every run; ``seed`` makes names, dates, geometry and pixels reproducible.
"""

from __future__ import annotations

import argparse
import datetime as dt
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)

__all__ = ["generate", "main"]

ROWS = COLUMNS = 512

_FAMILY_NAMES = [
    "SMITH", "JOHNSON", "WILLIAMS", "BROWN", "JONES", "GARCIA", "MILLER",
    "DAVIS", "MARTINEZ", "LOPEZ", "WILSON", "ANDERSON", "TAYLOR", "THOMAS",
    "MOORE", "JACKSON", "MARTIN", "LEE", "THOMPSON", "WHITE", "HARRIS",
    "CLARK", "LEWIS", "ROBINSON", "WALKER", "YOUNG", "ALLEN", "KING",
    "DE VRIES", "JANSEN", "MUELLER", "SCHMIDT", "DUBOIS", "ROSSI", "NOVAK",
]
_GIVEN_NAMES = {
    "F": ["MARY", "PATRICIA", "JENNIFER", "LINDA", "ELIZABETH", "SUSAN",
          "JESSICA", "SARAH", "KAREN", "ANNA", "EMMA", "SOPHIE", "JULIA"],
    "M": ["JAMES", "ROBERT", "JOHN", "MICHAEL", "DAVID", "WILLIAM",
          "RICHARD", "JOSEPH", "THOMAS", "PETER", "JAN", "LUCAS", "MARCO"],
}
_PHYSICIANS = ["HOUSE^GREGORY^^DR", "GREY^MEREDITH^^DR", "ROSS^DOUGLAS^^DR",
               "CARTER^JOHN^^DR", "BAILEY^MIRANDA^^DR"]


@dataclass(frozen=True)
class _Scanner:
    manufacturer: str
    model: str
    station: str
    pixel_representation: int  # 0: unsigned + intercept -1024, 1: signed HU
    kernel_soft: str
    kernel_sharp: str


_SCANNERS = [
    _Scanner("SIEMENS", "SOMATOM Definition AS+", "CTAWP71234", 0, "I30f", "I70f"),
    _Scanner("GE MEDICAL SYSTEMS", "Revolution CT", "GECT01", 1, "STANDARD", "LUNG"),
    _Scanner("Philips", "iCT 256", "PHCT-ICT256", 0, "B", "YC"),
    _Scanner("CANON_MEC", "Aquilion ONE", "CANONCT1", 1, "FC08", "FC52"),
]


@dataclass(frozen=True)
class _Exam:
    description: str
    body_part: str
    protocol: str
    z_top: float  # mm, table position of the first (most cranial) slice
    # (series description, thickness mm, sharp kernel?, window centre, width)
    series: tuple


_EXAMS = [
    _Exam("CT CHEST W CONTRAST", "CHEST", "Thorax_Contrast", 0.0, (
        ("Thorax 5.0 Soft", 5.0, False, 40, 400),
        ("Thorax 1.0 Lung", 1.0, True, -600, 1500),
        ("Thorax 2.0 Mediastinum", 2.0, False, 50, 350),
    )),
    _Exam("CT ABDOMEN PELVIS W CONTRAST", "ABDOMEN", "AbdPelvis_PV", -250.0, (
        ("AbdPelvis 5.0 Soft", 5.0, False, 40, 400),
        ("AbdPelvis 1.25 Soft", 1.25, False, 40, 400),
        ("AbdPelvis 2.0 Bone", 2.0, True, 500, 2000),
    )),
    _Exam("CT HEAD WO CONTRAST", "HEAD", "Head_Routine", 300.0, (
        ("Head 5.0 Brain", 5.0, False, 40, 80),
        ("Head 0.75 Bone", 0.75, True, 500, 2500),
        ("Head 2.5 Brain", 2.5, False, 35, 80),
    )),
    _Exam("CT CHEST ABDOMEN PELVIS", "CHEST", "TAP_Staging", 0.0, (
        ("TAP 3.0 Soft", 3.0, False, 40, 400),
        ("TAP 1.0 Lung", 1.0, True, -600, 1600),
        ("TAP 3.0 Bone", 3.0, True, 450, 1500),
    )),
]


def _ds(value: float) -> str:
    """Format a number as a valid DS string (at most 16 characters)."""
    for digits in range(12, 0, -1):
        text = f"{value:.{digits}g}"
        if len(text) <= 16:
            return "0" if text == "-0" else text
    raise ValueError(f"cannot encode {value!r} as DS")


def _tm(value: dt.datetime) -> str:
    """Format a datetime as a DICOM TM value (HHMMSS.ffffff)."""
    return value.strftime("%H%M%S.%f")


class _Phantom:
    """Cheap anthropomorphic phantom in HU plus pre-computed noise fields."""

    def __init__(self, rng: np.random.Generator, n_noise: int = 8) -> None:
        y, x = np.mgrid[0:ROWS, 0:COLUMNS].astype(np.float32)
        self.x = x - COLUMNS / 2
        self.y = y - ROWS / 2
        hu = np.full((ROWS, COLUMNS), -1000, dtype=np.int16)  # air
        body = (self.x / 220) ** 2 + (self.y / 160) ** 2 <= 1.0
        hu[body] = -90  # subcutaneous fat
        hu[(self.x / 205) ** 2 + (self.y / 145) ** 2 <= 1.0] = 40  # soft tissue
        for cx in (-95, 95):  # lungs
            hu[((self.x - cx) / 75) ** 2 + ((self.y + 10) / 100) ** 2 <= 1.0] = -850
        hu[self.x ** 2 + (self.y - 110) ** 2 <= 22 ** 2] = 700  # vertebra
        hu[self.x ** 2 + (self.y - 110) ** 2 <= 12 ** 2] = 250  # marrow
        hu[(self.x - 20) ** 2 + (self.y + 15) ** 2 <= 14 ** 2] = 180  # aorta
        hu[(ROWS - 25):(ROWS - 15), 60:(COLUMNS - 60)] = 1200  # table
        self.base = hu
        self.body = body
        self.r2 = (self.x + 60) ** 2 + (self.y - 30) ** 2  # organ centre
        self.noise = [
            rng.normal(0.0, 12.0, (ROWS, COLUMNS)).astype(np.int16)
            for _ in range(n_noise)
        ]

    def slice(self, index: int, frac: float) -> np.ndarray:
        """HU image for slice ``index`` at relative position ``frac`` in [0, 1]."""
        img = self.base + self.noise[index % len(self.noise)]
        radius = 20.0 + 45.0 * np.sin(np.pi * frac)  # organ grows then shrinks
        img[(self.r2 <= radius * radius) & self.body] += 20
        # marker pixels in the (air) top rows make every slice unique
        img[0, index % COLUMNS] = 3000
        img[1, (index // COLUMNS) % COLUMNS] = 3000
        return img


def _split(total: int, parts: int) -> list[int]:
    """Split ``total`` into ``parts`` near-equal non-negative integers."""
    base, rest = divmod(total, parts)
    return [base + (1 if i < rest else 0) for i in range(parts)]


def _patient(rnd: random.Random, number: int) -> dict:
    sex = rnd.choice("FM")
    birth = dt.date(1935, 1, 1) + dt.timedelta(days=rnd.randrange(70 * 365))
    return {
        "PatientID": f"PB{100000 + number * 7919 % 900000:06d}",
        "PatientName": f"{rnd.choice(_FAMILY_NAMES)}^{rnd.choice(_GIVEN_NAMES[sex])}",
        "PatientBirthDate": birth.strftime("%Y%m%d"),
        "PatientSex": sex,
        "_birth": birth,
    }


def _age(birth: dt.date, on: dt.date) -> str:
    years = on.year - birth.year - ((on.month, on.day) < (birth.month, birth.day))
    return f"{years:03d}Y"


def generate(
    outdir: str | Path,
    instances: int,
    patients: int = 10,
    series_per_study: int = 2,
    seed: int = 0,
    studies_per_patient: int = 1,
    layout: str = "flat",
) -> list[Path]:
    """Write ``instances`` synthetic CT files under ``outdir``.

    :param outdir: output directory (created if needed).
    :param instances: total number of image files to write.
    :param patients: number of distinct patients.
    :param series_per_study: axial series per study (1-3 distinct recon
        protocols; more are allowed and reuse the protocols).
    :param seed: seed for names, dates, geometry and pixel noise.
    :param studies_per_patient: studies per patient.
    :param layout: ``"flat"`` writes ``OUTDIR/ct_00000.dcm`` ...;
        ``"nested"`` writes ``OUTDIR/<PatientID>/<StudyUID>/<SeriesUID>/<n>.dcm``.
    :returns: paths of the written files, in generation order.
    """
    if instances < 0 or patients < 1 or series_per_study < 1 or studies_per_patient < 1:
        raise ValueError("instances >= 0 and patients/series/studies >= 1 required")
    if layout not in ("flat", "nested"):
        raise ValueError(f"unknown layout {layout!r}")
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    rnd = random.Random(seed)
    phantom = _Phantom(np.random.default_rng(seed))

    n_series = patients * studies_per_patient * series_per_study
    per_series = iter(_split(instances, n_series))
    written: list[Path] = []
    counter = 0

    for p in range(patients):
        pat = _patient(rnd, p + 1)
        for _ in range(studies_per_patient):
            exam = rnd.choice(_EXAMS)
            scanner = rnd.choice(_SCANNERS)
            study_dt = dt.datetime(2023, 1, 2, 7, 30) + dt.timedelta(
                days=rnd.randrange(700), minutes=rnd.randrange(11 * 60),
                seconds=rnd.randrange(60), microseconds=rnd.randrange(10 ** 6))
            study = {
                "StudyInstanceUID": generate_uid(),
                "StudyDate": study_dt.strftime("%Y%m%d"),
                "StudyTime": _tm(study_dt),
                "StudyID": str(rnd.randrange(1000, 99999)),
                "AccessionNumber": f"ACC{rnd.randrange(10 ** 9):09d}",
                "StudyDescription": exam.description,
                "ReferringPhysicianName": rnd.choice(_PHYSICIANS),
                "PatientAge": _age(pat["_birth"], study_dt.date()),
                "PatientWeight": _ds(rnd.randrange(45, 120)),
                "FrameOfReferenceUID": generate_uid(),
            }
            fov = rnd.choice((350.0, 380.0, 400.0, 450.0, 500.0))
            if exam.body_part == "HEAD":
                fov = 250.0
            spacing = fov / COLUMNS
            table_height = rnd.choice((140.0, 150.0, 160.0, 170.5))
            kvp = rnd.choice((100, 120, 120, 120, 140))
            for s in range(series_per_study):
                n_slices = next(per_series)
                name, thickness, sharp, wc, ww = exam.series[s % len(exam.series)]
                series_dt = study_dt + dt.timedelta(minutes=2 + s, seconds=17 * s)
                series = {
                    "SeriesInstanceUID": generate_uid(),
                    "SeriesNumber": s + 2,  # series 1 is usually the topogram
                    "SeriesDescription": name,
                    "SeriesDate": series_dt.strftime("%Y%m%d"),
                    "SeriesTime": _tm(series_dt),
                    "ConvolutionKernel": scanner.kernel_sharp if sharp else scanner.kernel_soft,
                    "SliceThickness": thickness,
                    "WindowCenter": wc,
                    "WindowWidth": ww,
                    "_dt": series_dt,
                }
                for i in range(n_slices):
                    ds = _image(pat, study, series, exam, scanner, phantom, i,
                                n_slices, spacing, fov, table_height, kvp, counter)
                    if layout == "flat":
                        path = outdir / f"ct_{counter:05d}.dcm"
                    else:
                        path = (outdir / pat["PatientID"] / study["StudyInstanceUID"]
                                / series["SeriesInstanceUID"] / f"{i + 1:05d}.dcm")
                        path.parent.mkdir(parents=True, exist_ok=True)
                    dcmwrite(path, ds, enforce_file_format=True)
                    written.append(path)
                    counter += 1
    return written


def _image(pat, study, series, exam, scanner, phantom, i, n_slices, spacing,
           fov, table_height, kvp, counter) -> Dataset:
    """Build the dataset (with file meta) for slice ``i`` of a series."""
    sop_uid = generate_uid()
    thickness = series["SliceThickness"]
    z = exam.z_top - i * thickness
    acq_dt = series["_dt"] + dt.timedelta(milliseconds=round(i * 1000 * thickness / 40))
    content_dt = acq_dt + dt.timedelta(seconds=20)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "PACSBRIDGE_BENCH"

    ds = Dataset()
    ds.file_meta = meta
    # SOP Common / General Image
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.InstanceCreationDate = content_dt.strftime("%Y%m%d")
    ds.InstanceCreationTime = _tm(content_dt)
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = study["StudyDate"]
    ds.SeriesDate = series["SeriesDate"]
    ds.AcquisitionDate = acq_dt.strftime("%Y%m%d")
    ds.ContentDate = content_dt.strftime("%Y%m%d")
    ds.StudyTime = study["StudyTime"]
    ds.SeriesTime = series["SeriesTime"]
    ds.AcquisitionTime = _tm(acq_dt)
    ds.ContentTime = _tm(content_dt)
    ds.AccessionNumber = study["AccessionNumber"]
    ds.Modality = "CT"
    ds.Manufacturer = scanner.manufacturer
    ds.InstitutionName = "Pacsbridge General Hospital"
    ds.ReferringPhysicianName = study["ReferringPhysicianName"]
    ds.StationName = scanner.station
    ds.StudyDescription = study["StudyDescription"]
    ds.SeriesDescription = series["SeriesDescription"]
    ds.ManufacturerModelName = scanner.model
    # Patient
    ds.PatientName = pat["PatientName"]
    ds.PatientID = pat["PatientID"]
    ds.PatientBirthDate = pat["PatientBirthDate"]
    ds.PatientSex = pat["PatientSex"]
    ds.PatientAge = study["PatientAge"]
    ds.PatientWeight = study["PatientWeight"]
    # CT acquisition
    ds.BodyPartExamined = exam.body_part
    ds.ScanOptions = "HELICAL MODE"
    ds.SliceThickness = _ds(thickness)
    ds.KVP = _ds(kvp)
    ds.DataCollectionDiameter = "500"
    ds.SoftwareVersions = "bench-1.0"
    ds.ProtocolName = exam.protocol
    ds.ReconstructionDiameter = _ds(fov)
    ds.GantryDetectorTilt = "0"
    ds.TableHeight = _ds(table_height)
    ds.RotationDirection = "CW"
    ds.ExposureTime = "500"
    ds.XRayTubeCurrent = str(180 + (counter * 7) % 120)
    ds.Exposure = str(90 + (counter * 3) % 60)
    ds.ConvolutionKernel = series["ConvolutionKernel"]
    ds.PatientPosition = "HFS"
    ds.SpiralPitchFactor = 0.984375
    ds.CTDIvol = 8.0 + (kvp - 100) / 10
    # Relationship / plane
    ds.StudyInstanceUID = study["StudyInstanceUID"]
    ds.SeriesInstanceUID = series["SeriesInstanceUID"]
    ds.StudyID = study["StudyID"]
    ds.SeriesNumber = series["SeriesNumber"]
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = i + 1
    half = spacing * COLUMNS / 2
    ds.ImagePositionPatient = [_ds(-half + spacing / 2), _ds(-half + spacing / 2), _ds(z)]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.FrameOfReferenceUID = study["FrameOfReferenceUID"]
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = _ds(z)
    # Image pixel
    signed = scanner.pixel_representation == 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ROWS
    ds.Columns = COLUMNS
    ds.PixelSpacing = [_ds(spacing), _ds(spacing)]
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = scanner.pixel_representation
    ds.WindowCenter = _ds(series["WindowCenter"])
    ds.WindowWidth = _ds(series["WindowWidth"])
    ds.RescaleIntercept = "0" if signed else "-1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.LossyImageCompression = "00"

    hu = phantom.slice(counter, i / max(n_slices - 1, 1))
    if signed:  # 12-bit two's complement range
        pixels = np.clip(hu, -2048, 2047).astype("<i2")
    else:  # stored = HU + 1024, 12-bit unsigned range
        pixels = np.clip(hu.astype(np.int32) + 1024, 0, 4095).astype("<u2")
    ds.add_new(0x7FE00010, "OW", pixels.tobytes())
    return ds


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    parser = argparse.ArgumentParser(
        description="Generate synthetic CT DICOM studies (512x512, 16-bit, ~0.5 MB/file).")
    parser.add_argument("outdir", type=Path, help="output directory")
    parser.add_argument("--instances", type=int, default=2000,
                        help="total number of files (default: 2000)")
    parser.add_argument("--patients", type=int, default=10, help="patients (default: 10)")
    parser.add_argument("--studies-per-patient", type=int, default=1,
                        help="studies per patient (default: 1)")
    parser.add_argument("--series-per-study", type=int, default=2,
                        help="series per study (default: 2)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--layout", choices=("flat", "nested"), default="flat",
                        help="flat: OUTDIR/ct_NNNNN.dcm; nested: "
                             "OUTDIR/patient/study/series/NNNNN.dcm (default: flat)")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    paths = generate(args.outdir, args.instances, patients=args.patients,
                     series_per_study=args.series_per_study, seed=args.seed,
                     studies_per_patient=args.studies_per_patient, layout=args.layout)
    elapsed = time.perf_counter() - start
    size = sum(p.stat().st_size for p in paths)
    rate = len(paths) / elapsed if elapsed > 0 else float("inf")
    print(f"wrote {len(paths)} files ({size / 1e6:.1f} MB) to {args.outdir} "
          f"in {elapsed:.2f} s ({rate:.0f} files/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
