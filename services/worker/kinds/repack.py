"""Repack: copy or hard-link stored instances into a human-friendly tree (pypx's px-repack).

A repack job (``{"selection", "dest", "template", "link"}``, see
:mod:`pacsbridge.shared.jobs.spec`) places every selected instance at
``PACSBRIDGE_EXPORT_ROOT/<dest>/<template rendered from its header>``. The
template language and its path cleaning are storage's
(:class:`~pacsbridge.shared.index.storage.Template`; the default ``px-repack`` preset
is px-repack's ``%PatientID-%PatientName-%PatientBirthDate/...`` tree), so no
DICOM value can climb out of the destination; the destination itself is
checked to stay inside the export root after resolving symlinks, and every
folder below it is made and opened one component at a time without following
a symbolic link (:func:`~pacsbridge.shared.index.storage.open_folder`): a link put
in the export root is refused (listed with the instance), and no folder is
ever made outside the root through it.

A file is never overwritten: it is written to a temporary name in its
folder and hard-linked to its final name, which fails if the name exists.
An existing file with the same bytes counts as already there (a repeated
job is harmless); a different one is reported as a failure of that instance.
``link`` makes hard links to the stored files instead of copies (same
inode; the export root must then be on the storage's file system).
"""

from __future__ import annotations

import logging
import mmap
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from pydicom.datadict import tag_for_keyword

from pacsbridge.shared.index.context import Context
from pacsbridge.shared.core.errors import ConfigError, InvalidRequest, PacsbridgeError, UnsafePath
from pacsbridge.shared.deid.keys import secret
from pacsbridge.shared.deid.outgoing import Outgoing, audit_identifiable
from pacsbridge.shared.deid.projects import ProjectStore
from pacsbridge.shared.jobs.store import Job, JobStore, SeriesProgress
from pacsbridge.shared.jobs.spec import safe_relative
from pacsbridge.shared.index.records import read_header
from pacsbridge.worker.outcome import Outcome
from pacsbridge.worker.selection import Instance, describe, resolve
from pacsbridge.shared.index.export import place
from pacsbridge.shared.index.storage import Template, open_folder

__all__ = ["RepackReport", "repack", "run", "destination", "place"]

log = logging.getLogger(__name__)

#: Series counters are written at most this often (seconds), and when a series is done.
PROGRESS_SECONDS = 1.0
#: Failures listed in a job's result (all are counted).
MAX_LISTED = 1000


@dataclass
class RepackReport:
    """What :func:`repack` did."""

    placed: int = 0  #: new files (copies or links)
    already: int = 0  #: the same file was there already
    failed: list[tuple[str, str, str]] = field(default_factory=list)  #: (sop, series, reason)
    withheld: list[tuple[str, str, str]] = field(default_factory=list)  #: (sop, series, "action: reason")
    per_series: dict[str, Counter[str]] = field(default_factory=dict)
    cancelled: bool = False

    def count(self, series: str, what: str) -> None:
        self.per_series.setdefault(series, Counter())[what] += 1


def destination(export_root: Path, dest: str) -> Path:
    """``export_root/dest``, created, checked to stay inside the export root (symlinks resolved).

    Raises
    ------
    InvalidRequest
        ``dest`` is absolute, has ``..``, or resolves outside the export root.
    """
    rel = safe_relative(dest, "dest")
    root = Path(export_root).absolute()
    root.mkdir(parents=True, exist_ok=True)
    real_root = os.path.realpath(root)
    base = root.joinpath(*rel.split("/"))
    real = os.path.realpath(base)
    if real != real_root and not real.startswith(real_root + os.sep):
        raise InvalidRequest("resolves outside PACSBRIDGE_EXPORT_ROOT (a symbolic link?)", "dest")
    try:  # made folder by folder, no link followed: nothing is made outside even if a link appears now
        os.close(open_folder(root, rel.split("/")))
    except UnsafePath:
        raise InvalidRequest("resolves outside PACSBRIDGE_EXPORT_ROOT (a symbolic link?)", "dest") from None
    return base


def _inside(path: str, real_base: str) -> bool:
    return path == real_base or path.startswith(real_base + os.sep)


def repack(instances: Sequence[Instance], base: Path, template: str | Template, link: bool = False, *,
           cancel: threading.Event | None = None,
           progress: Callable[[RepackReport, str | None], None] | None = None,
           within: Path | None = None, transform: Callable[[str], Any] | None = None) -> RepackReport:
    """Copy (or hard-link) each instance to ``base/<template>``.

    Parameters
    ----------
    instances
        From :func:`pacsbridge.worker.selection.resolve`.
    base : Path
        The destination folder (see :func:`destination`).
    template
        A preset name or a template (storage's language).
    link : bool
        Hard links instead of copies.
    cancel : threading.Event, optional
        Checked between instances.
    progress : callable, optional
        ``progress(report, finished_series_or_None)``, called now and then.
    within : Path, optional
        The folder ``base`` must still lie in when it is opened (the export root).
    transform : callable, optional
        A project's de-identification (:class:`~pacsbridge.shared.nodes.pusher.Deidentify`): each file
        is written de-identified, placed by its de-identified header (pseudonymised names in the tree);
        one the project's risk policy withholds is not written (``withheld``).

    Raises
    ------
    InvalidRequest
        The template is malformed, or ``base`` no longer lies inside ``within``.
    """
    try:
        tmpl = template if isinstance(template, Template) else Template(template)
    except ConfigError as exc:
        raise InvalidRequest(str(exc), "template") from None
    tags = [t for t in (tag_for_keyword(k) for k in tmpl.keywords()) if t]
    real_within = os.path.realpath(within if within is not None else base)
    report = RepackReport()
    last = time.monotonic()
    base_fd = open_folder(base, [])
    folders = _Folders(base_fd)
    try:
        if not _inside(_fd_path(base_fd, base), real_within):  # swapped for a link since it was checked
            raise InvalidRequest("resolves outside PACSBRIDGE_EXPORT_ROOT (a symbolic link?)", "dest")
        for n, inst in enumerate(instances):
            if cancel is not None and cancel.is_set():
                report.cancelled = True
                break
            _repack_one(inst, folders, tmpl, tags, link, report, transform)
            series_done = n + 1 == len(instances) or instances[n + 1].series_uid != inst.series_uid
            if progress is not None and (series_done or time.monotonic() - last >= PROGRESS_SECONDS):
                progress(report, inst.series_uid if series_done else None)
                last = time.monotonic()
    finally:
        folders.close()
        os.close(base_fd)
    return report


def _fd_path(fd: int, fallback: Path) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return os.path.realpath(fallback)


class _Folders:
    """The descriptor of the folder last placed into (a series shares one), opened by :func:`open_folder`."""

    def __init__(self, base_fd: int) -> None:
        self.base_fd = base_fd
        self.parts: list[str] | None = None
        self.fd = -1

    def get(self, parts: list[str]) -> int:
        if parts != self.parts:
            self.close()
            self.fd = open_folder(self.base_fd, parts)  # no link followed, nothing made outside
            self.parts = parts
        return self.fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
        self.fd, self.parts = -1, None


def _repack_one(inst: Instance, folders: _Folders, tmpl: Template, tags: list[int], link: bool,
                report: RepackReport, transform: Callable[[str], Any] | None = None) -> None:
    """Place one instance, or record why not."""
    try:
        src: Path | bytes = inst.path
        if transform is not None:
            made = transform(str(inst.path))
            if made.data is None:
                report.withheld.append((inst.sop_uid, inst.series_uid, f"{made.action}: {made.reason}"))
                report.count(inst.series_uid, "quarantined")
                return
            src = made.data
            rel = tmpl.render(read_header(made.data, str(inst.path), tags))
        else:
            with open(inst.path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                rel = tmpl.render(read_header(mm, str(inst.path), tags))
        *parts, name = rel.split("/")
        outcome = place(src, folders.get(parts), name, link)
        if outcome == "placed":
            report.placed += 1
        else:
            report.already += 1
        report.count(inst.series_uid, "done")
    except (OSError, ValueError, PacsbridgeError) as exc:
        reason = str(exc) if isinstance(exc, FileExistsError) and exc.args and isinstance(exc.args[0], str) \
            else (getattr(exc, "strerror", None) or str(exc))
        if isinstance(exc, OSError) and getattr(exc, "errno", None) == 18:  # EXDEV
            reason = "cannot hard-link across file systems (use link=false, or an export root on the storage's)"
        report.failed.append((inst.sop_uid, inst.series_uid, reason))
        report.count(inst.series_uid, "failed")


def _series_state(done: int, failed: int, expected: int) -> str:
    if done == expected and not failed:
        return "succeeded"
    if done:
        return "partial"
    return "failed" if failed else "queued"


def run(job: Job, ctx: Context, jobs: JobStore, cancel: threading.Event) -> Outcome:
    """Runner of ``repack`` jobs (see :mod:`pacsbridge.worker.runner`)."""
    params = job.params
    base = destination(ctx.settings.export_root, params.get("dest", ""))
    template = params.get("template") or "px-repack"
    try:
        tmpl = Template(template)
    except ConfigError as exc:
        raise InvalidRequest(str(exc), "template") from None
    link = bool(params.get("link", False))
    project = params.get("project") or ""  # never with link: RepackRequest refuses it (checked by the runner)
    selected = resolve(ctx.index, ctx.storage, params["selection"], jobs)
    by_series = selected.by_series()
    if not selected.instances and not selected.rejected:
        raise InvalidRequest(f"no stored instance matches {describe(params['selection'])}", "selection")
    actor = job.owner or f"job {job.id}"
    target = f"folder {params.get('dest', '')}"
    outgoing = None
    if project:  # the key checked against the secret before anything is written
        outgoing = Outgoing(ProjectStore(ctx.index.engine).open(project, secret(ctx.settings)), actor, "repack",
                            target)
    jobs.set_series(job.id, [SeriesProgress(uid, study_uid=items[0].study_uid, patient_id=items[0].patient_id,
                                            expected=len(items), state="running")
                             for uid, items in by_series.items()])
    written: dict[str, tuple[int, int, int]] = {}

    def progress(report: RepackReport, finished: str | None) -> None:
        for uid, counts in report.per_series.items():
            now = (counts["done"], counts["failed"], counts["quarantined"])
            if written.get(uid) == now and uid != finished:
                continue
            values: dict[str, Any] = {"pushed": now[0], "failed": now[1], "quarantined": now[2]}
            if uid == finished:
                values["state"] = _series_state(now[0], now[1] + now[2], len(by_series[uid]))
                errors = [r for s, u, r in report.failed + report.withheld if u == uid]
                if errors:
                    values["error"] = f"{len(errors)} not placed; first: {errors[0]}"[:2000]
            jobs.update_series(job.id, uid, **values)
            written[uid] = now

    start = time.monotonic()
    try:
        report = repack(selected.instances, base, tmpl, link, cancel=cancel, progress=progress,
                        within=Path(ctx.settings.export_root), transform=outgoing)
    finally:  # what left is in the map and the audit, also when the job stops half-way
        if outgoing is not None:
            outgoing.close()
    if outgoing is None:
        not_placed = {s for s, _, _ in report.failed}
        left = Counter((i.patient_id, i.study_uid) for i in selected.instances if i.sop_uid not in not_placed)
        if left:
            audit_identifiable(ProjectStore(ctx.index.engine), actor, "repack", target, left, left)
    failures = [{"sop": s, "series": u, "error": r} for s, u, r in report.failed]
    failures += [{"sop": s, "series": "", "error": r} for s, r in selected.rejected]
    withheld = [{"sop": s, "series": u, "reason": r} for s, u, r in report.withheld]
    result = {
        "dest": str(base.relative_to(Path(ctx.settings.export_root).absolute())),
        "template": tmpl.source, "link": link, "project": project,
        "selected": len(selected.instances) + len(selected.rejected),
        "placed": report.placed, "already": report.already, "failed": len(failures),
        "failures": failures[:MAX_LISTED], "withheld": len(withheld), "withheld_instances": withheld[:MAX_LISTED],
        "seconds": round(time.monotonic() - start, 3),
    }
    ok = report.placed + report.already
    if report.cancelled:
        return Outcome("cancelled", "cancelled by request", result)
    if not failures and not withheld:
        return Outcome("succeeded", "", result)
    if not failures:
        return Outcome("partial" if ok else "failed",
                       f"{len(withheld)} of {result['selected']} instance(s) withheld by project {project!r}'s "
                       f"risk policy; first: {withheld[0]['reason']}", result)
    message = f"{len(failures)} of {result['selected']} instance(s) not placed; first: {failures[0]['error']}"
    return Outcome("partial" if ok else "failed", message, result)
