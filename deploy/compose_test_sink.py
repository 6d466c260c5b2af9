#!/usr/bin/env python3
"""A C-STORE SCP that writes down what it saw, for ``deploy/compose_test.py`` (the scale-out checks).

It runs in a container of the test's compose project (the pacsbridge image has pynetdicom) as the
node ``SINK`` that the workers push to. Every event is one JSON line on stdout, read back by the
test with ``podman logs``:

- ``{"ev": "est", "a": N, "t": ..., "peer": "10.89.0.7"}`` an association was established;
- ``{"ev": "store", "a": N, "t": ..., "sop": "1.2..."}`` a C-STORE request came (answered: success);
- ``{"ev": "end", "a": N, "t": ...}`` it was released or aborted.

The test holds the node's limits from these lines: with ``max_associations`` 1 no association may be
established before the previous one's last store came (the pushing worker still holds its slot
then), whichever worker container the association came from (``peer``).
Nothing is written to disk: only the SOP Instance UIDs matter here.
"""

from __future__ import annotations

import itertools
import json
import sys
import threading
import time

from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

_ids = itertools.count(1)
_lock = threading.Lock()
_names: dict[int, int] = {}  # id(assoc) -> N


def _say(**fields: object) -> None:
    with _lock:
        sys.stdout.write(json.dumps(fields) + "\n")
        sys.stdout.flush()


def _number(assoc: object) -> int:
    with _lock:
        return _names.setdefault(id(assoc), next(_ids))


def on_established(event: evt.Event) -> None:
    _say(ev="est", a=_number(event.assoc), t=time.time(), peer=event.assoc.requestor.address)


def on_store(event: evt.Event) -> int:
    sop = str(event.request.AffectedSOPInstanceUID)
    _say(ev="store", a=_number(event.assoc), t=time.time(), sop=sop)
    return 0x0000


def on_end(event: evt.Event) -> None:
    _say(ev="end", a=_number(event.assoc), t=time.time())


def main() -> int:
    ae = AE(ae_title="SINK")
    ae.supported_contexts = AllStoragePresentationContexts
    ae.add_supported_context(Verification)
    ae.maximum_associations = 16  # room to see a limit broken, if it were
    handlers = [(evt.EVT_ESTABLISHED, on_established), (evt.EVT_C_STORE, on_store),
                (evt.EVT_RELEASED, on_end), (evt.EVT_ABORTED, on_end)]
    _say(ev="ready", t=time.time())
    ae.start_server(("0.0.0.0", 11112), block=True, evt_handlers=handlers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
