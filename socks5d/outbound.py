"""Outbound connections for CONNECT: resolve the target, try each address, map failures.

The one place where an OS error becomes an RFC 1928 reply code (`reply_for_error`).
Knows the `Address` record from protocol.py, nothing of the handshake.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable

from .protocol import Address, AddressType, Reply

# RFC 1928 §6 reply for each connect/resolve errno. A connect timeout is reported as
# HOST_UNREACHABLE (04): the host did not answer; TTL_EXPIRED (06) is reserved for the
# ICMP time-exceeded case the RFC names, which a TCP client socket cannot tell apart.
ERRNO_REPLIES: dict[int, Reply] = {
    errno.ECONNREFUSED: Reply.CONNECTION_REFUSED,
    errno.ENETUNREACH: Reply.NETWORK_UNREACHABLE,
    errno.ENETDOWN: Reply.NETWORK_UNREACHABLE,
    errno.EADDRNOTAVAIL: Reply.NETWORK_UNREACHABLE,
    errno.EHOSTUNREACH: Reply.HOST_UNREACHABLE,
    errno.EHOSTDOWN: Reply.HOST_UNREACHABLE,
    errno.ETIMEDOUT: Reply.HOST_UNREACHABLE,
    errno.EACCES: Reply.CONNECTION_NOT_ALLOWED,
    errno.EPERM: Reply.CONNECTION_NOT_ALLOWED,
    errno.EAFNOSUPPORT: Reply.ADDRESS_TYPE_NOT_SUPPORTED,
}


def reply_for_error(exc: BaseException) -> Reply:
    """The reply code for a failed resolve or connect; GENERAL_FAILURE when unknown."""
    if isinstance(exc, socket.gaierror):
        return Reply.HOST_UNREACHABLE  # DNS failure: the name does not lead to a host
    if isinstance(exc, TimeoutError | socket.timeout):
        return Reply.HOST_UNREACHABLE
    if isinstance(exc, OSError) and exc.errno is not None:
        return ERRNO_REPLIES.get(exc.errno, Reply.GENERAL_FAILURE)
    return Reply.GENERAL_FAILURE


SockAddr = tuple[socket.AddressFamily, tuple]
Resolver = Callable[[str, int], list[SockAddr]]


def system_resolver(host: str, port: int) -> list[SockAddr]:
    """getaddrinfo for a TCP target, in the order the system prefers."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    return [(family, sockaddr) for family, _, _, _, sockaddr in infos]


def resolve(address: Address, resolver: Resolver = system_resolver) -> list[SockAddr]:
    """Literal addresses skip DNS; names go through `resolver`."""
    if address.type is AddressType.IPV4:
        return [(socket.AF_INET, (address.host, address.port))]
    if address.type is AddressType.IPV6:
        return [(socket.AF_INET6, (address.host, address.port, 0, 0))]
    return resolver(address.host, address.port)


class ConnectFailed(Exception):
    """No address of the target accepted a connection; `reply` says why in RFC terms."""

    def __init__(self, reply: Reply, reason: str) -> None:
        super().__init__(reason)
        self.reply = reply
        self.reason = reason


def open_connection(
    address: Address, timeout: float, resolver: Resolver = system_resolver
) -> socket.socket:
    """Connect to `address`, trying every resolved address in turn, each within `timeout`."""
    try:
        candidates = resolve(address, resolver)
    except OSError as exc:
        raise ConnectFailed(reply_for_error(exc), f"resolve failed: {exc}") from None
    if not candidates:
        raise ConnectFailed(Reply.HOST_UNREACHABLE, "resolve returned no address")
    failure: BaseException | None = None
    for family, sockaddr in candidates:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(sockaddr)
            sock.settimeout(None)
            return sock
        except OSError as exc:
            sock.close()
            failure = exc
    assert failure is not None
    raise ConnectFailed(reply_for_error(failure), _describe(failure))


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError) and not getattr(exc, "errno", None):
        return "connect timed out"
    return f"connect failed: {getattr(exc, 'strerror', None) or exc}"
