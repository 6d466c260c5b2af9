"""Read a Conquest ``dicom.sql`` database definition.

The format, as Conquest's own reader accepts it::

    *Patient*
    {
        { 0x0010, 0x0020, "PatientID", 64, SQL_C_CHAR, DT_STR },
        ...
    }

Sections ``*Patient*``, ``*Study*``, ``*Series*``, ``*Image*`` and
``*WorkList*``; the first entry of a section is its key and the last entry of
Study / Series / Image links to the parent level. Conquest's tokenizer is
tolerant (the shipped file lacks a comma after one ``}``), and so is this one:
entries are the innermost ``{ ... }`` groups of a section, whatever separates
them. Comments are ``/* ... */``, ``#`` and ``//`` to the end of a line.
Column names are truncated to 10 characters, as Conquest does by default.
"""

from __future__ import annotations

import dataclasses
import re
from importlib import resources
from pathlib import Path
from typing import NamedTuple

from pacsbridge.shared.core.errors import DicomSqlError

__all__ = [
    "Column",
    "TableDef",
    "Schema",
    "parse_dicom_sql",
    "load_schema",
    "default_dicom_sql",
    "LEVELS",
    "TABLE_NAMES",
]

#: Index levels, parent first.
LEVELS = ("Patient", "Study", "Series", "Image")
#: Conquest's table name of each section.
TABLE_NAMES = {
    "Patient": "DICOMPatients",
    "Study": "DICOMStudies",
    "Series": "DICOMSeries",
    "Image": "DICOMImages",
    "WorkList": "DICOMWorkList",
}
#: Conquest's default column name length.
NAME_LENGTH = 10

_SQL_TYPES = {"SQL_C_CHAR", "SQL_C_DATE"}
_SEQUENCE_MARKERS = {"DT_STARTSEQUENCE", "DT_ENDSEQUENCE"}


class Column(NamedTuple):
    """One entry of a ``dicom.sql`` section."""

    group: int
    element: int
    name: str  #: the name as written in the file
    column: str  #: the SQL column name (truncated)
    length: int
    sql_type: str  #: SQL_C_CHAR or SQL_C_DATE
    dicom_type: str  #: DT_STR, DT_MSTR, DT_UI, DT_DATE, DT_TIME, DT_UINT16 ...
    hl7: str | None = None

    @property
    def tag(self) -> int:
        """The DICOM tag as one integer (``0xGGGGEEEE``)."""
        return (self.group << 16) | self.element


class TableDef(NamedTuple):
    """One section: a level, its table name and columns."""

    level: str
    table: str
    columns: tuple[Column, ...]

    @property
    def key(self) -> Column:
        """The primary key column (the first entry)."""
        return self.columns[0]

    @property
    def parent(self) -> Column | None:
        """The column that links to the parent level (the last entry)."""
        if self.level in ("Study", "Series", "Image"):
            return self.columns[-1]
        return None

    def by_tag(self, tag: int) -> Column | None:
        """The first column holding ``tag``, if any."""
        for col in self.columns:
            if col.tag == tag:
                return col
        return None


@dataclasses.dataclass(frozen=True)
class Schema:
    """A parsed ``dicom.sql``: one :class:`TableDef` per section (``schema["Image"]``)."""

    tables: dict[str, TableDef]
    source: str

    def __getitem__(self, level: str) -> TableDef:
        return self.tables[level]

    def with_extra_columns(self, level: str, columns: list[Column]) -> "Schema":
        """Return a schema with ``columns`` added to ``level`` (before its parent link).

        This is pyconquest's ``add_column_to_database``.
        """
        tdef = self.tables[level]
        cols = list(tdef.columns)
        existing = {c.column.lower() for c in cols}
        for col in columns:
            if col.column.lower() in existing:
                raise DicomSqlError(f"column {col.column} already in {tdef.table}")
            existing.add(col.column.lower())
        at = len(cols) - 1 if tdef.parent is not None else len(cols)
        cols[at:at] = columns
        tables = dict(self.tables)
        tables[level] = tdef._replace(columns=tuple(cols))
        return dataclasses.replace(self, tables=tables)


_COMMENT_BLOCK = re.compile(r"/\*.*?\*/", re.S)
_COMMENT_LINE = re.compile(r"(#|//)[^\n]*")
_SECTION = re.compile(r"\*\s*(\w+)\s*\*")
_ENTRY = re.compile(r"\{([^{}]*)\}")


def _strip_comments(text: str) -> str:
    # keep newlines so that line numbers in errors stay right
    text = _COMMENT_BLOCK.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    return _COMMENT_LINE.sub("", text)


def _parse_int(token: str) -> int:
    return int(token, 0)


def _parse_entry(body: str, source: str, line: int, truncate: int) -> Column | None:
    fields = [f.strip() for f in body.replace("\n", " ").split(",")]
    fields = [f for f in fields if f]
    if len(fields) not in (6, 7):
        raise DicomSqlError(f"expected 6 or 7 fields in an entry, found {len(fields)}: {{{body.strip()}}}",
                            source, line)
    try:
        group, element = _parse_int(fields[0]), _parse_int(fields[1])
        length = int(fields[3])
    except ValueError:
        raise DicomSqlError(f"bad number in entry {{{body.strip()}}}", source, line) from None
    name = fields[2].strip('"').strip()
    sql_type, dicom_type = fields[4], fields[5]
    hl7 = fields[6].strip('"') if len(fields) == 7 else None
    if dicom_type in _SEQUENCE_MARKERS:
        return None
    if sql_type not in _SQL_TYPES:
        raise DicomSqlError(f"unknown SQL type {sql_type} for {name}", source, line)
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise DicomSqlError(f"column name {name!r} is not a plain identifier", source, line)
    if length <= 0:
        raise DicomSqlError(f"column {name} has length {length}", source, line)
    column = name[:truncate] if truncate else name
    return Column(group, element, name, column, length, sql_type, dicom_type, hl7)


def parse_dicom_sql(text: str, source: str = "dicom.sql", truncate: int = NAME_LENGTH) -> Schema:
    """Parse the text of a Conquest ``dicom.sql``.

    Parameters
    ----------
    text : str
        The file's content.
    source : str
        A name for error messages.
    truncate : int
        Column name length (Conquest: 10); 0 keeps full names.

    Raises
    ------
    DicomSqlError
        With the file and line of the first problem.
    """
    clean = _strip_comments(text)
    sections = list(_SECTION.finditer(clean))
    if not sections:
        raise DicomSqlError("no *Patient*/*Study*/*Series*/*Image* sections found", source)
    tables: dict[str, TableDef] = {}
    for i, match in enumerate(sections):
        level = match.group(1)
        if level not in TABLE_NAMES:
            line = clean.count("\n", 0, match.start()) + 1
            raise DicomSqlError(f"unknown section *{level}*", source, line)
        end = sections[i + 1].start() if i + 1 < len(sections) else len(clean)
        body_start = match.end()
        columns: list[Column] = []
        seen: set[str] = set()
        for entry in _ENTRY.finditer(clean, body_start, end):
            line = clean.count("\n", 0, entry.start()) + 1
            col = _parse_entry(entry.group(1), source, line, truncate)
            if col is None:
                continue
            if col.column.lower() in seen:
                raise DicomSqlError(f"duplicate column {col.column} in *{level}*", source, line)
            seen.add(col.column.lower())
            columns.append(col)
        if not columns:
            raise DicomSqlError(f"section *{level}* has no entries", source)
        tables[level] = TableDef(level, TABLE_NAMES[level], tuple(columns))
    missing = [lvl for lvl in LEVELS if lvl not in tables]
    if missing:
        raise DicomSqlError(f"missing section(s): {', '.join('*%s*' % m for m in missing)}", source)
    return Schema(tables, source)


def default_dicom_sql() -> str:
    """The text of the ``dicom.sql`` shipped with pacsbridge (Conquest's own)."""
    return resources.files("pacsbridge.shared.core").joinpath("data/dicom.sql").read_text(encoding="utf-8")


#: pyconquest's special columns (their values: :mod:`pacsbridge.shared.index.special`).
_T = "DT_SPECIAL"
SPECIAL_COLUMNS = [
    Column(0, 1, "ElementCount", "ElementCount", 16, "SQL_C_CHAR", _T),
    Column(0, 2, "ElementList", "ElementList", 4000, "SQL_C_CHAR", _T),
    Column(0, 3, "Nfractions", "Nfractions", 16, "SQL_C_CHAR", _T),
    Column(0, 4, "UniqueFOR_UID", "UniqueFOR_UID", 64, "SQL_C_CHAR", _T),
    Column(0, 5, "ReferencedSeriesUID", "ReferencedSeriesUID", 64, "SQL_C_CHAR", _T),
    Column(0, 6, "ReferencedSOPUID", "ReferencedSOPUID", 64, "SQL_C_CHAR", _T),
]


def load_schema(path: Path | None = None, special_columns: bool = False) -> Schema:
    """Load ``path`` (or the shipped default), optionally with pyconquest's special columns."""
    if path is None:
        schema = parse_dicom_sql(default_dicom_sql(), "dicom.sql (shipped)")
    else:
        try:
            text = Path(path).read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            raise DicomSqlError(f"cannot read: {exc.strerror}", str(path)) from None
        schema = parse_dicom_sql(text, str(path))
    if special_columns:
        have = {c.column.lower() for c in schema["Image"].columns}
        schema = schema.with_extra_columns(
            "Image", [c for c in SPECIAL_COLUMNS if c.column.lower() not in have])
    return schema
