"""Which searcher asks a node: C-FIND or QIDO-RS.

A node that speaks DICOMweb is searched with QIDO-RS when it speaks nothing else, or when its ``prefer``
puts a DICOMweb retrieve (``wado-rs``, ``wado-uri``) before the DIMSE ones: a job then talks to one
protocol from query to download. A DIMSE node, or one that prefers C-GET / C-MOVE, is searched with C-FIND.
"""

from __future__ import annotations

import threading
from typing import Any

from pacsbridge.shared.dicom.node import Node
from pacsbridge.shared.nodes.sources import DimseSearcher, Searcher
from pacsbridge.shared.nodes.throttle import NodeSlots

__all__ = ["searcher_for", "uses_qido"]


def uses_qido(node: Node) -> bool:
    """True when ``node`` is searched over QIDO-RS (see the module docstring)."""
    if not node.has_web:
        return False
    if not node.has_dimse:
        return True
    usable = node.preferences()
    return bool(usable) and usable[0] in ("wado-rs", "wado-uri")


def searcher_for(node: Node, calling_ae: str, slots: NodeSlots | None = None,
                 cancel: threading.Event | None = None, settings: Any = None) -> Searcher:
    """The searcher of ``node``: a :class:`~pacsbridge.shared.nodes.dicomweb.QidoSearcher` or a
    :class:`~pacsbridge.shared.nodes.sources.DimseSearcher` (``calling_ae``: our AE title, for C-FIND;
    ``settings``: where a DICOMweb node's secret is found)."""
    if uses_qido(node):
        from pacsbridge.shared.nodes.dicomweb import QidoSearcher

        return QidoSearcher(node, slots=slots, cancel=cancel, settings=settings)
    return DimseSearcher(node, calling_ae, slots, cancel=cancel)
