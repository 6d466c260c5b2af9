"""Webhooks: where they may go, how they are signed, and how one is sent.

A job's ``webhook`` gets the finished job POSTed as JSON, from a Celery queue of its own
(:data:`~pacsbridge.shared.core.celeryapp.WEBHOOK_QUEUE`), never from the job's slot.

Where: only destinations an admin listed in ``PACSBRIDGE_WEBHOOK_ALLOW`` (empty: webhooks are
off), comma-separated entries of three kinds::

    platform.example        a host name (exact)
    *.hooks.example         every name under hooks.example
    10.20.0.0/16, 10.1.2.3  a network, or one address

A destination named in the list by name may resolve to public addresses; loopback, private,
link-local and other special addresses are refused unless a listed network holds them. An
address that is not public and a name that is not listed must be in a listed network. The
check runs at submit (a 400 with the reason) and again when sending, after resolving the name;
the connection then goes to the address that was checked (a name that resolves elsewhere
a second later is not asked again). An IPv4 address must be written as a.b.c.d: the decimal,
octal, hexadecimal and short forms (``2130706433``, ``0177.0.0.1``, ``0x7f000001``, ``127.1``)
are refused. No user:password in the URL.

How: a POST with a short timeout for the whole exchange (``PACSBRIDGE_WEBHOOK_TIMEOUT``,
default 5 s), no redirect followed (a 3xx is a permanent failure), a 2xx is success; a 5xx,
408, 429, a timeout or a refused connection is retried with exponential backoff
(``PACSBRIDGE_WEBHOOK_RETRIES`` times, default 8: about 4 minutes); anything else is given up.

Signed: with the deployment's secret (``PACSBRIDGE_WEBHOOK_SECRET`` or a file named by
``PACSBRIDGE_WEBHOOK_SECRET_FILE``; never in the database), each request carries::

    X-Pacsbridge-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>
    X-Pacsbridge-Event: job.finished
    X-Pacsbridge-Delivery: <job id>

The receiver recomputes the HMAC over the raw body bytes and refuses a ``t`` older than a few
minutes (a replay). Without a secret nothing is sent (never unsigned).
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import ipaddress
import logging
import re
import socket
import ssl
import threading
import time
from typing import NamedTuple, Union
from urllib.parse import urlsplit

from pacsbridge.shared.core.errors import ConfigError, InvalidRequest, PacsbridgeError

__all__ = ["Policy", "WebhookRefused", "WebhookFailed", "check_url", "deliver", "sign", "backoff",
           "SIGNATURE_HEADER", "EVENT_HEADER", "DELIVERY_HEADER"]

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Pacsbridge-Signature"
EVENT_HEADER = "X-Pacsbridge-Event"
DELIVERY_HEADER = "X-Pacsbridge-Delivery"
#: Longest answer body read (and ignored).
MAX_ANSWER = 64 * 1024

Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


class WebhookRefused(InvalidRequest):
    """The destination is not allowed, or its answer will never do (a redirect, a 4xx): not retried."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "webhook")
        self.reason = message


class WebhookFailed(PacsbridgeError):
    """A failure that may pass (a timeout, a refused connection, a 5xx): retried with backoff."""


class Policy(NamedTuple):
    """``PACSBRIDGE_WEBHOOK_ALLOW``, parsed."""

    hosts: frozenset[str] = frozenset()
    domains: tuple[str, ...] = ()
    networks: tuple[Network, ...] = ()

    @classmethod
    def parse(cls, text: str) -> "Policy":
        """Parse the allow-list.

        Raises
        ------
        ConfigError
            An entry that is neither a host name, ``*.domain`` nor an address or network.
        """
        hosts: set[str] = set()
        domains: list[str] = []
        networks: list[Network] = []
        for entry in (e.strip().lower() for e in text.split(",")):
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
                continue
            except ValueError:
                pass
            name = entry[2:] if entry.startswith("*.") else entry
            name = name.rstrip(".")
            if "/" in entry or not _is_hostname(name):
                raise ConfigError(f"PACSBRIDGE_WEBHOOK_ALLOW: {entry!r} is not a host name, *.domain, "
                                  "address or network (a.b.c.d/nn)")
            if entry.startswith("*."):
                domains.append("." + name)
            else:
                hosts.add(name)
        return cls(frozenset(hosts), tuple(domains), tuple(networks))

    @property
    def enabled(self) -> bool:
        return bool(self.hosts or self.domains or self.networks)

    def lists_name(self, host: str) -> bool:
        return host in self.hosts or any(host.endswith(d) for d in self.domains)

    def in_networks(self, address: Address) -> bool:
        return any(address.version == n.version and address in n for n in self.networks)


def _is_hostname(name: str) -> bool:
    labels = name.split(".")
    return (0 < len(name) <= 253 and all(_LABEL.match(label) for label in labels)
            and not all(label.isdigit() for label in labels))


class Target(NamedTuple):
    """A checked URL: scheme, host (lower case; an address in its canonical form), port, path."""

    scheme: str
    host: str
    port: int
    path: str
    address: Address | None  # the host, when it is an address


def _canonical(address: Address) -> Address:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def parse_url(url: str) -> Target:
    """Check the form of a webhook URL.

    Raises
    ------
    WebhookRefused
        Not http(s), credentials in it, an IPv4 address not written as a.b.c.d, a bad host or port.
    """
    if not isinstance(url, str) or len(url) > 2048 or re.search(r"[\x00-\x20\x7f]", url):
        raise WebhookRefused("an http(s) URL of at most 2048 characters, without spaces or control characters")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise WebhookRefused("an http(s) URL")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise WebhookRefused("no user or password in the URL (the request is signed instead)")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise WebhookRefused("the port must be a number from 1 to 65535") from None
    host = (parts.hostname or "").rstrip(".")
    if not host or port == 0:
        raise WebhookRefused("an http(s) URL with a host (and a port from 1 to 65535)")
    address: Address | None = None
    try:
        address = _canonical(ipaddress.ip_address(host))
    except ValueError:
        if re.fullmatch(r"[0-9a-fx.]+", host) and _inet_aton_accepts(host) or \
                all(label.isdigit() for label in host.split(".") if label):
            raise WebhookRefused(f"{host!r}: write an IPv4 address in dotted decimal form (a.b.c.d); the "
                                 "decimal, octal, hexadecimal and short forms are refused") from None
        if not _is_hostname(host):
            raise WebhookRefused(f"{host!r} is not a host name (IDN names in their xn-- form)") from None
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return Target(parts.scheme, str(address) if address is not None else host, port, path, address)


def _inet_aton_accepts(host: str) -> bool:
    try:
        socket.inet_aton(host)
        return True
    except OSError:
        return False


def _kind(address: Address) -> str:
    for attr, name in (("is_loopback", "loopback"), ("is_unspecified", "unspecified"), ("is_link_local", "link-local"),
                       ("is_multicast", "multicast"), ("is_private", "private"), ("is_reserved", "reserved")):
        if getattr(address, attr):
            return name
    return "not public" if not address.is_global else "public"


def _check_address(address: Address, policy: Policy, by_name: bool, host: str) -> None:
    address = _canonical(address)
    if policy.in_networks(address):
        return
    public = address.is_global and not address.is_multicast
    if by_name and public:
        return
    if by_name:
        raise WebhookRefused(f"{host} resolves to {address}, a {_kind(address)} address: not allowed unless "
                             "a network in PACSBRIDGE_WEBHOOK_ALLOW holds it")
    raise WebhookRefused(f"{address} ({_kind(address)}) is not allowed: not in PACSBRIDGE_WEBHOOK_ALLOW")


def _resolve(host: str, port: int) -> list[Address]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    seen: list[Address] = []
    for info in infos:
        address = _canonical(ipaddress.ip_address(str(info[4][0]).split("%")[0]))
        if address not in seen:
            seen.append(address)
    return seen


def check_url(url: str, policy: Policy, resolve: bool = True,
              strict_resolve: bool = True) -> tuple[Target, list[Address]]:
    """Check that ``url`` goes where the allow-list lets webhooks go.

    Returns the target and the addresses it may connect to (every address the name resolves
    to must be allowed). ``strict_resolve=False`` (at submit) accepts a listed name that does
    not resolve now: it is checked again when sending.

    Raises
    ------
    WebhookRefused
        With the reason.
    """
    if not policy.enabled:
        raise WebhookRefused("webhooks are off: no destination is allowed (an admin lists them in "
                             "PACSBRIDGE_WEBHOOK_ALLOW)")
    target = parse_url(url)
    if target.address is not None:
        _check_address(target.address, policy, False, target.host)
        return target, [target.address]
    by_name = policy.lists_name(target.host)
    if not by_name and not policy.networks:
        raise WebhookRefused(f"{target.host} is not allowed: not in PACSBRIDGE_WEBHOOK_ALLOW")
    if not resolve:
        return target, []
    try:
        addresses = _resolve(target.host, target.port)
    except (OSError, UnicodeError) as exc:
        if by_name and not strict_resolve:
            return target, []
        raise WebhookRefused(f"{target.host} does not resolve ({exc})") from None
    if not addresses:
        raise WebhookRefused(f"{target.host} does not resolve")
    for address in addresses:
        _check_address(address, policy, by_name, target.host)
    return target, addresses


def sign(body: bytes, secret: bytes, timestamp: int | None = None) -> str:
    """The value of :data:`SIGNATURE_HEADER` for ``body``."""
    t = int(time.time()) if timestamp is None else timestamp
    digest = hmac.new(secret, f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={digest}"


def backoff(retries: int) -> float:
    """Seconds before retry number ``retries + 1``: 1, 2, 4 ... at most 600."""
    return float(min(600, 2 ** retries))


def _connect(addresses: list[Address], port: int, timeout: float) -> socket.socket:
    """A connection to the first of the checked ``addresses`` that answers."""
    error: OSError = OSError("no address")
    for address in addresses:
        try:
            return socket.create_connection((str(address), port), timeout)
        except OSError as exc:
            error = exc
    raise error


class _PinnedHTTP(http.client.HTTPConnection):
    """Connects to the addresses that were checked, whatever the name resolves to by now."""

    def __init__(self, host: str, port: int, addresses: list[Address], timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._addresses = addresses

    def connect(self) -> None:
        self.sock = _connect(self._addresses, self.port, self.timeout)  # type: ignore[arg-type]


class _PinnedHTTPS(http.client.HTTPSConnection):
    """HTTPS to the checked addresses; the certificate is checked against the host name (SNI too)."""

    def __init__(self, host: str, port: int, addresses: list[Address], timeout: float) -> None:
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._addresses = addresses

    def connect(self) -> None:
        sock = _connect(self._addresses, self.port, self.timeout)  # type: ignore[arg-type]
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # type: ignore[attr-defined]


def deliver(url: str, body: bytes, policy: Policy, secret: bytes, timeout: float = 5.0,
            delivery: str = "") -> int:
    """POST ``body`` (JSON) to ``url``, signed. Returns the HTTP status (2xx).

    Raises
    ------
    WebhookRefused
        Not allowed (checked again here, after resolving the name), no secret, a redirect or
        another answer that a retry would not change.
    WebhookFailed
        A timeout (``timeout`` bounds the whole exchange), a refused connection, a 5xx, 408 or 429.
    """
    if not secret:
        raise WebhookRefused("PACSBRIDGE_WEBHOOK_SECRET is not set: webhooks are never sent unsigned")
    target, addresses = check_url(url, policy)
    cls = _PinnedHTTPS if target.scheme == "https" else _PinnedHTTP
    conn = cls(target.host, target.port, addresses, timeout)
    headers = {"Content-Type": "application/json", "User-Agent": "pacsbridge", EVENT_HEADER: "job.finished",
               DELIVERY_HEADER: delivery, SIGNATURE_HEADER: sign(body, secret)}
    expired = threading.Event()

    def cut() -> None:  # the deadline of the whole exchange: a receiver that drips its answer is cut off
        expired.set()
        sock = conn.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    timer = threading.Timer(timeout, cut)
    timer.daemon = True
    timer.start()
    try:
        conn.request("POST", target.path, body=body, headers=headers)
        response = conn.getresponse()
        response.read(MAX_ANSWER)
        status = response.status
    except (OSError, http.client.HTTPException) as exc:
        reason = f"no answer within {timeout:g} s" if expired.is_set() or isinstance(exc, TimeoutError) else \
            f"{type(exc).__name__}: {exc}"
        where = ", ".join(map(str, addresses))
        raise WebhookFailed(f"{target.host}:{target.port} ({where}): {reason}") from None
    finally:
        timer.cancel()
        conn.close()
    if 200 <= status < 300:
        return status
    if 300 <= status < 400:
        raise WebhookRefused(f"answered {status} (a redirect): redirects are not followed, fix the URL")
    if status >= 500 or status in (408, 429):
        raise WebhookFailed(f"answered {status}")
    raise WebhookRefused(f"answered {status}")
