"""A cohort's rows: CSV, Excel .xlsx and JSON read into validated rows, reports and "failed rows" written back.

A researcher's list of studies arrives as whatever their spreadsheet saves. :func:`read_sheet` finds the
format from the bytes (an .xlsx is a zip, JSON starts with ``[`` or ``{``), then from the file name and
content type, and turns every row into a :class:`RowSpec` of canonical fields (:data:`FIELDS`), matching
headers case-, space-, underscore- and hyphen-insensitively through :data:`HEADER_ALIASES`. Nothing runs
until the whole file is valid, so every problem is collected (up to :data:`MAX_PROBLEMS`), each with the
row and the column *as the user sees them* (header = row 1; JSON: the object's 1-based index), and
raised at once as :class:`SheetError`.

Each row keeps its cells exactly as read (``SheetRow.cells``, header as written -> text) and the sheet
keeps its form (format, headers, CSV delimiter and BOM, JSON wrapper, sheet name): that is what
:func:`write_input_form` needs to hand back the rows that did not succeed **as a file of the same form as
the input**, which the user fixes and submits again as is (ADIT's open request #20). Reports
(:func:`write_table`) go out as CSV, xlsx or JSON; their text cells can never run as formulas in a
spreadsheet (CSV: a ``'`` before ``= + - @`` TAB CR; xlsx: text cells are typed as text).

Why openpyxl for .xlsx: it is the reference reader and writer of Office Open XML in Python (what pandas
itself calls for .xlsx), kept up for over a decade, pure Python (no compiler, no LibreOffice in the
image), and it streams both ways: ``read_only=True`` parses a worksheet row by row instead of building it
in memory, ``write_only=True`` writes rows as they come. With ``defusedxml`` installed it parses the
workbook's XML without entity expansion, so an uploaded workbook cannot blow up the parser. The old
binary .xls is refused with a clear message (saving as .xlsx or CSV is one click), not read by another
library.

Excel cells: ``data_only=True`` gives a formula's cached value, what the user saw; a formula saved
without one (files written by a program, not by Excel or LibreOffice) reads as empty there, so a second
pass with ``data_only=False`` runs only when a stored cell came back empty, and a formula found there is
reported by row and column. Dates become ``YYYYMMDD``, integral numbers their integer text (a PatientID
typed as 12345 reads as ``12345``, not ``12345.0``), error cells (``#N/A``) are problems.

Text files must be UTF-8 (a BOM is fine and kept for the write-back, Excel wants it): a file with NUL
bytes, or not UTF-8, is "not a text file", said plainly rather than decoded by a guessed code page. The
delimiter (``,`` ``;`` or TAB) is sniffed on the header line.
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import datetime as dt
import io
import json
import re
import zipfile
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Literal, Mapping, NoReturn, Protocol, Sequence

from pacsbridge.shared.core.errors import InvalidRequest
from pacsbridge.shared.deid.projects import PSEUDONYM_PATTERN
from pacsbridge.shared.dicom.query import UID_PATTERN, parse_date_range

__all__ = ["FIELDS", "HEADER_ALIASES", "FORMATS", "MAX_PROBLEMS", "MAX_ROWS", "Problem", "SheetError", "RowSpec",
           "SheetRow", "Sheet", "SheetForm", "read_sheet", "read_rows", "write_input_form", "write_table",
           "normalise_header", "validate_row"]

#: The canonical fields of a row, in the order a report lists them.
FIELDS: tuple[str, ...] = ("PatientID", "AccessionNumber", "StudyInstanceUID", "SeriesInstanceUID", "StudyDate",
                           "Modality", "StudyDescription", "Pseudonym")

#: Accepted headers, normalised by :func:`normalise_header` (lower case; spaces, ``_`` and ``-`` removed),
#: and the field each names. ``Patient ID``, ``patient_id`` and ``PATIENT-ID`` are all ``patientid``.
HEADER_ALIASES: dict[str, str] = {
    "patientid": "PatientID", "patient": "PatientID", "mrn": "PatientID",
    "accessionnumber": "AccessionNumber", "accession": "AccessionNumber", "acc": "AccessionNumber",
    "studyinstanceuid": "StudyInstanceUID", "studyuid": "StudyInstanceUID", "study": "StudyInstanceUID",
    "seriesinstanceuid": "SeriesInstanceUID", "seriesuid": "SeriesInstanceUID", "series": "SeriesInstanceUID",
    "seriesinstanceuids": "SeriesInstanceUID",
    "studydate": "StudyDate", "date": "StudyDate",
    "modality": "Modality", "modalities": "Modality", "modalitiesinstudy": "Modality",
    "studydescription": "StudyDescription", "description": "StudyDescription",
    "pseudonym": "Pseudonym", "pseudoid": "Pseudonym", "pseudonymisedid": "Pseudonym", "subject": "Pseudonym",
    "subjectid": "Pseudonym",
}

#: The formats a sheet may have (and a report may be written in).
FORMATS = ("csv", "xlsx", "json")
Format = Literal["csv", "xlsx", "json"]
#: Problems listed at most; one more line says how many were left out.
MAX_PROBLEMS = 100
#: Rows a sheet may have unless the caller says otherwise.
MAX_ROWS = 50_000
#: An .xlsx larger than this once uncompressed is refused before it is parsed (a zip bomb stays a zip).
MAX_XLSX_UNCOMPRESSED = 512 * 1024 * 1024

_XLSX_MAGIC = b"PK\x03\x04"
_OLE_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"  # the old binary .xls (and .doc ...)
_XLSX_TYPES = ("application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",)
_UID = re.compile(UID_PATTERN.replace("$", r"\Z"))
_PSEUDONYM = re.compile(PSEUDONYM_PATTERN.replace("$", r"\Z"))
_MODALITY = re.compile(r"[A-Z0-9_]{1,16}\Z")
_SPLIT = re.compile(r"[\\;,\s]+")
# Printable: no control character (C0, DEL, C1) and no backslash, DICOM's value separator.
_BAD_CHAR = re.compile(r"[\\\x00-\x1f\x7f-\x9f]")
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def normalise_header(header: str) -> str:
    """A header as :data:`HEADER_ALIASES` spells it: lower case, without spaces, ``_`` and ``-``."""
    return re.sub(r"[\s_\-]+", "", header).lower()


@dataclass(frozen=True)
class Problem:
    """What is wrong, where the user will look for it.

    ``row`` is the row as the user sees it: the header is row 1 in CSV and xlsx, a JSON object is its
    1-based index in the list; 0 is the whole file. ``column`` is the header as written ("" = the whole
    row or file).
    """

    row: int
    column: str
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {"row": self.row, "column": self.column, "message": self.message}

    def __str__(self) -> str:
        where = f"row {self.row}" if self.row else "file"
        return f"{where}{', ' + self.column if self.column else ''}: {self.message}"


class SheetError(InvalidRequest):
    """The sheet cannot be used as it is; :attr:`problems` lists every problem found (up to ~100).

    The message sums up the first few; :meth:`to_dict` is the API's 400 body.
    """

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = list(problems)
        shown = "; ".join(str(p) for p in self.problems[:3])
        more = len(self.problems) - 3
        count = f"{len(self.problems)} problems" if len(self.problems) != 1 else "1 problem"
        super().__init__(f"the sheet has {count}: {shown}" + (f"; and {more} more" if more > 0 else ""))

    def to_dict(self) -> dict[str, Any]:
        return {"error": str(self), "problems": [p.to_dict() for p in self.problems]}


@dataclass(frozen=True)
class RowSpec:
    """What a row asks for, validated: what the query stage searches with.

    ``min_date``/``max_date`` are ``YYYYMMDD`` (both the same for one date, one None for an open range).
    """

    PatientID: str | None = None
    AccessionNumber: str | None = None
    StudyInstanceUID: str | None = None
    SeriesInstanceUID: tuple[str, ...] = ()
    min_date: str | None = None
    max_date: str | None = None
    Modality: tuple[str, ...] = ()
    StudyDescription: str | None = None
    Pseudonym: str | None = None

    def key(self) -> tuple[Any, ...]:
        """Equal for two rows that ask for the same thing (duplicates)."""
        return dataclasses.astuple(self)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able (tuples as lists), for the store; :meth:`from_dict` reads it back."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
                for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RowSpec:
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name in data:
                value = data[f.name]
                kwargs[f.name] = tuple(value) if f.name in ("SeriesInstanceUID", "Modality") else value
        return cls(**kwargs)


@dataclass
class SheetRow:
    """One row: its number as the user sees it, its cells as read, what it asks for."""

    number: int
    cells: dict[str, str]
    spec: RowSpec
    duplicate_of: int | None = None


@dataclass
class Sheet:
    """A valid sheet: its form (to write it back the same way) and its rows.

    ``dialect`` holds what writing the same form again needs: CSV ``{"delimiter": ",", "bom": False}``,
    JSON ``{"wrapper": "list" | "rows", "lists": [headers given as JSON lists]}``, xlsx ``{"sheet": name}``.
    ``fields`` maps each header to its canonical field.
    """

    format: Format
    headers: list[str]
    rows: list[SheetRow]
    dialect: dict[str, Any] = field(default_factory=dict)
    fields: dict[str, str] = field(default_factory=dict)


class SheetForm(Protocol):
    """What :func:`write_input_form` needs of a sheet (a :class:`Sheet`, or the store's record of one)."""

    @property
    def format(self) -> str: ...

    @property
    def headers(self) -> list[str]: ...

    @property
    def dialect(self) -> Mapping[str, Any]: ...


class _Problems:
    """Problems collected up to :data:`MAX_PROBLEMS`, counting those left out."""

    def __init__(self) -> None:
        self.items: list[Problem] = []
        self.left_out = 0

    def add(self, row: int, column: str, message: str) -> None:
        if len(self.items) < MAX_PROBLEMS:
            self.items.append(Problem(row, column, message))
        else:
            self.left_out += 1

    def __bool__(self) -> bool:
        return bool(self.items)

    def fail(self, message: str) -> NoReturn:
        """A problem with the whole file, after which nothing more can be read."""
        self.add(0, "", message)
        self.raise_if_any()
        raise AssertionError("unreachable")  # pragma: no cover

    def raise_if_any(self) -> None:
        if self.items:
            items = list(self.items)
            if self.left_out:
                items.append(Problem(0, "", f"and {self.left_out} more problems, not listed"))
            raise SheetError(items)


# --- one row -------------------------------------------------------------------------------------------

def _text_value(text: str, max_len: int = 64, wildcards: bool = False) -> str | None:
    """Why ``text`` is not a matching value, or None."""
    if len(text) > max_len:
        return f"at most {max_len} characters (this has {len(text)})"
    bad = _BAD_CHAR.search(text)
    if bad:
        return "a backslash is not allowed" if bad.group() == "\\" else "a control character is not allowed"
    if not wildcards and ("*" in text or "?" in text):
        return "an exact value: * and ? are not allowed here"
    return None


def validate_row(values: Mapping[str, str], number: int = 1) -> RowSpec:
    """The :class:`RowSpec` of one row given by canonical field (:data:`FIELDS`) -> text.

    Raises
    ------
    SheetError
        The row's problems (their column is the field's name).
    """
    problems = _Problems()
    unknown = [k for k in values if k not in FIELDS]
    for k in unknown:
        problems.add(number, k, f"unknown field; one of {', '.join(FIELDS)}")
    spec = _validate({k: (k, v) for k, v in values.items() if k in FIELDS}, number, problems)
    problems.raise_if_any()
    assert spec is not None
    return spec


def _validate(values: Mapping[str, tuple[str, str]], number: int, problems: _Problems) -> RowSpec | None:
    """The :class:`RowSpec` of one row, or None with its problems added.

    Parameters
    ----------
    values : Mapping[str, tuple[str, str]]
        Canonical field -> (header as written, cell text); empty cells may be left out.
    number : int
        The row's number, for the problems.
    problems : _Problems
        Where problems go.
    """
    ok = True
    out: dict[str, Any] = {}

    def bad(fname: str, message: str) -> None:
        nonlocal ok
        ok = False
        problems.add(number, values[fname][0], message)

    for fname, (_header, raw) in values.items():
        text = raw.strip()
        if not text:
            continue
        if fname in ("PatientID", "AccessionNumber", "StudyDescription"):
            why = _text_value(text, wildcards=fname == "StudyDescription")
            if why:
                bad(fname, f"{text[:80]!r}: {why}")
            else:
                out[fname] = text
        elif fname == "StudyInstanceUID":
            if len(text) > 64 or not _UID.match(text):
                bad(fname, f"{text[:80]!r} is not a DICOM UID (digits and dots, at most 64)")
            else:
                out[fname] = text
        elif fname == "SeriesInstanceUID":
            uids = tuple(dict.fromkeys(u for u in _SPLIT.split(text) if u))
            wrong = [u for u in uids if len(u) > 64 or not _UID.match(u)]
            if wrong:
                bad(fname, f"{wrong[0][:80]!r} is not a DICOM UID (digits and dots, at most 64); "
                           "several UIDs are separated by \\ ; , or spaces")
            else:
                out[fname] = uids
        elif fname == "StudyDate":
            try:
                lo, hi = parse_date_range(text, values[fname][0])
            except InvalidRequest as exc:
                bad(fname, str(exc).partition(": ")[2] or str(exc))
            else:
                out["min_date"] = lo.strftime("%Y%m%d") if lo else None
                out["max_date"] = hi.strftime("%Y%m%d") if hi else None
        elif fname == "Modality":
            codes = tuple(dict.fromkeys(c.upper() for c in _SPLIT.split(text) if c))
            wrong = [c for c in codes if not _MODALITY.match(c)]
            if wrong:
                bad(fname, f"{wrong[0][:80]!r} is not a modality code (CT, MR ...: letters, digits, _; "
                           "several are separated by \\ ; , or spaces)")
            else:
                out[fname] = codes
        elif fname == "Pseudonym":
            if not _PSEUDONYM.match(text):
                bad(fname, f"{text[:80]!r}: a pseudonym is 1 to 64 letters, digits, _ . or -")
            else:
                out[fname] = text
    if not ok:
        return None
    if not any(out.get(f) for f in ("PatientID", "AccessionNumber", "StudyInstanceUID")):
        problems.add(number, "", "the row names no study: give a PatientID, an AccessionNumber or a StudyInstanceUID")
        return None
    if out.get("SeriesInstanceUID") and not out.get("StudyInstanceUID"):
        problems.add(number, values["SeriesInstanceUID"][0], "series are named within a study: give the row's "
                                                             "StudyInstanceUID too")
        return None
    return RowSpec(**out)


class _Builder:
    """Headers, then rows, into a :class:`Sheet` (common to the three formats)."""

    def __init__(self, fmt: Format, problems: _Problems, max_rows: int) -> None:
        self.format: Format = fmt
        self.problems = problems
        self.max_rows = max_rows
        self.headers: list[str] = []
        self.fields: dict[str, str] = {}
        self.rows: list[SheetRow] = []
        self.seen: dict[tuple[Any, ...], int] = {}
        self.too_many = False
        self.count = 0  # non-empty rows, valid or not

    def set_headers(self, headers: Sequence[str], row: int) -> None:
        """Check the headers (``row`` is the header's row; 0 for JSON, where each key is checked once)."""
        by_field: dict[str, str] = {}
        for header in headers:
            if not header.strip():
                continue
            self.headers.append(header)
            fname = HEADER_ALIASES.get(normalise_header(header))
            if fname is None:
                self.problems.add(row, header, f"unknown header; the accepted headers are {', '.join(FIELDS)} "
                                               "(case, spaces, _ and - do not matter; aliases in the docs)")
            elif fname in by_field:
                self.problems.add(row, header, f"names the same field ({fname}) as {by_field[fname]!r}")
            else:
                by_field[fname] = header
                self.fields[header] = fname

    def add_row(self, number: int, cells: dict[str, str]) -> bool:
        """Validate and keep one row; False once there are more than ``max_rows`` (stop reading)."""
        if not any(v.strip() for v in cells.values()):
            return True
        self.count += 1
        if self.count > self.max_rows:
            self.problems.add(0, "", f"more than {self.max_rows} rows: split the cohort into several")
            self.too_many = True
            return False
        values = {self.fields[h]: (h, v) for h, v in cells.items() if h in self.fields}
        spec = _validate(values, number, self.problems)
        if spec is not None:
            first = self.seen.setdefault(spec.key(), number)
            self.rows.append(SheetRow(number, cells, spec, first if first != number else None))
        return True

    def sheet(self, dialect: dict[str, Any]) -> Sheet:
        if not self.rows and not self.problems:
            self.problems.add(0, "", "the sheet has headers but no rows" if self.headers else "the file is empty")
        self.problems.raise_if_any()
        return Sheet(self.format, self.headers, self.rows, dialect, self.fields)


# --- reading ---------------------------------------------------------------------------------------------

def read_sheet(data: bytes, filename: str = "", content_type: str = "", max_rows: int = MAX_ROWS) -> Sheet:
    """Read an uploaded cohort file (CSV, .xlsx or JSON) into a valid :class:`Sheet`.

    The format is found from the content first (an .xlsx is a zip, ``b"PK\\x03\\x04"``; JSON starts with
    ``[`` or ``{``), then from ``filename`` and ``content_type``; anything else is read as CSV text.

    Parameters
    ----------
    data : bytes
        The file as uploaded.
    filename, content_type : str
        As the upload said (may be empty).
    max_rows : int
        More non-empty rows than this is a problem.

    Raises
    ------
    SheetError
        Every problem found (empty file, not a text file, unknown header, bad cells ...).
    """
    problems = _Problems()
    name = filename.lower()
    ctype = content_type.lower().partition(";")[0].strip()
    if not data.strip():
        problems.fail("the file is empty")
    if data.startswith(_XLSX_MAGIC):
        return _read_xlsx(data, problems, max_rows)
    if data.startswith(_OLE_MAGIC) or name.endswith(".xls"):
        problems.fail("an old Excel .xls workbook: save it as .xlsx (or CSV UTF-8) and send that")
    if name.endswith((".xlsx", ".xlsm")) or ctype in _XLSX_TYPES:
        problems.fail("not an Excel .xlsx workbook (an .xlsx is a zip file; this one is not)")
    text, bom = _decode(data, problems)
    stripped = text.lstrip()
    if stripped.startswith(("[", "{")) or name.endswith(".json") or ctype == "application/json":
        try:
            doc = json.loads(text)
        except ValueError as exc:
            problems.fail(f"not valid JSON: {exc}")
        return _read_json(doc, problems, max_rows)
    return _read_csv(text, bom, problems, max_rows)


def read_rows(rows: Sequence[Mapping[str, Any]] | Any, max_rows: int = MAX_ROWS) -> Sheet:
    """Rows given inline as JSON (an API body's ``"rows"``) as a :class:`Sheet` of format ``json``.

    Raises
    ------
    SheetError
        As :func:`read_sheet`.
    """
    return _read_json(rows, _Problems(), max_rows, wrapper="list")


def _decode(data: bytes, problems: _Problems) -> tuple[str, bool]:
    """UTF-8 text (and whether it had a BOM), or a problem: no code page is guessed."""
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        problems.fail("not a text file this reader takes: UTF-16 text; save it as UTF-8 (CSV UTF-8)")
    bom = data.startswith(codecs.BOM_UTF8)
    body = data[len(codecs.BOM_UTF8):] if bom else data
    if b"\x00" in body:
        problems.fail("not a text file (it holds NUL bytes): send CSV, .xlsx or JSON")
    try:
        return body.decode("utf-8"), bom
    except UnicodeDecodeError as exc:
        line = body[:exc.start].count(b"\n") + 1
        problems.fail(f"not a text file in UTF-8 (byte 0x{body[exc.start]:02x} on line {line}): "
                      "save it as UTF-8 (Excel: CSV UTF-8)")


def _sniff_delimiter(line: str) -> str:
    try:
        return csv.Sniffer().sniff(line, delimiters=",;\t").delimiter
    except csv.Error:
        counts = {d: line.count(d) for d in ",;\t"}
        best = max(counts, key=lambda d: counts[d])
        return best if counts[best] else ","


def _read_csv(text: str, bom: bool, problems: _Problems, max_rows: int) -> Sheet:
    lines = text.splitlines()
    first = next((ln for ln in lines if ln.strip()), "")
    delimiter = _sniff_delimiter(first)
    builder = _Builder("csv", problems, max_rows)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=False)
    header_row = 0
    headers: list[str] = []
    try:
        for number, record in enumerate(reader, start=1):
            if not header_row:
                if not any(c.strip() for c in record):
                    continue
                header_row = number
                headers = record
                builder.set_headers(headers, number)
                continue
            if len(record) > len(headers) and any(c.strip() for c in record[len(headers):]):
                problems.add(number, "", f"{len(record)} cells but {len(headers)} headers "
                                         f"(is the delimiter {delimiter!r} inside a cell without quotes?)")
                continue
            stray = next((i for i, h in enumerate(headers) if not h.strip() and i < len(record)
                          and record[i].strip()), None)
            if stray is not None:
                problems.add(number, "", f"cell {stray + 1} holds {record[stray][:40]!r} but its column has "
                                         "no header")
                continue
            cells = {h: (record[i] if i < len(record) else "") for i, h in enumerate(headers) if h.strip()}
            if not builder.add_row(number, cells):
                break
    except csv.Error as exc:
        problems.add(reader.line_num, "", f"not readable as CSV: {exc}")
    return builder.sheet({"delimiter": delimiter, "bom": bom})


def _read_json(doc: Any, problems: _Problems, max_rows: int, wrapper: str | None = None) -> Sheet:
    if wrapper is None:
        wrapper = "rows" if isinstance(doc, dict) else "list"
    rows = doc.get("rows") if isinstance(doc, dict) else doc
    if not isinstance(rows, list):
        problems.fail('expected a list of objects, or {"rows": [objects]}')
    builder = _Builder("json", problems, max_rows)
    headers: list[str] = []
    known: set[str] = set()
    lists: set[str] = set()
    for obj in rows:
        if isinstance(obj, Mapping):
            for key in obj:
                if key not in known:
                    known.add(key)
                    headers.append(str(key))
    builder.set_headers(headers, 0)
    # a JSON header problem is about a key, found in the objects: name the first object that has it
    for i, p in enumerate(problems.items):
        if p.row == 0 and p.column:
            first = next((n for n, o in enumerate(rows, start=1) if isinstance(o, Mapping) and p.column in o), 0)
            problems.items[i] = Problem(first, p.column, p.message)
    for number, obj in enumerate(rows, start=1):
        if not isinstance(obj, Mapping):
            problems.add(number, "", "expected an object (header -> value)")
            continue
        cells: dict[str, str] = {}
        ok = True
        for key, value in obj.items():
            text = _json_cell(value, builder.fields.get(key, ""))
            if text is None:
                problems.add(number, key, f"expected text or a number, not {type(value).__name__} {value!r:.40}")
                ok = False
                continue
            if isinstance(value, list):
                lists.add(key)
            cells[key] = text
        if ok and not builder.add_row(number, cells):
            break
    return builder.sheet({"wrapper": wrapper, "lists": [h for h in headers if h in lists]})


def _json_cell(value: Any, fname: str) -> str | None:
    """A JSON value as cell text; lists only for the fields that take several values."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return _number_text(value)
    if isinstance(value, list) and fname in ("SeriesInstanceUID", "Modality"):
        items = [_json_cell(v, "") for v in value]
        if any(i is None for i in items):
            return None
        return "\\".join(i for i in items if i)
    return None


def _number_text(value: float) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _read_xlsx(data: bytes, problems: _Problems, max_rows: int) -> Sheet:
    # imported when needed: most processes that import this module never read a workbook
    from openpyxl import load_workbook
    from openpyxl.cell.read_only import ReadOnlyCell

    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            names = set(zf.namelist())
            size = sum(i.file_size for i in zf.infolist())
            mimetype = zf.read("mimetype")[:100] if "mimetype" in names else b""
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        problems.fail(f"not a readable .xlsx workbook (a broken zip file: {exc})")
    if b"opendocument" in mimetype:
        problems.fail("an OpenDocument spreadsheet (.ods): save it as .xlsx or CSV UTF-8 and send that")
    if "xl/workbook.xml" not in names and not any(n.endswith("workbook.xml") for n in names):
        problems.fail("not an Excel .xlsx workbook (a zip file, but not a workbook)")
    if size > MAX_XLSX_UNCOMPRESSED:
        problems.fail(f"the workbook is {size // 2**20} MB once uncompressed; at most "
                      f"{MAX_XLSX_UNCOMPRESSED // 2**20} MB")
    builder = _Builder("xlsx", problems, max_rows)
    suspects: dict[tuple[int, int], str] = {}   # (row, column) of a stored cell read as empty -> header
    sheet_name = ""
    try:
        wb = load_workbook(io.BytesIO(data), read_only=True, data_only=True)
        try:
            ws = wb.worksheets[0]
            sheet_name = ws.title
            ws.reset_dimensions()  # rely on the rows themselves, not on a dimension some writers get wrong
            headers: list[str] = []
            header_row = 0
            for row in ws.iter_rows():
                stored = next((c for c in row if isinstance(c, ReadOnlyCell)), None)
                if stored is None:  # only the padding of empty cells: an empty row
                    continue
                number = stored.row or 0
                if not header_row:
                    if all(c.value is None or str(c.value).strip() == "" for c in row):
                        continue
                    header_row = number
                    headers = [_header_text(c.value) for c in row]
                    builder.set_headers(headers, number)
                    continue
                cells: dict[str, str] = {}
                ok = True
                for i, cell in enumerate(row):
                    header = headers[i] if i < len(headers) else ""
                    value = cell.value
                    if not header.strip():
                        if value is not None and str(value).strip():
                            problems.add(number, "", f"cell {cell.coordinate} holds {str(value)[:40]!r} "
                                                     "but its column has no header")
                            ok = False
                        continue
                    if value is None:
                        # a stored cell read as empty: a formula saved without its value? (t="str" is a
                        # formula whose cached value is the empty string: empty it is)
                        if isinstance(cell, ReadOnlyCell) and cell.data_type != "str":
                            suspects[(number, i + 1)] = header
                        cells[header] = ""
                        continue
                    text, why = _excel_text(value, cell.data_type)
                    if why:
                        problems.add(number, header, why)
                        ok = False
                    cells[header] = text
                for header in headers[len(row):]:
                    if header.strip():
                        cells.setdefault(header, "")
                if ok and not builder.add_row(number, cells):
                    break
        finally:
            wb.close()
        if suspects:
            _formulas_without_values(data, suspects, problems)
    except SheetError:
        raise
    except Exception as exc:  # openpyxl raises many kinds on a damaged workbook: all mean "cannot read it"
        problems.fail(f"not a readable .xlsx workbook ({type(exc).__name__}: {str(exc)[:200]})")
    return builder.sheet({"sheet": sheet_name})


def _header_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return _number_text(value)
    return str(value)


def _excel_text(value: Any, data_type: str) -> tuple[str, str]:
    """A cell's value as text, and what is wrong with it ("" when nothing)."""
    if data_type == "e":
        return str(value), f"the cell holds the error {value}: put the value itself in it"
    if isinstance(value, bool):
        return str(value).upper(), "a true/false cell: expected text, a number or a date"
    if isinstance(value, dt.datetime):
        return value.strftime("%Y%m%d"), ""
    if isinstance(value, dt.date):
        return value.strftime("%Y%m%d"), ""
    if isinstance(value, (dt.time, dt.timedelta)):
        return str(value), "a time: expected text, a number or a date"
    if isinstance(value, (int, float)):
        return _number_text(value), ""
    return str(value), ""


def _formulas_without_values(data: bytes, suspects: Mapping[tuple[int, int], str], problems: _Problems) -> None:
    """Second pass, only over a workbook where stored cells read as empty: which of them are formulas?"""
    from openpyxl import load_workbook

    wb = load_workbook(io.BytesIO(data), read_only=True, data_only=False)
    try:
        ws = wb.worksheets[0]
        ws.reset_dimensions()
        last = max(r for r, _ in suspects)
        for row in ws.iter_rows(max_row=last):
            for cell in row:
                if cell.value is None or cell.data_type != "f":
                    continue
                header = suspects.get((cell.row, cell.column))
                if header is not None:
                    problems.add(cell.row, header, f"cell {cell.coordinate} is a formula ({str(cell.value)[:60]}) "
                                                   "saved without its value: open the file in Excel or "
                                                   "LibreOffice and save it again, or paste the values")
    finally:
        wb.close()


# --- writing ---------------------------------------------------------------------------------------------

def _form(sheet_like: SheetForm | Mapping[str, Any]) -> tuple[str, list[str], Mapping[str, Any]]:
    if isinstance(sheet_like, Mapping):
        return sheet_like["format"], list(sheet_like["headers"]), sheet_like.get("dialect") or {}
    return sheet_like.format, list(sheet_like.headers), sheet_like.dialect or {}


def write_input_form(sheet_like: SheetForm | Mapping[str, Any], rows: Iterable[Mapping[str, str]]) -> bytes:
    """The "failed rows" file: ``rows`` (cells as read) in the input's own form, to fix and resubmit.

    Same format, same headers as written, same CSV delimiter and BOM, same JSON wrapper (lists where the
    input had lists), same sheet name; the cells are the original texts, so an unchanged file reads back
    to the same cells. CSV cells are written verbatim (an open date range ``-20241231`` must stay what it
    is; the texts are the user's own); xlsx cells are typed as text, so none becomes a formula.

    Parameters
    ----------
    sheet_like : Sheet, SheetForm or Mapping
        Anything with ``format``, ``headers`` and ``dialect`` (attributes or keys).
    rows : Iterable[Mapping[str, str]]
        Cells by header as written (``SheetRow.cells``).
    """
    fmt, headers, dialect = _form(sheet_like)
    if fmt == "csv":
        out = io.StringIO(newline="")
        writer = csv.writer(out, delimiter=dialect.get("delimiter", ","), lineterminator="\r\n")
        writer.writerow(headers)
        for row in rows:
            writer.writerow([row.get(h, "") for h in headers])
        body = out.getvalue().encode("utf-8")
        return (codecs.BOM_UTF8 + body) if dialect.get("bom") else body
    if fmt == "xlsx":
        return _xlsx(headers, ([row.get(h, "") for h in headers] for row in rows), dialect.get("sheet") or "Sheet1")
    if fmt == "json":
        lists = set(dialect.get("lists") or ())
        objs = []
        for row in rows:
            obj: dict[str, Any] = {}
            for h in headers:
                text = row.get(h, "")
                obj[h] = [p for p in text.split("\\") if p] if h in lists and text else text
            objs.append(obj)
        doc: Any = {"rows": objs} if dialect.get("wrapper") == "rows" else objs
        return json.dumps(doc, ensure_ascii=False, indent=1).encode("utf-8")
    raise InvalidRequest(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}", "format")


def write_table(format: str, columns: list[str], rows: Iterable[Mapping[str, Any]]) -> bytes:
    """A report: ``rows`` as CSV, xlsx or JSON with these ``columns``, safe to open in a spreadsheet.

    Text cells starting with ``= + - @`` TAB or CR cannot run as formulas: CSV writes a ``'`` before
    them (OWASP's advice for CSV injection); xlsx types every text cell as text (never a formula).
    Numbers stay numbers; None is an empty cell; lists and objects are written as JSON text (CSV, xlsx).
    JSON is a list of objects, values as given.

    Raises
    ------
    InvalidRequest
        An unknown format.
    """
    if format == "json":
        return json.dumps([{c: row.get(c) for c in columns} for row in rows], ensure_ascii=False,
                          default=str).encode("utf-8")
    if format == "csv":
        out = io.StringIO(newline="")
        writer = csv.writer(out, lineterminator="\r\n")
        writer.writerow([_csv_safe(c) for c in columns])
        for row in rows:
            writer.writerow([_csv_safe(_flat(row.get(c))) for c in columns])
        return codecs.BOM_UTF8 + out.getvalue().encode("utf-8")  # the BOM: Excel reads UTF-8 names right
    if format == "xlsx":
        return _xlsx(columns, ([_flat(row.get(c)) for c in columns] for row in rows), "Report")
    raise InvalidRequest(f"unknown format {format!r}; one of {', '.join(FORMATS)}", "format")


def _flat(value: Any) -> Any:
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, ensure_ascii=False, default=str)
    return value


def _csv_safe(value: Any) -> Any:
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return "" if value is None else value


# XML 1.0 cannot hold these; openpyxl refuses a cell with one (a report cell with a stray control byte)
_ILLEGAL_XML = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")


def _xlsx(header: list[str], rows: Iterator[list[Any]], title: str) -> bytes:
    """A one-sheet workbook written in streaming mode; every text cell typed as text (data_type 's')."""
    from openpyxl import Workbook
    from openpyxl.cell.cell import WriteOnlyCell

    wb = Workbook(write_only=True)
    ws = wb.create_sheet(title=title[:31] or "Sheet1")

    def cells(values: Iterable[Any]) -> list[Any]:
        out = []
        for value in values:
            if isinstance(value, str):
                cell = WriteOnlyCell(ws, value=_ILLEGAL_XML.sub("\ufffd", value))
                cell.data_type = "s"  # never a formula, whatever the text starts with
            elif value is None or isinstance(value, (bool, int, float)):
                cell = WriteOnlyCell(ws, value=value)
            else:
                cell = WriteOnlyCell(ws, value=str(value))
                cell.data_type = "s"
            out.append(cell)
        return out

    ws.append(cells(header))
    for row in rows:
        ws.append(cells(row))
    buf = io.BytesIO()
    wb.save(buf)
    return buf.getvalue()
