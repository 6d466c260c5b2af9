"""Safe storage: file names from templates, atomic writes, duplicate policy.

Every path component that comes from a DICOM value is cleaned by
:func:`clean_component` (Conquest's rules plus: only ``A-Z a-z 0-9 . _ -``,
never empty, never all dots, at most 64 characters with a hash of the
original when shortened), and the final path is checked to lie inside the
storage root after resolving symlinks. No DICOM value can place a file
outside the root.

Writes go to ``<root>/.incoming/`` (same file system), are fsynced when
asked, and are then linked or renamed into place, so a reader never sees a
partial file under its final name, and a crash leaves at most a temporary
file that :meth:`Storage.clean_incoming` removes.

Templates
---------
``{Keyword}`` inserts a DICOM attribute, ``{Keyword:spec}`` formats it
(``{SeriesNumber:04d}`` pads a number, ``{PatientID:.16}`` truncates),
``{Keyword|filter}`` applies ``md5`` (first 8 hex digits of its MD5; ``md5:12``
for more), ``upper``, ``lower`` or ``date`` (digits only). px-repack's
``%Keyword`` and ``%_md5|7_Keyword`` are accepted too. Special fields:
``{time}`` (seconds since the epoch), ``{counter}`` (a per-process counter: the pid, four
digits drawn when the process starts, then the count; pids repeat across containers),
``{uuid}``. ``/`` in the template separates folders.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import itertools
import os
import re
import shutil
import tempfile
import time
import unicodedata
import uuid
from pathlib import Path
from typing import Any, BinaryIO, Iterator, NamedTuple

from pacsbridge.shared.core.errors import ConfigError, StorageError, UnsafePath
from pacsbridge.shared.index.disk import DiskGuard
from pacsbridge.shared.index.journal import JOURNAL, JournalWriter, fault, writer_for

__all__ = [
    "PRESETS",
    "Storage",
    "StoreResult",
    "Template",
    "clean_component",
    "open_folder",
    "INCOMING",
    "QUARANTINE",
    "JOURNAL",
    "OWN_FOLDERS",
]

#: Folder (inside the root) for files being written.
INCOMING = ".incoming"
#: Folder (inside the root) for instances set aside by a UID conflict (:mod:`.quarantine`).
QUARANTINE = ".quarantine"
#: Storage's own folders at the root: never a stored instance (no cleaned name starts with a dot).
#: ``.journal`` holds the arrival journal (:mod:`.journal`).
OWN_FOLDERS = frozenset({INCOMING, QUARANTINE, JOURNAL})
#: Longest cleaned component, and the longest relative path (ObjectFile is varchar(255)).
MAX_COMPONENT = 128
MAX_RELPATH = 255
#: Most folders (components) a template may have: each renders to 13 characters at least.
MAX_DEPTH = 16
#: Folders a :class:`Storage` remembers as made, and as checked to lie inside the root (each set):
#: forgotten all at once past this many (the next store into one makes or checks it again, a few
#: system calls). A receiver makes a folder per series for as long as it runs: remembered without a
#: bound that was about 0.6 kB per series, for ever.
FOLDER_CACHE = 1024

PRESETS = {
    # pacsbridge's default, pacsanini's "patient" sort, Conquest's patient/study/series/SOP tree
    "patient-study-series": "{PatientID}/{StudyInstanceUID}/{SeriesInstanceUID}/{SOPInstanceUID}.dcm",
    # Conquest's study/series/SOP tree, pacsanini's "study" sort
    "study-series": "{StudyInstanceUID}/{SeriesInstanceUID}/{SOPInstanceUID}.dcm",
    # pacsanini's "flat" sort
    "flat": "{SOPInstanceUID}.dcm",
    # Conquest's FileNameSyntax 4 (its default)
    "conquest4": "{PatientID:.16}/{SeriesInstanceUID}_{SeriesNumber:04d}_{InstanceNumber:06d}_{time}{counter}.dcm",
    # pyconquest's layout: one folder per patient, SOP UID as file name
    "pyconquest": "{PatientID}/{SOPInstanceUID}.dcm",
    # px-repack's default tree, for human-friendly copies
    "px-repack": ("{PatientID}-{PatientName|lower}-{PatientBirthDate}/"
                  "{StudyDescription}-{AccessionNumber}-{StudyDate}/"
                  "{SeriesNumber:05d}-{SeriesDescription}-{SeriesInstanceUID|md5:7}/"
                  "{InstanceNumber:04d}-{SOPInstanceUID|md5:7}.dcm"),
}
PRESETS["patient"] = PRESETS["patient-study-series"]
PRESETS["study"] = PRESETS["study-series"]

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}
_FIELD = re.compile(r"\{([^{}]*)\}")
# Python's format-spec mini-language: [[fill]align][sign][z][#][0][width][grouping][.precision][type]
_SPEC = re.compile(r"(?:.?[<>=^])?[-+ ]?z?#?0?(?P<width>[0-9]*)[,_]?(?:\.(?P<precision>[0-9]+))?[a-zA-Z%]?", re.S)
_PX_FIELD = re.compile(r"%(_[a-z0-9]+(?:\|[0-9]+)?_)?([A-Za-z][A-Za-z0-9]*)")
_counter = itertools.count(1)
# Two listener containers on one storage have the same pids (each has its own pid namespace; the
# receiver is pid 2 in both), so the pid alone does not tell their ``{counter}`` values apart and the
# second name would be taken for a duplicate of the first. Four random digits per process do.
_PROCESS_TAG = f"{uuid.uuid4().int % 10_000:04d}"


def clean_component(value: Any, empty: str = "unknown", limit: int = MAX_COMPONENT, suffix: bool = False) -> str:
    """A single safe path component made from a DICOM value.

    Accents are stripped, every character outside ``A-Z a-z 0-9 . _ -`` becomes
    ``_`` (Conquest also replaces ``/ \\ ; > < | , : ? * "`` and spaces), an
    all-dot or empty result becomes ``empty``, leading dots become ``_`` (with a hash:
    a dot name is hidden, and storage's own folders are dot names), Windows device names are
    prefixed, and a result longer than ``limit`` keeps its start and gets an
    8-digit hash of the original so that two long values stay distinct. ``suffix``: the
    literal end of a template's file name (``.dcm``), which follows a value and may start with a dot.
    """
    text = "" if value is None else str(value)
    original = text
    # NFKD leaves ASCII as it is and no ASCII character is combining: the usual value (a UID, an ID)
    # skips the walk over its characters (under cProfile a quarter of the store path's time per instance)
    folded = text if text.isascii() else "".join(
        ch for ch in unicodedata.normalize("NFKD", text) if not unicodedata.combining(ch))
    text = folded.encode("ascii", "ignore").decode("ascii")
    lossy = len(text) != len(folded)  # letters with no ASCII form: keep names distinct by a hash
    text = _UNSAFE.sub("_", text.strip())
    if set(text) <= {"."}:
        text = ""
    elif text.startswith(".") and not suffix:
        # a dot name is hidden (ls, the storage walk): ``../x`` gave ``.._x``; keep it apart from ``__x``
        bare = text.lstrip(".")
        text, lossy = "_" * (len(text) - len(bare)) + bare, True
    if text and lossy:
        text = f"{text}_{hashlib.md5(original.encode('utf-8', 'replace')).hexdigest()[:8]}"
    if not text:
        text = empty if not original.strip() else "_" + hashlib.md5(original.encode("utf-8", "replace")).hexdigest()[:8]
    if text.split(".")[0].upper() in _RESERVED:
        text = "_" + text
    if len(text) > limit:
        digest = hashlib.md5(original.encode("utf-8", "replace")).hexdigest()[:8]
        text = text[: limit - 9].rstrip(".") + "_" + digest
    return text


def _value(ds: Any, keyword: str) -> Any:
    try:
        value = ds.get(keyword) if hasattr(ds, "get") else None
    except Exception:
        value = None
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    if isinstance(value, bytes):
        return ""
    return value


class Template:
    """A file-name template; see the module docstring for its language.

    Everything a template can make is bounded when it is made: a width or a
    precision is at most :data:`MAX_COMPONENT`, the literal text of a folder
    too, a template has at most :data:`MAX_DEPTH` folders, and it is rendered
    once (with empty values) so that a format that cannot apply (``{PatientID:,}``,
    ``{X|md5:x}``) is refused now, not at the first store.

    Raises
    ------
    ConfigError
        The template is empty, absolute, has a ``..`` folder, or one of the above.
    """

    def __init__(self, template: str) -> None:
        source = PRESETS.get(template, template)
        source = _PX_FIELD.sub(self._from_px, source) if "%" in source else source
        if not source.strip() or source.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", source):
            raise ConfigError(f"file name template {template!r}: must be a relative path")
        parts = source.split("/")
        if any(p in ("", ".", "..") for p in parts):
            raise ConfigError(f"file name template {template!r}: empty, '.' or '..' folder")
        if len(parts) > MAX_DEPTH:
            raise ConfigError(f"file name template {template[:80]!r}: {len(parts)} folders (at most {MAX_DEPTH})")
        self.source = source
        self.name = template
        self.parts = parts
        for part in parts:  # validate fields now, not at the first store
            if len(_FIELD.sub("", part)) > MAX_COMPONENT:
                raise ConfigError(f"file name template {template[:80]!r}: more than {MAX_COMPONENT} characters "
                                  "of text in one folder or file name")
            for m in _FIELD.finditer(part):
                self._parse_field(m.group(1))
        try:
            rel = self.render({})
        except ValueError as exc:  # an int() or format() the spec checks above did not foresee
            raise ConfigError(f"file name template {template[:80]!r}: {exc}") from None
        if len(rel) > MAX_RELPATH:
            raise ConfigError(f"file name template {template[:80]!r}: renders longer than {MAX_RELPATH} "
                              "characters even with empty values")

    @staticmethod
    def _from_px(m: re.Match[str]) -> str:
        func, keyword = m.group(1), m.group(2)
        if not func:
            return "{%s}" % keyword
        name, _, arg = func.strip("_").partition("|")
        if name == "md5":
            return "{%s|md5:%s}" % (keyword, arg or "8")
        if name in ("upper", "lower"):
            return "{%s|%s}" % (keyword, name)
        raise ConfigError(f"template function %{func}: unknown (use md5, upper, lower)")

    @staticmethod
    @functools.lru_cache(maxsize=256)
    def _parse_field(field: str) -> tuple[str, str, tuple[str, ...]]:
        """``(keyword, format spec, filters)`` of a template field; checked once per field text (a template
        renders the same few fields for every instance; the answer is a pure function of the text)."""
        body, *filters = field.split("|")
        keyword, _, spec = body.partition(":")
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9]*", keyword or "-"):
            raise ConfigError(f"template field {{{field}}}: {keyword!r} is not a DICOM keyword")
        for f in filters:
            name, colon, arg = f.partition(":")
            if name not in ("md5", "upper", "lower", "date"):
                raise ConfigError(f"template field {{{field}}}: unknown filter {f!r}")
            if colon and (name != "md5" or not arg.isdigit() or not 1 <= int(arg) <= 32):
                raise ConfigError(f"template field {{{field}}}: {f!r}: only md5 takes a length (1 to 32)")
        if spec:
            m = _SPEC.fullmatch(spec)
            if m is None:
                raise ConfigError(f"template field {{{field}}}: {spec!r} is not a format spec")
            for what in ("width", "precision"):
                if m.group(what) and int(m.group(what)) > MAX_COMPONENT:
                    raise ConfigError(f"template field {{{field}}}: {what} {int(m.group(what))} is more than "
                                      f"{MAX_COMPONENT} (the longest name storage writes)")
        return keyword, spec, tuple(filters)

    def _render_field(self, field: str, ds: Any) -> str:
        keyword, spec, filters = self._parse_field(field)
        if keyword == "time":
            value: Any = int(time.time())
        elif keyword == "counter":
            value = f"{os.getpid()}{_PROCESS_TAG}{next(_counter):06d}"
        elif keyword == "uuid":
            value = uuid.uuid4().hex
        else:
            value = _value(ds, keyword)
        for f in filters:
            name, _, arg = f.partition(":")
            if name == "md5":
                value = hashlib.md5(str(value).encode("utf-8", "replace")).hexdigest()[: int(arg or 8)]
            elif name == "upper":
                value = str(value).upper()
            elif name == "lower":
                value = str(value).lower()
            elif name == "date":
                value = "".join(ch for ch in str(value) if ch.isdigit())
        if spec:
            if spec[-1:] in ("d", "x", "X"):
                try:
                    value = int(float(str(value).strip() or 0))
                except ValueError:
                    value = 0
            else:
                value = str(value)
            try:
                value = format(value, spec)
            except ValueError as exc:
                raise ConfigError(f"template field {{{field}}}: {exc}") from None
        return str(value)

    def keywords(self) -> list[str]:
        """The DICOM keywords this template reads."""
        out = []
        for part in self.parts:
            for m in _FIELD.finditer(part):
                keyword = self._parse_field(m.group(1))[0]
                if keyword not in ("time", "counter", "uuid"):
                    out.append(keyword)
        return out

    def render(self, ds: Any) -> str:
        """The relative path (``/``-separated) for a data set; every component is cleaned."""
        rendered = []
        for part in self.parts:
            # a literal suffix after the last field (".dcm") survives shortening
            tail = part[part.rindex("}") + 1:] if "}" in part else ""
            body = part[: len(part) - len(tail)]
            text = _FIELD.sub(lambda m: self._render_field(m.group(1), ds).replace("/", "_"), body)
            rendered.append((text, clean_component(tail, empty="", suffix=True) if tail else ""))
        limit = MAX_COMPONENT
        while True:
            out = [clean_component(text, limit=max(12, limit - len(tail))) + tail for text, tail in rendered]
            rel = "/".join(out)
            if len(rel) <= MAX_RELPATH or limit <= 12:
                return rel
            limit -= 8  # shorten every component (each keeps a hash of its value) until it fits


_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)


def open_folder(base: int | str | Path, parts: "list[str] | tuple[str, ...]", create: bool = True) -> int:
    """A descriptor of the folder ``base/parts[0]/parts[1]/...``, made where missing, links never followed.

    Each component is made (``mkdir`` at a name that exists, even as a link, makes
    nothing) and opened relative to its parent's descriptor with ``O_NOFOLLOW``, so a
    symbolic link anywhere below ``base`` can neither lead a folder outside nor be
    swapped in between the check and the use. ``base`` itself (a descriptor or a
    path) is trusted: the caller checked it. The caller closes the descriptor.

    Raises
    ------
    UnsafePath
        A component is a symbolic link, not a folder, or ``.``/``..``/empty.
    OSError
        A folder cannot be made (permissions, disk full...).
    """
    fd = os.dup(base) if isinstance(base, int) else os.open(base, _DIR_FLAGS)
    try:
        for i, name in enumerate(parts):
            if name in ("", ".", "..") or "/" in name or "\x00" in name:
                raise UnsafePath(f"{'/'.join(parts[:i + 1])!r}: not a plain folder name")
            if create:
                try:
                    os.mkdir(name, 0o777, dir_fd=fd)
                except FileExistsError:
                    pass
            try:
                child = os.open(name, _DIR_FLAGS | getattr(os, "O_NOFOLLOW", 0), dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise UnsafePath(f"{'/'.join(parts[:i + 1])}: a symbolic link or not a folder "
                                     "(links are not followed)") from None
                raise
            os.close(fd)
            fd = child
        return fd
    except BaseException:
        os.close(fd)
        raise


class StoreResult(NamedTuple):
    """What :meth:`Storage.store` did."""

    relpath: str  #: path relative to the root, ``/``-separated (Conquest's ObjectFile)
    action: str  #: ``stored``, ``replaced``, ``duplicate`` (kept the existing file) or ``kept-both``
    size: int


class Storage:
    """The storage root (Conquest's MAG0 device).

    Parameters
    ----------
    root : Path
        Created if missing.
    template : str
        A preset name (:data:`PRESETS`) or a template.
    duplicates : str
        ``keep`` (default: the first copy stays, later ones are discarded),
        ``replace`` (the newest copy wins) or ``keep-both``.
    fsync : bool
        fsync each file and its folder before reporting it stored.
    drop_cache : bool
        Once a file is fsynced, tell the kernel its pages need not stay cached
        (``POSIX_FADV_DONTNEED``): see :meth:`settle`. Ignored without fsync.
    min_free : str
        The free-space watermark (:mod:`.disk`): below it :meth:`store` and :meth:`link_into_place`
        raise :class:`~.disk.DiskLow` before writing. ``"0"`` (the default in code): off.
    """

    def __init__(self, root: Path | str, template: str = "patient-study-series", duplicates: str = "keep",
                 fsync: bool = True, drop_cache: bool = False, min_free: str = "0") -> None:
        if duplicates not in ("keep", "replace", "keep-both"):
            raise ConfigError(f"duplicates policy {duplicates!r}: use keep, replace or keep-both")
        self.root = Path(root).absolute()
        self.template = Template(template)
        self.duplicates = duplicates
        self.fsync = fsync
        self.drop_cache = drop_cache and fsync and hasattr(os, "posix_fadvise")
        self.incoming = self.root / INCOMING
        self._made: set[Path] = set()
        self._safe_dirs: set[Path] = set()
        self.journal: JournalWriter | None = None
        self.guard = DiskGuard(self.root, min_free)

    def enable_journal(self) -> "Storage":
        """Record every instance this storage stores in the arrival journal (:mod:`.journal`) before
        it is linked into place, durably before the store returns. For the processes whose stores
        nothing else remembers until they are indexed: the listener's receivers, a C-GET retrieve."""
        self.journal = writer_for(self.root, self.fsync)
        return self

    @classmethod
    def for_settings(cls, settings: Any) -> "Storage":
        """The storage of an installation (:class:`~pacsbridge.shared.core.config.Settings`)."""
        return cls(settings.storage, settings.filename_template, settings.duplicates, settings.fsync,
                   settings.drop_cache, settings.disk_min_free)

    def ensure(self) -> None:
        """Create the root and its incoming folder."""
        try:
            self.incoming.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create storage root {self.root}: {exc.strerror}") from None
        self._real_root = Path(os.path.realpath(self.root))

    def path_for(self, ds: Any) -> str:
        """The relative path the template gives ``ds``."""
        return self.template.render(ds)

    def absolute(self, relpath: str) -> Path:
        """Absolute path of a relative one, checked to be inside the root.

        Raises
        ------
        UnsafePath
            ``relpath`` is absolute, has ``..``, or resolves outside the root.
        """
        if not relpath or relpath.startswith(("/", "\\")) or "\x00" in relpath:
            raise UnsafePath(f"{relpath!r}: not a relative path")
        parts = relpath.replace("\\", "/").split("/")
        if any(p in ("", ".", "..") for p in parts):
            raise UnsafePath(f"{relpath!r}: empty, '.' or '..' component")
        path = self.root.joinpath(*parts)
        if path.parent in self._safe_dirs:
            return path
        real_root = getattr(self, "_real_root", None) or Path(os.path.realpath(self.root))
        real = Path(os.path.realpath(path))
        if real != real_root and real_root not in real.parents:
            raise UnsafePath(f"{relpath!r} resolves outside the storage root")
        if path.parent.is_dir():
            # the folder is checked once; a link at the file name itself is never followed
            # (os.link fails on an existing name, os.replace replaces the link)
            if len(self._safe_dirs) >= FOLDER_CACHE:
                self._safe_dirs.clear()
            self._safe_dirs.add(path.parent)
        return path

    def _mkdirs(self, folder: Path) -> None:
        if folder in self._made:
            return
        folder.mkdir(parents=True, exist_ok=True)
        if len(self._made) >= FOLDER_CACHE:
            self._made.clear()
        self._made.add(folder)

    def temp_file(self) -> tuple[int, str]:
        """A new temporary file in the incoming folder: ``(fd, path)``."""
        if not self.incoming.is_dir():
            self.ensure()
        return tempfile.mkstemp(prefix="in-", suffix=".part", dir=self.incoming)

    def settle(self, fd: int) -> None:
        """Make a complete file's data durable (when ``fsync``), then let its pages go.

        An instance is written once and read again only by the indexer (its header)
        and later jobs. Without the drop, every received byte also takes a fresh page of
        the page cache until memory is full, and on this project's VMs (free page
        reporting on: most likely a host-side fault per page) a page the cache never
        used was slow to fill: 1.3-1.5 ms of kernel time per 0.5 MB write while the
        cache grew, 0.1 ms with the pages dropped. Only clean
        pages are dropped (after fsync), so nothing is lost and the file reads back as
        written (from disk).
        """
        if not self.fsync:
            return
        os.fsync(fd)
        if self.drop_cache:
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            except OSError:  # advice only
                pass

    def _sync_dir(self, folder: Path) -> None:
        if not self.fsync:
            return
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def store(self, source: BinaryIO | bytes | Path | str, ds: Any, relpath: str | None = None) -> StoreResult:
        """Write an instance durably into storage.

        Parameters
        ----------
        source : file object, bytes or path
            The encoded instance, written as it is (no transcoding).
        ds : Dataset
            Its header, for the template.
        relpath : str, optional
            Use this path instead of the template's.

        Raises
        ------
        StorageError
            The disk is full or read-only, etc. No partial file is left behind.
        DiskLow
            Free space is below the watermark (a :class:`StorageError`): nothing was written.
        UnsafePath
            The path would leave the root (cannot happen with a template).
        """
        rel = relpath or self.path_for(ds)
        final = self.absolute(rel)
        if self.duplicates == "keep" and os.path.lexists(final):
            # the first copy stays: nothing to write, fsync and unlink again (a retrieve of studies
            # already held did all three per instance, and each freed inode slows later creates on
            # ext4 without a journal)
            return StoreResult(rel, "duplicate", _size_of(source))
        self.guard.require()
        fd, tmp = -1, ""
        try:
            fd, tmp = self.temp_file()
            with os.fdopen(fd, "wb") as out:
                fd = -1
                if isinstance(source, (str, Path)):
                    with open(source, "rb") as src:
                        shutil.copyfileobj(src, out, 1 << 20)
                elif hasattr(source, "read") and not hasattr(source, "madvise"):
                    shutil.copyfileobj(source, out, 1 << 20)
                else:
                    out.write(source)  # type: ignore[arg-type]  # bytes, memoryview, mmap
                out.flush()
                self.settle(out.fileno())
                size = out.tell()
            return self.commit(tmp, rel, final, size, _sop_of(ds))
        except OSError as exc:
            if tmp:
                _unlink_quietly(tmp)
            raise StorageError(f"cannot store {rel}: {exc.strerror or exc}") from None
        finally:
            if fd >= 0:
                os.close(fd)

    def commit(self, tmp: str, rel: str, final: Path | None = None, size: int | None = None,
               sop: str = "") -> StoreResult:
        """Move a complete temporary file (already fsynced if wanted) to ``rel``.

        Applies the duplicate policy. The temporary file is gone afterwards. With the journal on,
        its line (``sop``: the instance's SOP Instance UID) is written before the link (see
        :mod:`.journal` for what a crash in between leaves, and why the line is not fdatasynced here).
        """
        try:
            final = final or self.absolute(rel)
            if size is None:
                size = os.path.getsize(tmp)
            token = None
            if self.journal is not None:
                fault("before-journal")
                token = self.journal.record(rel, sop)
                fault("after-journal")
            try:
                self._mkdirs(final.parent)
                placed, final, action = self._place(tmp, rel, final)
            except FileNotFoundError:
                # the folder was removed by someone since we made it: make it again, once
                self._made.discard(final.parent)
                self._mkdirs(final.parent)
                placed, final, action = self._place(tmp, rel, final)
            if placed != rel and self.journal is not None:  # keep-both: under another name
                token = self.journal.record(placed, sop)
            rel = placed
            if token is not None:
                fault("after-link")
            if action != "duplicate":
                self._sync_dir(final.parent)
            if token is not None:
                fault("after-sync")
        finally:
            _unlink_quietly(tmp)
        if action != "duplicate":
            self.guard.spent(size)
        return StoreResult(rel, action, size)

    def _place(self, tmp: str, rel: str, final: Path) -> tuple[str, Path, str]:
        """Give ``tmp`` the name ``final`` following the duplicate policy: ``(rel, final, action)``."""
        if self.duplicates == "replace":
            action = "replaced" if final.exists() else "stored"
            os.replace(tmp, final)
            return rel, final, action
        try:
            os.link(tmp, final)  # fails if it exists: no clobbering, atomic
            return rel, final, "stored"
        except FileExistsError:
            if self.duplicates == "keep":
                return rel, final, "duplicate"
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EXDEV, errno.EMLINK, errno.ENOTSUP):
                raise
            # a file system without hard links: check, then rename (not atomic against a
            # concurrent writer of the same instance, which then wins)
            if final.exists() and self.duplicates == "keep":
                return rel, final, "duplicate"
            os.replace(tmp, final)
            return rel, final, "stored"
        stem, suffix = os.path.splitext(final.name)  # keep-both: the first free name_N
        for n in itertools.count(1):
            candidate = final.with_name(f"{stem}_{n}{suffix}")
            try:
                os.link(tmp, candidate)
                break
            except FileExistsError:
                continue
        rel = rel.rsplit("/", 1)[0] + "/" + candidate.name if "/" in rel else candidate.name
        return rel, candidate, "kept-both"

    def link_into_place(self, tmp: str, rel: str, size: int | None = None, sop: str = "") -> StoreResult:
        """Put a complete file written by someone else (pynetdicom) at ``rel``.

        The file is hard-linked, so its writer may still delete its own name;
        the duplicate policy applies as in :meth:`store`, and so does the watermark (refused, the
        temporary file is gone too, as after :meth:`commit`).
        """
        try:
            self.guard.require()
        except StorageError:
            _unlink_quietly(tmp)
            raise
        return self.commit(tmp, rel, self.absolute(rel), size, sop)

    def clean_incoming(self, older_than: float = 0.0) -> int:
        """Remove temporary files left by a crash; returns how many."""
        n = 0
        if not self.incoming.is_dir():
            return 0
        cutoff = time.time() - older_than
        for entry in os.scandir(self.incoming):
            try:
                if entry.is_file() and entry.stat().st_mtime <= cutoff:
                    os.unlink(entry.path)
                    n += 1
            except OSError:
                pass
        return n

    def walk(self) -> "list[str]":
        """Every file under the root (relative, ``/``-separated) but those in storage's own folders
        (:data:`OWN_FOLDERS`: ``.incoming``, ``.quarantine``, ``.journal``). Other dot names are walked: storage
        wrote them before names were kept from starting with a dot. A list: see :meth:`iter_files`
        for a walk that does not hold the whole tree."""
        return list(self.iter_files())

    def iter_files(self, after: str | None = None) -> "Iterator[str]":
        """The files of :meth:`walk`, one at a time, in the same order: in each folder its files
        (sorted), then its sub-folders (sorted), each walked in turn (``os.walk``'s order).

        Only one folder's listing is held at a time, so memory follows the largest folder, not
        the archive (``rebuild`` walks 20 M files this way). With ``after`` (a path this walk
        yielded before), the walk starts just past it, without listing the folders before it:
        ``rebuild`` resumes from its checkpoint so. A symbolic link to a folder is not followed.
        """
        start = after.split("/") if after else None
        yield from self._iter_folder(str(self.root), "", start)

    def _iter_folder(self, folder: str, prefix: str, start: "list[str] | None") -> "Iterator[str]":
        """One folder of :meth:`iter_files`; ``start``: the rest of ``after`` below this folder."""
        files, dirs = [], []
        try:
            with os.scandir(folder) as it:
                for entry in it:
                    try:
                        is_dir = entry.is_dir()
                    except OSError:
                        is_dir = False
                    if not is_dir:
                        files.append(entry.name)
                    elif not entry.is_symlink() and not (prefix == "" and entry.name in OWN_FOLDERS):
                        dirs.append(entry.name)
        except OSError:  # gone or unreadable since it was listed: os.walk skips it too
            return
        if start is None or len(start) == 1:
            first = start[0] if start else None
            for name in sorted(files):
                if first is None or name > first:
                    yield prefix + name
            below: "dict[str, list[str] | None]" = {}
        else:  # ``after`` lies in a sub-folder: this folder's files came before it
            below = {start[0]: start[1:]}
        for name in sorted(dirs):
            if start is not None and len(start) > 1 and name < start[0]:
                continue
            yield from self._iter_folder(os.path.join(folder, name), f"{prefix}{name}/", below.get(name))

    def walk_changed(self, since: float) -> "list[str]":
        """The files linked into storage at or after ``since`` (seconds since the epoch), as
        :meth:`walk` names them: every folder is listed (no file is stat'ed in a folder not modified
        since), and a file counts when its inode changed since (``link`` sets its ctime). For the
        reconciler after an operating-system crash (:mod:`.journal`): its memory follows what
        changed, not what storage holds."""
        out: list[str] = []
        root = str(self.root)
        stack = [("", root)]
        while stack:
            rel, folder = stack.pop()
            try:
                changed = os.stat(folder).st_mtime >= since
                entries = list(os.scandir(folder))
            except OSError:
                continue
            for entry in entries:
                name = entry.name if not rel else f"{rel}/{entry.name}"
                try:
                    if entry.is_dir(follow_symlinks=False):
                        if rel or entry.name not in OWN_FOLDERS:
                            stack.append((name, entry.path))
                    elif changed and entry.is_file(follow_symlinks=False) and \
                            entry.stat(follow_symlinks=False).st_ctime >= since:
                        out.append(name)
                except OSError:
                    continue
        return sorted(out)


def _sop_of(ds: Any) -> str:
    """The SOP Instance UID of a header (:func:`~.records.read_header`) or a data set, or ``""``."""
    try:
        sop = getattr(ds, "sop_instance_uid", None) or (ds.get("SOPInstanceUID") if hasattr(ds, "get") else None)
    except Exception:
        return ""
    return str(sop or "")


def _size_of(source: Any) -> int:
    """Bytes in a source of :meth:`Storage.store` (-1 for a file object, which is not read)."""
    if isinstance(source, (str, Path)):
        try:
            return os.path.getsize(source)
        except OSError:
            return -1
    try:
        return len(source)
    except TypeError:
        return -1


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass

