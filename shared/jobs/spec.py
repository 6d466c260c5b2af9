"""What each kind of job takes, checked before a job row is written.

A request (an API body, or what the CLI builds) is a JSON object::

    {"kind": "retrieve", "node": "pacs", "query": {...}, "mode": "move"|"get", "webhook": "https://..."}
    {"kind": "push",     "node": "dest", "selection": {...}}
    {"kind": "repack",   "selection": {...}, "dest": "cohort-1", "template": "px-repack", "link": false}
    {"kind": "import",   "path": "incoming/batch-7"}

A *selection* names what we hold: ``{"PatientID": [...]}``, ``{"StudyInstanceUID": [...]}``,
``{"SeriesInstanceUID": [...]}`` or ``{"job": "<id of a retrieve job>"}`` (what it brought).

:func:`validate` returns ``(node, params, webhook)``; ``params`` is what the
runner of that kind reads (:mod:`pacsbridge.worker.runner`). Paths (``dest``,
``path``) are relative to ``PACSBRIDGE_EXPORT_ROOT`` / ``PACSBRIDGE_IMPORT_ROOT``
and may not climb out of them.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import Any, Mapping

from pacsbridge.shared.jobs import webhooks
from pacsbridge.shared.core.errors import ConfigError, InvalidRequest
from pacsbridge.shared.dicom.query import Query
from pacsbridge.shared.index.storage import Template

__all__ = ["validate", "SELECTION_KEYS", "safe_relative"]

SELECTION_KEYS = ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "job")
_ALLOWED = {
    "retrieve": {"kind", "node", "query", "mode", "webhook"},
    "push": {"kind", "node", "selection", "webhook"},
    "repack": {"kind", "selection", "dest", "template", "link", "webhook"},
    "import": {"kind", "path", "webhook"},
}
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*\Z")
_ID = re.compile(r"^[0-9a-f]{32}\Z")


def safe_relative(value: Any, field: str) -> str:
    """A relative POSIX path without ``..``, absolute parts or control characters."""
    if not isinstance(value, str) or not value.strip():
        raise InvalidRequest("expected a relative path", field)
    if len(value) > 255 or re.search(r"[\x00-\x1f\x7f\\]", value):
        raise InvalidRequest("at most 255 printable characters, no backslash", field)
    path = PurePosixPath(value)
    if path.is_absolute() or any(part in ("..", "") for part in path.parts):
        raise InvalidRequest("must stay inside its root: no leading '/', no '..'", field)
    return str(path)


def _selection(value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping) or len(value) != 1:
        raise InvalidRequest(f"an object with exactly one of {', '.join(SELECTION_KEYS)}", "selection")
    (key, items), = value.items()
    if key not in SELECTION_KEYS:
        raise InvalidRequest(f"unknown key {key!r}; expected one of {', '.join(SELECTION_KEYS)}", "selection")
    if key == "job":
        if not isinstance(items, str) or not _ID.match(items):
            raise InvalidRequest("a job id (32 hex digits)", "selection.job")
        return {"job": items}
    if isinstance(items, str):
        items = [items]
    if not isinstance(items, list) or not items or len(items) > 10000 \
            or not all(isinstance(i, str) and 0 < len(i) <= 64 for i in items):
        raise InvalidRequest("one value or a list of 1 to 10,000 values of at most 64 characters",
                             f"selection.{key}")
    if key != "PatientID" and not all(_UID.match(i) for i in items):
        raise InvalidRequest("DICOM UIDs (digits and dots)", f"selection.{key}")
    if key == "PatientID" and any(re.search(r"[\x00-\x1f\x7f\\*?]", i) for i in items):
        raise InvalidRequest("exact patient IDs (no wildcards, backslash or control characters)",
                             "selection.PatientID")
    return {key: items}


def _webhook(value: Any, policy: webhooks.Policy | None) -> str:
    if value in (None, ""):
        return ""
    if policy is None:  # the form only; the API passes its allow-list, and the sender checks again
        webhooks.parse_url(value)
    else:  # a listed name that does not resolve now is checked again when sent
        webhooks.check_url(value, policy, strict_resolve=False)
    return str(value)


def validate(body: Any, webhook_policy: webhooks.Policy | None = None
             ) -> tuple[str, str | None, dict[str, Any], str]:
    """Check a job request; ``webhook_policy`` (``PACSBRIDGE_WEBHOOK_ALLOW``) checks where its webhook goes.

    Returns
    -------
    (kind, node, params, webhook)

    Raises
    ------
    InvalidRequest
        Unknown kind or field, wrong type, unsafe path; the field is named.
    """
    if not isinstance(body, Mapping):
        raise InvalidRequest("a job request must be a JSON object", "body")
    kind = body.get("kind")
    if not isinstance(kind, str) or kind not in _ALLOWED:
        raise InvalidRequest(f"expected one of {', '.join(_ALLOWED)}", "kind")
    unknown = sorted(set(body) - _ALLOWED[kind])
    if unknown:
        raise InvalidRequest(f"unknown field(s) for a {kind} job: {', '.join(map(repr, unknown))}; "
                             f"known: {', '.join(sorted(_ALLOWED[kind]))}", unknown[0])
    webhook = _webhook(body.get("webhook"), webhook_policy)
    node: str | None = None
    if "node" in _ALLOWED[kind]:
        node = body.get("node")
        if not isinstance(node, str) or not node:
            raise InvalidRequest("the name of a configured node", "node")
    params: dict[str, Any] = {}
    if kind == "retrieve":
        params["query"] = Query.from_dict(body.get("query", {})).to_dict()
        mode = body.get("mode")
        if mode not in (None, "move", "get"):
            raise InvalidRequest("'move' or 'get' (default: the node's own)", "mode")
        if mode:
            params["mode"] = mode
    elif kind == "push":
        params["selection"] = _selection(body.get("selection"))
    elif kind == "repack":
        params["selection"] = _selection(body.get("selection"))
        params["dest"] = safe_relative(body.get("dest"), "dest")
        template = body.get("template", "px-repack")
        if not isinstance(template, str) or not template or len(template) > 1024:
            raise InvalidRequest("a preset name or a template string", "template")
        try:  # the runner's own check, now: a bad template is a 400, not a job that fails later
            Template(template)
        except ConfigError as exc:
            raise InvalidRequest(str(exc), "template") from None
        params["template"] = template
        link = body.get("link", False)
        if not isinstance(link, bool):
            raise InvalidRequest("true (hard links) or false (copies)", "link")
        params["link"] = link
    elif kind == "import":
        params["path"] = safe_relative(body.get("path"), "path")
    return kind, node, params, webhook
