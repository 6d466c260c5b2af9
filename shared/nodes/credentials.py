"""A node's DICOMweb secret, found when a request is made: sealed in its row, or by its name.

Two ways, one function (:func:`node_secret`, used by the QIDO session and the WADO/STOW client):

* **sealed**: the secret was stored through the API (``PUT /nodes/{name}/secret``) and its row keeps it
  encrypted (``web_secret_sealed``) with a key derived from the deployment's ``PACSBRIDGE_SECRET_KEY``
  (:func:`seal`, :func:`unseal`). The API never returns it: a node's output says only ``web_secret_stored``.
* **by name**: ``web_secret`` is a *name*. :func:`resolve_secret` looks for an environment variable of that
  name, else a file of that name in ``PACSBRIDGE_SECRETS_DIR`` (docker/podman secrets are files in
  ``/run/secrets``). The name is one path component: no ``/``, no ``..``, nothing that leaves the folder.

A stored secret wins over a name. The key: Fernet (AES-128-CBC and HMAC-SHA256, from ``cryptography``) with
the 32 bytes of HMAC-SHA256(PACSBRIDGE_SECRET_KEY, b"pacsbridge/node-secrets/v1"), urlsafe-base64 encoded as
Fernet wants them. Deriving (rather than using the setting as the key) lets the setting be any 32+ printable
characters, and keeps this key apart from anything else derived from the same setting later (the label).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pacsbridge.shared.core.config import initial_settings
from pacsbridge.shared.core.errors import ConfigError

if TYPE_CHECKING:
    from pacsbridge.shared.dicom.node import Node

__all__ = ["resolve_secret", "node_secret", "seal", "unseal", "check_secret", "SECRET_NAME", "KEY_LABEL",
           "MAX_SECRET"]

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


#: What the Fernet key is derived for (HMAC-SHA256 of this label under PACSBRIDGE_SECRET_KEY).
KEY_LABEL = b"pacsbridge/node-secrets/v1"
#: The longest secret a node may keep (a password or a bearer token; JWTs of a few KB fit).
MAX_SECRET = 4096


def _fernet(key: str) -> Any:
    from cryptography.fernet import Fernet  # only where secrets are sealed or opened

    raw = hmac.new(key.encode("utf-8"), KEY_LABEL, hashlib.sha256).digest()
    return Fernet(base64.urlsafe_b64encode(raw))


def check_secret(secret: Any) -> str:
    """A secret as a node may keep it: 1 to :data:`MAX_SECRET` printable ASCII characters or spaces (it goes
    into an HTTP header, which requests encodes as Latin-1: no control characters, nothing that cannot be
    sent). Raises :class:`InvalidRequest` naming the rule, never quoting the value."""
    from pacsbridge.shared.core.errors import InvalidRequest

    if not isinstance(secret, str) or not secret:
        raise InvalidRequest("the secret must be a non-empty string", "secret")
    if len(secret) > MAX_SECRET:
        raise InvalidRequest(f"the secret is longer than {MAX_SECRET} characters", "secret")
    if any(not 0x20 <= ord(c) <= 0x7E for c in secret):
        raise InvalidRequest("the secret may hold only printable ASCII characters and spaces (no newline, tab "
                             "or other control character, nothing beyond ASCII)", "secret")
    return secret


def seal(secret: str, key: str) -> str:
    """``secret`` encrypted under ``key`` (PACSBRIDGE_SECRET_KEY), as the text a node's row keeps.

    Raises
    ------
    ConfigError
        No key is set.
    """
    if not key:
        raise ConfigError("PACSBRIDGE_SECRET_KEY is not set: secrets cannot be stored (set it, or give the node "
                          "the name of a secret in web_secret)")
    return str(_fernet(key).encrypt(secret.encode("utf-8")).decode("ascii"))


def unseal(token: str, key: str, node: str) -> str:
    """The secret ``token`` (made by :func:`seal`) holds.

    Raises
    ------
    ConfigError
        No key, or a key that cannot open it (PACSBRIDGE_SECRET_KEY changed); names the node, never a value.
    """
    from cryptography.fernet import InvalidToken

    if not key:
        raise ConfigError(f"node {node!r} keeps a stored secret but PACSBRIDGE_SECRET_KEY is not set")
    try:
        return str(_fernet(key).decrypt(token.encode("ascii")).decode("utf-8"))
    except (InvalidToken, ValueError, UnicodeError):
        raise ConfigError(f"node {node!r}: its stored secret cannot be decrypted with this PACSBRIDGE_SECRET_KEY "
                          "(the key changed since it was stored): store the secret again") from None


def node_secret(node: "Node", settings: Any = None) -> str:
    """The password or token of ``node``'s DICOMweb authentication: its stored secret when it has one, else
    the secret its ``web_secret`` names.

    Parameters
    ----------
    node : Node
    settings : Settings, optional
        Where ``secret_key`` and ``secrets_dir`` come from (default: the process's settings).

    Raises
    ------
    ConfigError
        Neither a stored secret nor a name, the name is not found, or the stored one cannot be decrypted.
        The message names the node or the secret's name, never its value.
    """
    sealed = getattr(node, "web_secret_sealed", "")
    if sealed:
        key = getattr(settings, "secret_key", None)
        return unseal(sealed, initial_settings().secret_key if key is None else key, node.name)
    if not node.web_secret:
        raise ConfigError(f"node {node.name!r} has web_auth {node.web_auth!r} but no secret: store one "
                          f"(pacsbridge nodes secret {node.name}, PUT /api/v1/nodes/{node.name}/secret) or "
                          "name one in web_secret")
    return resolve_secret(node.web_secret, getattr(settings, "secrets_dir", None))
