"""Which addresses the downloader may connect to.

A URL taken from the web must not make a worker fetch from the machine it runs on or from
the network around it (cloud metadata at 169.254.169.254, a database on 10.0.0.5, Redis on
127.0.0.1). The host name is resolved once, every address it resolves to is checked, and the
connection goes to a checked address, so a second DNS answer cannot swap it (DNS rebinding).
"""
from __future__ import annotations

import ipaddress
import socket
from typing import Callable

# Same signature as socket.getaddrinfo; tests inject one that maps names to chosen addresses.
Resolver = Callable[..., list]


# Never fetched, even with allow_private (which is for local tests and LAN mirrors): nothing
# legitimate serves images from link-local (cloud metadata lives there), multicast, reserved
# or unspecified (0.0.0.0 reaches this machine) addresses.
ALWAYS_REFUSED = {"link-local", "multicast", "unspecified", "reserved"}


class AddressRefused(Exception):
    """The host resolves to an address the downloader must not reach."""


def address_kind(addr: str) -> str | None:
    """Why an address is off limits ("loopback", "private", ...), or None when it is public."""
    ip = ipaddress.ip_address(addr.split("%", 1)[0])  # drop an IPv6 zone id
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    for kind in ("loopback", "link_local", "multicast", "unspecified", "reserved", "private"):
        if getattr(ip, f"is_{kind}"):
            return kind.replace("_", "-")
    if not ip.is_global:  # shared address space (100.64.0.0/10) and other special ranges
        return "non-global"
    return None


def resolve(host: str, port: int, resolver: Resolver = socket.getaddrinfo) -> list[str]:
    """The distinct IP addresses `host` resolves to, in the resolver's order."""
    infos = resolver(host, port, type=socket.SOCK_STREAM)
    addrs: list[str] = []
    for family, _type, _proto, _canon, sockaddr in infos:
        if family in (socket.AF_INET, socket.AF_INET6) and sockaddr[0] not in addrs:
            addrs.append(sockaddr[0])
    if not addrs:
        raise OSError(f"{host} has no IPv4 or IPv6 address")
    return addrs


def checked_addresses(host: str, port: int, allow_private: bool,
                      resolver: Resolver = socket.getaddrinfo) -> list[str]:
    """Resolve `host` and refuse it when any of its addresses is not public.

    One bad address refuses the host: a name that mixes public and internal answers is
    exactly what a rebinding attack looks like. `allow_private` lets loopback and private
    ranges through, never ALWAYS_REFUSED.
    """
    addrs = resolve(host, port, resolver)
    for addr in addrs:
        kind = address_kind(addr)
        if kind is not None and (not allow_private or kind in ALWAYS_REFUSED):
            raise AddressRefused(f"refused: private address {addr} ({kind}) for host {host}")
    return addrs
