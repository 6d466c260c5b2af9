"""Bearer tokens from ``PACSBRIDGE_API_TOKENS`` and the roles they carry.

``PACSBRIDGE_API_TOKENS`` holds ``name:token[:role[:expires]]`` entries separated by
commas. Roles, each including the one below it:

``admin``  may also create, change and delete nodes and projects, read a project's map and the audit
``user``   (the default) submits, cancels and retries jobs, echoes and queries nodes
``read``   reads: nodes, jobs, the index, files

and, apart from them, ``project=NAME``: a **research platform's** token, which may only send results
home to that project (``POST /projects/NAME/results``) and read the jobs it made, redacted (no
original identifier); everything else answers 403, so a platform never browses the identifiable index.

``expires`` (optional) is a date ``YYYY-MM-DD``: the token is refused from that
day on (UTC). Tokens are compared with :func:`hmac.compare_digest`. With no
token configured every protected route answers 401: the API is never open by
default.
"""

from __future__ import annotations

import datetime as dt
import hmac
import logging
import re
from typing import Callable, NamedTuple, TypeVar

from flask import current_app, g, request

from pacsbridge.shared.core.errors import ConfigError

from .errors import ApiError

__all__ = ["Token", "parse_tokens", "requires", "authenticate", "ROLES"]

log = logging.getLogger(__name__)

ROLES = ("read", "user", "admin")
_RANK = {r: i for i, r in enumerate(ROLES)}
_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
_TOKEN = re.compile(r"^[\x21-\x7e]{16,512}$")

F = TypeVar("F", bound=Callable[..., object])


class Token(NamedTuple):
    name: str
    secret: bytes
    role: str
    expires: dt.date | None
    project: str = ""  # role "project": the one project this platform's token serves


#: What a project token may call (endpoint -> whether the path's ``name`` must be its project).
PROJECT_ENDPOINTS = {"results.result_home": True, "jobs.get_job": False}
_PROJECT = re.compile(r"^project=([A-Za-z0-9][A-Za-z0-9_.-]{0,63})$")


def parse_tokens(text: str) -> list[Token]:
    """Parse ``PACSBRIDGE_API_TOKENS``.

    Raises
    ------
    ConfigError
        A malformed entry (the message never repeats the secret).
    """
    tokens: list[Token] = []
    for number, entry in enumerate((e.strip() for e in text.split(",")), 1):
        if not entry:
            continue
        parts = entry.split(":")
        if len(parts) < 2 or len(parts) > 4:
            raise ConfigError(f"PACSBRIDGE_API_TOKENS entry {number}: expected name:token[:role[:YYYY-MM-DD]]")
        name, secret = parts[0], parts[1]
        role = parts[2] if len(parts) > 2 and parts[2] else "user"
        project = ""
        scoped = _PROJECT.match(role)
        if scoped:
            role, project = "project", scoped.group(1)
        if not _NAME.match(name):
            raise ConfigError(f"PACSBRIDGE_API_TOKENS entry {number}: name {name!r}: letters, digits, _ . @ -")
        if not _TOKEN.match(secret) or ":" in secret or "," in secret:
            raise ConfigError(f"PACSBRIDGE_API_TOKENS entry {number} ({name}): the token must be 16 to 512 "
                              "printable characters without spaces, ':' or ','")
        if role not in ROLES and not project:
            raise ConfigError(f"PACSBRIDGE_API_TOKENS entry {number} ({name}): role {role!r}: "
                              f"expected one of {', '.join(ROLES)} or project=NAME")
        expires = None
        if len(parts) == 4:
            try:
                expires = dt.date.fromisoformat(parts[3])
            except ValueError:
                raise ConfigError(f"PACSBRIDGE_API_TOKENS entry {number} ({name}): expiry "
                                  f"{parts[3]!r} is not YYYY-MM-DD") from None
        if any(t.name == name for t in tokens):
            raise ConfigError(f"PACSBRIDGE_API_TOKENS: the name {name!r} is used twice")
        tokens.append(Token(name, secret.encode(), role, expires, project))
    return tokens


def requires(role: str, refused: Callable[[Token], None] | None = None) -> Callable[[F], F]:
    """Mark a view as needing at least ``role`` (views without the mark need ``read``).

    ``refused(token)`` is called when a known token with too low a role asks (before the 403): a view
    whose every attempt must be audited (a project's map) records the refused ones too."""
    if role not in ROLES and role != "public":
        raise ValueError(role)

    def mark(view: F) -> F:
        view.pacsbridge_role = role  # type: ignore[attr-defined]
        view.pacsbridge_refused = refused  # type: ignore[attr-defined]
        return view

    return mark


def _challenge(message: str, error: str = "invalid_token") -> ApiError:
    return ApiError(401, message, {"WWW-Authenticate": f'Bearer realm="pacsbridge", error="{error}"'})


def authenticate() -> None:
    """``before_request``: check the bearer token against the role the view needs."""
    if request.routing_exception is not None or request.endpoint is None:
        return  # 404 / 405 answer as they are
    view = current_app.view_functions[request.endpoint]
    needed = getattr(view, "pacsbridge_role", "read")
    if needed == "public":
        return
    tokens: list[Token] = current_app.extensions["pacsbridge"].tokens
    header = request.headers.get("Authorization", "")
    scheme, _, given = header.partition(" ")
    if not header:
        raise ApiError(401, "this route needs 'Authorization: Bearer <token>'",
                       {"WWW-Authenticate": 'Bearer realm="pacsbridge"'})
    if scheme.lower() != "bearer" or not given.strip():
        raise _challenge("expected 'Authorization: Bearer <token>'", "invalid_request")
    secret = given.strip().encode("utf-8", "replace")
    found: Token | None = None
    for token in tokens:  # compare with every token, so timing says nothing about which matched
        if hmac.compare_digest(secret, token.secret):
            found = token
    if found is None:
        raise _challenge("unknown token")
    if found.expires is not None and dt.datetime.now(dt.timezone.utc).date() >= found.expires:
        raise _challenge(f"the token {found.name!r} expired on {found.expires.isoformat()}")
    if found.role == "project":  # a platform's token: its project's results and its own jobs, nothing else
        own_project = PROJECT_ENDPOINTS.get(request.endpoint)
        if own_project is None or (own_project and (request.view_args or {}).get("name") != found.project):
            raise ApiError(403, f"the token {found.name!r} serves project {found.project!r}: it may only send "
                                "results home to it and read its own jobs")
        g.token_name, g.role, g.project = found.name, found.role, found.project
        return
    if _RANK[found.role] < _RANK[needed]:
        on_refused = getattr(view, "pacsbridge_refused", None)
        if on_refused is not None:
            on_refused(found)
        raise ApiError(403, f"the token {found.name!r} has role {found.role!r}; this needs {needed!r}")
    g.token_name = found.name
    g.role = found.role
