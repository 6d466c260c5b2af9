"""Research projects, their pseudonym and UID maps, and the append-only audit, as rows of the index database.

Tables (declared in :mod:`pacsbridge.shared.core.schema`, made by migration 0003)::

    pacsbridge_projects       name, description, config (ProjectConfig JSON), key_check, created_by ...
    pacsbridge_deid_patients  per project and (issuer, PatientID): pseudonym, date offset, first and last use
    pacsbridge_deid_uids      per project: original UID -> new UID (level, patient), first use
    pacsbridge_audit          who did what, when (append-only: the database's triggers refuse UPDATE and DELETE)

:class:`ProjectStore` manages projects (create, read, change, delete) and reads and writes the audit.
:meth:`ProjectStore.open` checks the secret against the project's key check value and gives a
:class:`ProjectSession`, whose :class:`MappedIdentity` is what the profile asks for pseudonyms, date
offsets and new UIDs: it **looks the map up before deriving anything**, and writes what it derives,
so a patient keeps the pseudonym the map says even if the policy changed or a pseudonym was given by
hand. The map and the key are what make every job of a project consistent; that is why a change of
anything a derivation depends on (``uid_root``, ``pseudonyms``, ``date_shift``) and a new key are
refused while the project has a map (:class:`~pacsbridge.shared.core.errors.Conflict`, HTTP 409).

Concurrency: two workers that meet a new patient at once both try to insert its row; the primary key
(project, issuer, patient_id) lets one win, the other reads the winner's row. Two new patients that
draw the same pseudonym meet at the unique (project, pseudonym) index; the loser takes the next
attempt (prefix + digits) or the next unused name. No lock is held between statements.
"""

from __future__ import annotations

import builtins
import dataclasses
import json
import re
import time
from typing import Any, Iterable, Mapping, NamedTuple

from sqlalchemy import and_, delete, func, insert, select, true, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

from pacsbridge.shared.core.errors import Conflict, DeidSecretError, InvalidRequest, UnknownProject
from pacsbridge.shared.core.models import check
from pacsbridge.shared.core.schema import (audit_table, deid_patients_table, deid_uids_table, nodes_table,
                                           projects_table)

from .keys import Patient, ProjectKey, verify
from .options import PROJECT_NAME_PATTERN, ProjectConfig

__all__ = ["Project", "ProjectStore", "ProjectSession", "MappedIdentity", "MapEntry", "AuditEntry",
           "DERIVATION_FIELDS", "PSEUDONYM_PATTERN", "LEVELS", "merge"]

#: What the derivations of a project depend on besides its key: changed while the map has rows, old
#: and new pseudonyms, UIDs and offsets would no longer agree (refused, 409).
DERIVATION_FIELDS = ("uid_root", "pseudonyms", "date_shift")
#: A pseudonym given by hand: what a names list may hold (it becomes PatientID and PatientName).
PSEUDONYM_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"
#: The levels a recorded UID may be of.
LEVELS = ("study", "series", "instance", "other", "")
#: How many derivations a new patient may try before the pseudonym space is called full.
MAX_ATTEMPTS = 1000
#: Rows per INSERT of :meth:`MappedIdentity.record` (bound parameters stay well under SQLite's limit).
_BATCH = 500


def _clip(value: Any, size: int) -> str:
    return str(value or "")[:size]


def merge(base: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """``changes`` merged into ``base``: objects key by key (recursively), anything else replaced."""
    out = dict(base)
    for key, value in changes.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


@dataclasses.dataclass
class Project:
    """A project row (its key is never stored; ``key_check`` only checks a secret)."""

    name: str
    description: str
    config: ProjectConfig
    key_check: str
    created_by: str = ""
    created_at: float = 0.0
    updated_at: float = 0.0
    #: rows of its map (filled by :meth:`ProjectStore.get` and :meth:`ProjectStore.list`)
    patients: int = 0
    uids: int = 0

    def to_dict(self) -> dict[str, Any]:
        """What the API and the CLI show: everything but the key check value."""
        return {"name": self.name, "description": self.description,
                "config": self.config.model_dump(mode="json"), "created_by": self.created_by,
                "created_at": self.created_at, "updated_at": self.updated_at,
                "patients": self.patients, "uids": self.uids}


class MapEntry(NamedTuple):
    """A row of a project's pseudonym map."""

    issuer: str
    patient_id: str
    pseudonym: str
    date_offset: int
    first_used: float
    last_used: float

    @property
    def patient(self) -> Patient:
        return Patient(self.pseudonym, self.date_offset)


class AuditEntry(NamedTuple):
    id: int
    at: float
    actor: str
    action: str
    project: str
    patient_id: str
    study_uid: str
    target: str
    detail: str


def _config(raw: str | Mapping[str, Any] | ProjectConfig, field: str = "config") -> ProjectConfig:
    if isinstance(raw, ProjectConfig):
        return raw
    data = json.loads(raw) if isinstance(raw, str) else raw
    return check(ProjectConfig, data, field=field,
                 rename=lambda loc: ".".join([field, *(str(p) for p in loc if isinstance(p, (str, int)))]))


def _project(row: Any) -> Project:
    m = row._mapping
    return Project(name=m["name"], description=m["description"], config=_config(m["config"]),
                   key_check=m["key_check"], created_by=m["created_by"], created_at=m["created_at"],
                   updated_at=m["updated_at"])


def _entry(row: Any) -> MapEntry:
    m = row._mapping
    return MapEntry(m["issuer"], m["patient_id"], m["pseudonym"], int(m["date_offset"]), m["first_used"],
                    m["last_used"])


class ProjectStore:
    """Projects, their maps and the audit in the index database (SQLite or PostgreSQL).

    Parameters
    ----------
    engine : Engine
        The index database's engine (its tables made by the migrations, :meth:`JobStore.create`
        or ``pacsbridge init``).
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # -- projects ----------------------------------------------------------------------------
    def create(self, name: str, config: ProjectConfig | Mapping[str, Any], secret: bytes, description: str = "",
               created_by: str = "") -> Project:
        """Store a new project with the check value of its key under ``secret``.

        Raises
        ------
        InvalidRequest
            A malformed name, description or configuration (the field is named).
        Conflict
            The name is taken. Making it again with another secret would be a new key (a key
            rotation): refused while it has a map, and otherwise the old one must be deleted first.
        """
        if not isinstance(name, str) or not re.match(PROJECT_NAME_PATTERN, name):
            raise InvalidRequest("letters, digits, '_', '.', '-' (at most 64, starting with a letter or digit)",
                                 "name")
        _description(description)
        cfg = _config(config)
        key = ProjectKey(secret, name)
        now = time.time()
        with self.engine.begin() as conn:
            row = conn.execute(select(projects_table.c.key_check).where(projects_table.c.name == name)).first()
            if row is not None:
                patients, uids = self._counts(conn, name)
                rotation = row.key_check != key.check
                if patients or uids:
                    raise Conflict(f"project {name!r} exists and has a map ({patients} patient(s), {uids} UID(s))"
                                   + (": a new key (another secret) would break the consistency of its "
                                      "pseudonyms and UIDs, so key rotation is refused" if rotation else ""))
                raise Conflict(f"project {name!r} exists already (change it with PATCH, or delete it first)")
            try:
                conn.execute(insert(projects_table).values(
                    name=name, description=description, config=cfg.model_dump_json(), key_check=key.check,
                    created_by=_clip(created_by, 64), created_at=now, updated_at=now))
            except IntegrityError:
                raise Conflict(f"project {name!r} exists already") from None
        return self.get(name)

    def get(self, name: str) -> Project:
        """The project called ``name`` with the size of its map; :class:`UnknownProject` if none."""
        with self.engine.connect() as conn:
            project = self._get(conn, name)
            project.patients, project.uids = self._counts(conn, name)
            return project

    @staticmethod
    def _get(conn: Connection, name: str) -> Project:
        row = conn.execute(select(projects_table).where(projects_table.c.name == name)).first()
        if row is None:
            raise UnknownProject(f"no project called {name!r}")
        return _project(row)

    @staticmethod
    def _counts(conn: Connection, name: str) -> tuple[int, int]:
        patients = conn.execute(select(func.count()).select_from(deid_patients_table)
                                .where(deid_patients_table.c.project == name)).scalar_one()
        uids = conn.execute(select(func.count()).select_from(deid_uids_table)
                            .where(deid_uids_table.c.project == name)).scalar_one()
        return int(patients), int(uids)

    def exists(self, name: str) -> bool:
        with self.engine.connect() as conn:
            return conn.execute(select(projects_table.c.name).where(projects_table.c.name == name)).first() \
                is not None

    def list(self) -> builtins.list[Project]:
        """Every project by name, with the size of its map."""
        with self.engine.connect() as conn:
            found = [_project(r) for r in conn.execute(select(projects_table).order_by(projects_table.c.name))]
            # (not dict(result): a Result has keys(), so dict() would read it as a mapping)
            patients = {r[0]: int(r[1]) for r in conn.execute(
                select(deid_patients_table.c.project, func.count()).group_by(deid_patients_table.c.project))}
            uids = {r[0]: int(r[1]) for r in conn.execute(
                select(deid_uids_table.c.project, func.count()).group_by(deid_uids_table.c.project))}
        for p in found:
            p.patients, p.uids = int(patients.get(p.name, 0)), int(uids.get(p.name, 0))
        return found

    def update(self, name: str, *, config: Mapping[str, Any] | ProjectConfig | None = None,
               description: str | None = None) -> Project:
        """Change a project's description and configuration.

        ``config`` as a mapping is merged into the current configuration (objects key by key,
        lists and values replaced: :func:`merge`); a :class:`ProjectConfig` replaces it.

        Raises
        ------
        UnknownProject
            No such project.
        InvalidRequest
            The result is not a valid configuration (the field is named).
        Conflict
            The change touches what the derivations depend on (:data:`DERIVATION_FIELDS`), or the
            dates mode (``options.dates``), while the project has a map. Appending names to the
            ``pseudonyms.names`` list is allowed (the names already given stay where they are).
        """
        if description is not None:
            _description(description)
        with self.engine.begin() as conn:
            current = self._get(conn, name)
            if isinstance(config, ProjectConfig):
                new = config
            elif config is not None:
                new = _config(merge(current.config.model_dump(mode="json"), config))
            else:
                new = current.config
            changed = [f for f in DERIVATION_FIELDS if _derivation_changed(f, current.config, new)]
            if current.config.options.dates != new.options.dates:
                # shift <-> keep: the platform would hold a patient's dates both shifted and true (its
                # offset, so every date sent, given away), and results would be moved back by the mode of
                # now, not the mode their data were sent under
                changed.append("options.dates")
            if changed:
                patients, uids = self._counts(conn, name)
                if patients or uids:
                    raise Conflict(f"project {name!r} has a map ({patients} patient(s), {uids} UID(s)): changing "
                                   f"{', '.join(changed)} would give its patients and studies other pseudonyms, "
                                   "offsets, dates or UIDs than those already sent, so it is refused (make a new "
                                   "project)")
            conn.execute(update(projects_table).where(projects_table.c.name == name).values(
                config=new.model_dump_json(),
                description=current.description if description is None else description, updated_at=time.time()))
        return self.get(name)

    def delete(self, name: str) -> None:
        """Remove a project.

        Raises
        ------
        Conflict
            It has a map (deleting it would lose the only way back from its pseudonyms and UIDs to
            the originals, and the next job would make other ones), or a node names it as its project.
        """
        with self.engine.begin() as conn:
            self._get(conn, name)
            patients, uids = self._counts(conn, name)
            if patients or uids:
                raise Conflict(f"project {name!r} has a map ({patients} patient(s), {uids} UID(s)): deleting it "
                               "would lose the way back to the originals, so it is refused")
            nodes = [r[0] for r in conn.execute(select(nodes_table.c.name).where(nodes_table.c.project == name))]
            if nodes:
                raise Conflict(f"project {name!r} is the project of node(s) {', '.join(nodes)}: change them first")
            conn.execute(delete(projects_table).where(projects_table.c.name == name))

    # -- the key -----------------------------------------------------------------------------
    def open(self, name: str, secret: bytes) -> "ProjectSession":
        """The project, ready to de-identify under ``secret``.

        Raises
        ------
        UnknownProject
            No such project.
        DeidSecretError
            ``secret`` is not the secret the project was made with (its key check value differs):
            a mistyped secret would otherwise silently make new pseudonyms.
        """
        with self.engine.connect() as conn:
            project = self._get(conn, name)
        key = ProjectKey(secret, name)
        verify(key, project.key_check)
        return ProjectSession(project, key, MappedIdentity(self.engine, project, key), self)

    def check_all(self, secret: bytes | None) -> builtins.list[str]:
        """Check ``secret`` against every project (at start-up of the API and the workers).

        Returns the names checked. With no project, no secret is needed.

        Raises
        ------
        DeidSecretError
            Projects exist and ``secret`` is None, or it does not match one or more of them (all named).
        """
        with self.engine.connect() as conn:
            rows = list(conn.execute(select(projects_table.c.name, projects_table.c.key_check)
                                     .order_by(projects_table.c.name)))
        names = [r.name for r in rows]
        if rows and secret is None:
            raise DeidSecretError(f"PACSBRIDGE_DEID_SECRET (or PACSBRIDGE_DEID_SECRET_FILE) is not set, and "
                                  f"{len(rows)} project(s) need it: {', '.join(names)}")
        wrong = [r.name for r in rows if secret is not None and ProjectKey(secret, r.name).check != r.key_check]
        if wrong:
            raise DeidSecretError(f"PACSBRIDGE_DEID_SECRET is not the secret project(s) {', '.join(wrong)} were "
                                  "made with (their key check values differ); restore the right secret: a wrong "
                                  "one would make new pseudonyms for patients already sent")
        return names

    # -- the map, read by admins ---------------------------------------------------------------
    def map_rows(self, name: str, *, patient_id: str | None = None, pseudonym: str | None = None,
                 limit: int | None = 100, offset: int = 0) -> tuple[builtins.list[MapEntry], int]:
        """A page of the pseudonym map (by first use), and how many rows match. The caller audits the read."""
        c = deid_patients_table.c
        where = and_(c.project == name, *([c.patient_id == patient_id] if patient_id else []),
                     *([c.pseudonym == pseudonym] if pseudonym else []))
        with self.engine.connect() as conn:
            self._get(conn, name)
            total = conn.execute(select(func.count()).select_from(deid_patients_table).where(where)).scalar_one()
            query = select(deid_patients_table).where(where).order_by(c.first_used, c.issuer, c.patient_id)
            if limit is not None:
                query = query.limit(limit).offset(offset)
            return [_entry(r) for r in conn.execute(query)], int(total)

    # -- the audit ---------------------------------------------------------------------------
    def audit(self, actor: str, action: str, *, project: str = "", patient_id: str = "", study_uid: str = "",
              target: str = "", detail: str = "", conn: Connection | None = None) -> int:
        """Append one entry to the audit (who, what, when, on what); returns its id.

        ``conn``: write it in the caller's transaction (so the entry and what it records commit together).
        """
        values = {"at": time.time(), "actor": _clip(actor, 64), "action": _clip(action, 32),
                  "project": _clip(project, 64), "patient_id": _clip(patient_id, 64),
                  "study_uid": _clip(study_uid, 64), "target": _clip(target, 255), "detail": str(detail or "")}
        if conn is not None:
            return _inserted_id(conn.execute(insert(audit_table).values(**values)))
        with self.engine.begin() as own:
            return _inserted_id(own.execute(insert(audit_table).values(**values)))

    def audit_rows(self, *, action: str | None = None, project: str | None = None, actor: str | None = None,
                   since: float | None = None, limit: int = 100,
                   offset: int = 0) -> tuple[builtins.list[AuditEntry], int]:
        """Audit entries matching the filters, newest first, and how many match in all."""
        c = audit_table.c
        cond = []
        if action:
            cond.append(c.action == action)
        if project:
            cond.append(c.project == project)
        if actor:
            cond.append(c.actor == actor)
        if since is not None:
            cond.append(c.at >= since)
        where = and_(true(), *cond)
        with self.engine.connect() as conn:
            total = conn.execute(select(func.count()).select_from(audit_table).where(where)).scalar_one()
            rows = conn.execute(select(audit_table).where(where).order_by(c.at.desc(), c.id.desc())
                                .limit(limit).offset(offset))
            return [AuditEntry(**r._mapping) for r in rows], int(total)


def _inserted_id(result: Any) -> int:
    return int(result.inserted_primary_key[0])


def _description(text: Any) -> None:
    if not isinstance(text, str) or len(text) > 255 or re.search(r"[\x00-\x1f\x7f]", text):
        raise InvalidRequest("at most 255 characters, no control characters", "description")


def _derivation_changed(field: str, old: ProjectConfig, new: ProjectConfig) -> bool:
    before, after = getattr(old, field), getattr(new, field)
    if field == "pseudonyms":
        # more names at the end of the list change nothing already given
        return bool(before.prefix != after.prefix or before.digits != after.digits
                    or after.names[:len(before.names)] != before.names or (before.names and not after.names)
                    or (not before.names and after.names))
    return bool(before != after)


@dataclasses.dataclass
class ProjectSession:
    """An opened project: its row, its key (checked), its map (:attr:`identity`) and the audit."""

    project: Project
    key: ProjectKey
    identity: "MappedIdentity"
    store: ProjectStore

    @property
    def name(self) -> str:
        return self.project.name

    @property
    def config(self) -> ProjectConfig:
        return self.project.config

    def audit(self, actor: str, action: str, **fields: Any) -> int:
        """An audit entry under this project."""
        return self.store.audit(actor, action, project=self.name, **fields)


class MappedIdentity:
    """The :class:`~pacsbridge.shared.deid.keys.Identity` of a project: the map first, the key for what is new.

    A patient's row, once read or written, is kept in memory for the life of this object (one job):
    a row never changes once written, so the profile asks the database once per patient, not once
    per instance. ``last_used`` is written on the first use of each patient by this object.
    """

    def __init__(self, engine: Engine, project: Project, key: ProjectKey) -> None:
        self.engine, self.project, self.key = engine, project, key
        self.name = project.name
        self._patients: dict[tuple[str, str], Patient] = {}

    # -- the Identity protocol ---------------------------------------------------------------
    def patient(self, issuer: str, patient_id: str) -> Patient:
        """The patient's pseudonym and date offset: from the map, or derived by the project's policy and
        written to the map (a new patient).

        Raises
        ------
        Conflict
            The names list is used up, or no free pseudonym was found in :data:`MAX_ATTEMPTS` derivations.
        """
        ident = (issuer or "", patient_id or "")
        known = self._patients.get(ident)
        if known is not None:
            return known
        found = self._lookup(*ident, touch=True)
        if found is None:
            found = self._new(*ident)
        self._patients[ident] = found.patient
        return found.patient

    def uid(self, original: str) -> str:
        """The new UID of ``original`` (keyed, the same in every job; no database read)."""
        return self.key.uid(original, self.project.config.uid_root)

    # -- explicit pseudonyms -----------------------------------------------------------------
    def assign(self, issuer: str, patient_id: str, pseudonym: str) -> Patient:
        """Give a patient the pseudonym a request names (a cohort's own list, one per row).

        The patient's date offset is the keyed one. Giving a patient the pseudonym it has already is
        allowed (a request sent twice).

        Raises
        ------
        InvalidRequest
            ``pseudonym`` is not letters, digits, ``_ . -`` (1 to 64).
        Conflict
            The pseudonym belongs to another patient, or the patient has another pseudonym already.
        """
        if not isinstance(pseudonym, str) or not re.match(PSEUDONYM_PATTERN, pseudonym):
            raise InvalidRequest("a pseudonym is 1 to 64 letters, digits, '_', '.', '-'", "pseudonym")
        ident = (issuer or "", patient_id or "")
        for _ in range(3):
            mine = self._lookup(*ident, touch=False)
            if mine is not None:
                if mine.pseudonym != pseudonym:
                    raise Conflict(f"project {self.name!r}: the patient has the pseudonym {mine.pseudonym!r} "
                                   f"already, not {pseudonym!r}")
                self._patients[ident] = mine.patient
                return mine.patient
            other = self._by_pseudonym(pseudonym)
            if other is not None:
                raise Conflict(f"project {self.name!r}: the pseudonym {pseudonym!r} belongs to another patient")
            if self._insert(*ident, pseudonym):
                patient = Patient(pseudonym, self._offset(*ident))
                self._patients[ident] = patient
                return patient
        raise Conflict(f"project {self.name!r}: the pseudonym {pseudonym!r} could not be assigned (changed "
                       "meanwhile); try again")

    # -- the UID map -------------------------------------------------------------------------
    def record(self, uids: Mapping[str, str], levels: Mapping[str, str] | str = "", issuer: str = "",
               patient_id: str = "") -> int:
        """Write original -> new UIDs of what was sent (rows already there are left as they are).

        ``levels``: one level for all (``study``, ``series``, ``instance``, ``other``) or one per
        original UID. Returns how many rows were new (as read before the insert: a row another worker
        wrote in between is counted, and left as it is). One transaction per call: call it per series
        or per batch of instances, not per instance.
        """
        if not uids:
            return 0
        now = time.time()

        def level(original: str) -> str:
            value = levels if isinstance(levels, str) else levels.get(original, "other")
            return value if value in LEVELS else "other"

        originals = list(uids)
        inserted = 0
        with self.engine.begin() as conn:
            for start in range(0, len(originals), _BATCH):
                chunk = originals[start:start + _BATCH]
                c = deid_uids_table.c
                present = set(conn.execute(select(c.original).where(and_(c.project == self.name,
                                                                         c.original.in_(chunk)))).scalars())
                rows = [{"project": self.name, "original": o, "new": uids[o], "level": level(o),
                         "issuer": _clip(issuer, 64), "patient_id": _clip(patient_id, 64), "first_used": now}
                        for o in chunk if o not in present]
                if rows:
                    conn.execute(_insert_ignoring(conn, deid_uids_table), rows)
                    inserted += len(rows)
        return inserted

    # -- reverse lookups (results coming home; the caller audits the re-identification) ---------
    def original_uid(self, new: str) -> str | None:
        """The original of a UID this project made, or None (not sent under this project)."""
        c = deid_uids_table.c
        with self.engine.connect() as conn:
            return conn.execute(select(c.original).where(and_(c.project == self.name, c.new == new))).scalar()

    def uid_owner(self, new: str) -> tuple[str, str] | None:
        """The patient (issuer, original PatientID) a UID this project made was sent for, or None."""
        c = deid_uids_table.c
        with self.engine.connect() as conn:
            row = conn.execute(select(c.issuer, c.patient_id).where(and_(c.project == self.name,
                                                                          c.new == new))).first()
        return None if row is None else (row.issuer, row.patient_id)

    def peek(self, issuer: str, patient_id: str) -> MapEntry | None:
        """The map's row of a patient, or None; nothing is written (a cohort's dry run checks its
        rows' pseudonyms against the map with it)."""
        return self._lookup(issuer or "", patient_id or "", touch=False)

    def patient_by_pseudonym(self, pseudonym: str) -> MapEntry | None:
        """The map's row of a pseudonym (issuer, original PatientID, offset ...), or None."""
        return self._by_pseudonym(pseudonym)

    # -- inside ------------------------------------------------------------------------------
    def _lookup(self, issuer: str, patient_id: str, touch: bool) -> MapEntry | None:
        c = deid_patients_table.c
        where = and_(c.project == self.name, c.issuer == issuer, c.patient_id == patient_id)
        with self.engine.begin() as conn:
            row = conn.execute(select(deid_patients_table).where(where)).first()
            if row is not None and touch:
                conn.execute(update(deid_patients_table).where(where).values(last_used=time.time()))
        return None if row is None else _entry(row)

    def _by_pseudonym(self, pseudonym: str) -> MapEntry | None:
        c = deid_patients_table.c
        with self.engine.connect() as conn:
            row = conn.execute(select(deid_patients_table).where(and_(c.project == self.name,
                                                                      c.pseudonym == pseudonym))).first()
        return None if row is None else _entry(row)

    def _offset(self, issuer: str, patient_id: str) -> int:
        shift = self.project.config.date_shift
        return self.key.date_offset(issuer, patient_id, shift.min_days, shift.max_days)

    def _insert(self, issuer: str, patient_id: str, pseudonym: str) -> bool:
        """Insert the patient's row; False if the primary key or the pseudonym is taken meanwhile."""
        now = time.time()
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(deid_patients_table).values(
                    project=self.name, issuer=issuer, patient_id=patient_id, pseudonym=pseudonym,
                    date_offset=self._offset(issuer, patient_id), first_used=now, last_used=now))
        except IntegrityError:
            return False
        return True

    def _candidates(self, issuer: str, patient_id: str) -> Iterable[str]:
        """Pseudonyms to try for a new patient, in order (each one tried once it is seen free)."""
        policy = self.project.config.pseudonyms
        if policy.names:
            c = deid_patients_table.c
            with self.engine.connect() as conn:
                used = set(conn.execute(select(c.pseudonym).where(c.project == self.name)).scalars())
            free = [n for n in policy.names if n not in used]
            if not free:
                raise Conflict(f"project {self.name!r}: every one of its {len(policy.names)} pseudonym names is "
                               "used; add names to the end of its list")
            yield from free
            return
        for attempt in range(MAX_ATTEMPTS):
            yield self.key.pseudonym(issuer, patient_id, policy.prefix, policy.digits, attempt)

    def _new(self, issuer: str, patient_id: str) -> MapEntry:
        """A new patient: the first free candidate, inserted; or the row another worker inserted first."""
        # a names list is read again when other workers took its free names meanwhile: each round
        # someone inserted a row, so the rounds end (a row each, or "every name is used")
        rounds = MAX_ATTEMPTS if self.project.config.pseudonyms.names else 1
        for _round in range(rounds):
            for pseudonym in self._candidates(issuer, patient_id):
                if self._by_pseudonym(pseudonym) is not None:
                    continue  # another patient's (a collision): the next attempt
                inserted = self._insert(issuer, patient_id, pseudonym)
                found = self._lookup(issuer, patient_id, touch=not inserted)
                if found is not None:
                    return found  # ours, or the row of another worker that mapped this patient first
                # another patient took this pseudonym meanwhile: the next one
        raise Conflict(f"project {self.name!r}: no free pseudonym found for a new patient "
                       f"({MAX_ATTEMPTS} attempts); use more digits or more names")


def _insert_ignoring(conn: Connection, table: Any) -> Any:
    """``INSERT ... ON CONFLICT DO NOTHING`` in the database's own dialect (a row another worker wrote
    between our read and our insert is left as it is, and the batch goes on)."""
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(table).on_conflict_do_nothing()
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert(table).on_conflict_do_nothing()
