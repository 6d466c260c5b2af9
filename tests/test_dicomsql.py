"""The Conquest dicom.sql reader."""

from pathlib import Path

import pytest

from pacsbridge.shared.core.dicomsql import default_dicom_sql, load_schema, parse_dicom_sql
from pacsbridge.shared.core.errors import DicomSqlError

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "conquest-dicom.sql"


def test_shipped_file_is_conquest_reference_unchanged():
    assert REFERENCE.is_file(), "../shared/reference is beside the clone in CI and on developer machines"
    assert default_dicom_sql() == REFERENCE.read_text(encoding="utf-8")


def test_reference_parses_to_conquest_tables_and_columns():
    schema = parse_dicom_sql(REFERENCE.read_text(encoding="utf-8"), str(REFERENCE))
    assert {t.table for t in schema.tables.values()} == {
        "DICOMPatients", "DICOMStudies", "DICOMSeries", "DICOMImages", "DICOMWorkList"}
    study, series, image = schema["Study"], schema["Series"], schema["Image"]
    assert study.key.column == "StudyInsta" and study.parent.column == "PatientID"
    assert series.key.column == "SeriesInst" and series.parent.column == "StudyInsta"
    assert image.key.column == "SOPInstanc" and image.parent.column == "SeriesInst"
    names = [c.column for c in image.columns]
    assert "ImageNumbe" in names and "PhotoMetri" in names and "QRows" in names and "ImagePat" in names
    # the shipped file lacks a comma after PatientSex in *Study*: still read
    assert [c.column for c in study.columns][-4:] == ["PatientNam", "PatientBir", "PatientSex", "PatientID"]
    assert study.by_tag(0x00080061).dicom_type == "DT_MSTR"
    assert schema["Patient"].by_tag(0x00100030).sql_type == "SQL_C_DATE"
    # WorkList: sequence markers are not columns
    assert "--------" not in [c.name for c in schema["WorkList"].columns]
    assert len(schema["WorkList"].columns) == 24


def test_user_file_with_extra_column():
    text = default_dicom_sql().replace(
        '{ 0x0054, 0x0400, "ImageID", 16, SQL_C_CHAR, DT_STR },',
        '{ 0x0054, 0x0400, "ImageID", 16, SQL_C_CHAR, DT_STR },\n'
        ' { 0x0018, 0x0050, "SliceThickness", 16, SQL_C_CHAR, DT_STR },')
    schema = parse_dicom_sql(text)
    assert schema["Image"].by_tag(0x00180050).column == "SliceThick"
    assert schema["Image"].parent.column == "SeriesInst"


@pytest.mark.parametrize("text, message", [
    ("", "no *Patient*"),
    ("*Patient*\n{\n { 0x0010, 0x0020, \"PatientID\", 64, SQL_C_CHAR }\n}", "expected 6 or 7 fields"),
    ("*Patient*\n{\n { 0x0010, 0xZZ, \"PatientID\", 64, SQL_C_CHAR, DT_STR }\n}", "bad number"),
    ("*Bogus*\n{ { 1, 2, \"X\", 4, SQL_C_CHAR, DT_STR } }", "unknown section"),
    ("*Patient*\n{\n { 0x0010, 0x0020, \"Patient ID; drop\", 64, SQL_C_CHAR, DT_STR }\n}", "not a plain identifier"),
])
def test_bad_files_give_clear_errors(text, message):
    with pytest.raises(DicomSqlError, match=message.replace("*", r"\*")):
        parse_dicom_sql(text, "mine.sql")


def test_error_names_file_and_line(tmp_path):
    bad = tmp_path / "dicom.sql"
    bad.write_text(default_dicom_sql().replace('"QRows", 5,', '"QRows", five,'))
    with pytest.raises(DicomSqlError) as info:
        load_schema(bad)
    assert str(bad) in str(info.value) and ":" in str(info.value)
    assert info.value.line > 100


def test_special_columns_are_added_to_images():
    schema = load_schema(None, special_columns=True)
    names = [c.column for c in schema["Image"].columns]
    assert {"ElementCount", "ElementList", "ReferencedSOPUID"} <= set(names)
    assert names[-1] == "SeriesInst"
