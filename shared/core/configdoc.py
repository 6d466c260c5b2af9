"""The configuration reference and the compose env example, generated from :class:`~.config.Settings`.

``python -m pacsbridge.shared.core.configdoc --write`` (or ``pacsbridge config --reference markdown|env``)
writes ``docs/configuration.md`` and ``deploy/pacsbridge.env.example``; ``--check`` exits 1 when either
differs from the model (tests/test_config.py does the same).
"""

from __future__ import annotations

import argparse
import sys
import typing
from pathlib import Path


from pydantic.fields import FieldInfo

from pacsbridge.shared.core.config import DEPLOY_SETTINGS, GROUPS, Settings, _extra, env_name

__all__ = ["markdown", "env_example", "FILES"]

#: Generated files, relative to the repository root, with their renderer.
FILES = {"docs/configuration.md": "markdown", "deploy/pacsbridge.env.example": "env"}

_RULE = "# " + "-" * 93


def _type(field: FieldInfo) -> str:
    ann = field.annotation
    args = typing.get_args(ann)
    optional = type(None) in args
    if optional:
        ann = next(a for a in args if a is not type(None))
    if typing.get_origin(ann) is typing.Literal:
        text = "one of " + ", ".join(f"`{a}`" for a in typing.get_args(ann))
    else:
        names: dict[typing.Any, str] = {str: "text", int: "integer", float: "number", bool: "1/0", Path: "path"}
        text = names.get(ann, str(ann))
    return text + (" (optional)" if optional else "")


def _bounds(field: FieldInfo) -> str:
    parts = []
    for m in field.metadata:
        for attr, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if getattr(m, attr, None) is not None:
                parts.append(f"{sign} {getattr(m, attr)}")
        if getattr(m, "min_length", None) is not None:
            parts.append(f"length >= {m.min_length}")
        if getattr(m, "max_length", None) is not None:
            parts.append(f"length <= {m.max_length}")
    return ", ".join(parts)


def _default(field: FieldInfo) -> str:
    value = field.default
    if isinstance(value, bool):
        return "1" if value else "0"
    return "" if value is None else str(value)


def _fields(group: str) -> list[tuple[str, FieldInfo]]:
    return [(n, f) for n, f in Settings.model_fields.items() if _extra(f)["group"] == group]


def markdown() -> str:
    """``docs/configuration.md``."""
    out = [
        "# Configuration",
        "",
        "<!-- Generated from shared/core/config.py by `pacsbridge config --reference markdown`"
        " (or `python -m pacsbridge.shared.core.configdoc --write`); tests/test_config.py fails when it drifts."
        " Do not edit by hand. -->",
        "",
        "Every setting is a `PACSBRIDGE_*` variable, declared once in `shared/core/config.py` (a",
        "[pydantic-settings](https://docs.pydantic.dev/latest/concepts/pydantic_settings/) model: pydantic is well",
        "kept and already in the stack; pydantic-settings layers the sources below with one validation for all).",
        "Where a value comes from, highest first:",
        "",
        "1. the command line (`pacsbridge --database URL --storage DIR --dicom-sql FILE --special-columns ...`);",
        "2. the environment;",
        "3. the file named by `PACSBRIDGE_CONFIG` (`NAME=value` lines, `#` comments);",
        "4. the default below.",
        "",
        "A blank value is unset (compose passes optional settings as `${NAME:- }`). Every value is checked when",
        "a command starts; a bad one stops it with exit status 2 and a message that names the variable, e.g.",
        "`PACSBRIDGE_LISTENER_PORT='0': Input should be greater than or equal to 1`.",
        "",
        "`pacsbridge config` prints the effective settings and where each came from (`default`, `environment`,",
        "`config file PATH`, `command line`); tokens, secrets and passwords in URLs are masked.",
        "The services pass their settings on to every process they start (the listener's receivers, the",
        "worker's queues and Celery pool, `serve`'s three services), so a command-line option reaches them all.",
        "",
        "`PACSBRIDGE_DIMSE_TIMEOUT` is the listener's DIMSE timeout only; the jobs' requests to nodes (retrieve,",
        "push) have `PACSBRIDGE_SCU_DIMSE_TIMEOUT` (until 0.1 the first set both, and push used neither; the",
        "API's echo and query keep their own short bounds).",
        "",
    ]
    for key, title in GROUPS:
        out += [f"## {title}", "", "| Variable | Type | Default | Bounds | Description |", "|---|---|---|---|---|"]
        for name, field in _fields(key):
            extra = _extra(field)
            desc = (field.description or "").replace("|", "\\|")
            if extra["secret"]:
                desc += " (a secret: environment or the config file only; masked by `pacsbridge config`)"
            default = _default(field)
            out.append(f"| `{env_name(name)}` | {_type(field)} | {f'`{default}`' if default else '(empty)'} | "
                       f"{_bounds(field)} | {desc} |")
        out.append("")
    out += ["## Read by docker-compose.yml and the container's entrypoint only", "",
            "| Variable | Default | Description |", "|---|---|---|"]
    for name, default, _, text in DEPLOY_SETTINGS:
        out.append(f"| `{name}` | {f'`{default}`' if default else '(empty)'} | {' '.join(text.split())} |")
    out += ["", "See `deploy/pacsbridge.env.example` (generated from the same model) for a compose `.env`.", ""]
    return "\n".join(out)


def _comment(text: str) -> list[str]:
    return [f"# {line}".rstrip() for line in text.splitlines()]


def _describe(field: FieldInfo) -> list[str]:
    extra = _extra(field)
    text = extra["more"] or (field.description or "")
    return _comment(text)


def _deploy(kind: str) -> list[str]:
    out = []
    for name, default, k, text in DEPLOY_SETTINGS:
        if k == kind:
            out += _comment(text) + [f"#{name}={default}"]
    return out


def env_example() -> str:
    """``deploy/pacsbridge.env.example``."""
    fields = Settings.model_fields
    fixed = [(n, f) for n, f in fields.items() if _extra(f)["compose"] == "fixed"]
    out = [
        "# pacsbridge settings for docker compose.",
        "# Generated from shared/core/config.py (`pacsbridge config --reference env`); docs/configuration.md",
        "# describes every setting. Do not edit by hand: tests/test_config.py fails when it drifts.",
        "#",
        "#   cp deploy/pacsbridge.env.example .env      # next to docker-compose.yml; compose reads it",
        "#   chmod 600 .env                             # it holds the database password and the API tokens",
        "#",
        "# Set the three REQUIRED values; everything else is commented out at its default. A variable set",
        "# in the shell wins over this file (docker compose; podman-compose 1.0.3 does the opposite).",
        "# Don't leave a setting present but empty (\"NAME=\") unless the text says empty is meaningful.",
        "# The same PACSBRIDGE_* names work outside compose (docs/configuration.md, `pacsbridge config`).",
        "# docker-compose.yml fixes these inside the containers, so they are not settings here:",
    ]
    out += [f"#   {env_name(n)}={_extra(f)['compose_value']}" for n, f in fixed]
    out += [f"#   {name}={default}" for name, default, kind, _ in DEPLOY_SETTINGS if kind == "fixed"]
    out += ["", _RULE, "# REQUIRED", _RULE, ""]
    out += _comment(DEPLOY_SETTINGS[0][3]) + [f"{DEPLOY_SETTINGS[0][0]}=", ""]
    for name, field in fields.items():
        if _extra(field)["compose"] == "required":
            out += _describe(field) + [f"{env_name(name)}=", ""]
    out += [_RULE, "# Published ports and scale (docker-compose.yml)", _RULE, ""] + _deploy("publish") + [""]
    for key, title in GROUPS:
        shown = [(n, f) for n, f in _fields(key) if _extra(f)["compose"] in ("passed", "worker")]
        mounted = [(n, f) for n, f in _fields(key) if _extra(f)["compose"] == "mounted"]
        if not shown and not mounted:
            continue
        out += [_RULE, f"# {title}", _RULE, ""]
        for name, field in shown:
            out += _describe(field) + [f"#{env_name(name)}={_default(field)}"]
        if mounted:
            out += ["# Not passed by docker-compose.yml, because they name something that must be inside the",
                    "# containers too; set them with the mount in a docker-compose.override.yml:"]
            out += [f"#   {env_name(n)}={_extra(f)['example']}   {f.description}" for n, f in mounted]
        out.append("")
    out += [_RULE, "# Start-up", _RULE, ""] + _deploy("startup") + [""]
    outside = ", ".join(env_name(n) for n, f in fields.items() if _extra(f)["compose"] == "outside")
    out += [_RULE,
            "# Not for the containers: the `pacsbridge` client commands on your machine (jobs, nodes, ...)",
            "# read PACSBRIDGE_API_URL (here https://<host>:8443, see PACSBRIDGE_HTTPS_PUBLISH; with the",
            "# throwaway CA also SSL_CERT_FILE=deploy/tls/ca.pem) and PACSBRIDGE_API_TOKEN (one of the tokens",
            "# above); PACSBRIDGE_CONFIG names a file of settings outside compose.",
            f"# ({outside})",
            _RULE, ""]
    return "\n".join(out)


def render(kind: str) -> str:
    """``markdown`` or ``env``."""
    return {"markdown": markdown, "env": env_example}[kind]()


def drift(root: Path) -> list[str]:
    """The generated files under ``root`` that differ from the model."""
    return [rel for rel, kind in FILES.items()
            if not (root / rel).is_file() or (root / rel).read_text(encoding="utf-8") != render(kind)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pacsbridge.shared.core.configdoc", description=__doc__)
    parser.add_argument("--root", type=Path, default=Path("."), help="the repository root (default: .)")
    g = parser.add_mutually_exclusive_group(required=True)
    g.add_argument("--write", action="store_true", help="write the generated files")
    g.add_argument("--check", action="store_true", help="exit 1 when a generated file differs from the model")
    args = parser.parse_args(argv)
    if args.write:
        for rel, kind in FILES.items():
            (args.root / rel).write_text(render(kind), encoding="utf-8")
        return 0
    stale = drift(args.root)
    for rel in stale:
        print(f"{rel} differs from shared/core/config.py: python -m pacsbridge.shared.core.configdoc --write",
              file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


