"""A DICOM peer as pacsbridge knows it: AE title, address, what it allows and its limits.

Stored as a row of ``pacsbridge_nodes`` (:mod:`pacsbridge.shared.jobs.store`); validated here, so that
the DIMSE client and every job read one description of a node.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Literal, Mapping

from pydantic import Field

from pacsbridge.shared.core.errors import InvalidRequest
from pacsbridge.shared.core.models import TEXT_PATTERN, Integral, Model, check

__all__ = ["Node", "NodeModel", "NodePatch", "NodeReplace", "NAME_PATTERN", "AET_PATTERN", "AETitle", "NodeName"]

#: A node's name: it is a path segment of the API (``/api/v1/nodes/<name>``).
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
#: An AE title (PS3.5 AE): 1 to 16 printable characters, no backslash, not only spaces. The one rule of
#: every AE title we are given (a node's own and its C-MOVE destination).
AET_PATTERN = r"^ {0,15}[\x21-\x5b\x5d-\x7e][\x20-\x5b\x5d-\x7e]{0,15}$"
AETitle = Annotated[str, Field(max_length=16, pattern=AET_PATTERN)]
NodeName = Annotated[str, Field(pattern=NAME_PATTERN)]
Port = Annotated[Annotated[int, Field(ge=1, le=65535)], Integral]
Associations = Annotated[Annotated[int, Field(ge=1, le=64)], Integral]
_WINDOW = r"^(([01][0-9]|2[0-3]):[0-5][0-9]-([01][0-9]|2[0-3]):[0-5][0-9])?$"
_AET_HELP = "an AE title: 1 to 16 printable characters, no backslash, not only spaces"


class NodeModel(Model):
    """A node as given to the API (``POST /nodes``) or to ``pacsbridge nodes add``."""

    help = {
        "name": "letters, digits, '_', '.', '-' (at most 64, starting with a letter or digit)",
        "ae_title": _AET_HELP,
        "move_destination": _AET_HELP + " ('' = our own AE title)",
        "host": "a host name or IP address",
        "port": "a TCP port, 1 to 65535",
        "retrieve": "'move' or 'get'",
        "max_associations": "1 to 64",
        "max_rate": "instances per second, 0 for unlimited",
        "move_window": "HH:MM-HH:MM, e.g. 20:00-06:00",
        "description": "at most 255 printable characters",
        "project": "the name of a de-identification project ('' = none)",
    }

    name: NodeName
    ae_title: AETitle
    host: Annotated[str, Field(min_length=1, max_length=255, pattern=r"^[A-Za-z0-9.:_-]+$")]
    port: Port
    retrieve: Literal["move", "get"] = Field("move", description="C-MOVE (to move_destination) or C-GET")
    move_destination: AETitle | Literal[""] = Field("", description="C-MOVE destination AE ('' = our own AE title)")
    allow_find: bool = True
    allow_move: bool = True
    allow_get: bool = True
    allow_store: bool = True
    max_associations: Associations = 2
    max_rate: Annotated[float, Field(ge=0)] = Field(0.0, description="instances per second, 0 = unlimited")
    move_window: Annotated[str, Field(pattern=_WINDOW)] = Field(
        "", description="HH:MM-HH:MM (local time, may wrap midnight) when C-MOVE is allowed; '' = any time")
    description: Annotated[str, Field(max_length=255, pattern=TEXT_PATTERN)] = ""
    project: NodeName | Literal[""] = Field(
        "", description="de-identification project of everything sent to this node when a job names none "
                        "('' = none)")
    identifiable: bool = Field(
        True, description="may receive identifiable data; false: a job sending to it must be de-identified "
                          "under a project (its own, or the node's)")


class NodeReplace(NodeModel):
    """``PUT /nodes/{name}``: every field (those left out take their defaults); ``name``, if given, must be
    the path's (a node cannot be renamed)."""

    name: NodeName | None = None  # type: ignore[assignment]


class NodePatch(NodeModel):
    """``PATCH /nodes/{name}``: only the fields to change (``name``, if given, must be the path's)."""

    name: NodeName | None = None  # type: ignore[assignment]
    ae_title: AETitle | None = None  # type: ignore[assignment]
    host: Annotated[str, Field(min_length=1, max_length=255, pattern=r"^[A-Za-z0-9.:_-]+$")] | None = None  # type: ignore[assignment]
    port: Port | None = None  # type: ignore[assignment]
    retrieve: Literal["move", "get"] | None = None  # type: ignore[assignment]
    move_destination: AETitle | Literal[""] | None = None  # type: ignore[assignment]
    allow_find: bool | None = None  # type: ignore[assignment]
    allow_move: bool | None = None  # type: ignore[assignment]
    allow_get: bool | None = None  # type: ignore[assignment]
    allow_store: bool | None = None  # type: ignore[assignment]
    max_associations: Associations | None = None  # type: ignore[assignment]
    max_rate: Annotated[float, Field(ge=0)] | None = None  # type: ignore[assignment]
    move_window: Annotated[str, Field(pattern=_WINDOW)] | None = None  # type: ignore[assignment]
    description: Annotated[str, Field(max_length=255, pattern=TEXT_PATTERN)] | None = None  # type: ignore[assignment]
    project: NodeName | Literal[""] | None = None  # type: ignore[assignment]
    identifiable: bool | None = None  # type: ignore[assignment]


def _node_field(loc: tuple[Any, ...]) -> str:
    return str(loc[0]) if loc else "node"


@dataclasses.dataclass(frozen=True)
class Node:
    """A DICOM peer (a PACS to query and retrieve from, or a destination to push to).

    ``retrieve`` is ``move`` (C-MOVE to ``move_destination``, our listener's
    AE title by default) or ``get`` (C-GET straight into storage).
    ``max_rate`` is instances per second (0: unlimited); ``move_window``
    ``HH:MM-HH:MM`` (local time, may wrap midnight; '' = any time).
    Validated by :class:`NodeModel`.
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
    project: str = ""
    identifiable: bool = True

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
        if partial_of is not None:
            check(NodePatch, data, field="node", rename=_node_field)  # unknown fields before merging
            data = {**partial_of.to_dict(), **{k: v for k, v in data.items() if v is not None}}
        model = check(NodeModel, data, field="node", rename=_node_field)
        return cls(**{**model.model_dump(), "max_rate": float(model.max_rate)})

    def validate(self) -> None:
        """Raise :class:`InvalidRequest` for an impossible value."""
        check(NodeModel, self.to_dict(), field="node", rename=_node_field)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
