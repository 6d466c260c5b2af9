"""Every use of pynetdicom's internals, in one place: the version it was written for, its checks, its fallbacks.

pacsbridge reaches into pynetdicom where its public API has no hook: the waiting reactors
(:mod:`.reactor`), the per-PDU deadline reads (:mod:`.reads`), the send gate and the fast C-STORE
sender (:mod:`.store`), the requestor's socket override (:mod:`.requestor`), the listener's
per-connection handler, its data-set spool hook (:mod:`.acceptor`) and two ``_config`` switches
(here). Nothing else in pacsbridge imports a private pynetdicom module or touches a private
attribute of an association; the public API (``AE``, ``evt``, presentation contexts, SOP classes)
is used where it is needed.

Each of those copies or patches code of one pynetdicom release: :data:`SUPPORTED` names it, the pin in
``pyproject.toml`` admits only it, and :data:`UPSTREAM` records a hash of the source of every upstream
function the layer copies, replaces or depends on step by step (``tests/test_compat.py`` fails when the
installed pynetdicom's source differs). With another version installed anyway, or when an internal
does not look as expected, each fast path falls back to pynetdicom's own code and says so once per
process, at warning level (:func:`fallback`). How to move to a new pynetdicom: docs/pynetdicom.md.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import logging
import threading
from typing import Any

__all__ = ["SUPPORTED", "UPSTREAM", "supported", "fallback", "drift", "source_hash", "send_files_as_stored",
           "receive_in_memory"]

log = logging.getLogger(__name__)

#: The pynetdicom releases this layer was written against and tested with (exact versions).
SUPPORTED = ("3.0.4",)

#: sha256 of ``inspect.getsource`` of each upstream function the layer copies (c), replaces (r) or
#: relies on step by step (s), in the releases of :data:`SUPPORTED`.
UPSTREAM = {
    # reactor.py: _run_dul is a copy of run_reactor (c); stop_dul / kill_dul are replaced (r)
    "pynetdicom.dul.DULServiceProvider.run_reactor":
        "e3a10eb3a0931e4854af33b9496e92d9679522aca26b0e04da8967559b9e2803",
    "pynetdicom.dul.DULServiceProvider.stop_dul":
        "28a7e0be126e7b306369cc1b131daec8e907d21d0f5692930133b6599b8c6e5f",
    "pynetdicom.dul.DULServiceProvider.kill_dul":
        "5ceccf8dd01c2072c377d18bb1be284941a345bd40f03bd1e03a864ab0817842",
    # reactor.py: _run_association is a copy of _run_reactor (c), the gate meets its checkpoint (s)
    "pynetdicom.association.Association._run_reactor":
        "f28838c5559e462a563750cfc9f3790027f4bb7e2223baf42c9f5d682c359dee",
    # reactor.install_on_request wraps request() (s); ApplicationEntity.associate calls _create_socket
    # before it (s), which requestor.AE overrides (r)
    "pynetdicom.association.Association.request":
        "928cd0e3013c9ab99cb6899c35b624b3f72f5ac1b846a273fdf4106a1db5c67f",
    "pynetdicom.ae.ApplicationEntity.associate":
        "dbc8cf47090386b2068817f6e65e39ca2c0d5b8fd80f6b9b7a322d37b85b2985",
    "pynetdicom.ae.ApplicationEntity._create_socket":
        "f56bca8888e1ce9f3d64f30608db5d89f003b0b1b31106d3178a550871a4030f",
    # reads.py replaces recv (r) and follows _read_pdu_data's header-then-body reads (s);
    # requestor.Socket relies on connect() leaving the socket blocking (s)
    "pynetdicom.transport.AssociationSocket.recv":
        "6bc20a33b1b7cfe76d4ad4407ca242563bc6206fde4b4e1cf7a2fbb1f11d621d",
    "pynetdicom.dul.DULServiceProvider._read_pdu_data":
        "19f2d4e38c13c83586365d93dd5cd96a0c7c665cb37251054b3e1f246e9f431b",
    "pynetdicom.transport.AssociationSocket.connect":
        "aeeeae413bd339dcc18230a6c0926993a824fd6ec31479febfbe21734911482f",
    # store.py: FastStore does what send_c_store does (r), framed as encode_msg fragments (c), and
    # takes the response with get_msg (s)
    "pynetdicom.association.Association.send_c_store":
        "fa5a8127f349f8e75698f4cdf2b4dbe3f38e3e9e320a8cf45c15bf8333f9c283",
    "pynetdicom.dimse_messages.DIMSEMessage.encode_msg":
        "73000c902c52832dab302ddb3bc274ea93d205a810a197225dd87d4c1212ba57",
    "pynetdicom.dimse.DIMSEServiceProvider.get_msg":
        "890e3e04283f5aeb756236f1a4dd35d3a10bbdd52f3efa3f3950c01f47bd2b34",
    # acceptor.py: the listener's handler is a copy of handle (c) using _create_association (s); the spool
    # wraps receive_primitive (s); closed_before_request answers what AA-5 leaves unsaid (s)
    "pynetdicom.transport.RequestHandler.handle":
        "034823fb4df3a87467bd0d45193f0d457fcf59c87fda8e97b2edfb89426f76dd",
    "pynetdicom.transport.RequestHandler._create_association":
        "05c8d12b79863cdbdb901ce37187b7030a0434c5cd89d219ed0bedbda679a61e",
    "pynetdicom.dimse.DIMSEServiceProvider.receive_primitive":
        "5f99c86b14a15cefa87d914cda3591ec4d636d4c53a982e945ec9c1828c6e43f",
    # acceptor.reject sends the A-ASSOCIATE-RJ from EVT_REQUESTED as pynetdicom's own rejections do (s)
    "pynetdicom.acse.ACSE.send_reject":
        "700998293bbcb6c9df16202bcb32900f0b66634ff07cd662c5c3e4a2a7cd4825",
    "pynetdicom.fsm.AA_5":
        "4a8a4a3ac26f1f17e7441984087c73680b1421ef1e73b3887e43c12f19dee09d",
    # reactor.py runs its loop in make_target's wrapper, as pynetdicom does (s)
    "pynetdicom.utils.make_target":
        "81bc7a65ab49454a6fea80b60a33b33d597c4c0eddea2c8b2a8b152a001aa4d8",
}

_warned: set[str] = set()
_warned_lock = threading.Lock()
_supported: bool | None = None


def version() -> str:
    """The installed pynetdicom's version."""
    import pynetdicom

    return str(pynetdicom.__version__)


def supported() -> bool:
    """Whether the installed pynetdicom is one of :data:`SUPPORTED` (looked up once per process)."""
    global _supported
    if _supported is None:
        try:
            _supported = version() in SUPPORTED
        except ImportError:  # pragma: no cover - a dependency
            _supported = False
    return _supported


def fallback(feature: str, why: str = "") -> None:
    """Say, once per process and feature, at warning level, that ``feature`` keeps pynetdicom's own code.

    ``why`` defaults to the version mismatch. Later calls for the same feature log at debug level only
    (they come per association).
    """
    with _warned_lock:
        first = feature not in _warned
        _warned.add(feature)
    reason = why or f"pynetdicom {version()} is not one this layer was written for ({', '.join(SUPPORTED)})"
    if first:
        log.warning("%s: %s; pynetdicom's own code is used instead (see docs/pynetdicom.md)", feature, reason)
    else:
        log.debug("%s: %s", feature, reason)


def check(feature: str, obj: Any, *names: str) -> bool:
    """True when the version is supported and ``obj`` has every attribute in ``names``; else
    :func:`fallback` (once) and False."""
    if not supported():
        fallback(feature)
        return False
    for name in names:
        if not hasattr(obj, name):
            fallback(feature, f"pynetdicom {version()} has no {type(obj).__name__}.{name}")
            return False
    return True


def _resolve(qualname: str) -> Any:
    parts = qualname.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(qualname)


def source_hash(qualname: str) -> str:
    """sha256 of the installed source of ``qualname`` (``module.Class.function``)."""
    return hashlib.sha256(inspect.getsource(_resolve(qualname)).encode()).hexdigest()


def drift() -> dict[str, str]:
    """The upstream functions of :data:`UPSTREAM` whose installed source differs: name -> what is wrong."""
    out: dict[str, str] = {}
    for name, expected in UPSTREAM.items():
        try:
            found = source_hash(name)
        except (ImportError, AttributeError, OSError, TypeError) as exc:
            out[name] = f"not found: {exc}"
            continue
        if found != expected:
            out[name] = f"source changed (sha256 {found[:16]}..., recorded {expected[:16]}...)"
    return out


def _set_config(feature: str, name: str, value: bool) -> bool:
    try:
        from pynetdicom import _config
    except ImportError:  # pragma: no cover
        fallback(feature, "pynetdicom has no _config module")
        return False
    if not hasattr(_config, name):
        fallback(feature, f"pynetdicom {version()} has no _config.{name}")
        return False
    setattr(_config, name, value)
    return True


def send_files_as_stored() -> bool:
    """``send_c_store(path)`` sends the file's data set as stored, never decoded (process-wide:
    ``_config.STORE_SEND_CHUNKED_DATASET``). False when this pynetdicom has no such switch."""
    return _set_config("send files as stored", "STORE_SEND_CHUNKED_DATASET", True)


def receive_in_memory() -> bool:
    """Received data sets go to pynetdicom's in-memory buffer, never its own temporary file
    (``_config.STORE_RECV_CHUNKED_DATASET = False``): the listener's spool (:mod:`.acceptor`) decides."""
    return _set_config("receive in memory", "STORE_RECV_CHUNKED_DATASET", False)
