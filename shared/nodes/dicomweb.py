"""DICOMweb sources: the QIDO-RS searcher (WADO-RS / WADO-URI downloaders and the STOW pusher come later).

:class:`QidoSearcher` is the :class:`~pacsbridge.shared.nodes.sources.Searcher` of a node that speaks
DICOMweb: the same :class:`~pacsbridge.shared.dicom.query.Query` in (wildcards, date ranges, include fields,
levels), the same dictionaries and :class:`~pacsbridge.shared.nodes.sources.SeriesRef` out as the C-FIND
searcher, so jobs, progress and the API do not know which one they talk to.

The requests go through `dicomweb-client <https://dicomweb-client.readthedocs.io>`_ (URL building, query
parameters, JSON decoding). We go around it in three places:

* paging: its ``get_remaining`` asks ``offset`` after ``offset`` until an empty page, for ever when a server
  ignores ``offset``. We page ourselves with ``limit``/``offset`` until a short page, and stop with an error
  when a page only repeats what earlier pages gave;
* the ``Warning`` header (PS3.18 8.3.4.2: a server that returns fewer results than match says so there):
  the client only logs it, so a response hook of ours keeps it. A result the server capped is handled like
  a C-FIND the PACS cut short: the study date range is split in halves until no part is capped;
* retries: its own repeat any exception (a refused redirect, a timeout) five times with waits of up to
  16 s and ignore ``Retry-After``; ours repeat only 429, 503 and 504, after the server's ``Retry-After``.

The HTTP session (authentication, TLS, redirects) is made by :func:`web_session`, the one place to swap
for the project's HTTP layer (:mod:`pacsbridge.shared.nodes.webhttp`) once it exists.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import logging
import re
import threading
import urllib.parse
from typing import Any, Callable, Sequence

import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset

from pacsbridge.shared.core.config import initial_settings
from pacsbridge.shared.core.errors import DicomWebError
from pacsbridge.shared.dicom.dimse import to_json_value
from pacsbridge.shared.dicom.node import Node
from pacsbridge.shared.dicom.query import RETURN_KEYS, Query
from pacsbridge.shared.nodes.credentials import node_secret
from pacsbridge.shared.nodes.sources import EARLIEST, FIND_LIMIT, SeriesRef, _slot, series_refs
from pacsbridge.shared.nodes.throttle import NodeSlots
from pacsbridge.shared.nodes.webhttp import TLS_ADVICE

__all__ = ["QidoSearcher", "web_session", "QIDO_LIMIT", "MAX_REDIRECTS", "RETRIES", "MAX_WAIT", "Page"]

log = logging.getLogger(__name__)

#: Results asked per QIDO-RS request (``limit``): PACSBRIDGE_QIDO_LIMIT.
QIDO_LIMIT = initial_settings().qido_limit
#: Same-origin redirects followed per request (another origin is refused).
MAX_REDIRECTS = 5
#: Times a request the server answers 429, 503 or 504 is tried again, and the longest wait (s) before each.
RETRIES = 3
MAX_WAIT = 30.0

_UID_KEY = {"study": "StudyInstanceUID", "series": "SeriesInstanceUID", "image": "SOPInstanceUID"}


# -- the HTTP session -------------------------------------------------------------
class _NodeSession(requests.Session):
    """A session that follows redirects to the same origin only, sends no ``Host`` of its own making and
    keeps the matching wildcards ``*`` and ``?`` of a query as they are.

    dicomweb-client sets ``Host`` to the URL's host name without its port (wrong for a server on another
    port behind a virtual host): requests builds a correct one when none is given. It also percent-encodes
    ``*`` and ``?`` (``quote_plus``); both are legal in a URL query (RFC 3986), always wildcards in DICOM
    matching, and a server that does not decode its query (Orthanc 1.7's plugin) matches ``%2A`` literally.

    It ignores the environment (``trust_env = False``), as :class:`~pacsbridge.shared.nodes.webhttp.WebClient`
    does: with it, requests puts ``REQUESTS_CA_BUNDLE`` / ``CURL_CA_BUNDLE`` in place of the session's
    ``verify`` on every request, so a node's ``web_ca_bundle`` was ignored and ``web_verify`` false still
    verified wherever those are set (many images set them); it would also send ``.netrc`` credentials.
    """

    def __init__(self, node: Node) -> None:
        super().__init__()
        self.trust_env = False
        self.node_name = node.name
        self.max_redirects = MAX_REDIRECTS

    def request(self, method: str | bytes, url: str | bytes, *args: Any, **kwargs: Any) -> requests.Response:
        headers = kwargs.get("headers")
        if headers:
            kwargs["headers"] = {k: v for k, v in headers.items() if str(k).lower() != "host"}
        return super().request(method, url, *args, **kwargs)  # type: ignore[arg-type]

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        url = request.url or ""
        if "?" in url:
            base, _, query = url.partition("?")
            request.url = base + "?" + _WILDCARD.sub(lambda m: "*" if m.group(0)[2] in "aA" else "?", query)
        return super().send(request, **kwargs)

    def get_redirect_target(self, resp: requests.Response) -> str | None:
        target = super().get_redirect_target(resp)
        if target is None:
            return None
        to = urllib.parse.urlsplit(urllib.parse.urljoin(resp.url, target))
        here = urllib.parse.urlsplit(resp.url)
        if (to.scheme, to.hostname, to.port or _PORTS.get(to.scheme)) != \
                (here.scheme, here.hostname, here.port or _PORTS.get(here.scheme)):
            raise DicomWebError(f"node {self.node_name!r}: {here.scheme}://{here.netloc} redirects to another "
                                f"origin ({to.scheme}://{to.netloc}): refused (credentials are never sent "
                                "elsewhere)", resp.status_code)
        return target


_PORTS = {"http": 80, "https": 443}
_WILDCARD = re.compile(r"%2[aA]|%3[fF]")


def web_session(node: Node, settings: Any = None) -> requests.Session:
    """A :class:`requests.Session` for ``node``: its authentication, TLS verification and redirect rule.

    The secret is found now: the node's stored one, else by its name
    (:func:`~pacsbridge.shared.nodes.credentials.node_secret`; ``settings``: the key and the secrets folder).
    TLS as :class:`~pacsbridge.shared.nodes.webhttp.WebClient` does it: ``web_verify`` false verifies
    nothing (even with a CA bundle), else the CA bundle when there is one, else the system's CAs.

    Raises
    ------
    ConfigError
        The node's secret cannot be found or decrypted.
    """
    session = _NodeSession(node)
    session.verify = (node.web_ca_bundle or True) if node.web_verify else False
    if node.web_auth == "basic":
        session.auth = (node.web_user, node_secret(node, settings))
    elif node.web_auth == "bearer":
        session.headers["Authorization"] = f"Bearer {node_secret(node, settings)}"
    return session


# -- pages ---------------------------------------------------------------------------
class Page(list):  # type: ignore[type-arg]
    """The matches of one search (all its pages), with whether the server capped them (``truncated``)."""

    truncated: bool = False
    warning: str = ""


def _retry_after(value: str | None, attempt: int) -> float:
    """Seconds to wait before trying again: the server's ``Retry-After`` (seconds or an HTTP date), else
    1, 2, 4 ... s; at most :data:`MAX_WAIT`."""
    if value:
        try:
            return min(MAX_WAIT, max(0.0, float(value)))
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(value)
                return min(MAX_WAIT, max(0.0, (when - dt.datetime.now(dt.timezone.utc)).total_seconds()))
            except (TypeError, ValueError):
                pass
    return min(MAX_WAIT, 2.0 ** (attempt - 1))


def _as_dict(item: Any) -> dict[str, Any]:
    """A QIDO-RS JSON result as the C-FIND searcher gives it (keyword -> JSON-ready value)."""
    ds = Dataset.from_json(item) if isinstance(item, dict) else Dataset()
    return {e.keyword: to_json_value(e) for e in ds if e.keyword}


def _uid_list(uids: Sequence[str]) -> str:
    """PS3.18 8.3.4.1 UID list matching: the UIDs separated by commas."""
    return ",".join(uids)


class QidoSearcher:
    """QIDO-RS searches against a node's DICOMweb endpoint (the :class:`Searcher` of a DICOMweb node).

    Parameters
    ----------
    node : Node
        A node with a ``web_url`` (or ``qido_url``).
    limit : int
        Results asked per request (default ``PACSBRIDGE_QIDO_LIMIT``).
    find_limit : int
        A study list this long is taken as capped by the server even without a ``Warning``
        (``PACSBRIDGE_FIND_LIMIT``, 0: rely on the header).
    session : requests.Session, optional
        Default :func:`web_session` (``node``).
    cancel : threading.Event, optional
        Checked between requests.
    slots : NodeSlots, optional
        Each request holds a lease of the node's slots (its ``max_associations``: concurrent requests).
    max_results : int
        The most results one search gathers before it stops with an error (a server that never ends).
    timeout : float, optional
        Seconds per request (default the node's ``web_timeout``).
    """

    def __init__(self, node: Node, limit: int = QIDO_LIMIT, find_limit: int = FIND_LIMIT,
                 session: requests.Session | None = None, cancel: threading.Event | None = None,
                 slots: NodeSlots | None = None, max_results: int = 1_000_000,
                 timeout: float | None = None, settings: Any = None) -> None:
        if not node.has_web:
            raise DicomWebError(f"node {node.name!r} has no DICOMweb URL (web_url)")
        self.node = node
        self.limit = max(1, limit)
        self.find_limit = find_limit
        self.cancel = cancel or threading.Event()
        self.slots = slots
        self.max_results = max_results
        self.splits = 0
        self.requests = 0  # QIDO-RS requests made (pages)
        self._seen = threading.local()
        self.client = DICOMwebClient(node.service_url("qido"), session=session or web_session(node, settings),
                                     timeout=timeout or node.web_timeout, callback=self._keep)
        # its retries would repeat any exception (a refused redirect, a timeout: 5 times, 30 s of waits);
        # ours repeat only what a server asks to be repeated (see _get)
        self.client.set_http_retry_params(retry=False)

    def _keep(self, response: requests.Response, *args: Any, **kwargs: Any) -> requests.Response:
        self._seen.warning = response.headers.get("Warning", "")
        return response

    # -- one search, every page -------------------------------------------------------
    def search(self, level: str, filters: dict[str, Any], fields: Sequence[str], *, study_uid: str | None = None,
               series_uid: str | None = None, max_results: int = 0) -> Page:
        """Every match of one QIDO-RS search at ``level``, page by page (``limit``/``offset``).

        Stops at a short page. A page with a ``Warning`` header leads to the next offset; when that one is
        empty or only repeats earlier results the server capped the search (``truncated``). A page that
        only repeats earlier results without a warning means the server ignores ``offset``/``limit``.

        Raises
        ------
        DicomWebError
            The server failed, could not be reached, answered something else than a JSON list, or ignores
            paging (a page repeated).
        """
        fn: Callable[..., list[dict[str, Any]]]
        kwargs: dict[str, Any] = {}
        if level == "study":
            fn = self.client.search_for_studies
        elif level == "series":
            fn = self.client.search_for_series
            kwargs["study_instance_uid"] = study_uid
        else:
            fn = self.client.search_for_instances
            kwargs.update(study_instance_uid=study_uid, series_instance_uid=series_uid if study_uid else None)
            if series_uid and not study_uid:  # no path without the study: match the series instead
                filters = {**filters, "SeriesInstanceUID": series_uid}
        key = _UID_KEY[level]
        out = Page()
        seen: set[str] = set()
        offset = 0
        warned = False
        while True:
            if self.cancel.is_set():
                raise DicomWebError(f"node {self.node.name!r}: QIDO-RS search cancelled")
            self._seen.warning = ""
            items = self._get(fn, level, offset, filters, fields, kwargs)
            warning = getattr(self._seen, "warning", "")
            new = 0
            for item in items:
                try:
                    found = _as_dict(item)
                except Exception as exc:  # pydicom's from_json: a value that does not fit its VR ...
                    raise DicomWebError(f"node {self.node.name!r}: a QIDO-RS {level} result is not a DICOM JSON "
                                        f"dataset ({exc.__class__.__name__}: {str(exc)[:200]})") from None
                uid = str(found.get(key) or "")
                if uid and uid in seen:
                    continue
                seen.add(uid)
                out.append(found)
                new += 1
            if items and not new:  # only what earlier pages gave
                if warned or warning:
                    out.truncated, out.warning = True, warning or out.warning
                    return out
                raise DicomWebError(
                    f"node {self.node.name!r} ignores QIDO-RS paging: the page at offset {offset} repeats "
                    f"earlier results (limit {self.limit}); it cannot be read page by page", None)
            if warning:
                warned, out.warning = True, warning
            if not items:
                out.truncated = warned
                return out
            if len(items) < self.limit and not warning:
                return out  # a short page without a warning: the end
            if max_results and len(out) >= max_results:
                out.truncated = True
                del out[max_results:]
                return out
            if len(out) >= self.max_results:
                raise DicomWebError(f"node {self.node.name!r}: more than {self.max_results} QIDO-RS results at "
                                    f"level {level}; narrow the query")
            offset += len(items)

    def _get(self, fn: Callable[..., list[dict[str, Any]]], level: str, offset: int, filters: dict[str, Any],
             fields: Sequence[str], kwargs: dict[str, Any]) -> list[dict[str, Any]]:
        what = f"node {self.node.name!r}: QIDO-RS {level} search"
        for attempt in range(1, RETRIES + 2):
            self.requests += 1
            try:
                with _slot(self.slots, self.cancel):
                    items = fn(limit=self.limit, offset=offset, fields=list(fields) or None,
                               search_filters=filters or None, **kwargs)
                break
            except requests.HTTPError as exc:
                status = exc.response.status_code if exc.response is not None else None
                if status in (429, 503, 504) and attempt <= RETRIES and exc.response is not None:
                    wait = _retry_after(exc.response.headers.get("Retry-After"), attempt)
                    log.info("%s: HTTP %s, again in %.1f s", what, status, wait)
                    if self.cancel.wait(wait):
                        raise DicomWebError(f"{what} cancelled") from None
                    continue
                body = (exc.response.text[:200] if exc.response is not None else "").strip()
                raise DicomWebError(f"{what} failed: HTTP {status}" + (f": {body}" if body else ""),
                                    status) from None
            except requests.exceptions.SSLError as exc:  # refused certificate: no retry, say what to do
                raise DicomWebError(f"{what}: {self.node.service_url('qido')}: TLS failed: {exc}; "
                                    f"{TLS_ADVICE}") from None
            except requests.RequestException as exc:
                raise DicomWebError(f"{what}: {self.node.service_url('qido')} unreachable: "
                                    f"{exc.__class__.__name__}: {exc}") from None
            except ValueError as exc:  # JSON that does not decode
                raise DicomWebError(f"{what}: the answer is not DICOM JSON ({exc})") from None
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            raise DicomWebError(f"{what}: the answer is not a JSON list of datasets")
        return items

    # -- the query model ----------------------------------------------------------------
    @staticmethod
    def filters(query: Query, level: str) -> dict[str, str]:
        """The QIDO-RS matching parameters of ``query`` at ``level`` (C-FIND's keys, QIDO's syntax)."""
        out: dict[str, str] = {}
        for name in ("PatientID", "PatientName", "AccessionNumber", "StudyDescription"):
            if getattr(query, name):
                out[name] = getattr(query, name)
        if query.Modality:
            out["ModalitiesInStudy" if level in ("patient", "study") else "Modality"] = query.Modality
        for name in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            if getattr(query, name):
                out[name] = _uid_list(getattr(query, name))
        if query.date_range():
            out["StudyDate"] = query.date_range()
        return out

    def find(self, query: Query, max_results: int = 0) -> Page:
        """A flat search at the query's level (the API's ``/nodes/{name}/query``), C-FIND's answer shape.

        The patient level (QIDO-RS has none) is a study search folded by PatientID.
        """
        level = query.level
        if level == "patient":
            studies = self.search("study", self.filters(query, "study"), RETURN_KEYS["study"], max_results=0)
            patients: dict[str, dict[str, Any]] = {}
            for s in studies:
                p = patients.setdefault(str(s.get("PatientID") or ""), {
                    k: s[k] for k in RETURN_KEYS["patient"] + query.include_fields if k in s})
                p["NumberOfPatientRelatedStudies"] = int(p.get("NumberOfPatientRelatedStudies") or 0) + 1
            out = Page(list(patients.values())[:max_results or None])
            out.truncated = studies.truncated or bool(max_results and len(patients) > max_results)
            return out
        fields = RETURN_KEYS[level] + query.include_fields
        filters = self.filters(query, level)
        study = query.StudyInstanceUID[0] if len(query.StudyInstanceUID) == 1 and level != "study" else None
        series = query.SeriesInstanceUID[0] if len(query.SeriesInstanceUID) == 1 and level == "image" else None
        if study:
            filters.pop("StudyInstanceUID", None)
        if series and study:
            filters.pop("SeriesInstanceUID", None)
        return self.search(level, filters, fields, study_uid=study, series_uid=series, max_results=max_results)

    # -- the Searcher protocol -----------------------------------------------------------
    def studies(self, query: Query) -> list[dict[str, Any]]:
        """Matching studies; a range the server capped is split in halves until it is not."""
        study_query = query.replace(level="study", SeriesInstanceUID=(), SOPInstanceUID=(),
                                    include_fields=tuple(dict.fromkeys(query.include_fields + ("SOPClassesInStudy",))))
        if study_query.is_empty():  # only series/instance UIDs given: the series level finds them
            return [{}]
        found = self.search("study", self.filters(study_query, "study"),
                            RETURN_KEYS["study"] + study_query.include_fields)
        truncated = found.truncated or (self.find_limit and len(found) >= self.find_limit)
        if not truncated:
            return list(found)
        lo = query.min_study_date or EARLIEST
        hi = query.max_study_date or dt.date.today()
        if lo >= hi:
            raise DicomWebError(f"node {self.node.name!r} caps the study list even for the single day "
                                f"{lo:%Y-%m-%d} ({len(found)} answers{'; ' + found.warning if found.warning else ''})"
                                "; narrow the query")
        mid = lo + (hi - lo) // 2
        self.splits += 1
        log.info("node %s: QIDO-RS capped (%d answers, %s): splitting %s..%s at %s",
                 self.node.name, len(found), found.warning or "no warning", lo, hi, mid)
        out: dict[str, dict[str, Any]] = {}
        for part in (query.replace(min_study_date=lo, max_study_date=mid),
                     query.replace(min_study_date=mid + dt.timedelta(days=1), max_study_date=hi)):
            for study in self.studies(part):
                out.setdefault(study.get("StudyInstanceUID") or "", study)
        return list(out.values())

    def series(self, query: Query, study: dict[str, Any]) -> list[SeriesRef]:
        """The series of one study (or, for ``{}``, those the query names) with their counts."""
        uid = study.get("StudyInstanceUID")
        q = Query(level="series", PatientID=query.PatientID if not uid else "",
                  StudyInstanceUID=(uid,) if uid else query.StudyInstanceUID,
                  SeriesInstanceUID=query.SeriesInstanceUID, Modality=query.Modality,
                  include_fields=("BodyPartExamined",) if "BodyPartExamined" in query.include_fields else ())
        found = self.find(q)
        if found.truncated:
            raise DicomWebError(f"node {self.node.name!r} caps the series list of study {uid or '(any)'} "
                                f"({len(found)} answers); it cannot be split")
        return series_refs(found, query, study, self.instances)

    def instances(self, series: SeriesRef, only: Sequence[str] = ()) -> list[str]:
        """SOP Instance UIDs of a series, optionally among ``only``."""
        q = Query(level="image", StudyInstanceUID=(series.study_uid,) if series.study_uid else (),
                  SeriesInstanceUID=(series.series_uid,), SOPInstanceUID=tuple(only))
        found = self.find(q)
        if found.truncated:
            raise DicomWebError(f"node {self.node.name!r} caps the instance list of series {series.series_uid} "
                                f"({len(found)} answers); it cannot be split")
        return [str(i["SOPInstanceUID"]) for i in found if i.get("SOPInstanceUID")]

    def plan(self, query: Query) -> list[SeriesRef]:
        """Every series the query matches, with the SOP classes of its study when the node tells them."""
        seen: dict[str, SeriesRef] = {}
        studies = self.studies(query)
        for study in studies:
            for ref in self.series(query, study):
                seen.setdefault(ref.series_uid, ref)
        unknown = sorted({r.study_uid for r in seen.values() if r.study_uid and not r.sop_classes})
        if unknown and studies == [{}]:  # series named without their studies: ask the studies
            try:
                found: list[dict[str, Any]] = self.search(
                    "study", {"StudyInstanceUID": _uid_list(unknown)}, ("StudyInstanceUID", "SOPClassesInStudy"))
            except DicomWebError as exc:
                log.info("node %s: SOP classes of the studies not found (%s)", self.node.name, exc)
                found = []
            classes = {s.get("StudyInstanceUID"): _uids(s.get("SOPClassesInStudy")) for s in found}
            for ref in seen.values():
                ref.sop_classes = ref.sop_classes or classes.get(ref.study_uid, ())
        return list(seen.values())


def _uids(value: Any) -> tuple[str, ...]:
    if not value:
        return ()
    values = value if isinstance(value, (list, tuple)) else [value]
    return tuple(dict.fromkeys(str(v).strip() for v in values if str(v).strip()))

