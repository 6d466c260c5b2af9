"""A fast, non-decoding reader of the header attributes the index needs.

pydicom builds a whole :class:`~pydicom.dataset.Dataset`; indexing needs
some fifty top-level text attributes. This reader walks the encoded element
headers of a buffer (an ``mmap`` of a file, or the bytes a DICOM peer sent)
once, keeps the raw values of the wanted tags, and on the way checks that no
element runs past the end of the buffer and that every undefined-length
sequence is closed: a truncated file is detected without reading its pixels.

It handles what senders actually use: implicit and explicit VR little
endian, and every encapsulated (compressed) syntax, with the ASCII, Latin-1
and UTF-8 character sets. Anything else (no file meta, big endian, deflate,
another character set or ISO 2022 code extensions such as ``\\ISO 2022 IR 87``,
an undefined-length UN) raises :class:`NeedsPydicom`
and the caller falls back to pydicom, which handles all of it more slowly.
"""

from __future__ import annotations

import struct
from typing import Any, Iterable

from pydicom.datadict import dictionary_VR

from pacsbridge.shared.core.errors import TruncatedFile

__all__ = ["NeedsPydicom", "FastHeader", "scan", "check_complete", "TEXT_VRS"]

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
_BIG_ENDIAN = "1.2.840.10008.1.2.2"
_DEFLATED = "1.2.840.10008.1.2.1.99"
_NOT_HANDLED = {_BIG_ENDIAN, _DEFLATED}
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_SHORT_VRS = {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT",
              b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US"}
TEXT_VRS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UR", "UT"}
_SINGLE_VALUED = {"LT", "ST", "UT", "UR"}
_BINARY = {"US": "H", "SS": "h", "UL": "I", "SL": "i", "FL": "f", "FD": "d", "UV": "Q", "SV": "q"}
_ENCODINGS = {"": "latin-1", "ISO_IR 6": "latin-1", "ISO 2022 IR 6": "latin-1", "ISO_IR 100": "latin-1",
              "ISO_IR 192": "utf-8"}
_UNDEFINED = 0xFFFFFFFF
_CHARSET = 0x00080005
_PIXEL_DATA = 0x7FE00010
_u16 = struct.Struct("<H").unpack_from
_u32 = struct.Struct("<I").unpack_from
_tag = struct.Struct("<HH").unpack_from


class NeedsPydicom(Exception):
    """This buffer uses something the fast reader leaves to pydicom."""


def _dict_vr(tag: int) -> str:
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        return "UN"
    return vr.split(" or ")[0]


class FastHeader:
    """The values of the wanted tags, decoded to Conquest text.

    Attributes
    ----------
    transfer_syntax : str
    values : dict[int, str]
        Tag -> text (multi-values joined with ``\\``); absent or empty tags are missing.
    """

    __slots__ = ("transfer_syntax", "values", "charset")

    def __init__(self, transfer_syntax: str, values: dict[int, str], charset: str) -> None:
        self.transfer_syntax = transfer_syntax
        self.values = values
        self.charset = charset


def _decode(vr: str, raw: bytes, encoding: str, little: bool = True) -> str | None:
    if vr in TEXT_VRS:
        text = bytes(raw).decode(encoding if vr not in ("UI", "DA", "TM", "DT", "IS", "DS", "CS", "AE", "AS")
                                 else "latin-1", "replace")
        text = text.rstrip("\x00 ").lstrip(" ") if vr != "UI" else text.rstrip("\x00 ").strip()
        if vr not in _SINGLE_VALUED and "\\" in text:
            text = "\\".join(p.strip(" \x00") for p in text.split("\\"))
        if vr == "PN" and "=" in text:  # empty trailing component groups carry nothing (as pydicom)
            text = "\\".join(p.rstrip("=") for p in text.split("\\"))
        return text or None
    fmt = _BINARY.get(vr)
    if fmt is None:
        return None
    size = struct.calcsize(fmt)
    count = len(raw) // size
    if not count:
        return None
    values = struct.unpack(("<" if little else ">") + fmt * count, bytes(raw[: count * size]))
    return "\\".join(str(v) for v in values)


def _encoding(charset: str) -> str | None:
    """The Python codec for a Specific Character Set the fast reader handles, else ``None``.

    A second value means ISO 2022 code extensions (``\\ISO 2022 IR 87``: the first value,
    empty, is the default repertoire; escape sequences switch to JIS X 0208 within a value):
    those are pydicom's to decode, unless every extension is plain ASCII.
    """
    first, *extensions = (v.strip() for v in charset.split("\\"))
    if any(v not in ("", "ISO 2022 IR 6") for v in extensions):
        return None
    return _ENCODINGS.get(first)


def _meta(buf: Any, path: str) -> tuple[int, str]:
    """Where the data set starts after preamble and file meta, and the transfer syntax.

    Raises :class:`NeedsPydicom` without a ``DICM`` marker or a transfer syntax.
    """
    n = len(buf)
    if n < 132 or buf[128:132] != b"DICM":
        raise NeedsPydicom("no DICM marker")
    pos = 132
    ts = ""
    while pos + 8 <= n:
        group, elem = _tag(buf, pos)
        if group != 0x0002:
            break
        vr = buf[pos + 4:pos + 6]
        if vr in _LONG_VRS:
            if pos + 12 > n:
                raise TruncatedFile(path, "file ends inside the file meta information")
            length, hdr = _u32(buf, pos + 8)[0], 12
        else:
            length, hdr = _u16(buf, pos + 6)[0], 8
        if elem == 0x0010:
            ts = bytes(buf[pos + hdr:pos + hdr + length]).decode("ascii", "replace").strip("\x00 ")
        pos += hdr + length
    if pos > n:
        raise TruncatedFile(path, "file ends inside the file meta information")
    if not ts:
        raise NeedsPydicom("no transfer syntax in the file meta")
    return pos, ts


def _walk(buf: Any, pos: int, implicit: bool, big: bool, wanted: set[int],
          path: str) -> tuple[dict[int, tuple[str, Any]], str]:
    """Walk the data set from ``pos`` to the end: raw values of the wanted top-level tags, and
    the character set. Checks every length against the end of the buffer and that every
    undefined-length sequence is closed.

    Raises :class:`TruncatedFile`, or :class:`NeedsPydicom` for what it cannot follow.
    """
    n = len(buf)
    order = ">" if big else "<"
    tag_of = struct.Struct(order + "HH").unpack_from
    u16 = struct.Struct(order + "H").unpack_from
    u32 = struct.Struct(order + "I").unpack_from
    raw: dict[int, tuple[str, Any]] = {}
    depth = 0
    charset = ""
    while pos < n:
        if pos + 8 > n:
            raise TruncatedFile(path, f"file ends inside an element header at byte {pos} of {n}")
        group, elem = tag_of(buf, pos)
        if group == 0xFFFE:
            length = u32(buf, pos + 4)[0]
            if elem == 0xE000:
                if length == _UNDEFINED:
                    depth += 1
                    pos += 8
                else:
                    pos += 8 + length
            elif elem in (0xE00D, 0xE0DD):
                depth -= 1
                pos += 8
            else:
                raise NeedsPydicom(f"unexpected (FFFE,{elem:04X})")
            if depth < 0:
                raise NeedsPydicom("unbalanced delimiters")
            continue
        tag = (group << 16) | elem
        if implicit:
            vr_name = ""
            length, hdr = u32(buf, pos + 4)[0], 8
        else:
            vr = bytes(buf[pos + 4:pos + 6])
            if vr in _LONG_VRS:
                if pos + 12 > n:
                    raise TruncatedFile(path, f"file ends inside an element header at byte {pos} of {n}")
                length, hdr = u32(buf, pos + 8)[0], 12
            elif vr in _SHORT_VRS:
                length, hdr = u16(buf, pos + 6)[0], 8
            else:
                raise NeedsPydicom(f"unknown VR {vr!r} at byte {pos}")
            vr_name = vr.decode("ascii")
        if length == _UNDEFINED:
            if vr_name == "UN":
                raise NeedsPydicom("undefined-length UN")
            depth += 1
            pos += hdr
            continue
        end = pos + hdr + length
        if end > n:
            raise TruncatedFile(path, f"element ({group:04X},{elem:04X}) runs to byte {end} but the file has {n}")
        if depth == 0:
            if tag == _CHARSET:
                charset = bytes(buf[pos + hdr:end]).decode("latin-1").strip("\x00 ")
            elif tag in wanted:
                raw[tag] = (vr_name, buf[pos + hdr:end])
        pos = end
    if depth != 0:
        raise TruncatedFile(path, "file ends inside a sequence or encapsulated pixel data")
    return raw, charset


def check_complete(buf: Any, transfer_syntax: str, path: str = "") -> None:
    """Raise :class:`TruncatedFile` if the data set ends before its elements do.

    For what pydicom reads instead of :func:`scan` (big endian, other character sets ...).
    What the walk cannot follow (no file meta, deflated data, an undefined-length UN) is
    accepted: the check is conservative.
    """
    try:
        pos, _ = _meta(buf, path)
        if transfer_syntax == _DEFLATED:
            return
        _walk(buf, pos, transfer_syntax == IMPLICIT_LE, transfer_syntax == _BIG_ENDIAN, set(), path)
    except NeedsPydicom:
        return


def scan(buf: Any, wanted: Iterable[int], path: str = "") -> FastHeader:
    """Read the wanted top-level tags of an encoded Part 10 instance.

    Parameters
    ----------
    buf : bytes, memoryview or mmap
        The whole encoded instance (preamble, ``DICM``, meta, data set).
    wanted : iterable of int
        Tags to return.

    Raises
    ------
    NeedsPydicom
        Use pydicom for this one.
    TruncatedFile
        An element or sequence runs past the end.
    """
    pos, ts = _meta(buf, path)
    if ts in _NOT_HANDLED:
        raise NeedsPydicom(f"transfer syntax {ts}")
    raw, charset = _walk(buf, pos, ts == IMPLICIT_LE, False, set(wanted), path)
    encoding = _encoding(charset)
    if encoding is None:
        raise NeedsPydicom(f"character set {charset!r}")
    values: dict[int, str] = {}
    for tag, (vr_name, data) in raw.items():
        if not vr_name or vr_name == "UN":
            vr_name = _dict_vr(tag)
        try:
            text = _decode(vr_name, data, encoding)
        except (UnicodeDecodeError, struct.error):
            raise NeedsPydicom(f"cannot decode ({tag >> 16:04X},{tag & 0xFFFF:04X})") from None
        if text:
            values[tag] = text
    return FastHeader(ts, values, charset)
