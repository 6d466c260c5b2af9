"""The engine's output, byte for byte, against hashes recorded before it was made faster.

``tests/fixtures/deid_golden.json`` holds, for every readable file pydicom ships (and a CT instance
like bench/gen_ct.py's) under every configuration of tests/test_deid_profile.py plus a safe-list and
trial one, the SHA-256 of what :meth:`Profile.apply` returned (the bytes, the action, the new UIDs and
the map of replaced UIDs). A speed-up that changes one byte of one output fails here. The hashes were
written by the engine of commit 4036690 (before the speed work of issue 16); regenerate them only on
purpose, for a change of output that is meant::

    .venv/bin/python -m tests.test_deid_golden --write
"""

from __future__ import annotations

import hashlib
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.filebase import DicomBytesIO

from pacsbridge.shared.deid.keys import KeyedIdentity, ProjectKey
from pacsbridge.shared.deid.options import Options, ProjectConfig, RiskPolicy, TrialTags
from pacsbridge.shared.deid.profile import DeidentifyError, Profile
from tests.helpers import TEST_FILES, make_instance

GOLDEN = Path(__file__).parent / "fixtures" / "deid_golden.json"
SECRET = b"0123456789abcdef0123456789abcdef"

#: Every risky kind sent with a warning, so that SRs, presentation states and documents are walked too.
_WARN = RiskPolicy(burned_in_annotation="warn", burned_in_likely="warn", structured_report="warn",
                   presentation_state="warn", encapsulated_document="warn")

CONFIGS: dict[str, ProjectConfig] = {
    "basic": ProjectConfig(options=Options(dates="remove")),
    "default": ProjectConfig(),
    "shift": ProjectConfig(options=Options(dates="shift")),
    "keep": ProjectConfig(options=Options(dates="keep")),
    **{name: ProjectConfig(options=Options(dates="remove", **{name: True})) for name in (
        "retain_safe_private", "retain_uids", "retain_device_identity", "retain_institution_identity",
        "retain_patient_characteristics", "clean_descriptors", "clean_structured_content", "clean_graphics")},
    "everything": ProjectConfig(
        options=Options(dates="shift", retain_safe_private=True, retain_device_identity=True,
                        retain_institution_identity=True, retain_patient_characteristics=True,
                        clean_descriptors=True, clean_structured_content=True, clean_graphics=True),
        trial=TrialTags(sponsor_name="SPONSOR", protocol_id="P-1", site_id="S1"), risk=_WARN),
    "warn": ProjectConfig(risk=_WARN),
    "warn_clean": ProjectConfig(options=Options(clean_structured_content=True, clean_descriptors=True), risk=_WARN),
}


def _ct() -> bytes:
    """A CT instance with the attributes bench/gen_ct.py writes, fixed UIDs, a small image."""
    ds = make_instance(
        rows=16, SOPInstanceUID="1.2.826.0.1.3680043.8.498.1", StudyInstanceUID="1.2.826.0.1.3680043.8.498.2",
        SeriesInstanceUID="1.2.826.0.1.3680043.8.498.3", FrameOfReferenceUID="1.2.826.0.1.3680043.8.498.4",
        SpecificCharacterSet="ISO_IR 100", InstanceCreationDate="20240220", InstanceCreationTime="124250.375441",
        SeriesDate="20240220", AcquisitionDate="20240220", ContentDate="20240220", AccessionNumber="ACC957413342",
        Manufacturer="CANON_MEC", InstitutionName="Pacsbridge General Hospital", ReferringPhysicianName="GREY^M^^DR",
        StationName="CANONCT1", StudyDescription="CT HEAD PB0001 Patient", SeriesDescription="Head 5.0 Brain",
        PatientAge="021Y", PatientWeight="109", BodyPartExamined="HEAD", SliceThickness="5", KVP="120",
        ProtocolName="Head_Routine", StudyID="77465", ImagePositionPatient=[-124.7, -124.7, 300],
        ImageOrientationPatient=[1, 0, 0, 0, 1, 0], PositionReferenceIndicator="", PixelSpacing=[0.48, 0.48],
        WindowCenter="40", WindowWidth="80", RescaleIntercept="0", RescaleSlope="1", LossyImageCompression="00")
    fp = DicomBytesIO()
    ds.save_as(fp, enforce_file_format=True)
    return fp.getvalue()


def _sources(folder: Path | None = None) -> dict[str, bytes | Path]:
    """Every source as bytes, or (``folder`` given) as a path, the CT written into ``folder``."""
    sources: dict[str, bytes | Path] = {"ct": _ct()}
    if folder is not None:
        (folder / "ct.dcm").write_bytes(_ct())
        sources["ct"] = folder / "ct.dcm"
    for path in sorted(TEST_FILES.rglob("*")):
        if path.is_file() and path.suffix.lower() not in (".json", ".txt", ".icc", ".gz", ".dump", ".bz2"):
            sources[str(path.relative_to(TEST_FILES))] = path if folder is not None else path.read_bytes()
    return sources


def _digest(profile: Profile, data: bytes | Path) -> str:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = profile.apply(data)
    except DeidentifyError:
        return "error"
    h = hashlib.sha256(result.data or b"")
    fields: list[Any] = [result.action, result.reason, result.sop_class, result.transfer_syntax, result.sop_uid,
                         result.series_uid, result.study_uid, list(result.original), list(result.patient),
                         sorted(result.uids.items())]
    h.update(json.dumps(fields).encode())
    return h.hexdigest()


def _compute(folder: Path | None = None) -> dict[str, dict[str, str]]:
    sources = _sources(folder)
    out: dict[str, dict[str, str]] = {}
    for name, config in CONFIGS.items():
        profile = Profile(config, KeyedIdentity(ProjectKey(SECRET, "golden")))
        out[name] = {source: _digest(profile, data) for source, data in sources.items()}
    return out


@pytest.mark.parametrize("given", ["bytes", "path"])
def test_output_is_byte_identical_to_the_recorded_engine(given: str, tmp_path: Path) -> None:
    golden = json.loads(GOLDEN.read_text())
    now = _compute(tmp_path if given == "path" else None)
    assert now.keys() == golden.keys()
    differ = [(config, source) for config in golden for source in golden[config]
              if now[config].get(source) != golden[config][source]]
    assert not differ, differ[:20]
    assert sum(v != "error" for v in golden["basic"].values()) >= 150  # most bundled files are de-identified


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        raise SystemExit(__doc__)
    GOLDEN.write_text(json.dumps(_compute(), indent=1, sort_keys=True) + "\n")
