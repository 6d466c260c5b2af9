"""Settings, read from ``PACSBRIDGE_*`` environment variables.

The same names are used in docker-compose, in the tests and on the command
line. ``PACSBRIDGE_CONFIG`` may name an env-style file (``NAME=value`` lines,
``#`` comments) whose values apply where the environment has none: a
variable set in the environment always wins.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Mapping

from pacsbridge.shared.core.errors import ConfigError

__all__ = ["Settings", "load_settings", "DEFAULT_DATABASE_URL", "DEFAULT_STORAGE"]

#: Embedded default index: a single SQLite file, like Conquest's ``conquest.db``.
DEFAULT_DATABASE_URL = "sqlite:///conquest.db"
#: Embedded default storage root (pyconquest's ``data`` folder).
DEFAULT_STORAGE = "data"

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _bool(name: str, value: str) -> bool:
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ConfigError(f"{name}={value!r}: expected one of 1/0, true/false, yes/no, on/off")


def _int(name: str, value: str, minimum: int = 0) -> int:
    try:
        n = int(value)
    except ValueError:
        raise ConfigError(f"{name}={value!r}: expected an integer") from None
    if n < minimum:
        raise ConfigError(f"{name}={value!r}: must be at least {minimum}")
    return n


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every setting pacsbridge reads, with its environment variable name.

    Attributes
    ----------
    database_url : str
        ``PACSBRIDGE_DATABASE_URL``: SQLAlchemy URL of the index
        (``sqlite:///conquest.db`` or ``postgresql+psycopg2://user@host/db``).
    storage : Path
        ``PACSBRIDGE_STORAGE``: the storage root (Conquest's MAG0 device).
    dicom_sql : Path | None
        ``PACSBRIDGE_DICOM_SQL``: a Conquest ``dicom.sql``; the shipped one if unset.
    filename_template : str
        ``PACSBRIDGE_FILENAME_TEMPLATE``: a preset name or a template.
    duplicates : str
        ``PACSBRIDGE_DUPLICATES``: ``keep``, ``replace`` or ``keep-both``.
    fsync : bool
        ``PACSBRIDGE_FSYNC``: fsync every stored file and its folder.
    drop_cache : bool
        ``PACSBRIDGE_DROP_CACHE``: once a stored file is fsynced, drop its
        pages from the page cache (``posix_fadvise(DONTNEED)``).
    special_columns : bool
        ``PACSBRIDGE_SPECIAL_COLUMNS``: add pyconquest's RT columns.
    import_workers : int
        ``PACSBRIDGE_IMPORT_WORKERS``: header-reading processes (0 = cores).
    export_root : Path
        ``PACSBRIDGE_EXPORT_ROOT``: where repack jobs submitted over the API
        may write (their ``dest`` is relative to it).
    import_root : Path
        ``PACSBRIDGE_IMPORT_ROOT``: where import jobs submitted over the API
        may read (their ``path`` is relative to it).
    stable_seconds : int
        ``PACSBRIDGE_STABLE_SECONDS``: a series with no new instance for this
        long is marked stable.
    require_called_ae : bool
        ``PACSBRIDGE_REQUIRE_CALLED_AE``: refuse associations whose called AE
        title is not ``ae_title`` (``pacsbridge serve`` turns it off, so that
        DCMTK's and pynetdicom's default ``ANY-SCP`` get in, with a warning).
    listener_metrics_host : str
        ``PACSBRIDGE_LISTENER_METRICS_HOST``: the address the listener's metrics
        (``PACSBRIDGE_LISTENER_METRICS_PORT``) listen on; empty: the listener's own
        host, so a listener bound to 127.0.0.1 does not publish its metrics further.
    api_host, api_port : str, int
        ``PACSBRIDGE_API_HOST`` / ``PACSBRIDGE_API_PORT`` of ``pacsbridge api``.
    api_threads : int
        ``PACSBRIDGE_API_THREADS``: threads of ``pacsbridge api`` that run requests
        (waitress reads each request whole before a thread takes it).
    api_connections : int
        ``PACSBRIDGE_API_CONNECTIONS``: open client connections ``pacsbridge api`` keeps
        at most (further ones wait in the listen backlog).
    api_tokens : str
        ``PACSBRIDGE_API_TOKENS``: ``name:token[:role]`` entries separated by
        commas; a secret, so only ever from the environment or the env file.
    webhook_allow : str
        ``PACSBRIDGE_WEBHOOK_ALLOW``: where job webhooks may go (host names,
        ``*.domain``, addresses and networks, comma separated); empty: webhooks
        are off. See :mod:`pacsbridge.shared.jobs.webhooks`.
    webhook_secret : str
        ``PACSBRIDGE_WEBHOOK_SECRET`` (or the file named by
        ``PACSBRIDGE_WEBHOOK_SECRET_FILE``): the key webhooks are signed with
        (HMAC-SHA256); never in the database.
    webhook_timeout : int
        ``PACSBRIDGE_WEBHOOK_TIMEOUT``: seconds one webhook request may take in all.
    webhook_retries : int
        ``PACSBRIDGE_WEBHOOK_RETRIES``: retries (with exponential backoff) of a
        webhook that timed out or answered 5xx.
    webhook_threads : int
        ``PACSBRIDGE_WEBHOOK_THREADS``: webhooks sent at once per worker container.
    """

    database_url: str = DEFAULT_DATABASE_URL
    storage: Path = Path(DEFAULT_STORAGE)
    dicom_sql: Path | None = None
    filename_template: str = "patient-study-series"
    duplicates: str = "keep"
    fsync: bool = True
    drop_cache: bool = True
    special_columns: bool = False
    import_workers: int = 0
    ae_title: str = "PACSBRIDGE"
    listener_host: str = "0.0.0.0"
    listener_port: int = 11112
    listener_metrics_host: str = ""
    broker_url: str = ""
    allowed_peers: str = ""
    require_called_ae: bool = True
    export_root: Path = Path("export")
    import_root: Path = Path("import")
    stable_seconds: int = 60
    api_host: str = "127.0.0.1"
    api_port: int = 8080
    api_threads: int = 8
    api_connections: int = 1000
    api_tokens: str = dataclasses.field(default="", repr=False)
    webhook_allow: str = ""
    webhook_secret: str = dataclasses.field(default="", repr=False)
    webhook_timeout: int = 5
    webhook_retries: int = 8
    webhook_threads: int = 4

    def with_(self, **changes: object) -> "Settings":
        """Return a copy with some settings changed."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


def _secret(name: str, value: str | None, file: str | None) -> str:
    """A secret from ``NAME`` or from the file named by ``NAME_FILE`` (docker/podman secrets)."""
    if value and file:
        raise ConfigError(f"{name} and {name}_FILE are both set: set one")
    if file:
        try:
            value = Path(file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"{name}_FILE={file}: {exc.strerror}") from None
    value = value or ""
    if value and (len(value) < 16 or any(ord(c) < 0x21 for c in value)):
        raise ConfigError(f"{name}: at least 16 printable characters (e.g. `openssl rand -hex 32`)")
    return value


def _read_env_file(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"PACSBRIDGE_CONFIG={path}: {exc.strerror}") from None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export "):]
        name, sep, value = line.partition("=")
        if not sep or not name.strip().startswith("PACSBRIDGE_"):
            raise ConfigError(f"{path}:{number}: expected PACSBRIDGE_NAME=value")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[name.strip()] = value
    return values


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Build :class:`Settings` from the environment (and ``PACSBRIDGE_CONFIG``).

    Raises
    ------
    ConfigError
        A value is malformed; the message names the variable.
    """
    env = dict(os.environ if environ is None else environ)
    merged: dict[str, str] = {}
    if env.get("PACSBRIDGE_CONFIG"):
        merged.update(_read_env_file(Path(env["PACSBRIDGE_CONFIG"])))
    merged.update({k: v for k, v in env.items() if k.startswith("PACSBRIDGE_")})

    def get(name: str) -> str | None:
        value = merged.get(f"PACSBRIDGE_{name}")
        # blank is unset: compose passes optional settings as "${NAME:- }" (podman-compose 1.0.3
        # leaves "${NAME:-}" unsubstituted, the literal text then reached the services)
        return None if value is not None and not value.strip() else value

    kw: dict[str, object] = {}
    if get("DATABASE_URL"):
        kw["database_url"] = get("DATABASE_URL")
    if get("STORAGE"):
        kw["storage"] = Path(get("STORAGE"))  # type: ignore[arg-type]
    if get("DICOM_SQL"):
        kw["dicom_sql"] = Path(get("DICOM_SQL"))  # type: ignore[arg-type]
    if get("FILENAME_TEMPLATE"):
        kw["filename_template"] = get("FILENAME_TEMPLATE")
    dup = get("DUPLICATES")
    if dup:
        if dup not in ("keep", "replace", "keep-both"):
            raise ConfigError(f"PACSBRIDGE_DUPLICATES={dup!r}: expected keep, replace or keep-both")
        kw["duplicates"] = dup
    for name, attr in (("FSYNC", "fsync"), ("DROP_CACHE", "drop_cache"), ("SPECIAL_COLUMNS", "special_columns"),
                       ("REQUIRE_CALLED_AE", "require_called_ae")):
        value = get(name)
        if value is not None:
            kw[attr] = _bool(f"PACSBRIDGE_{name}", value)
    if get("IMPORT_WORKERS") is not None:
        kw["import_workers"] = _int("PACSBRIDGE_IMPORT_WORKERS", get("IMPORT_WORKERS") or "0")
    if get("ALLOWED_PEERS") is not None:
        kw["allowed_peers"] = get("ALLOWED_PEERS")
    for name, attr in (("EXPORT_ROOT", "export_root"), ("IMPORT_ROOT", "import_root")):
        if get(name):
            kw[attr] = Path(get(name))  # type: ignore[arg-type]
    if get("API_TOKENS") is not None:
        kw["api_tokens"] = get("API_TOKENS")
    kw["webhook_secret"] = _secret("PACSBRIDGE_WEBHOOK_SECRET", get("WEBHOOK_SECRET"), get("WEBHOOK_SECRET_FILE"))
    for name, attr in (("AE_TITLE", "ae_title"), ("LISTENER_HOST", "listener_host"),
                       ("LISTENER_METRICS_HOST", "listener_metrics_host"), ("BROKER_URL", "broker_url"),
                       ("API_HOST", "api_host"), ("WEBHOOK_ALLOW", "webhook_allow")):
        if get(name):
            kw[attr] = get(name)
    for name, attr, minimum in (("LISTENER_PORT", "listener_port", 1), ("STABLE_SECONDS", "stable_seconds", 1),
                                ("API_PORT", "api_port", 1), ("API_THREADS", "api_threads", 1),
                                ("API_CONNECTIONS", "api_connections", 1), ("WEBHOOK_TIMEOUT", "webhook_timeout", 1),
                                ("WEBHOOK_RETRIES", "webhook_retries", 0), ("WEBHOOK_THREADS", "webhook_threads", 1)):
        if get(name):
            kw[attr] = _int(f"PACSBRIDGE_{name}", get(name) or "", minimum)
    return Settings(**kw)  # type: ignore[arg-type]
