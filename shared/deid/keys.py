"""The de-identification secret, each project's key, and everything derived from a key.

Every pseudonym, new UID and date offset is a keyed function (HMAC-SHA256) of the original value,
under a per-project key that is itself HMAC(secret, project name). The secret comes only from
``PACSBRIDGE_DEID_SECRET`` or ``PACSBRIDGE_DEID_SECRET_FILE``, never from the database: a project row
keeps only :attr:`ProjectKey.check`, so a mistyped secret is refused (:func:`verify`) instead of
silently making new pseudonyms. Without the secret nobody can recompute a pseudonym from a record
number (unlike an unkeyed hash, which anyone who can guess the number can).

:class:`KeyedIdentity` derives without a map (tests, and what the map falls back on for a value it
has not seen: see :mod:`pacsbridge.shared.deid.projects`).
"""

from __future__ import annotations

import hashlib
import hmac
from typing import TYPE_CHECKING, NamedTuple, Protocol

from pacsbridge.shared.core.errors import DeidSecretError

if TYPE_CHECKING:  # a type only: the settings (pydantic-settings) cost a de-identifying command's start
    from pacsbridge.shared.core.config import Settings

__all__ = ["secret", "ProjectKey", "Patient", "Identity", "KeyedIdentity", "verify", "UID_MAX"]

#: The longest UID (PS3.5 UI).
UID_MAX = 64


def secret(settings: Settings) -> bytes:
    """The secret of ``PACSBRIDGE_DEID_SECRET`` (or its ``_FILE``). Raises :class:`DeidSecretError`
    when it is not set: nothing can be de-identified without it."""
    if not settings.deid_secret:
        raise DeidSecretError("PACSBRIDGE_DEID_SECRET (or PACSBRIDGE_DEID_SECRET_FILE) is not set: "
                              "de-identification needs it (docs/deidentification.md)")
    return settings.deid_secret.encode("ascii")


class ProjectKey:
    """A project's key: HMAC-SHA256(secret, ``pacsbridge/project/<name>``)."""

    def __init__(self, secret: bytes, project: str) -> None:
        self.project = project
        self._key = hmac.new(secret, b"pacsbridge/project/" + project.encode("utf-8"), hashlib.sha256).digest()
        self._mac = hmac.new(self._key, digestmod=hashlib.sha256)

    @classmethod
    def from_bytes(cls, key: bytes, project: str) -> "ProjectKey":
        """The key itself, as :meth:`raw` gave it (a push's sender process gets it from its parent over
        a pipe, never the secret)."""
        made = cls.__new__(cls)
        made.project, made._key = project, key
        made._mac = hmac.new(key, digestmod=hashlib.sha256)
        return made

    def raw(self) -> bytes:
        """The key's bytes (for :meth:`from_bytes` in a child process; never logged, never stored)."""
        return self._key

    @property
    def check(self) -> str:
        """A check value of the key (stored with the project; reveals nothing of the key)."""
        return self.digest("check").hex()[:32]

    def digest(self, label: str, *parts: str) -> bytes:
        """HMAC-SHA256 under the key of ``label`` and ``parts`` (NUL-separated, so no two inputs meet)."""
        message = "\x00".join((label, *parts)).encode("utf-8")
        # a copy of the keyed object made once: the same HMAC without hashing the padded key again for
        # each of an instance's UIDs (about a third of a digest's cost, measured)
        mac = self._mac.copy()
        mac.update(message)
        return mac.digest()

    def number(self, label: str, *parts: str, modulo: int) -> int:
        """A keyed number in ``[0, modulo)``."""
        return int.from_bytes(self.digest(label, *parts), "big") % modulo

    def uid(self, original: str, root: str = "") -> str:
        """The new UID of ``original``: ``2.25.<keyed 128-bit number>`` (PS3.5 B.2), or ``<root>.<keyed
        number>`` with as many digits as fit in 64 characters."""
        n = int.from_bytes(self.digest("uid", original)[:16], "big")
        if not root or root == "2.25":
            return f"2.25.{n}"
        room = UID_MAX - len(root) - 1
        if room < 10:
            raise ValueError(f"UID root {root!r} leaves fewer than 10 digits")
        return f"{root}.{n % 10 ** room or 1}"

    def pseudonym(self, issuer: str, patient_id: str, prefix: str, digits: int, attempt: int = 0) -> str:
        """``prefix`` and ``digits`` keyed digits for a patient (``attempt`` > 0 after a collision)."""
        n = self.number("pseudonym", issuer, patient_id, str(attempt), modulo=10 ** digits)
        return f"{prefix}{n:0{digits}d}"

    def date_offset(self, issuer: str, patient_id: str, min_days: int, max_days: int) -> int:
        """The patient's offset in days, within ``[min_days, max_days]``, never 0 unless that is all
        the range holds."""
        choices = [d for d in range(min_days, max_days + 1) if d != 0] or [0]
        return choices[self.number("date_offset", issuer, patient_id, modulo=len(choices))]


def verify(key: ProjectKey, check: str) -> None:
    """Raise :class:`DeidSecretError` when ``key`` is not the key the project was made with."""
    if not hmac.compare_digest(key.check, check):
        raise DeidSecretError(f"project {key.project!r}: PACSBRIDGE_DEID_SECRET is not the secret this project was "
                              "made with (its key check value differs); restore the right secret "
                              "(docs/deidentification.md)")


class Patient(NamedTuple):
    """A patient as a project shows it."""

    pseudonym: str
    date_offset: int  # days added to every date


class Identity(Protocol):
    """Where the profile gets a patient's pseudonym and offset and a UID's replacement.

    :class:`KeyedIdentity` derives them; the project's map (:mod:`pacsbridge.shared.deid.projects`)
    looks them up first and records what it derives."""

    def patient(self, issuer: str, patient_id: str) -> Patient: ...

    def uid(self, original: str) -> str: ...


class KeyedIdentity:
    """Derives everything from the key, with no map (so no collision check of pseudonyms)."""

    def __init__(self, key: ProjectKey, prefix: str = "ANON", digits: int = 8, min_days: int = -365,
                 max_days: int = -1, uid_root: str = "") -> None:
        self.key, self.prefix, self.digits = key, prefix, digits
        self.min_days, self.max_days, self.uid_root = min_days, max_days, uid_root
        self._patients: dict[tuple[str, str], Patient] = {}

    def patient(self, issuer: str, patient_id: str) -> Patient:
        known = self._patients.get((issuer, patient_id))
        if known is None:  # derived once per patient (the offset's derivation lists the whole range)
            known = self._patients[(issuer, patient_id)] = Patient(
                self.key.pseudonym(issuer, patient_id, self.prefix, self.digits),
                self.key.date_offset(issuer, patient_id, self.min_days, self.max_days))
        return known

    def uid(self, original: str) -> str:
        return self.key.uid(original, self.uid_root)
