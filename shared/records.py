"""Read a DICOM file's header and turn it into Conquest index rows.

The hot path reads only the header (``stop_before_pixels``), checks that the
file is complete by walking its element lengths (pydicom silently accepts a
truncated file), and builds one row per level from the columns a
:class:`~pacsbridge.shared.dicomsql.Schema` defines, with Conquest's value
rules: multi-values joined with ``\\``, over-long values truncated to the
column length, dates as 8 digits, empty values left out (``None``).
"""

from __future__ import annotations

import io
import struct
from typing import Any, BinaryIO, Iterable

from pydicom import dcmread
from pydicom.datadict import dictionary_has_tag, tag_for_keyword
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian

from .dicomsql import LEVELS, Column, Schema
from .errors import InvalidDataset, MissingUID, TruncatedFile
from .fastheader import NeedsPydicom, scan
from .special import special_values

__all__ = ["Header", "read_header", "check_complete", "build_rows", "Rows", "REQUIRED_UIDS", "schema_tags",
           "needs_dataset"]

#: Keywords without which an instance cannot be indexed.
REQUIRED_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")

# VRs with a 2-byte reserved field and a 4-byte length in explicit VR
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_SHORT_VRS = {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT",
              b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US"}
_UNDEFINED = 0xFFFFFFFF
_ITEM_TAGS = {0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD}


def _dataset_start(fp: BinaryIO) -> tuple[int, bool] | None:
    """Offset where the data set starts after the preamble and meta group.

    Returns ``(offset, True)`` for a Part 10 file, None when there is no
    ``DICM`` marker (then the caller does not check completeness).
    """
    fp.seek(0)
    head = fp.read(132)
    if len(head) < 132 or head[128:132] != b"DICM":
        return None
    offset = 132
    while True:
        fp.seek(offset)
        hdr = fp.read(8)
        if len(hdr) < 8:
            return offset, True
        group = struct.unpack("<H", hdr[:2])[0]
        if group != 0x0002:
            return offset, True
        vr = hdr[4:6]
        if vr in _LONG_VRS:
            more = fp.read(4)
            if len(more) < 4:
                return offset, True
            length = struct.unpack("<I", more)[0]
            offset += 12 + length
        else:
            length = struct.unpack("<H", hdr[6:8])[0]
            offset += 8 + length


def check_complete(fp: BinaryIO, size: int, transfer_syntax: str, path: str = "") -> None:
    """Raise :class:`TruncatedFile` if the data set ends before its elements do.

    Walks element headers from the start of the data set to the end of the
    file, skipping values by their lengths; undefined-length sequences and
    items are walked through. Anything this walker cannot follow (deflated
    data, an undefined-length UN) is accepted: the check is conservative.
    """
    start = _dataset_start(fp)
    if start is None or transfer_syntax == DeflatedExplicitVRLittleEndian:
        return
    offset = start[0]
    implicit = transfer_syntax == ImplicitVRLittleEndian
    endian = ">" if transfer_syntax == ExplicitVRBigEndian else "<"
    tag_fmt, h_fmt, i_fmt = endian + "HH", endian + "H", endian + "I"
    fp.seek(offset)
    while offset < size:
        fp.seek(offset)
        hdr = fp.read(8)
        if len(hdr) < 8:
            raise TruncatedFile(path, f"file ends inside an element header at byte {offset} of {size}")
        group, elem = struct.unpack(tag_fmt, hdr[:4])
        tag = (group << 16) | elem
        if tag in _ITEM_TAGS or group == 0xFFFE:
            # item and delimiters are always little-endian-sized 4-byte lengths in the TS byte order
            length = struct.unpack(i_fmt, hdr[4:8])[0]
            if tag == 0xFFFEE000 and length != _UNDEFINED:
                offset += 8 + length
            else:
                offset += 8
        elif implicit:
            length = struct.unpack(i_fmt, hdr[4:8])[0]
            offset += 8 if length == _UNDEFINED else 8 + length
        else:
            vr = hdr[4:6]
            if vr in _LONG_VRS:
                more = fp.read(4)
                if len(more) < 4:
                    raise TruncatedFile(path, f"file ends inside an element header at byte {offset}")
                length = struct.unpack(i_fmt, more)[0]
                if length == _UNDEFINED:
                    if vr == b"UN":
                        return  # implicit VR inside: not followed
                    offset += 12
                else:
                    offset += 12 + length
            elif vr in _SHORT_VRS:
                offset += 8 + struct.unpack(h_fmt, hdr[6:8])[0]
            else:
                return  # not a VR we know (padding, private oddity): stop checking
        if offset > size:
            raise TruncatedFile(
                path, f"element ({group:04X},{elem:04X}) runs to byte {offset} but the file has {size} bytes")


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


_REQUIRED_TAGS = {k: tag_for_keyword(k) for k in REQUIRED_UIDS}


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
    fp = io.BytesIO(buf)
    check_complete(fp, len(buf), ts, path)
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


def _convert(col: Column, text: str | None) -> str | None:
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
                value = special.get(col.column)
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
