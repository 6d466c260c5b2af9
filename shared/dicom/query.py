"""One query model for every source (dicomtrolley's idea): DIMSE Q/R now, QIDO-RS later.

A :class:`Query` is built from user input (an API body, command-line flags)
by :meth:`Query.from_dict`, which refuses unknown fields, wrong types and
values that could not be valid DICOM matching keys, with an
:class:`~pacsbridge.shared.core.errors.InvalidRequest` naming the field.
:meth:`Query.to_dataset` gives the C-FIND identifier.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
from typing import Any, Mapping

from typing import Annotated, ClassVar

from pydantic import Field, field_validator, model_validator
from pydicom.datadict import dictionary_VR, keyword_dict
from pydicom.dataset import Dataset

from pacsbridge.shared.core.errors import InvalidRequest
from pacsbridge.shared.core.models import Model, check, refuse

__all__ = ["Query", "QueryModel", "LEVELS", "RETURN_KEYS", "parse_date", "parse_date_range", "DATE_RANGE_HELP",
           "UID_PATTERN", "DATE_PATTERN", "QUERY_KEYWORDS"]

#: Query/retrieve levels, lower case as users write them; DICOM spells them upper case.
LEVELS = ("patient", "study", "series", "image")

#: Keys asked for at each level (besides the matching keys of the query itself).
RETURN_KEYS: dict[str, tuple[str, ...]] = {
    "patient": ("PatientID", "PatientName", "PatientBirthDate", "PatientSex",
                "NumberOfPatientRelatedStudies"),
    "study": ("PatientID", "PatientName", "PatientBirthDate", "StudyInstanceUID", "StudyDate",
              "StudyTime", "AccessionNumber", "StudyDescription", "ModalitiesInStudy",
              "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances"),
    "series": ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "Modality", "SeriesNumber",
               "SeriesDescription", "NumberOfSeriesRelatedInstances"),
    "image": ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID",
              "InstanceNumber"),
}

#: A DICOM UID: digits and dots (at most 64 characters, said where it is used).
UID_PATTERN = r"^[0-9]+(\.[0-9]+)*$"
#: ``YYYYMMDD`` or ``YYYY-MM-DD`` with a month and a day that exist (29 February is checked by the code).
_MMDD = "((0[1-9]|1[0-2]){0}(0[1-9]|1[0-9]|2[0-8])|(0[13-9]|1[0-2]){0}(29|30)|(0[13578]|1[02]){0}31|02{0}29)"
_YEAR = "([0-9]{3}[1-9]|[0-9]{2}[1-9]0|[0-9][1-9]00|[1-9]000)"  # 0001 to 9999
DATE_PATTERN = f"^({_YEAR}{_MMDD.format('')}|{_YEAR}-{_MMDD.format('-')})$"
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*\Z")
_CS = re.compile(r"^[A-Z0-9 _]{1,16}\Z")
# Printable, no backslash (the DICOM value separator) and no control characters.
_TEXT = re.compile(r"^[^\\\x00-\x1f\x7f]*\Z")
_STRING_FIELDS = ("PatientID", "PatientName", "AccessionNumber", "StudyDescription", "Modality")
_UID_FIELDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")


def parse_date(value: Any, field: str) -> dt.date | None:
    """``YYYYMMDD`` or ``YYYY-MM-DD`` (or None/'' for no bound) as a date."""
    if value is None or value == "":
        return None
    if isinstance(value, dt.date):
        return value
    if not isinstance(value, str):
        raise InvalidRequest("expected a date as YYYYMMDD or YYYY-MM-DD", field)
    for fmt in ("%Y%m%d", "%Y-%m-%d"):
        try:
            return dt.datetime.strptime(value, fmt).date()
        except ValueError:
            continue
    raise InvalidRequest(f"{value!r} is not a date (YYYYMMDD or YYYY-MM-DD)", field)


#: The forms :func:`parse_date_range` accepts, for help texts and errors.
DATE_RANGE_HELP = ("a date (20240101 or 2024-01-01) or a range: 20240101-20241231 (DICOM), "
                   "2024-01-01..2024-12-31 or 2024-01-01/2024-12-31 (either date form); "
                   "leave one end out for an open range (20240101-, -20241231, 2024-01-01.., ..2024-12-31)")
_DICOM_RANGE = re.compile(r"([0-9]{8})?-([0-9]{8})?")


def parse_date_range(value: str, field: str) -> tuple[dt.date | None, dt.date | None]:
    """``(first, last)`` of a date or a date range as a user types it (see :data:`DATE_RANGE_HELP`).

    One date is a range of one day. A range is split at ``..`` or ``/`` (ISO 8601's
    interval), or at the ``-`` of DICOM's ``YYYYMMDD-YYYYMMDD``; ISO dates with their
    own dashes take ``..`` or ``/`` (``2024-01-01-2024-12-31`` is refused, not guessed).

    Raises
    ------
    InvalidRequest
        Not one of these forms, an impossible date, or a range that ends before it starts;
        ``field`` names what the user typed (``--StudyDate``).
    """
    text = value.strip() if isinstance(value, str) else ""
    if not text:
        raise InvalidRequest(f"expected {DATE_RANGE_HELP}", field)
    for sep in ("..", "/"):
        if sep in text:
            lo_text, _, hi_text = text.partition(sep)
            break
    else:
        m = _DICOM_RANGE.fullmatch(text)
        if m:
            lo_text, hi_text = m.group(1) or "", m.group(2) or ""
        elif re.fullmatch(r"[0-9]{8}|[0-9]{4}-[0-9]{2}-[0-9]{2}", text):
            lo_text = hi_text = text
        else:
            raise InvalidRequest(f"{value!r}: expected {DATE_RANGE_HELP}", field)
    if not (lo_text or hi_text):
        raise InvalidRequest(f"{value!r}: give at least one end; expected {DATE_RANGE_HELP}", field)
    try:
        lo = parse_date(lo_text.strip(), field)
        hi = parse_date(hi_text.strip(), field)
    except InvalidRequest:
        raise InvalidRequest(f"{value!r}: expected {DATE_RANGE_HELP}", field) from None
    if lo and hi and lo > hi:
        raise InvalidRequest(f"{value!r}: the range ends before it starts", field)
    return lo, hi


#: DICOM keywords a query may ask to be returned (``include_fields``): any but a sequence.
QUERY_KEYWORDS = tuple(sorted(k for k, tag in keyword_dict.items() if dictionary_VR(tag) != "SQ"))
_QUERY_KEYWORDS = frozenset(QUERY_KEYWORDS)
#: A matching text value: at most 64 printable characters between optional spaces, no backslash.
_QTEXT = r"^ *[^\\\x00-\x1f\x7f]{0,64} *$"
_QText = Annotated[str, Field(pattern=_QTEXT)]
_OneUID = Annotated[str, Field(max_length=64, pattern=r"^([0-9]+(\.[0-9]+)*)?$")]
_UIDList = list[Annotated[str, Field(max_length=64, pattern=UID_PATTERN)]]
_Date = Annotated[str, Field(pattern=DATE_PATTERN)]


def _query_field(loc: tuple[Any, ...]) -> str:
    return str(loc[0]) if loc else "query"


class QueryModel(Model):
    """A query as users send it (an API body, a retrieve job's ``query``, what the CLI builds).

    At least one matching key, and ``min_study_date`` <= ``max_study_date``: two rules of the
    whole that JSON Schema cannot say; the OpenAPI document says them in words.
    """

    #: What the OpenAPI document says in words (JSON Schema cannot).
    rules: ClassVar[tuple[str, ...]] = (
        "at least one matching key: PatientID, PatientName, AccessionNumber, StudyDescription, Modality, a UID or "
        "a study date (a PatientID, PatientName or StudyDescription of only `*` matches everything: refused, "
        "`query`)",
        "min_study_date is not after max_study_date (`min_study_date`)",
        "a 29 February only in a leap year",
        "include_fields: DICOM keywords of the standard's dictionary (pydicom's), not sequences "
        "(`include_fields`; the schema gives their form, listing all 3,800 would make the document 20 times larger)",
    )
    help = {
        "level": f"expected one of {', '.join(LEVELS)}",
        "PatientID": "at most 64 printable characters, no backslash",
        "PatientName": "at most 64 printable characters, no backslash",
        "AccessionNumber": "at most 64 printable characters, no backslash",
        "StudyDescription": "at most 64 printable characters, no backslash",
        "Modality": "a modality code (e.g. CT, MR): capitals, digits, '_' (at most 16)",
        "StudyInstanceUID": "a DICOM UID or a list of UIDs (digits and dots, at most 64 characters each)",
        "SeriesInstanceUID": "a DICOM UID or a list of UIDs (digits and dots, at most 64 characters each)",
        "SOPInstanceUID": "a DICOM UID or a list of UIDs (digits and dots, at most 64 characters each)",
        "min_study_date": "expected a date as YYYYMMDD or YYYY-MM-DD",
        "max_study_date": "expected a date as YYYYMMDD or YYYY-MM-DD",
        "include_fields": "expected a list of DICOM keywords usable in a query (no sequences)",
    }

    level: str = Field("study", json_schema_extra={"enum": [*LEVELS, *(lv.upper() for lv in LEVELS)]},
                       description="query/retrieve level (either case)")
    PatientID: _QText | None = Field(None, description="exact, or with * and ? wildcards")
    PatientName: _QText | None = Field(None, description="exact, or with * and ? wildcards")
    AccessionNumber: _QText | None = None
    StudyDescription: _QText | None = None
    Modality: Annotated[str, Field(pattern=r"^ *[A-Z0-9 _]{0,16} *$")] | None = Field(
        None, description="ModalitiesInStudy at study level, Modality below")
    StudyInstanceUID: _OneUID | _UIDList | None = Field(None, description="a UID or a list (list matching)")
    SeriesInstanceUID: _OneUID | _UIDList | None = None
    SOPInstanceUID: _OneUID | _UIDList | None = None
    min_study_date: _Date | None = Field(None, description="YYYYMMDD or YYYY-MM-DD")
    max_study_date: _Date | None = Field(None, description="YYYYMMDD or YYYY-MM-DD; not before min_study_date")
    include_fields: list[Annotated[str, Field(max_length=64, pattern=r"^[A-Za-z][A-Za-z0-9]*$",
                                              examples=["InstitutionName"])]] = Field(
        default_factory=list, description="extra DICOM keywords to return (any keyword but a sequence)")

    @field_validator("level")
    @classmethod
    def _level(cls, value: str) -> str:
        if value.lower() not in LEVELS:
            raise refuse(f"expected one of {', '.join(LEVELS)}")
        return value.lower()

    @field_validator("include_fields")
    @classmethod
    def _keywords(cls, value: list[str]) -> list[str]:
        for f in value:
            if f not in _QUERY_KEYWORDS:
                raise refuse(f"{f[:80]!r} is not a DICOM keyword usable in a query")
        return value

    @field_validator("min_study_date", "max_study_date")
    @classmethod
    def _date(cls, value: str | None) -> str | None:
        try:
            parse_date(value, "date")  # 29 February of a year that has none
        except InvalidRequest:
            raise refuse(f"{value!r} is not a date (YYYYMMDD or YYYY-MM-DD)") from None
        return value

    @model_validator(mode="after")
    def _whole(self) -> "QueryModel":
        lo = parse_date(self.min_study_date, "min_study_date")
        hi = parse_date(self.max_study_date, "max_study_date")
        if lo and hi and lo > hi:
            raise InvalidRequest("min_study_date is after max_study_date", "min_study_date")
        if self.to_query().is_empty():
            raise InvalidRequest("give at least one matching key (PatientID, PatientName, "
                                 "AccessionNumber, a UID, a date range, Modality ...)", "query")
        return self

    def to_query(self) -> "Query":
        """The :class:`Query` this describes (texts stripped, UIDs as tuples, dates as dates)."""
        def uids(value: str | list[str] | None) -> tuple[str, ...]:
            if not value:
                return ()
            return (value,) if isinstance(value, str) else tuple(value)

        fields: dict[str, Any] = {name: (getattr(self, name) or "").strip() for name in _STRING_FIELDS}
        fields.update({name: uids(getattr(self, name)) for name in _UID_FIELDS})
        return Query(level=self.level, min_study_date=parse_date(self.min_study_date, "min_study_date"),
                     max_study_date=parse_date(self.max_study_date, "max_study_date"),
                     include_fields=tuple(self.include_fields), **fields)


@dataclasses.dataclass(frozen=True)
class Query:
    """What to look for on a source, and at which level.

    UID fields accept one UID or a list (DICOM list matching); ``PatientName``
    and ``PatientID`` accept ``*`` and ``?`` wildcards. ``Modality`` matches
    ``ModalitiesInStudy`` at study level and ``Modality`` below.
    """

    level: str = "study"
    PatientID: str = ""
    PatientName: str = ""
    AccessionNumber: str = ""
    StudyDescription: str = ""
    Modality: str = ""
    StudyInstanceUID: tuple[str, ...] = ()
    SeriesInstanceUID: tuple[str, ...] = ()
    SOPInstanceUID: tuple[str, ...] = ()
    min_study_date: dt.date | None = None
    max_study_date: dt.date | None = None
    include_fields: tuple[str, ...] = ()

    # -- building -----------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any], default_level: str = "study") -> "Query":
        """Validate user input (with :class:`QueryModel`) and build a query.

        Raises
        ------
        InvalidRequest
            An unknown field, a wrong type or an impossible value.
        """
        if not isinstance(data, Mapping):
            raise InvalidRequest("a query must be a JSON object", "query")
        if "level" not in data:
            data = {**data, "level": default_level}
        return check(QueryModel, data, field="query", rename=_query_field).to_query()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (round-trips through :meth:`from_dict`); empty fields left out."""
        out: dict[str, Any] = {"level": self.level}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "level" or value in ("", (), None):
                continue
            if isinstance(value, dt.date):
                value = value.strftime("%Y%m%d")
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    def is_empty(self) -> bool:
        """True when nothing restricts the query (a PACS would return everything)."""
        return not any((self.PatientID.strip("*"), self.PatientName.strip("*"), self.AccessionNumber,
                        self.StudyDescription.strip("*"), self.Modality, self.StudyInstanceUID,
                        self.SeriesInstanceUID, self.SOPInstanceUID, self.min_study_date,
                        self.max_study_date))

    def replace(self, **changes: Any) -> "Query":
        """A copy with some fields changed (a narrower date range, another level ...)."""
        return dataclasses.replace(self, **changes)

    # -- DICOM --------------------------------------------------------------
    def date_range(self) -> str:
        """The StudyDate matching value (``lo-hi``, ``lo-``, ``-hi``) or ''."""
        lo = self.min_study_date.strftime("%Y%m%d") if self.min_study_date else ""
        hi = self.max_study_date.strftime("%Y%m%d") if self.max_study_date else ""
        if lo and lo == hi:
            return lo
        return f"{lo}-{hi}" if (lo or hi) else ""

    def to_dataset(self, level: str | None = None) -> Dataset:
        """The C-FIND identifier at ``level`` (default: the query's own).

        Matching keys above the level stay in (Study Root with relational
        queries is what PACS usually answer); return keys of the level are
        added empty.
        """
        level = level or self.level
        ds = Dataset()
        ds.QueryRetrieveLevel = "IMAGE" if level == "image" else level.upper()
        for name in RETURN_KEYS[level] + self.include_fields:
            setattr(ds, name, "")
        for name in ("PatientID", "PatientName", "AccessionNumber", "StudyDescription"):
            if getattr(self, name):
                setattr(ds, name, getattr(self, name))
        if self.Modality:
            setattr(ds, "ModalitiesInStudy" if level in ("patient", "study") else "Modality",
                    self.Modality)
        for name in _UID_FIELDS:
            uids = getattr(self, name)
            if uids:
                setattr(ds, name, list(uids) if len(uids) > 1 else uids[0])
        if self.date_range():
            ds.StudyDate = self.date_range()
        return ds
