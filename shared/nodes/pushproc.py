"""A push sender in its own process: one association at a time, files in on stdin, outcomes out on stdout.

``python -m pacsbridge.shared.nodes.pushproc`` is started by
:class:`pacsbridge.shared.nodes.pusher._ProcSender` (with ``subprocess``, so it works
from Celery's daemonic prefork children, where ``multiprocessing`` cannot
start processes). Associations in one process share its GIL; in separate
processes parallel associations use every core.

Protocol, one JSON document per line:

* stdin, first line: ``{"node": {"name", "ae_title", "host", "port"},
  "calling_ae": str, "contexts": [[sop_class, [transfer_syntax, ...]], ...]}``;
  then one line per file: ``[n, path, sop_class, transfer_syntax, sop_uid,
  series_uid, object_file]``; end of input: no more files.
* stdout: ``{"assoc": 1}`` when an association is established, ``{"n": n,
  "ok": bool, "status": int|null, "error": str, "fallback": bool, "withheld": str, "risk": str}``
  per file (in order), ``{"error": str}`` when an association could not be opened.

A de-identified push (the head has ``"deid"``: :meth:`pacsbridge.shared.deid.outgoing.Outgoing.child_spec`)
de-identifies here, so that the engine's CPU is not the job process's GIL: the process asks
``{"patient": [issuer, patient_id]}`` once per patient and waits for the parent's
``{"patient": [pseudonym, offset]}`` on stdin (the map is the parent's, in the database), reports
``{"made": n, "original": [...], "sent": bool, "action": str, "uids": {...}, "pseudonym": str}``
before sending each file (so the map gets every UID that may have left), and the parent ends the input
with ``{"end": 1}`` instead of closing it (it may still have to answer).

The process sends what it reads, in order, reopening an association that
was aborted (twice in a row unable to: it stops reading and exits). A file
read but not reported is the parent's to report: the process died.
"""

from __future__ import annotations

import json
import sys
import time
from collections import deque
from pathlib import Path
from typing import IO, Any

from pynetdicom.presentation import build_context

from pacsbridge.shared.deid.keys import Patient
from pacsbridge.shared.deid.outgoing import child_profile
from pacsbridge.shared.deid.profile import Deidentified, DeidentifyError

from pacsbridge.shared.nodes import pusher as push
from pacsbridge.shared.core.errors import DimseError
from pacsbridge.shared.dicom.compat import send_files_as_stored
from pacsbridge.shared.dicom.node import Node
from pacsbridge.shared.index.instance import Instance


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
    queued: deque[Any] = deque()  # file lines read while waiting for a patient

    def say(doc: dict[str, Any]) -> None:
        stdout.write(json.dumps(doc) + "\n")
        stdout.flush()

    def next_file() -> tuple[int, push._File] | None:
        item = queued.popleft() if queued else next(lines, None)
        if item is None or isinstance(item, dict):  # {"end": 1}: no more files
            return None
        k, path, sop_class, ts, sop, series, obj = item
        inst = Instance(sop, series, "", Path(path), obj, "MAG0", sop_class)
        return int(k), push._File(inst, sop_class, ts)

    pending = next_file()
    transform: push.Transform | None = None
    if head.get("deid"):
        def ask(issuer: str, patient_id: str) -> Patient:
            say({"patient": [issuer, patient_id]})
            for item in lines:
                if isinstance(item, dict) and "patient" in item:
                    pseudonym, offset = item["patient"]
                    return Patient(pseudonym, int(offset))
                queued.append(item)
            raise DeidentifyError("the parent gave no pseudonym (it stopped)")

        profile = child_profile(head["deid"], ask)

        def deidentify(path: str) -> Deidentified:
            made = profile.apply(path)
            # reported before the send: a file the node has is in the map even if we die right after
            say({"made": pending[0] if pending is not None else 0, "original": list(made.original),
                 "sent": made.data is not None, "action": made.action, "uids": made.uids,
                 "pseudonym": made.patient.pseudonym})
            return made

        transform = deidentify

    def take() -> push._File | None:
        return pending[1] if pending is not None else None

    def done(f: push._File, sent: push.Sent) -> None:
        nonlocal pending
        if pending is not None:  # the file take() gave
            say({"n": pending[0], "ok": sent.ok, "status": sent.status, "error": sent.error,
                 "fallback": sent.fallback, "withheld": sent.withheld, "risk": sent.risk})
        pending = next_file()

    failures = 0
    while pending is not None and failures < 2:
        try:
            with push.associate(node, head["calling_ae"], contexts, timeout=push.TIMEOUT,
                                evt_handlers=push._HANDLERS) as assoc:
                failures = 0
                say({"assoc": 1})
                push.send_files(assoc, node, take, done, transform)
        except DimseError as exc:
            failures += 1
            say({"error": str(exc)})
            if failures < 2:
                time.sleep(1.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
