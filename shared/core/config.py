"""Settings: every ``PACSBRIDGE_*`` setting, declared once.

:class:`Settings` is a `pydantic-settings <https://docs.pydantic.dev/latest/concepts/pydantic_settings/>`_
model. Each field is one ``PACSBRIDGE_<FIELD>`` variable with its type, default, bounds, a one-line
description and the service group it belongs to; ``docs/configuration.md`` and
``deploy/pacsbridge.env.example`` are generated from it (:mod:`.configdoc`), and ``pacsbridge config``
prints the effective values and where each came from.

Why pydantic-settings: pydantic is well kept and already validates the API's bodies; pydantic-settings
adds the layering of sources (command line > environment > ``PACSBRIDGE_CONFIG`` file > default) with
the same validation for each, and a bad value becomes an error that names the variable.

Sources, highest first:

- the command line (``pacsbridge --database URL ...``, passed to :func:`load_settings` as ``overrides``);
- the environment;
- ``PACSBRIDGE_CONFIG``: an env-style file (``NAME=value`` lines, ``#`` comments) whose values apply
  where the environment has none;
- the default declared here.

A blank value is unset (compose passes optional settings as ``${NAME:- }``: podman-compose 1.0.3 left
``${NAME:-}`` unsubstituted). A ``Settings(...)`` built in code reads nothing from the environment.

Module constants that other modules keep for their tests to patch (``retrieve.WAIT_SECONDS``,
``runner.HEARTBEAT_SECONDS`` ...) start from :func:`initial_settings`, which never raises: a bad value is
reported by :func:`load_settings` when a command starts, not when a module is imported.
"""

from __future__ import annotations

import contextvars
import functools
import os
import re
from pathlib import Path
from typing import Any, Literal, Mapping

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from pacsbridge.shared.core.errors import ConfigError
from pacsbridge.shared.core.models import AET_PATTERN

__all__ = ["Settings", "load_settings", "load_settings_with_sources", "initial_settings", "env_name", "GROUPS",
           "DEPLOY_SETTINGS", "mask", "DEFAULT_DATABASE_URL", "DEFAULT_STORAGE", "PREFIX"]

PREFIX = "PACSBRIDGE_"
#: Embedded default index: a single SQLite file, like Conquest's ``conquest.db``.
DEFAULT_DATABASE_URL = "sqlite:///conquest.db"
#: Embedded default storage root (pyconquest's ``data`` folder).
DEFAULT_STORAGE = "data"

#: The groups of settings, in the order of the reference: (key, title).
GROUPS = (
    ("common", "Identity, storage and index (every service)"),
    ("dicom", "Our DICOM associations (listener and jobs)"),
    ("listener", "Listener (C-STORE SCP)"),
    ("worker", "Workers and jobs"),
    ("api", "HTTP API"),
    ("webhooks", "Webhooks (a job's \"webhook\": the finished job POSTed as JSON)"),
    ("deid", "De-identification (research projects: keyed pseudonyms, UIDs and date offsets)"),
    ("client", "Client commands (`pacsbridge jobs`, `nodes` ... on your machine)"),
)

#: Settings a child process is not given (it reads them where its parent did).
_NOT_PASSED = ("config", "webhook_secret_file", "deid_secret_file", "secret_key_file")

# How docker-compose.yml treats a setting (for the generated env example):
#   passed   - `NAME: ${NAME:-default}`: set it in .env (the default)
#   required - compose refuses to start without it
#   fixed    - compose sets it to a value of its own (compose_value), not a setting of .env
#   mounted  - not passed: it names a file or code that must be in the containers too
#   worker   - passed to the worker service only
#   outside  - not for the containers (client commands, the config file itself)
Compose = Literal["passed", "required", "fixed", "mounted", "worker", "outside"]


def _f(default: Any, group: str, description: str, *, more: str = "", compose: Compose = "passed",
       compose_value: str = "", secret: bool = False, example: str = "", **bounds: Any) -> Any:
    """A setting: default, bounds (``ge``/``gt``/``le``), a one-line description, and for the
    reference its group, a longer text (``more``), how compose treats it and whether it is a secret."""
    extra: dict[str, Any] = {"group": group, "more": more, "compose": compose, "compose_value": compose_value,
                             "secret": secret,
                             "example": example}
    return Field(default, description=description, json_schema_extra=extra, repr=not secret, **bounds)


class Settings(BaseSettings):
    """Every setting pacsbridge reads; a field ``name`` is the variable ``PACSBRIDGE_NAME`` (:func:`env_name`)."""

    model_config = SettingsConfigDict(env_prefix=PREFIX, frozen=True, extra="forbid", validate_default=True)

    # -- common ---------------------------------------------------------------------------------
    config: Path | None = _f(
        None, "common", "an env-style file of settings (NAME=value lines) used where the environment has none",
        compose="outside")
    database_url: str = _f(
        DEFAULT_DATABASE_URL, "common", "SQLAlchemy URL of the index (SQLite or PostgreSQL)",
        more="e.g. sqlite:///conquest.db or postgresql+psycopg2://user:password@host/db",
        compose="fixed", compose_value="postgresql+psycopg2://pacsbridge:$POSTGRES_PASSWORD@postgres/pacsbridge")
    storage: Path = _f(Path(DEFAULT_STORAGE), "common", "the storage root (Conquest's MAG0): received files, "
                       "the source of truth", compose="fixed", compose_value="/data")
    broker_url: str = _f("", "common", "Celery broker URL (empty: the embedded SQLite broker of `pacsbridge serve`)",
                         compose="fixed", compose_value="redis://redis:6379/0")
    export_root: Path = _f(Path("export"), "common", "where repack jobs write (their dest is relative to it)",
                           compose="fixed", compose_value="/export")
    import_root: Path = _f(Path("import"), "common", "where import jobs read (their path is relative to it)",
                           compose="fixed", compose_value="/import")
    results_root: Path = _f(Path("results"), "common", "where results sent home wait, de-identified, until a "
                            "worker re-identifies them (POST /projects/{name}/results)", compose="fixed",
                            compose_value="/results")
    ae_title: str = _f("PACSBRIDGE", "common", "our AE title: the PACS must call this one, and jobs call with it "
                       "(printable ASCII, no backslash, as a node's)", min_length=1, max_length=16)
    require_called_ae: bool = _f(
        True, "common", "refuse associations whose called AE title is not ours",
        more="0: accept any called AE title (e.g. DCMTK's and pynetdicom's default ANY-SCP), logged as a\n"
             "warning; `pacsbridge serve` does so for a first try. Leave it at 1 here.")
    filename_template: str = _f(
        "patient-study-series", "common", "file names under the storage root: a preset or a template",
        more="File names under the storage root: a preset (patient-study-series, study-series, flat,\n"
             "conquest4, pyconquest, px-repack) or a template such as "
             "{PatientID}/{StudyInstanceUID}/{SOPInstanceUID}.dcm")
    duplicates: Literal["keep", "replace", "keep-both"] = _f(
        "keep", "common", "a second copy of a stored SOP Instance: keep (first copy stays), replace, keep-both")
    fsync: bool = _f(True, "common", "fsync each stored file and its folder before answering success",
                     more="fsync each stored file and its folder before answering success (1/0). Leave it on.")
    drop_cache: bool = _f(
        True, "common", "drop a stored file's pages from the page cache once it is fsynced",
        more="Once a stored file is fsynced, drop its pages from the page cache (1/0): received data is read\n"
             "back only for its header, and a cache grown by every received byte costs memory (and, on VMs\n"
             "that hand free memory back to the host, a host fault per fresh page).")
    dicom_sql: Path | None = _f(
        None, "common", "your own Conquest dicom.sql (extra columns); the shipped one if unset", compose="mounted",
        example="/config/dicom.sql")
    special_columns: bool = _f(
        False, "common", "add pyconquest's RT columns to DICOMImages",
        more="Add pyconquest's RT columns to DICOMImages (1/0); changing it later needs "
             "`pacsbridge init --force && pacsbridge rebuild`.")
    import_workers: int = _f(0, "common", "header-reading processes of import/rebuild (0 = one per core)", ge=0)
    disk_min_free: str = _f(
        "5%", "common", "free space below which storage takes nothing more: bytes (2G, 500M) or a percent (5%)",
        more="Free space of the storage's file system below which nothing more is stored: bytes (2G, 500M,\n"
             "1048576; K/M/G/T are powers of 1024) or a percent of its size (5%); 0 turns it off. Below it\n"
             "the listener answers C-STORE with 0xA700 (out of resources), retrieve jobs stop with an error,\n"
             "and /healthz and the metrics say so (docs/retention.md). Checked at most once a second.")

    # -- dicom ----------------------------------------------------------------------------------
    scu_dimse_timeout: float = _f(
        60.0, "dicom", "timeout (s) of the jobs' requests to a node: C-FIND, C-MOVE, C-GET, push's C-STORE",
        more="Timeout (s) of the jobs' requests to a node (retrieve's C-FIND, C-MOVE, C-GET and push's\n"
             "C-STORE). Until 0.1 PACSBRIDGE_DIMSE_TIMEOUT set this too (and push used neither); that one\n"
             "is the listener's now.", gt=0)
    run_loop_delay: float = _f(0.0002, "dicom", "pynetdicom's polling delay per association (s)", ge=0)
    reactor: Literal["wait", "poll"] = _f(
        "wait", "dicom", "wait: each association's pynetdicom loops wait on the socket; poll: pynetdicom's own")
    malloc_tune: bool = _f(
        True, "dicom", "fix glibc's malloc thresholds in the receivers and sender processes",
        more="0: keep glibc's malloc thresholds in the receivers (1 fixes them so the buffers of each instance\n"
             "are not returned to the kernel and faulted in again; see shared/core/memtune.py).")

    # -- listener -------------------------------------------------------------------------------
    listener_host: str = _f("0.0.0.0", "listener", "address the DICOM listener listens on", compose="fixed",
                            compose_value="0.0.0.0")
    listener_port: int = _f(11112, "listener", "TCP port of the DICOM listener", ge=1, le=65535, compose="fixed",
                            compose_value="11112 (publish: PACSBRIDGE_LISTENER_PUBLISH)")
    allowed_peers: str = _f(
        "", "listener", "who may send to the listener: AETITLE or AETITLE@address, comma separated",
        compose="required",
        more="Who may send to the listener: AETITLE or AETITLE@address (an IP or a network, e.g.\n"
             "PACS@10.1.2.3, MODALITY@10.1.2.0/24), comma separated. Empty: only the nodes configured through\n"
             "the API (/api/v1/nodes); `*`: anybody, `*@address`: any AE title from there (a first try only,\n"
             "logged as a warning). Under docker the listener sees a remote sender's real address; connections\n"
             "from the docker host itself come from the bridge's gateway (e.g. 172.17.0.1 / 10.89.0.1), so use\n"
             "the AE title alone to test locally.")
    listener_processes: int = _f(0, "listener", "receiver processes sharing the port (0 = two per core)", ge=0)
    max_associations: int = _f(16, "listener", "concurrent associations per receiver process", ge=1)
    max_associations_per_peer: int = _f(
        8, "listener", "connections one peer address may hold across all receiver processes (0 = no bound)", ge=0)
    enqueue_batch: int = _f(200, "listener", "paths per indexing task", ge=1)
    enqueue_interval: float = _f(1.0, "listener", "longest wait (s) before a partial batch of paths is sent", gt=0)
    spool_above: int = _f(
        16 << 20, "listener", "bytes of a received data set kept in memory; larger ones go to .incoming as they arrive",
        ge=0)
    chunked: bool = _f(False, "listener", "1: every data set goes to .incoming as it arrives (as SPOOL_ABOVE=0)")
    acse_timeout: float = _f(30.0, "listener", "the listener's ACSE timeout (s): association set-up and release",
                             gt=0)
    dimse_timeout: float = _f(
        60.0, "listener", "the listener's DIMSE timeout (s)",
        more="The listener's DIMSE timeout (s). Our own requests to nodes have PACSBRIDGE_SCU_DIMSE_TIMEOUT\n"
             "(until 0.1 this one was used for both).", gt=0)
    network_timeout: float = _f(60.0, "listener", "the listener's network timeout (s): a silent peer is dropped",
                                gt=0)
    max_pdu: int = _f(4 << 20, "listener",
                      "largest PDU we announce and read (0 = unlimited); a larger one closes the connection", ge=0)
    reconcile_seconds: float = _f(300.0, "listener", "period (s) of the reconciler, which re-queues stored but "
                                  "unindexed files", gt=0)
    reconcile_min_age: float = _f(30.0, "listener", "how old (s) a stored but unindexed file must be before it is "
                                  "re-queued", ge=0)
    peers_refresh_seconds: float = _f(
        30.0, "listener", "how often (s) the listener re-reads the nodes configured through the API as allowed peers",
        gt=0)
    listener_metrics_port: int = _f(
        0, "listener", "Prometheus counters of the listener on this port (0 = off)",
        more="Prometheus counters of the listener on this port inside the container (0 = off); publish it in\n"
             "an override file if something outside scrapes it.", ge=0, le=65535)
    listener_metrics_host: str = _f(
        "", "listener", "the address those metrics listen on (empty: the listener's own)",
        more="The address those metrics listen on (empty: the listener's own, 0.0.0.0 inside the container).")
    after_store: str = _f("", "listener", "after-store hook, package.module:function (code in a derived image)",
                          compose="mounted", example="package.module:function")

    # -- worker ---------------------------------------------------------------------------------
    worker_queues: Literal["all", "index", "jobs", "webhooks"] = _f(
        "all", "worker", "what a worker serves: all (indexing, jobs and webhooks), index, jobs or webhooks")
    worker_concurrency: int = _f(0, "worker", "indexing processes per worker (0 = one per core)", ge=0)
    job_concurrency: int = _f(2, "worker", "jobs (retrieve, push, repack, import) run at once per worker", ge=1)
    stable_seconds: int = _f(60, "worker", "a series with no new instance for this long (s) is marked stable", ge=1)
    sweep_seconds: float = _f(30.0, "worker", "period (s) of the job sweeper", gt=0)
    job_resend_seconds: float = _f(300.0, "worker", "age (s) after which a queued job's message is sent again", gt=0)
    heartbeat_seconds: float = _f(
        10.0, "worker", "a running job reports every this many seconds; one silent for 4 beats may be taken over",
        gt=0)
    lease_seconds: float = _f(30.0, "worker", "association slots of a node: a lease not renewed for this long (s) "
                              "is free again", gt=0)
    slot_wait_seconds: float = _f(3600.0, "worker", "how long (s) a job waits for a free association slot of its "
                                  "node before failing the series", ge=0)
    find_limit: int = _f(0, "worker", "a C-FIND answer with this many studies is taken as cut short by the PACS "
                         "(0 = rely on its status)", ge=0)
    qido_limit: int = _f(1000, "worker", "QIDO-RS page size (limit) a DICOMweb search asks for; a full page is "
                         "followed by the next (offset)", ge=1, le=100000)
    secrets_dir: Path = _f(
        Path("/run/secrets"), "worker", "the folder of the secrets a node names (web_secret: an environment "
        "variable of that name, else a file of that name here)", compose="mounted", example="/run/secrets",
        more="A node's DICOMweb password or token is never stored: the node holds its name, and the workers\n"
             "and the API read it from the environment variable of that name or, when there is none, from\n"
             "the file of that name in this folder (docker/podman secrets are mounted in /run/secrets).\n"
             "Or it is kept in the database, sealed with PACSBRIDGE_SECRET_KEY (`pacsbridge nodes secret`).")
    secret_key: str = _f(
        "", "worker", "the deployment's key that seals the DICOMweb secrets nodes keep in the database (at least "
        "32 characters)", secret=True,
        more="The deployment's key: a node's DICOMweb password or token stored through the API\n"
             "(PUT /nodes/{name}/secret, `pacsbridge nodes secret NAME`) is kept in the database encrypted\n"
             "with a key derived from it (Fernet), and decrypted by the workers and the API when a request\n"
             "is made. At least 32 printable ASCII characters (e.g. `openssl rand -hex 32`). Empty: secrets\n"
             "cannot be stored (nodes name theirs: web_secret). Changed, the stored secrets cannot be read:\n"
             "store them again. Back it up apart from the database (docs/dicomweb.md).")
    secret_key_file: Path | None = _f(
        None, "worker", "a file holding the deployment's key (a mounted secret; not both)",
        example="/run/secrets/pacsbridge_key")
    retention_days: float = _f(
        0.0, "worker", "purge series delivered (pushed or repacked by a job) more than this many days ago (0 = off)",
        more="Purge what was delivered more than this many days ago (0 = off): a series a push or repack job\n"
             "sent whole, that has not grown since. Never what was not delivered. The workers' sweeper submits\n"
             "`delete` jobs (owner `retention`, audited); docs/retention.md.", ge=0)
    retrieve_wait_seconds: float = _f(120.0, "worker", "C-MOVE: give up waiting for the index after this many "
                                      "seconds without a new indexed instance", gt=0)
    retrieve_repulls: int = _f(2, "worker", "how many times missing instances of a series are pulled again", ge=0)
    push_fast: bool = _f(True, "worker", "push writes each stored file to the socket in one pass (0: pynetdicom's "
                         "send_c_store)")
    push_processes: Literal["0", "1", "auto"] = _f(
        "0", "worker", "1 or auto runs each push association in its own process (pays off above 2 cores)")

    # -- api ------------------------------------------------------------------------------------
    api_host: str = _f("127.0.0.1", "api", "address `pacsbridge api` listens on", compose="fixed",
                       compose_value="0.0.0.0 (the api service's address)")
    api_port: int = _f(8080, "api", "TCP port of `pacsbridge api`", ge=1, le=65535, compose="fixed",
                       compose_value="8080")
    api_threads: int = _f(8, "api", "threads of `pacsbridge api` that run requests", ge=1,
                          more="The API (`pacsbridge api`, waitress): threads that run requests (a request is read "
                               "whole\nbefore a thread takes it: slow clients hold only a connection).")
    api_connections: int = _f(1000, "api", "open client connections `pacsbridge api` keeps at most", ge=1)
    cohort_max_bytes: int = _f(20 << 20, "api", "largest cohort upload (a spreadsheet or JSON rows) in bytes; "
                               "larger is answered 413", ge=1024)
    cohort_max_rows: int = _f(50_000, "api", "most rows a cohort may have (a larger file is refused, with the "
                              "row named)", ge=1, le=1_000_000)
    api_tokens: str = _f(
        "", "api", "API bearer tokens: name:token[:role[:YYYY-MM-DD]] entries separated by commas",
        compose="required", secret=True,
        more="API bearer tokens: name:token[:role[:YYYY-MM-DD expiry]] entries separated by commas. Roles:\n"
             "read (index, files, jobs), user (default: also submits/cancels jobs, echoes/queries nodes),\n"
             "admin (also creates/changes/deletes nodes and projects, reads maps and the audit), and\n"
             "project=NAME: a research platform's token, which may only send results home to that project\n"
             "and read its own jobs, redacted. Token: 16-512 printable characters, no ':' or ','\n"
             "(e.g. `openssl rand -hex 32`). Requests send `Authorization: Bearer <token>`.\n"
             "Example: PACSBRIDGE_API_TOKENS=ops:3f9c...e1:admin,lab:a81b...07:project=lung-2026")

    # -- webhooks -------------------------------------------------------------------------------
    webhook_allow: str = _f(
        "", "webhooks", "where webhooks may go: host names, *.domain, addresses and networks (empty: off)",
        more="Where webhooks may go, comma separated: host names (platform.example), *.domain, addresses and\n"
             "networks (10.20.0.0/16). Empty: webhooks are off (a job with one is refused). Loopback, private\n"
             "and link-local addresses only when a listed network holds them, even for a listed name.")
    webhook_secret: str = _f(
        "", "webhooks", "the key webhooks are signed with (HMAC-SHA256; at least 16 characters)", compose="worker",
        secret=True,
        more="The key webhooks are signed with (X-Pacsbridge-Signature, HMAC-SHA256; at least 16 characters,\n"
             "e.g. `openssl rand -hex 32`); given to the workers only. Without it nothing is sent.")
    webhook_secret_file: Path | None = _f(
        None, "webhooks", "a file holding the webhook key (a mounted secret; not both)", compose="worker",
        example="/run/secrets/webhook")
    webhook_timeout: int = _f(5, "webhooks", "seconds one webhook request may take in all", ge=1)
    webhook_retries: int = _f(8, "webhooks", "retries (1, 2, 4 ... s apart) after a timeout or a 5xx", ge=0)
    webhook_threads: int = _f(4, "webhooks", "webhooks sent at once per worker (threads of their own, never a job "
                              "slot)", ge=1)

    # -- de-identification ------------------------------------------------------------------------
    deid_secret: str = _f(
        "", "deid", "the secret every project's pseudonym key is derived from (at least 32 characters)",
        compose="passed", secret=True,
        more="The secret every project's key is derived from (HMAC-SHA256): pseudonyms, new UIDs and date\n"
             "offsets are keyed functions of it, so without it nobody can recompute a pseudonym from a record\n"
             "number. At least 32 printable characters (e.g. `openssl rand -hex 32`). It never goes into the\n"
             "database: each project keeps only a check value, and start-up refuses a secret that does not\n"
             "match it. Back it up apart from the database (docs/deidentification.md): lost, it cannot make\n"
             "the same pseudonyms again for new patients of an existing project.")
    deid_secret_file: Path | None = _f(
        None, "deid", "a file holding the de-identification secret (a mounted secret; not both)",
        example="/run/secrets/deid")

    # -- client ---------------------------------------------------------------------------------
    api_url: str = _f("http://127.0.0.1:8080", "client", "where the client commands reach the API",
                      compose="outside")
    api_token: str = _f("", "client", "the client commands' token (one of PACSBRIDGE_API_TOKENS)", compose="outside",
                        secret=True)

    # -------------------------------------------------------------------------------------------
    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        """``Settings(...)`` in code: its arguments only; :func:`load_settings`: the command line, the
        environment and the config file too (in that order)."""
        layers = _LAYERS.get()
        if layers is None:
            return (init_settings,)
        return (init_settings, *(_Layer(settings_cls, values) for _, values in layers))

    @field_validator("reactor", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("ae_title")
    @classmethod
    def _ae_title(cls, value: str) -> str:
        if not re.match(AET_PATTERN, value):
            raise ValueError("an AE title is 1 to 16 printable ASCII characters, no backslash, not only spaces")
        return value

    @field_validator("disk_min_free")
    @classmethod
    def _watermark(cls, value: str) -> str:
        _check_watermark(value)
        return value.strip()

    @field_validator("push_processes", mode="before")
    @classmethod
    def _processes(cls, value: Any) -> Any:
        return str(value).strip().lower() if isinstance(value, (str, int)) else value

    @model_validator(mode="before")
    @classmethod
    def _secret_file(cls, data: Any) -> Any:
        """``PACSBRIDGE_WEBHOOK_SECRET_FILE``, ``PACSBRIDGE_DEID_SECRET_FILE``, ``PACSBRIDGE_SECRET_KEY_FILE``:
        the secret from a file (docker/podman secrets)."""
        if not isinstance(data, dict):
            return data
        for name in ("webhook_secret", "deid_secret", "secret_key"):
            file, value = data.get(f"{name}_file"), data.get(name)
            if file:
                env = env_name(name)
                try:
                    text = Path(file).read_text(encoding="utf-8").strip()
                except OSError as exc:
                    raise ValueError(f"{env}_FILE={file}: {exc.strerror}") from None
                if value and value != text:  # (the same text: a copy of settings read from the file)
                    raise ValueError(f"{env} and {env}_FILE are both set: set one")
                data = {**data, name: text}
        return data

    @field_validator("webhook_secret")
    @classmethod
    def _strong(cls, value: str) -> str:
        if value and (len(value) < 16 or any(ord(c) < 0x21 for c in value)):
            raise ValueError("at least 16 printable characters (e.g. `openssl rand -hex 32`)")
        return value

    @field_validator("deid_secret", "secret_key")
    @classmethod
    def _strong_deid(cls, value: str) -> str:
        if value and (len(value) < 32 or any(ord(c) < 0x21 or ord(c) > 0x7E for c in value)):
            raise ValueError("at least 32 printable ASCII characters (e.g. `openssl rand -hex 32`)")
        return value

    def with_(self, **changes: object) -> "Settings":
        """Return a copy with some settings changed (validated)."""
        return type(self)(**{**self.model_dump(), **changes})

    def environ(self) -> dict[str, str]:
        """The settings that differ from their default as ``PACSBRIDGE_*`` variables, for child processes.

        Secrets are left out (a child reads them where this process did: the environment or a file),
        paths are made absolute (a child may run elsewhere).
        """
        out: dict[str, str] = {}
        for name, field in type(self).model_fields.items():
            value = getattr(self, name)
            if _extra(field)["secret"] or name in _NOT_PASSED or value == field.default:
                continue
            out[env_name(name)] = _text(value)
        return out


def _check_watermark(value: str) -> None:
    """``PACSBRIDGE_DISK_MIN_FREE``'s form (shared/index/disk.py reads it; core may not import it)."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(%|[KMGTkmgt][iI]?[bB]?|[bB])?\s*", value or "")
    if m is None:
        raise ValueError("expected bytes (2G, 500M, 1048576) or a percent (5%); 0 is off")
    if m.group(2) == "%" and float(m.group(1)) > 100:
        raise ValueError("a percent is at most 100")


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, Path):
        return str(value.absolute())
    return "" if value is None else str(value)


def _extra(field: FieldInfo) -> dict[str, Any]:
    return field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}  # type: ignore[return-value]


def env_name(field: str) -> str:
    """``database_url`` -> ``PACSBRIDGE_DATABASE_URL``."""
    return PREFIX + field.upper()


_FIELDS_BY_ENV = {env_name(n): n for n in Settings.model_fields}

#: The layers of the running :func:`load_settings` (name, {field: text}), highest first.
_LAYERS: contextvars.ContextVar[list[tuple[str, dict[str, str]]] | None] = contextvars.ContextVar(
    "pacsbridge_settings_layers", default=None)


class _Layer(PydanticBaseSettingsSource):
    """One source of :func:`load_settings` (the environment, or the config file): field -> text."""

    def __init__(self, settings_cls: type[BaseSettings], values: dict[str, str]) -> None:
        super().__init__(settings_cls)
        self.values = values

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self.values.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self.values)


#: Compose-only settings: read by docker-compose.yml and deploy/entrypoint.sh, not by Python.
#: (name, default, group key, description); rendered into the env example and the reference.
DEPLOY_SETTINGS: tuple[tuple[str, str, str, str], ...] = (
    ("POSTGRES_PASSWORD", "", "required",
     "Password of the PostgreSQL superuser `postgres` and of the role `pacsbridge` (created on the\n"
     "first start of the database volume; changing it later does not change the database's).\n"
     "URL-safe characters only (it goes into a URL): e.g. `openssl rand -hex 24`."),
    ("PACSBRIDGE_LISTENER_PUBLISH", "127.0.0.1:11112", "publish",
     "Where the host publishes the DICOM listener ([address:]port). The default is this machine only:\n"
     "to let a PACS reach it, e.g. 11112 (all interfaces) or 10.1.2.50:11112 (one interface)."),
    ("PACSBRIDGE_HTTPS_PUBLISH", "127.0.0.1:8443", "publish",
     "The API is reached over HTTPS only, through the `proxy` service (Caddy): where the host publishes\n"
     "it ([address:]port; e.g. 443 or 10.1.2.50:443 for other machines). The API's own plain-HTTP port\n"
     "is not published, it is reachable inside the compose network only."),
    ("PACSBRIDGE_TLS_DIR", "./deploy/tls", "publish",
     "The folder holding the proxy's certificate pair: cert.pem (the server certificate followed by\n"
     "its intermediates) and key.pem (its private key, unencrypted; mode 0600). Its names must match\n"
     "what clients connect to. For a try: deploy/tls-selfsigned.sh deploy/tls [HOSTNAME ...] (clients\n"
     "then trust deploy/tls/ca.pem). Renewed files are read when the proxy restarts."),
    ("PACSBRIDGE_WORKERS", "1", "publish",
     "Worker containers (each runs indexing and job processes); `docker compose up -d --scale worker=N`\n"
     "does the same. With podman-compose, give `down` the same value as `up`."),
    ("PACSBRIDGE_IMAGE", "pacsbridge:latest", "publish", "Image name."),
    ("BASE_IMAGE", "python:3.11-slim", "publish",
     "The base image it is built on (any Debian/Ubuntu image with python3 + python3-venv)."),
    ("PACSBRIDGE_INIT_TIMEOUT", "120", "startup",
     "Each pacsbridge container runs `pacsbridge init` (idempotent) before its command and waits this\n"
     "long (s) for the database."),
    ("PACSBRIDGE_INIT_DB", "1", "fixed",
     "1: deploy/entrypoint.sh runs `pacsbridge init` before the command (the image's default is 0)."),
)


def mask(name: str, value: Any) -> str:
    """``value`` of the field ``name`` as text safe to print: secrets and passwords in URLs hidden."""
    field = Settings.model_fields.get(name)
    text = _text(value) if not isinstance(value, Path) else str(value)
    if field is not None and _extra(field)["secret"]:
        if name == "api_tokens" and text:
            return ",".join(":".join([p[0], "***", *p[2:]]) if len(p) > 1 else "***"
                            for p in (e.strip().split(":") for e in text.split(",")))
        return "***" if text else ""
    return re.sub(r"(://[^:/@\s]*):[^@/\s]*@", r"\1:***@", text)


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
        if not sep or not name.strip().startswith(PREFIX):
            raise ConfigError(f"{path}:{number}: expected PACSBRIDGE_NAME=value")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[name.strip()] = value
    return values


def _fields(values: Mapping[str, str]) -> dict[str, str]:
    """``PACSBRIDGE_*`` variables -> {field: text}; blank is unset, names that are no setting are ignored."""
    return {_FIELDS_BY_ENV[k]: v for k, v in values.items() if k in _FIELDS_BY_ENV and v.strip()}


def load_settings_with_sources(environ: Mapping[str, str] | None = None,
                               overrides: Mapping[str, Any] | None = None) -> tuple[Settings, dict[str, str]]:
    """:func:`load_settings`, and where each setting came from: ``default``, ``environment``,
    ``config file <path>`` or ``command line``."""
    env = dict(os.environ if environ is None else environ)
    from_env = _fields(env)
    from_file: dict[str, str] = {}
    config = from_env.get("config")
    if config:
        from_file = _fields(_read_env_file(Path(config)))
        from_file.pop("config", None)
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = set(given) - set(Settings.model_fields)
    if unknown:
        raise ConfigError(f"no such setting: {', '.join(sorted(unknown))}")
    sources = {name: "default" for name in Settings.model_fields}
    sources.update({name: f"config file {config}" for name in from_file})
    sources.update({name: "environment" for name in from_env})
    sources.update({name: "command line" for name in given})
    token = _LAYERS.set([("environment", from_env), ("config file", from_file)])
    try:
        settings = Settings(**given)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, {**from_file, **from_env, **{k: str(v) for k, v in given.items()}})) from None
    finally:
        _LAYERS.reset(token)
    return settings, sources


def _describe(exc: ValidationError, values: Mapping[str, str]) -> str:
    """pydantic's errors as one message per variable: ``PACSBRIDGE_NAME='bad': what is wrong``."""
    lines = []
    for error in exc.errors():
        loc = error.get("loc") or ()
        msg = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        if loc and isinstance(loc[0], str) and loc[0] in Settings.model_fields:
            name = loc[0]
            shown = mask(name, values[name]) if name in values else None
            lines.append(f"{env_name(name)}={shown!r}: {msg}" if shown is not None else f"{env_name(name)}: {msg}")
        else:
            lines.append(msg)
    return "; ".join(lines)


def load_settings(environ: Mapping[str, str] | None = None, overrides: Mapping[str, Any] | None = None) -> Settings:
    """Build :class:`Settings` from ``overrides`` (the command line), the environment and ``PACSBRIDGE_CONFIG``.

    Raises
    ------
    ConfigError
        A value is malformed; the message names the variable.
    """
    return load_settings_with_sources(environ, overrides)[0]


def initial_settings() -> Settings:
    """The settings of the environment for module constants and per-call reads: never raises (defaults
    where a value is bad; :func:`load_settings` reports it when the command starts). Cached for as long
    as the ``PACSBRIDGE_*`` environment stays the same (about 20 µs then)."""
    return _initial(tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(PREFIX))))


@functools.lru_cache(maxsize=8)
def _initial(environ: tuple[tuple[str, str], ...]) -> Settings:
    env = dict(environ)
    try:
        return load_settings(env)
    except ConfigError:
        good: dict[str, Any] = {}
        try:
            values = _fields(env)
            if values.get("config"):
                try:
                    values = {**_fields(_read_env_file(Path(values["config"]))), **values}
                except ConfigError:
                    pass
            for name, text in values.items():
                try:
                    Settings(**{name: text})  # type: ignore[arg-type]  # text, validated by the model
                    good[name] = text
                except ValidationError:
                    pass
            return Settings(**good)
        except ValidationError:
            return Settings()
