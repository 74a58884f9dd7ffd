"""Tests for socks5d.socks.udp: serve_association driven directly, no SOCKS server involved.

Topology of every test::

    client UDP ──► endpoint ══ serve_association ══ remote socket(s) ──► UDP echo
    control TCP (client side) ──► control (association side)

Datagrams are written and checked as literal bytes (RFC 1928 §7: RSV FRAG ATYP ADDR PORT DATA).
Every wait is bounded (socket timeouts, join timeouts); nothing sleeps to synchronise.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from clients import UdpEcho, udp_socket
from conftest import needs_ipv6

from socks5d.socks.lookups import LookupPool
from socks5d.socks.outbound import OutgoingAddresses
from socks5d.socks.protocol import UNSPECIFIED_IPV4, Address, AddressType
from socks5d.socks.udp import UdpStats, open_udp_endpoint, serve_association

TIMEOUT = 5.0  # upper bound for any single wait; a healthy run never comes close
QUIET = 0.2  # how long we listen to show that nothing arrives


def ipv4_header(ip: str, port: int, frag: int = 0) -> bytes:
    # RSV      FRAG          ATYP=IPv4  DST.ADDR                DST.PORT
    return b"\x00\x00" + bytes([frag]) + b"\x01" + socket.inet_aton(ip) + port.to_bytes(2, "big")


def ipv6_header(ip: str, port: int) -> bytes:
    # RSV  FRAG  ATYP=IPv6  DST.ADDR(16)  DST.PORT
    return b"\x00\x00\x00\x04" + socket.inet_pton(socket.AF_INET6, ip) + port.to_bytes(2, "big")


def domain_header(name: bytes, port: int) -> bytes:
    # RSV  FRAG  ATYP=DOMAINNAME  LEN  NAME  DST.PORT
    return b"\x00\x00\x00\x03" + bytes([len(name)]) + name + port.to_bytes(2, "big")


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Two connected TCP sockets on 127.0.0.1: (the client's side, the association's side)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(TIMEOUT)
        client = socket.create_connection(listener.getsockname(), timeout=TIMEOUT)
        accepted, _ = listener.accept()
    return client, accepted


class Association:
    """serve_association in a thread, with a client UDP socket and both ends of the control."""

    def __init__(
        self,
        client: socket.socket | None = None,
        client_ip: str = "127.0.0.1",
        expected: Address = UNSPECIFIED_IPV4,
        **options: Any,
    ) -> None:
        # A pool of its own: lookups other tests left running in the process-wide one
        # (never-answering resolvers, on purpose) must not make this one LookupBusy.
        options.setdefault("lookups", LookupPool())
        self.control_client, self.control = tcp_pair()
        self.endpoint = open_udp_endpoint("127.0.0.1")
        self.address = self.endpoint.getsockname()
        self.client = client or udp_socket()
        self.stats: UdpStats | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(
            target=self._run, args=(client_ip, expected, options), daemon=True
        )
        self.thread.start()

    def _run(self, client_ip: str, expected: Address, options: dict[str, Any]) -> None:
        try:
            self.stats = serve_association(
                self.control, self.endpoint, client_ip, expected, **options
            )
        except BaseException as exc:
            self.error = exc

    def send(self, datagram: bytes, sock: socket.socket | None = None) -> None:
        (sock or self.client).sendto(datagram, self.address)

    def recv(self) -> bytes:
        data, source = self.client.recvfrom(70000)
        assert source == self.address, "a datagram came from somewhere else than the endpoint"
        return data

    def nothing_arrives(self, sock: socket.socket | None = None) -> None:
        sock = sock or self.client
        sock.settimeout(QUIET)
        try:
            with pytest.raises(TimeoutError):
                sock.recvfrom(70000)
        finally:
            sock.settimeout(TIMEOUT)

    def result(self, timeout: float = TIMEOUT) -> UdpStats:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"the association still runs after {timeout}s"
        if self.error is not None:
            raise self.error
        assert self.stats is not None
        return self.stats

    def finish(self) -> UdpStats:
        """Close the client's side of the control connection: the association must end."""
        self.control_client.close()
        return self.result(timeout=1.0)

    def close(self) -> None:
        self.control_client.close()
        self.thread.join(TIMEOUT)
        for sock in (self.control, self.endpoint, self.client):
            sock.close()


@pytest.fixture
def association() -> Iterator[Callable[..., Association]]:
    made: list[Association] = []

    def make(**kwargs: Any) -> Association:
        made.append(Association(**kwargs))
        return made[-1]

    yield make
    for assoc in made:
        assoc.close()


@pytest.fixture
def echo() -> Iterator[UdpEcho]:
    server = UdpEcho()
    yield server
    server.close()


@pytest.fixture
def echo6() -> Iterator[UdpEcho]:
    server = UdpEcho("::1")
    yield server
    server.close()


# --- forwarding --------------------------------------------------------------------------


def test_ipv4_datagram_comes_back_wrapped_with_the_echo_address(association, echo):
    assoc = association()
    port = echo.port.to_bytes(2, "big")
    assoc.send(
        b"\x00\x00"  # RSV
        b"\x00"  # FRAG
        b"\x01"  # ATYP: IPv4
        b"\x7f\x00\x00\x01"  # DST.ADDR: 127.0.0.1
        + port  # DST.PORT
        + b"hello, echo"  # DATA
    )
    assert assoc.recv() == b"\x00\x00\x00\x01\x7f\x00\x00\x01" + port + b"hello, echo"
    # The echo saw the bare payload, from the relay's remote-facing socket, not the client.
    (payload, source), *_ = echo.received
    assert payload == b"hello, echo"
    assert source[1] not in (assoc.address[1], assoc.client.getsockname()[1])


@needs_ipv6
def test_ipv6_remote_is_reached_and_named_in_the_reply(association, echo6):
    assoc = association()
    assoc.send(ipv6_header("::1", echo6.port) + b"over IPv6")
    # RSV FRAG ATYP=IPv6 ::1 PORT DATA
    expected = b"\x00\x00\x00\x04" + b"\x00" * 15 + b"\x01" + echo6.port.to_bytes(2, "big")
    assert assoc.recv() == expected + b"over IPv6"


def test_domain_destination_is_resolved_once_for_five_datagrams(association, echo):
    calls: list[tuple[str, int]] = []

    def resolver(host: str, port: int) -> list[tuple[socket.AddressFamily, tuple[Any, ...]]]:
        calls.append((host, port))
        return [(socket.AF_INET, ("127.0.0.1", port))]

    assoc = association(resolver=resolver)
    for i in range(5):
        assoc.send(domain_header(b"localhost", echo.port) + b"name %d" % i)
        # The reply names the sender by IP: RFC 1928 §7 replies carry the remote's address.
        assert assoc.recv() == ipv4_header("127.0.0.1", echo.port) + b"name %d" % i
    assert calls == [("localhost", echo.port)]
    assert assoc.finish().datagrams_up == 5


def test_dns_cache_can_be_turned_off(association, echo):
    calls: list[str] = []

    def resolver(host: str, port: int) -> list[tuple[socket.AddressFamily, tuple[Any, ...]]]:
        calls.append(host)
        return [(socket.AF_INET, ("127.0.0.1", port))]

    assoc = association(resolver=resolver, dns_cache_seconds=0)
    for _ in range(3):
        assoc.send(domain_header(b"echo.test", echo.port) + b"x")
        assert assoc.recv() == ipv4_header("127.0.0.1", echo.port) + b"x"
    assert calls == ["echo.test"] * 3


def test_unresolvable_name_is_dropped_and_the_failure_cached(association, echo):
    calls: list[str] = []

    def resolver(host: str, port: int) -> list[tuple[socket.AddressFamily, tuple[Any, ...]]]:
        calls.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    assoc = association(resolver=resolver)
    assoc.send(domain_header(b"nowhere.invalid", echo.port) + b"lost 1")
    assoc.send(domain_header(b"nowhere.invalid", echo.port) + b"lost 2")
    assoc.send(ipv4_header("127.0.0.1", echo.port) + b"found")
    assert assoc.recv() == ipv4_header("127.0.0.1", echo.port) + b"found"
    stats = assoc.finish()
    assert (stats.dropped, stats.datagrams_up) == (2, 1)
    assert calls == ["nowhere.invalid"]
    assert [payload for payload, _ in echo.received] == [b"found"]


def test_allow_false_drops_and_sees_the_address_and_sockaddr(association, echo):
    with contextlib.closing(UdpEcho()) as other:
        seen: list[tuple[Address, tuple[Any, ...]]] = []

        def allow(address: Address, sockaddr: tuple[Any, ...]) -> bool:
            seen.append((address, sockaddr))
            return sockaddr[1] == echo.port

        assoc = association(allow=allow)
        assoc.send(ipv4_header("127.0.0.1", other.port) + b"denied")
        assoc.send(ipv4_header("127.0.0.1", echo.port) + b"allowed")
        assert assoc.recv() == ipv4_header("127.0.0.1", echo.port) + b"allowed"
        assoc.nothing_arrives()
        assert other.received == []
        assert seen == [
            (Address(AddressType.IPV4, "127.0.0.1", other.port), ("127.0.0.1", other.port)),
            (Address(AddressType.IPV4, "127.0.0.1", echo.port), ("127.0.0.1", echo.port)),
        ]
        assert assoc.finish().dropped == 1


def test_outgoing_ipv4_address_is_the_source_remotes_see(association, echo):
    assoc = association(outgoing=OutgoingAddresses(ipv4="127.0.0.2"))
    assoc.send(ipv4_header("127.0.0.1", echo.port) + b"from .2")
    assert assoc.recv() == ipv4_header("127.0.0.1", echo.port) + b"from .2"
    assert echo.received[0][1][0] == "127.0.0.2"


def test_one_remote_socket_serves_every_ipv4_destination(association, echo):
    with contextlib.closing(UdpEcho()) as other:
        assoc = association()
        assoc.send(ipv4_header("127.0.0.1", echo.port) + b"one")
        assert assoc.recv() == ipv4_header("127.0.0.1", echo.port) + b"one"
        assoc.send(ipv4_header("127.0.0.1", other.port) + b"two")
        assert assoc.recv() == ipv4_header("127.0.0.1", other.port) + b"two"
        assert echo.received[0][1] == other.received[0][1]


def test_a_thousand_datagrams_round_trip_without_loss(association, echo):
    assoc = association()
    header = ipv4_header("127.0.0.1", echo.port)
    received: set[bytes] = set()
    window = 50  # in flight at once, so loopback socket buffers never overflow
    for start in range(0, 1000, window):
        for i in range(start, start + window):
            assoc.send(header + b"datagram %04d" % i)
        for _ in range(window):
            reply = assoc.recv()
            assert reply.startswith(header)
            received.add(reply[len(header) :])
    assert received == {b"datagram %04d" % i for i in range(1000)}
    stats = assoc.finish()
    assert (stats.datagrams_up, stats.datagrams_down, stats.dropped) == (1000, 1000, 0)


def test_a_60000_byte_datagram_round_trips(association, echo):
    assoc = association()
    payload = bytes(range(256)) * 234 + b"end"  # 60,007 bytes, every byte value
    assoc.send(ipv4_header("127.0.0.1", echo.port) + payload)
    assert assoc.recv() == ipv4_header("127.0.0.1", echo.port) + payload
    stats = assoc.finish()
    assert (stats.bytes_up, stats.bytes_down) == (len(payload), len(payload))


def test_stats_count_an_exchange_exactly(association, echo):
    assoc = association()
    header = ipv4_header("127.0.0.1", echo.port)
    for payload in (b"a", b"b" * 10, b"c" * 100):
        assoc.send(header + payload)
        assert assoc.recv() == header + payload
    assoc.send(ipv4_header("127.0.0.1", echo.port, frag=1) + b"fragment")  # dropped: FRAG
    assoc.send(b"\x00\x00\x00\x07garbage")  # dropped: unknown ATYP
    with contextlib.closing(udp_socket("127.0.0.2")) as stranger:
        assoc.send(header + b"stranger", stranger)  # dropped: foreign source
    assoc.send(ipv4_header("127.0.0.1", 0) + b"port zero")  # dropped: sendto fails (EINVAL)
    # One socket queue, in order: when this comes back, everything before it was handled.
    assoc.send(header + b"d" * 1000)
    assert assoc.recv() == header + b"d" * 1000
    stats = assoc.finish()
    assert stats == UdpStats(
        datagrams_up=4,
        datagrams_down=4,
        bytes_up=1111,
        bytes_down=1111,
        dropped=4,
        end="control closed",
    )


# --- what is dropped ---------------------------------------------------------------------


def test_frag_other_than_zero_is_dropped(association, echo):
    assoc = association()
    # RFC 1928 §7: a relay that does not reassemble MUST drop FRAG != X'00'.
    assoc.send(
        b"\x00\x00"  # RSV
        b"\x01"  # FRAG: the first fragment
        b"\x01"  # ATYP: IPv4
        b"\x7f\x00\x00\x01"  # DST.ADDR: 127.0.0.1
        + echo.port.to_bytes(2, "big")  # DST.PORT
        + b"f1"  # DATA
    )
    assoc.send(ipv4_header("127.0.0.1", echo.port, frag=0x81) + b"f81")  # the "last" fragment
    assoc.nothing_arrives()
    assert echo.received == []
    stats = assoc.finish()
    assert (stats.dropped, stats.datagrams_up) == (2, 0)


@pytest.mark.parametrize(
    "garbage",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\x00\x00", id="no-frag"),
        pytest.param(b"\x00\x00\x00", id="no-atyp"),
        pytest.param(b"\x00\x00\x00\x01\x7f\x00", id="truncated-ipv4"),
        pytest.param(b"\x00\x00\x00\x09whatever", id="unknown-atyp"),
        pytest.param(b"\x00\x00\x00\x03\x00\x00\x35", id="empty-name"),
        pytest.param(b"\x00\x00\x00\x03\x05a b/c\x00\x35", id="bad-name"),
    ],
)
def test_garbage_header_is_dropped_and_the_association_goes_on(association, echo, garbage):
    assoc = association()
    assoc.send(garbage)
    assoc.send(ipv4_header("127.0.0.1", echo.port) + b"still here")
    assert assoc.recv() == ipv4_header("127.0.0.1", echo.port) + b"still here"
    assert [payload for payload, _ in echo.received] == [b"still here"]
    stats = assoc.finish()
    assert (stats.dropped, stats.datagrams_up) == (1, 1)


def test_datagram_from_a_foreign_ip_is_dropped(association, echo):
    assoc = association()
    with contextlib.closing(udp_socket("127.0.0.2")) as stranger:
        assoc.send(ipv4_header("127.0.0.1", echo.port) + b"intruder", stranger)
        assoc.nothing_arrives(stranger)
    assert echo.received == []
    # The stranger did not fix the client's address: the real client is still served.
    assoc.send(ipv4_header("127.0.0.1", echo.port) + b"client")
    assert assoc.recv() == ipv4_header("127.0.0.1", echo.port) + b"client"
    assert assoc.finish().dropped == 1


def test_expected_port_admits_only_that_port(association, echo):
    client = udp_socket()
    expected = Address(AddressType.IPV4, "0.0.0.0", client.getsockname()[1])
    assoc = association(client=client, expected=expected)
    with contextlib.closing(udp_socket()) as same_host_other_port:
        assoc.send(ipv4_header("127.0.0.1", echo.port) + b"wrong port", same_host_other_port)
        assoc.nothing_arrives(same_host_other_port)
    assoc.send(ipv4_header("127.0.0.1", echo.port) + b"right port")
    assert assoc.recv() == ipv4_header("127.0.0.1", echo.port) + b"right port"
    assert [payload for payload, _ in echo.received] == [b"right port"]
    assert assoc.finish().dropped == 1


def test_expected_host_must_match_when_a_port_is_given(association, echo):
    client = udp_socket()
    expected = Address(AddressType.IPV4, "127.0.0.2", client.getsockname()[1])
    assoc = association(client=client, expected=expected)
    assoc.send(ipv4_header("127.0.0.1", echo.port) + b"not from .2")
    assoc.nothing_arrives()
    assert echo.received == []
    assert assoc.finish().dropped == 1


def test_first_datagram_fixes_the_client_port(association, echo):
    assoc = association()
    assoc.send(ipv4_header("127.0.0.1", echo.port) + b"first")
    assert assoc.recv() == ipv4_header("127.0.0.1", echo.port) + b"first"
    with contextlib.closing(udp_socket()) as same_host_other_port:
        assoc.send(ipv4_header("127.0.0.1", echo.port) + b"second socket", same_host_other_port)
        assoc.nothing_arrives(same_host_other_port)
    assoc.nothing_arrives()
    assert [payload for payload, _ in echo.received] == [b"first"]
    assert assoc.finish().dropped == 1


def test_ipv4_mapped_client_ip_matches_the_plain_ipv4_source(association, echo):
    assoc = association(client_ip="::ffff:127.0.0.1")
    assoc.send(ipv4_header("127.0.0.1", echo.port) + b"mapped")
    assert assoc.recv() == ipv4_header("127.0.0.1", echo.port) + b"mapped"


@needs_ipv6
def test_remote_datagram_too_big_for_the_client_is_dropped(association, echo6):
    assoc = association()
    assoc.send(ipv6_header("::1", echo6.port) + b"open the IPv6 socket")
    assert assoc.recv() == ipv6_header("::1", echo6.port) + b"open the IPv6 socket"
    relay_v6 = echo6.received[0][1]
    # 65,490 bytes + a 22-byte IPv6 header exceed the 65,507 an IPv4 datagram can carry.
    with contextlib.closing(udp_socket("::1")) as remote:
        remote.sendto(b"x" * 65490, relay_v6)
        remote.sendto(b"small", relay_v6)
        assert assoc.recv() == ipv6_header("::1", remote.getsockname()[1]) + b"small"
    stats = assoc.finish()
    assert (stats.dropped, stats.datagrams_down) == (1, 2)


# --- how an association ends -------------------------------------------------------------


def test_closing_the_control_connection_ends_it_and_frees_the_port(association, echo):
    assoc = association()
    assoc.send(ipv4_header("127.0.0.1", echo.port) + b"ping")
    assert assoc.recv() == ipv4_header("127.0.0.1", echo.port) + b"ping"
    started = time.monotonic()
    stats = assoc.finish()  # joins within 1 s or fails
    assert time.monotonic() - started < 1.0
    assert stats.end == "control closed"
    assert assoc.endpoint.fileno() == -1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as again:
        again.bind(assoc.address)  # EADDRINUSE if the endpoint were still open


def test_shutdown_of_the_control_socket_from_another_thread_ends_it(association, echo):
    assoc = association()
    assoc.send(ipv4_header("127.0.0.1", echo.port) + b"ping")
    assert assoc.recv() == ipv4_header("127.0.0.1", echo.port) + b"ping"
    aborter = threading.Thread(target=assoc.control.shutdown, args=(socket.SHUT_RDWR,))
    aborter.start()
    aborter.join(TIMEOUT)
    stats = assoc.result(timeout=1.0)
    assert stats.end in ("aborted", "control closed")
    assert stats.datagrams_up == stats.datagrams_down == 1


def test_bytes_on_the_control_connection_are_discarded(association, echo):
    assoc = association()
    assoc.control_client.sendall(b"chatter" * 1000)
    assoc.send(ipv4_header("127.0.0.1", echo.port) + b"still served")
    assert assoc.recv() == ipv4_header("127.0.0.1", echo.port) + b"still served"
    assert assoc.thread.is_alive()
    assert assoc.finish().end == "control closed"


def test_idle_timeout_ends_it(association):
    started = time.monotonic()
    assoc = association(idle_timeout=0.3)
    stats = assoc.result()
    assert stats.end == "idle timeout"
    assert time.monotonic() - started >= 0.3
    assert assoc.endpoint.fileno() == -1


def test_traffic_keeps_an_idle_association_alive(association, echo):
    assoc = association(idle_timeout=0.3)
    header = ipv4_header("127.0.0.1", echo.port)
    deadline = time.monotonic() + 0.6  # twice the idle timeout, in round trips
    while time.monotonic() < deadline:
        assoc.send(header + b"keepalive")
        assert assoc.recv() == header + b"keepalive"
    assert assoc.thread.is_alive()
    assert assoc.result().end == "idle timeout"


def test_a_non_positive_idle_timeout_is_refused_and_the_endpoint_closed():
    control_client, control = tcp_pair()
    endpoint = open_udp_endpoint("127.0.0.1")
    with control_client, control, pytest.raises(ValueError):
        serve_association(control, endpoint, "127.0.0.1", UNSPECIFIED_IPV4, idle_timeout=0)
    assert endpoint.fileno() == -1


# --- the endpoint ------------------------------------------------------------------------


def held_ports(count: int) -> list[socket.socket]:
    """`count` UDP sockets bound on 127.0.0.1 to consecutive ports."""
    for _ in range(50):
        first = udp_socket()
        base = first.getsockname()[1]
        held = [first]
        try:
            for port in range(base + 1, base + count):
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                held.append(sock)
                sock.bind(("127.0.0.1", port))
            return held
        except OSError:
            for sock in held:
                sock.close()
    raise AssertionError(f"found no {count} consecutive free UDP ports")


def test_endpoint_takes_the_first_free_port_of_its_range():
    held = held_ports(3)
    try:
        low, high = held[0].getsockname()[1], held[-1].getsockname()[1]
        with pytest.raises(OSError) as excinfo:
            open_udp_endpoint("127.0.0.1", (low, high))
        assert excinfo.value.errno == errno.EADDRINUSE
        held[1].close()  # the middle one is the only free port
        with open_udp_endpoint("127.0.0.1", (low, high)) as endpoint:
            assert endpoint.getsockname() == ("127.0.0.1", low + 1)
    finally:
        for sock in held:
            sock.close()


def test_endpoint_rejects_an_inverted_or_out_of_range_port_range():
    with pytest.raises(ValueError):
        open_udp_endpoint("127.0.0.1", (2000, 1999))
    with pytest.raises(ValueError):
        open_udp_endpoint("127.0.0.1", (0, 10))


def test_endpoint_on_an_ipv4_mapped_address_is_an_ipv4_socket():
    with open_udp_endpoint("::ffff:127.0.0.1") as endpoint:
        assert endpoint.family == socket.AF_INET
        assert endpoint.getsockname()[0] == "127.0.0.1"
        assert endpoint.getsockname()[1] != 0


@needs_ipv6
def test_endpoint_on_an_ipv6_address_is_an_ipv6_socket():
    with open_udp_endpoint("::1") as endpoint:
        assert endpoint.family == socket.AF_INET6
        assert endpoint.getsockname()[0] == "::1"


def test_a_name_denied_by_allow_is_never_resolved(association, echo):
    looked_up: list[str] = []

    def resolver(host: str, port: int) -> list[tuple[socket.AddressFamily, tuple[Any, ...]]]:
        looked_up.append(host)
        return [(socket.AF_INET, ("127.0.0.1", port))]

    def allow(address: Address, sockaddr: tuple[Any, ...] | None) -> bool:
        return address.host != "blocked.test"  # decided by name, before any lookup

    assoc = association(resolver=resolver, allow=allow)
    assoc.send(domain_header(b"blocked.test", echo.port) + b"denied")
    assoc.send(domain_header(b"localhost", echo.port) + b"allowed")
    assert assoc.recv() == ipv4_header("127.0.0.1", echo.port) + b"allowed"
    assert looked_up == ["localhost"]
    assert assoc.finish().dropped == 1
