"""What leaves pacsbridge: de-identified under a project, or identifiable; recorded and audited either way.

:class:`Outgoing` is one job's (or one download's) de-identification under a project: called with a
stored file's path it returns the :class:`~pacsbridge.shared.deid.profile.Deidentified` instance
(made in memory, in one pass), records the original -> new UIDs in the project's map in batches (so
results can come home, :mod:`.reidentify`), and on :meth:`Outgoing.close` audits each study that left:
who, when, which patient and study, to where, how many instances sent and withheld.
:func:`audit_identifiable` audits a way out of identifiable data (no project): the same, per study.

Used by the push and repack jobs (as their ``transform``) and the API's file download.
"""

from __future__ import annotations

import json
import threading
from collections import Counter, defaultdict
from typing import Any, Callable, Iterable

from pacsbridge.shared.deid.keys import Patient, ProjectKey
from pacsbridge.shared.deid.options import ProjectConfig
from pacsbridge.shared.deid.profile import Deidentified, OriginalIds, Profile
from pacsbridge.shared.deid.projects import ProjectSession, ProjectStore

__all__ = ["Outgoing", "audit_identifiable", "child_profile", "FLUSH_UIDS"]

#: UIDs kept in memory before they are written to the map.
FLUSH_UIDS = 2000


class Outgoing:
    """A project's de-identification of what one job sends (see the module docstring).

    Parameters
    ----------
    session : ProjectSession
        The opened project (:meth:`ProjectStore.open`: its key checked against the secret).
    actor : str
        Who asked: the job's owner, or the API token's name.
    action : str
        ``push``, ``repack`` or ``download`` (the audit's action).
    target : str
        Where it goes: the node, the folder, or the client.
    """

    def __init__(self, session: ProjectSession, actor: str, action: str, target: str) -> None:
        self.session, self.actor, self.action, self.target = session, actor, action, target
        self.profile = Profile(session.config, session.identity)
        self._lock = threading.Lock()
        self._uids: dict[tuple[str, str], dict[str, str]] = defaultdict(dict)
        self._levels: dict[str, str] = {}
        self._pending = 0
        self._studies: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
        self._pseudonyms: dict[tuple[str, str], str] = {}

    def __call__(self, path: str) -> Deidentified:
        made = self.profile.apply(path)  # a path, not its bytes: the engine reads it with less copying
        self.note(made.original, made.data is not None, made.action, made.uids, made.patient.pseudonym)
        return made

    def note(self, o: OriginalIds, sent: bool, action: str, uids: dict[str, str], pseudonym: str) -> None:
        """Count one instance made (``sent``: not withheld) and keep its replaced UIDs for the map: what
        :meth:`__call__` does after the engine, also called with what a sender process made
        (:meth:`child_spec`)."""
        flush = False
        with self._lock:
            self._studies[(o.patient_id, o.study_uid)]["sent" if sent else action] += 1
            if uids:
                self._uids[(o.issuer, o.patient_id)].update(uids)
                self._levels.update({o.sop_uid: "instance", o.series_uid: "series", o.study_uid: "study"})
                self._pending += len(uids)
                self._pseudonyms[(o.patient_id, o.study_uid)] = pseudonym
                flush = self._pending >= FLUSH_UIDS
        if flush:
            self.flush()

    def child_spec(self) -> dict[str, Any]:
        """What a push's sender process needs to de-identify as this object does
        (:func:`child_profile`): the project's name, configuration and key. Pseudonyms and date
        offsets stay the map's: the process asks for them (:meth:`patient`)."""
        key = self.session.identity.key
        return {"project": self.session.name, "key": key.raw().hex(),
                "config": self.session.config.model_dump(mode="json")}

    def patient(self, issuer: str, patient_id: str) -> Patient:
        """The patient's pseudonym and offset from the project's map (a sender process asked)."""
        return self.session.identity.patient(issuer, patient_id)

    def flush(self) -> None:
        """Write the UIDs made so far to the project's map."""
        with self._lock:
            batches, self._uids = self._uids, defaultdict(dict)
            levels = dict(self._levels)
            self._pending = 0
        for (issuer, patient_id), uids in batches.items():
            self.session.identity.record(uids, {o: levels.get(o, "other") for o in uids}, issuer, patient_id)

    def close(self) -> None:
        """Flush the map and audit every study that left (or was withheld) under the project."""
        self.flush()
        with self._lock:
            studies = dict(self._studies)
        for (patient_id, study_uid), counts in sorted(studies.items()):
            detail = {"identifiable": False, **counts, "pseudonym": self._pseudonyms.get((patient_id, study_uid), "")}
            self.session.audit(self.actor, self.action, patient_id=patient_id, study_uid=study_uid,
                               target=self.target, detail=json.dumps(detail, sort_keys=True))


def audit_identifiable(store: ProjectStore, actor: str, action: str, target: str,
                       studies: Iterable[tuple[str, str]], counts: dict[tuple[str, str], int] | None = None
                       ) -> None:
    """Audit identifiable data leaving (no project): one entry per (patient, study)."""
    for patient_id, study_uid in sorted(set(studies)):
        detail: dict[str, Any] = {"identifiable": True}
        if counts is not None:
            detail["instances"] = counts.get((patient_id, study_uid), 0)
        store.audit(actor, action, patient_id=patient_id, study_uid=study_uid, target=target,
                    detail=json.dumps(detail, sort_keys=True))


class _AskingIdentity:
    """A sender process's identity: new UIDs from the key (as :class:`~.projects.MappedIdentity`
    makes them), pseudonyms and offsets asked of the parent, which has the map (once per patient)."""

    def __init__(self, key: ProjectKey, uid_root: str, ask: Callable[[str, str], Patient]) -> None:
        self.key, self.uid_root, self.ask = key, uid_root, ask
        self._patients: dict[tuple[str, str], Patient] = {}

    def patient(self, issuer: str, patient_id: str) -> Patient:
        ident = (issuer or "", patient_id or "")
        known = self._patients.get(ident)
        if known is None:
            known = self._patients[ident] = self.ask(*ident)
        return known

    def uid(self, original: str) -> str:
        return self.key.uid(original, self.uid_root)


def child_profile(spec: dict[str, Any], ask: Callable[[str, str], Patient]) -> Profile:
    """The :class:`Profile` of :meth:`Outgoing.child_spec` in a sender process; ``ask(issuer,
    patient_id)`` gets a patient's pseudonym and offset from the parent."""
    config = ProjectConfig.model_validate(spec["config"])
    key = ProjectKey.from_bytes(bytes.fromhex(spec["key"]), spec["project"])
    return Profile(config, _AskingIdentity(key, config.uid_root, ask))
