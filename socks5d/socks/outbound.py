"""Outbound connections for CONNECT: resolve the target, race its addresses, map failures.

The one place where an OS error becomes an RFC 1928 reply code (`reply_for_error`). Connecting
follows Happy Eyeballs (RFC 8305): the resolved addresses are interleaved by family and raced
with staggered, non-blocking connects over one `select.poll`, so a dead first address costs
`attempt_delay`, not the whole connect timeout. Also the egress (source) address choice shared
with BIND (`OutgoingAddresses`, `egress_address`).

Names are resolved on the bounded lookup threads of lookups.py within a time limit
(`resolve`), and handed to getaddrinfo as the ASCII bytes the client sent
(`system_resolver`).

Knows the `Address` record from protocol.py and the lookup pool of lookups.py, nothing of the
handshake; imports nothing else of socks5d.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import select
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from ..core.addresses import parse_ip
from .lookups import LOOKUPS, LookupBusy, LookupPool, LookupTimedOut
from .protocol import Address, AddressType, Reply

logger = logging.getLogger(__name__)

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


def host_for_resolver(host: str) -> str | bytes:
    """The host as getaddrinfo should get it: an ASCII name as its bytes, untouched.

    Given a str, Python's socket module runs the name through its IDNA codec first, which
    refuses names the system resolver handles (a label over 63 characters, as in the long
    numeric forms of an IPv4 address). Names off the wire are ASCII already (protocol.py
    turns a UTF-8 name into its A-label form); a non-ASCII str from an embedding caller still
    goes through the codec.
    """
    return host.encode("ascii") if host.isascii() else host


def address_info(host: str, port: int, kind: socket.SocketKind, proto: int) -> list[SockAddr]:
    """getaddrinfo for `host` (as `host_for_resolver` gives it), in the order the system
    prefers, as (family, sockaddr) pairs."""
    infos = socket.getaddrinfo(host_for_resolver(host), port, type=kind, proto=proto)
    return [(family, sockaddr) for family, _, _, _, sockaddr in infos]


def system_resolver(host: str, port: int) -> list[SockAddr]:
    """getaddrinfo for a TCP target, in the order the system prefers."""
    return address_info(host, port, socket.SOCK_STREAM, socket.IPPROTO_TCP)


def resolve(
    address: Address,
    resolver: Resolver = system_resolver,
    *,
    timeout: float | None = None,
    lookups: LookupPool | None = None,
) -> list[SockAddr]:
    """Literal addresses skip DNS; names go through `resolver`.

    With a `timeout`, the lookup runs on the lookup pool (`lookups`, else the process-wide
    one) and raises LookupTimedOut past it, LookupBusy when the pool is full. Without one it
    runs in the calling thread, unbounded: only for callers that bound it some other way.
    """
    if address.type is AddressType.IPV4:
        return [(socket.AF_INET, (address.host, address.port))]
    if address.type is AddressType.IPV6:
        return [(socket.AF_INET6, (address.host, address.port, 0, 0))]
    if timeout is None:
        return resolver(address.host, address.port)
    pool = lookups if lookups is not None else LOOKUPS
    return pool.run(resolver, address.host, address.port, timeout=timeout)


Candidate = TypeVar("Candidate", bound=tuple)


def interleave(candidates: Sequence[Candidate]) -> list[Candidate]:
    """RFC 8305 §4: alternate address families, starting with the family of the first address.

    Each item's first element is its family; within a family the resolver's order is kept.
    More than two families (not seen in practice) are taken round-robin in order of first
    appearance.
    """
    by_family: dict[object, list[Candidate]] = {}
    for candidate in candidates:
        by_family.setdefault(candidate[0], []).append(candidate)
    queues = list(by_family.values())
    ordered: list[Candidate] = []
    for index in range(max((len(queue) for queue in queues), default=0)):
        ordered.extend(queue[index] for queue in queues if index < len(queue))
    return ordered


@dataclass(frozen=True, slots=True)
class OutgoingAddresses:
    """The source address to bind outbound sockets to, per family; None lets the kernel pick."""

    ipv4: str | None = None
    ipv6: str | None = None

    def for_family(self, family: socket.AddressFamily) -> str | None:
        if family == socket.AF_INET:
            return self.ipv4
        if family == socket.AF_INET6:
            return self.ipv6
        return None


# No source address configured: the OS picks per route. Frozen, so one shared default.
ANY_SOURCE = OutgoingAddresses()


def egress_address(
    target_ip: str, family: socket.AddressFamily, outgoing: OutgoingAddresses = ANY_SOURCE
) -> str:
    """The local address this host would use to reach target_ip: the configured outgoing address
    for that family if any, else the route lookup trick (a UDP socket connect() to
    (target_ip, 9) and getsockname(); no packet is sent). Unroutable → OSError."""
    configured = outgoing.for_family(family)
    if configured is not None:
        return configured
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        # connect() on a UDP socket only asks the routing table for a source address.
        probe.connect((target_ip, 9))  # 9: the discard port, in case anything is ever sent
        local: str = probe.getsockname()[0]
        return local


class ConnectFailed(Exception):
    """No address of the target accepted a connection; `reply` says why in RFC terms."""

    def __init__(self, reply: Reply, reason: str) -> None:
        super().__init__(reason)
        self.reply = reply
        self.reason = reason


# Linux: with a source address bound before connect(), pick the source port at connect()
# time (per 4-tuple) instead of at bind() time, so binding does not exhaust ephemeral ports.
_IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
# Linux, BSDs: create the socket non-blocking; elsewhere 0 and setblocking(False) after.
_SOCK_NONBLOCK: int = getattr(socket, "SOCK_NONBLOCK", 0)


def open_connection(
    address: Address,
    timeout: float,
    resolver: Resolver = system_resolver,
    *,
    attempt_delay: float = 0.25,
    outgoing: OutgoingAddresses = ANY_SOURCE,
    resolve_timeout: float | None = None,
) -> socket.socket:
    """Connect to `address` the Happy Eyeballs way (RFC 8305) within `timeout` overall,
    after resolving a name within `resolve_timeout` (None: `timeout` again).

    The resolved addresses are interleaved by family (`interleave`); the first attempt starts
    at once and each next one after `attempt_delay` seconds or as soon as the previous attempt
    fails, whichever comes first. The first connect to succeed wins and every other attempt is
    closed. Returns a blocking socket without a timeout. Raises ConnectFailed with the most
    informative failure (`most_informative_failure`) when no address accepts.
    """
    bound = timeout if resolve_timeout is None else resolve_timeout
    candidates = resolve_target(address, resolver, timeout=bound)
    return connect_any(candidates, timeout, attempt_delay=attempt_delay, outgoing=outgoing)


def numeric_host(name: str) -> bool:
    """Whether a resolver takes `name` as an address rather than a name to look up: an
    IP literal, or any inet_aton(3) spelling of IPv4 ("127.1", "0x7f.0.0.1",
    "2130706433"), a trailing root dot ignored. Such a "name" must be checked as the
    address it is before anyone else (a parent proxy) is handed it."""
    text = name.rstrip(".")
    try:
        parse_ip(text)
    except ValueError:
        pass
    else:
        return True
    try:
        socket.inet_aton(text)
    except (OSError, ValueError):
        return False
    return True


def resolve_target(
    address: Address,
    resolver: Resolver = system_resolver,
    *,
    timeout: float | None = None,
    lookups: LookupPool | None = None,
) -> list[SockAddr]:
    """`resolve`, with failures as ConnectFailed carrying their reply: a name that does not
    resolve, does not resolve in time, or cannot be looked up now (every lookup thread
    busy) is 04, host unreachable (RFC 1928 §6)."""
    try:
        candidates = resolve(address, resolver, timeout=timeout, lookups=lookups)
    except LookupTimedOut:
        raise ConnectFailed(Reply.HOST_UNREACHABLE, "resolve timed out") from None
    except LookupBusy as exc:
        raise ConnectFailed(Reply.HOST_UNREACHABLE, f"resolver busy: {exc}") from None
    except OSError as exc:  # gaierror, mostly
        raise ConnectFailed(reply_for_error(exc), f"resolve failed: {exc}") from None
    except ValueError as exc:  # UnicodeError: a name the IDNA codec refuses leads nowhere
        raise ConnectFailed(Reply.HOST_UNREACHABLE, f"resolve failed: {exc}") from None
    if not candidates:
        raise ConnectFailed(Reply.HOST_UNREACHABLE, "resolve returned no address")
    return candidates


def connect_any(
    candidates: list[SockAddr],
    timeout: float,
    *,
    attempt_delay: float = 0.25,
    outgoing: OutgoingAddresses = ANY_SOURCE,
    blocking: bool = True,
) -> socket.socket:
    """The Happy Eyeballs race of `open_connection` over addresses already resolved.

    `blocking=False` returns the socket non-blocking, as the race leaves it: a caller that
    relays next (which wants it non-blocking) saves two mode switches.
    """
    if not candidates:
        raise ConnectFailed(Reply.HOST_UNREACHABLE, "no address to connect to")
    racer = _Race(interleave(candidates), outgoing)
    try:
        winner = racer.run(timeout, attempt_delay)
    finally:
        racer.close()
    if winner is not None:
        if blocking:
            winner.settimeout(None)
        return winner
    raise connect_failed(racer.failures, racer.started, len(candidates))


def connect_failed(failures: Sequence[BaseException], tried: int, total: int) -> ConnectFailed:
    """The ConnectFailed for a connect where every attempt failed: the most informative
    failure decides the reply; the reason says how many addresses were tried."""
    failure = most_informative_failure(failures)
    counted = f"{tried} of {total}" if tried < total else f"{tried}"
    plural = "address" if total == 1 else "addresses"
    return ConnectFailed(
        reply_for_error(failure), f"{_describe(failure)} ({counted} {plural} tried)"
    )


def connect_error(sock: socket.socket, events: int) -> OSError | None:
    """How a non-blocking connect ended, once poll reported `events` for it: None when it
    connected, else its error (SO_ERROR; none recorded yet trouble reported: aborted)."""
    code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if code == 0 and events & select.POLLOUT:
        return None
    code = code or errno.ECONNABORTED
    return OSError(code, os.strerror(code))


def start_connect(
    family: socket.AddressFamily, sockaddr: tuple, outgoing: OutgoingAddresses = ANY_SOURCE
) -> tuple[socket.socket, bool]:
    """Start a non-blocking connect from the configured source address.

    Returns the socket and whether it connected at once (else it is in progress: wait for
    POLLOUT, then read SO_ERROR). Raises OSError, the socket closed, when it failed at once.
    """
    # Non-blocking from the start: one syscall fewer than setblocking(False).
    sock = socket.socket(family, socket.SOCK_STREAM | _SOCK_NONBLOCK)
    try:
        if not _SOCK_NONBLOCK:
            sock.setblocking(False)
        source = outgoing.for_family(family)
        if source is not None:
            if sys.platform == "linux":
                with contextlib.suppress(OSError):  # an optimisation only
                    sock.setsockopt(socket.SOL_IP, _IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((source, 0))
        code = sock.connect_ex(sockaddr)
    except BaseException:  # bind: EADDRNOTAVAIL; connect_ex raises for a bad address
        sock.close()
        raise
    if code == 0:
        return sock, True
    # POSIX: an interrupted connect() goes on asynchronously, as an EINPROGRESS one does.
    # (Not EAGAIN: for TCP on Linux that means no ephemeral port is left; a failure.)
    if code in (errno.EINPROGRESS, errno.EINTR):
        return sock, False
    sock.close()
    raise OSError(code, os.strerror(code))


class _Race:
    """The in-flight attempts of one `open_connection`: non-blocking sockets under one poll."""

    def __init__(self, queue: list[SockAddr], outgoing: OutgoingAddresses) -> None:
        self.queue = queue
        self.outgoing = outgoing
        self.poller = select.poll()
        self.in_flight: dict[int, tuple[socket.socket, tuple]] = {}
        self.failures: list[OSError] = []
        self.started = 0

    def run(self, timeout: float, attempt_delay: float) -> socket.socket | None:
        deadline = time.monotonic() + timeout
        next_start = 0.0  # when the next attempt may start even if none has failed
        while True:
            now = time.monotonic()
            if self.queue and (not self.in_flight or now >= next_start):
                if self.started and now >= deadline:
                    break  # out of time before the next address: it counts as not tried
                winner = self.start(*self.queue.pop(0))
                if winner is not None:
                    return winner
                next_start = now + attempt_delay
                continue
            if not self.in_flight:
                return None  # every address failed on its own
            remaining = deadline - now
            if remaining <= 0:
                break
            wait = min(remaining, next_start - now) if self.queue else remaining
            for fd, events in self.poller.poll(math.ceil(max(wait, 0.0) * 1000)):
                sock, sockaddr = self.in_flight.pop(fd)
                self.poller.unregister(fd)
                error = connect_error(sock, events)
                if error is None:
                    return sock
                sock.close()
                self.fail(sockaddr, error)
                next_start = now  # RFC 8305 §5: a failure starts the next attempt at once
        # The deadline passed with attempts still in flight (or none started in time).
        for _ in self.in_flight:
            self.failures.append(TimeoutError("connect timed out"))
        if not self.failures:
            self.failures.append(TimeoutError("connect timed out"))
        return None

    def start(self, family: socket.AddressFamily, sockaddr: tuple) -> socket.socket | None:
        """Start a non-blocking connect; the socket if it connected at once, else None."""
        self.started += 1
        try:
            sock, connected = start_connect(family, sockaddr, self.outgoing)
        except OSError as exc:
            self.fail(sockaddr, exc)
            return None
        if connected:
            return sock
        self.in_flight[sock.fileno()] = (sock, sockaddr)
        self.poller.register(sock, select.POLLOUT)  # POLLERR/POLLHUP are always reported
        return None

    def fail(self, sockaddr: tuple, exc: OSError) -> None:
        logger.debug("connect to %s failed: %s", sockaddr[0], exc)
        self.failures.append(exc)

    def close(self) -> None:
        """Close every attempt still in flight: the losers, or all of them on timeout."""
        for sock, _ in self.in_flight.values():
            sock.close()
        self.in_flight.clear()


def _is_timeout(exc: BaseException) -> bool:
    return isinstance(exc, TimeoutError) and getattr(exc, "errno", None) in (None, errno.ETIMEDOUT)


# Lower is more informative: a refusal proves the host is there; an ICMP unreachable or a
# policy refusal says where it broke; a timeout says only that nothing answered.
_INFORMATIVENESS: dict[Reply, int] = {
    Reply.CONNECTION_REFUSED: 0,
    Reply.NETWORK_UNREACHABLE: 1,
    Reply.HOST_UNREACHABLE: 1,
    Reply.CONNECTION_NOT_ALLOWED: 1,
}


def most_informative_failure(failures: Sequence[BaseException]) -> BaseException:
    """The failure to report when every address failed: refused > unreachable or not allowed >
    timeout > anything else (an unsupported family, an unknown errno); the first of a kind."""

    def rank(exc: BaseException) -> int:
        if _is_timeout(exc):
            return 2
        return _INFORMATIVENESS.get(reply_for_error(exc), 3)

    return min(failures, key=rank)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError) and not getattr(exc, "errno", None):
        return "connect timed out"
    return f"connect failed: {getattr(exc, 'strerror', None) or exc}"
