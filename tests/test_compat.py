"""The pynetdicom compatibility layer (shared/dicom/compat): pinned, fenced, and honest when it falls back."""

from __future__ import annotations

import ast
import contextlib
import logging
import re
import tomllib
from pathlib import Path
from typing import Any, Iterator

import pytest

from pacsbridge.shared.dicom import compat

ROOT = Path(__file__).resolve().parent.parent
COMPAT = ROOT / "shared" / "dicom" / "compat"


def test_the_installed_pynetdicom_is_the_one_the_layer_was_written_against():
    """Every upstream function the layer copies, replaces or follows step by step has the source it was
    written against (sha256 of ``inspect.getsource``). A new pynetdicom that changed one fails here, by name:
    see docs/pynetdicom.md before recording new hashes."""
    assert compat.version() in compat.SUPPORTED
    assert compat.drift() == {}


def test_drift_names_a_changed_or_missing_function(monkeypatch):
    """The check above can fail: a recorded hash that is not the source's, and a function that is gone."""
    name = "pynetdicom.association.Association._run_reactor"
    monkeypatch.setitem(compat.UPSTREAM, name, "0" * 64)
    monkeypatch.setitem(compat.UPSTREAM, "pynetdicom.dul.DULServiceProvider.no_such_loop", "0" * 64)
    found = compat.drift()
    assert set(found) == {name, "pynetdicom.dul.DULServiceProvider.no_such_loop"}
    assert "source changed" in found[name] and "not found" in found["pynetdicom.dul.DULServiceProvider.no_such_loop"]


def test_the_pin_admits_only_the_supported_releases():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = [d for d in deps if re.match(r"pynetdicom\b", d)]
    assert len(pins) == 1
    versions = re.findall(r"==\s*([\w.]+)", pins[0])
    assert re.fullmatch(r"pynetdicom\s*==\s*[\w.]+", pins[0]), pins[0]  # exact: no range, no wildcard
    assert tuple(versions) == compat.SUPPORTED


#: pynetdicom modules and names the code outside compat may import (its public API).
PUBLIC = {
    "pynetdicom": None,  # any name that does not start with "_"
    "pynetdicom.presentation": None,
    "pynetdicom.sop_class": None,
    "pynetdicom.association": {"Association"},  # the type that AE.associate returns
    "pynetdicom.transport": {"ThreadedAssociationServer"},  # AE.make_server(server_class=...)
}
#: Attributes of pynetdicom's objects that only compat may touch.
INTERNALS = {"dul", "dimse", "acse", "msg_queue", "_accepted_cx", "_reactor_checkpoint", "_is_paused", "_run_reactor",
             "_create_socket", "_create_association", "_serve_request", "_config", "_handlers", "_kill_thread",
             "_run_loop_delay", "receive_primitive", "state_machine", "to_user_queue", "event_queue"}


def _sources() -> list[Path]:
    out = []
    for folder in ("shared", "services", "pacsbridge", "bench"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if (ROOT / "pacsbridge") in path.parents and path.parent != ROOT / "pacsbridge":
                continue  # pacsbridge/shared etc. are links
            if COMPAT not in path.parents and path.parent != COMPAT:
                out.append(path)
    return out


def _private_uses(paths: list[Path], root: Path) -> list[str]:
    found = []
    for path in paths:
        rel = path.relative_to(root)
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("pynetdicom.") or alias.name.startswith("pynetdicom._"):
                        found.append(f"{rel}:{node.lineno}: import {alias.name}")
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "pynetdicom":
                allowed = PUBLIC.get(node.module or "", set())
                for alias in node.names:
                    if alias.name.startswith("_") or (allowed is not None and alias.name not in allowed):
                        found.append(f"{rel}:{node.lineno}: from {node.module} import {alias.name}")
            elif isinstance(node, ast.Attribute) and node.attr in INTERNALS:
                found.append(f"{rel}:{node.lineno}: .{node.attr}")
    return found


def test_no_code_outside_compat_uses_pynetdicom_internals():
    """The fence: private modules or names of pynetdicom, and its objects' internals, only in shared/dicom/compat."""
    assert _private_uses(_sources(), ROOT) == []


def test_the_fence_sees_each_kind_of_private_use(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from pynetdicom import _config\nfrom pynetdicom.dul import DULServiceProvider\n"
                   "import pynetdicom.fsm\ndef f(assoc):\n    return assoc.dul.socket\n")
    text = "\n".join(_private_uses([bad], tmp_path))
    for what in ("import _config", "import DULServiceProvider", "import pynetdicom.fsm", ".dul"):
        assert what in text, text


@pytest.fixture
def unsupported(monkeypatch):
    """The layer believes the installed pynetdicom is another release (its warnings not yet given)."""
    monkeypatch.setattr(compat, "_supported", False)
    monkeypatch.setattr(compat, "_warned", set())


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "pacsbridge.shared.dicom.compat" and r.levelno == logging.WARNING]


def test_a_fallback_is_said_once_at_warning_level(unsupported, caplog, monkeypatch):
    """Per association the fast paths fall back to pynetdicom's own code, and say so once per process."""
    from pynetdicom import AE
    from pynetdicom.association import Association

    from pacsbridge.shared.dicom.compat import acceptor, reactor
    from pacsbridge.shared.dicom.compat.store import FastStore, Gate, ParkedSends

    monkeypatch.delenv("PACSBRIDGE_REACTOR", raising=False)
    caplog.set_level(logging.DEBUG, logger="pacsbridge.shared.dicom.compat")
    for _ in range(5):
        assoc = Association(AE(), "requestor")
        checkpoint = assoc._reactor_checkpoint
        assert reactor.install(assoc) is False and "_run_reactor" not in vars(assoc)
        assert Gate.install(assoc) is None and assoc._reactor_checkpoint is checkpoint
        assert FastStore.attach(assoc, 5.0) is None
        assert acceptor.divert_data_sets(assoc, lambda c, s: None, 1 << 20, lambda b: None) is False
        sends = ParkedSends(assoc, 5.0)
        assert sends.gate is None and sends.fast is None
        assert sends.send("1.2", "1.2.840.10008.1.2", lambda fast: fast) is None  # pynetdicom's own send_*
    warned = _warnings(caplog)
    assert len(warned) == 4, warned  # waiting reactor, send gate, fast C-STORE sender, data set spool
    assert len(set(warned)) == 4
    for feature in ("waiting reactor", "send gate", "fast C-STORE sender", "data set spool"):
        assert sum(w.startswith(feature) for w in warned) == 1, warned
    assert all("is not one this layer was written for" in w for w in warned)


@contextlib.contextmanager
def _echo_peer() -> Iterator[Any]:
    """A pynetdicom peer (AE ``PEER``) answering C-ECHO on a free port, as a node."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    from pacsbridge.shared.dicom.node import Node

    from .orthanc import free_port

    scp = AE(ae_title="PEER")
    scp.add_supported_context(Verification)
    port = free_port()
    server = scp.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_ECHO, lambda e: 0x0000)])
    try:
        yield Node(name="peer", ae_title="PEER", host="127.0.0.1", port=port)
    finally:
        server.shutdown()


def test_our_associations_work_with_pynetdicoms_own_code(unsupported, caplog):
    """Fallen back (another release), an echo to a real peer still succeeds, on stock pynetdicom code."""
    from pacsbridge.shared.dicom import dimse

    with _echo_peer() as node:
        for _ in range(2):
            assert dimse.echo(node, "PBTEST", timeout=5) < 5
    warned = _warnings(caplog)
    assert any(w.startswith("requestor deadlines") for w in warned), warned
    assert any(w.startswith("waiting reactor") for w in warned) is False  # never reached: no override, no install
    assert len(warned) == len(set(warned))


def test_park_waits_for_a_reactor_that_is_slow_to_reach_the_gate():
    """On a machine whose CPUs are busy for seconds, the reactor thread can still be on its way to the
    gate when park()'s slice (2 s) ends. park() must not return then (the reactor would pass the gate and
    take the response of the request that follows: a push ended partial in its network timeout), but once
    the reactor has parked. Made with a real association to a pynetdicom peer, whose reactor is slowed by
    3 s at the closed gate before it blocks there."""
    import threading
    import time

    from pacsbridge.shared.dicom import dimse
    from pacsbridge.shared.dicom.compat.store import Gate

    class SlowGate(Gate):
        slow = threading.Event()

        def wait(self, timeout=None):  # type: ignore[no-untyped-def]
            if self.slow.is_set() and not self.is_set():
                time.sleep(3.0)  # a starved reactor thread, still on its way
            return super().wait(timeout)

    with _echo_peer() as node, dimse.associate(node, "PBTEST", timeout=10) as assoc:
        gate = SlowGate.install(assoc)
        assert gate is not None
        SlowGate.slow.set()
        t0 = time.monotonic()
        before = gate._parks
        gate.park(timeout=2.0, limit=10.0)
        took = time.monotonic() - t0
        assert gate._parks > before, "park() returned before the reactor parked"
        assert 2.5 < took < 8.0, took
        gate.set()
