"""Child processes run together and stopped together (``pacsbridge serve``, ``pacsbridge worker``)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import Mapping

__all__ = ["Supervisor"]


class Supervisor:
    """Catch SIGINT/SIGTERM, watch named children, stop them all on the way out.

    ``own_groups``: each child leads its own process group (``start_new_session``), so a
    terminal's Ctrl-C reaches only us. Stopping asks each child (the leader) to stop, and the child
    stops its own children: a Celery worker's pool processes must not get the SIGTERM themselves
    (Celery logs each as an error, replaces them and takes far longer to stop). Whatever is left of
    a group after its leader ended, or after ``grace``, is killed.
    """

    def __init__(self, own_groups: bool = False) -> None:
        self.own_groups = own_groups
        self.stopping = False
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.stopping = True

    def start(self, name: str, cmd: list[str], env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(cmd, env=dict(env) if env is not None else None, start_new_session=self.own_groups)
        self.children[name] = proc
        return proc

    def ended(self) -> str | None:
        """The name of a child that has exited, if any."""
        return next((n for n, p in self.children.items() if p.poll() is not None), None)

    def watch(self, poll: float = 0.5) -> str | None:
        """Wait until a signal arrives (returns None) or a child exits (returns its name)."""
        while not self.stopping:
            name = self.ended()
            if name is not None:
                return name
            time.sleep(poll)
        return None

    def _signal(self, proc: subprocess.Popen[bytes], sig: int, group: bool = False) -> None:
        try:
            if group and self.own_groups:
                os.killpg(proc.pid, sig)  # the group id stays in use (not reused) while any member lives
            elif proc.poll() is None:
                proc.send_signal(sig)
        except (ProcessLookupError, PermissionError):
            pass

    def stop_all(self, grace: float = 30.0) -> list[str]:
        """SIGTERM every child (Celery: a warm shutdown), SIGKILL what is still running after ``grace``.

        Returns the names of the children that had to be killed.
        """
        for proc in self.children.values():
            if proc.poll() is None:
                self._signal(proc, signal.SIGTERM)
        deadline = time.monotonic() + grace
        killed = []
        for name, proc in self.children.items():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self._signal(proc, signal.SIGKILL, group=True)
                proc.wait()
                killed.append(name)
            self._signal(proc, signal.SIGKILL, group=True)  # anything its leader left behind
        return killed
