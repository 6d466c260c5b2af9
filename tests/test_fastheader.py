"""The non-decoding header reader against pydicom, and its truncation check."""

from __future__ import annotations

import pytest

from pacsbridge.shared.core.dicomsql import load_schema
from pacsbridge.shared.core.errors import InvalidDataset, TruncatedFile
from pacsbridge.shared.dicom.fastheader import NeedsPydicom, scan
from pacsbridge.shared.index.records import _pydicom_header, read_header, schema_tags

from .helpers import TEST_FILES, make_instance, pydicom_test_files

TAGS = schema_tags(load_schema())


def test_same_values_as_pydicom_on_every_bundled_file():
    compared = 0
    for path in pydicom_test_files():
        data = path.read_bytes()
        try:
            fast = scan(data, TAGS, str(path))
        except (NeedsPydicom, InvalidDataset):
            continue
        slow = _pydicom_header(data, str(path), TAGS)
        assert {t: fast.values.get(t) for t in TAGS} == {t: slow.values.get(t) for t in TAGS}, path.name
        compared += 1
    assert compared >= 50  # most bundled files take the fast path


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small_implicit.dcm", "JPEG2000.dcm", "MR_small_RLE.dcm",
                                  "MR_small_bigendian.dcm", "rtdose_expb.dcm", "rtplan.dcm"])
def test_truncation_is_found_wherever_the_file_is_cut(name):
    data = (TEST_FILES / name).read_bytes()
    read_header(data, name)  # complete: fine
    for cut in (1, 7, 50):  # inside the last element (pixel data, or a sequence)
        with pytest.raises(TruncatedFile):
            read_header(data[: len(data) - cut], name)
    # cut in half: rejected too (a cut that falls exactly between two header elements leaves a
    # well-formed but shorter data set, which then lacks its UIDs)
    with pytest.raises(InvalidDataset):
        read_header(data[: len(data) // 2], name)


def test_pydicom_accepts_what_we_call_truncated():
    import pydicom

    for name in ("MR_truncated.dcm", "rtplan_truncated.dcm"):
        pydicom.dcmread(TEST_FILES / name)  # no error from pydicom
        with pytest.raises(TruncatedFile):
            read_header((TEST_FILES / name).read_bytes(), name)


def test_generated_instance_round_trip(tmp_path):
    ds = make_instance(tmp_path / "x.dcm", PatientName="Ünïcødé^Ñame", SpecificCharacterSet="ISO_IR 192")
    header = read_header((tmp_path / "x.dcm").read_bytes(), "x", TAGS)
    assert header.get("PatientName") == "Ünïcødé^Ñame"
    assert header.sop_instance_uid == ds.SOPInstanceUID


CHARSET_FILES = TEST_FILES.parent / "charset_files"


@pytest.mark.parametrize("name", sorted(p.name for p in CHARSET_FILES.glob("*.dcm")))
def test_every_character_set_reads_as_pydicom_decodes_it(name):
    """pydicom's character-set files: the fast reader either decodes a value exactly as pydicom does
    or hands the file to pydicom. ISO 2022 IR 87 / IR 149 names (with code extensions, the first
    value empty) were read as Latin-1, raw escape sequences and all."""
    import pydicom

    data = (CHARSET_FILES / name).read_bytes()
    tags = TAGS | {0x00100010}
    slow = _pydicom_header(data, name, tags)
    try:
        fast = scan(data, tags, name).values
    except NeedsPydicom:
        fast = slow.values
    assert {t: fast.get(t) for t in tags} == {t: slow.values.get(t) for t in tags}
    name_ = fast.get(0x00100010)
    if name_:
        assert "\x1b" not in name_
        assert name_ == str(pydicom.dcmread(CHARSET_FILES / name).PatientName)


def test_a_japanese_name_is_indexed_decoded(ctx, tmp_path):
    import pydicom
    from pydicom.uid import generate_uid

    from pacsbridge.shared.index.importer import Importer

    for name in ("chrH31.dcm", "chrI2.dcm"):
        ds = pydicom.dcmread(CHARSET_FILES / name)
        ds.SOPInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.StudyInstanceUID = ds.get("StudyInstanceUID") or generate_uid()
        ds.save_as(tmp_path / name)
    assert Importer(ctx.index, ctx.storage, workers=1).import_paths([tmp_path]).stored == 2
    names = {r[0] for r in ctx.index.run_sql("select PatientNam from DICOMPatients")[1]}
    assert names == {"Yamada^Tarou=山田^太郎=やまだ^たろう", "Hong^Gildong=洪^吉洞=홍^길동"}
