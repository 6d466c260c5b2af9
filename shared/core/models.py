"""The base of every model of the API contract (pydantic v2), and its one way of refusing input.

Request bodies, job specs and query parameters are pydantic models (:mod:`pacsbridge.shared.dicom.query`,
:mod:`pacsbridge.shared.dicom.node`, :mod:`pacsbridge.shared.jobs.spec`); the CLI, the API and the worker
validate with them, and the API's OpenAPI document is generated from their JSON Schema
(:mod:`pacsbridge.api.contract`). A constraint is written once, as a JSON Schema keyword that
pydantic enforces (``pattern``, ``max_length``, ``ge`` ...), so what the document promises is what
the code checks.

:func:`check` turns pydantic's :class:`~pydantic.ValidationError` into the
:class:`~pacsbridge.shared.core.errors.InvalidRequest` every caller already handles: one field named
(``selection.PatientID``), one message in the model's own words (:attr:`Model.help`).
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Mapping, TypeVar, get_args

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError
from pydantic_core import ErrorDetails, PydanticCustomError

from .errors import InvalidRequest

__all__ = ["Model", "check", "refuse", "TEXT_PATTERN", "CONTROL_FREE", "Integral", "AET_PATTERN"]

#: Free text: no control characters (the API refuses them in every string of a body).
TEXT_PATTERN = r"^[^\x00-\x1f\x7f]*$"
CONTROL_FREE = TEXT_PATTERN
#: An AE title (PS3.5 AE): 1 to 16 printable characters, no backslash, not only spaces. The one rule of
#: every AE title we are given: a node's own and its C-MOVE destination (shared/dicom/node.py) and ours
#: (``PACSBRIDGE_AE_TITLE``, shared/core/config.py).
AET_PATTERN = r"^ {0,15}[\x21-\x5b\x5d-\x7e][\x20-\x5b\x5d-\x7e]{0,15}$"

M = TypeVar("M", bound=BaseModel)


def _integral(value: Any) -> Any:
    """JSON has one number type: ``392.0`` is the integer 392 (JSON Schema says so too); ``392.5`` is not."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
        return int(value)
    return value


#: Put on an integer field: an integer as JSON Schema means it (a number without a fraction; a string or a
#: boolean is not one). Wrap it around the bounded type, ``Annotated[Annotated[int, Field(ge=1)], Integral]``,
#: so that the document shows the bounds as ``minimum`` / ``maximum``.
Integral = BeforeValidator(_integral)


class Model(BaseModel):
    """A model of the contract: unknown fields refused, no type coercion (``"4242"`` is not a port)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    #: ``{field: message}``: what to say when the value of that field is refused (wrong type aside).
    help: ClassVar[dict[str, str]] = {}


def refuse(message: str) -> PydanticCustomError:
    """An error whose message is said as it is (raise it in a validator)."""
    return PydanticCustomError("pacsbridge", message)


_TYPE_WORDS = {
    "string_type": "expected a string", "int_type": "expected int", "int_from_float": "expected int",
    "float_type": "expected float", "bool_type": "expected bool", "list_type": "expected a list",
    "dict_type": "expected a JSON object", "model_type": "expected a JSON object",
    "model_attributes_type": "expected a JSON object", "is_instance_of": "expected a JSON object",
}


def _helps(model: type[BaseModel]) -> list[dict[str, str]]:
    """The ``help`` of ``model`` and of the models its fields hold (a job request's query ...)."""
    out, todo, seen = [], [model], set()
    while todo:
        m = todo.pop(0)
        if m in seen:
            continue
        seen.add(m)
        out.append(getattr(m, "help", {}))
        for f in m.model_fields.values():
            todo += [t for t in _types(f.annotation) if isinstance(t, type) and issubclass(t, BaseModel)]
    return out


def _types(annotation: Any) -> list[Any]:
    args = get_args(annotation)
    return [annotation] if not args else [t for a in args for t in _types(a)]


def _field(loc: tuple[Any, ...], rename: Callable[[tuple[Any, ...]], str] | None) -> str:
    if rename is not None:
        return rename(loc)
    return ".".join(str(p) for p in loc if isinstance(p, str))


def _message(err: ErrorDetails, model: type[BaseModel], known: list[str]) -> str:
    kind = err["type"]
    if kind == "pacsbridge":
        return err["msg"]
    if kind == "extra_forbidden":
        return f"unknown field(s) {err['loc'][-1]!r}; known: {', '.join(known)}"
    if kind == "missing":
        return "required"
    if kind not in ("string_type", "list_type", "dict_type", "model_type", "int_type", "float_type", "bool_type"):
        for name in reversed(err["loc"]):
            for helper in _helps(model):
                if isinstance(name, str) and name in helper:
                    return str(helper[name])
    if kind in _TYPE_WORDS:
        return _TYPE_WORDS[kind]
    return err["msg"]


def check(model: type[M], data: Any, *, field: str = "body", context: Mapping[str, Any] | None = None,
          rename: Callable[[tuple[Any, ...]], str] | None = None) -> M:
    """``model`` validated from ``data`` (parsed JSON), or :class:`InvalidRequest` naming one field.

    ``field`` names the whole when it is not an object (or a rule of the whole fails);
    ``rename`` maps an error's location to the field named (default: its names joined by dots).
    Unknown fields are reported first (as before pydantic), then the first error in field order.
    """
    if not isinstance(data, Mapping):
        raise InvalidRequest(f"{field if field != 'body' else 'the body'} must be a JSON object", field)
    try:
        return model.model_validate(dict(data), context=dict(context or {}))
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        err = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
        loc = tuple(err["loc"])
        known = sorted(model.model_fields)
        name = _field(loc, rename) or field
        raise InvalidRequest(_message(err, model, known), name) from None
