"""A DICOM peer as pacsbridge knows it: AE title, address, what it allows and its limits.

Stored as a row of ``pacsbridge_nodes`` (:mod:`pacsbridge.shared.jobs.store`); validated here, so that
the DIMSE client and every job read one description of a node.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

from pacsbridge.shared.core.errors import InvalidRequest

__all__ = ["Node"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
_AET = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}\Z")  # printable, no backslash
_WINDOW = re.compile(r"^([01][0-9]|2[0-3]):[0-5][0-9]-([01][0-9]|2[0-3]):[0-5][0-9]\Z")


@dataclasses.dataclass(frozen=True)
class Node:
    """A DICOM peer (a PACS to query and retrieve from, or a destination to push to).

    ``retrieve`` is ``move`` (C-MOVE to ``move_destination``, our listener's
    AE title by default) or ``get`` (C-GET straight into storage).
    ``max_rate`` is instances per second (0: unlimited); ``move_window``
    ``HH:MM-HH:MM`` (local time, may wrap midnight; '' = any time).
    """

    name: str
    ae_title: str
    host: str
    port: int
    retrieve: str = "move"
    move_destination: str = ""
    allow_find: bool = True
    allow_move: bool = True
    allow_get: bool = True
    allow_store: bool = True
    max_associations: int = 2
    max_rate: float = 0.0
    move_window: str = ""
    description: str = ""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], partial_of: "Node | None" = None) -> "Node":
        """Validate user input. With ``partial_of``, missing fields keep that node's values.

        Raises
        ------
        InvalidRequest
            Unknown field, wrong type or impossible value (the field is named).
        """
        if not isinstance(data, Mapping):
            raise InvalidRequest("a node must be a JSON object", "node")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise InvalidRequest(f"unknown field(s) {', '.join(map(repr, unknown))}; "
                                 f"known: {', '.join(fields)}", unknown[0])
        base = dataclasses.asdict(partial_of) if partial_of else {}
        merged = {**base, **data}
        for required in ("name", "ae_title", "host", "port"):
            if required not in merged:
                raise InvalidRequest("required", required)
        kw: dict[str, Any] = {}
        for name, f in fields.items():
            if name not in merged:
                continue
            value = merged[name]
            want: Any = {"str": str, "int": int, "float": (int, float), "bool": bool}[str(f.type)]
            if isinstance(value, bool) and want is not bool:
                raise InvalidRequest(f"expected {f.type}", name)
            if not isinstance(value, want):
                raise InvalidRequest(f"expected {f.type}", name)
            kw[name] = float(value) if f.type == "float" else value
        node = cls(**kw)
        node.validate()
        return node

    def validate(self) -> None:
        """Raise :class:`InvalidRequest` for an impossible value."""
        if not _NAME.match(self.name):
            raise InvalidRequest("letters, digits, '_', '.', '-' (at most 64, starting with a letter or digit)",
                                 "name")
        if not _AET.match(self.ae_title) or not self.ae_title.strip():
            raise InvalidRequest("an AE title: 1 to 16 printable characters, no backslash", "ae_title")
        if self.move_destination and not _AET.match(self.move_destination):
            raise InvalidRequest("an AE title: 1 to 16 printable characters, no backslash",
                                 "move_destination")
        if not self.host or len(self.host) > 255 or not re.match(r"^[A-Za-z0-9.:_-]+\Z", self.host):
            raise InvalidRequest("a host name or IP address", "host")
        if not 1 <= self.port <= 65535:
            raise InvalidRequest("a TCP port, 1 to 65535", "port")
        if self.retrieve not in ("move", "get"):
            raise InvalidRequest("'move' or 'get'", "retrieve")
        if not 1 <= self.max_associations <= 64:
            raise InvalidRequest("1 to 64", "max_associations")
        if self.max_rate < 0:
            raise InvalidRequest("instances per second, 0 for unlimited", "max_rate")
        if self.move_window and not _WINDOW.match(self.move_window):
            raise InvalidRequest("HH:MM-HH:MM, e.g. 20:00-06:00", "move_window")
        if len(self.description) > 255:
            raise InvalidRequest("at most 255 characters", "description")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
