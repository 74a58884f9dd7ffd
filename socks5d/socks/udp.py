"""The UDP ASSOCIATE datagram relay (RFC 1928 §7) for the life of one TCP control connection.

Owns :func:`open_udp_endpoint` (the client-facing UDP socket whose address goes into the
success reply) and :func:`serve_association` (one ``select.poll`` loop in the handler's thread
that relays datagrams until the control connection ends), with its record
:class:`UdpStats`. Source addresses come as :class:`socks5d.socks.outbound.OutgoingAddresses`.

Client → remote: each datagram carries the RFC 1928 §7 header ``RSV FRAG ATYP DST.ADDR
DST.PORT`` in front of its payload; the header is checked and stripped, the destination
resolved (names through a small cache) and the payload sent from a remote-facing socket (one per
address family). Remote → client: the payload is wrapped in the same header naming the sender
and sent to the client's UDP address. Datagrams that fail a check are dropped and counted, never
answered: UDP has no error channel, and the RFC asks a relay to drop silently.

A name is looked up off the loop, on the bounded threads of ``socks5d.socks.lookups``, within
``resolve_timeout``: while it resolves, its datagrams wait in a small queue (past it they are
dropped) and every other destination keeps flowing; a lookup that times out drops what waited
for it. A resolver that never answers thus costs the datagrams to that one name, not the
association.

Filtering is on the client side only: any remote may answer through the relay's remote-facing
sockets once the client has used them (what NAT people call "full cone"), which is what
peer-to-peer and DNS-over-several-servers clients need. Access rules for destinations come in
through the ``allow`` callback.

It imports the standard library, ``socks5d.socks.protocol`` (the wire format),
``socks5d.core.addresses``, the lookup pool of ``socks5d.socks.lookups`` and the
``OutgoingAddresses`` record and getaddrinfo wrapper of ``socks5d.socks.outbound``; it must
not import the handler or the server, so it can be tested without a running proxy. The
caller owns and closes the control socket; ``serve_association`` closes every UDP socket,
the endpoint included.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from ..core.addresses import canonical_ip, unmapped_host
from .lookups import LOOKUPS, LookupBusy, LookupPool
from .outbound import ANY_SOURCE, OutgoingAddresses, address_info
from .protocol import Address, AddressType, ProtocolError, encode_udp_datagram, parse_udp_datagram

__all__ = [
    "Resolver",
    "UdpStats",
    "open_udp_endpoint",
    "serve_association",
    "system_resolver",
]

logger = logging.getLogger(__name__)

SockAddr = tuple[socket.AddressFamily, tuple[Any, ...]]
#: Same shape as ``socks5d.socks.outbound.system_resolver``: getaddrinfo → [(family, sockaddr)].
Resolver = Callable[[str, int], list[SockAddr]]

# The largest UDP payload is 65535 - 8 (UDP header) bytes; a 64 KiB buffer never truncates.
_MAX_DATAGRAM = 65536
# RFC 1928 §7: RSV(2) FRAG(1) ATYP(1) + an IPv6 address(16) + PORT(2): the longest header the
# relay writes in front of a remote's datagram (senders are always IP addresses, never names).
_HEADER_ROOM = 2 + 1 + 1 + 16 + 2
# Datagrams one socket may deliver per wake-up before the loop looks at the others (and at the
# control connection): saves poll calls under load without starving anyone.
_BATCH = 64
# Bounds on the per-association caches (a client can name any number of destinations).
_DNS_CACHE_SIZE = 256
_HEADER_CACHE_SIZE = 256
# A failed or timed-out lookup is remembered briefly: a client retrying an unresolvable name
# every millisecond must not turn into one DNS query (and one lookup thread) per datagram.
_NEGATIVE_CACHE_SECONDS = 5.0
# Names one association may have being looked up at once; a datagram to another new name is
# dropped meanwhile. Keeps one client from taking the process-wide lookup threads.
_PENDING_NAMES = 8
# Datagrams that wait for their name to resolve: per name, and in bytes per association.
_QUEUED_PER_NAME = 8
_QUEUED_BYTES = 256 * 1024
# errno values from the control socket that mean "the client went away", not an error.
_GONE_ERRNOS = frozenset({errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED, errno.ETIMEDOUT})

_POLLIN = select.POLLIN
_POLLERR = select.POLLERR
_POLLHUP = select.POLLHUP
_POLLNVAL = select.POLLNVAL
_IP_FAMILIES = (socket.AF_INET, socket.AF_INET6)


@dataclass(slots=True)
class UdpStats:
    """What one association did, for the access log."""

    datagrams_up: int = 0  # client → remote, forwarded
    datagrams_down: int = 0  # remote → client, forwarded
    bytes_up: int = 0  # payload bytes, without the SOCKS header
    bytes_down: int = 0
    # Bad header, FRAG != 0, foreign source, unresolvable, denied, send error, or a remote's
    # datagram before the client's address is known.
    dropped: int = 0
    dropped_down: int = 0  # of those, datagrams from a remote (the rest came from the client)
    end: str = ""  # "control closed", "idle timeout", "aborted" or "error: ..."


def system_resolver(host: str, port: int) -> list[SockAddr]:
    """getaddrinfo for a UDP destination, in the order the system prefers."""
    return address_info(host, port, socket.SOCK_DGRAM, socket.IPPROTO_UDP)


@dataclass(slots=True)
class _Lookup:
    """A name being resolved for an association, and the datagrams waiting for it."""

    future: Future[list[SockAddr]]
    deadline: float
    queued: list[tuple[Address, bytes]] = field(default_factory=list)


def open_udp_endpoint(local_ip: str, port_range: tuple[int, int] | None = None) -> socket.socket:
    """The client-facing UDP socket, bound on ``local_ip``.

    ``local_ip`` is the address the client reached us on (the control connection's
    ``getsockname()[0]``), so the client can reach the endpoint the same way; an IPv4-mapped
    ``::ffff:a.b.c.d`` (a dual-stack listener) becomes an AF_INET socket on ``a.b.c.d``. The port
    is chosen by the OS, or is the first free one in ``port_range`` (inclusive). Raises OSError
    when no port is free, ValueError for a range outside 1..65535.
    """
    host = unmapped_host(local_ip)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if port_range is None:
        ports: range = range(0, 1)
    else:
        low, high = port_range
        if not 1 <= low <= high <= 0xFFFF:
            raise ValueError(f"invalid UDP port range {low}-{high}")
        ports = range(low, high + 1)
    for port in ports:
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            # EACCES: a privileged port in the range; try the next one like a busy port.
            if port_range is not None and exc.errno in (errno.EADDRINUSE, errno.EACCES):
                continue
            raise
        return sock
    raise OSError(errno.EADDRINUSE, f"no free UDP port in {ports.start}-{ports.stop - 1} on {host}")


def serve_association(
    control: socket.socket,
    endpoint: socket.socket,
    client_ip: str,
    expected: Address,
    *,
    idle_timeout: float | None = 120.0,
    outgoing: OutgoingAddresses = ANY_SOURCE,
    resolver: Resolver | None = None,
    allow: Callable[[Address, tuple[Any, ...] | None], bool] | None = None,
    dns_cache_seconds: float = 30.0,
    resolve_timeout: float = 10.0,
    lookups: LookupPool | None = None,
) -> UdpStats:
    """Relay datagrams between the client and remotes until the control connection ends.

    Run it after the success reply (whose BND is ``endpoint.getsockname()``) has been sent.
    ``client_ip`` is the control connection's peer IP: RFC 1928 §7 has the relay drop datagrams
    from any other source IP. ``expected`` is the request's DST.ADDR/DST.PORT, the address the
    client says it will send from; a zero port means "not known". ``allow(address, sockaddr)``
    returning False drops a datagram (access rules); for a domain name it is first asked with
    ``sockaddr`` None, so a name denied outright is never looked up. Returns when the control
    connection closes or is shut down, or after ``idle_timeout`` seconds without a datagram
    either way (None: never).
    Bad datagrams are dropped and counted; nothing a peer sends makes this raise.

    Names are resolved on ``lookups`` (default: the process-wide pool), each within
    ``resolve_timeout`` seconds, and cached for ``dns_cache_seconds``.

    ``control`` is left open (its timeout restored); the endpoint and every UDP socket opened
    here are closed, so the port is free again when this returns.
    """
    if idle_timeout is not None and idle_timeout <= 0:
        endpoint.close()  # the promise holds even for a bad call: the port is freed
        raise ValueError(f"idle_timeout must be positive or None, not {idle_timeout}")
    association = _Association(
        control,
        endpoint,
        client_ip,
        expected,
        idle_timeout=idle_timeout,
        outgoing=outgoing,
        resolver=resolver or system_resolver,
        allow=allow,
        dns_cache_seconds=dns_cache_seconds,
        resolve_timeout=resolve_timeout,
        lookups=lookups if lookups is not None else LOOKUPS,
    )
    saved_timeout = control.gettimeout()
    try:
        association.stats.end = association.run()
    except Exception as exc:  # a bug here must end one association, not the handler thread
        logger.exception("UDP association failed")
        association.stats.end = f"error: {exc}"
    finally:
        association.close()
        with contextlib.suppress(OSError):  # closed by someone else meanwhile
            control.settimeout(saved_timeout)
    stats = association.stats
    logger.debug(
        "UDP association ended: %s, up %d datagrams/%d bytes, down %d datagrams/%d bytes, "
        "dropped %d",
        stats.end,
        stats.datagrams_up,
        stats.bytes_up,
        stats.datagrams_down,
        stats.bytes_down,
        stats.dropped,
    )
    return stats


class _Association:
    """The state of one association; :meth:`run` is the poll loop."""

    def __init__(
        self,
        control: socket.socket,
        endpoint: socket.socket,
        client_ip: str,
        expected: Address,
        *,
        idle_timeout: float | None,
        outgoing: OutgoingAddresses,
        resolver: Resolver,
        allow: Callable[[Address, tuple[Any, ...] | None], bool] | None,
        dns_cache_seconds: float,
        resolve_timeout: float,
        lookups: LookupPool,
    ) -> None:
        self.stats = UdpStats()
        self.control = control
        self.endpoint = endpoint
        self.idle_timeout = idle_timeout
        self.outgoing = outgoing
        self.resolver = resolver
        self.allow = allow
        self.dns_cache_seconds = max(0.0, dns_cache_seconds)
        self.resolve_timeout = resolve_timeout
        self.lookups = lookups
        self.poller = select.poll()
        self.registered: list[int] = []

        # RFC 1928 §7: "It MUST drop any datagrams arriving from any source IP address other
        # than the one recorded for the particular association."
        self.client_ip = canonical_ip(client_ip)
        # RFC 1928 §7: DST.ADDR/DST.PORT of the request are where the client expects to send
        # from; "The server MAY use this information to limit access to the association."
        # All zeros means the client did not know yet. The host is only checked together with a
        # non-zero port (a client that names its port knows which host it sends from).
        self.expected_port = expected.port
        self.expected_ip: str | None = None
        if expected.port and expected.type is not AddressType.DOMAINNAME:
            host = canonical_ip(expected.host)
            if host not in ("0.0.0.0", "::"):
                self.expected_ip = host
        # The client's UDP address, fixed by its first accepted datagram: where replies go, and
        # the only source accepted from then on.
        self.client_addr: tuple[Any, ...] | None = None
        self.client_key: tuple[str, int] | None = None

        # Remote-facing sockets, one per address family, opened on first use.
        self.remotes: dict[int, socket.socket] = {}  # family → socket
        self.remote_fds: dict[int, socket.socket] = {}  # fd → socket

        # Preallocated buffers, reused for every datagram. A remote's payload is received
        # _HEADER_ROOM bytes in, so its header is written in front without copying the payload.
        self.client_buf = bytearray(_MAX_DATAGRAM)
        self.client_view = memoryview(self.client_buf)
        self.remote_buf = bytearray(_HEADER_ROOM + _MAX_DATAGRAM)
        self.remote_view = memoryview(self.remote_buf)
        self.remote_payload = self.remote_view[_HEADER_ROOM:]

        # (host, port) → (expiry, candidates); insertion-ordered, the oldest evicted first.
        self.dns: dict[tuple[str, int], tuple[float, tuple[SockAddr, ...]]] = {}
        # (ip, port) of a remote → the RFC 1928 §7 header naming it.
        self.headers: dict[tuple[str, int], bytes] = {}
        # (host, port) → its lookup in progress, and what waits for it.
        self.pending: dict[tuple[str, int], _Lookup] = {}
        self.queued_bytes = 0
        # A socket pair a finished lookup writes a byte to, to wake the poll loop; made on
        # the first lookup. The lock keeps a worker from writing to it as it is closed.
        self.wake_lock = threading.Lock()
        self.wake_in: socket.socket | None = None
        self.wake_out: socket.socket | None = None

    # --- the loop -------------------------------------------------------------------------

    def run(self) -> str:
        if self.control.fileno() < 0:
            return "control closed"
        self.control.setblocking(False)
        self.endpoint.setblocking(False)
        self.watch(self.control)
        self.watch(self.endpoint)
        control_fd = self.control.fileno()
        endpoint_fd = self.endpoint.fileno()
        last_activity = time.monotonic()
        while True:
            now = time.monotonic()
            # Recomputed on every pass, so wake-ups that bring nothing from the client or a
            # remote (foreign datagrams, bytes on the control connection) never stretch it.
            if self.idle_timeout is not None and now >= last_activity + self.idle_timeout:
                return "idle timeout"
            ready = dict(self.poller.poll(self.wait_ms(now, last_activity)))
            # The control connection first: once it has ended, nothing more is forwarded.
            event = ready.pop(control_fd, 0)
            if event:
                end = self.serve_control(event)
                if end is not None:
                    return end
            if self.wake_in is not None and ready.pop(self.wake_in.fileno(), 0):
                self.drain_wake_ups()
            if self.pending:
                # Before new datagrams: what waited for a name goes out first.
                self.tend_lookups(time.monotonic())
            active = False
            for fd, event in ready.items():
                sock = self.endpoint if fd == endpoint_fd else self.remote_fds[fd]
                if event & _POLLNVAL:
                    return "error: a UDP socket was closed under the association"
                if event & _POLLHUP:
                    # UDP reports POLLHUP only after shutdown(SHUT_RDWR): someone aborted us.
                    return "aborted"
                if event & _POLLERR:
                    self.clear_error(sock)
                if event & _POLLIN:
                    if sock is self.endpoint:
                        active |= self.from_client()
                    else:
                        active |= self.from_remote(sock)
            if active:
                last_activity = time.monotonic()

    def wait_ms(self, now: float, last_activity: float) -> int | None:
        """How long poll may wait: until the idle timeout, or the deadline of the oldest
        lookup still running (to give up on it in time); None: for ever."""
        deadlines = [lookup.deadline for lookup in self.pending.values()]
        if self.idle_timeout is not None:
            deadlines.append(last_activity + self.idle_timeout)
        if not deadlines:
            return None
        return math.ceil(max(min(deadlines) - now, 0.0) * 1000)

    def watch(self, sock: socket.socket) -> None:
        self.poller.register(sock.fileno(), _POLLIN)
        self.registered.append(sock.fileno())

    def close(self) -> None:
        for fd in self.registered:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self.poller.unregister(fd)
        for sock in (*self.remotes.values(), self.endpoint):
            sock.close()
        for lookup in self.pending.values():
            self.stats.dropped += len(lookup.queued)  # their name never resolved in time
            lookup.future.cancel()  # only if it has not started; else it runs out unwatched
        self.pending.clear()
        with self.wake_lock:
            for wake in (self.wake_in, self.wake_out):
                if wake is not None:
                    wake.close()
            self.wake_in = self.wake_out = None

    def serve_control(self, event: int) -> str | None:
        """Read and discard what the client sends on the control connection; say if it ended."""
        if event & _POLLNVAL:
            return "error: control connection closed under the association"
        if event & _POLLERR:
            code = self.control.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code == 0 or code in _GONE_ERRNOS:
                return "control closed"
            return f"error: control: {os.strerror(code)}"
        if event & _POLLHUP:
            # A client's FIN only shuts our read half (POLLIN, then EOF); both halves shut
            # without an error means a local shutdown(SHUT_RDWR): the server aborting us.
            return "aborted"
        try:
            data = self.control.recv(4096)
        except BlockingIOError:
            return None
        except OSError as exc:
            if exc.errno in _GONE_ERRNOS:
                return "control closed"
            return f"error: control: {exc.strerror or exc}"
        if not data:
            # RFC 1928 §7: "A UDP association terminates when the TCP connection that the UDP
            # ASSOCIATE request arrived on terminates."
            return "control closed"
        logger.debug("discarded %d bytes the client sent on the UDP control connection", len(data))
        return None

    def clear_error(self, sock: socket.socket) -> None:
        """Read a pending socket error (an ICMP report for an earlier datagram) so poll stops
        reporting it; the datagram it concerns was already counted."""
        code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            logger.debug("UDP socket error reported: %s", os.strerror(code))

    def drop(self, reason: str, *args: object, down: bool = False) -> None:
        """Count a datagram dropped (``down``: one a remote sent to the client)."""
        self.stats.dropped += 1
        if down:
            self.stats.dropped_down += 1
        logger.debug("dropped a datagram: " + reason, *args)

    # --- client → remote --------------------------------------------------------------------

    def from_client(self) -> bool:
        """Forward what the client sent; True if a datagram came from the client."""
        active = False
        for _ in range(_BATCH):
            try:
                n, source = self.endpoint.recvfrom_into(self.client_buf)
            except BlockingIOError:
                break
            except OSError as exc:  # an ICMP error reported late; the next datagram is fine
                logger.debug("UDP endpoint receive failed: %s", exc)
                break
            if not self.from_the_client(source):
                self.drop("foreign source %s", source)
                continue
            active = True
            try:
                # RFC 1928 §7: RSV(2) FRAG(1) ATYP DST.ADDR DST.PORT DATA.
                datagram = parse_udp_datagram(self.client_view[:n])
            except ProtocolError as exc:
                self.drop("bad header from %s: %s", source, exc.message)
                continue
            if datagram.frag != 0:
                # RFC 1928 §7: "An implementation that does not support fragmentation MUST drop
                # any datagram whose FRAG field is other than X'00'."
                self.drop("FRAG %d from %s (fragments are not reassembled)", datagram.frag, source)
                continue
            if self.client_addr is None:
                self.client_addr = source
                self.client_key = (source[0], source[1])
                logger.debug("UDP client address is %s", source)
            self.forward(datagram.address, datagram.data)
        return active

    def from_the_client(self, source: tuple[Any, ...]) -> bool:
        if self.client_key is not None:
            # Fixed by the first datagram: another process on the client's host cannot join.
            return (source[0], source[1]) == self.client_key
        ip = source[0]
        if ip != self.client_ip and canonical_ip(ip) != self.client_ip:
            return False
        if self.expected_port and source[1] != self.expected_port:
            return False
        return self.expected_ip is None or canonical_ip(ip) == self.expected_ip

    def forward(self, address: Address, data: bytes) -> None:
        if address.type is not AddressType.DOMAINNAME:
            self.send_out(address, self.literal_destinations(address), data)
            return
        if self.allow is not None and not self.allow(address, None):
            # Denied by name whatever it resolves to: no DNS lookup for it.
            self.drop("destination %s denied", address)
            return
        key = (address.host, address.port)
        lookup = self.pending.get(key)
        if lookup is not None and lookup.future.done():
            self.settle(key, lookup)  # the datagrams that waited go before this one
            lookup = None
        if lookup is not None:
            self.enqueue(lookup, address, data)
            return
        cached = self.dns.get(key)
        if cached is not None and cached[0] > time.monotonic():
            self.send_out(address, cached[1], data)
            return
        self.start_lookup(key, address, data)

    def send_out(self, address: Address, candidates: tuple[SockAddr, ...], data: bytes) -> None:
        """Send one datagram to the first of ``candidates`` the rules allow that takes it."""
        if not candidates:
            self.drop("unresolvable destination %s", address)
            return
        failure: BaseException | None = None
        for family, sockaddr in candidates:
            if self.allow is not None and not self.allow(address, sockaddr):
                continue
            try:
                self.remote_socket(family).sendto(data, sockaddr)
            except OSError as exc:  # EMSGSIZE, ENETUNREACH, EAFNOSUPPORT, a full buffer...
                failure = exc
                continue
            self.stats.datagrams_up += 1
            self.stats.bytes_up += len(data)
            return
        if failure is None:
            self.drop("destination %s denied", address)
        else:
            self.drop("sending to %s failed: %s", address, failure)

    def literal_destinations(self, address: Address) -> tuple[SockAddr, ...]:
        """Where to send a datagram for an IP literal ``address``."""
        if address.type is AddressType.IPV6:
            if address.host.startswith("::ffff:"):
                # An IPv4-mapped destination goes out of the IPv4 socket (and outgoing.ipv4).
                host = canonical_ip(address.host)
                if ":" not in host:
                    return ((socket.AF_INET, (host, address.port)),)
            return ((socket.AF_INET6, (address.host, address.port, 0, 0)),)
        return ((socket.AF_INET, (address.host, address.port)),)

    # --- names, resolved off the loop ------------------------------------------------------

    def start_lookup(self, key: tuple[str, int], address: Address, data: bytes) -> None:
        """Look ``address`` up on the lookup pool; the datagram waits for the answer."""
        if len(self.pending) >= _PENDING_NAMES:
            self.drop("%d names are being resolved already; not %s", len(self.pending), address)
            return
        self.open_wake_up()
        try:
            future = self.lookups.submit(self.resolver, address.host, address.port)
        except LookupBusy as exc:
            self.drop("no lookup thread for %s: %s", address, exc)
            return
        lookup = _Lookup(future, time.monotonic() + self.resolve_timeout)
        self.pending[key] = lookup
        self.enqueue(lookup, address, data)
        future.add_done_callback(self.wake_up)

    def enqueue(self, lookup: _Lookup, address: Address, data: bytes) -> None:
        """Hold a datagram until its name resolves, within the queue's bounds."""
        if len(lookup.queued) >= _QUEUED_PER_NAME or (
            self.queued_bytes + len(data) > _QUEUED_BYTES
        ):
            self.drop("queue full while %s resolves", address)
            return
        lookup.queued.append((address, data))
        self.queued_bytes += len(data)

    def tend_lookups(self, now: float) -> None:
        """Send what waited for the lookups that finished; give up on the overdue ones."""
        for key, lookup in list(self.pending.items()):
            if lookup.future.done():
                self.settle(key, lookup)
            elif lookup.deadline <= now:
                del self.pending[key]
                logger.debug("resolving %s timed out", key[0])
                self.remember(key, ())  # not looked up again at once: its thread is still busy
                for address, data in lookup.queued:
                    self.queued_bytes -= len(data)
                    self.drop("resolving %s timed out", address)

    def settle(self, key: tuple[str, int], lookup: _Lookup) -> None:
        """A lookup finished: cache its answer and send what waited for it."""
        del self.pending[key]
        try:
            results = lookup.future.result(timeout=0)
        except (OSError, ValueError) as exc:  # gaierror; UnicodeError from IDNA is a ValueError
            logger.debug("resolving %s failed: %s", key[0], exc)
            results = []
        candidates = tuple((family, sa) for family, sa in results if family in _IP_FAMILIES)
        self.remember(key, candidates)
        for address, data in lookup.queued:
            self.queued_bytes -= len(data)
            self.send_out(address, candidates, data)

    def remember(self, key: tuple[str, int], candidates: tuple[SockAddr, ...]) -> None:
        """Cache a lookup's answer (a failure only briefly), the oldest entry evicted first."""
        ttl = self.dns_cache_seconds
        if not candidates:
            ttl = min(ttl, _NEGATIVE_CACHE_SECONDS)
        if ttl <= 0:
            return
        self.dns.pop(key, None)  # re-inserted at the end: the oldest entry is evicted first
        if len(self.dns) >= _DNS_CACHE_SIZE:
            del self.dns[next(iter(self.dns))]
        self.dns[key] = (time.monotonic() + ttl, candidates)

    def open_wake_up(self) -> None:
        """The socket pair that finished lookups wake the loop through, made once."""
        if self.wake_in is not None:
            return
        wake_in, wake_out = socket.socketpair()
        wake_in.setblocking(False)
        wake_out.setblocking(False)
        with self.wake_lock:
            self.wake_in, self.wake_out = wake_in, wake_out
        self.watch(wake_in)

    def wake_up(self, _future: Future[list[SockAddr]]) -> None:
        """A lookup finished (called in its worker thread): wake the loop."""
        with self.wake_lock:
            if self.wake_out is not None:
                with contextlib.suppress(OSError):  # full: a wake-up is pending already
                    self.wake_out.send(b"\0")

    def drain_wake_ups(self) -> None:
        assert self.wake_in is not None
        with contextlib.suppress(OSError):
            while self.wake_in.recv(4096):
                pass

    def remote_socket(self, family: int) -> socket.socket:
        """The remote-facing socket for ``family``, opened (and bound) on first use."""
        sock = self.remotes.get(family)
        if sock is not None:
            return sock
        source = self.outgoing.ipv4 if family == socket.AF_INET else self.outgoing.ipv6
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            if source:
                sock.bind((source, 0))
        except OSError:
            sock.close()
            raise
        self.remotes[family] = sock
        self.remote_fds[sock.fileno()] = sock
        self.watch(sock)
        return sock

    # --- remote → client --------------------------------------------------------------------

    def from_remote(self, sock: socket.socket) -> bool:
        """Wrap what remotes sent and forward it to the client; True if anything went."""
        active = False
        client_addr = self.client_addr
        for _ in range(_BATCH):
            try:
                n, source = sock.recvfrom_into(self.remote_payload)
            except BlockingIOError:
                break
            except OSError as exc:  # an ICMP error for an earlier datagram
                logger.debug("UDP remote receive failed: %s", exc)
                break
            if client_addr is None:  # not reachable in practice: we send before we receive
                self.drop(
                    "datagram from %s before the client's address is known", source, down=True
                )
                continue
            # RFC 1928 §7: the reply carries the same header, naming the sender.
            header = self.header_for(source)
            start = _HEADER_ROOM - len(header)
            self.remote_buf[start:_HEADER_ROOM] = header
            try:
                self.endpoint.sendto(self.remote_view[start : _HEADER_ROOM + n], client_addr)
            except OSError as exc:  # EMSGSIZE (a big IPv6 datagram to an IPv4 client), ENOBUFS
                self.drop(
                    "sending %d bytes from %s to the client failed: %s", n, source, exc, down=True
                )
                continue
            self.stats.datagrams_down += 1
            self.stats.bytes_down += n
            active = True
        return active

    def header_for(self, source: tuple[Any, ...]) -> bytes:
        key = (source[0], source[1])
        header = self.headers.get(key)
        if header is None:
            if len(self.headers) >= _HEADER_CACHE_SIZE:
                self.headers.clear()
            # An IPv4-mapped sender becomes ATYP X'01'; a zone index is dropped.
            header = encode_udp_datagram(Address.from_sockaddr(source), b"")
            self.headers[key] = header
        return header
