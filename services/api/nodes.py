"""``/api/v1/nodes``: DICOM peers kept in the database, C-ECHO and C-FIND (QIDO-RS for a DICOMweb node) through
them. A node names its DICOMweb secret, or keeps one stored through ``PUT /nodes/{name}/secret``, sealed with
``PACSBRIDGE_SECRET_KEY``: nothing here returns a secret (a node's output says ``web_secret_stored``), and
the body of that request is never logged or quoted in an error.

Reading needs role ``read``; echo and query ``user`` (they talk to the PACS);
creating, changing and deleting nodes ``admin``.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Iterator

from flask import Blueprint, Response

from pacsbridge.shared.core.errors import ConfigError, Conflict, DicomWebError, DimseError, InvalidRequest
from pacsbridge.shared.dicom.node import NAME_PATTERN, Node, NodeModel, NodePatch, NodeReplace
from pacsbridge.shared.dicom.query import Query, QueryModel
from pacsbridge.shared.nodes.searchers import uses_qido

from .auth import requires
from .contract import READ, WRITE, operation
from .models import Echo, FindResult, NodeList, NodeOut, NodeSecret, answer
from .params import check_known, json_object
from .state import state

__all__ = ["bp", "MAX_FIND_RESULTS"]

bp = Blueprint("nodes", __name__)

#: The most C-FIND answers one query returns (the answer says when it was cut).
MAX_FIND_RESULTS = 10000
#: Seconds for each step of an echo (connection, association, C-ECHO); the whole echo gets 2 s more.
ECHO_SECONDS = 10.0
#: Seconds for each step of a query, and for the whole query: an answer (or a clear error) comes
#: before a gunicorn worker's default 30 s timeout kills the request.
QUERY_SECONDS = (20.0, 25.0)


@contextlib.contextmanager
def _unreachable(node: Node) -> Iterator[None]:
    """A host that does not resolve or a socket error is the peer's failure (502), not ours."""
    try:
        yield
    except (OSError, ValueError) as exc:
        raise DimseError(f"node {node.name!r} ({node.ae_title}@{node.host}:{node.port}) is unreachable: {exc}") \
            from None


def _path(name: str) -> str:
    return f"/api/v1/nodes/{name}"


def _out(node: Node) -> dict[str, Any]:
    """A node as the API shows it: ``to_dict`` (never the sealed secret) and whether one is stored."""
    return answer(NodeOut, {**node.to_dict(), "path": _path(node.name),  # type: ignore[no-any-return]
                            "web_secret_stored": node.web_secret_stored})


_NAME = {"name": {"type": "string", "minLength": 1, "maxLength": 64, "pattern": NAME_PATTERN}}
_PROJECT = "`project`, if not '', names an existing de-identification project (`project`)"
_RENAME = ("`name`, if given, is the path's: a node cannot be renamed (delete it and create another)", _PROJECT)


@bp.get("/nodes")
@operation("List nodes", "nodes", {200: ("nodes", NodeList)})
def list_nodes() -> dict[str, Any]:
    check_known(())
    nodes = state().jobs.list_nodes()
    return answer(NodeList, {"items": [_out(n) for n in nodes], "total": len(nodes)})  # type: ignore[no-any-return]


@bp.post("/nodes")
@requires("admin")
@operation("Create a node", "nodes", {201: ("created", NodeOut)}, errors=WRITE + (409,), body=NodeModel,
           rules=(_PROJECT,))
def create_node() -> tuple[dict[str, Any], int, dict[str, str]]:
    check_known(())
    node = state().jobs.add_node(Node.from_dict(json_object()))
    return _out(node), 201, {"Location": _path(node.name)}


@bp.get("/nodes/<name>")
@operation("Read a node", "nodes", {200: ("the node", NodeOut)}, errors=READ + (404,), path=_NAME)
def get_node(name: str) -> dict[str, Any]:
    check_known(())
    return _out(state().jobs.get_node(name))


@bp.put("/nodes/<name>")
@requires("admin")
@operation("Replace a node", "nodes", {200: ("replaced", NodeOut)}, errors=WRITE + (404,), body=NodeReplace,
           path=_NAME, rules=_RENAME, description="Every field; those left out take their defaults.")
def replace_node(name: str) -> dict[str, Any]:
    """Replace every field (fields left out take their defaults); the name cannot change."""
    check_known(())
    body = json_object()
    if "name" in body and body["name"] != name:
        raise InvalidRequest("a node cannot be renamed; delete it and create another", "name")
    jobs = state().jobs
    jobs.get_node(name)  # 404 before 400s about the body
    node = Node.from_dict({**body, "name": name})
    return _out(jobs.update_node(name, node.to_dict()))


@bp.patch("/nodes/<name>")
@requires("admin")
@operation("Change some fields of a node", "nodes", {200: ("changed", NodeOut)}, errors=WRITE + (404,),
           body=NodePatch, path=_NAME, rules=_RENAME,
           description="Only the fields given change (null or absent: unchanged); the node is then checked whole.")
def update_node(name: str) -> dict[str, Any]:
    """Change the fields given, keep the others."""
    check_known(())
    body = json_object()
    jobs = state().jobs
    jobs.get_node(name)
    return _out(jobs.update_node(name, body))


@bp.delete("/nodes/<name>")
@requires("admin")
@operation("Delete a node", "nodes", {204: ("deleted", None)}, errors=(400, 401, 403, 404, 409, 503), path=_NAME,
           description="409 while a queued or running job uses it.")
def delete_node(name: str) -> Response:
    check_known(())
    state().jobs.delete_node(name)
    return Response(status=204)


@bp.put("/nodes/<name>/secret")
@requires("admin")
@operation("Store the node's DICOMweb secret", "nodes", {204: ("stored (sealed)", None)}, errors=WRITE + (404, 409),
           body=NodeSecret, path=_NAME,
           description="The password (web_auth basic) or token (bearer), kept encrypted with "
                       "PACSBRIDGE_SECRET_KEY and used before the secret web_secret names; never returned "
                       "(the node says `web_secret_stored`). 409 when PACSBRIDGE_SECRET_KEY is not set.")
def put_secret(name: str) -> Response:
    """Seal the body's secret with the deployment's key and keep it in the node's row."""
    from pacsbridge.shared.core.models import check
    from pacsbridge.shared.nodes.credentials import check_secret, seal

    check_known(())
    st = state()
    st.jobs.get_node(name)  # 404 before 400s about the body
    secret = check_secret(check(NodeSecret, json_object(), field="secret").secret)
    if not st.settings.secret_key:
        raise Conflict("PACSBRIDGE_SECRET_KEY is not set: secrets cannot be stored on this deployment (set it "
                       "for the API and the workers, or name the secret in the node's web_secret)")
    st.jobs.set_node_secret(name, seal(secret, st.settings.secret_key))
    return Response(status=204)


@bp.delete("/nodes/<name>/secret")
@requires("admin")
@operation("Forget the node's stored DICOMweb secret", "nodes", {204: ("forgotten (or none was stored)", None)},
           errors=(400, 401, 403, 404, 503), path=_NAME,
           description="The node then uses the secret its web_secret names, if any. Idempotent: 204 also when "
                       "none was stored (the node's `web_secret_stored` says which); 404 only for an unknown "
                       "node.")
def delete_secret(name: str) -> Response:
    """Forget the stored secret. A DELETE of nothing is still a 204 (RFC 9110: DELETE is idempotent), so a
    retried request, or a client that does not know, is not an error; a missing node is a 404."""
    check_known(())
    state().jobs.clear_node_secret(name)
    return Response(status=204)


@bp.post("/nodes/<name>/echo")
@requires("user")
@operation("C-ECHO the node", "nodes", {200: ("the node answered", Echo)}, errors=(400, 401, 403, 404, 502, 503),
           path=_NAME)
def echo(name: str) -> dict[str, Any]:
    """C-ECHO the node; a failure is a 502 with the reason, within :data:`ECHO_SECONDS` + 2 s."""
    from pacsbridge.shared.dicom import dimse

    check_known(())
    st = state()
    node = st.jobs.get_node(name)
    with _unreachable(node):
        seconds = dimse.echo(node, calling_ae=st.settings.ae_title, timeout=ECHO_SECONDS)
    return answer(Echo, {"node": name, "ok": True, "seconds": round(seconds, 4),  # type: ignore[no-any-return]
                         "checked_at": time.time()})


@bp.post("/nodes/<name>/query")
@requires("user")
@operation("C-FIND on the node", "nodes", {200: ("matches", FindResult)}, errors=WRITE + (404, 409, 502),
           body=QueryModel, path=_NAME, rules=QueryModel.rules,
           description="At the level of the query (default study); at most 10,000 answers (`truncated` says so). "
                       "409 when the node does not allow C-FIND.")
def query(name: str) -> dict[str, Any]:
    """C-FIND on the node at the level of the body's query (default ``study``)."""
    from pacsbridge.shared.dicom import dimse

    check_known(())
    st = state()
    node = st.jobs.get_node(name)
    q = Query.from_dict(json_object())
    if not node.allow_find:
        raise Conflict(f"node {name!r} does not allow C-FIND (allow_find is false)")
    step, whole = QUERY_SECONDS
    if uses_qido(node):  # a DICOMweb node: QIDO-RS, the same answer
        from pacsbridge.shared.nodes.dicomweb import QidoSearcher

        with _unreachable(node):
            try:
                searcher = QidoSearcher(node, timeout=min(step, node.web_timeout), settings=st.settings)
            except ConfigError as exc:  # its secret is missing: the node cannot be asked (502, like a refusal)
                text = str(exc)
                raise DicomWebError(text if text.startswith("node ") else f"node {name!r}: {text}") from None
            found = searcher.find(q, max_results=MAX_FIND_RESULTS)
        return answer(FindResult, {  # type: ignore[no-any-return]
            "node": name, "level": q.level, "query": q.to_dict(), "count": len(found),
            "truncated": found.truncated, "results": list(found)})
    with _unreachable(node):
        with dimse.associate(node, st.settings.ae_title, timeout=step, deadline=whole) as assoc:
            results = dimse.find_all(node, q, st.settings.ae_title, level=q.level, timeout=step,
                                     max_results=MAX_FIND_RESULTS, assoc=assoc)
    return answer(FindResult, {  # type: ignore[no-any-return]
        "node": name, "level": q.level, "query": q.to_dict(), "count": len(results),
        "truncated": bool(getattr(results, "truncated", False)), "results": list(results)})
