"""The de-identification engine: PS3.15 Annex E's Basic Application Level Confidentiality Profile
and the options of Table E.1-1, applied to one Part 10 instance in one pass, in memory.

:class:`Profile` turns a project's :class:`~.options.ProjectConfig` into one action per tag (the
*plan*, from :mod:`.table`), then for each instance:

1. reads the header up to the pixel data as raw elements, with :func:`_fast_header` for the common
   encodings (what pydicom's ``dcmread(stop_before_pixels=True)`` would give, faster) and pydicom
   for anything else, and notes where the pixel data element starts in the source bytes (a path is
   read into the thread's reused buffer, not a fresh one);
2. checks the risky kinds of :class:`~.options.RiskPolicy` (withheld instances stop here);
3. walks every element at any depth of any sequence and applies its action (raw elements that are
   kept are never decoded, so the walk costs little);
4. writes the pseudonym, PatientIdentityRemoved, the method and its codes, the trial tags;
5. writes a new file meta (MediaStorageSOPInstanceUID = the new SOP Instance UID) and the data set
   with pydicom's writer, then appends the source's pixel data element **byte for byte** (it is
   never decoded; elements after it, Digital Signatures and Trailing Padding, are X in the table).

The choices the table leaves open are documented in ``docs/deidentification.md`` ("The profile"):
the compound actions (no per-IOD Types: X/Z -> Z, X/D, X/Z/D and Z/D -> D, X/Z/U* -> U or the
sequence kept with its UIDs replaced), standard attributes the table does not list, sequences, curves
and overlays, private attributes, and Clean (descriptors cleaned of the instance's own identifiers).
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import functools
import io
import os
import re
import struct
import threading
import zlib
from importlib import resources
from typing import Any, BinaryIO, NamedTuple, cast

from pydicom import dcmread
from pydicom.datadict import DicomDictionary, mask_match
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.charset import default_encoding
from pydicom.charset import convert_encodings
from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element, empty_value_for_VR
from pydicom.filereader import ENCODED_VR as filereader_ENCODED_VR_names
from pydicom.filereader import data_element_generator
from pydicom.values import convert_string
from pydicom.uid import PrivateTransferSyntaxes
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32
from pydicom.filewriter import write_data_element, write_file_meta_info
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag
from pydicom.uid import UID as PydicomUID

from pacsbridge.shared.deid.keys import Identity, Patient
from pacsbridge.shared.deid.options import OPTION_CODES, ProjectConfig
from pacsbridge.shared.deid.table import EDITION, rows
from pacsbridge.shared.dicom.filemeta import PREAMBLE, PYNETDICOM_IMPLEMENTATION_UID, encode_file_meta

__all__ = ["Profile", "Deidentified", "OriginalIds", "default_safe_private", "IMPLEMENTATION_VERSION",
           "DeidentifyError"]

#: ImplementationVersionName of a de-identified file (the class UID is pynetdicom's, as on our wire).
IMPLEMENTATION_VERSION = "PACSBRIDGE DEID"

# The actions of the plan, after the options and the compound actions are resolved.
REMOVE, EMPTY, DUMMY, KEEP, UID, SHIFT, CLEAN, RECURSE, CLEAN_SEQ, DUMMY_SEQ = range(10)
# How a sequence's items are walked: as they are, cleaned of the instance's identifiers (Clean), or
# with their free text replaced by dummies (D on a sequence of content: SR content, graphic annotations).
AS_IS, CLEANED, DUMMIED = 0, 1, 2
_FREE_TEXT_VRS = frozenset({"LT", "ST", "UT"})

_TEXT_VRS = frozenset({"LO", "SH", "ST", "LT", "UT", "UC", "PN", "AE", "CS", "UR"})
_DEFLATED = "1.2.840.10008.1.2.1.99"
_BIG = "1.2.840.10008.1.2.2"
_IMPLICIT = "1.2.840.10008.1.2"
_EXPLICIT = "1.2.840.10008.1.2.1"
_SQ_TAGS = frozenset(tag for tag, entry in DicomDictionary.items() if entry[0] == "SQ")
_PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)


def _dictionary_vr(tag: int) -> str:
    entry = DicomDictionary.get(int(tag))
    return entry[0] if entry else ""

#: Dummy values (action D) per VR: valid for the VR, meaningless.
_DUMMY: dict[str, Any] = {
    "PN": "ANONYMIZED", "LO": "ANONYMIZED", "SH": "ANONYMIZED", "LT": "ANONYMIZED", "ST": "ANONYMIZED",
    "UT": "ANONYMIZED", "UC": "ANONYMIZED", "CS": "ANONYMIZED", "AE": "ANONYMIZED", "UR": "",
    "DA": "19000101", "TM": "000000.00", "DT": "19000101000000.000000", "AS": "000Y",
    "DS": "0", "IS": "0", "US": 0, "SS": 0, "UL": 0, "SL": 0, "UV": 0, "SV": 0, "FL": 0.0, "FD": 0.0,
    "OB": b"\x00\x00", "OW": b"\x00\x00", "UN": b"\x00\x00", "OD": b"\x00" * 8, "OF": b"\x00" * 4,
    "OL": b"\x00" * 4, "OV": b"\x00" * 8, "AT": 0,
}

#: The dummies of the string VRs, encoded (ASCII, padded to even length with a space).
_RAW_DUMMY = {vr: (v + " " * (len(v) % 2)).encode("ascii") for vr, v in _DUMMY.items()
              if isinstance(v, str) and vr not in ("DS", "IS")}

# Risky SOP classes (PS3.4 Annex B): secondary capture, ultrasound, SR, presentation states,
# encapsulated documents.
_SC = "1.2.840.10008.5.1.4.1.1.7"
_US = ("1.2.840.10008.5.1.4.1.1.6.1", "1.2.840.10008.5.1.4.1.1.6.2", "1.2.840.10008.5.1.4.1.1.3.1",
       "1.2.840.10008.5.1.4.1.1.6")
_SR = "1.2.840.10008.5.1.4.1.1.88."
_PR = "1.2.840.10008.5.1.4.1.1.11."
_DOC = "1.2.840.10008.5.1.4.1.1.104."
_RISK_ORDER = {"quarantine": 3, "drop": 2, "warn": 1}

# The options as Table E.1-1's columns.
_BOOL_OPTIONS = ("retain_uids", "retain_device_identity", "retain_institution_identity",
                 "retain_patient_characteristics", "clean_descriptors", "clean_structured_content",
                 "clean_graphics")
_CLEAN_COLUMNS = ("clean_descriptors", "clean_structured_content", "clean_graphics")


class DeidentifyError(ValueError):
    """The source is not a DICOM instance the profile can read."""


class OriginalIds(NamedTuple):
    """The original identifiers of an instance (for the map and the job report; never sent)."""

    sop_uid: str
    series_uid: str
    study_uid: str
    patient_id: str
    issuer: str
    accession: str


@dataclasses.dataclass
class Deidentified:
    """What :meth:`Profile.apply` made of one instance."""

    data: bytes | None      # the de-identified Part 10 file; None when withheld
    action: str             # "send" | "warn" (send, with reason) | "quarantine" | "drop"
    reason: str             # why warned or withheld ("" otherwise)
    sop_class: str
    transfer_syntax: str
    sop_uid: str            # the new UIDs ("" when withheld)
    series_uid: str
    study_uid: str
    original: OriginalIds
    patient: Patient        # pseudonym and date offset used
    uids: dict[str, str]    # every original UID this instance had replaced -> its new UID


@functools.cache
def default_safe_private() -> tuple[str, ...]:
    """pacsbridge's default safe-list (``data/safe_private.csv``, from PS3.15 Table E.3.10-1), as
    ``GGGG,creator,EE`` entries."""
    text = resources.files("pacsbridge.shared.deid").joinpath("data/safe_private.csv").read_text("utf-8")
    return tuple(f"{r['group']},{r['creator']},{r['element']}" for r in csv.DictReader(io.StringIO(text)))


def _plan(config: ProjectConfig) -> dict[int, int]:
    """One action per standard tag for this configuration (Table E.1-1, options applied, compound
    actions resolved), plus the standard PN, DA and DT attributes the table does not list."""
    options = config.options
    enabled = {name for name in _BOOL_OPTIONS if getattr(options, name)}
    if options.dates == "keep":
        enabled.add("retain_long_full_dates")
    elif options.dates == "shift":
        enabled.add("retain_long_modified_dates")
    plan: dict[int, int] = {}
    for row in rows():
        number = row.number
        if number is None:
            continue  # the patterns: curves, overlays and private attributes are the walk's
        said = {column: action for column, action in row.options.items() if column in enabled}
        vr = row.vr
        if "K" in said.values():
            act = KEEP
        elif said.get("retain_long_modified_dates") == "C":
            act = SHIFT if vr in ("DA", "DT") else KEEP if vr == "TM" else _basic(row.basic, vr)
        elif "C" in said.values():
            act = CLEAN_SEQ if vr == "SQ" else CLEAN if vr in _TEXT_VRS else KEEP
        else:
            act = _basic(row.basic, vr)
            if vr == "SQ" and act == DUMMY:
                # a sequence of content that only an option may clean (SR content, graphic annotations):
                # kept, so the instance stays valid, with its free text replaced by dummies
                act = DUMMY_SEQ if any(c in row.options for c in _CLEAN_COLUMNS) else RECURSE
        if vr == "SQ" and act in (KEEP, UID):
            act = RECURSE
        elif vr == "UI" and act == DUMMY:
            act = UID
        plan[number] = act
    unlisted_dates = {"keep": KEEP, "shift": SHIFT, "remove": EMPTY}[options.dates]
    for tag, entry in DicomDictionary.items():
        if tag not in plan and (tag >> 16) not in (0x0002, 0x0000):
            if entry[0] == "PN":
                plan[tag] = EMPTY
            elif entry[0] in ("DA", "DT"):
                plan[tag] = unlisted_dates
    return plan


def _basic(action: str, vr: str) -> int:
    """The Basic Profile's action, the compound ones resolved the conservative way (no per-IOD
    Types): X/Z -> Z; X/D, X/Z/D, Z/D -> D; X/Z/U* -> U for a UID, the sequence kept with its UIDs
    replaced, Z otherwise."""
    if action == "X":
        return REMOVE
    if action in ("Z", "X/Z"):
        return EMPTY
    if action in ("D", "X/D", "X/Z/D", "Z/D"):
        return DUMMY
    if action == "U":
        return UID
    if action == "X/Z/U*":
        return UID if vr == "UI" else RECURSE if vr == "SQ" else EMPTY
    raise ValueError(f"Table E.1-1 action {action!r} is not implemented")


def _shift_date(value: str, days: int) -> str | None:
    """``YYYYMMDD`` (or ``YYYY.MM.DD``, ``YYYY``, ``YYYYMM``) moved by ``days``; None when unreadable."""
    digits = value.replace(".", "") if len(value) == 10 and value[4] == "." else value
    if not digits.isdigit() or len(digits) not in (4, 6, 8):
        return None
    padded = digits + "0101"[len(digits) - 4:] if len(digits) < 8 else digits
    try:
        moved = datetime.date(int(padded[:4]), int(padded[4:6]), int(padded[6:8])) + datetime.timedelta(days=days)
    except (ValueError, OverflowError):
        return None
    return f"{moved.year:04d}{moved.month:02d}{moved.day:02d}"[:len(digits)]


_DT = r"\d{4,14}(?:\.\d{1,6})?(?:[+-]\d{4})?"
_DT_ONE = re.compile(r"(\d{4,14})((?:\.\d{1,6})?(?:[+-]\d{4})?)")
_DT_RANGE = re.compile(f"({_DT})?-({_DT})?")


def _shift_one(value: str, vr: str, days: int) -> str | None:
    """One DA or DT value, or a range of either (each end moved); DT keeps its time and offset."""
    value = value.strip()
    if not value:
        return value
    if vr == "DA":
        if "-" in value:
            ends = value.split("-")
            if len(ends) != 2:
                return None
            moved = [_shift_date(e, days) if e else "" for e in ends]
            return None if None in moved else "-".join(m or "" for m in moved)
        return _shift_date(value, days)
    one = _DT_ONE.fullmatch(value)
    if one:
        digits = one.group(1)
        date = _shift_date(digits[:8], days)
        return None if date is None else date + digits[8:] + one.group(2)
    pair = _DT_RANGE.fullmatch(value)
    if pair:
        pair_ends: list[str | None] = [_shift_one(e, vr, days) if e else "" for e in pair.groups("")]
        return None if None in pair_ends else "-".join(e or "" for e in pair_ends)
    return None


def _shift(value: Any, vr: str, days: int) -> Any:
    """A DA or DT value (single, multiple, ranges) moved by ``days``; None when any part is unreadable."""
    if isinstance(value, (MultiValue, list)):
        moved = [_shift_one(str(v), vr, days) for v in value]
        return None if None in moved else moved
    if isinstance(value, (str, bytes)):
        text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
        return _shift_one(text, vr, days)
    return None


def _date_forms(value: str) -> list[str]:
    """A date in the forms it may take in free text."""
    value = value.strip()
    if len(value) < 8 or not value[:8].isdigit():
        return [value] if value else []
    y, m, d = value[:4], value[4:6], value[6:8]
    return [value[:8], f"{y}-{m}-{d}", f"{y}.{m}.{d}", f"{y}/{m}/{d}", f"{d}.{m}.{y}", f"{d}/{m}/{y}",
            f"{m}/{d}/{y}", f"{d}-{m}-{y}"]


_IDENTIFIERS_ID = (0x00100020, 0x00101000, 0x00080050, 0x00100021)
_IDENTIFIERS_PN = (0x00100010, 0x00101001, 0x00101005, 0x00101060, 0x00080090, 0x00081050, 0x00081060,
                   0x00081070, 0x00321032)
_IDENTIFIERS_DA = (0x00100030, 0x00080020, 0x00080021, 0x00080022, 0x00080023, 0x00080012)


def _identifiers(ds: Dataset) -> re.Pattern[str] | None:
    """The instance's own identifiers (name parts, IDs, accession number, dates) as one pattern,
    longest first, case-insensitive; None when it has none."""
    found: set[str] = set()

    def values(tag: int) -> list[str]:
        if tag not in ds._dict:
            return []
        try:
            value = ds[tag].value
        except Exception:  # noqa: BLE001 - an unreadable value identifies nothing we can match
            return []
        items = value if isinstance(value, (MultiValue, list)) else [value]
        return [str(v) for v in items if v not in (None, "")]

    for tag in _IDENTIFIERS_ID:
        found.update(v.strip() for v in values(tag))
    for tag in _IDENTIFIERS_PN:
        for name in values(tag):
            found.update(p for p in re.split(r"[\^=\s,]+", name) if len(p) >= 2)
    for tag in _IDENTIFIERS_DA:
        for date in values(tag):
            found.update(_date_forms(date))
    found = {f for f in found if len(f) >= 2}
    if not found:
        return None
    return re.compile("|".join(re.escape(f) for f in sorted(found, key=len, reverse=True)), re.IGNORECASE)


def _pixel_end(buf: memoryview, pos: int, implicit: bool, little: bool) -> int:
    """Where the pixel data element starting at ``pos`` ends (undefined length: after its sequence
    delimiter)."""
    order = "<" if little else ">"
    if implicit:
        length = struct.unpack_from(order + "I", buf, pos + 4)[0]
        value = pos + 8
    else:
        vr = bytes(buf[pos + 4:pos + 6])
        if vr in (b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"UN", b"UT", b"SQ", b"UC", b"UR", b"SV", b"UV"):
            length = struct.unpack_from(order + "I", buf, pos + 8)[0]
            value = pos + 12
        else:
            length = struct.unpack_from(order + "H", buf, pos + 6)[0]
            value = pos + 8
    if length != 0xFFFFFFFF:
        return min(value + length, len(buf))
    at = value
    while at + 8 <= len(buf):
        group, element, item_length = struct.unpack_from(order + "HHI", buf, at)
        at += 8
        if (group, element) == (0xFFFE, 0xE0DD):
            return at
        if (group, element) != (0xFFFE, 0xE000):
            raise DeidentifyError("encapsulated pixel data: an item tag expected")
        at += item_length
    raise DeidentifyError("encapsulated pixel data: no sequence delimiter")


_ENCODED_VR = frozenset(filereader_ENCODED_VR_names)
_LONG_VR_BYTES = frozenset(vr for vr in _ENCODED_VR if vr.decode() in EXPLICIT_VR_LENGTH_32)
_VR_NAME = {vr: vr.decode() for vr in _ENCODED_VR}
_u32 = struct.Struct("<I").unpack_from
_tag_vr_len = struct.Struct("<HH2sH").unpack_from
_tag_len = struct.Struct("<HHI").unpack_from
_KNOWN_LE = {_IMPLICIT: True, _EXPLICIT: False}


class _ViewReader:
    """A read-only file over a memoryview, not copied (``io.BytesIO`` copies anything but bytes): what
    pydicom reads the undefined-length elements of :func:`_fast_header` from."""

    def __init__(self, view: memoryview) -> None:
        self.view, self.pos = view, 0

    def read(self, size: int = -1) -> bytes:
        start = self.pos
        self.pos = len(self.view) if size is None or size < 0 else min(start + size, len(self.view))
        return bytes(self.view[start:self.pos])

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = offset if whence == 0 else self.pos + offset if whence == 1 else len(self.view) + offset
        return self.pos

    def tell(self) -> int:
        return self.pos


class _Header(NamedTuple):
    ds: Dataset
    transfer_syntax: str
    implicit: bool
    meta_sop_class: str
    pixel_at: int  # where the pixel data element starts (len(buf) when there is none)


def _fast_header(buf: memoryview) -> _Header | None:
    """The header of a Part 10 buffer as pydicom's ``dcmread(stop_before_pixels=True)`` reads it
    (the same raw elements), for what senders nearly always write: a preamble and file meta,
    little endian (implicit, explicit, or encapsulated), every element with a VR pydicom knows (an
    undefined-length one is read by pydicom's own element reader). Anything else (a big endian or
    deflated syntax, a command set, a VR that does not match the syntax, an element past the end)
    is None: the caller asks pydicom, which handles all of it.

    (Our own for speed: ``dcmread`` cost half of a CT's de-identification, most of it on its
    generic, file-like element reader and on the five datasets it builds; measured 0.30 of
    0.58 ms per 0.5 MB CT, and this reader about 0.05.)"""
    end = len(buf)
    if end < 144 or buf[128:132] != b"DICM":
        return None
    at = 132
    meta: dict[int, bytes] = {}
    while at + 8 <= end:
        group, element, vr, length = _tag_vr_len(buf, at)
        if group != 2:
            break
        if vr not in _ENCODED_VR:
            return None
        if vr in _LONG_VR_BYTES:
            if at + 12 > end:
                return None
            length = _u32(buf, at + 8)[0]
            at += 12
        else:
            at += 8
        if length == 0xFFFFFFFF or at + length > end:
            return None
        meta[element] = bytes(buf[at:at + length])
        at += length
    if not meta or at + 8 > end:
        return None
    group = buf[at] | buf[at + 1] << 8
    if group == 0:
        return None  # a command set: pydicom's
    raw_ts = meta.get(0x0010)
    if raw_ts is None:
        return None
    try:
        transfer_syntax = raw_ts.decode("ascii").rstrip("\x00 ")
    except UnicodeDecodeError:
        return None
    if not transfer_syntax or "\\" in transfer_syntax or transfer_syntax in (_BIG, _DEFLATED) \
            or transfer_syntax in PrivateTransferSyntaxes:
        return None
    implicit = _KNOWN_LE.get(transfer_syntax, False)
    first_vr = bytes(buf[at + 4:at + 6])
    looks_implicit = not (0x40 < first_vr[0] < 0x5B and 0x40 < first_vr[1] < 0x5B)
    if looks_implicit != implicit:
        return None  # pydicom switches, with a warning: its way
    elements: dict[BaseTag, RawDataElement | DataElement] = {}
    charset: Any = None
    encoding: Any = default_encoding
    while at + 8 <= end:
        if implicit:
            group, element, length = _tag_len(buf, at)
            vr_name = None
            at += 8
        else:
            group, element, vr, length = _tag_vr_len(buf, at)
            if vr not in _ENCODED_VR:
                return None
            vr_name = _VR_NAME[vr]
            if vr in _LONG_VR_BYTES:
                if at + 12 > end:
                    return None
                length = _u32(buf, at + 8)[0]
                at += 12
            else:
                at += 8
        tag = group << 16 | element
        if tag in _PIXEL_TAGS:
            at -= 12 if not implicit and vr in _LONG_VR_BYTES else 8
            break
        if group == 0xFFFE:
            return None
        if length == 0xFFFFFFFF:
            # an undefined-length element (a sequence, mostly): read by pydicom's own element reader,
            # from here, with the character set it would have by now, then on with ours
            fp = _ViewReader(buf)
            fp.seek(at - (8 if implicit or vr not in _LONG_VR_BYTES else 12))
            try:
                made = next(data_element_generator(cast(BinaryIO, fp), implicit, True, None, None, encoding))
            except Exception:  # noqa: BLE001 - whatever pydicom makes of it, it makes it on its own
                return None
            elements[made.tag] = made
            at = fp.tell()
            continue
        if at + length > end:
            return None
        value: Any = bytes(buf[at:at + length]) if length else empty_value_for_VR(vr_name, raw=True)
        btag = BaseTag(tag)
        elements[btag] = raw = RawDataElement(btag, vr_name, length, value, at, implicit, True)
        if tag == 0x00080005:
            charset = raw
            encoding = convert_encodings(convert_string(value or b"", True))  # as pydicom's reader has it
        at += length
    else:
        if at != end:
            return None  # a few stray bytes at the end: pydicom decides
    ds = Dataset(elements)
    encoding = default_encoding
    if charset is not None:
        encoding = convert_encodings(convert_raw_data_element(charset).value)
    ds.set_original_encoding(implicit, True, encoding)
    try:
        meta_sop_class = meta[0x0002].decode("ascii").rstrip("\x00 ") if 0x0002 in meta else ""
    except UnicodeDecodeError:
        return None
    return _Header(ds, transfer_syntax, implicit, meta_sop_class, at)



_LONG_VRS = frozenset({"OB", "OW", "OF", "OD", "OL", "OV", "UN", "UT", "SQ", "UC", "UR", "SV", "UV"})


def _write(fp: DicomBytesIO, ds: Dataset, encodings: Any) -> None:
    """``ds`` encoded into ``fp``, as pydicom's ``write_dataset`` would, faster: an element still raw
    (kept, never decoded; most of them) is copied with its header packed here, sequences are
    written with undefined lengths here, and only the elements the profile changed go through
    pydicom's ``write_data_element``. (Our own for speed: pydicom's writer costs about half of a
    small instance's time, most of it on elements it only copies.)"""
    little, implicit = fp.is_little_endian, fp.is_implicit_VR
    order = "<" if little else ">"
    short, long_, bare = struct.Struct(order + "HH2sH"), struct.Struct(order + "HH2sHI"), struct.Struct(order + "HHI")
    write = fp.write
    elements: Any = ds._dict
    # key=int: the same order, compared in C (BaseTag's __lt__ is Python: 3% of an instance's time, measured)
    for tag in sorted(elements, key=int):
        elem = elements[tag]
        if type(elem) is RawDataElement and elem.length != 0xFFFFFFFF and elem.value is not None \
                and elem.is_implicit_VR == implicit and elem.is_little_endian == little:
            value = elem.value
            size = len(value)  # not elem.length: a truncated source gives fewer bytes than it says
            if size % 2:
                value += b"\x00" if elem.VR in ("UI", "OB", "UN", None) else b" "
                size += 1
            if implicit:
                write(bare.pack(tag >> 16, tag & 0xFFFF, size))
            elif elem.VR in _LONG_VRS:
                write(long_.pack(tag >> 16, tag & 0xFFFF, elem.VR.encode(), 0, size))
            elif elem.VR is not None and len(elem.VR) == 2 and size <= 0xFFFF:
                write(short.pack(tag >> 16, tag & 0xFFFF, elem.VR.encode(), size))
            else:
                write_data_element(fp, ds[tag], encodings)
                continue
            write(value)
            continue
        if type(elem) is RawDataElement:
            elem = ds[tag]
        if elem.VR == "SQ":
            write(bare.pack(tag >> 16, tag & 0xFFFF, 0xFFFFFFFF) if implicit else
                  long_.pack(tag >> 16, tag & 0xFFFF, b"SQ", 0, 0xFFFFFFFF))
            item: Any
            for item in elem.value or ():
                write(bare.pack(0xFFFE, 0xE000, 0xFFFFFFFF))
                _write(fp, item, item.get("SpecificCharacterSet") or encodings)
                write(bare.pack(0xFFFE, 0xE00D, 0))
            write(bare.pack(0xFFFE, 0xE0DD, 0))
        else:
            write_data_element(fp, elem, encodings)


def _file_meta(sop_class: str, sop_uid: str, transfer_syntax: str) -> bytes:
    """The file meta group by pydicom's writer (for values :func:`encode_file_meta` refuses)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = PydicomUID(sop_class)
    meta.MediaStorageSOPInstanceUID = PydicomUID(sop_uid)
    meta.TransferSyntaxUID = PydicomUID(transfer_syntax)
    meta.ImplementationClassUID = PydicomUID(PYNETDICOM_IMPLEMENTATION_UID)
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION
    fp = DicomBytesIO()
    write_file_meta_info(fp, meta, enforce_standard=True)
    return fp.getvalue()


#: The largest pixel data read into a thread's reused buffer (larger: a buffer of its own).
_BUFFER_MAX = 32 << 20
_local = threading.local()


def _pixel_buffer(size: int) -> memoryview:
    """This thread's reused buffer, at least ``size`` bytes."""
    buf: bytearray | None = getattr(_local, "buffer", None)
    if buf is None or len(buf) < size:
        buf = _local.buffer = bytearray(max(size, 1 << 20))  # a new one: a view may still hold the old
    return memoryview(buf)


class Profile:
    """A project's profile: the plan of its configuration, applied to one instance at a time.

    Parameters
    ----------
    config : ProjectConfig
        The project's configuration (options, safe-list, risk policy, trial tags).
    identity : Identity
        Where pseudonyms, date offsets and new UIDs come from (the project's map, or
        :class:`~.keys.KeyedIdentity`).
    """

    def __init__(self, config: ProjectConfig, identity: Identity) -> None:
        self.config, self.identity = config, identity
        self._plan = _plan(config)
        options = config.options
        self._clean_graphics = options.clean_graphics
        self._safe: dict[tuple[int, str], set[int]] = {}
        if options.retain_safe_private:
            for entry in (config.safe_private if config.safe_private is not None else default_safe_private()):
                group, creator, element = entry.split(",")
                self._safe.setdefault((int(group, 16), creator.strip()), set()).add(int(element, 16))
        self._method, self._codes = self._describe()
        self._trial = bool(config.trial.sponsor_name or config.trial.protocol_id)

    def _describe(self) -> tuple[list[str], list[tuple[str, str]]]:
        options = self.config.options
        keys = ["basic"] + [name for name in ("retain_safe_private", *_BOOL_OPTIONS) if getattr(options, name)]
        if options.dates == "keep":
            keys.append("dates_keep")
        elif options.dates == "shift":
            keys.append("dates_shift")
        codes = [OPTION_CODES[k] for k in keys]
        method = [f"pacsbridge PS3.15 {EDITION} E.1-1"] + [meaning[:64] for _, meaning in codes]
        return method, codes

    # -- the one entry point -----------------------------------------------------------------------

    def apply(self, source: bytes | memoryview | str | os.PathLike[str]) -> Deidentified:
        """De-identify one Part 10 instance (bytes, or a path).

        Raises
        ------
        DeidentifyError
            When pydicom cannot read the source as DICOM.
        """
        if isinstance(source, (str, os.PathLike)):
            with open(source, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size <= _BUFFER_MAX:
                    view = _pixel_buffer(size + 1)
                    n = f.readinto(view)
                    head = _fast_header(view[:n]) if n <= size else None
                    if head is not None:
                        return self._from_header(head, view[:n])
                    f.seek(0)
                return self._apply_file(f)
        buf = memoryview(source)
        head = _fast_header(buf)
        if head is not None:
            return self._from_header(head, buf)
        fp = io.BytesIO(source if isinstance(source, bytes) else buf)  # bytes: shared, not copied
        ds, transfer_syntax, implicit, little = self._read(fp)
        pixel: bytes | memoryview = b""
        if transfer_syntax != _DEFLATED:
            at = fp.tell()
            if at + 4 <= len(buf):
                tag = struct.unpack_from("<HH" if little else ">HH", buf, at)
                if (tag[0] << 16 | tag[1]) in _PIXEL_TAGS:
                    pixel = buf[at:_pixel_end(buf, at, implicit, little)]  # copied once, by the join
        return self._deidentify(ds, transfer_syntax, pixel)

    def _from_header(self, head: _Header, buf: memoryview) -> Deidentified:
        """:meth:`apply` of what :func:`_fast_header` read of ``buf``."""
        pixel: bytes | memoryview = b""
        if head.pixel_at + 4 <= len(buf):  # _fast_header stopped at a pixel data tag
            pixel = buf[head.pixel_at:_pixel_end(buf, head.pixel_at, head.implicit, True)]
        return self._deidentify(head.ds, head.transfer_syntax, pixel, head.meta_sop_class)

    def _apply_file(self, f: io.BufferedReader) -> Deidentified:
        """:meth:`apply` of an open file: the header parsed from the file, the pixel data read into this
        thread's reused buffer (:func:`_pixel_buffer`) and copied once, into the output.

        This is the fallback of :meth:`apply` for what :func:`_fast_header` leaves to pydicom. (Our
        own instead of ``f.read()``: no fresh buffer of the whole file beside the fresh output. A
        synthetic loop showed glibc trimming and re-faulting two such buffers per file; bench/deid.py
        did not (2.5 page faults per file before, 0 after), so the gain here is small.)"""
        ds, transfer_syntax, implicit, little = self._read(f)
        if transfer_syntax == _DEFLATED:
            return self._deidentify(ds, transfer_syntax, b"")
        at = f.tell()
        size = os.fstat(f.fileno()).st_size
        buf: memoryview
        if size - at > _BUFFER_MAX:
            rest = f.read()  # a large multi-frame: its own buffer (read once, copied once by the join)
            buf = memoryview(rest)
        else:
            buf = _pixel_buffer(size - at + 1)
            n = f.readinto(buf)
            if n > size - at:  # grown since fstat: read the rest the plain way
                buf = memoryview(b"".join((buf[:n], f.read())))
            else:
                buf = buf[:n]
        pixel: bytes | memoryview = b""
        if len(buf) >= 4:
            tag = struct.unpack_from("<HH" if little else ">HH", buf, 0)
            if (tag[0] << 16 | tag[1]) in _PIXEL_TAGS:
                pixel = buf[:_pixel_end(buf, 0, implicit, little)]
        return self._deidentify(ds, transfer_syntax, pixel)

    @staticmethod
    def _read(fp: Any) -> tuple[Dataset, str, bool, bool]:
        """The header of ``fp`` up to the pixel data (all of it when deflated), its transfer syntax and
        encoding; ``fp`` is left at the pixel data (or where the header ends)."""
        try:
            ds = dcmread(fp, stop_before_pixels=True, force=True)
        except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds for a bad file
            raise DeidentifyError(f"not readable as DICOM: {exc}") from exc
        meta = ds.file_meta
        implicit, little = ds.original_encoding
        transfer_syntax = str(meta.get("TransferSyntaxUID", "") or "")
        if implicit is None:
            raise DeidentifyError("not readable as DICOM: no encoding")
        if not transfer_syntax:
            transfer_syntax = _IMPLICIT if implicit else _EXPLICIT if little else _BIG
        if transfer_syntax == _DEFLATED:
            fp.seek(0)
            ds = dcmread(fp, force=True)  # inflated by pydicom; its pixel data is kept as read
        return ds, transfer_syntax, bool(implicit), bool(little)

    def _deidentify(self, ds: Dataset, transfer_syntax: str, pixel: bytes | memoryview,
                    meta_sop_class: str | None = None) -> Deidentified:
        elements: Any = ds._dict
        get = elements.get

        def text(tag: int) -> str:
            raw = get(tag)
            if raw is None:
                return ""
            if type(raw) is RawDataElement and raw.value is not None:
                try:  # the fast way for plain ASCII (UIDs, IDs); pydicom decodes anything else
                    return raw.value.decode("ascii").split("\\")[0].strip("\x00 ")
                except UnicodeDecodeError:
                    pass
            value = ds[tag].value
            return str(value[0] if isinstance(value, MultiValue) and len(value) else value or "").strip()

        original = OriginalIds(text(0x00080018), text(0x0020000E), text(0x0020000D), text(0x00100020),
                               text(0x00100021), text(0x00080050))
        sop_class = text(0x00080016) or (meta_sop_class if meta_sop_class is not None else
                                         str(ds.file_meta.get("MediaStorageSOPClassUID", "") or ""))
        patient = self.identity.patient(original.issuer, original.patient_id)
        action, reason = self._risk(sop_class, text(0x00280301).upper())
        if action in ("quarantine", "drop"):
            return Deidentified(None, action, reason, sop_class, transfer_syntax, "", "", "", original, patient, {})
        walk = _Walk(self, patient.date_offset, _identifiers(ds) if self._needs_identifiers() else None)
        walk.dataset(ds, AS_IS)
        self._stamp(ds, patient, transfer_syntax == _IMPLICIT, transfer_syntax != _BIG)
        new = walk.uids
        sop_uid = new.get(original.sop_uid, original.sop_uid)
        try:
            meta = encode_file_meta(sop_class, sop_uid, transfer_syntax, PYNETDICOM_IMPLEMENTATION_UID,
                                    IMPLEMENTATION_VERSION)
        except ValueError:  # a value too long or not ASCII for its VR: pydicom writes what it can
            meta = _file_meta(sop_class, sop_uid, transfer_syntax)
        out = DicomBytesIO()
        out.is_little_endian = transfer_syntax != _BIG
        out.is_implicit_VR = transfer_syntax == _IMPLICIT
        _write(out, ds, ds.get("SpecificCharacterSet") or default_encoding)
        body = out.getvalue()
        if transfer_syntax == _DEFLATED:
            packer = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
            body = packer.compress(body) + packer.flush()
            if len(body) % 2:
                body += b"\x00"
        data = b"".join((PREAMBLE, meta, body, pixel))
        return Deidentified(data, action, reason, sop_class, transfer_syntax, sop_uid,
                            new.get(original.series_uid, original.series_uid),
                            new.get(original.study_uid, original.study_uid), original, patient, dict(new))

    def _needs_identifiers(self) -> bool:
        o = self.config.options
        return o.clean_descriptors or o.clean_structured_content or o.clean_graphics or \
            o.retain_device_identity or o.retain_patient_characteristics

    def _risk(self, sop_class: str, burned_in: str) -> tuple[str, str]:
        """The strictest of the risk policy's actions that apply (quarantine > drop > warn), and why."""
        policy = self.config.risk
        found: list[tuple[str, str]] = []
        if burned_in == "YES":
            found.append((policy.burned_in_annotation, "BurnedInAnnotation is YES"))
        elif burned_in != "NO" and (sop_class.startswith(_SC) or sop_class in _US):
            found.append((policy.burned_in_likely, f"SOP class {sop_class} often carries burned-in text and "
                                                   "BurnedInAnnotation is not NO"))
        if sop_class.startswith(_SR):
            found.append((policy.structured_report, "structured report"))
        if sop_class.startswith(_PR):
            found.append((policy.presentation_state, "presentation state"))
        if sop_class.startswith(_DOC):
            found.append((policy.encapsulated_document, "encapsulated document"))
        if not found:
            return "send", ""
        action = max((a for a, _ in found), key=_RISK_ORDER.__getitem__)
        return action, "; ".join(r for _, r in found)

    def _stamp(self, ds: Dataset, patient: Patient, implicit: bool, little: bool) -> None:
        """PatientID and PatientName = the pseudonym, PatientIdentityRemoved, the method and its codes,
        the temporal information flag and the trial tags."""
        elements: Any = ds._dict
        elements.update(self._static(implicit, little))
        # PatientName is the pseudonym as a family name ("LUNG020312^"): a one-part name is the retired
        # form (dciodvfy warns, and highdicom warns on every SEG made from it)
        values = ((0x00100020, "LO", patient.pseudonym), (0x00100010, "PN", patient.pseudonym + "^")) + (
            ((0x00120040, "LO", patient.pseudonym),) if self._trial else ())
        try:
            encoded = [(tag, vr, text.encode("ascii")) for tag, vr, text in values]
        except UnicodeEncodeError:  # one given per request, not of the pattern: pydicom encodes it
            for tag, vr, text in values:
                ds.add_new(tag, vr, text)
            return
        for tag, vr, raw in encoded:
            if len(raw) % 2:
                raw += b" "
            elements[BaseTag(tag)] = RawDataElement(BaseTag(tag), vr, len(raw), raw, 0, implicit, little)

    @functools.lru_cache(maxsize=4)  # noqa: B019 - a Profile lives as long as its job; four encodings at most
    def _static(self, implicit: bool, little: bool) -> dict[Any, Any]:
        """What every instance of this profile gets alike, encoded once per encoding and read back as
        raw elements, so that writing them costs a copy (building them for each instance cost about a
        fifth of a small instance's time)."""
        ds = Dataset()
        ds.add_new(0x00120062, "CS", "YES")
        ds.add_new(0x00120063, "LO", self._method)
        items = []
        for value, meaning in self._codes:
            item = Dataset()
            item.add_new(0x00080100, "SH", value)
            item.add_new(0x00080102, "SH", "DCM")
            item.add_new(0x00080104, "LO", meaning)
            items.append(item)
        ds.add_new(0x00120064, "SQ", Sequence(items))
        dates = self.config.options.dates
        ds.add_new(0x00280303, "CS", {"keep": "UNMODIFIED", "shift": "MODIFIED", "remove": "REMOVED"}[dates])
        trial = self.config.trial
        if self._trial:
            for tag, value in ((0x00120010, trial.sponsor_name or "UNKNOWN"),
                               (0x00120020, trial.protocol_id or "UNKNOWN"), (0x00120021, trial.protocol_name),
                               (0x00120030, trial.site_id), (0x00120031, trial.site_name),
                               (0x00120050, trial.time_point_id)):
                if value or tag in (0x00120021, 0x00120030, 0x00120031):  # Type 2: present, maybe empty
                    ds.add_new(tag, "LO", value or None)
        fp = DicomBytesIO()
        fp.is_implicit_VR, fp.is_little_endian = implicit, little
        _write(fp, ds, default_encoding)
        size = fp.tell()
        fp.seek(0)
        return dict(read_dataset(fp, implicit, little, size)._dict)  # type: ignore[arg-type]


class _Walk:
    """One instance's walk: applies the plan at every depth and collects the replaced UIDs."""

    def __init__(self, profile: Profile, days: int, identifiers: re.Pattern[str] | None) -> None:
        self.profile, self.days, self.identifiers = profile, days, identifiers
        self.plan = profile._plan
        self.shifting = profile.config.options.dates == "shift"
        self.uids: dict[str, str] = {}

    def uid(self, value: str) -> str:
        value = value.strip("\x00 ")
        if not value:
            return value
        new = self.uids.get(value)
        if new is None:
            new = self.uids[value] = self.profile.identity.uid(value)
        return new

    def raw_uid(self, elements: dict[Any, Any], tag: int) -> bool:
        """New UIDs written into a still-raw UI element, without decoding it (True when done)."""
        raw = elements[tag]
        if type(raw) is not RawDataElement or raw.value is None or raw.VR not in ("UI", None) \
                or _dictionary_vr(tag) != "UI":
            return False
        try:
            values = raw.value.decode("ascii").rstrip("\x00 ").split("\\")
        except UnicodeDecodeError:
            return False
        encoded = "\\".join(self.uid(v) for v in values).encode("ascii")
        if len(encoded) % 2:
            encoded += b"\x00"
        elements[tag] = raw._replace(value=encoded, length=len(encoded))
        return True

    def raw_dummy(self, elements: dict[Any, Any], tag: int) -> bool:
        """A still-raw text element given its dummy without decoding it (True when done)."""
        raw = elements[tag]
        if type(raw) is not RawDataElement or raw.length == 0xFFFFFFFF:
            return False
        vr = _dictionary_vr(tag)
        dummy = _RAW_DUMMY.get(vr)
        if dummy is None or raw.VR not in (vr, None) or (vr in ("DA", "DT") and self.shifting):
            return False
        elements[tag] = raw._replace(value=dummy, length=len(dummy))
        return True

    def raw_shift(self, elements: dict[Any, Any], tag: int) -> bool:
        """A still-raw DA or DT element moved by the patient's offset (True when done)."""
        raw = elements[tag]
        vr = _dictionary_vr(tag)
        if type(raw) is not RawDataElement or raw.value is None or raw.VR not in (vr, None) or vr not in ("DA", "DT"):
            return False
        try:
            text = raw.value.decode("ascii").rstrip("\x00 ")
        except UnicodeDecodeError:
            return False
        moved = [_shift_one(v, vr, self.days) for v in text.split("\\")] if text else []
        encoded = b"" if None in moved else "\\".join(m or "" for m in moved).encode("ascii")
        if len(encoded) % 2:
            encoded += b" "
        elements[tag] = raw._replace(value=encoded, length=len(encoded))
        return True

    def clean_text(self, value: Any) -> Any:
        """``value`` without the instance's own identifiers."""
        if self.identifiers is None or value is None:
            return value
        if isinstance(value, (MultiValue, list)):
            return [self.clean_text(v) for v in value]
        return self.identifiers.sub("", str(value)).strip()

    def dataset(self, ds: Dataset, clean: int) -> None:
        plan = self.plan
        elements: Any = ds._dict
        creators: dict[int, str] | None = None
        for tag in list(elements):
            group = tag >> 16
            if group & 1:
                if creators is None:
                    creators = self._creators(ds)
                if not self._private_kept(tag, creators):
                    del elements[tag]
                elif self._is_sq(ds, tag):
                    self.sequence(ds, tag, clean)
                continue
            if not tag & 0xFFFF or group in (0x0000, 0x0002):
                del elements[tag]  # group lengths (wrong once anything changes), command and file meta groups
                continue
            if 0x5000 <= group <= 0x60FF:
                if (group & 0xFF00) in (0x5000, 0x6000):
                    self.repeating(ds, tag, group)
                    continue
            act = plan.get(int(tag))  # a plain int: BaseTag's __eq__ is Python, and dict lookups call it
            if act is None:
                if int(tag) not in DicomDictionary and mask_match(int(tag)) is None:
                    # a standard-group element no dictionary knows (a newer edition's, or a vendor's misuse):
                    # nothing says what it holds, so it does not leave (a sequence in it could hold a name)
                    del elements[tag]
                    continue
                if self._is_sq(ds, tag):
                    self.sequence(ds, tag, clean)
                elif clean:
                    vr = self._vr(ds, tag)
                    if clean == CLEANED and vr in _TEXT_VRS and int(tag) != 0x00080005:
                        self.clean(ds, tag)
                    elif clean == DUMMIED and vr in _FREE_TEXT_VRS:
                        ds[tag].value = _DUMMY[vr]
                continue
            if act == REMOVE:
                del elements[tag]
            elif act == KEEP:
                if self._is_sq(ds, tag):
                    self.sequence(ds, tag, clean)
            elif act == EMPTY:
                raw = elements[tag]
                if type(raw) is RawDataElement and raw.length != 0xFFFFFFFF and raw.VR != "SQ" \
                        and not (raw.VR is None and int(tag) in _SQ_TAGS):
                    elements[tag] = raw._replace(value=b"", length=0)
                    continue
                elem = ds[tag]
                elem.value = Sequence() if elem.VR == "SQ" else None
            elif act == DUMMY:
                if not self.raw_dummy(elements, tag):
                    self.dummy(ds, tag)
            elif act == UID:
                if not self.raw_uid(elements, tag):
                    self.replace_uid(ds, tag, clean)
            elif act == SHIFT:
                if self.raw_shift(elements, tag):
                    continue
                elem = ds[tag]
                if elem.VR in ("DA", "DT"):
                    elem.value = _shift(elem.value, elem.VR, self.days) if not elem.is_empty else None
            elif act == CLEAN:
                self.clean(ds, tag)
            elif act == RECURSE:
                if self._is_sq(ds, tag):
                    self.sequence(ds, tag, clean)
            elif act == DUMMY_SEQ:
                if self._is_sq(ds, tag):
                    self.sequence(ds, tag, DUMMIED)
                else:
                    self.dummy(ds, tag)
            elif act == CLEAN_SEQ:
                if self._is_sq(ds, tag):
                    self.sequence(ds, tag, CLEANED)
                else:
                    self.clean(ds, tag)

    @staticmethod
    def _vr(ds: Dataset, tag: int) -> str:
        raw: Any = ds._dict[tag]  # type: ignore[index]
        vr = raw.VR
        if vr is None or len(vr) != 2:
            vr = ds[tag].VR
        return str(vr)

    def _is_sq(self, ds: Dataset, tag: int) -> bool:
        vr = ds._dict[tag].VR  # type: ignore[index]
        if vr == "SQ":
            return True
        if (vr is None or vr == "UN") and (int(tag) in _SQ_TAGS or (vr is None and tag >> 16 & 1)):
            # implicit VR, or a sequence some peer wrote as UN: pydicom decodes it as the sequence it is,
            # so that nothing nested escapes the walk
            return bool(ds[tag].VR == "SQ")
        return False

    def sequence(self, ds: Dataset, tag: int, clean: int) -> None:
        value = ds[tag].value
        for item in value or ():
            self.dataset(item, clean)

    def clean(self, ds: Dataset, tag: int) -> None:
        elem = ds[tag]
        if elem.VR == "SQ":
            self.sequence(ds, tag, CLEANED)
        elif elem.VR in _TEXT_VRS and not elem.is_empty:
            elem.value = self.clean_text(elem.value)

    def dummy(self, ds: Dataset, tag: int) -> None:
        elem = ds[tag]
        vr = elem.VR
        if vr == "SQ":
            self.sequence(ds, tag, CLEANED)
        elif vr == "UI":
            self.replace_uid(ds, tag, False)
        elif vr in ("DA", "DT") and self.profile.config.options.dates == "shift" and not elem.is_empty:
            elem.value = _shift(elem.value, vr, self.days)
        else:
            elem.value = _DUMMY.get(vr.split(" ")[0], None) if vr != "AT" else None

    def replace_uid(self, ds: Dataset, tag: int, clean: int) -> None:
        elem = ds[tag]
        if elem.VR == "SQ":
            self.sequence(ds, tag, clean)
            return
        if elem.VR != "UI" or elem.is_empty:
            elem.value = None if elem.VR != "SQ" else Sequence()
            return
        value = elem.value
        if isinstance(value, MultiValue):
            elem.value = [self.uid(str(v)) for v in value]
        else:
            elem.value = self.uid(str(value))

    def repeating(self, ds: Dataset, tag: int, group: int) -> None:
        """Curves (50xx) and overlays (60xx): the whole group removed unless Clean Graphics, which
        keeps it with its text cleaned (Overlay Description, Label, Comments)."""
        if not self.profile._clean_graphics:
            del ds._dict[tag]  # type: ignore[arg-type]
        elif (group & 0xFF00) == 0x6000 and (tag & 0xFFFF) in (0x0022, 0x1500, 0x4000):
            self.clean(ds, tag)

    @staticmethod
    def _creators(ds: Dataset) -> dict[int, str]:
        found: dict[int, str] = {}
        for tag in ds._dict:
            if tag >> 16 & 1 and 0x10 <= (tag & 0xFFFF) <= 0xFF:
                try:
                    value = ds[tag].value
                except Exception:  # noqa: BLE001 - an unreadable creator keeps nothing
                    continue
                found[tag] = str(value or "").strip()
        return found

    def _private_kept(self, tag: int, creators: dict[int, str]) -> bool:
        safe = self.profile._safe
        if not safe:
            return False
        group, element = tag >> 16, tag & 0xFFFF
        if element < 0x10:
            return False
        if element <= 0xFF:
            creator = creators.get(tag, "")
            return any(g == group and c == creator for g, c in safe)
        block = creators.get(group << 16 | element >> 8)
        if block is None:
            return False
        return (element & 0xFF) in safe.get((group, block), ())


#: A DA or DT value (single, multiple, ranges) moved by ``days``; None when any part is unreadable (the
#: results that come home move their dates back with it: :mod:`pacsbridge.shared.deid.reidentify`).
shift_dates = _shift
