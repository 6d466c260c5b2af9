"""Copy stored files out of storage (pyconquest's ``copy_dicom_files_to_dest``)."""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from pydicom.datadict import tag_for_keyword

from .errors import PacsbridgeError, QueryError
from .index import Index
from .records import read_header
from .storage import Storage, Template, clean_component, open_folder

__all__ = ["select_files", "export_files", "ExportResult", "resolve_file"]

#: Columns a --query result may carry, most specific first (lower case).
_QUERY_KEYS = ("objectfile", "sopinstanc", "seriesinst", "studyinsta", "patientid", "seriespat", "imagepat")


@dataclass
class ExportResult:
    copied: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)


def resolve_file(storage: Storage, object_file: str, device: str | None) -> Path:
    """Absolute path of an indexed file (MAG0: under the root; EXTERN: as stored)."""
    if (device or "MAG0") == "MAG0":
        return storage.absolute(object_file)
    return Path(object_file)


def select_files(index: Index, *, patient: str | None = None, study: str | None = None,
                 series: Sequence[str] | None = None, query: str | None = None) -> list[dict[str, Any]]:
    """Image rows (sop, series, study, ObjectFile, DeviceName) for a selection.

    Raises
    ------
    QueryError
        The query fails, or returns none of the columns it may use.
    """
    if query is None:
        return index.files_for(patient=patient, study=study, series=series)
    columns, rows = index.run_sql(query)
    lower = [c.lower() for c in columns]
    for key in _QUERY_KEYS:
        if key in lower:
            values = sorted({r[lower.index(key)] for r in rows if r[lower.index(key)] is not None})
            break
    else:
        raise QueryError(f"the query must return one of the columns {', '.join(_QUERY_KEYS)}; it returned "
                         f"{', '.join(columns) or 'nothing'}")
    if key == "objectfile":
        wanted = set(values)
        img = index.tables["Image"]
        with index.engine.connect() as conn:
            out = []
            ikey = index.schema["Image"].key.column
            for i in range(0, len(values), 500):
                for r in conn.execute(img.select().with_only_columns(
                        img.c[ikey].label("sop"), img.c.ObjectFile.label("ObjectFile"), img.c.DeviceName.label("DeviceName"))
                        .where(img.c.ObjectFile.in_(values[i:i + 500]))):
                    if r.ObjectFile in wanted:
                        out.append(dict(r._mapping))
            return out
    if key == "sopinstanc":
        return index.files_for(sops=values)
    if key == "seriesinst":
        return index.files_for(series=values)
    if key == "studyinsta":
        return [r for v in values for r in index.files_for(study=v)]
    return [r for v in values for r in index.files_for(patient=v)]


def export_files(index: Index, storage: Storage, selected: Sequence[dict[str, Any]], dest: Path,
                 layout: str | None = None, progress: Callable[[int, int], None] | None = None) -> ExportResult:
    """Copy files to ``dest``: flat (``<SOPInstanceUID>.dcm``) or in a ``layout`` tree.

    An existing file in ``dest`` is never overwritten (counted as skipped). The
    folders below ``dest`` are made and opened without following symbolic links
    (:func:`~pacsbridge.shared.storage.open_folder`), and a file is written
    only under a name that did not exist, so a link inside ``dest`` never leads a
    folder or a file elsewhere (that instance fails, with the reason).
    """
    from .repack import place

    result = ExportResult()
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    template = Template(layout or "patient-study-series") if layout is not None else None
    tags = [t for t in (tag_for_keyword(k) for k in template.keywords()) if t] if template else []
    dest_fd = open_folder(dest, [])
    folder: tuple[list[str], int] | None = None  # the last folder's descriptor
    try:
        for n, row in enumerate(selected, 1):
            try:
                src = resolve_file(storage, row["ObjectFile"], row.get("DeviceName"))
                if template is not None:
                    with open(src, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                        rel = template.render(read_header(mm, str(src), tags))
                else:
                    rel = clean_component(row["sop"]) + ".dcm"
                *parts, name = rel.split("/")
                if folder is None or folder[0] != parts:
                    if folder is not None:
                        os.close(folder[1])
                        folder = None
                    folder = (parts, open_folder(dest_fd, parts))
                try:
                    outcome = place(src, folder[1], name, link=False)
                except FileExistsError:  # a different file, or a link, holds the name: left as it is
                    outcome = "already"
                if outcome == "placed":
                    result.copied += 1
                else:
                    result.skipped += 1
            except (OSError, ValueError, PacsbridgeError) as exc:
                result.failed.append((row.get("ObjectFile", "?"), getattr(exc, "strerror", None) or str(exc)))
            if progress:
                progress(n, len(selected))
    finally:
        if folder is not None:
            os.close(folder[1])
        os.close(dest_fd)
    return result
