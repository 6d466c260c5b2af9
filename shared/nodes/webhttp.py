"""The HTTP layer under DICOMweb nodes: one session per node, retries, redirects, streamed multipart both ways.

The QIDO searcher, the WADO-RS / WADO-URI downloaders and the STOW pusher (:mod:`.dicomweb`) talk to a
node only through a :class:`WebClient`::

    client = WebClient("https://pacs.example/dicom-web", auth=WebAuth.bearer(token),
                       ca_bundle="/etc/pacsbridge/pacs-ca.pem", timeout=60, cancel=job_cancel_event)
    reply = client.get_json(client.url("studies"), {"PatientID": "X", "limit": 100})
    reply.data, reply.warnings                      # DICOM JSON list; the Warning headers (truncated answers)
    for part in client.stream_multipart(client.url("studies", uid),
                                        'multipart/related; type="application/dicom"; transfer-syntax=*',
                                        folder):
        part.headers["content-type"], part.path, part.size   # the caller moves or deletes part.path
    client.get_to_file(wado_uri, "application/dicom", folder, params={...})   # -> Part (WADO-URI)
    result = client.post_multipart(client.url("studies"), [path, ...])      # -> StowResult (STOW-RS)
    client.close()

Public API
----------
:class:`WebClient`, :class:`WebAuth`, :class:`RetryPolicy`; values :class:`Part`, :class:`JsonReply`,
:class:`StowResult`, :class:`StowInstance`; :class:`MultipartBody` (the streamed STOW body, usable alone);
:func:`read_multipart` (the streaming parser over any iterator of byte chunks); :func:`parse_stow_response`.
Errors are :class:`~pacsbridge.shared.core.errors.WebError` and its subclasses (``WebTimeout``,
``WebTruncated``, ``WebContentError``, ``WebRedirectRefused``, ``WebCancelled``), each with ``.status``
(the HTTP status, or ``None``) and ``.url``. A 406 (WADO-RS ``transfer-syntax=*`` refused) arrives as a plain
``WebError`` with ``status == 406`` so that the caller can ask again without it.

What it guarantees, and why
---------------------------
* **Retries**: 429 and 503 wait what ``Retry-After`` says (seconds or an HTTP date), capped
  (:class:`RetryPolicy`, 60 s a wait, 5 tries); 500/502/504 and connection failures are retried with
  exponential backoff; any other 4xx is final. Every wait is ``cancel.wait``: a cancelled job stops waiting
  at once (:class:`WebCancelled`). A read timeout is retried for GET only (a POST may have been stored).
* **Redirects** are never followed by ``requests``: a 301/302/303/307/308 to the *same origin* (scheme, host,
  port) as the request is followed here (5 at most; 307/308 keep method and body); any other origin is a
  :class:`WebRedirectRefused` naming it, and nothing is sent there. ``Authorization`` is added per request,
  and only to the origins the client was configured with (``base_url`` and ``also``); a URL of another
  origin (a BulkDataURI, a RetrieveURL) is refused rather than sent credentials.
* **TLS** is verified by default (``verify=False`` only when a node says so; ``ca_bundle`` for a private CA).
  The session ignores the environment (``trust_env=False``): no ``.netrc`` credentials and no
  ``REQUESTS_CA_BUNDLE`` slip in behind the node's configuration; proxies are passed explicitly.
* **Timeouts**: ``(connect, read)``, where read bounds each wait for bytes, not the whole body (a study of
  several GB takes as long as it takes while bytes flow).
* **Memory** is bounded by ``chunk_size`` (1 MiB) whatever the size of a study or of one instance: multipart
  parts stream to ``.part-<uuid>`` files in a caller-given folder, STOW bodies stream from files. Bodies read
  whole (QIDO JSON, STOW answers) stop at ``max_body_bytes`` (256 MiB).
* **Cancel** is seen between retries (at once) and between chunks of a body; a read blocked on a silent
  server ends with the read timeout, not with the cancel.
* **Threads**: one client may be shared by a node's download threads (the pool holds ``max_connections``);
  requests' Session is used only for its connection pool and defaults, nothing per request is kept on it.

Where we go around dicomweb-client
----------------------------------
``dicomweb-client`` (a dependency: W2 uses it for QIDO query parameters and DICOM JSON) is not used for
transport, because (read in its 0.61 ``web.py``):

* ``DICOMwebClient._decode_multipart_message`` holds each part in a ``bytearray`` until its delimiter
  arrives, then yields it as ``bytes`` (a copy): one 1-GB whole-slide instance costs 2 GB of memory, and
  without ``stream=True`` it reads ``response.content``, the whole study. We write parts to files instead.
* It never checks the closing delimiter (``--boundary--``): a body cut short yields its last, partial part
  as if complete. We raise :class:`WebTruncated` and delete the partial file.
* It takes any ``CRLF--boundary`` as a delimiter; we also require what RFC 2046 puts after one (``--`` or
  optional white space and CRLF), so that a payload that happens to hold the string is not split.
* A non-multipart answer raises a bare ``ValueError`` without the body; ours says what came and its first bytes.
* ``store_instances`` builds the whole request body in memory (``_encode_multipart_message`` joins every
  encoded dataset); :class:`MultipartBody` streams files with a precomputed Content-Length.
* Its retries (the ``retrying`` package) back off exponentially on a fixed status list, ignore
  ``Retry-After`` and cannot be cancelled; it lets ``requests`` follow redirects to any host.
"""

from __future__ import annotations

import email.utils
import json
import logging
import os
import random
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, NamedTuple, Sequence
from urllib.parse import quote, urljoin, urlsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter

from pacsbridge.shared.core.errors import (WebCancelled, WebContentError, WebError, WebRedirectRefused,
                                           WebTimeout, WebTruncated)

__all__ = [
    "WebClient",
    "TLS_ADVICE",
    "WebAuth",
    "RetryPolicy",
    "Part",
    "JsonReply",
    "StowInstance",
    "StowResult",
    "MultipartBody",
    "read_multipart",
    "parse_stow_response",
    "parse_retry_after",
    "origin_of",
    "DICOM_MULTIPART",
    "CHUNK_SIZE",
]

#: What to do when a node's certificate is refused (said by both DICOMweb HTTP stacks).
TLS_ADVICE = ("if the server's certificate is signed by a private CA, give the node that CA (web_ca_bundle, a PEM "
              "file); web_verify false skips the check")

logger = logging.getLogger(__name__)

#: bytes read or written at a time: the bound on memory per stream
CHUNK_SIZE = 1 << 20
#: the WADO-RS Accept that asks for every instance as stored (no transcoding)
DICOM_MULTIPART = 'multipart/related; type="application/dicom"; transfer-syntax=*'
#: part headers larger than this are not DICOMweb: refuse rather than buffer
MAX_PART_HEADERS = 64 * 1024
#: how many bytes of an unexpected body an error message quotes
ERROR_EXCERPT = 300

_RETRY_AFTER_STATUSES = frozenset({429, 503})
_BACKOFF_STATUSES = frozenset({500, 502, 504})
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_MAX_REDIRECTS = 5
#: white space allowed between a delimiter and its CRLF (RFC 2046 "transport padding"); more is payload
_MAX_DELIMITER_SPACE = 64


# -- values -------------------------------------------------------------------------------------------------
class Part(NamedTuple):
    """One body written to disk: a multipart part, or a whole WADO-URI answer.

    ``headers`` has lower-case names; ``path`` is a ``.part-<uuid>`` file in the caller's folder, which
    the caller owns from the moment it is yielded (move it into storage, or delete it).
    """

    headers: dict[str, str]
    path: Path
    size: int

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "")


class JsonReply(NamedTuple):
    """A JSON answer: the parsed body (``[]`` for 204), every ``Warning`` header, all headers (lower-case)."""

    data: Any
    warnings: list[str]
    headers: dict[str, str]


class StowInstance(NamedTuple):
    """One instance of a STOW-RS answer (PS3.18 10.5.3): stored (``ok``) or failed with its reason."""

    sop_class_uid: str
    sop_instance_uid: str
    ok: bool
    failure_reason: int | None = None
    warning_reason: int | None = None
    retrieve_url: str = ""


class StowResult(NamedTuple):
    """A STOW-RS answer.

    ``instances`` lists the ReferencedSOPSequence (``ok``) and FailedSOPSequence items; ``warning_reason`` is
    the answer's own WarningReason (0008,1196), if any; ``parsed`` is False when the peer answered 200 without a
    DICOM JSON body (then the caller knows only that the request as a whole succeeded).
    """

    status: int
    instances: list[StowInstance]
    warning_reason: int | None = None
    parsed: bool = True

    @property
    def stored(self) -> list[StowInstance]:
        return [i for i in self.instances if i.ok]

    @property
    def failed(self) -> list[StowInstance]:
        return [i for i in self.instances if not i.ok]


@dataclass(frozen=True)
class WebAuth:
    """How to authenticate: ``none``, ``basic`` (user and password) or ``bearer`` (a token).

    The secret is a value here: finding it from a node's secret *name* is the caller's job. ``repr`` never
    shows it.
    """

    kind: str = "none"
    user: str = ""
    secret: str = field(default="", repr=False)

    @classmethod
    def none(cls) -> "WebAuth":
        return cls()

    @classmethod
    def basic(cls, user: str, password: str) -> "WebAuth":
        return cls("basic", user, password)

    @classmethod
    def bearer(cls, token: str) -> "WebAuth":
        return cls("bearer", "", token)

    def header(self) -> str | None:
        """The ``Authorization`` value, or ``None``."""
        if self.kind == "none":
            return None
        if self.kind == "basic":
            import base64

            raw = f"{self.user}:{self.secret}".encode("utf-8")
            return "Basic " + base64.b64encode(raw).decode("ascii")
        if self.kind == "bearer":
            return f"Bearer {self.secret}"
        raise ValueError(f"unknown web auth {self.kind!r} (none, basic or bearer)")


@dataclass(frozen=True)
class RetryPolicy:
    """When and how long to retry.

    ``tries`` counts every attempt (first included); ``max_wait`` caps one wait (a Retry-After of an hour
    waits ``max_wait``); backoff is ``backoff * 2**n`` with jitter, capped by ``max_wait``.
    """

    tries: int = 5
    max_wait: float = 60.0
    backoff: float = 1.0

    def backoff_delay(self, attempt: int) -> float:
        return min(self.max_wait, self.backoff * (2 ** attempt) * (0.5 + random.random() / 2))


# -- helpers ------------------------------------------------------------------------------------------------
def origin_of(url: str) -> tuple[str, str, int]:
    """``(scheme, host, port)`` of a URL, the port filled in for http/https; host lower-cased."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    port = parts.port or {"http": 80, "https": 443}.get(scheme, 0)
    return scheme, (parts.hostname or "").lower(), port


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (delta-seconds or an HTTP date); ``None`` if absent or bad."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    now = time.time() if now is None else now
    return max(0.0, when.timestamp() - now)


def _excerpt(data: bytes) -> str:
    text = data[:ERROR_EXCERPT].decode("utf-8", "replace")
    return text + ("..." if len(data) > ERROR_EXCERPT else "")


def _media_params(content_type: str) -> tuple[str, dict[str, str]]:
    """``("multipart/related", {"boundary": ..., "type": ...})`` from a Content-Type value (quotes honoured)."""
    main, _, rest = content_type.partition(";")
    params: dict[str, str] = {}
    i, n = 0, len(rest)
    while i < n:
        while i < n and rest[i] in " \t;":
            i += 1
        start = i
        while i < n and rest[i] not in "=;":
            i += 1
        name = rest[start:i].strip().lower()
        value = ""
        if i < n and rest[i] == "=":
            i += 1
            while i < n and rest[i] in " \t":
                i += 1
            if i < n and rest[i] == '"':
                i += 1
                buf = []
                while i < n and rest[i] != '"':
                    if rest[i] == "\\" and i + 1 < n:
                        i += 1
                    buf.append(rest[i])
                    i += 1
                i += 1
                value = "".join(buf)
            else:
                start = i
                while i < n and rest[i] != ";":
                    i += 1
                value = rest[start:i].strip()
        if name:
            params[name] = value
    return main.strip().lower(), params


class _PartFile:
    """A ``.part-<uuid>`` file being written; deleted unless :meth:`keep` is called."""

    def __init__(self, folder: Path, fsync: bool) -> None:
        self.path = Path(folder) / f".part-{uuid.uuid4().hex}"
        self.fsync = fsync
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
        self.file = os.fdopen(fd, "wb", buffering=0)
        self.size = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if data:
            self.file.write(data)
            self.size += len(data)

    def keep(self) -> Path:
        if self.fsync:
            os.fsync(self.file.fileno())
        self.file.close()
        return self.path

    def discard(self) -> None:
        if not self.file.closed:
            self.file.close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


# -- multipart/related, read --------------------------------------------------------------------------------
def read_multipart(chunks: Iterable[bytes], boundary: str, folder: Path, *, fsync: bool = False,
                   url: str = "", cancel: threading.Event | None = None) -> Iterator[Part]:
    """Parse a multipart body from byte chunks, writing each part to a ``.part-<uuid>`` file in ``folder``.

    Parameters
    ----------
    chunks : iterable of bytes
        The body as it arrives (any chunking; memory holds one chunk plus a delimiter's length).
    boundary : str
        The boundary from the Content-Type.
    folder : Path
        Where part files go (the storage's incoming folder, so that a move into place is a rename).
    fsync : bool
        fsync each part before yielding it.

    Yields
    ------
    Part
        Each complete part, in order; the caller owns its file.

    Raises
    ------
    WebTruncated
        The body ended before the closing delimiter (the part in progress is deleted).
    WebContentError
        No opening delimiter, or part headers that are not headers.
    WebCancelled
        ``cancel`` was set between chunks (the part in progress is deleted).
    """
    delim = b"\r\n--" + boundary.encode("latin-1")
    dlen = len(delim)
    it = iter(chunks)
    # a leading CRLF makes the first delimiter look like every other one (RFC 2046 allows no preamble)
    buf = bytearray(b"\r\n")
    eof = False

    def more() -> bool:
        nonlocal eof
        if eof:
            return False
        if cancel is not None and cancel.is_set():
            raise WebCancelled("cancelled while reading a multipart body", url=url)
        for chunk in it:
            if chunk:
                buf.extend(chunk)
                return True
        eof = True
        return False

    def find_delimiter(start: int) -> tuple[int, int, bool] | None:
        """Next real delimiter at or after ``start``: (index, index after its line, closing?); None: need more.

        A ``CRLF--boundary`` followed by anything but ``--`` or white space + CRLF is payload (skipped).
        """
        while True:
            idx = buf.find(delim, start)
            if idx < 0:
                return None
            j = idx + dlen
            if len(buf) < j + 2:
                if eof:
                    return (idx, len(buf), False) if len(buf) == j else None
                return None
            if buf[j:j + 2] == b"--":
                return idx, j + 2, True
            k = j
            while k < len(buf) and k - j < _MAX_DELIMITER_SPACE and buf[k] in b" \t":
                k += 1
            if len(buf) < k + 2 and k - j < _MAX_DELIMITER_SPACE:
                return None  # need more bytes to tell (at the end of the body: truncated)
            if buf[k:k + 2] == b"\r\n":
                return idx, k + 2, False
            start = idx + 1  # the boundary string inside a payload: not a delimiter

    # preamble: up to the first delimiter
    while True:
        found = find_delimiter(0)
        if found is not None:
            break
        if len(buf) > dlen + MAX_PART_HEADERS:
            raise WebContentError(f"no multipart boundary {boundary!r} at the start of the body: "
                                  f"{_excerpt(bytes(buf[2:]))!r}", url=url)
        if not more():
            if len(buf) <= 2:
                raise WebTruncated("empty multipart body", url=url)
            raise WebTruncated(f"multipart body ended before its first boundary: {_excerpt(bytes(buf[2:]))!r}",
                               url=url)
    _, after, closing = found
    del buf[:after]
    index = 0
    while not closing:
        # headers
        while True:
            end = buf.find(b"\r\n\r\n")
            if end >= 0 or buf.startswith(b"\r\n"):
                break
            if len(buf) > MAX_PART_HEADERS:
                raise WebContentError(f"part {index} headers longer than {MAX_PART_HEADERS} bytes", url=url)
            if not more():
                raise WebTruncated(f"multipart body ended inside the headers of part {index}", url=url)
        if buf.startswith(b"\r\n"):
            head, body_at = b"", 2
        else:
            head, body_at = bytes(buf[:end]), end + 4
        headers: dict[str, str] = {}
        for line in head.split(b"\r\n") if head else ():
            name, sep, value = line.partition(b":")
            if not sep:
                raise WebContentError(f"part {index}: not a header line: {_excerpt(line)!r}", url=url)
            headers[name.decode("latin-1").strip().lower()] = value.decode("latin-1").strip()
        del buf[:body_at]
        out = _PartFile(folder, fsync)
        try:
            while True:
                found = find_delimiter(0)
                if found is not None:
                    idx, after, closing = found
                    with memoryview(buf) as view:
                        out.write(view[:idx])
                    del buf[:after]
                    break
                # keep what could be the start of a delimiter (and what follows it), write the rest
                safe = len(buf) - (dlen + 2 + _MAX_DELIMITER_SPACE)
                if safe > 0:
                    with memoryview(buf) as view:
                        out.write(view[:safe])
                    del buf[:safe]
                if not more():
                    raise WebTruncated(f"multipart body ended inside part {index} "
                                       f"({out.size + len(buf)} bytes in)", url=url)
            declared = headers.get("content-length", "")
            if declared.isdigit() and int(declared) != out.size:
                raise WebTruncated(f"part {index} declared {declared} bytes and had {out.size}", url=url)
            path = out.keep()
        except BaseException:
            out.discard()
            raise
        yield Part(headers, path, out.size)
        index += 1


# -- multipart/related, write -------------------------------------------------------------------------------
class MultipartBody:
    """A STOW-RS body streamed from files: iterate it for bytes, ``len()`` for its Content-Length.

    The length is computed up front from the files' sizes, so no chunked encoding is needed (some servers
    refuse it); a file that changes size while being sent raises :class:`WebError` rather than send a body
    that disagrees with its length. Iterable more than once (a retry sends it again).
    """

    def __init__(self, files: Sequence[Path | str], part_type: str = "application/dicom",
                 boundary: str | None = None, chunk_size: int = CHUNK_SIZE) -> None:
        self.files = [Path(f) for f in files]
        self.part_type = part_type
        self.boundary = boundary or f"pacsbridge-{uuid.uuid4().hex}"
        self.chunk_size = chunk_size
        self.sizes = [f.stat().st_size for f in self.files]
        self._head = f"\r\nContent-Type: {part_type}\r\n\r\n".encode("ascii")
        self._sep = f"--{self.boundary}".encode("ascii")

    @property
    def content_type(self) -> str:
        return f'multipart/related; type="{self.part_type}"; boundary={self.boundary}'

    def __len__(self) -> int:
        per_part = len(self._sep) + len(self._head) + 2  # the CRLF that ends each body
        return sum(self.sizes) + per_part * len(self.files) + len(self._sep) + 4

    def __iter__(self) -> Iterator[bytes]:
        for f, size in zip(self.files, self.sizes):
            yield self._sep + self._head
            sent = 0
            with open(f, "rb") as fh:
                while True:
                    data = fh.read(self.chunk_size)
                    if not data:
                        break
                    sent += len(data)
                    if sent > size:
                        break
                    yield data
            if sent != size:
                raise WebError(f"{f} changed size while being sent ({size} -> {sent} bytes)")
            yield b"\r\n"
        yield self._sep + b"--\r\n"


# -- STOW answer ----------------------------------------------------------------------------------------------
_REFERENCED_SOP_SEQ = "00081199"
_FAILED_SOP_SEQ = "00081198"
_FAILURE_REASON = "00081197"
_WARNING_REASON = "00081196"
_REF_SOP_CLASS = "00081150"
_REF_SOP_INSTANCE = "00081155"
_RETRIEVE_URL = "00081190"


def _first(item: Mapping[str, Any], tag: str) -> Any:
    value = (item.get(tag) or {}).get("Value") or []
    return value[0] if value else None


def parse_stow_response(status: int, data: Any) -> StowResult:
    """A STOW-RS DICOM JSON answer (a dataset, or a list of one) as a :class:`StowResult`.

    Raises
    ------
    WebContentError
        The JSON is not a DICOM JSON dataset.
    """
    if isinstance(data, list) and len(data) == 1:
        data = data[0]
    if not isinstance(data, dict):
        raise WebContentError(f"STOW answer is not a DICOM JSON dataset: {_excerpt(json.dumps(data).encode())!r}",
                              status=status)
    out: list[StowInstance] = []
    for tag, ok in ((_REFERENCED_SOP_SEQ, True), (_FAILED_SOP_SEQ, False)):
        for item in (data.get(tag) or {}).get("Value") or []:
            if not isinstance(item, dict):
                continue
            failure = _first(item, _FAILURE_REASON)
            warning = _first(item, _WARNING_REASON)
            url = _first(item, _RETRIEVE_URL)
            out.append(StowInstance(str(_first(item, _REF_SOP_CLASS) or ""),
                                    str(_first(item, _REF_SOP_INSTANCE) or ""), ok,
                                    int(failure) if failure is not None else None,
                                    int(warning) if warning is not None else None,
                                    str(url or "")))
    warning = _first(data, _WARNING_REASON)
    return StowResult(status, out, int(warning) if warning is not None else None)


# -- the client -----------------------------------------------------------------------------------------------
class WebClient:
    """One DICOMweb node's HTTP side: a ``requests.Session`` with the node's auth, TLS and timeouts.

    Parameters
    ----------
    base_url : str
        The DICOMweb root (``http://host:8042/dicom-web``); :meth:`url` builds on it.
    auth : WebAuth
        Credentials, sent only to the configured origins.
    verify : bool
        Verify TLS certificates (default; False only for a node configured so).
    ca_bundle : str
        A PEM file of CA certificates to verify against instead of the system's.
    timeout : float
        Seconds to wait for bytes (read timeout); ``connect_timeout`` for a connection.
    cancel : threading.Event, optional
        Set it to stop waits between retries and multipart reads (:class:`WebCancelled`).
    retry : RetryPolicy
        Tries and waits.
    also : sequence of str
        More URLs the node was configured with (QIDO/WADO/STOW bases): their origins may get requests and
        credentials too.
    proxies : mapping, optional
        ``requests`` proxies (the environment's are not read).
    chunk_size : int
        Bytes read at a time from a body.
    max_connections : int
        Connections kept per origin: at least the node's concurrent requests, so that parallel WADO-URI
        downloads (threads sharing this client) reuse connections instead of opening one each time.
    max_body_bytes : int
        The most a body read whole (QIDO JSON, a STOW answer) may hold; a larger one is a
        :class:`WebContentError`, not an out-of-memory worker.
    """

    def __init__(self, base_url: str, *, auth: WebAuth | None = None, verify: bool = True, ca_bundle: str = "",
                 timeout: float = 60.0, connect_timeout: float = 10.0, cancel: threading.Event | None = None,
                 retry: RetryPolicy | None = None, also: Sequence[str] = (),
                 proxies: Mapping[str, str] | None = None, chunk_size: int = CHUNK_SIZE,
                 max_connections: int = 10, max_body_bytes: int = 256 << 20,
                 user_agent: str = "pacsbridge") -> None:
        if origin_of(base_url)[0] not in ("http", "https"):
            raise WebError(f"not an http(s) URL: {base_url!r}", url=base_url)
        self.base_url = base_url.rstrip("/")
        self.auth = auth or WebAuth()
        self.auth.header()  # an unknown kind fails here, not at the first request
        self.timeout = (connect_timeout, timeout)
        self.cancel = cancel
        self.retry = retry or RetryPolicy()
        self.chunk_size = chunk_size
        self.max_body_bytes = max_body_bytes
        self.origins = {origin_of(u) for u in (base_url, *(a for a in also if a))}
        self.session = requests.Session()
        self.session.trust_env = False
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=max(1, max_connections), max_retries=0)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.session.headers["User-Agent"] = user_agent
        if proxies:
            self.session.proxies.update(proxies)
        if ca_bundle:
            if not Path(ca_bundle).is_file():
                raise WebError(f"CA bundle {ca_bundle!r} is not a file", url=base_url)
            self.session.verify = ca_bundle if verify else False
        else:
            self.session.verify = verify

    def __enter__(self) -> "WebClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.session.close()

    def url(self, *segments: str, base: str = "") -> str:
        """``base`` (default ``base_url``) plus path segments, each percent-encoded."""
        root = (base or self.base_url).rstrip("/")
        return "/".join([root, *(quote(str(s), safe="") for s in segments)])

    # -- the one request loop ---------------------------------------------------------------------------------
    def _wait(self, seconds: float, url: str) -> None:
        logger.debug("waiting %.1f s before retrying %s", seconds, url)
        if self.cancel is not None:
            if self.cancel.wait(seconds):
                raise WebCancelled(f"cancelled while waiting to retry {url}", url=url)
        else:
            time.sleep(seconds)

    def request(self, method: str, url: str, *, params: Mapping[str, Any] | None = None,
                headers: Mapping[str, str] | None = None,
                body: bytes | MultipartBody | Callable[[], Any] | None = None,
                stream: bool = False, ok: Iterable[int] = (200, 204, 206)) -> requests.Response:
        """Send a request with retries and same-origin redirects; the response's status is in ``ok``.

        ``body`` may be a :class:`MultipartBody` (sent again on a retry). With ``stream``, the caller reads and
        closes the response. Raises :class:`WebError` (subclasses for timeouts, cancels, refused redirects)
        for anything else, quoting the start of the body.
        """
        ok = frozenset(ok)
        if self.cancel is not None and self.cancel.is_set():
            raise WebCancelled(f"cancelled before {method} {url}", url=url)
        redirects = 0
        attempt = 0
        while True:
            origin = origin_of(url)
            if origin not in self.origins:
                raise WebRedirectRefused(f"{url} is not at an origin this node was configured with", url=url)
            hdrs = dict(headers or {})
            auth = self.auth.header()
            if auth:
                hdrs["Authorization"] = auth
            data = body() if callable(body) else body
            try:
                resp = self.session.request(method, url, params=params, headers=hdrs, data=data, stream=True,
                                            timeout=self.timeout, allow_redirects=False)
            except requests.exceptions.SSLError as exc:  # an untrusted certificate: another try changes nothing
                raise WebError(f"{method} {url}: TLS failed: {exc}; {TLS_ADVICE}", url=url) from exc
            except requests.exceptions.ConnectionError as exc:
                # ConnectTimeout is a ConnectionError too: nothing was sent, always worth another try
                if attempt + 1 < self.retry.tries:
                    self._wait(self.retry.backoff_delay(attempt), url)
                    attempt += 1
                    continue
                kind = WebTimeout if isinstance(exc, requests.exceptions.ConnectTimeout) else WebError
                raise kind(f"{method} {url}: cannot connect: {exc}", url=url) from exc
            except requests.exceptions.Timeout as exc:
                if method in ("GET", "HEAD") and attempt + 1 < self.retry.tries:
                    self._wait(self.retry.backoff_delay(attempt), url)
                    attempt += 1
                    continue
                raise WebTimeout(f"{method} {url}: no answer within {self.timeout[1]} s", url=url) from exc
            except requests.exceptions.RequestException as exc:
                raise WebError(f"{method} {url}: {exc}", url=url) from exc
            status = resp.status_code
            if status in _REDIRECT_STATUSES:
                location = resp.headers.get("Location", "")
                resp.close()
                target = urljoin(url, location)
                if not location or origin_of(target) != origin:
                    raise WebRedirectRefused(f"{method} {url} redirects to another origin: {target or '(none)'}; "
                                             "not followed", status=status, url=url)
                redirects += 1
                if redirects > _MAX_REDIRECTS:
                    raise WebRedirectRefused(f"{method} {url}: more than {_MAX_REDIRECTS} redirects",
                                             status=status, url=url)
                if status in (301, 302, 303) and method not in ("GET", "HEAD"):
                    raise WebRedirectRefused(f"{method} {url} answered {status} to {target}: a {method} is "
                                             "only re-sent on 307/308", status=status, url=url)
                logger.debug("%s %s: %d to %s", method, url, status, target)
                url, params = target, None  # the Location carries its own query
                continue
            if status in ok:
                if not stream:
                    self._read_limited(resp, url)
                return resp
            retryable = status in _RETRY_AFTER_STATUSES or status in _BACKOFF_STATUSES
            if retryable and attempt + 1 < self.retry.tries:
                wait = parse_retry_after(resp.headers.get("Retry-After")) if status in _RETRY_AFTER_STATUSES \
                    else None
                resp.close()
                delay = min(self.retry.max_wait, wait) if wait is not None else self.retry.backoff_delay(attempt)
                logger.info("%s %s: %d, retrying in %.1f s (try %d of %d)", method, url, status, delay,
                            attempt + 2, self.retry.tries)
                self._wait(delay, url)
                attempt += 1
                continue
            raise self._status_error(method, url, resp)

    def _status_error(self, method: str, url: str, resp: requests.Response) -> WebError:
        try:
            head = next(resp.iter_content(ERROR_EXCERPT + 1), b"")
        except requests.exceptions.RequestException:
            head = b""
        finally:
            resp.close()
        reason = f" {resp.reason}" if resp.reason else ""
        return WebError(f"{method} {url}: HTTP {resp.status_code}{reason}: {_excerpt(head)!r}",
                        status=resp.status_code, url=url)

    @staticmethod
    def _body_error(exc: BaseException, url: str) -> WebError:
        # requests wraps urllib3's ReadTimeoutError in a ConnectionError while a body is read
        if isinstance(exc, requests.exceptions.Timeout) or \
                any(isinstance(a, urllib3.exceptions.ReadTimeoutError) for a in exc.args):
            return WebTimeout(f"{url}: no bytes within the read timeout while reading the body", url=url)
        return WebTruncated(f"{url}: body cut short: {exc}", url=url)

    def _read_limited(self, resp: requests.Response, url: str) -> bytes:
        """Read a whole (JSON) body into ``resp._content``, refusing more than ``max_body_bytes``."""
        data = bytearray()
        with resp:
            for chunk in self._chunks(resp, url):
                data += chunk
                if len(data) > self.max_body_bytes:
                    raise WebContentError(f"{url}: answer larger than {self.max_body_bytes} bytes, not read "
                                          "whole (ask for less: a smaller QIDO limit or STOW chunk)",
                                          status=resp.status_code, url=url)
        resp._content = bytes(data)  # what requests' own .content does, so .content/.json() work after
        return resp._content

    def _chunks(self, resp: requests.Response, url: str) -> Iterator[bytes]:
        try:
            yield from resp.iter_content(self.chunk_size)
        except requests.exceptions.RequestException as exc:
            raise self._body_error(exc, url) from exc

    # -- QIDO ---------------------------------------------------------------------------------------------
    def get_json(self, url: str, params: Mapping[str, Any] | None = None,
                 accept: str = "application/dicom+json, application/json") -> JsonReply:
        """GET a JSON answer (QIDO-RS); 204 is ``[]``.

        Raises
        ------
        WebContentError
            The answer is not JSON (its first bytes quoted).
        """
        resp = self.request("GET", url, params=params, headers={"Accept": accept})
        headers = {k.lower(): v for k, v in resp.headers.items()}
        warnings = [w.strip() for w in resp.raw.headers.getlist("Warning")] if resp.raw is not None else []
        if resp.status_code == 204 or not resp.content.strip():
            return JsonReply([], warnings, headers)
        ctype = _media_params(resp.headers.get("Content-Type", ""))[0]
        if ctype and not ctype.endswith("json"):
            raise WebContentError(f"GET {resp.url}: {ctype} where JSON was expected: {_excerpt(resp.content)!r}",
                                  status=resp.status_code, url=url)
        try:
            data = json.loads(resp.content)
        except ValueError as exc:
            raise WebContentError(f"GET {resp.url}: not JSON ({exc}): {_excerpt(resp.content)!r}",
                                  status=resp.status_code, url=url) from exc
        return JsonReply(data, warnings, headers)

    # -- WADO-RS ------------------------------------------------------------------------------------------
    def stream_multipart(self, url: str, accept: str, folder: Path | str, *,
                         params: Mapping[str, Any] | None = None, fsync: bool = False) -> Iterator[Part]:
        """GET a multipart/related answer (WADO-RS) and yield each part as a file in ``folder``.

        A bare ``application/dicom`` answer (no multipart wrapping, as some servers send a single instance)
        is yielded as one part. Closing the generator early closes the connection and deletes the part in
        progress.

        Raises
        ------
        WebContentError
            Any other content type (JSON, HTML error pages ...), quoting the start of the body.
        WebTruncated, WebTimeout, WebCancelled
            From the body; the part in progress is deleted, parts already yielded are the caller's.
        WebError
            An HTTP error status (``.status == 406``: the Accept was refused).
        """
        resp = self.request("GET", url, params=params, headers={"Accept": accept}, stream=True)
        with resp:
            ctype_header = resp.headers.get("Content-Type", "")
            ctype, cparams = _media_params(ctype_header)
            wanted = _media_params(accept)[1].get("type", "application/dicom").lower()
            if ctype.startswith("multipart/"):
                boundary = cparams.get("boundary", "")
                if not boundary:
                    raise WebContentError(f"GET {url}: {ctype_header!r} has no boundary", url=url)
                yield from read_multipart(self._chunks(resp, url), boundary, Path(folder), fsync=fsync, url=url,
                                          cancel=self.cancel)
                return
            if ctype == wanted:
                yield self._body_to_file(resp, url, Path(folder), fsync)
                return
            head = next(self._chunks(resp, url), b"")
            raise WebContentError(f"GET {url}: answered {ctype_header or 'no content type'} where "
                                  f"multipart/related was asked: {_excerpt(head)!r}",
                                  status=resp.status_code, url=url)

    def _body_to_file(self, resp: requests.Response, url: str, folder: Path, fsync: bool) -> Part:
        out = _PartFile(folder, fsync)
        try:
            for chunk in self._chunks(resp, url):
                if self.cancel is not None and self.cancel.is_set():
                    raise WebCancelled(f"cancelled while reading {url}", url=url)
                out.write(chunk)
            declared = resp.headers.get("Content-Length", "")
            encoded = resp.headers.get("Content-Encoding", "identity").lower() not in ("", "identity")
            if declared.isdigit() and not encoded and int(declared) != out.size:
                raise WebTruncated(f"{url}: declared {declared} bytes and had {out.size}", url=url)
            path = out.keep()
        except BaseException:
            out.discard()
            raise
        return Part({k.lower(): v for k, v in resp.headers.items()}, path, out.size)

    # -- WADO-URI -----------------------------------------------------------------------------------------
    def get_to_file(self, url: str, accept: str, folder: Path | str, *, params: Mapping[str, Any] | None = None,
                    fsync: bool = False) -> Part:
        """GET one body (WADO-URI: ``requestType=WADO&...&contentType=application/dicom``) into a part file.

        Raises
        ------
        WebContentError
            The answer's type is not ``accept``'s (an HTML error page with status 200, say).
        WebTruncated
            Shorter than its Content-Length.
        """
        resp = self.request("GET", url, params=params, headers={"Accept": accept}, stream=True)
        with resp:
            ctype_header = resp.headers.get("Content-Type", "")
            ctype = _media_params(ctype_header)[0]
            if ctype != _media_params(accept)[0]:
                head = next(self._chunks(resp, url), b"")
                raise WebContentError(f"GET {url}: answered {ctype_header or 'no content type'} where {accept} "
                                      f"was asked: {_excerpt(head)!r}", status=resp.status_code, url=url)
            return self._body_to_file(resp, url, Path(folder), fsync)

    # -- STOW-RS ------------------------------------------------------------------------------------------
    def post_multipart(self, url: str, files: Sequence[Path | str],
                       part_type: str = "application/dicom") -> StowResult:
        """POST files as one multipart/related body (STOW-RS), streamed, and parse the answer.

        200, 202 (some failed or warned) and 409 (all failed) answers are parsed into per-instance results;
        other statuses raise :class:`WebError`.
        """
        body = MultipartBody(files, part_type, chunk_size=self.chunk_size)
        resp = self.request("POST", url, body=body, ok=(200, 202, 204, 409),
                            headers={"Content-Type": body.content_type,
                                     "Accept": "application/dicom+json, application/json"})
        status = resp.status_code
        content = resp.content
        ctype = _media_params(resp.headers.get("Content-Type", ""))[0]
        if not content.strip() or not ctype.endswith("json"):
            if status == 409:
                raise WebError(f"POST {url}: HTTP 409 without a DICOM JSON answer: {_excerpt(content)!r}",
                               status=status, url=url)
            return StowResult(status, [], None, parsed=False)
        try:
            data = json.loads(content)
        except ValueError as exc:
            raise WebContentError(f"POST {url}: STOW answer is not JSON ({exc}): {_excerpt(content)!r}",
                                  status=status, url=url) from exc
        result = parse_stow_response(status, data)
        return result
