"""BIND (RFC 1928 §4, §6): listen on the egress address, wait for the one expected peer.

Owns the listening socket of a BIND request and the wait for its incoming connection,
watching the client's control connection at the same time so a client that gives up
frees its thread at once. Knows addresses, not the handshake; the handler sends the
two replies. Must not import the server core or the handler.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import select
import socket
import time
from dataclasses import dataclass

from ..core.addresses import canonical_ip
from .outbound import ANY_SOURCE, OutgoingAddresses, egress_address
from .protocol import Address, AddressType

logger = logging.getLogger(__name__)

_POLL_ERRORS = select.POLLERR | select.POLLHUP | select.POLLNVAL


def open_bind_listener(
    target_ips: list[str], outgoing: OutgoingAddresses = ANY_SOURCE
) -> socket.socket:
    """A TCP socket listening on the address that would reach the first routable target IP.

    RFC 1928 §6: BND.ADDR in the first reply is where the application server must
    connect, so it must be an address of ours that the target can reach, never 0.0.0.0.
    """
    failure: OSError | None = None
    for ip in target_ips:
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        try:
            local = egress_address(ip, family, outgoing)
        except OSError as exc:
            failure = exc
            continue
        listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            listener.bind((local, 0))
            listener.listen(1)
        except OSError as exc:
            listener.close()
            failure = exc
            continue
        return listener
    raise failure or OSError("no address to bind for")


@dataclass(frozen=True, slots=True)
class Accepted:
    sock: socket.socket
    peer: Address


class ClientLeft(Exception):
    """The client closed its control connection while we waited."""


def wait_for_peer(
    listener: socket.socket,
    control: socket.socket,
    expected_ips: frozenset[str] | None,
    timeout: float,
) -> Accepted | None:
    """Accept the first connection from one of `expected_ips` (anyone when None).

    A connection from another address is refused (closed at once) and the wait goes on
    until `timeout`: one stray or hostile connection must not spoil the BIND for the real
    peer. The first refusal is logged, the rest only counted (a line at the end), so a
    flood of connections to the port cannot fill the log. Returns None on timeout; raises
    ClientLeft when the client hangs up.
    Bytes the client sends meanwhile stay in the kernel buffer for the relay.
    """
    expected = None if expected_ips is None else {canonical_ip(ip) for ip in expected_ips}
    deadline = time.monotonic() + timeout
    poller = select.poll()
    poller.register(listener, select.POLLIN)
    poller.register(control, select.POLLRDHUP)  # hang-up only: data must not wake us
    listener.setblocking(False)
    strays = 0
    try:
        while (remaining := deadline - time.monotonic()) > 0:
            for fd, events in poller.poll(remaining * 1000):
                if fd == control.fileno():
                    if events & (select.POLLRDHUP | _POLL_ERRORS):
                        raise ClientLeft
                    continue
                try:
                    sock, sockaddr = listener.accept()
                except (BlockingIOError, ConnectionAbortedError):
                    continue
                peer = Address.from_sockaddr(sockaddr)
                if expected is not None and canonical_ip(peer.host) not in expected:
                    strays += 1
                    if strays == 1:  # one line per wait, not one per connection of a flood
                        logger.info(
                            "BIND: refused a connection from %s (expected %s)", peer, expected
                        )
                    with contextlib.suppress(OSError):
                        sock.close()
                    continue
                sock.setblocking(True)
                return Accepted(sock, peer)
        return None
    finally:
        if strays > 1:
            logger.info("BIND: refused %d connections from unexpected peers in all", strays)


def expected_peer_ips(requested: Address, resolved: list[str]) -> frozenset[str] | None:
    """RFC 1928 §4: DST.ADDR names the host expected to connect; all-zero means anyone."""
    if requested.type is AddressType.DOMAINNAME:
        return frozenset(resolved) or None
    if ipaddress.ip_address(requested.host).is_unspecified:
        return None
    return frozenset([requested.host])
