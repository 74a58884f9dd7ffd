"""The one errno → RFC 1928 reply table, resolving, and connecting the Happy Eyeballs way
(RFC 8305): interleaved families, staggered attempts, losers closed, one overall timeout,
the most informative failure, and the egress (source) address."""

from __future__ import annotations

import errno
import os
import socket
import time

import pytest
from clients import TIMEOUT, closed_port, loopback_alias_available, recv_exactly
from conftest import needs_ipv6

from socks5d.socks.outbound import (
    ConnectFailed,
    OutgoingAddresses,
    egress_address,
    interleave,
    most_informative_failure,
    open_connection,
    reply_for_error,
    resolve,
)
from socks5d.socks.protocol import Address, AddressType, Reply

NAME = Address(AddressType.DOMAINNAME, "multi.test", 9)


@pytest.mark.parametrize(
    ("exc", "reply"),
    [
        (ConnectionRefusedError(errno.ECONNREFUSED, "refused"), Reply.CONNECTION_REFUSED),
        (OSError(errno.ENETUNREACH, "net"), Reply.NETWORK_UNREACHABLE),
        (OSError(errno.EHOSTUNREACH, "host"), Reply.HOST_UNREACHABLE),
        (TimeoutError("timed out"), Reply.HOST_UNREACHABLE),
        (OSError(errno.ETIMEDOUT, "kernel timeout"), Reply.HOST_UNREACHABLE),
        (socket.gaierror(socket.EAI_NONAME, "no such name"), Reply.HOST_UNREACHABLE),
        (OSError(errno.EACCES, "denied"), Reply.CONNECTION_NOT_ALLOWED),
        (OSError(errno.EAFNOSUPPORT, "family"), Reply.ADDRESS_TYPE_NOT_SUPPORTED),
        (OSError(errno.EIO, "io"), Reply.GENERAL_FAILURE),
        (OSError("no errno"), Reply.GENERAL_FAILURE),
        (ValueError("not an OS error"), Reply.GENERAL_FAILURE),
    ],
)
def test_errno_table(exc, reply):
    assert reply_for_error(exc) is reply


def test_literal_addresses_skip_the_resolver():
    def resolver(host, port):
        raise AssertionError("DNS must not be asked for a literal")

    assert resolve(Address(AddressType.IPV4, "127.0.0.1", 80), resolver) == [
        (socket.AF_INET, ("127.0.0.1", 80))
    ]
    assert resolve(Address(AddressType.IPV6, "::1", 80), resolver) == [
        (socket.AF_INET6, ("::1", 80, 0, 0))
    ]


def v4(port: int) -> tuple[socket.AddressFamily, tuple]:
    return (socket.AF_INET, ("127.0.0.1", port))


def resolving_to(*candidates):
    """A resolver hook for NAME that returns `candidates` in this order."""

    def resolver(host, port):
        assert (host, port) == (NAME.host, NAME.port)
        return list(candidates)

    return resolver


def listener(host: str = "127.0.0.1", backlog: int = 8) -> socket.socket:
    """A listening socket nobody accepts on: the kernel completes handshakes into its queue."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.bind((host, 0))
    sock.listen(backlog)
    sock.settimeout(TIMEOUT)
    return sock


def test_every_resolved_address_is_tried_in_turn(echo_target):
    dead = closed_port()
    resolver = resolving_to(v4(dead), v4(echo_target.port))

    with open_connection(NAME, 5.0, resolver) as sock:
        assert sock.getpeername() == ("127.0.0.1", echo_target.port)
        sock.sendall(b"ping")
        assert sock.recv(4) == b"ping"


def test_refused_everywhere_reports_05():
    with pytest.raises(ConnectFailed) as caught:
        open_connection(Address(AddressType.IPV4, "127.0.0.1", closed_port()), 5.0)
    assert caught.value.reply is Reply.CONNECTION_REFUSED
    assert caught.value.reason == "connect failed: Connection refused (1 address tried)"


def test_dns_failure_reports_04():
    def resolver(host, port):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    with pytest.raises(ConnectFailed) as caught:
        open_connection(Address(AddressType.DOMAINNAME, "nx.invalid", 80), 5.0, resolver)
    assert caught.value.reply is Reply.HOST_UNREACHABLE
    assert "resolve failed" in caught.value.reason


def test_empty_resolution_reports_04():
    with pytest.raises(ConnectFailed) as caught:
        open_connection(Address(AddressType.DOMAINNAME, "x.test", 80), 5.0, lambda h, p: [])
    assert caught.value.reply is Reply.HOST_UNREACHABLE


# RFC 8305 §4 ordering: a pure function.

V6A = (socket.AF_INET6, ("2001:db8::a", 80, 0, 0))
V6B = (socket.AF_INET6, ("2001:db8::b", 80, 0, 0))
V6C = (socket.AF_INET6, ("2001:db8::c", 80, 0, 0))
V4A = (socket.AF_INET, ("192.0.2.1", 80))
V4B = (socket.AF_INET, ("192.0.2.2", 80))


@pytest.mark.parametrize(
    ("resolved", "ordered"),
    [
        ([V6A, V6B, V4A, V4B], [V6A, V4A, V6B, V4B]),
        ([V4A, V4B, V6A, V6B], [V4A, V6A, V4B, V6B]),  # starts with the first family
        ([V6A, V6B, V6C, V4A], [V6A, V4A, V6B, V6C]),  # the longer family's tail keeps order
        ([V4A, V6A, V6B, V4B], [V4A, V6A, V4B, V6B]),  # already mixed: still alternates
        ([V6A, V6B], [V6A, V6B]),
        ([V4A], [V4A]),
        ([], []),
    ],
)
def test_interleave_alternates_families_starting_with_the_first(resolved, ordered):
    assert interleave(resolved) == ordered


# Happy Eyeballs against real loopback sockets.


def test_a_blackholed_first_address_costs_only_the_attempt_delay(blackhole, echo_target):
    resolver = resolving_to(v4(blackhole), v4(echo_target.port))

    started = time.monotonic()
    sock = open_connection(NAME, 5.0, resolver, attempt_delay=0.1)
    elapsed = time.monotonic() - started
    with sock:
        assert elapsed < 1.0, f"took {elapsed:.3f}s"
        assert sock.getpeername() == ("127.0.0.1", echo_target.port)
        assert sock.gettimeout() is None  # blocking, no timeout, as the relay expects
        sock.settimeout(TIMEOUT)
        sock.sendall(b"hello")
        assert recv_exactly(sock, 5) == b"hello"


def test_a_failed_attempt_starts_the_next_at_once(echo_target):
    resolver = resolving_to(v4(closed_port()), v4(echo_target.port))

    # A long attempt delay: only the refusal can start the next attempt well before it.
    delay = 20.0
    started = time.monotonic()
    sock = open_connection(NAME, 30.0, resolver, attempt_delay=delay)
    elapsed = time.monotonic() - started
    with sock:
        assert elapsed < delay / 4, f"waited {elapsed:.3f}s: the refusal did not start the next"
        assert sock.getpeername() == ("127.0.0.1", echo_target.port)


def test_a_failed_attempt_starts_the_next_at_once_while_others_are_in_flight(
    blackhole, echo_target
):
    # 0 s: the silent address; D: the refused one, then the echo at once, not at 2 D.
    resolver = resolving_to(v4(blackhole), v4(closed_port()), v4(echo_target.port))
    delay = 2.0

    started = time.monotonic()
    sock = open_connection(NAME, 30.0, resolver, attempt_delay=delay)
    elapsed = time.monotonic() - started
    with sock:
        assert 0.9 * delay <= elapsed < 1.75 * delay, (
            f"took {elapsed:.3f}s, expected about {delay}s"
        )
        assert sock.getpeername() == ("127.0.0.1", echo_target.port)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
# A loser left to the garbage collector warns (ResourceWarning) instead of being closed.
@pytest.mark.filterwarnings("error::ResourceWarning")
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_losing_attempts_are_closed():
    first, second = listener(), listener()
    ports = [first.getsockname()[1], second.getsockname()[1]]
    resolver = resolving_to(v4(ports[0]), v4(ports[1]))
    try:
        baseline = open_fds()
        # attempt_delay 0: both attempts are in flight before either can win.
        sock = open_connection(NAME, 5.0, resolver, attempt_delay=0.0)
        with sock:
            assert open_fds() == baseline + 1  # the winner only
            won = ports.index(sock.getpeername()[1])
            winner, loser = (first, second) if won == 0 else (second, first)
            served, _ = winner.accept()
            with served:
                served.settimeout(TIMEOUT)
                sock.sendall(b"won")
                assert recv_exactly(served, 3) == b"won"
            # Loopback completes the loser's handshake too; it was closed, so it reads EOF.
            lost, _ = loser.accept()
            with lost:
                lost.settimeout(TIMEOUT)
                assert lost.recv(1) == b""
        assert open_fds() == baseline
    finally:
        first.close()
        second.close()


def test_all_failed_reports_the_most_informative_failure(blackhole):
    # The blackhole times out, the closed port refuses: 05 says the host is there.
    resolver = resolving_to(v4(blackhole), v4(closed_port()))

    timeout = 1.0
    started = time.monotonic()
    with pytest.raises(ConnectFailed) as caught:
        open_connection(NAME, timeout, resolver, attempt_delay=0.1)
    elapsed = time.monotonic() - started
    assert caught.value.reply is Reply.CONNECTION_REFUSED
    assert caught.value.reason == "connect failed: Connection refused (2 addresses tried)"
    # Ends at the timeout (the blackhole never answers), not long after it.
    assert 0.9 * timeout <= elapsed < 5 * timeout, f"took {elapsed:.3f}s for a {timeout}s timeout"


def test_the_timeout_bounds_the_whole_race_not_each_attempt(blackhole):
    # Three silent addresses, D apart, under an overall timeout of 1.5 D: only two start.
    # Per attempt, the race would last at least D + 1.5 D.
    resolver = resolving_to(v4(blackhole), v4(blackhole), v4(blackhole))
    delay = 2.0
    timeout = 1.5 * delay

    started = time.monotonic()
    with pytest.raises(ConnectFailed) as caught:
        open_connection(NAME, timeout, resolver, attempt_delay=delay)
    elapsed = time.monotonic() - started
    assert caught.value.reply is Reply.HOST_UNREACHABLE
    assert caught.value.reason == "connect timed out (2 of 3 addresses tried)"
    assert 0.9 * timeout <= elapsed < delay + timeout, (
        f"took {elapsed:.3f}s for a {timeout}s timeout"
    )


def test_a_single_silent_address_times_out_with_04(blackhole):
    timeout = 1.0
    started = time.monotonic()
    with pytest.raises(ConnectFailed) as caught:
        open_connection(Address(AddressType.IPV4, "127.0.0.1", blackhole), timeout)
    elapsed = time.monotonic() - started
    assert caught.value.reply is Reply.HOST_UNREACHABLE
    assert caught.value.reason == "connect timed out (1 address tried)"
    assert 0.9 * timeout <= elapsed < 5 * timeout, f"took {elapsed:.3f}s for a {timeout}s timeout"


def test_most_informative_failure_prefers_refused_then_unreachable_then_timeout():
    timeout = TimeoutError("connect timed out")
    kernel_timeout = OSError(errno.ETIMEDOUT, "Connection timed out")
    unreachable = OSError(errno.EHOSTUNREACH, "No route to host")
    not_allowed = OSError(errno.EACCES, "Permission denied")
    refused = OSError(errno.ECONNREFUSED, "Connection refused")
    family = OSError(errno.EAFNOSUPPORT, "Address family not supported")

    assert most_informative_failure([timeout, unreachable, refused]) is refused
    assert most_informative_failure([timeout, kernel_timeout, unreachable]) is unreachable
    assert most_informative_failure([not_allowed, unreachable]) is not_allowed  # first of a kind
    assert most_informative_failure([family, timeout]) is timeout
    assert most_informative_failure([family]) is family


# Egress (source) addresses.


needs_alias = pytest.mark.skipif(
    not loopback_alias_available(), reason="cannot bind 127.0.0.2 here"
)


def test_outgoing_addresses_pick_by_family():
    outgoing = OutgoingAddresses(ipv4="127.0.0.2")
    assert outgoing.for_family(socket.AF_INET) == "127.0.0.2"
    assert outgoing.for_family(socket.AF_INET6) is None
    assert OutgoingAddresses(ipv6="::1").for_family(socket.AF_INET6) == "::1"
    assert OutgoingAddresses().for_family(socket.AF_INET) is None


@needs_alias
def test_the_outgoing_ipv4_address_is_the_source_the_target_sees():
    with listener() as target:
        address = Address(AddressType.IPV4, "127.0.0.1", target.getsockname()[1])
        outgoing = OutgoingAddresses(ipv4="127.0.0.2")
        with open_connection(address, 5.0, outgoing=outgoing) as sock:
            assert sock.getsockname()[0] == "127.0.0.2"
            served, peer = target.accept()
            with served:
                assert peer[0] == "127.0.0.2"
                assert peer[1] == sock.getsockname()[1]


@needs_ipv6
@needs_alias
def test_an_ipv6_target_with_only_an_ipv4_outgoing_address_connects_unbound():
    with listener("::1") as target:
        address = Address(AddressType.IPV6, "::1", target.getsockname()[1])
        outgoing = OutgoingAddresses(ipv4="127.0.0.2")
        with open_connection(address, 5.0, outgoing=outgoing) as sock:
            assert sock.getsockname()[0] == "::1"
            served, peer = target.accept()
            with served:
                assert peer[0] == "::1"


def test_egress_address_uses_the_route_to_the_target():
    assert egress_address("127.0.0.1", socket.AF_INET) == "127.0.0.1"


def test_egress_address_prefers_the_configured_outgoing_address():
    outgoing = OutgoingAddresses(ipv4="127.0.0.2")
    assert egress_address("127.0.0.1", socket.AF_INET, outgoing) == "127.0.0.2"
    # Only the target's family counts: an IPv6 setting leaves IPv4 to the routing table.
    assert egress_address("127.0.0.1", socket.AF_INET, OutgoingAddresses(ipv6="::1")) == "127.0.0.1"


@needs_ipv6
def test_egress_address_for_ipv6():
    assert egress_address("::1", socket.AF_INET6) == "::1"
    assert egress_address("::1", socket.AF_INET6, OutgoingAddresses(ipv4="127.0.0.2")) == "::1"
