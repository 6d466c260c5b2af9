"""The ``pacsbridge`` command.

Exit codes: 0 done; 1 done, but some input was rejected (the report says
which and why); 2 bad usage or configuration; 3 a failure that stopped the
work (database unreachable, storage not writable).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from pacsbridge import __version__
from pacsbridge.output import print_rows as _print_rows
from pacsbridge.shared.core.config import Settings, load_settings_with_sources
from pacsbridge.shared.core.errors import ConfigError, DicomSqlError, PacsbridgeError, QueryError

EXIT_OK, EXIT_REJECTED, EXIT_USAGE, EXIT_FAILED = 0, 1, 2, 3

log = logging.getLogger("pacsbridge")
err = Console(stderr=True, highlight=False)


# -- output helpers -----------------------------------------------------------------
#: Seconds between two progress lines when stderr is not a terminal (a log file, a container's output).
PROGRESS_SECONDS = 10.0


def _progress(label: str, lines: bool = True) -> tuple[Progress, Callable[[int, int], None]]:
    """A progress bar on a terminal; otherwise (and ``lines``) a line every :data:`PROGRESS_SECONDS`.

    The callback takes ``(done, total)``; ``total`` is 0 while it is not known. The rate and the
    time left count only what this run did: a resumed rebuild starts at the files done before.
    """
    import time

    progress = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                        TimeRemainingColumn(), console=err, disable=not err.is_terminal, transient=False)
    task = progress.add_task(label, total=None, rate="")
    start = time.monotonic()
    first: list[int] = []
    shown = [start]

    def update(done: int, total: int) -> None:
        if not first:
            first.append(done)  # done before this run (a resumed rebuild)
        elapsed = time.monotonic() - start
        rate = (done - first[0]) / elapsed if elapsed > 0 else 0.0
        progress.update(task, completed=done - first[0], total=(total - first[0]) if total else None,
                        rate=f"{rate:,.0f} files/s" if rate else "")
        now = time.monotonic()
        if err.is_terminal or not lines or now - shown[0] < PROGRESS_SECONDS:
            return
        shown[0] = now
        left = f", about {_duration((total - done) / rate)} left" if total and rate > 0 else ""
        of = f" of {total:,}" if total else ""
        err.print(f"{label}: {done:,}{of} files, {rate:,.0f} files/s{left}")

    return progress, update


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h} h {rest // 60:02d} min" if h else f"{rest // 60} min {rest % 60:02d} s"


def _report(report: Any, fmt: str, seconds: float) -> int:
    data = report.as_dict()
    data["seconds"] = round(seconds, 3)
    total = report.total
    data["files_per_second"] = round(total / seconds, 1) if seconds > 0 else None
    if fmt == "json":
        json.dump(data, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        parts = [f"{data[k]} {k}" for k in ("stored", "indexed", "duplicate", "rejected", "removed", "pruned",
                                             "quarantined")
                 if data[k] or k in ("rejected",)]
        err.print(f"{', '.join(parts)} in {seconds:.1f} s"
                  + (f" ({data['files_per_second']:,} files/s)" if data["files_per_second"] else ""))
        if data.get("resumed_after"):
            err.print(f"resumed after {data['resumed_after']} ({data['done_before']:,} files done before)")
        for f, reason in report.rejected:
            err.print(f"[red]rejected[/red] {f}: {reason}")
    return EXIT_REJECTED if report.rejected else EXIT_OK


def _context(args: argparse.Namespace) -> Any:
    from pacsbridge.shared.index.context import open_context

    return open_context(args.settings)


def _require_tables(ctx: Any) -> None:
    if not ctx.index.exists():
        raise ConfigError("the index has no tables yet: run `pacsbridge init` first")


# -- verbs ------------------------------------------------------------------------------
def cmd_init(args: argparse.Namespace) -> int:
    ctx = _context(args)
    existed = ctx.index.exists()
    done = ctx.index.create(force=args.force)  # the migrations: any older database is brought to head
    ctx.storage.ensure()
    if existed and not args.force:
        for line in done:
            err.print(f"upgraded: {line}")
    what = "recreated" if args.force else ("upgraded" if existed and done else "checked" if existed else "created")
    shown = ctx.index.engine.url.render_as_string(hide_password=True)  # never print the password
    err.print(f"index {what}: {shown} ({ctx.index.schema.source}); storage {ctx.storage.root}")
    return EXIT_OK


def _run_importer(args: argparse.Namespace, label: str, work: Callable[[Any], Any]) -> int:
    """Open the index (creating tables), run ``work(importer)`` under a progress bar, report."""
    import time

    from pacsbridge.shared.index.importer import Importer

    ctx = _context(args)
    ctx.index.create()
    progress, update = _progress(label, lines=args.format == "text")
    t0 = time.perf_counter()
    with progress:
        try:
            report = work(Importer(ctx.index, ctx.storage, args.workers, update))
        except KeyboardInterrupt:
            if label == "rebuild":
                err.print("rebuild interrupted: what was indexed stays; run it again to go on from there "
                          "(--restart to start from the beginning)")
            raise
    return _report(report, args.format, time.perf_counter() - t0)


def cmd_import(args: argparse.Namespace) -> int:
    if args.move and args.in_place:
        raise ConfigError("--move and --in-place exclude each other")
    return _run_importer(args, "import",
                         lambda imp: imp.import_paths(args.paths, move=args.move, in_place=args.in_place))


def cmd_rebuild(args: argparse.Namespace) -> int:
    return _run_importer(args, "rebuild", lambda imp: imp.rebuild(missing_only=args.missing, prune=args.prune,
                                                                  restart=args.restart))


def cmd_delete(args: argparse.Namespace) -> int:
    """Delete a patient, study or series: through the API (a job, an admin token), or ``--offline`` in this
    process, on the database and storage of the settings (both writable here)."""
    from pacsbridge import client

    if not args.offline:
        return client._run(client.cmd_delete)(args)
    import getpass

    from pacsbridge.shared.index import removal

    try:
        _, key, value = client.delete_target(args)
    except client.ClientError as exc:
        raise ConfigError(str(exc)) from None
    ctx = _context(args)
    _require_tables(ctx)
    if not args.yes:
        series = removal.plan(ctx.index, key, [value])
        print(f"{key} {value}: {len(series)} series, {sum(s.instances for s in series)} instances", file=sys.stderr)
        if input("delete them from the index and the storage? [y/N] ").strip().lower() not in ("y", "yes"):
            return EXIT_USAGE
    actor = f"cli {getpass.getuser()}"[:64]
    done, report = removal.remove(ctx.index, ctx.storage, key, [value], actor, f"cli {key} {value}")
    if not done and not (report.finished_earlier or report.studies or report.patients):
        raise ConfigError(f"nothing in the index matches {key} {value}")
    if args.format == "json":
        print(json.dumps(report.as_dict()))
    else:
        print(f"deleted {report.series} series, {report.instances} instances ({report.files_removed} files; "
              f"{report.studies} studies and {report.patients} patients emptied)")
        for error in report.errors[:20]:
            print(f"  left: {error}", file=sys.stderr)
    return EXIT_OK if not (report.files_refused or report.files_failed) else EXIT_FAILED


def cmd_sql(args: argparse.Namespace) -> int:
    ctx = _context(args)
    columns, rows = ctx.index.run_sql(args.query, write=args.write)
    _print_rows(columns, rows, args.format)
    return EXIT_OK


def cmd_summary(args: argparse.Namespace) -> int:
    ctx = _context(args)
    _require_tables(ctx)
    columns, rows = ctx.index.series_summary()
    _print_rows(columns, rows, args.format, title="series per patient and modality")
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    """Copy stored files out; with ``--project``, de-identified under it. Audited as ``cli:<user>`` either way."""
    import getpass
    from collections import Counter

    from pacsbridge.shared.deid.keys import secret
    from pacsbridge.shared.deid.outgoing import Outgoing, audit_identifiable
    from pacsbridge.shared.deid.projects import ProjectStore
    from pacsbridge.shared.index.export import export_files, select_files

    ctx = _context(args)
    _require_tables(ctx)
    ctx.index.create()  # the projects and audit tables of an index made by an older version
    selected = select_files(ctx.index, patient=args.patient, study=args.study, series=args.series, query=args.query)
    if not selected:
        err.print("nothing matched: no files exported")
        return EXIT_REJECTED
    projects = ProjectStore(ctx.index.engine)
    actor, target = f"cli:{getpass.getuser()}", f"folder {Path(args.dest).absolute()}"
    outgoing = None
    if args.project:  # the key checked against the secret before anything is written
        outgoing = Outgoing(projects.open(args.project, secret(ctx.settings)), actor, "export", target)
    progress, update = _progress("export")
    try:
        with progress:
            # --subdirs alone means the patient/study/series tree; --layout names another (and implies --subdirs)
            layout = args.layout or ("patient-study-series" if args.subdirs else None)
            result = export_files(ctx.index, ctx.storage, selected, Path(args.dest), layout=layout, progress=update,
                                  transform=outgoing)
    finally:
        if outgoing is not None:
            outgoing.close()
    if outgoing is None:
        failed = {f for f, _ in result.failed}
        studies = Counter(r.get("study") or "" for r in selected if r.get("ObjectFile") not in failed)
        owners = ctx.index.owners([s for s in studies if s], [], [])[0]["Study"]
        counts = Counter({(owners.get(s) or "", s): n for s, n in studies.items()})
        audit_identifiable(projects, actor, "export", target, counts, counts)
    withheld = f", {len(result.withheld)} withheld by project {args.project!r}" if result.withheld else ""
    err.print(f"{result.copied} copied, {result.skipped} already there, {len(result.failed)} failed{withheld} "
              f"→ {args.dest}")
    for f, reason in result.failed:
        err.print(f"[red]failed[/red] {f}: {reason}")
    for f, reason in result.withheld:
        err.print(f"[yellow]withheld[/yellow] {f}: {reason}")
    return EXIT_REJECTED if result.failed else EXIT_OK


def cmd_quarantine(args: argparse.Namespace) -> int:
    """What indexing set aside: list, show one entry, or carry out a decision (audited as ``cli:<user>``)."""
    import getpass

    from pacsbridge.shared.core.errors import InvalidRequest
    from pacsbridge.shared.index.conflicts import resolve
    from pacsbridge.shared.index.quarantine import Quarantine

    ctx = _context(args)
    _require_tables(ctx)
    ctx.index.create()  # the quarantine table of an index made by an older version
    store = Quarantine(ctx.index.engine)
    columns = ["id", "reason", "level", "patient_id", "other_patient_id", "sop_uid", "relpath", "decision",
               "resolved_by", "detail"]
    if args.action == "list":
        resolved = {"open": False, "resolved": True, "all": None}[args.state]
        items, total = store.list(reason=args.reason, resolved=resolved, limit=args.limit)
        _print_rows(columns, [[e[c] for c in columns] for e in items], args.format,
                    title=f"quarantine: {len(items)} of {total}")
        return EXIT_OK
    if args.id is None:
        raise ConfigError(f"quarantine {args.action}: give the entry's id")
    if args.action == "show":
        entry = store.get(args.id)
    else:
        if args.decision is None:
            raise ConfigError("quarantine resolve: give a decision (retry, discard, correct, new-patient)")
        try:
            user = getpass.getuser()
        except (KeyError, OSError):
            user = "?"
        try:
            entry = resolve(ctx, args.id, args.decision, f"cli:{user}")
        except InvalidRequest as exc:  # a decision that does not fit the entry: bad usage
            raise ConfigError(str(exc)) from None
    if args.format == "json":
        json.dump(entry, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    else:
        _print_rows(["field", "value"], [[k, v] for k, v in entry.items()], "table")
    return EXIT_OK


def cmd_config(args: argparse.Namespace) -> int:
    """The effective settings, each with where it came from (secrets masked); or the generated reference."""
    from pacsbridge.shared.core.config import env_name, mask

    if args.reference:
        from pacsbridge.shared.core.configdoc import render

        sys.stdout.write(render(args.reference))
        return EXIT_OK
    settings, sources = args.settings, args.setting_sources
    rows = [[env_name(name), mask(name, getattr(settings, name)), sources[name]]
            for name in type(settings).model_fields
            if args.all or sources[name] != "default" or name in _ALWAYS_SHOWN]
    _print_rows(["setting", "value", "source"], rows, args.format, title="effective settings")
    return EXIT_OK


#: What ``pacsbridge config`` shows even at its default (the rest only with --all).
_ALWAYS_SHOWN = ("database_url", "storage", "dicom_sql", "special_columns", "broker_url", "ae_title")


def cmd_service(args: argparse.Namespace) -> int:
    """listener / worker / api / serve: implemented by the services."""
    if args.verbose == 0:
        # a service logs its own events (one line per association, outages) by default
        logging.getLogger("pacsbridge").setLevel(logging.INFO)
    if args.verbose < 2:
        # pynetdicom logs every PDU and identifier at INFO: our own lines say what matters
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    if args.command == "listener":
        from pacsbridge.listener.server import main as run
    elif args.command == "worker":
        from pacsbridge.worker.main import main as run
    elif args.command == "serve":
        from pacsbridge.serve import main as run
    else:  # pragma: no cover - parser allows only these
        raise ConfigError(f"unknown service {args.command}")
    return int(run(args.settings, args) or 0)


def cmd_api(args: argparse.Namespace) -> int:
    """Run the HTTP API with waitress (what compose runs too).

    waitress reads every request whole in its I/O loop and only then hands it to one of
    ``PACSBRIDGE_API_THREADS`` threads, so clients that send slowly (or not at all) hold a
    socket, never a thread: a few of them cannot starve the API, as they did gunicorn's
    sync workers (a thread or a process per connection from its first byte).
    """
    from waitress.server import create_server

    from pacsbridge.api import create_app

    if args.verbose == 0:
        logging.getLogger("pacsbridge").setLevel(logging.INFO)
    settings = args.settings
    host = args.host or settings.api_host
    port = args.port or settings.api_port
    app = create_app({"SETTINGS": settings})
    _access_log(app)
    err.print(f"pacsbridge API on http://{host}:{port}/api/v1 (OpenAPI: /api/v1/openapi.json, health: /healthz)")
    server = create_server(app, host=host, port=port, threads=settings.api_threads,
                           connection_limit=settings.api_connections,
                           asyncore_use_poll=True,  # poll(), not select(): more than 1024 descriptors
                           channel_timeout=60, ident="pacsbridge")
    server.run()
    return EXIT_OK


def _access_log(app: Any) -> None:
    """One line per request (waitress writes none): address, token, method, path, status, time.

    The query string is left out: it may hold names and IDs of patients.
    """
    import time

    from flask import g, request

    access = logging.getLogger("pacsbridge.api.access")

    @app.after_request
    def _log(response: Any) -> Any:
        started = g.get("started")
        took = f"{(time.perf_counter() - started) * 1000:.0f} ms" if started is not None else "-"
        path = request.path.encode("unicode_escape").decode("ascii")  # a %0A cannot forge a log line
        access.info("%s %s %s %s %s %s", request.remote_addr, g.get("token_name", "-"), request.method,
                    path, response.status_code, took)
        return response


# -- parser ----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pacsbridge",
        description="Bridge a hospital PACS and a research platform; a Conquest-compatible DICOM index.",
        epilog="Settings come from PACSBRIDGE_* environment variables and the file named by PACSBRIDGE_CONFIG "
               "(docs/configuration.md, `pacsbridge config`); the options below override them.")
    parser.add_argument("--version", action="version", version=f"pacsbridge {__version__}")
    parser.add_argument("--database", metavar="URL", help="index database (PACSBRIDGE_DATABASE_URL)")
    parser.add_argument("--storage", metavar="DIR", help="storage root (PACSBRIDGE_STORAGE)")
    parser.add_argument("--dicom-sql", metavar="FILE", help="Conquest dicom.sql to use (PACSBRIDGE_DICOM_SQL)")
    parser.add_argument("--special-columns", action="store_true", default=None,
                        help="add pyconquest's RT columns (PACSBRIDGE_SPECIAL_COLUMNS)")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("init", help="create the index tables, or bring an older database up to date",
                       description="Create the tables (Conquest's from dicom.sql, and pacsbridge's), or bring a "
                                   "database made by an older pacsbridge or with an older dicom.sql up to date: "
                                   "the migrations add what is missing and keep every row (docs/migrations.md).")
    p.add_argument("--force", action="store_true",
                   help="drop and recreate Conquest's tables, emptying the index (files, jobs and nodes are kept)")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("import", help="import files, folders and zip files",
                       description="Store files, folder trees and zip files and index them. Files that are not "
                                   "DICOM, truncated or lacking a UID are reported and skipped.")
    p.add_argument("paths", nargs="+", metavar="PATH")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--move", action="store_true", help="remove the originals once stored and indexed")
    g.add_argument("--in-place", action="store_true", help="index the files where they are, without copying")
    p.add_argument("--template", metavar="T", help="file name template or preset (PACSBRIDGE_FILENAME_TEMPLATE)")
    p.add_argument("--duplicates", choices=("keep", "replace", "keep-both"),
                   help="a second copy of a stored SOP Instance (PACSBRIDGE_DUPLICATES)")
    p.add_argument("--workers", type=int, default=0, help="header-reading processes (default: one per core)")
    p.add_argument("--format", choices=("text", "json"), default="text", help="report format")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("rebuild", help="rebuild the index from storage", description=(
        "Index every file in storage (pyconquest's rebuild_database_from_dicom). Storage is walked in a fixed "
        "order and indexed as it goes; a rebuild that was interrupted goes on where it stopped when run again "
        "(rows already written stay; `init --force` first empties the index)."))
    p.add_argument("--missing", action="store_true", help="only files not indexed yet")
    p.add_argument("--prune", action="store_true", help="also remove rows whose file is gone")
    p.add_argument("--restart", action="store_true",
                   help="ignore where an interrupted rebuild stopped: start from the beginning")
    p.add_argument("--workers", type=int, default=0, help="header-reading processes (default: one per core)")
    p.add_argument("--format", choices=("text", "json"), default="text", help="report format")
    p.set_defaults(func=cmd_rebuild)

    p = sub.add_parser("delete", help="delete a patient, study or series from the index and storage",
                       description="Delete a patient, a study or a series: index rows and stored files, audited "
                                   "(docs/retention.md). Through the API by default (a job; an admin token); "
                                   "--offline does it in this process on the settings' database and storage.")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--patient", metavar="PATIENT_ID")
    g.add_argument("--study", metavar="STUDY_UID")
    g.add_argument("--series", metavar="SERIES_UID")
    p.add_argument("--follow", action="store_true", help="wait for the job, with progress (through the API)")
    p.add_argument("--offline", action="store_true", help="delete in this process, not through the API")
    p.add_argument("--yes", action="store_true", help="--offline: do not ask first")
    p.add_argument("--api", help="API base URL (PACSBRIDGE_API_URL, default http://127.0.0.1:8080)")
    p.add_argument("--token", help="API token (PACSBRIDGE_API_TOKEN)")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    p.set_defaults(func=cmd_delete)

    p = sub.add_parser("sql", help="run SQL on the index", description=(
        "Run SQL on the index, e.g. \"select SeriesInst from DICOMSeries where Modality='CT'\". "
        "Changes are rolled back unless --write is given."))
    p.add_argument("query", metavar="SQL")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    p.add_argument("--write", action="store_true", help="commit what the statement changes")
    p.set_defaults(func=cmd_sql)

    p = sub.add_parser("summary", help="series summary per patient",
                       description="Series per patient and modality (pyconquest's dicom_series_summary).")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser("export", help="copy stored files out", description=(
        "Copy the files of a patient, study, series or SQL selection to a folder "
        "(pyconquest's copy_dicom_files_to_dest). --query must return a column ObjectFile, SOPInstanc, "
        "SeriesInst, StudyInsta or PatientID."))
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--patient", metavar="ID")
    g.add_argument("--study", metavar="UID")
    g.add_argument("--series", metavar="UID", action="append")
    g.add_argument("--query", metavar="SQL")
    p.add_argument("--dest", required=True, metavar="DIR")
    p.add_argument("--subdirs", action="store_true", help="sort into patient/study/series folders")
    p.add_argument("--layout", metavar="T", help="sub-folder template or preset (implies --subdirs)")
    p.add_argument("--project", metavar="NAME",
                   help="write de-identified files under this project (PACSBRIDGE_DEID_SECRET needed)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("quarantine", help="what indexing set aside: list, show, resolve", description=(
        "Instances indexing set aside: index_failed (the database refused the instance) and uid_conflict (its "
        "UID is indexed under another PatientID). resolve ID DECISION: retry or discard (index_failed); "
        "correct, new-patient or discard (uid_conflict). Each decision is logged and kept in the entry."))
    p.add_argument("action", choices=("list", "show", "resolve"))
    p.add_argument("id", nargs="?", type=int, help="entry id (show, resolve)")
    p.add_argument("decision", nargs="?", choices=("retry", "discard", "correct", "new-patient"))
    p.add_argument("--reason", choices=("index_failed", "uid_conflict"))
    p.add_argument("--state", choices=("open", "resolved", "all"), default="open", help="list: default open")
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    p.set_defaults(func=cmd_quarantine)

    for name, text in (("listener", "run the DICOM C-STORE listener"), ("worker", "run a Celery worker")):
        p = sub.add_parser(name, help=text, description=text)
        if name == "listener":
            p.add_argument("--port", type=int, help="DICOM port (PACSBRIDGE_LISTENER_PORT)")
            p.add_argument("--processes", type=int, default=None,
                           help="receiver processes sharing the port (PACSBRIDGE_LISTENER_PROCESSES)")
        else:
            p.add_argument("--concurrency", type=int, default=None,
                           help="indexing processes (PACSBRIDGE_WORKER_CONCURRENCY, default: cores)")
            p.add_argument("--job-concurrency", type=int, default=None,
                           help="jobs run at once (PACSBRIDGE_JOB_CONCURRENCY, default 2)")
            p.add_argument("--queues", choices=("all", "index", "jobs", "webhooks"), default=None,
                           help="what this worker serves (PACSBRIDGE_WORKER_QUEUES, default all)")
        p.set_defaults(func=cmd_service)
    p = sub.add_parser("api", help="run the HTTP API (waitress)",
                       description="Run the HTTP API with waitress, which slow clients cannot starve "
                                   "(PACSBRIDGE_API_THREADS, PACSBRIDGE_API_CONNECTIONS).")
    p.add_argument("--host", help="address to listen on (PACSBRIDGE_API_HOST, default 127.0.0.1)")
    p.add_argument("--port", type=int, help="TCP port (PACSBRIDGE_API_PORT, default 8080)")
    p.set_defaults(func=cmd_api)

    p = sub.add_parser("config", help="print the effective settings and where each came from",
                       description="Print the effective settings (tokens, secrets and passwords in URLs masked) "
                                   "and where each came from: default, environment, config file (PACSBRIDGE_CONFIG) "
                                   "or command line. --reference prints the generated reference instead.")
    p.add_argument("--all", action="store_true", help="also the settings left at their default")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    p.add_argument("--reference", choices=("markdown", "env"),
                   help="print docs/configuration.md (markdown) or deploy/pacsbridge.env.example (env)")
    p.set_defaults(func=cmd_config)

    from pacsbridge import client, serve

    serve.add_parser(sub, cmd_service)
    client.add_parsers(sub)
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The settings the command line gives (the highest of the sources, see shared/core/config.py)."""
    changes: dict[str, Any] = {}
    if args.database:
        changes["database_url"] = args.database
    if args.storage:
        changes["storage"] = Path(args.storage)
    if args.dicom_sql:
        changes["dicom_sql"] = Path(args.dicom_sql)
    if args.special_columns:
        changes["special_columns"] = True
    if getattr(args, "template", None):
        changes["filename_template"] = args.template
    if getattr(args, "duplicates", None):
        changes["duplicates"] = args.duplicates
    return changes


def _settings(args: argparse.Namespace) -> Settings:
    settings, args.setting_sources = load_settings_with_sources(overrides=_overrides(args))
    return settings


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pacsbridge`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.verbose < 2:
        # pydicom warns about every oddity of a file it still reads; rejections are reported by us
        import pydicom  # noqa: F401  (pydicom sets its logger's level on import)

        warnings.filterwarnings("ignore", module=r"pydicom(\..*)?")
        logging.getLogger("pydicom").setLevel(logging.ERROR)
    try:
        args.settings = _settings(args)
        return int(args.func(args))
    except (ConfigError, DicomSqlError) as exc:
        err.print(f"[red]error[/red]: {exc}")
        return EXIT_USAGE
    except QueryError as exc:
        err.print(f"[red]query failed[/red]: {exc}")
        return EXIT_USAGE
    except PacsbridgeError as exc:
        err.print(f"[red]failed[/red]: {exc}")
        return EXIT_FAILED
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130
    except Exception as exc:
        from sqlalchemy.exc import SQLAlchemyError

        if isinstance(exc, SQLAlchemyError):
            orig = getattr(exc, "orig", None) or exc
            err.print(f"[red]database error[/red]: {str(orig).strip().splitlines()[0] if str(orig).strip() else exc}")
            return EXIT_FAILED
        if isinstance(exc, OSError):
            err.print(f"[red]failed[/red]: {exc}")
            return EXIT_FAILED
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
