"""A DICOM peer as pacsbridge knows it: AE title, address, DICOMweb endpoint, what it allows and its limits.

Stored as a row of ``pacsbridge_nodes`` (:mod:`pacsbridge.shared.jobs.store`); validated here, so that
the DIMSE client, the DICOMweb client and every job read one description of a node.

A node speaks DIMSE (``ae_title``, ``host``, ``port``), DICOMweb (``web_url``) or both. A DICOMweb-only
node has ``ae_title`` '' and ``port`` 0 (``host`` may be ''): allowed only when ``web_url`` is set, so
every node that existed before DICOMweb reads and validates as it did. Every DIMSE use goes through
:func:`pacsbridge.shared.dicom.dimse.associate`, which refuses such a node with a clear error
(:attr:`Node.has_dimse`).

A node's secret is found when a request is made (:func:`pacsbridge.shared.nodes.credentials.node_secret`):
the one stored for it, kept sealed (encrypted with ``PACSBRIDGE_SECRET_KEY``) in ``web_secret_sealed``, else
the one its ``web_secret`` *names* (an environment variable of that name, else a file of that name under
``PACSBRIDGE_SECRETS_DIR``). :meth:`Node.to_dict` never includes the sealed text (nor does ``repr``): what
leaves through the API is only whether there is one (``web_secret_stored``).

``web_auth`` basic or bearer needs a secret, but a node is created before its secret can be stored
(``PUT /nodes/{name}/secret`` names an existing node), so the model does not require ``web_secret``: a node
with neither is accepted, and a request to it fails with an error saying how to give it one.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Literal, Mapping

from pydantic import Field, model_validator

from pacsbridge.shared.core.errors import InvalidRequest
from pacsbridge.shared.core.models import AET_PATTERN, TEXT_PATTERN, Integral, Model, check

__all__ = ["Node", "NodeModel", "NodePatch", "NodeReplace", "NAME_PATTERN", "AET_PATTERN", "AETitle", "NodeName",
           "WEB_OPERATIONS", "DEFAULT_PREFER", "SECRET_NAME_PATTERN"]

#: A node's name: it is a path segment of the API (``/api/v1/nodes/<name>``).
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
#: An AE title: AET_PATTERN (shared/core/models.py), the one rule of every AE title, ours included.
AETitle = Annotated[str, Field(max_length=16, pattern=AET_PATTERN)]
NodeName = Annotated[str, Field(pattern=NAME_PATTERN)]
Port = Annotated[Annotated[int, Field(ge=1, le=65535)], Integral]
Associations = Annotated[Annotated[int, Field(ge=1, le=64)], Integral]
_WINDOW = r"^(([01][0-9]|2[0-3]):[0-5][0-9]-([01][0-9]|2[0-3]):[0-5][0-9])?$"
_AET_HELP = "an AE title: 1 to 16 printable characters, no backslash, not only spaces"
#: Retrieve operations a node may prefer, in the order given by its ``prefer``.
WEB_OPERATIONS = ("wado-rs", "wado-uri", "c-get", "c-move")
#: ADIT's order: WADO-RS, then C-GET, then C-MOVE (each only when the node speaks it).
DEFAULT_PREFER = "wado-rs,c-get,c-move"
_PREFER = r"^(wado-rs|wado-uri|c-get|c-move)(,(wado-rs|wado-uri|c-get|c-move)){0,3}$"
#: A secret's name: an environment variable name or a file name under the secrets folder (no '/', no '..').
SECRET_NAME_PATTERN = r"^([A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?$"
_URL = r"^(https?://[^\s\\]{1,2040})?$"
_Url = Annotated[str, Field(max_length=2048, pattern=_URL)]
_Host = Annotated[str, Field(max_length=255, pattern=r"^[A-Za-z0-9.:_-]*$")]
_Port = Annotated[Annotated[int, Field(ge=0, le=65535)], Integral]
_Timeout = Annotated[float, Field(gt=0, le=3600)]
_Path = Annotated[str, Field(max_length=1024, pattern=r"^[^\x00-\x1f\x7f]*$")]


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
        "web_url": "an http(s) URL of the DICOMweb root ('' = no DICOMweb)",
        "qido_url": "an http(s) URL ('' = web_url)",
        "wado_url": "an http(s) URL ('' = web_url)",
        "wado_uri_url": "an http(s) URL ('' = web_url)",
        "stow_url": "an http(s) URL ('' = web_url)",
        "web_auth": "'none', 'basic' or 'bearer'",
        "web_secret": "the name of a secret (letters, digits, '_', '.', '-'; no '/'): never the secret itself",
        "prefer": "a comma list of wado-rs, wado-uri, c-get, c-move",
    }

    name: NodeName
    ae_title: AETitle | Literal[""] = Field(
        description="the node's AE title; '' (with port 0) for a DICOMweb-only node (web_url set)")
    host: _Host = Field(description="host name or IP address ('' only for a DICOMweb-only node)")
    port: _Port = Field(description="TCP port; 0 only for a DICOMweb-only node")
    retrieve: Literal["move", "get"] = Field("move", description="C-MOVE (to move_destination) or C-GET")
    move_destination: AETitle | Literal[""] = Field("", description="C-MOVE destination AE ('' = our own AE title)")
    allow_find: bool = True
    allow_move: bool = True
    allow_get: bool = True
    allow_store: bool = True
    max_associations: Associations = 2
    max_rate: Annotated[float, Field(ge=0)] = Field(0.0, description="instances per second, 0 = unlimited")
    move_window: Annotated[str, Field(pattern=_WINDOW)] = Field(
        "", description="HH:MM-HH:MM (local time, may wrap midnight) when retrieves from it may run (C-MOVE, C-GET, "
                           "WADO); '' = any time")
    description: Annotated[str, Field(max_length=255, pattern=TEXT_PATTERN)] = ""
    project: NodeName | Literal[""] = Field(
        "", description="de-identification project of everything sent to this node when a job names none "
                        "('' = none)")
    identifiable: bool = Field(
        True, description="may receive identifiable data; false: a job sending to it must be de-identified "
                          "under a project (its own, or the node's)")
    web_url: _Url = Field("", description="DICOMweb root, e.g. http://host:8042/dicom-web ('' = no DICOMweb)")
    qido_url: _Url = Field("", description="QIDO-RS root ('' = web_url)")
    wado_url: _Url = Field("", description="WADO-RS root ('' = web_url)")
    wado_uri_url: _Url = Field("", description="WADO-URI endpoint ('' = web_url)")
    stow_url: _Url = Field("", description="STOW-RS root ('' = web_url)")
    web_auth: Literal["none", "basic", "bearer"] = Field("none", description="DICOMweb authentication")
    web_user: Annotated[str, Field(max_length=255, pattern=TEXT_PATTERN)] = Field(
        "", description="user name of basic authentication")
    web_secret: Annotated[str, Field(max_length=128, pattern=SECRET_NAME_PATTERN)] = Field(
        "", description="the NAME of the password or token: an environment variable of that name, else a file "
                        "of that name under PACSBRIDGE_SECRETS_DIR (never the secret itself; a secret stored "
                        "with PUT /nodes/{name}/secret is used before it)")
    web_verify: bool = Field(True, description="verify the server's TLS certificate")
    web_ca_bundle: _Path = Field("", description="a CA bundle (PEM file) to verify it with ('' = the system's)")
    web_timeout: _Timeout = Field(60.0, description="seconds per DICOMweb request (connect, and between reads)")
    prefer: Annotated[str, Field(pattern=_PREFER)] = Field(
        DEFAULT_PREFER, description="retrieve operations in order of preference when a job names no mode "
                                    "(wado-rs, wado-uri, c-get, c-move); those the node cannot do are skipped")

    @model_validator(mode="after")
    def _parts(self) -> "NodeModel":
        if self.ae_title == "" or self.port == 0 or self.host == "":
            if self.ae_title or self.port:
                raise InvalidRequest("a node has an AE title, a host and a port (a DIMSE node), or an empty "
                                     "AE title and port 0 (a DICOMweb-only node)",
                                     "ae_title" if not self.ae_title else "port" if not self.port else "host")
            if not self.web_url:
                raise InvalidRequest("a node without an AE title must have a web_url (a DICOMweb-only node)",
                                     "ae_title")
        if self.web_auth == "basic" and not self.web_user:
            raise InvalidRequest("web_auth 'basic' needs web_user", "web_user")
        return self


class NodeReplace(NodeModel):
    """``PUT /nodes/{name}``: every field (those left out take their defaults); ``name``, if given, must be
    the path's (a node cannot be renamed)."""

    name: NodeName | None = None  # type: ignore[assignment]


class NodePatch(NodeModel):
    """``PATCH /nodes/{name}``: only the fields to change (``name``, if given, must be the path's)."""

    name: NodeName | None = None  # type: ignore[assignment]
    ae_title: AETitle | None = None  # type: ignore[assignment]
    host: _Host | None = None  # type: ignore[assignment]
    port: _Port | None = None  # type: ignore[assignment]
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
    web_url: _Url | None = None  # type: ignore[assignment]
    qido_url: _Url | None = None  # type: ignore[assignment]
    wado_url: _Url | None = None  # type: ignore[assignment]
    wado_uri_url: _Url | None = None  # type: ignore[assignment]
    stow_url: _Url | None = None  # type: ignore[assignment]
    web_auth: Literal["none", "basic", "bearer"] | None = None  # type: ignore[assignment]
    web_user: Annotated[str, Field(max_length=255, pattern=TEXT_PATTERN)] | None = None  # type: ignore[assignment]
    web_secret: Annotated[str, Field(max_length=128, pattern=SECRET_NAME_PATTERN)] | None = None  # type: ignore[assignment]
    web_verify: bool | None = None  # type: ignore[assignment]
    web_ca_bundle: _Path | None = None  # type: ignore[assignment]
    web_timeout: _Timeout | None = None  # type: ignore[assignment]
    prefer: Annotated[str, Field(pattern=_PREFER)] | None = None  # type: ignore[assignment]

    @model_validator(mode="after")
    def _parts(self) -> "NodePatch":  # type: ignore[override]
        return self  # checked whole once merged with the node


def _node_field(loc: tuple[Any, ...]) -> str:
    return str(loc[0]) if loc else "node"


@dataclasses.dataclass(frozen=True)
class Node:
    """A DICOM peer (a PACS to query and retrieve from, or a destination to push to), DIMSE, DICOMweb or both.

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
    web_url: str = ""
    qido_url: str = ""
    wado_url: str = ""
    wado_uri_url: str = ""
    stow_url: str = ""
    web_auth: str = "none"
    web_user: str = ""
    web_secret: str = ""
    web_verify: bool = True
    web_ca_bundle: str = ""
    web_timeout: float = 60.0
    prefer: str = DEFAULT_PREFER
    #: The secret stored for it, encrypted (credentials.seal); never in :meth:`to_dict` nor ``repr``.
    web_secret_sealed: str = dataclasses.field(default="", repr=False, compare=False)

    @property
    def web_secret_stored(self) -> bool:
        """True when a secret is stored for this node (sealed in its row)."""
        return bool(self.web_secret_sealed)

    @property
    def has_dimse(self) -> bool:
        """True when the node speaks DIMSE (it has an AE title; a DICOMweb-only node has none)."""
        return bool(self.ae_title)

    @property
    def has_web(self) -> bool:
        """True when the node speaks DICOMweb (it has a ``web_url``)."""
        return bool(self.web_url)

    def service_url(self, service: str) -> str:
        """The root of ``service`` (``qido``, ``wado``, ``wado_uri``, ``stow``): its own URL, else ``web_url``."""
        return str(getattr(self, f"{service}_url") or self.web_url).rstrip("/")

    def preferences(self) -> list[str]:
        """The retrieve operations of ``prefer`` this node can do, in its order."""
        can = {"wado-rs": self.has_web, "wado-uri": self.has_web,
               "c-get": self.has_dimse and self.allow_get, "c-move": self.has_dimse and self.allow_move}
        return [op for op in self.prefer.split(",") if can.get(op)]

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
        sealed = partial_of.web_secret_sealed if partial_of is not None else ""  # a change keeps the stored secret
        return cls(**{**model.model_dump(), "max_rate": float(model.max_rate),
                      "web_timeout": float(model.web_timeout)}, web_secret_sealed=sealed)

    def validate(self) -> None:
        """Raise :class:`InvalidRequest` for an impossible value."""
        check(NodeModel, self.to_dict(), field="node", rename=_node_field)

    def to_dict(self) -> dict[str, Any]:
        """The node's fields as the API and the store's updates see them: without the sealed secret."""
        out = dataclasses.asdict(self)
        del out["web_secret_sealed"]
        return out
