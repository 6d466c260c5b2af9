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

from pydicom.datadict import dictionary_VR, keyword_dict
from pydicom.dataset import Dataset

from pacsbridge.shared.core.errors import InvalidRequest

__all__ = ["Query", "LEVELS", "RETURN_KEYS", "parse_date", "parse_date_range", "DATE_RANGE_HELP"]

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
        """Validate user input and build a query.

        Raises
        ------
        InvalidRequest
            An unknown field, a wrong type or an impossible value.
        """
        if not isinstance(data, Mapping):
            raise InvalidRequest("a query must be a JSON object", "query")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidRequest(f"unknown field(s) {', '.join(map(repr, unknown))}; "
                                 f"known: {', '.join(sorted(known))}", unknown[0])
        kw: dict[str, Any] = {}
        level = data.get("level", default_level)
        if not isinstance(level, str) or level.lower() not in LEVELS:
            raise InvalidRequest(f"expected one of {', '.join(LEVELS)}", "level")
        kw["level"] = level.lower()
        for name in _STRING_FIELDS:
            value = data.get(name, "")
            if value is None:
                value = ""
            if not isinstance(value, str):
                raise InvalidRequest("expected a string", name)
            value = value.strip()
            if len(value) > 64 or not _TEXT.match(value):
                raise InvalidRequest("at most 64 printable characters, no backslash", name)
            if name == "Modality" and value and not _CS.match(value):
                raise InvalidRequest(f"{value!r} is not a modality code (e.g. CT, MR)", name)
            kw[name] = value
        for name in _UID_FIELDS:
            value = data.get(name, ())
            if value is None or value == "":
                value = ()
            if isinstance(value, str):
                value = (value,)
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                raise InvalidRequest("expected a UID or a list of UIDs", name)
            for uid in value:
                if len(uid) > 64 or not _UID.match(uid):
                    raise InvalidRequest(f"{uid[:80]!r} is not a DICOM UID", name)
            kw[name] = tuple(value)
        kw["min_study_date"] = parse_date(data.get("min_study_date"), "min_study_date")
        kw["max_study_date"] = parse_date(data.get("max_study_date"), "max_study_date")
        if kw["min_study_date"] and kw["max_study_date"] and kw["min_study_date"] > kw["max_study_date"]:
            raise InvalidRequest("min_study_date is after max_study_date", "min_study_date")
        fields = data.get("include_fields", ())
        if not isinstance(fields, (list, tuple)) or not all(isinstance(f, str) for f in fields):
            raise InvalidRequest("expected a list of DICOM keywords", "include_fields")
        for f in fields:
            if f not in keyword_dict or dictionary_VR(keyword_dict[f]) == "SQ":
                raise InvalidRequest(f"{f[:80]!r} is not a DICOM keyword usable in a query",
                                     "include_fields")
        kw["include_fields"] = tuple(fields)
        query = cls(**kw)
        if query.is_empty():
            raise InvalidRequest("give at least one matching key (PatientID, PatientName, "
                                 "AccessionNumber, a UID, a date range, Modality ...)", "query")
        return query

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
