"""A node's DICOMweb secret, found by its name when a request is made.

A node never holds a password or token (so the API, which returns nodes, cannot leak one): its
``web_secret`` is a *name*. :func:`resolve_secret` looks for an environment variable of that name, else a
file of that name in ``PACSBRIDGE_SECRETS_DIR`` (docker/podman secrets are files in ``/run/secrets``). The
name is one path component: no ``/``, no ``..``, nothing that leaves the folder.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from pacsbridge.shared.core.config import initial_settings
from pacsbridge.shared.core.errors import ConfigError

__all__ = ["resolve_secret", "SECRET_NAME"]

#: What a secret's name may be (the node model's rule, checked again here: a name read from an old row).
SECRET_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}\Z")


def resolve_secret(name: str, secrets_dir: Path | str | None = None) -> str:
    """The secret called ``name``: the environment variable of that name, else the file of that name.

    Parameters
    ----------
    name : str
        A node's ``web_secret``.
    secrets_dir : path, optional
        Where secret files are (default ``PACSBRIDGE_SECRETS_DIR``).

    Returns
    -------
    str
        The secret, without a trailing newline (files written by ``echo`` end with one).

    Raises
    ------
    ConfigError
        The name is not a plain file name (``/``, ``..``), or neither the variable nor the file exists or
        the file cannot be read. The message names the secret, never its value.
    """
    if not SECRET_NAME.match(name or "") or ".." in name:
        raise ConfigError(f"secret name {name[:80]!r} is not a plain name (letters, digits, '_', '.', '-'; "
                          "no '/' or '..')")
    value = os.environ.get(name)
    if value:
        return value
    folder = Path(secrets_dir if secrets_dir is not None else initial_settings().secrets_dir)
    path = folder / name
    try:
        return path.read_text(encoding="utf-8").rstrip("\r\n")
    except FileNotFoundError:
        raise ConfigError(f"secret {name!r} not found: no environment variable {name} and no file {path} "
                          "(PACSBRIDGE_SECRETS_DIR)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"secret {name!r}: {path} cannot be read ({exc.__class__.__name__})") from None
