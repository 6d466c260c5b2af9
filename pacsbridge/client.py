"""The command-line client: pypx's verbs (find, retrieve, push, status ...) spoken to the HTTP API.

``--api`` (``PACSBRIDGE_API_URL``, default ``http://127.0.0.1:8080``) and
``--token`` (``PACSBRIDGE_API_TOKEN``) say where and as whom. Reports are a
table, CSV or JSON (``--format``). Exit codes: 0 the job succeeded (or the
request was done); 1 the job ended partial; 2 bad usage or a request the API
refused; 3 the job failed or was cancelled, or the API could not be reached.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from typing import Any, Callable, Sequence

from pacsbridge.shared.core.config import load_settings

__all__ = ["ApiClient", "ClientError", "add_parsers", "QUERY_FIELDS", "check_job", "check_query", "safe_filename"]

EXIT_OK, EXIT_PARTIAL, EXIT_USAGE, EXIT_FAILED = 0, 1, 2, 3
#: Query flags shared by ``find`` and ``retrieve`` (the query model of the jobs).
QUERY_FIELDS = ("PatientID", "PatientName", "AccessionNumber", "StudyDescription", "Modality",
                "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
_JOB_EXIT = {"succeeded": EXIT_OK, "partial": EXIT_PARTIAL, "failed": EXIT_FAILED, "cancelled": EXIT_FAILED}


class ClientError(Exception):
    """The API refused a request (``status`` >= 400) or could not be reached (``status`` 0)."""

    def __init__(self, status: int, message: str, problems: Sequence[dict[str, Any]] = ()) -> None:
        super().__init__(message)
        self.status = status
        #: A refused cohort file's problems, by row and column (``{"row", "column", "message"}``).
        self.problems = list(problems)


class ApiClient:
    """A small JSON client of the pacsbridge API (standard library only)."""

    def __init__(self, base: str, token: str = "", timeout: float = 60.0) -> None:
        self.base = base.rstrip("/")
        self.token = token
        self.timeout = timeout

    def request(self, method: str, path: str, body: Any = None, params: dict[str, Any] | None = None) -> Any:
        raw = self.fetch(method, path, body, params)
        return json.loads(raw) if raw else None

    def fetch(self, method: str, path: str, body: Any = None, params: dict[str, Any] | None = None,
              accept: str = "application/json") -> bytes:
        """The raw body of an answer (a CSV export ...); :class:`ClientError` as :meth:`request`."""
        data = json.dumps(body).encode() if body is not None else None
        return self.send(method, path, data, "application/json" if data is not None else "", params, accept)[0]

    def send(self, method: str, path: str, data: bytes | None = None, content_type: str = "",
             params: dict[str, Any] | None = None, accept: str = "application/json") -> tuple[bytes, Any]:
        """The raw body and the headers of an answer to ``data`` (already encoded, of ``content_type``)."""
        url = f"{self.base}/api/v1/{path.lstrip('/')}"
        if params:
            url += "?" + urllib.parse.urlencode({k: v for k, v in params.items() if v not in (None, "")})
        headers = {"Accept": accept}
        if content_type:
            headers["Content-Type"] = content_type
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:  # noqa: S310 - the user's own API URL
                return resp.read(), resp.headers
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            raise ClientError(exc.code, _error_message(raw, exc.code), _problems(raw)) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ClientError(0, f"cannot reach the API at {self.base}: {reason}") from None

    def upload(self, path: str, fields: dict[str, str], filename: str, content: bytes) -> Any:
        """POST a file (form field ``file``) and ``fields`` as ``multipart/form-data``; the JSON answer."""
        boundary = f"pacsbridge-{uuid.uuid4().hex}"
        parts = []
        for name, value in fields.items():
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
                         + value.encode("utf-8") + b"\r\n")
        safe = _quote_filename(filename)
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{safe}"\r\n'
                     "Content-Type: application/octet-stream\r\n\r\n".encode() + content + b"\r\n")
        data = b"".join(parts) + f"--{boundary}--\r\n".encode()
        raw, _ = self.send("POST", path, data, f"multipart/form-data; boundary={boundary}")
        return json.loads(raw) if raw else None

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params=params)

    def post(self, path: str, body: Any = None) -> Any:
        return self.request("POST", path, body if body is not None else {})


def _quote_filename(name: str) -> str:
    """A file name fit for a multipart header: its base name, no quotes, backslashes or line breaks."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    return "".join(c for c in base if c.isprintable() and c not in '"\\') or "cohort"


def _problems(raw: bytes) -> list[dict[str, Any]]:
    """The ``problems`` of an error body (a refused cohort file), if it has any."""
    try:
        data = json.loads(raw)
    except ValueError:
        return []
    err = data.get("error") if isinstance(data, dict) else None
    problems = err.get("problems") if isinstance(err, dict) else None
    return [p for p in problems if isinstance(p, dict)] if isinstance(problems, list) else []


def _error_message(raw: bytes, status: int) -> str:
    try:
        data = json.loads(raw)
    except ValueError:
        return f"HTTP {status}"
    err = data.get("error", data) if isinstance(data, dict) else {}
    if isinstance(err, dict):
        message = err.get("message") or f"HTTP {status}"
        field = err.get("field")
        return f"{field}: {message}" if field and field not in message else str(message)
    return str(err)


# -- output ------------------------------------------------------------------------
def _print(columns: Sequence[str], rows: Sequence[Sequence[Any]], fmt: str, title: str | None = None,
           width: int | None = None) -> None:
    from pacsbridge.output import print_rows as _print_rows

    _print_rows(columns, rows, fmt, title, width)


#: Columns of a C-FIND answer, most useful first: a table shows as many as the terminal holds.
FIND_COLUMNS = ("PatientID", "PatientName", "StudyDate", "Modality", "ModalitiesInStudy", "SeriesNumber",
                "InstanceNumber", "StudyDescription", "SeriesDescription", "AccessionNumber",
                "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances", "NumberOfSeriesRelatedInstances",
                "NumberOfPatientRelatedStudies", "PatientBirthDate", "PatientSex", "StudyTime",
                "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")


def _fit_columns(columns: Sequence[str], rows: Sequence[Sequence[Any]], width: int,
                 first: Sequence[str] = ()) -> list[str]:
    """The columns to show in ``width`` terminal cells: by priority, each at its full width.

    ``first`` (the fields the user asked for with ``--include``) come right after PatientID;
    then :data:`FIND_COLUMNS`' order, then the rest as they came. A column too wide for what
    is left is skipped and a narrower later one may still fit. They come in that order too.
    """
    from rich.cells import cell_len

    rank = {c: i for i, c in enumerate(["PatientID", *first, *FIND_COLUMNS])}
    order = sorted(range(len(columns)), key=lambda i: (rank.get(columns[i], len(rank)), i))
    used = 1  # the table's left border
    chosen: list[str] = []
    for i in order:
        need = max([cell_len(columns[i])] + [cell_len("" if r[i] is None else str(r[i])) for r in rows]) + 3
        if used + need <= width or not chosen:  # the first one in any case: a table of nothing says nothing
            used += need
            chosen.append(columns[i])
    return chosen


def _query_from(args: argparse.Namespace) -> dict[str, Any]:
    query: dict[str, Any] = {}
    for name in QUERY_FIELDS:
        value = getattr(args, name, None)
        if value:
            query[name] = value
    if getattr(args, "StudyDate", None) is not None:
        from pacsbridge.shared.core.errors import InvalidRequest
        from pacsbridge.shared.dicom.query import parse_date_range

        try:
            lo, hi = parse_date_range(args.StudyDate, "--StudyDate")
        except InvalidRequest as exc:
            raise ClientError(-1, str(exc)) from None
        if lo:
            query["min_study_date"] = lo.strftime("%Y%m%d")
        if hi:
            query["max_study_date"] = hi.strftime("%Y%m%d")
    if getattr(args, "level", None):
        query["level"] = args.level
    if getattr(args, "include", None):
        query["include_fields"] = args.include
    return query


def _selection_from(args: argparse.Namespace) -> dict[str, Any]:
    given = [(k, getattr(args, k)) for k in ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "job")
             if getattr(args, k, None)]
    if len(given) != 1:
        raise ClientError(-1, "give exactly one of --PatientID, --StudyInstanceUID, --SeriesInstanceUID, --job")
    key, value = given[0]
    return {key: value}


JOB_COLUMNS = ("id", "kind", "node", "state", "expected", "received", "indexed", "pushed", "failed", "error")
SERIES_COLUMNS = ("study_uid", "series_uid", "modality", "description", "expected", "received", "indexed",
                  "pushed", "failed", "state", "error")


def _job_row(job: dict[str, Any]) -> list[Any]:
    totals = job.get("totals", {})
    return [job["id"], job["kind"], job.get("node") or "", job["state"],
            *(totals.get(c, 0) for c in ("expected", "received", "indexed", "pushed", "failed")),
            (job.get("error") or "")[:120]]


def _show_job(job: dict[str, Any], fmt: str) -> None:
    if fmt == "json":
        json.dump(job, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    _print(SERIES_COLUMNS, [[s.get(c, "") for c in SERIES_COLUMNS] for s in job.get("series", [])], fmt,
           title=f"job {job['id']} ({job['kind']}): {job['state']}"
           + (f" — {job['error']}" if job.get("error") else ""))


def _follow(api: ApiClient, job_id: str, fmt: str, interval: float = 1.0) -> dict[str, Any]:
    """Poll a job until it ends, with live progress bars per series on a terminal."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    err = Console(stderr=True, highlight=False)
    bars: dict[str, Any] = {}
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[state]}"), console=err, disable=not err.is_terminal) as progress:
        while True:
            job = api.get(f"jobs/{job_id}")
            for s in job.get("series", []):
                label = f"{s.get('modality') or '?':>3} {s.get('description') or s['series_uid'][-20:]}"[:40]
                total = s.get("expected") or None
                done = s.get("pushed") if job["kind"] == "push" else s.get("indexed")
                if job["kind"] == "delete":  # a series is deleted at once: all or nothing yet
                    done = total if s.get("state") == "done" else 0
                if s["series_uid"] not in bars:
                    bars[s["series_uid"]] = progress.add_task(label, total=total, state="")
                progress.update(bars[s["series_uid"]], total=total, completed=done or 0, state=s.get("state", ""))
            if job["state"] not in ("queued", "running"):
                return job  # type: ignore[no-any-return]
            time.sleep(interval)


def _finish(api: ApiClient, job: dict[str, Any], args: argparse.Namespace) -> int:
    """After a submit: print the id, or follow the job to its end."""
    if not getattr(args, "follow", False):
        if args.format == "json":
            json.dump(job, sys.stdout, indent=2)
            sys.stdout.write("\n")
        else:
            print(job["id"])
        return EXIT_OK
    done = _follow(api, job["id"], args.format)
    _show_job(done, args.format)
    return _JOB_EXIT.get(done["state"], EXIT_FAILED)


#: The option that sets a field of a request (what an error names), where it is not ``--<field>``.
_OPTION_OF = {"selection.PatientID": "--PatientID", "selection.StudyInstanceUID": "--StudyInstanceUID",
              "selection.SeriesInstanceUID": "--SeriesInstanceUID", "selection.job": "--job", "template": "--layout",
              "min_study_date": "--StudyDate", "max_study_date": "--StudyDate", "include_fields": "--include",
              "ae_title": "--aet", "move_destination": "--move-destination", "max_associations": "--max-associations",
              "max_rate": "--max-rate", "move_window": "--move-window", "query": "the query",
              **{f: "--" + f.replace("_", "-") for f in ("web_url", "qido_url", "wado_url", "wado_uri_url", "stow_url",
                                                          "web_auth", "web_user", "web_secret", "web_verify",
                                                          "web_ca_bundle", "web_timeout")}}


def _refused_here(exc: Exception) -> ClientError:
    """A request the shared models refuse, said with the option to change (exit 2, nothing sent)."""
    field = getattr(exc, "field", "") or ""
    message = str(exc)
    if field and message.startswith(f"{field}: "):
        message = message[len(field) + 2:]
    option = _OPTION_OF.get(field) or (f"--{field}" if field and "." not in field else field)
    return ClientError(-1, f"{option}: {message}" if option else message)


def check_job(body: dict[str, Any]) -> None:
    """Check a job request with the models the API and the worker check it with
    (:mod:`pacsbridge.shared.jobs.spec`), before sending it. The webhook's allow-list is the API's to check."""
    from pacsbridge.shared.core.errors import InvalidRequest
    from pacsbridge.shared.jobs.spec import validate

    try:
        validate(body)
    except InvalidRequest as exc:
        raise _refused_here(exc) from None


def check_query(query: dict[str, Any]) -> None:
    """Check a query with the query model of the API (:class:`pacsbridge.shared.dicom.query.QueryModel`)."""
    from pacsbridge.shared.core.errors import InvalidRequest
    from pacsbridge.shared.dicom.query import Query

    try:
        Query.from_dict(query)
    except InvalidRequest as exc:
        raise _refused_here(exc) from None


def _submit(api: ApiClient, body: dict[str, Any]) -> dict[str, Any]:
    check_job(body)
    answer = api.post("jobs", body)
    return answer if "state" in answer else api.get(f"jobs/{answer['id']}")  # type: ignore[no-any-return]


# -- verbs -------------------------------------------------------------------------
def cmd_echo(api: ApiClient, args: argparse.Namespace) -> int:
    result = api.post(f"nodes/{urllib.parse.quote(args.node, safe='')}/echo")
    _print(list(result), [list(result.values())], args.format)
    return EXIT_OK


def cmd_find(api: ApiClient, args: argparse.Namespace) -> int:
    query = _query_from(args)
    check_query(query)
    answer = api.post(f"nodes/{urllib.parse.quote(args.node, safe='')}/query", query)
    results = answer.get("results", answer) if isinstance(answer, dict) else answer
    if not results:
        from rich.console import Console

        if args.format == "json":
            print("[]")
        Console(stderr=True, highlight=False).print(
            f"no match on {args.node}" + (f": nothing to {args.then}" if args.then else ""))
        return EXIT_OK
    _show_found(results, args)
    if not args.then:
        return EXIT_OK
    query.pop("level", None)
    if args.then == "retrieve":
        job = _submit(api, {"kind": "retrieve", "node": args.node, "query": query})
    else:
        # push / repack what the retrieve brings: retrieve first, then act on that job
        retrieve = _follow(api, _submit(api, {"kind": "retrieve", "node": args.node, "query": query})["id"],
                           args.format)
        if retrieve["state"] not in ("succeeded", "partial"):
            _show_job(retrieve, args.format)
            return EXIT_FAILED
        body: dict[str, Any] = {"kind": args.then, "selection": {"job": retrieve["id"]}}
        if args.then == "push":
            if not args.to:
                raise ClientError(-1, "--then push needs --to NODE")
            body["node"] = args.to
        else:
            if not args.dest:
                raise ClientError(-1, "--then repack needs --dest FOLDER (under PACSBRIDGE_EXPORT_ROOT)")
            body["dest"] = args.dest
        if args.project:
            body["project"] = args.project
        job = _submit(api, body)
    return _finish(api, job, args)


def _show_found(results: Sequence[dict[str, Any]], args: argparse.Namespace) -> None:
    """A find answer: the ``--columns`` asked for, else every column (csv, json) or those that fit (table)."""
    from rich.console import Console

    columns: list[str] = []
    for r in results:
        columns += [k for k in r if k not in columns]
    title = f"{len(results)} result(s) from {args.node}"
    if args.columns:
        wanted = [c.strip() for c in args.columns.split(",") if c.strip()]
        missing = [c for c in wanted if c not in columns]
        if missing or not wanted:
            raise ClientError(-1, f"--columns: {', '.join(missing) or 'nothing given'} not in the answer; it has "
                                  f"{', '.join(columns)} (ask the node for more with --include)")
        columns = wanted
    rows = [[_cell(r.get(c)) for c in columns] for r in results]
    if args.format == "table" and not args.columns:
        err = Console(stderr=True, highlight=False)
        width = Console().width  # the terminal's, or COLUMNS, or 80 into a pipe
        shown = _fit_columns(columns, rows, width, args.include or ())
        hidden = [c for c in columns if c not in shown]
        rows = [[row[columns.index(c)] for c in shown] for row in rows]
        _print(shown, rows, "table", title=title, width=width)
        if hidden:
            err.print(f"{len(hidden)} column(s) did not fit {width} characters: {', '.join(hidden)}; "
                      "show them with --columns A,B,... or all with --format csv|json")
        return
    _print(columns, rows, args.format, title=title)


def _cell(value: Any) -> Any:
    return "\\".join(map(str, value)) if isinstance(value, list) else value


def cmd_retrieve(api: ApiClient, args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"kind": "retrieve", "node": args.node, "query": _query_from(args)}
    if args.mode:
        body["mode"] = args.mode
    return _finish(api, _submit(api, body), args)


def cmd_push(api: ApiClient, args: argparse.Namespace) -> int:
    body = {"kind": "push", "node": args.node, "selection": _selection_from(args)}
    if args.project:
        body["project"] = args.project
    return _finish(api, _submit(api, body), args)


def cmd_repack(api: ApiClient, args: argparse.Namespace) -> int:
    body = {"kind": "repack", "selection": _selection_from(args), "dest": args.dest, "link": args.link}
    if args.layout:
        body["template"] = args.layout
    if args.project:
        body["project"] = args.project
    return _finish(api, _submit(api, body), args)


#: ``pacsbridge delete`` option -> (API resource, selection key).
DELETE_TARGETS = {"patient": ("patients", "PatientID"), "study": ("studies", "StudyInstanceUID"),
                  "series": ("series", "SeriesInstanceUID")}


def delete_target(args: argparse.Namespace) -> tuple[str, str, str]:
    """``(resource, key, value)`` of ``pacsbridge delete``'s one --patient, --study or --series."""
    given = [(name, getattr(args, name)) for name in DELETE_TARGETS if getattr(args, name, None)]
    if len(given) != 1:
        raise ClientError(-1, "give exactly one of --patient, --study, --series")
    name, value = given[0]
    resource, key = DELETE_TARGETS[name]
    return resource, key, value


def cmd_delete(api: ApiClient, args: argparse.Namespace) -> int:
    """Ask the API to delete a patient, study or series (an admin token; a job the workers run)."""
    resource, _, value = delete_target(args)
    answer = api.request("DELETE", f"{resource}/{urllib.parse.quote(value, safe='')}")
    job = answer.get("job") or api.get(f"jobs/{answer['id']}")
    return _finish(api, job, args)


def cmd_jobs(api: ApiClient, args: argparse.Namespace) -> int:
    answer = api.get("jobs", state=args.state, kind=args.kind, node=args.node, limit=args.limit)
    items: Any = answer.get("items", answer.get("jobs", [])) if isinstance(answer, dict) else answer
    _print(JOB_COLUMNS, [_job_row(j) for j in items], args.format)
    return EXIT_OK


def cmd_status(api: ApiClient, args: argparse.Namespace) -> int:
    job = _follow(api, args.job, args.format) if args.follow else api.get(f"jobs/{args.job}")
    _show_job(job, args.format)
    return _JOB_EXIT.get(job["state"], EXIT_OK)


def cmd_cancel(api: ApiClient, args: argparse.Namespace) -> int:
    job = api.post(f"jobs/{args.job}/cancel")
    said = job.get("cancel") or {}
    print(f"{job['id']}: {job['state']}" + (f" ({said['message']})" if said.get("message") else ""))
    return EXIT_OK


def cmd_retry(api: ApiClient, args: argparse.Namespace) -> int:
    return _finish(api, api.post(f"jobs/{args.job}/retry"), args)


#: ``nodes add`` options of a node's DICOMweb part (``--web-url`` ...: the node model's fields).
_WEB_OPTIONS = ("web_url", "qido_url", "wado_url", "wado_uri_url", "stow_url", "web_auth", "web_user", "web_secret",
                "web_verify", "web_ca_bundle", "web_timeout", "prefer")


def _read_secret(name: str) -> str:
    """The secret of ``nodes secret``: typed without echo at a terminal, else stdin's first line (a pipe, a
    file: ``< token.txt``). Never an argument: every user of the machine sees those in ``ps``."""
    import getpass

    if sys.stdin.isatty():
        return getpass.getpass(f"secret for node {name} (not echoed): ")
    line = sys.stdin.readline()
    return line[:-1] if line.endswith("\n") else line


def cmd_node_secret(api: ApiClient, args: argparse.Namespace) -> int:
    """``nodes secret NAME``: store the node's DICOMweb secret (read from stdin), sealed by the API with
    PACSBRIDGE_SECRET_KEY; ``--delete``: forget it."""
    if not args.name:
        raise ClientError(-1, "give the node's name: pacsbridge nodes secret NAME")
    path = f"nodes/{urllib.parse.quote(args.name, safe='')}/secret"
    if args.delete:
        api.request("DELETE", path)
        print(f"node {args.name}: stored secret forgotten", file=sys.stderr)
        return EXIT_OK
    from pacsbridge.shared.core.errors import InvalidRequest
    from pacsbridge.shared.nodes.credentials import check_secret

    try:
        secret = check_secret(_read_secret(args.name).rstrip("\r"))
    except InvalidRequest as exc:
        raise ClientError(-1, f"the secret (stdin): {exc}") from None
    api.request("PUT", path, {"secret": secret})
    print(f"node {args.name}: secret stored (sealed; the API never shows it)", file=sys.stderr)
    return EXIT_OK


def cmd_nodes(api: ApiClient, args: argparse.Namespace) -> int:
    if args.action == "secret":
        return cmd_node_secret(api, args)
    if args.action == "add":
        node: dict[str, Any] = {"name": args.name, "ae_title": args.aet, "host": args.host, "port": args.port}
        if args.web_url and args.aet is None and args.host is None and args.port is None:
            node.update(ae_title="", host="", port=0)  # a DICOMweb-only node
        for opt in ("retrieve", "move_destination", "max_associations", "max_rate", "move_window", "project",
                    "identifiable", *_WEB_OPTIONS):
            if getattr(args, opt) is not None:
                node[opt] = getattr(args, opt)
        from pacsbridge.shared.core.errors import InvalidRequest
        from pacsbridge.shared.dicom.node import Node

        try:  # the API's own node model, before anything is sent
            Node.from_dict(node)
        except InvalidRequest as exc:
            raise _refused_here(exc) from None
        api.post("nodes", node)
    elif args.action == "rm":
        api.request("DELETE", f"nodes/{urllib.parse.quote(args.name, safe='')}")
    answer = api.get("nodes")
    items: Any = answer.get("items", answer.get("nodes", [])) if isinstance(answer, dict) else answer
    columns = ("name", "ae_title", "host", "port", "web_url", "retrieve", "max_associations", "max_rate",
               "move_window", "project", "identifiable")
    _print(columns, [[n.get(c, "") for c in columns] for n in items], args.format)
    return EXIT_OK


#: The options of PS3.15 Table E.1-1 that ``projects add`` / ``set`` turn on (``--no-...``: off).
_OPTION_FLAGS = ("retain_safe_private", "retain_uids", "retain_device_identity", "retain_institution_identity",
                 "retain_patient_characteristics", "clean_descriptors", "clean_structured_content", "clean_graphics")
_RISKS = ("burned_in_annotation", "burned_in_likely", "structured_report", "presentation_state",
          "encapsulated_document")
PROJECT_COLUMNS = ("name", "description", "dates", "pseudonyms", "uid_root", "patients", "uids")
MAP_COLUMNS = ("issuer", "patient_id", "pseudonym", "date_offset", "first_used", "last_used")


def _project_config(args: argparse.Namespace) -> dict[str, Any]:
    """The configuration the options give (on top of ``--config FILE.json``): only what was given."""
    from pacsbridge.shared.deid.projects import merge

    config: dict[str, Any] = {}
    if args.config:
        try:
            with open(args.config, encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, ValueError) as exc:
            raise ClientError(-1, f"--config {args.config}: {exc}") from None
        if not isinstance(config, dict):
            raise ClientError(-1, f"--config {args.config}: expected a JSON object")
    given: dict[str, Any] = {}
    options = {k: getattr(args, k) for k in _OPTION_FLAGS if getattr(args, k) is not None}
    if args.dates:
        options["dates"] = args.dates
    if options:
        given["options"] = options
    pseudonyms: dict[str, Any] = {}
    if args.prefix is not None:
        pseudonyms["prefix"] = args.prefix
    if args.digits is not None:
        pseudonyms["digits"] = args.digits
    if args.names is not None:
        pseudonyms["names"] = [n.strip() for n in args.names.split(",") if n.strip()]
    if pseudonyms:
        given["pseudonyms"] = pseudonyms
    shift = {k: v for k, v in (("min_days", args.min_days), ("max_days", args.max_days)) if v is not None}
    if shift:
        given["date_shift"] = shift
    if args.uid_root is not None:
        given["uid_root"] = args.uid_root
    if args.safe_private is not None:
        given["safe_private"] = [p.strip() for p in args.safe_private.split(";") if p.strip()]
    risk: dict[str, str] = {}
    for item in args.risk or ():
        kind, _, action = item.partition("=")
        if kind not in _RISKS or action not in ("quarantine", "warn", "drop"):
            raise ClientError(-1, f"--risk {item}: expected KIND=quarantine|warn|drop, KIND one of {', '.join(_RISKS)}")
        risk[kind] = action
    if risk:
        given["risk"] = risk
    return merge(config, given)


def _check_project_config(config: dict[str, Any], partial: bool) -> None:
    """The API's own model (:class:`~pacsbridge.shared.deid.options.ProjectConfig`), before sending."""
    from pacsbridge.shared.core.errors import InvalidRequest
    from pacsbridge.shared.core.models import check
    from pacsbridge.shared.deid.options import ProjectConfig

    if partial:
        return  # merged into the project's configuration by the API, which checks the result
    try:
        check(ProjectConfig, config, field="config",
              rename=lambda loc: ".".join(["config", *(str(p) for p in loc if isinstance(p, (str, int)))]))
    except InvalidRequest as exc:
        raise _refused_here(exc) from None


def _project_row(p: dict[str, Any]) -> list[Any]:
    cfg = p.get("config", {})
    ps = cfg.get("pseudonyms", {})
    names = ps.get("names") or []
    policy = f"{len(names)} names" if names else f"{ps.get('prefix', '')}+{ps.get('digits', '')} digits"
    return [p["name"], p.get("description", ""), cfg.get("options", {}).get("dates", ""), policy,
            cfg.get("uid_root") or "2.25", p.get("patients", 0), p.get("uids", 0)]


def _flatten(data: Any, prefix: str = "") -> list[list[Any]]:
    if isinstance(data, dict):
        return [row for k, v in data.items() for row in _flatten(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(data, list):
        return [[prefix, ", ".join(map(str, data))]]
    return [[prefix, data]]


def cmd_projects(api: ApiClient, args: argparse.Namespace) -> int:
    """De-identification projects: list, show, add, set (change), delete, and their map (admin; audited)."""
    from rich.console import Console

    err = Console(stderr=True, highlight=False)
    if args.action != "list" and not args.name:
        raise ClientError(-1, f"projects {args.action}: give the project's name")
    path = f"projects/{urllib.parse.quote(args.name or '', safe='')}"
    if args.action == "list":
        items = api.get("projects")["items"]
        _print(PROJECT_COLUMNS, [_project_row(p) for p in items], args.format, title="projects")
        return EXIT_OK
    if args.action in ("add", "set"):
        config = _project_config(args)
        _check_project_config(config, partial=args.action == "set")
        body: dict[str, Any] = {}
        if args.description is not None:
            body["description"] = args.description
        if args.action == "add":
            project = api.post("projects", {"name": args.name, **body, "config": config})
        else:
            if config:
                body["config"] = config
            if not body:
                raise ClientError(-1, "projects set: nothing to change (give options, --config or --description)")
            project = api.request("PATCH", path, body)
    elif args.action == "delete":
        api.request("DELETE", path)
        err.print(f"project {args.name} deleted")
        return EXIT_OK
    elif args.action == "map":
        return _project_map(api, args, path, err)
    else:
        project = api.get(path)
    if args.format == "json":
        json.dump(project, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        _print(["field", "value"], _flatten({k: v for k, v in project.items() if k != "path"}), args.format,
               title=f"project {project['name']}")
    return EXIT_OK


def _project_map(api: ApiClient, args: argparse.Namespace, path: str, err: Any) -> int:
    params = {"patient_id": args.patient_id, "pseudonym": args.pseudonym}
    if args.limit is not None:
        params["limit"] = args.limit
    if args.output:
        raw = api.fetch("GET", f"{path}/map", params={**params, "format": "csv"}, accept="text/csv")
        try:
            with open(args.output, "wb") as f:
                f.write(raw)
        except OSError as exc:
            raise ClientError(-1, f"--output {args.output}: {exc.strerror}") from None
        rows = max(raw.count(b"\n") - 1, 0)
        err.print(f"{rows} row(s) of the map of {args.name} written to {args.output} (the read is audited)")
        return EXIT_OK
    if args.format == "csv":
        sys.stdout.write(api.fetch("GET", f"{path}/map", params={**params, "format": "csv"},
                                   accept="text/csv").decode("utf-8"))
        return EXIT_OK
    page = api.get(f"{path}/map", **params)
    if args.format == "json":
        json.dump(page, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        _print(MAP_COLUMNS, [[r[c] for c in MAP_COLUMNS] for r in page["items"]], "table",
               title=f"map of {args.name}: {len(page['items'])} of {page['total']}")
    return EXIT_OK


# -- cohorts -----------------------------------------------------------------------
#: Row states in the order a cohort's rows go through them (what ``cohort show`` lists).
COHORT_STATES = ("pending", "found", "held", "duplicate", "transferring", "done", "partial", "ambiguous",
                 "not_found", "refused", "failed", "cancelled")
COHORT_COLUMNS = ("id", "state", "stage", "node", "project", "rows", "states", "error")
ROW_COLUMNS = ("row", "state", "reason", "patient_id", "studies", "series", "expected", "held", "received", "sent",
               "failed", "cells")
PROBLEM_COLUMNS = ("row", "column", "message")
_DOWNLOAD_TYPES = {"csv": "text/csv", "json": "application/json",
                   "xlsx": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"}


def _cohort_path(cohort_id: str, tail: str = "") -> str:
    return f"cohorts/{urllib.parse.quote(cohort_id, safe='')}{tail}"


def _then(args: argparse.Namespace) -> tuple[str, dict[str, Any] | None]:
    """``--then push NODE`` / ``--then repack DIR`` as a form field (``push:NODE``) and as JSON."""
    if not args.then:
        if args.repack_template:
            raise ClientError(-1, "--template: only with --then repack DIR")
        return "", None
    what, target = args.then
    if what == "push":
        if args.repack_template:
            raise ClientError(-1, "--template: only with --then repack DIR")
        return f"push:{target}", {"push": target}
    if what == "repack":
        repack = {"dest": target, **({"template": args.repack_template} if args.repack_template else {})}
        return f"repack:{target}", {"repack": repack}
    raise ClientError(-1, f"--then {what}: expected push NODE or repack DIR")


def _states_text(states: dict[str, int]) -> str:
    return ", ".join(f"{n} {s}" for s, n in sorted(states.items(), key=lambda i: _state_rank(i[0])) if n)


def _state_rank(state: str) -> int:
    return COHORT_STATES.index(state) if state in COHORT_STATES else len(COHORT_STATES)


def _show_cohort(cohort: dict[str, Any], fmt: str) -> None:
    """A cohort: its id and state, then its rows counted by state (and a page of rows if it has one)."""
    if fmt == "json":
        json.dump(cohort, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    from rich.console import Console

    err = Console(stderr=True, highlight=False)
    summary = (f"cohort {cohort['id']}: {cohort['state']}" + (f", {cohort['stage']}" if cohort.get("stage") else "")
             + f" ({cohort.get('rows', 0)} rows, node {cohort.get('node') or '?'}"
             + (f", project {cohort['project']}" if cohort.get("project") else "")
             + (", dry run" if not cohort.get("transfer") else "") + ")")
    if fmt == "table":  # the id alone on the first line, for scripts; a table's title would wrap
        print(cohort["id"])
        print(summary)
    items = cohort.get("items") or []
    states = sorted((cohort.get("states") or {}).items(), key=lambda i: _state_rank(i[0]))
    if fmt == "table" or not items:  # CSV: one table in the stream, the rows when asked for
        _print(("state", "rows"), [[s, n] for s, n in states], fmt)
    if cohort.get("error"):
        err.print(f"[yellow]{cohort['error']}[/yellow]")
    if items:
        rows = [[r["row"], r["state"], r.get("reason", ""), r.get("patient_id", ""), len(r.get("studies") or []),
                 *(r.get(c, 0) for c in ("series", "expected", "held", "received", "sent", "failed")),
                 " ".join(f"{k}={v}" for k, v in (r.get("cells") or {}).items() if v)] for r in items]
        _print(ROW_COLUMNS, rows, fmt, title=f"rows {items[0]['row']} to {items[-1]['row']}")


def _problems_out(exc: ClientError, fmt: str) -> int:
    """A refused cohort file: every problem by row and column (exit 2); other refusals as any other."""
    if not exc.problems:
        raise exc
    from rich.console import Console

    rows = [[p.get("row", ""), p.get("column", ""), p.get("message", "")] for p in exc.problems]
    _print(PROBLEM_COLUMNS, rows, fmt, title=f"{len(rows)} problem(s): nothing was submitted")
    Console(stderr=True, highlight=False).print(f"[red]refused ({exc.status})[/red]: {exc}")
    return EXIT_USAGE


def _submitted(api: ApiClient, cohort: dict[str, Any], args: argparse.Namespace) -> int:
    if getattr(args, "follow", False):
        return _wait_cohort(api, cohort["id"], args)
    _show_cohort(cohort, args.format)
    return EXIT_OK


def cmd_cohort_submit(api: ApiClient, args: argparse.Namespace) -> int:
    """``cohort submit FILE``: the file as it is (multipart), checked whole by the API before anything runs."""
    then, _ = _then(args)
    try:
        with open(args.file, "rb") as f:
            content = f.read()
    except OSError as exc:
        raise ClientError(-1, f"{args.file}: {exc.strerror}") from None
    fields = {"node": args.node}
    for name, value in (("project", args.project), ("then", then), ("template", args.repack_template),
                        ("webhook", args.webhook)):
        if value:
            fields[name] = value
    if args.start:
        fields["start"] = "true"
    try:
        cohort = api.upload("cohorts", fields, str(args.file), content)
    except ClientError as exc:
        return _problems_out(exc, args.format)
    return _submitted(api, cohort, args)


def cmd_cohort_mass(api: ApiClient, args: argparse.Namespace) -> int:
    """``cohort mass``: a date range in day or week chunks, with filters (checked here with the API's model)."""
    from pacsbridge.shared.cohorts.mass import MassRequest
    from pacsbridge.shared.core.errors import InvalidRequest
    from pacsbridge.shared.core.models import check

    _, then = _then(args)
    filters: dict[str, Any] = {}
    for key, value in (("Modality", args.modality), ("StudyDescription", args.description),
                       ("InstitutionName", args.institution), ("BodyPartExamined", args.body_part),
                       ("min_age", args.min_age), ("max_age", args.max_age)):
        if value not in (None, [], ""):
            filters[key] = value
    mass = {"from": args.from_, "to": args.to, "chunk": args.chunk, "filters": filters}
    try:
        check(MassRequest, mass, field="mass", rename=lambda loc: ".".join(str(p) for p in loc))
    except InvalidRequest as exc:
        raise _refused_here(exc) from None
    body: dict[str, Any] = {"node": args.node, "mass": mass, "start": args.start}
    if args.project:
        body["project"] = args.project
    if then:
        body["then"] = then
    if args.webhook:
        body["webhook"] = args.webhook
    return _submitted(api, api.post("cohorts", body), args)


def cmd_cohort_show(api: ApiClient, args: argparse.Namespace) -> int:
    params: dict[str, Any] = {}
    if args.rows or args.state:
        params = {"rows": 1, "state": args.state, "limit": args.limit, "offset": args.offset}
    _show_cohort(api.get(_cohort_path(args.id), **params), args.format)
    return EXIT_OK


def cmd_cohort_list(api: ApiClient, args: argparse.Namespace) -> int:
    page = api.get("cohorts", limit=args.limit, offset=args.offset)
    if args.format == "json":
        json.dump(page, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return EXIT_OK
    rows = [[c["id"], c["state"], c.get("stage", ""), c.get("node", ""), c.get("project", ""), c.get("rows", 0),
             _states_text(c.get("states") or {}), (c.get("error") or "")[:120]] for c in page["items"]]
    _print(COHORT_COLUMNS, rows, args.format, title=f"cohorts: {len(rows)} of {page.get('total', len(rows))}")
    return EXIT_OK


def safe_filename(disposition: str, fallback: str) -> str:
    """The file name a ``Content-Disposition`` header proposes, fit to write in the current folder.

    Only its last component is taken (``/`` and ``\\`` both separate); a name with ``..`` anywhere, control
    characters or nothing left is refused (:class:`ClientError`), never written. No header: ``fallback``.
    """
    from email.message import Message

    msg = Message()
    msg["Content-Disposition"] = disposition or ""
    name = msg.get_filename()
    if name is None:
        return fallback
    base = name.replace("\\", "/").rsplit("/", 1)[-1].strip()
    if not base or ".." in name or base.startswith(".") or any(not c.isprintable() for c in name):
        raise ClientError(0, f"the API proposed the file name {name!r}: refused (give -o FILE)")
    return base


def _download(api: ApiClient, args: argparse.Namespace, what: str) -> int:
    """``cohort report`` / ``cohort failed``: the file to ``-o`` (``-`` standard output), else to the name
    the API proposes, in the current folder (never over an existing file)."""
    from pathlib import Path

    from rich.console import Console

    err = Console(stderr=True, highlight=False)
    params = {"format": args.format} if args.format else {}
    raw, headers = api.send("GET", _cohort_path(args.id, f"/{what}"), params=params,
                            accept=_DOWNLOAD_TYPES.get(args.format or "", "*/*"))
    if args.output == "-":
        sys.stdout.buffer.write(raw)
        sys.stdout.flush()
        return EXIT_OK
    if args.output:
        target = Path(args.output)
    else:
        target = Path(safe_filename(headers.get("Content-Disposition", ""),
                                    f"cohort-{args.id[:8]}-{what}.{args.format or 'csv'}"))
        if target.exists():
            raise ClientError(-1, f"{target} exists: give -o FILE to write another (or over it)")
    try:
        target.write_bytes(raw)
    except OSError as exc:
        raise ClientError(-1, f"{target}: {exc.strerror}") from None
    err.print(f"{what} of cohort {args.id} written to {target} ({len(raw):,} bytes)")
    return EXIT_OK


def cmd_cohort_report(api: ApiClient, args: argparse.Namespace) -> int:
    return _download(api, args, "report")


def cmd_cohort_failed(api: ApiClient, args: argparse.Namespace) -> int:
    return _download(api, args, "failed")


def cmd_cohort_action(api: ApiClient, args: argparse.Namespace) -> int:
    """``cohort start|cancel|resume|retry ID``."""
    cohort = api.post(_cohort_path(args.id, f"/{args.action}"))
    return _submitted(api, cohort, args)


def _wait_cohort(api: ApiClient, cohort_id: str, args: argparse.Namespace) -> int:
    """Poll a cohort until its job ends (rows resolved as a bar on a terminal); show it; the job's exit code."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    err = Console(stderr=True, highlight=False)
    interval = getattr(args, "interval", 1.0) or 1.0
    deadline = time.monotonic() + args.timeout if getattr(args, "timeout", None) else None
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[states]}"), console=err, disable=not err.is_terminal) as progress:
        task = progress.add_task(f"cohort {cohort_id[:8]}", total=None, states="")
        while True:
            cohort = api.get(_cohort_path(cohort_id))
            states = cohort.get("states") or {}
            settled = sum(n for s, n in states.items() if s not in ("pending", "transferring")
                          and not (cohort.get("transfer") and s in ("found", "held")))
            progress.update(task, total=cohort.get("rows") or None, completed=settled, states=_states_text(states))
            if cohort["state"] not in ("queued", "running"):
                break
            if deadline is not None and time.monotonic() > deadline:
                _show_cohort(cohort, args.format)
                raise ClientError(0, f"cohort {cohort_id} is still {cohort['state']} after {args.timeout:g} s")
            time.sleep(interval)
    _show_cohort(cohort, args.format)
    return _JOB_EXIT.get(cohort["state"], EXIT_FAILED)


def cmd_cohort_wait(api: ApiClient, args: argparse.Namespace) -> int:
    return _wait_cohort(api, args.id, args)


def _cohort_parsers(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    cohort = sub.add_parser(
        "cohort", help="cohorts: many studies from a spreadsheet or a date range (docs/cohorts.md)",
        description="A cohort: a CSV, xlsx or JSON file of rows (or a date range in chunks), each queried on a "
                    "node first (a dry run unless --start), then pulled and pushed or repacked. Exit codes as "
                    "the other client verbs; wait and --follow: 0 succeeded, 1 partial, 3 failed or cancelled.")
    actions = cohort.add_subparsers(dest="action", required=True, metavar="ACTION")

    def then_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--node", required=True, help="the node to query and pull from")
        p.add_argument("--project", help="de-identify what leaves under this project (needed for a Pseudonym column)")
        p.add_argument("--then", nargs=2, metavar=("push|repack", "NODE|DIR"),
                       help="after each row's retrieve: push NODE, or repack DIR (under PACSBRIDGE_EXPORT_ROOT)")
        p.add_argument("--template", dest="repack_template", metavar="TEMPLATE",
                       help="--then repack: the storage template or preset")
        p.add_argument("--start", action="store_true", help="move what the query finds (default: a dry run)")
        p.add_argument("--webhook", help="a URL called when the cohort ends")
        p.add_argument("--follow", action="store_true", help="wait until it ends, with progress")

    p = actions.add_parser("submit", help="submit a CSV, xlsx or JSON file of rows",
                           description="Upload a file of rows. The API checks all of it first: a file with "
                                       "problems is refused, each problem printed by row and column (exit 2), "
                                       "and nothing runs.")
    p.add_argument("file", metavar="FILE")
    then_flags(p)
    _common(p)
    p.set_defaults(func=_run(cmd_cohort_submit))

    p = actions.add_parser("mass", help="submit a date range in day or week chunks, with filters",
                           description="A mass transfer: every study of a date range, a chunk (day or week) "
                                       "at a time. --modality and --description are sent with the query; "
                                       "--institution, --body-part and the ages are applied to the answers.")
    p.add_argument("--from", dest="from_", required=True, metavar="DATE", help="first study date (YYYYMMDD)")
    p.add_argument("--to", required=True, metavar="DATE", help="last study date, included")
    p.add_argument("--chunk", choices=("week", "day"), default="week")
    p.add_argument("--modality", nargs="+", action="extend", metavar="CODE", help="CT MR ...: a study with any")
    p.add_argument("--description", metavar="PATTERN", help="StudyDescription, * and ? as wildcards")
    p.add_argument("--institution", metavar="PATTERN", help="InstitutionName, * and ?, case-insensitive")
    p.add_argument("--body-part", dest="body_part", nargs="+", action="extend", metavar="CODE",
                   help="BodyPartExamined (CHEST ...): the series with any")
    p.add_argument("--min-age", dest="min_age", type=int, metavar="YEARS")
    p.add_argument("--max-age", dest="max_age", type=int, metavar="YEARS")
    then_flags(p)
    _common(p)
    p.set_defaults(func=_run(cmd_cohort_mass))

    p = actions.add_parser("show", help="a cohort's state and its rows counted by state")
    p.add_argument("id")
    p.add_argument("--rows", action="store_true", help="also a page of rows")
    p.add_argument("--state", choices=COHORT_STATES, help="only the rows in this state (implies --rows)")
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--offset", type=int, default=0)
    _common(p)
    p.set_defaults(func=_run(cmd_cohort_show))

    p = actions.add_parser("list", help="cohorts, newest first")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--offset", type=int, default=0)
    _common(p)
    p.set_defaults(func=_run(cmd_cohort_list))

    for name, verb, text in (
            ("report", cmd_cohort_report, "download the per-row report"),
            ("failed", cmd_cohort_failed, "download the rows that did not succeed, in the input's own form "
                                          "(fix it and submit it again)")):
        p = actions.add_parser(name, help=text, description=f"{text[0].upper()}{text[1:]}. Written to -o FILE "
                               "(- for standard output), else to the name the API proposes in the current "
                               "folder, never over an existing file.")
        p.add_argument("id")
        p.add_argument("--format", choices=("csv", "xlsx", "json"),
                       help="default: csv (report), the input's own format (failed)")
        p.add_argument("-o", "--output", metavar="FILE")
        p.add_argument("--api", help="API base URL (PACSBRIDGE_API_URL, default http://127.0.0.1:8080)")
        p.add_argument("--token", help="API token (PACSBRIDGE_API_TOKEN)")
        p.set_defaults(func=_run(verb))

    for name, text in (("start", "move what a dry run found"), ("cancel", "cancel a cohort and its child jobs"),
                       ("resume", "go on with a cancelled or interrupted cohort"),
                       ("retry", "run the rows that did not succeed again")):
        p = actions.add_parser(name, help=text)
        p.add_argument("id")
        if name != "cancel":
            p.add_argument("--follow", action="store_true", help="wait until it ends, with progress")
        _common(p)
        p.set_defaults(func=_run(cmd_cohort_action))

    p = actions.add_parser("wait", help="wait until a cohort ends (exit 0 succeeded, 1 partial, 3 failed)")
    p.add_argument("id")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between polls")
    p.add_argument("--timeout", type=float, help="give up after this many seconds (exit 3)")
    _common(p)
    p.set_defaults(func=_run(cmd_cohort_wait))


# -- parser ------------------------------------------------------------------------
def _run(verb: Callable[[ApiClient, argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        from rich.console import Console

        err = Console(stderr=True, highlight=False)
        settings = getattr(args, "settings", None) or load_settings()
        api = ApiClient(args.api or settings.api_url, args.token or settings.api_token)
        try:
            return verb(api, args)
        except ClientError as exc:
            if exc.status == -1:
                err.print(f"[red]error[/red]: {exc}")
                return EXIT_USAGE
            if exc.status == 0:
                err.print(f"[red]failed[/red]: {exc}")
                return EXIT_FAILED
            err.print(f"[red]{'refused' if exc.status < 500 else 'failed'} ({exc.status})[/red]: {exc}")
            return EXIT_USAGE if exc.status < 500 else EXIT_FAILED
    return run


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--api", help="API base URL (PACSBRIDGE_API_URL, default http://127.0.0.1:8080)")
    p.add_argument("--token", help="API token (PACSBRIDGE_API_TOKEN)")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")


def _query_flags(p: argparse.ArgumentParser) -> None:
    for name in QUERY_FIELDS:
        p.add_argument(f"--{name}", metavar="VALUE")
    p.add_argument("--StudyDate", metavar="DATE|RANGE",
                   help="20240101 or 2024-01-01; a range 20240101-20241231 or 2024-01-01..2024-12-31; "
                        "open ranges 20240101-, -20241231, 2024-01-01.., ..2024-12-31")
    p.add_argument("--include", nargs="+", metavar="KEYWORD", help="extra fields to return")


def _selection_flags(p: argparse.ArgumentParser) -> None:
    for name in ("PatientID", "StudyInstanceUID", "SeriesInstanceUID"):
        p.add_argument(f"--{name}", nargs="+", metavar="VALUE")
    p.add_argument("--job", help="what a retrieve job brought")


def add_parsers(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """The client verbs."""
    p = sub.add_parser("echo", help="C-ECHO a node (through the API)")
    p.add_argument("node")
    _common(p)
    p.set_defaults(func=_run(cmd_echo))

    p = sub.add_parser("find", help="C-FIND on a node, then optionally retrieve / push / repack")
    p.add_argument("node")
    p.add_argument("--level", choices=("patient", "study", "series", "image"), default="study")
    _query_flags(p)
    p.add_argument("--then", choices=("retrieve", "push", "repack"))
    p.add_argument("--to", help="--then push: the destination node")
    p.add_argument("--dest", help="--then repack: folder under PACSBRIDGE_EXPORT_ROOT")
    p.add_argument("--project", help="--then push / repack: de-identify under this project")
    p.add_argument("--follow", action="store_true", help="wait for the job, with progress")
    p.add_argument("--columns", metavar="A,B,...",
                   help="the answer's columns to print, in this order (default: a table shows as many as "
                        "fit the terminal, csv and json all)")
    _common(p)
    p.set_defaults(func=_run(cmd_find))

    p = sub.add_parser("retrieve", help="retrieve studies from a node (a job)")
    p.add_argument("node")
    _query_flags(p)
    p.add_argument("--mode", choices=("move", "get", "wado-rs", "wado-uri"),
                   help="C-MOVE, C-GET, WADO-RS or WADO-URI (default: the node's)")
    p.add_argument("--follow", action="store_true", help="wait for the job, with progress")
    _common(p)
    p.set_defaults(func=_run(cmd_retrieve))

    p = sub.add_parser("push", help="C-STORE what we hold to a node (a job)")
    p.add_argument("node")
    _selection_flags(p)
    p.add_argument("--project", help="de-identify under this project (default: the node's own project, if any)")
    p.add_argument("--follow", action="store_true")
    _common(p)
    p.set_defaults(func=_run(cmd_push))

    p = sub.add_parser("repack", help="copy or link what we hold into a readable tree (a job)")
    p.add_argument("--dest", required=True, help="folder under PACSBRIDGE_EXPORT_ROOT")
    p.add_argument("--layout", help="storage template or preset (default px-repack)")
    p.add_argument("--link", action="store_true", help="hard links instead of copies")
    p.add_argument("--project", help="write de-identified files under this project (not with --link)")
    _selection_flags(p)
    p.add_argument("--follow", action="store_true")
    _common(p)
    p.set_defaults(func=_run(cmd_repack))

    p = sub.add_parser("jobs", help="list jobs")
    p.add_argument("--state")
    p.add_argument("--kind")
    p.add_argument("--node")
    p.add_argument("--limit", type=int, default=50)
    _common(p)
    p.set_defaults(func=_run(cmd_jobs))

    p = sub.add_parser("status", help="a job's per-series progress")
    p.add_argument("job")
    p.add_argument("--follow", action="store_true", help="live progress until it ends")
    _common(p)
    p.set_defaults(func=_run(cmd_status))

    for name, verb, text in (("cancel", cmd_cancel, "cancel a job"), ("retry", cmd_retry, "retry a job")):
        p = sub.add_parser(name, help=text)
        p.add_argument("job")
        if name == "retry":
            p.add_argument("--follow", action="store_true")
        _common(p)
        p.set_defaults(func=_run(verb))

    p = sub.add_parser("nodes", help="list, add or remove nodes, store a node's DICOMweb secret",
                       description="List, add or remove nodes. `nodes secret NAME` stores the node's DICOMweb "
                                   "password or token, read from stdin (typed without echo at a terminal; never "
                                   "an argument, which `ps` shows), sealed by the API with PACSBRIDGE_SECRET_KEY; "
                                   "`nodes secret NAME --delete` forgets it.")
    p.add_argument("action", nargs="?", choices=("list", "add", "rm", "secret"), default="list")
    p.add_argument("name", nargs="?")
    p.add_argument("--delete", action="store_true", help="with `secret`: forget the node's stored secret")
    p.add_argument("--aet")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--retrieve", choices=("move", "get"))
    p.add_argument("--move-destination", dest="move_destination")
    p.add_argument("--max-associations", dest="max_associations", type=int)
    p.add_argument("--max-rate", dest="max_rate", type=float)
    p.add_argument("--move-window", dest="move_window")
    p.add_argument("--project", help="de-identify everything sent to it under this project (pacsbridge projects)")
    p.add_argument("--identifiable", action=argparse.BooleanOptionalAction, default=None,
                   help="--no-identifiable: a research node, which receives de-identified data only")
    web = p.add_argument_group("DICOMweb (a node without --aet/--host/--port is DICOMweb only)")
    web.add_argument("--web-url", dest="web_url", help="DICOMweb root, e.g. http://host:8042/dicom-web")
    for service in ("qido", "wado", "wado_uri", "stow"):
        web.add_argument(f"--{service.replace('_', '-')}-url", dest=f"{service}_url",
                         help=f"{service.upper().replace('_', '-')} root if not --web-url")
    web.add_argument("--web-auth", dest="web_auth", choices=("none", "basic", "bearer"))
    web.add_argument("--web-user", dest="web_user", help="user name of basic authentication")
    web.add_argument("--web-secret", dest="web_secret",
                     help="the NAME of the password or token: an environment variable of the workers and the API, "
                          "or a file in PACSBRIDGE_SECRETS_DIR (never the secret itself)")
    web.add_argument("--web-verify", dest="web_verify", action=argparse.BooleanOptionalAction, default=None,
                     help="verify the server's TLS certificate (default yes)")
    web.add_argument("--web-ca-bundle", dest="web_ca_bundle", help="a CA bundle (PEM) to verify it with")
    web.add_argument("--web-timeout", dest="web_timeout", type=float, help="seconds per request (default 60)")
    web.add_argument("--prefer", help="retrieve operations in order, e.g. wado-rs,c-get,c-move")
    _common(p)
    p.set_defaults(func=_run(cmd_nodes))

    p = sub.add_parser(
        "projects", help="de-identification projects: list, show, add, set, delete, map",
        description="De-identification projects (docs/deid-projects.md). add and set take --config FILE.json "
                    "and the options below (set merges them into the project's configuration; uid_root, "
                    "pseudonyms and date_shift cannot change once the project has a map). map prints or "
                    "writes (--output, CSV) the pseudonym map: admin only, and every read is audited.")
    p.add_argument("action", choices=("list", "show", "add", "set", "delete", "map"))
    p.add_argument("name", nargs="?")
    p.add_argument("--description")
    p.add_argument("--config", metavar="FILE.json", help="a ProjectConfig as JSON (the options below override it)")
    p.add_argument("--dates", choices=("remove", "shift", "keep"),
                   help="remove dates, shift each patient's by its offset, or keep them")
    for flag in _OPTION_FLAGS:
        p.add_argument(f"--{flag.replace('_', '-')}", dest=flag, action=argparse.BooleanOptionalAction,
                       default=None, help=argparse.SUPPRESS if flag != "retain_safe_private" else
                       "the options of PS3.15 Table E.1-1: --retain-safe-private, --retain-uids, "
                       "--retain-device-identity, --retain-institution-identity, --retain-patient-characteristics, "
                       "--clean-descriptors, --clean-structured-content, --clean-graphics (--no-...: off)")
    p.add_argument("--prefix", help="pseudonyms: prefix of the keyed digits (default ANON)")
    p.add_argument("--digits", type=int, help="pseudonyms: number of keyed digits, 4 to 24 (default 8)")
    p.add_argument("--names", metavar="A,B,...", help="pseudonyms: the project's own list, used in order")
    p.add_argument("--min-days", dest="min_days", type=int, help="date offsets: lowest (default -365)")
    p.add_argument("--max-days", dest="max_days", type=int, help="date offsets: highest (default -1)")
    p.add_argument("--uid-root", dest="uid_root", help="root of new UIDs ('' = 2.25 form)")
    p.add_argument("--safe-private", dest="safe_private", metavar="GGGG,CREATOR,EE;...",
                   help="private attributes kept by --retain-safe-private (default: pacsbridge's list)")
    p.add_argument("--risk", action="append", metavar="KIND=ACTION",
                   help=f"quarantine, warn or drop for a risky kind: {', '.join(_RISKS)} (repeatable)")
    p.add_argument("--patient-id", dest="patient_id", help="map: only this original PatientID")
    p.add_argument("--pseudonym", help="map: only this pseudonym")
    p.add_argument("--limit", type=int, help="map: at most this many rows (default: 100; CSV: all)")
    p.add_argument("--output", "-o", metavar="FILE.csv", help="map: write the map as CSV to this file")
    _common(p)
    p.set_defaults(func=_run(cmd_projects))

    _cohort_parsers(sub)
