"""IP addresses: parsing, unmapping and formatting, in one place for every layer.

Pure functions, stdlib only, no sockets (``protocol`` imports this). One spelling per IP
for comparisons (:func:`canonical_ip`), one rule for IPv4-mapped IPv6 (:func:`unmapped`),
one ``host:port`` format (:func:`format_host_port`), and the key every per-client
structure counts under (:func:`client_key`): an IPv6 client is counted by its network
(/64 by default), since one host is routinely given a whole /64 and could otherwise
spread itself over 2**64 addresses, each with a fresh budget.

The parsers are cached: they run on every accept, request and datagram with few distinct
addresses, and ``ipaddress`` parsing costs ~10 us a call.
"""

from __future__ import annotations

import functools
import ipaddress
from typing import Any

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: limits.ipv6_client_prefix default: one IPv6 "client" is one /64 (RFC 4291 §2.5.1,
#: the usual size handed to a single host or LAN).
DEFAULT_IPV6_CLIENT_PREFIX = 64


def strip_brackets(host: str) -> str:
    """``"[::1]"`` -> ``"::1"`` (the URL and config spelling of an IPv6 host, RFC 3986
    §3.2.2); anything else as it is."""
    if host.startswith("[") and host.endswith("]"):
        return host[1:-1]
    return host


@functools.lru_cache(maxsize=8192)
def parse_ip(text: str) -> IPAddress:
    """An IP literal in any spelling: brackets and an IPv6 zone (``"fe80::1%eth0"``, RFC
    4007 §11) are dropped. Raises ValueError for anything that is not an IP address."""
    return ipaddress.ip_address(strip_brackets(text).partition("%")[0])


def unmapped(ip: IPAddress) -> IPAddress:
    """An IPv4-mapped IPv6 address (``::ffff:192.0.2.1``, RFC 4291 §2.5.5.2: what a
    dual-stack socket reports for an IPv4 peer) as the IPv4 address it is; others as they
    are."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


@functools.lru_cache(maxsize=8192)
def canonical_ip(text: str) -> str:
    """One spelling per IP, to compare addresses by value: unmapped, without brackets or
    zone, IPv6 compressed as RFC 5952 says. Text that is not an IP address (a host name,
    a Unix socket path) is returned as it is."""
    try:
        return str(unmapped(parse_ip(text)))
    except ValueError:
        return text


@functools.lru_cache(maxsize=8192)
def unmapped_host(host: str) -> str:
    """A socket address's host with an IPv4-mapped address unmapped, otherwise untouched:
    an IPv6 zone stays, so the result can still be bound or connected to. Cached: every
    accept asks it of the client's host (a C-level call when cached)."""
    canonical = canonical_ip(host)
    return canonical if ":" not in canonical else host


def client_ip(client_address: Any) -> str:
    """The client's IP as text from its socket address (or a bare host): IPv4-mapped IPv6
    (dual-stack listeners) unmapped, see :func:`unmapped_host`."""
    if type(client_address) is tuple and type(client_address[0]) is str:
        return unmapped_host(client_address[0])  # a socket's address: the usual case
    host = client_address[0] if isinstance(client_address, tuple) else client_address
    return unmapped_host(str(host))


@functools.lru_cache(maxsize=8192)
def client_key(ip: str, ipv6_prefix: int = DEFAULT_IPV6_CLIENT_PREFIX) -> str:
    """The key per-client limits and back-off count under.

    IPv4 (and IPv4-mapped IPv6) addresses are themselves; an IPv6 address is its
    `ipv6_prefix` network ("2001:db8:1:2::/64"). Cached: called on every accept and
    every login, with few distinct clients.
    """
    try:
        address = unmapped(parse_ip(ip))
    except ValueError:
        return ip  # not an address (a Unix socket path, a test double): itself
    if isinstance(address, ipaddress.IPv6Address) and ipv6_prefix < 128:
        return str(ipaddress.IPv6Network((int(address), ipv6_prefix), strict=False))
    return str(address)


def format_host_port(host: str, port: int) -> str:
    """host:port, with brackets around an IPv6 host ("[::1]:1080", RFC 3986 §3.2.2)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def format_address(address: Any) -> str:
    """A socket address as host:port for a log line, IPv4-mapped hosts unmapped (see
    :func:`unmapped_host`, :func:`format_host_port`); anything else (a Unix socket path)
    as str()."""
    if isinstance(address, tuple) and len(address) >= 2:
        return format_host_port(unmapped_host(str(address[0])), address[1])
    return str(address)
