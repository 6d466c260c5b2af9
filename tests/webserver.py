"""A misbehaving HTTP server of the tests' own, for DICOMweb fault cases (truncated bodies, 429s, redirects ...).

Usage::

    with WebServer() as srv:
        srv.route("/dicom-web/studies", answers(json_answer([...])))        # one answer for every request
        srv.route("/flaky", answers(status_answer(503, {"Retry-After": "1"}), json_answer([])))  # in turn
        srv.route("/x", lambda h: h.send_body(200, b"...", "application/dicom"))  # any handler code
        srv.route("*", proxy_to_somewhere)                                     # every path without its own route
        srv.url + "/flaky"; srv.requests                                       # what was asked, with headers
    with WebServer(tls=("cert.pem", "key.pem")) as srv:                        # HTTPS (srv.url is https://)

A route is a function of the request handler (:class:`Handler`); it writes whatever it likes, including
nothing, half a body or a body that never ends. Threads are daemons and :attr:`WebServer.release` is set on
stop, so a hanging route (``h.hang()``) never holds a test up. Built on ``http.server`` (no dependencies),
HTTP/1.1 with keep-alive, on a free port of 127.0.0.1.
"""

from __future__ import annotations

import json
import ssl
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterable, Iterator, NamedTuple
from urllib.parse import parse_qs, urlsplit

__all__ = ["WebServer", "Handler", "Seen", "answers", "json_answer", "status_answer", "multipart",
           "multipart_answer", "qido_pages"]


class Seen(NamedTuple):
    """One request the server got: method, path (with query), headers (lower-case names), body."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def query(self) -> dict[str, list[str]]:
        return parse_qs(urlsplit(self.path).query)


Route = Callable[["Handler"], None]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_Server"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet tests
        pass

    def _dispatch(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = self._read_chunked()
        else:
            body = self.rfile.read(length) if length else b""
        self.body = body
        self.server.owner.requests.append(
            Seen(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body))
        routes = self.server.owner.routes
        route = routes.get(urlsplit(self.path).path) or routes.get("*")
        if route is None:
            self.send_body(404, b'{"error": "no route"}', "application/json")
            return
        route(self)

    do_GET = do_POST = do_PUT = do_DELETE = _dispatch

    def _read_chunked(self) -> bytes:
        out = bytearray()
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                self.rfile.readline()
                return bytes(out)
            out += self.rfile.read(size)
            self.rfile.readline()

    # -- what routes use --------------------------------------------------------------------------------------
    def send_body(self, status: int, body: bytes, content_type: str = "application/octet-stream",
                  headers: dict[str, str] | None = None, length: int | None = None) -> None:
        """Send a whole answer; ``length`` lies about Content-Length (a larger one makes a truncated body)."""
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if length is not None and length != len(body):
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()

    def send_stream(self, status: int, chunks: Iterable[bytes], content_type: str,
                    headers: dict[str, str] | None = None, length: int | None = None) -> None:
        """Send chunks as they come: with ``length`` as Content-Length, else until the connection closes."""
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        if length is not None:
            self.send_header("Content-Length", str(length))
        self.send_header("Connection", "close")
        self.close_connection = True
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        try:
            for c in chunks:
                self.wfile.write(c)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def hang(self, seconds: float = 30.0) -> None:
        """Answer nothing until the server stops (or ``seconds`` pass)."""
        self.server.owner.release.wait(seconds)
        self.close_connection = True


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: "WebServer"


class WebServer:
    """An HTTP server in a thread on a free port; routes by path (``*``: any other path); records every request.

    ``tls``: (certificate chain PEM, key PEM): HTTPS with that certificate (the handshake happens in the
    request's thread, so a client that refuses the certificate holds nothing up).
    """

    def __init__(self, tls: tuple[str, str] | None = None) -> None:
        self.routes: dict[str, Route] = {}
        self.requests: list[Seen] = []
        self.release = threading.Event()
        self.httpd = _Server(("127.0.0.1", 0), Handler)
        self.httpd.owner = self
        self.port = int(self.httpd.server_address[1])
        self.scheme = "https" if tls else "http"
        if tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True,
                                                    do_handshake_on_connect=False)
        self.thread = threading.Thread(target=self.httpd.serve_forever, name=f"webserver-{self.port}",
                                       daemon=True)

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def route(self, path: str, fn: Route) -> None:
        self.routes[path] = fn

    def start(self) -> "WebServer":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)

    def __enter__(self) -> "WebServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- answers ------------------------------------------------------------------------------------------------
def answers(*routes: Route) -> Route:
    """Each request gets the next route; the last one repeats."""
    lock = threading.Lock()
    state = {"n": 0}

    def route(h: Handler) -> None:
        with lock:
            i = min(state["n"], len(routes) - 1)
            state["n"] += 1
        routes[i](h)
    return route


def json_answer(data: Any, status: int = 200, headers: dict[str, str] | None = None,
                content_type: str = "application/dicom+json") -> Route:
    raw = json.dumps(data).encode()
    return lambda h: h.send_body(status, raw, content_type, headers)


def status_answer(status: int, headers: dict[str, str] | None = None, body: bytes = b"",
                  content_type: str = "text/plain") -> Route:
    return lambda h: h.send_body(status, body, content_type, headers)


def multipart(parts: Iterable[bytes], boundary: str, part_type: str = "application/dicom",
              close: bool = True) -> Iterator[bytes]:
    """The bytes of a multipart/related body (``close=False``: without the closing delimiter)."""
    for p in parts:
        yield f"--{boundary}\r\nContent-Type: {part_type}\r\n\r\n".encode() + p + b"\r\n"
    if close:
        yield f"--{boundary}--\r\n".encode()


def multipart_answer(parts: list[bytes], boundary: str | None = None, *, cut: int = 0, quoted: bool = True,
                     part_type: str = "application/dicom") -> Route:
    """A WADO-RS style answer of ``parts``; ``cut`` bytes dropped from its end with a Content-Length that
    still counts them (so the client sees the connection close early)."""
    b = boundary or f"b-{uuid.uuid4().hex}"
    body = b"".join(multipart(parts, b, part_type))
    btext = f'"{b}"' if quoted else b
    ctype = f'multipart/related; type="{part_type}"; boundary={btext}'

    def route(h: Handler) -> None:
        if cut:
            h.send_body(200, body[:-cut], ctype, length=len(body))
        else:
            h.send_body(200, body, ctype)
    return route


def qido_pages(items: list[Any], honour_limit: bool = True, headers: dict[str, str] | None = None) -> Route:
    """A QIDO-RS endpoint over ``items``: pages by ``limit``/``offset`` unless ``honour_limit`` is False
    (then every request gets all of them, as servers that ignore ``limit`` do)."""
    def route(h: Handler) -> None:
        q = parse_qs(urlsplit(h.path).query)
        out = items
        if honour_limit:
            offset = int(q.get("offset", ["0"])[0])
            limit = int(q.get("limit", [str(len(items))])[0])
            out = items[offset:offset + limit]
        if not out:
            h.send_body(204, b"", "application/dicom+json", headers)
        else:
            h.send_body(200, json.dumps(out).encode(), "application/dicom+json", headers)
    return route
