"""Who may talk to the DICOM node: an allow-list of peers (``AET@HOST``), the called-AE check and DICOM TLS.

Without an allow-list the node takes associations from any calling AE title on any host that reaches its port (the
open default; it binds to loopback for that reason). With one, a connection from a host on no entry is closed before
a byte is read, and an association is refused unless its calling AE title and address match one entry. The called AE
title must be this node's in either case. Peers are named in logs with control characters escaped.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from cxr_triage.core.safe_text import printable

ANY_AET = "*"
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_ENTRY = re.compile(r"^(?P<aet>[^@]{1,16})@(?P<host>\S+)$")
# A-ASSOCIATE-RJ diagnostics (PS3.8 9.3.4): refused permanently by the service user
CALLING_AET_NOT_RECOGNISED, CALLED_AET_NOT_RECOGNISED = 0x03, 0x07


def address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``host`` as an IP address (IPv4-mapped IPv6 as IPv4, any zone dropped); None if it is not one."""
    try:
        ip = ipaddress.ip_address(host.split("%")[0].strip("[]"))
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def peer_name(aet: str, host: str) -> str:
    """A peer for the log: ``AET@HOST`` with control characters escaped (an AE title comes from the network)."""
    return printable(f"{aet}@{host}")


@dataclass(frozen=True)
class AllowedPeer:
    """One allow-list entry: an AE title (or ``*``, any) from one host or network."""

    aet: str
    network: Network

    def matches_host(self, host: str) -> bool:
        ip = address(host)
        return ip is not None and ip.version == self.network.version and ip in self.network

    def matches(self, aet: str, host: str) -> bool:
        return self.aet in (ANY_AET, aet.strip()) and self.matches_host(host)


def _networks(host: str, text: str) -> list[Network]:
    """An IP address, a network (``10.0.0.0/24``) or a host name (resolved now, every address it has)."""
    try:
        return [ipaddress.ip_network(host.strip("[]"), strict=False)]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        raise ValueError(f"{text!r}: host {host!r} does not resolve; give its IP address instead") from None
    found = {address(str(info[4][0])) for info in infos}
    return [ipaddress.ip_network(ip) for ip in found if ip is not None]


def parse_allowed(text: str) -> list[AllowedPeer]:
    """``AET@HOST`` (HOST: an IP address, a network such as 10.0.0.0/24, or a host name; AET ``*``: any AE title)
    -> allow-list entries; ValueError saying the expected form."""
    m = _ENTRY.match(text.strip())
    if not m or not m["aet"].strip() or "\\" in m["aet"] or not m["aet"].isprintable():
        raise ValueError(
            f"{text!r} is not AET@HOST (e.g. MODALITY1@10.0.0.5 or *@10.0.0.0/24; an AE title has 1-16 chars)"
        )
    return [AllowedPeer(m["aet"].strip(), net) for net in _networks(m["host"], text)]


def read_allow_file(path: Path) -> list[str]:
    """The entries of an allow-list file: one ``AET@HOST`` a line; blank lines and ``#`` comments are skipped."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read the allow-list {path} ({type(exc).__name__}); give a UTF-8 text file") from None
    entries = [line.split("#", 1)[0].strip() for line in lines]
    return [e for e in entries if e]


class Access:
    """The node's rules for peers: its own AE title and the allow-list (``None``: open to any peer)."""

    def __init__(self, aet: str, allowed: list[AllowedPeer] | None = None) -> None:
        self.aet, self.allowed = aet.strip(), allowed

    @classmethod
    def from_entries(cls, aet: str, entries: list[str]) -> Access:
        """From ``--allow`` values and allow-file lines; no entries: open."""
        return cls(aet, [p for e in entries for p in parse_allowed(e)] if entries else None)

    @property
    def is_open(self) -> bool:
        return self.allowed is None

    def host_allowed(self, host: str) -> bool:
        """May a connection from ``host`` be read at all?"""
        return self.allowed is None or any(p.matches_host(host) for p in self.allowed)

    def refusal(self, calling: str, called: str, host: str) -> tuple[int, str] | None:
        """(A-ASSOCIATE-RJ diagnostic, reason) for an association this node refuses; None when it is welcome."""
        if called.strip() != self.aet:
            return CALLED_AET_NOT_RECOGNISED, f"called AE title {printable(called.strip())!r} is not this node's"
        if self.allowed is not None and not any(p.matches(calling, host) for p in self.allowed):
            return CALLING_AET_NOT_RECOGNISED, "calling AE title and address are on no allow-list entry"
        return None


def tls_context(cert: Path, key: Path, ca: Path | None = None) -> ssl.SSLContext:
    """A server context for DICOM TLS (TLS 1.2 or later): this node's certificate and key; with ``ca``, every peer
    must present a certificate signed by it."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
        if ca is not None:
            context.load_verify_locations(cafile=ca)
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(
            f"cannot load the TLS certificate, key or CA ({type(exc).__name__}: {exc}); give PEM files that match"
        ) from None
    return context
