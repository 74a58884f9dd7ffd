"""IP address helpers shared by the core, the policy and the SOCKS layers.

Pure functions, stdlib only. They answer "which client is this?" for every per-client
structure (connection counts, login back-off): an IPv6 client is counted by its network
(/64 by default), since one host is routinely given a whole /64 and could otherwise
spread itself over 2**64 addresses, each with a fresh budget.
"""

from __future__ import annotations

import functools
import ipaddress

#: limits.ipv6_client_prefix default: one IPv6 "client" is one /64 (RFC 4291 §2.5.1,
#: the usual size handed to a single host or LAN).
DEFAULT_IPV6_CLIENT_PREFIX = 64


@functools.lru_cache(maxsize=8192)
def client_key(ip: str, ipv6_prefix: int = DEFAULT_IPV6_CLIENT_PREFIX) -> str:
    """The key per-client limits and back-off count under.

    IPv4 (and IPv4-mapped IPv6) addresses are themselves; an IPv6 address is its
    `ipv6_prefix` network ("2001:db8:1:2::/64"). Cached: called on every accept and
    every login, with few distinct clients.
    """
    text = ip.strip("[]").partition("%")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return ip  # not an address (a Unix socket path, a test double): itself
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        if ipv6_prefix >= 128:
            return str(address)
        network = ipaddress.IPv6Network((int(address), ipv6_prefix), strict=False)
        return str(network)
    return str(address)


def format_host_port(host: str, port: int) -> str:
    """host:port, with brackets around an IPv6 host ("[::1]:1080")."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
