"""Mass transfer: a date range split into day or week chunks, each chunk a row of a cohort.

``{"from": "2024-01-01", "to": "2024-12-31", "chunk": "week", "filters": {...}}`` becomes 53 rows, each
asking the node for the studies of one week (a chunk the PACS cuts short is split further by the searcher,
as a retrieve's query is). The cohort's job then queries one chunk after another within the node's
limits, and pulls each chunk's studies as a child retrieve job: a crash resumes at the first chunk not done.

Filters that are C-FIND matching keys at study level (``Modality``, ``StudyDescription``) are sent with
the query; the others (``InstitutionName``, ``BodyPartExamined``, patient age) are not study-level keys
that every PACS matches on, so they are asked as return keys and applied here to what comes back
(:func:`keep_study`, :func:`keep_series`).
"""

from __future__ import annotations

import datetime as dt
import fnmatch
from typing import Annotated, Any, Literal, Mapping

from pydantic import Field, model_validator

from pacsbridge.shared.core.models import Model, refuse
from pacsbridge.shared.dicom.query import DATE_PATTERN, parse_date

__all__ = ["MassRequest", "MassFilters", "chunks", "chunk_rows", "keep_study", "keep_series", "MAX_CHUNKS"]

#: At most this many chunks (27 years of days; a longer range takes weeks).
MAX_CHUNKS = 10_000
_CODE = Annotated[str, Field(pattern=r"^[A-Za-z0-9_]{1,16}$")]
_PATTERN = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[^\\\x00-\x1f\x7f]+$")]


class MassFilters(Model):
    """What a mass transfer keeps of each chunk's studies."""

    help = {"Modality": "modality codes (CT, MR ...): a study with any of them",
            "StudyDescription": "a pattern with * and ?, sent with the query",
            "InstitutionName": "a pattern with * and ? (case-insensitive), matched on the answers",
            "BodyPartExamined": "codes (CHEST, HEAD ...): the series with any of them",
            "min_age": "youngest patient age in years at the study", "max_age": "oldest, in years"}

    Modality: list[_CODE] = Field(default_factory=list, max_length=16)
    StudyDescription: _PATTERN | None = None
    InstitutionName: _PATTERN | None = None
    BodyPartExamined: list[_CODE] = Field(default_factory=list, max_length=16)
    min_age: int | None = Field(default=None, ge=0, le=150)
    max_age: int | None = Field(default=None, ge=0, le=150)


class MassRequest(Model):
    """A date range split in chunks, with filters."""

    help = {"from": "first study date, YYYYMMDD or YYYY-MM-DD", "to": "last study date (included)",
            "chunk": "day or week", "filters": "what to keep of each chunk's studies"}

    from_: Annotated[str, Field(alias="from", pattern=DATE_PATTERN)]
    to: Annotated[str, Field(pattern=DATE_PATTERN)]
    chunk: Literal["day", "week"] = "week"
    filters: MassFilters = Field(default_factory=MassFilters)

    @model_validator(mode="after")
    def _range(self) -> "MassRequest":
        lo, hi = parse_date(self.from_, "from"), parse_date(self.to, "to")
        if lo is None or hi is None or lo > hi:
            raise refuse("`from` must not be after `to`")
        if len(chunks(lo, hi, self.chunk)) > MAX_CHUNKS:
            raise refuse(f"at most {MAX_CHUNKS} chunks: take weeks, or a shorter range")
        f = self.filters
        if f.min_age is not None and f.max_age is not None and f.min_age > f.max_age:
            raise refuse("filters.min_age must not be above filters.max_age")
        return self

    def span(self) -> tuple[dt.date, dt.date]:
        lo, hi = parse_date(self.from_, "from"), parse_date(self.to, "to")
        assert lo is not None and hi is not None
        return lo, hi


def chunks(lo: dt.date, hi: dt.date, chunk: str) -> list[tuple[dt.date, dt.date]]:
    """``[lo, hi]`` in consecutive day or week ranges (the last one may be shorter)."""
    step = dt.timedelta(days=1 if chunk == "day" else 7)
    out = []
    start = lo
    while start <= hi:
        end = min(hi, start + step - dt.timedelta(days=1))
        out.append((start, end))
        start = end + dt.timedelta(days=1)
    return out


def chunk_rows(request: MassRequest) -> list[tuple[dict[str, str], dict[str, Any]]]:
    """``(cells, spec)`` of each chunk: cells as a mass transfer's "input" (its failed chunks come back as
    JSON rows of this form), spec what the cohort's query reads."""
    f = request.filters
    out = []
    for lo, hi in chunks(*request.span(), request.chunk):
        cells = {"StudyDate": f"{lo:%Y%m%d}-{hi:%Y%m%d}"}
        if f.Modality:
            cells["Modality"] = "\\".join(f.Modality)
        if f.StudyDescription:
            cells["StudyDescription"] = f.StudyDescription
        spec = {"min_date": f"{lo:%Y%m%d}", "max_date": f"{hi:%Y%m%d}",
                "Modality": [m.upper() for m in f.Modality], "StudyDescription": f.StudyDescription,
                "InstitutionName": f.InstitutionName, "BodyPartExamined": [b.upper() for b in f.BodyPartExamined],
                "min_age": f.min_age, "max_age": f.max_age}
        out.append((cells, spec))
    return out


def _age(study: Mapping[str, Any]) -> int | None:
    """The patient's age in years at the study: PatientAge (``045Y``), else birth date to study date."""
    text = str(study.get("PatientAge") or "").strip().upper()
    if len(text) == 4 and text[:3].isdigit() and text[3] in "DWMY":
        n = int(text[:3])
        return {"D": n // 365, "W": n // 52, "M": n // 12, "Y": n}[text[3]]
    try:
        born = dt.datetime.strptime(str(study.get("PatientBirthDate") or ""), "%Y%m%d").date()
        when = dt.datetime.strptime(str(study.get("StudyDate") or ""), "%Y%m%d").date()
    except ValueError:
        return None
    return when.year - born.year - ((when.month, when.day) < (born.month, born.day))


def keep_study(spec: Mapping[str, Any], study: Mapping[str, Any]) -> bool:
    """Whether a C-FIND study answer passes the filters the PACS was not asked to match."""
    modalities = spec.get("Modality") or []
    if modalities:
        have = study.get("ModalitiesInStudy") or ""
        values = {str(v).strip().upper() for v in (have if isinstance(have, (list, tuple)) else
                                                   str(have).split("\\"))}
        if values - {""} and not values & set(modalities):
            return False
    pattern = spec.get("InstitutionName")
    if pattern and not fnmatch.fnmatchcase(str(study.get("InstitutionName") or "").upper(), pattern.upper()):
        return False
    lo, hi = spec.get("min_age"), spec.get("max_age")
    if lo is not None or hi is not None:
        age = _age(study)
        if age is None or (lo is not None and age < lo) or (hi is not None and age > hi):
            return False
    return True


def keep_series(spec: Mapping[str, Any], body_part: str) -> bool:
    """Whether a series passes the ``BodyPartExamined`` filter."""
    parts = spec.get("BodyPartExamined") or []
    return not parts or body_part.strip().upper() in parts
