"""Copy stored files out of storage (pyconquest's ``copy_dicom_files_to_dest``)."""

from __future__ import annotations

import mmap
import os
import shutil
import stat
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from pydicom.datadict import tag_for_keyword

from pacsbridge.shared.core.errors import PacsbridgeError, QueryError
from pacsbridge.shared.index.conquest import Index
from pacsbridge.shared.index.records import read_header
from pacsbridge.shared.index.storage import Storage, Template, clean_component, open_folder

__all__ = ["select_files", "export_files", "ExportResult", "resolve_file"]

#: Columns a --query result may carry, most specific first (lower case).
_QUERY_KEYS = ("objectfile", "sopinstanc", "seriesinst", "studyinsta", "patientid", "seriespat", "imagepat")


@dataclass
class ExportResult:
    copied: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    withheld: list[tuple[str, str]] = field(default_factory=list)  #: (file, "action: reason") under a project


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
                        img.c[ikey].label("sop"), img.c.ObjectFile.label("ObjectFile"),
                        img.c.DeviceName.label("DeviceName"))
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


# -- placing a file in a folder, without overwriting or following a link (export, and the repack job) --
_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
_READ_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)


def _copy(src: Path, out_fd: int) -> None:
    """Copy the file ``src`` into ``out_fd`` (``sendfile`` where it can, in the kernel)."""
    with open(src, "rb") as fh:
        offset = 0
        try:
            while True:
                sent = os.sendfile(out_fd, fh.fileno(), offset, 1 << 30)
                if sent == 0:
                    return
                offset += sent
        except OSError:
            if offset:
                raise
        with os.fdopen(os.dup(out_fd), "wb") as out:  # no sendfile between these files: read and write
            shutil.copyfileobj(fh, out, 1 << 20)


def _same_file(src: Path | bytes, folder: int, name: str) -> bool:
    """Whether ``folder/name`` is a regular file (not a link) with ``src``'s inode or bytes (``src`` may be
    the bytes themselves)."""
    try:
        fd = os.open(name, _READ_FLAGS, dir_fd=folder)
    except OSError:  # a link (ELOOP), gone, unreadable
        return False
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return False
        if isinstance(src, bytes):
            if st.st_size != len(src):
                return False
            with os.fdopen(os.dup(fd), "rb") as there:
                return there.read() == src
        ref = os.stat(src)
        if (st.st_dev, st.st_ino) == (ref.st_dev, ref.st_ino):
            return True
        if st.st_size != ref.st_size:
            return False
        with os.fdopen(os.dup(fd), "rb") as there, open(src, "rb") as here:
            while True:
                a, b = here.read(1 << 20), there.read(1 << 20)
                if a != b:
                    return False
                if not a:
                    return True
    finally:
        os.close(fd)


def place(src: Path | bytes, folder: int, name: str, link: bool) -> str:
    """Put ``src`` (a file, or the bytes of one) at ``name`` in the folder descriptor ``folder`` without
    overwriting; ``placed`` or ``already``.

    Every name is taken relative to ``folder`` and no link is followed, so nothing is
    written through a link someone put there. Raises FileExistsError (with a message)
    when a different file, or a link, holds the name.
    """
    if link and not isinstance(src, bytes):
        try:
            os.link(src, name, dst_dir_fd=folder)
            return "placed"
        except FileExistsError:
            pass
    else:
        tmp = f".{name}.{uuid.uuid4().hex[:8]}.part"
        made = False
        try:
            out = os.open(tmp, _WRITE_FLAGS, 0o666, dir_fd=folder)
            made = True
            try:
                if isinstance(src, bytes):
                    _write_all(out, src)
                else:
                    _copy(src, out)
            finally:
                os.close(out)
            os.link(tmp, name, src_dir_fd=folder, dst_dir_fd=folder, follow_symlinks=False)  # no clobbering
            return "placed"
        except FileExistsError:
            pass
        finally:
            if made:
                try:
                    os.unlink(tmp, dir_fd=folder)
                except OSError:
                    pass
    if _same_file(src, folder, name):
        return "already"
    raise FileExistsError(f"a different file exists at {name} (not overwritten)")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def export_files(index: Index, storage: Storage, selected: Sequence[dict[str, Any]], dest: Path,
                 layout: str | None = None, progress: Callable[[int, int], None] | None = None,
                 transform: Callable[[str], Any] | None = None) -> ExportResult:
    """Copy files to ``dest``: flat (``<SOPInstanceUID>.dcm``) or in a ``layout`` tree.

    ``transform`` (a project's :class:`~pacsbridge.shared.deid.outgoing.Outgoing`) writes each file
    de-identified instead, named by its de-identified header (pseudonymised names in the tree, its new
    SOP Instance UID in a flat export); one the project withholds is listed in ``withheld``.

    An existing file in ``dest`` is never overwritten (counted as skipped). The
    folders below ``dest`` are made and opened without following symbolic links
    (:func:`~pacsbridge.shared.index.storage.open_folder`), and a file is written
    only under a name that did not exist, so a link inside ``dest`` never leads a
    folder or a file elsewhere (that instance fails, with the reason).
    """
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
                src: Path | bytes = resolve_file(storage, row["ObjectFile"], row.get("DeviceName"))
                if transform is not None:  # a project's de-identified file, named by its de-identified header
                    made = transform(str(src))
                    if made.data is None:
                        result.withheld.append((row["ObjectFile"], f"{made.action}: {made.reason}"))
                        continue
                    src = made.data
                    rel = (template.render(read_header(made.data, row["ObjectFile"], tags)) if template is not None
                           else clean_component(made.sop_uid) + ".dcm")
                elif template is not None:
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
            finally:
                if progress:
                    progress(n, len(selected))
    finally:
        if folder is not None:
            os.close(folder[1])
        os.close(dest_fd)
    return result
