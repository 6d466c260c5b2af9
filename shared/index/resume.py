"""Where an interrupted ``rebuild`` stopped, so that running it again goes on from there.

``rebuild`` walks storage in one fixed order (:meth:`Storage.iter_files`) and writes the index in
batches, in that order. After each batch is committed it writes a checkpoint: the last path of
that batch and how many files were done. A rebuild interrupted anywhere (Ctrl-C, ``kill -9``, a
power loss) leaves a checkpoint naming a batch that is in the index; the next ``rebuild`` starts
just past it, and deletes the checkpoint when it reaches the end. ``--restart`` ignores it.

The checkpoint is a small JSON file in storage's own ``.journal`` folder (never walked, never a
stored instance), named after the index database (its URL, password left out), so that a
rebuild into another database does not resume this one. It is written to a temporary name,
fsynced and renamed over the old one: it is either the old or the new checkpoint, never torn.
A checkpoint of another kind of run (``--missing`` or not) is not used: the run starts from the
beginning, says so, and its own checkpoints replace it.

The checkpoint is written just after its batch's commit, not in the same transaction: a crash
between the two (a few milliseconds per batch) makes the next run read that one batch again.
Writing it is an upsert keyed on the SOP Instance UID, so the index ends the same: every file
indexed once, none skipped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, NamedTuple

from pacsbridge.shared.index.journal import JOURNAL

__all__ = ["Checkpoint", "Resume"]

log = logging.getLogger(__name__)


class Resume(NamedTuple):
    """What an interrupted run had done: the last path committed (walk order) and how many files."""

    after: str
    done: int


class Checkpoint:
    """The checkpoint file of the rebuilds of one storage root into one index database.

    Parameters
    ----------
    root : path
        The storage root.
    database : str
        The index database's URL without its password (only its digest names the file).
    missing : bool
        The kind of run (``rebuild --missing``): a checkpoint of the other kind is not used.
    """

    def __init__(self, root: Path | str, database: str, missing: bool) -> None:
        digest = hashlib.blake2b(database.encode(), digest_size=8).hexdigest()
        self.folder = Path(root) / JOURNAL
        self.path = self.folder / f"rebuild-{digest}.json"
        self.missing = missing
        self.started_at = time.time()

    def load(self) -> Resume | None:
        """Where the last run stopped, or None (no checkpoint, another kind of run, unreadable)."""
        try:
            data: dict[str, Any] = json.loads(self.path.read_text("utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("rebuild checkpoint %s unreadable (%s): starting from the beginning", self.path, exc)
            return None
        if bool(data.get("missing")) != self.missing:
            log.warning("the interrupted rebuild was %s --missing: this one starts from the beginning",
                        "with" if data.get("missing") else "without")
            return None
        after, done = data.get("after"), data.get("done")
        if not isinstance(after, str) or not after or not isinstance(done, int):
            return None
        self.started_at = float(data.get("started_at") or self.started_at)
        return Resume(after, done)

    def save(self, after: str, done: int) -> None:
        """Record that every file up to ``after`` (walk order) is done: ``done`` files in all."""
        self.folder.mkdir(parents=True, exist_ok=True)
        body = json.dumps({"after": after, "done": done, "missing": self.missing,
                           "started_at": self.started_at, "saved_at": time.time()})
        tmp = self.folder / f".{self.path.name}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, body.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        dfd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def clear(self) -> None:
        """The rebuild reached the end: the next one starts from the beginning."""
        self.path.unlink(missing_ok=True)
