"""Read a DICOM file's header and turn it into Conquest index rows.

The hot path reads only the attributes it needs without decoding
(:mod:`~pacsbridge.shared.dicom.fastheader`, which also checks that the file is
complete: pydicom silently accepts a truncated file); what that reader leaves
alone is read by pydicom (``stop_before_pixels``) and checked by the same
walk. It builds one row per level from the columns a
:class:`~pacsbridge.shared.core.dicomsql.Schema` defines, with Conquest's value
rules: multi-values joined with ``\\``, over-long values truncated to the
column length, dates as 8 digits, empty values left out (``None``).
"""

from __future__ import annotations

import io
import re
from typing import Any, Iterable

from pydicom import dcmread
from pydicom.datadict import dictionary_has_tag, tag_for_keyword
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.uid import ExplicitVRBigEndian, ImplicitVRLittleEndian

from pacsbridge.shared.core.dicomsql import LEVELS, Column, Schema
from pacsbridge.shared.core.errors import InvalidDataset, MissingUID
from pacsbridge.shared.dicom.fastheader import NeedsPydicom, check_complete, scan
from pacsbridge.shared.index.special import special_values

__all__ = ["Header", "read_header", "check_complete", "build_rows", "Rows", "REQUIRED_UIDS", "schema_tags",
           "needs_dataset", "clean_text"]

#: Keywords without which an instance cannot be indexed.
REQUIRED_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")


class Header:
    """What the index and the storage template need of one instance.

    Attributes
    ----------
    values : dict[int, str]
        Tag -> Conquest text for the requested tags (absent when empty).
    transfer_syntax : str
    dataset : Dataset or None
        The pydicom data set, when pydicom had to read it (or was asked to).
    """

    __slots__ = ("values", "transfer_syntax", "dataset")

    def __init__(self, values: dict[int, str], transfer_syntax: str, dataset: Any = None) -> None:
        self.values = values
        self.transfer_syntax = transfer_syntax
        self.dataset = dataset

    @property
    def sop_instance_uid(self) -> str:
        return self.values.get(0x00080018, "")

    @property
    def sop_class_uid(self) -> str:
        return self.values.get(0x00080016, "")

    def get(self, keyword: str, default: Any = None) -> Any:
        """A value by DICOM keyword (used by file name templates)."""
        tag = tag_for_keyword(keyword)
        if tag is None:
            return default
        value = self.values.get(tag)
        if value is None and self.dataset is not None:
            value = _text(_element_value(self.dataset, tag))
        return default if value is None else value


_REQUIRED_TAGS: dict[str, int] = {k: int(tag_for_keyword(k)) for k in REQUIRED_UIDS}  # type: ignore[arg-type]


def _element_value(ds: Any, tag: int) -> Any:
    try:
        elem = ds.get(tag)
        return None if elem is None else elem.value
    except Exception:
        return None  # an element pydicom cannot convert: not written


def _pydicom_header(buf: Any, path: str, tags: Iterable[int]) -> Header:
    try:
        fp = io.BytesIO(buf)
        try:
            ds = dcmread(fp, stop_before_pixels=True)
        except InvalidDicomError:
            # no preamble / meta: pydicom reads these with force=True; the
            # required-UID check below rejects what is not a data set at all
            fp.seek(0)
            ds = dcmread(fp, stop_before_pixels=True, force=True)
    except Exception as exc:  # pydicom raises many types for bad input
        raise InvalidDataset(path, f"not readable as DICOM: {type(exc).__name__}: {exc}") from None
    meta = getattr(ds, "file_meta", None)
    ts = str(meta.get("TransferSyntaxUID", "") or "") if meta is not None else ""
    if not ts:
        ts = ExplicitVRBigEndian if ds.is_little_endian is False else (
            ImplicitVRLittleEndian if ds.is_implicit_VR else "1.2.840.10008.1.2.1")
    values: dict[int, str] = {}
    for tag in set(tags) | set(_REQUIRED_TAGS.values()):
        text = _text(_element_value(ds, tag))
        if text is not None:
            values[tag] = text
    check_complete(buf, ts, path)
    return Header(values, ts, ds)


def read_header(buf: Any, path: str = "", tags: Iterable[int] = (), dataset: bool = False) -> Header:
    """Read and validate the header of an encoded instance.

    Parameters
    ----------
    buf : bytes, memoryview or mmap
        The whole file (or what a peer sent, with its file meta).
    path : str
        For error messages.
    tags : iterable of int
        Tags whose values are wanted (the schema's and the template's).
    dataset : bool
        Also return a pydicom data set (special columns need sequences).

    Raises
    ------
    InvalidDataset
        Not DICOM, unreadable, truncated (:class:`TruncatedFile`) or without a
        required UID (:class:`MissingUID`).
    """
    tags = set(tags) | set(_REQUIRED_TAGS.values())
    header: Header | None = None
    if not dataset:
        try:
            fast = scan(buf, tags, path)
            header = Header(fast.values, fast.transfer_syntax)
        except NeedsPydicom:
            header = None
    if header is None:
        header = _pydicom_header(buf, path, tags)
    for keyword, tag in _REQUIRED_TAGS.items():
        if not header.values.get(tag):
            ds = header.dataset
            if ds is not None and not any(dictionary_has_tag(t) for t in ds.keys() if (t >> 16) not in (0, 2)):
                raise InvalidDataset(path, "not a DICOM file (no DICOM elements found)")
            raise MissingUID(path, f"no {keyword}")
    return header


#: Rows of one instance: level -> {column: value}
Rows = dict[str, dict[str, Any]]


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, (MultiValue, list, tuple)):
        text = "\\".join(str(v).strip() for v in value)
    elif isinstance(value, bytes):
        return None
    else:
        text = str(value)
    text = text.strip(" \x00")
    return text or None


#: What no index column may hold: C0 and C1 control characters (PostgreSQL refuses a NUL in
#: text; the others break lists and terminals) and lone surrogates (not encodable in UTF-8).
_UNFIT = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def clean_text(text: str | None) -> str | None:
    """``text`` fit for a database column: each control character becomes a space (``Coil\\0X`` is
    ``Coil X``); ``None`` if nothing is left."""
    if text is None or text.isprintable() or _UNFIT.search(text) is None:  # isprintable: the C-speed common case
        return text
    return _UNFIT.sub(" ", text).strip() or None


def _convert(col: Column, text: str | None) -> str | None:
    if text is None:
        return None
    text = clean_text(text)
    if text is None:
        return None
    if col.sql_type == "SQL_C_DATE":
        digits = "".join(ch for ch in text if ch.isdigit())[:8]
        return digits or None
    if len(text) > col.length:
        text = text[: col.length]
    return text


def schema_tags(schema: Schema) -> set[int]:
    """Every tag the schema's index levels read."""
    return {c.tag for level in LEVELS for c in schema[level].columns if c.dicom_type != "DT_SPECIAL"}


def needs_dataset(schema: Schema) -> bool:
    """True when the schema has special columns (they need pydicom's sequences)."""
    return any(c.dicom_type == "DT_SPECIAL" for c in schema["Image"].columns)


def build_rows(header: Header, schema: Schema, object_file: str, device: str = "MAG0") -> Rows:
    """Conquest rows (one per level) for an instance.

    The PatientID key is ``""`` when the instance has none; the other keys are
    required UIDs (checked by :func:`read_header`).
    """
    rows: Rows = {}
    special: dict[str, str] | None = None
    values = header.values
    for level in LEVELS:
        tdef = schema[level]
        row: dict[str, Any] = {}
        for col in tdef.columns:
            if col.dicom_type == "DT_SPECIAL":
                if special is None:
                    try:
                        special = special_values(header.dataset) if header.dataset is not None else {}
                    except Exception:
                        special = {}
                value = clean_text(special.get(col.column))
                row[col.column] = value[: col.length] if value else None
                continue
            row[col.column] = _convert(col, values.get(col.tag))
        key = tdef.key.column
        if row.get(key) is None:
            row[key] = ""
        rows[level] = row
    rows["Image"]["ObjectFile"] = object_file
    rows["Image"]["DeviceName"] = device
    return rows
