"""The API contract: each view says what it takes and answers (:func:`operation`), and the OpenAPI
document is generated from that and from the pydantic models, served at ``/api/v1/openapi.json``.

Why not flask-openapi3 or spectree (docs/api.md says more): both validate in their own wrapper, with
their own JSON parsing and their own error bodies (422 and a list), before the view runs. The API's
order (token, then path and query-string text, then 404 for a missing node before a 400 about the
body) and its one error shape with one field named are behaviour that tests and clients rely on;
flask-openapi3 also wants its own ``OpenAPI`` app and ``APIBlueprint`` classes. What they would add is
the generation, and pydantic already makes the schemas (``TypeAdapter.json_schemas``): what is left is
the route table, which Flask's own ``url_map`` is. So the views validate with the models (explicitly,
where the order matters) and this module writes the document from the same models; a test checks that
every route of the app is in it, and schemathesis checks the running API against it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, TypeVar

from flask import Blueprint, Flask, current_app
from pydantic import TypeAdapter

from pacsbridge import __version__

from .auth import requires
from .models import Args, ErrorBody

__all__ = ["bp", "operation", "Operation", "document", "ERROR_TEXT", "CROSS_FIELD"]

bp = Blueprint("openapi", __name__)

F = TypeVar("F", bound=Callable[..., Any])

#: What each error status means (every operation lists those it can answer).
ERROR_TEXT = {
    400: "Bad request: malformed JSON, unknown field or parameter, wrong type or value, a control character "
         "(NUL ...) or bytes that are not UTF-8 in a path or query parameter, a lone surrogate in the body "
         "(`field` names it)",
    401: "No token, an unknown or expired token",
    403: "The token's role may not do this",
    404: "No such resource",
    405: "Method not allowed on this path",
    409: "Conflicts with the current state",
    413: "The body is larger than 1 MB",
    415: "The body is not application/json",
    502: "The DICOM peer refused, failed or could not be reached",
    503: "The index database is unavailable",
}
READ = (400, 401, 503)
WRITE = (400, 401, 403, 413, 415, 503)

#: Marks an operation whose body has rules between fields that JSON Schema cannot say: its description
#: lists them, and a body the schema accepts may still be refused with a 400 naming the rule.
CROSS_FIELD = "x-pacsbridge-rules-beyond-schema"


@dataclasses.dataclass
class Operation:
    summary: str
    tag: str
    responses: dict[int, tuple[str, Any]]
    errors: tuple[int, ...] = READ
    body: Any = None
    args: type[Args] | None = None
    params: Callable[[], list[dict[str, Any]]] | None = None
    path: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    description: str = ""
    rules: tuple[str, ...] = ()


def operation(summary: str, tag: str, responses: dict[int, tuple[str, Any]], *, errors: tuple[int, ...] = READ,
              body: Any = None, args: type[Args] | None = None,
              params: Callable[[], list[dict[str, Any]]] | None = None,
              path: dict[str, dict[str, Any]] | None = None, description: str = "",
              rules: tuple[str, ...] = ()) -> Callable[[F], F]:
    """Describe a view: ``responses`` ``{status: (text, model or None or (content type, schema) or a list of
    those, one per content type)}``, its ``errors``, its JSON ``body`` model (or ``(content type, schema)``
    of a body that is not JSON, or a list of those), its query-string ``args`` model (or ``params()`` made at run
    time), its path parameters' schemas, and ``rules``: what the body must also satisfy that a schema
    cannot say (a date range's order ...), written into the description."""

    def mark(view: F) -> F:
        view.pacsbridge_operation = Operation(summary, tag, responses, errors, body, args, params,  # type: ignore[attr-defined]
                                              path or {}, description, rules)
        return view

    return mark


def view_operation(view: Callable[..., Any]) -> Operation | None:
    return getattr(view, "pacsbridge_operation", None)


# -- the document -----------------------------------------------------------------------
def _strip_null_defaults(schema: Any) -> Any:
    """``"default": null`` on a field that is not nullable means "absent" here; the document leaves it out."""
    if isinstance(schema, dict):
        return {k: _strip_null_defaults(v) for k, v in schema.items() if not (k == "default" and v is None)}
    if isinstance(schema, list):
        return [_strip_null_defaults(v) for v in schema]
    return schema


class _Schemas:
    """Every model the operations name, made into ``components/schemas`` at once."""

    def __init__(self) -> None:
        self.inputs: list[tuple[Any, str, TypeAdapter[Any]]] = []
        self.keys: dict[tuple[int, str], Any] = {}

    def add(self, model: Any, mode: str) -> tuple[int, str]:
        key = (id(model), mode)
        if key not in self.keys:
            self.keys[key] = model
            self.inputs.append((key, mode, TypeAdapter(model)))  # type: ignore[arg-type]
        return key

    def build(self) -> tuple[dict[Any, Any], dict[str, Any]]:
        mapping, defs = TypeAdapter.json_schemas(self.inputs,  # type: ignore[arg-type]
                                                 ref_template="#/components/schemas/{model}")
        return mapping, defs.get("$defs", {})


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _query_parameters(args: type[Args]) -> list[dict[str, Any]]:
    schema = _strip_null_defaults(args.model_json_schema(ref_template="#/components/schemas/{model}"))
    out = []
    for name, prop in schema.get("properties", {}).items():
        prop = dict(prop)
        param: dict[str, Any] = {"name": name, "in": "query"}
        if "description" in prop:
            param["description"] = prop.pop("description")
        prop.pop("title", None)
        param["schema"] = prop
        out.append(param)
    return out


def document(app: Flask | None = None) -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``app`` (default: the current one), generated from its views' operations.

    Raises
    ------
    RuntimeError
        A route without an :func:`operation`: every route is in the document.
    """
    app = app or current_app
    schemas = _Schemas()
    pending: list[tuple[str, str, Operation, list[str]]] = []
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: r.rule):
        if rule.endpoint == "static":
            continue
        view = app.view_functions[rule.endpoint]
        op = view_operation(view)
        if op is None:
            raise RuntimeError(f"route {rule.rule} ({rule.endpoint}) has no operation: describe it with "
                               "pacsbridge.api.contract.operation")
        path = rule.rule
        for arg in rule.arguments:
            path = path.replace(f"<{arg}>", f"{{{arg}}}")
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            pending.append((path, method.lower(), op, sorted(rule.arguments)))
            for one in op.body if isinstance(op.body, list) else [op.body]:
                if one is not None and not isinstance(one, tuple):
                    schemas.add(one, "validation")
            for _, content in op.responses.values():
                for one in content if isinstance(content, list) else [content]:
                    if one is not None and not isinstance(one, tuple):
                        schemas.add(one, "serialization")
    schemas.add(ErrorBody, "serialization")
    mapping, defs = schemas.build()

    def ref(model: Any, mode: str) -> dict[str, Any]:
        return _strip_null_defaults(mapping[((id(model), mode), mode)])  # type: ignore[no-any-return]

    paths: dict[str, Any] = {}
    for path, method, op, arguments in pending:
        responses: dict[str, Any] = {}
        for status, (text, content) in sorted(op.responses.items()):
            if content is None:
                responses[str(status)] = {"description": text}
                continue
            media: dict[str, Any] = {}
            for one in content if isinstance(content, list) else [content]:  # a list: one per content type
                if isinstance(one, tuple):
                    mime, schema = one
                    media[mime] = {"schema": schema}
                else:
                    media["application/json"] = {"schema": ref(one, "serialization")}
            responses[str(status)] = {"description": text, "content": media}
        for status in op.errors:
            responses[str(status)] = {"$ref": f"#/components/responses/E{status}"}
        entry: dict[str, Any] = {"summary": op.summary, "operationId": f"{method}:{path}", "tags": [op.tag],
                                 "responses": responses}
        description = op.description
        if op.rules:
            description += ("\n\n" if description else "") + "Rules of the body that the schema cannot say " \
                "(a body that breaks one is a 400 naming the field):\n" + "\n".join(f"- {r}" for r in op.rules)
            entry[CROSS_FIELD] = list(op.rules)
        if description:
            entry["description"] = description
        if isinstance(op.body, (tuple, list)):  # (content type, schema), or several (a model among them: JSON)
            bodies = [op.body] if isinstance(op.body, tuple) else op.body
            entry["requestBody"] = {"required": True, "content": {
                ct: {"schema": sc} for ct, sc in (b if isinstance(b, tuple) else ("application/json",
                                                                                  ref(b, "validation"))
                                                  for b in bodies)}}
        elif op.body is not None:
            entry["requestBody"] = {"required": True,
                                    "content": {"application/json": {"schema": ref(op.body, "validation")}}}
        parameters = [{"name": a, "in": "path", "required": True,
                       "schema": op.path.get(a, {"type": "string", "minLength": 1})} for a in arguments]
        if op.args is not None:
            parameters += _query_parameters(op.args)
        if op.params is not None:
            parameters += op.params()
        if parameters:
            entry["parameters"] = parameters
        role = getattr(_view_for(app, path, method), "pacsbridge_role", "read")
        if role == "public":
            entry["security"] = []
        elif role == "admin":
            entry["summary"] += " (admin)"
        paths.setdefault(path, {})[method] = entry
    return {
        "openapi": "3.1.0",
        "info": {"title": "pacsbridge API", "version": __version__,
                 "description": "Nodes, jobs, de-identification projects and the Conquest index of a pacsbridge "
                                "installation. Every error is "
                                "`{\"error\": {\"status\", \"message\", \"field\"?, \"path\"}}`. Roles: read < user "
                                "(jobs, echo, query) < admin (nodes, projects, their maps, the audit, quarantine "
                                "decisions). Generated from the "
                                "pydantic models the API validates with (pacsbridge.api.contract)."},
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "a token of PACSBRIDGE_API_TOKENS"}},
            "schemas": _strip_null_defaults(defs),
            "responses": {f"E{c}": _json(ref(ErrorBody, "serialization"), text) for c, text in ERROR_TEXT.items()},
        },
    }


def _view_for(app: Flask, path: str, method: str) -> Callable[..., Any]:
    for rule in app.url_map.iter_rules():
        p = rule.rule
        for arg in rule.arguments:
            p = p.replace(f"<{arg}>", f"{{{arg}}}")
        if p == path and method.upper() in (rule.methods or ()):
            return app.view_functions[rule.endpoint]
    raise KeyError(path)


@bp.get("/openapi.json")
@requires("public")
@operation("This document (OpenAPI 3.1, generated from the models)", "meta",
           {200: ("OpenAPI 3.1 document", ("application/json", {"type": "object"}))}, errors=())
def openapi_json() -> dict[str, Any]:
    made = current_app.extensions.get("pacsbridge_openapi")
    if made is None:  # routes, models and the index's dicom.sql do not change while the process runs
        made = current_app.extensions["pacsbridge_openapi"] = document()
    return made  # type: ignore[no-any-return]

