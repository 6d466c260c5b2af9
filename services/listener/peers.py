"""Which DICOM peers may store to us: ``PACSBRIDGE_ALLOWED_PEERS`` and the configured nodes.

A comma-separated list of ``AETITLE`` or ``AETITLE@address`` where the
address is an IP or a network (``10.1.2.0/24``); ``*`` alone allows every
peer (for a first try only), ``*@address`` any calling AE title from that
address (``pacsbridge serve``: ``*@127.0.0.1``). Empty allows nobody.
"""

from __future__ import annotations

import ipaddress
from typing import NamedTuple

from pacsbridge.shared.core.errors import ConfigError

__all__ = ["Peers", "parse_peers", "with_nodes", "ANY_AE"]

#: ``*@address``: any calling AE title, from that address only.
ANY_AE = "*"


class Peers(NamedTuple):
    any_peer: bool
    rules: dict[str, list[ipaddress.IPv4Network | ipaddress.IPv6Network]]  # AE -> networks ([] = any address)

    def ae_titles(self) -> list[str]:
        return sorted(self.rules)

    def calling_aets(self) -> list[str]:
        """pynetdicom's ``require_calling_aet``: [] accepts any title (checked with the address once accepted)."""
        if self.any_peer or ANY_AE in self.rules:
            return []
        # an empty list would mean "anyone" to pynetdicom: keep a title no one can send
        return self.ae_titles() or ["\x7fNOBODY"[:16]]

    def allows(self, ae_title: str, address: str) -> bool:
        if self.any_peer:
            return True
        nets = self.rules.get(ae_title.strip())
        if self._from(nets, address):
            return True
        return self._from(self.rules.get(ANY_AE), address)

    @staticmethod
    def _from(nets: list | None, address: str) -> bool:
        if nets is None:
            return False
        if not nets:
            return True
        forms = _forms(address)
        return any(ip in net for ip in forms for net in nets)

    def address_known(self, address: str) -> bool:
        """Could any peer connect from ``address``? (checked before the association)"""
        if self.any_peer or any(not nets for nets in self.rules.values()):
            return True
        forms = _forms(address)
        return any(ip in net for ip in forms for nets in self.rules.values() for net in nets)


def _forms(address: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """``address`` as the rules may name it: an IPv4 peer of a dual-stack listener ("::") arrives as
    ``::ffff:a.b.c.d``, which matches its IPv4 rules too. [] when it is no address."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return []
    mapped = getattr(ip, "ipv4_mapped", None)
    return [ip, mapped] if mapped is not None else [ip]


def parse_peers(text: str) -> Peers:
    """Parse ``PACSBRIDGE_ALLOWED_PEERS``; raises :class:`ConfigError` on a bad entry."""
    text = (text or "").strip()
    if text == "*":
        return Peers(True, {})
    rules: dict[str, list] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        ae, _, addr = item.partition("@")
        ae = ae.strip()
        if not ae or len(ae) > 16 or "\\" in ae:
            raise ConfigError(f"PACSBRIDGE_ALLOWED_PEERS: bad AE title in {item!r}")
        if ae == ANY_AE and not addr.strip():
            raise ConfigError(f"PACSBRIDGE_ALLOWED_PEERS: {item!r} in a list needs an address (*@127.0.0.1); "
                              "* alone allows every peer")
        nets = rules.setdefault(ae, [])
        if addr:
            try:
                nets.append(ipaddress.ip_network(addr.strip(), strict=False))
            except ValueError:
                raise ConfigError(f"PACSBRIDGE_ALLOWED_PEERS: bad address in {item!r}") from None
    return Peers(False, rules)


def with_nodes(peers: Peers, nodes: list[tuple[str, str]]) -> Peers:
    """``peers`` plus each node's ``(AE title, host)``: a PACS we retrieve from sends its
    C-MOVE sub-operations as that AE, from that host (names resolved to addresses here).
    A node whose host does not resolve is left out, with a warning."""
    import logging
    import socket

    if peers.any_peer:
        return peers
    rules = {ae: list(nets) for ae, nets in peers.rules.items()}
    for ae, host in nodes:
        try:
            addresses = {info[4][0] for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)}
        except OSError as exc:
            logging.getLogger(__name__).warning("node %s@%s left out of the allowed peers: %s", ae, host, exc)
            continue
        nets = rules.setdefault(ae.strip(), [])
        if nets or ae.strip() not in peers.rules:  # an AE allowed from anywhere stays so
            nets.extend(ipaddress.ip_network(a) for a in sorted(addresses))
    return Peers(False, rules)
