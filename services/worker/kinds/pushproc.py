"""A push sender in its own process: one association at a time, files in on stdin, outcomes out on stdout.

``python -m pacsbridge.worker.kinds.pushproc`` is started by
:class:`pacsbridge.worker.kinds.push._ProcSender` (with ``subprocess``, so it works
from Celery's daemonic prefork children, where ``multiprocessing`` cannot
start processes). Associations in one process share its GIL; in separate
processes parallel associations use every core.

Protocol, one JSON document per line:

* stdin, first line: ``{"node": {"name", "ae_title", "host", "port"},
  "calling_ae": str, "contexts": [[sop_class, [transfer_syntax, ...]], ...]}``;
  then one line per file: ``[n, path, sop_class, transfer_syntax, sop_uid,
  series_uid, object_file]``; end of input: no more files.
* stdout: ``{"assoc": 1}`` when an association is established, ``{"n": n,
  "ok": bool, "status": int|null, "error": str, "fallback": bool}`` per file
  (in order), ``{"error": str}`` when an association could not be opened.

The process sends what it reads, in order, reopening an association that
was aborted (twice in a row unable to: it stops reading and exits). A file
read but not reported is the parent's to report: the process died.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import IO, Any

from pynetdicom.presentation import build_context

from pacsbridge.worker.kinds import push
from pacsbridge.shared.core.errors import DimseError
from pacsbridge.shared.dicom.compat import send_files_as_stored
from pacsbridge.shared.dicom.node import Node
from pacsbridge.worker.selection import Instance


def _reader(stream: IO[str]) -> Any:
    for line in stream:
        line = line.strip()
        if line:
            yield json.loads(line)


def main(stdin: IO[str] = sys.stdin, stdout: IO[str] = sys.stdout) -> int:
    lines = _reader(stdin)
    head = next(lines, None)
    if head is None:
        return 0
    n = head["node"]
    node = Node(n["name"], n["ae_title"], n["host"], int(n["port"]))
    contexts = [build_context(sop_class, list(syntaxes)) for sop_class, syntaxes in head["contexts"]]
    send_files_as_stored()

    def say(doc: dict[str, Any]) -> None:
        stdout.write(json.dumps(doc) + "\n")
        stdout.flush()

    def next_file() -> tuple[int, push._File] | None:
        item = next(lines, None)
        if item is None:
            return None
        k, path, sop_class, ts, sop, series, obj = item
        inst = Instance(sop, series, "", Path(path), obj, "MAG0", sop_class)
        return int(k), push._File(inst, sop_class, ts)

    pending = next_file()

    def take() -> push._File | None:
        return pending[1] if pending is not None else None

    def done(f: push._File, sent: push.Sent) -> None:
        nonlocal pending
        if pending is not None:  # the file take() gave
            say({"n": pending[0], "ok": sent.ok, "status": sent.status, "error": sent.error,
                 "fallback": sent.fallback})
        pending = next_file()

    failures = 0
    while pending is not None and failures < 2:
        try:
            with push.associate(node, head["calling_ae"], contexts, timeout=push.TIMEOUT,
                                evt_handlers=push._HANDLERS) as assoc:
                failures = 0
                say({"assoc": 1})
                push.send_files(assoc, node, take, done)
        except DimseError as exc:
            failures += 1
            say({"error": str(exc)})
            if failures < 2:
                time.sleep(1.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
