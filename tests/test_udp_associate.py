"""UDP ASSOCIATE end to end through the proxy: PySocks and raw datagrams, both modes."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
import socks
from clients import TIMEOUT, UdpEcho, open_tunnel, recv_all
from conftest import needs_ipv6

from socks5d.socks.protocol import (
    Address,
    AddressType,
    Command,
    Reply,
    encode_udp_datagram,
    parse_udp_datagram,
)


@pytest.fixture
def udp_echo() -> Iterator[UdpEcho]:
    echo = UdpEcho()
    yield echo
    echo.close()


@pytest.fixture
def udp_echo6() -> Iterator[UdpEcho]:
    echo = UdpEcho("::1")
    yield echo
    echo.close()


def associate(proxy) -> tuple[socket.socket, Address]:
    control, reply, bound = open_tunnel(
        proxy.address, Address(AddressType.IPV4, "0.0.0.0", 0), None, Command.UDP_ASSOCIATE
    )
    assert reply == Reply.SUCCEEDED
    return control, bound


def test_reply_names_the_address_the_client_reached_never_zero(proxy):
    control, bound = associate(proxy)
    with control:
        assert bound.type is AddressType.IPV4
        assert (bound.host, bound.port != 0) == ("127.0.0.1", True)


def test_raw_datagram_round_trip_ipv4(proxy, udp_echo):
    control, bound = associate(proxy)
    with control, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(TIMEOUT)
        target = Address(AddressType.IPV4, *udp_echo.address)
        client.sendto(encode_udp_datagram(target, b"datagram one"), (bound.host, bound.port))
        datagram = parse_udp_datagram(client.recv(65536))
        assert datagram.data == b"datagram one"
        assert (datagram.frag, datagram.address) == (0, target)


@needs_ipv6
def test_raw_datagram_round_trip_ipv6_remote(proxy, udp_echo6):
    control, bound = associate(proxy)
    with control, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(TIMEOUT)
        target = Address(AddressType.IPV6, "::1", udp_echo6.address[1])
        client.sendto(encode_udp_datagram(target, b"six"), (bound.host, bound.port))
        datagram = parse_udp_datagram(client.recv(65536))
        assert (datagram.address, datagram.data) == (target, b"six")


def test_domain_destination_is_resolved_by_the_proxy(threading_proxy, udp_echo):
    control, bound = associate(threading_proxy)
    with control, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(TIMEOUT)
        target = Address(AddressType.DOMAINNAME, "localhost", udp_echo.address[1])
        client.sendto(encode_udp_datagram(target, b"by name"), (bound.host, bound.port))
        datagram = parse_udp_datagram(client.recv(65536))
        assert datagram.data == b"by name"
        assert datagram.address.port == udp_echo.address[1]


def test_fragments_are_dropped_and_whole_datagrams_still_pass(threading_proxy, udp_echo):
    control, bound = associate(threading_proxy)
    with control, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(0.5)
        target = Address(AddressType.IPV4, *udp_echo.address)
        client.sendto(encode_udp_datagram(target, b"fragment", frag=1), (bound.host, bound.port))
        with pytest.raises(TimeoutError):
            client.recv(65536)
        client.settimeout(TIMEOUT)
        client.sendto(encode_udp_datagram(target, b"whole"), (bound.host, bound.port))
        assert parse_udp_datagram(client.recv(65536)).data == b"whole"


def test_closing_the_tcp_connection_ends_the_association(proxy, udp_echo):
    control, bound = associate(proxy)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(TIMEOUT)
        target = Address(AddressType.IPV4, *udp_echo.address)
        client.sendto(encode_udp_datagram(target, b"alive"), (bound.host, bound.port))
        assert parse_udp_datagram(client.recv(65536)).data == b"alive"
        control.shutdown(socket.SHUT_WR)
        assert recv_all(control) == b""  # the proxy closed its side: association over
        control.close()
        # The UDP port was released with it: it can be bound again at once.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as again:
            again.bind((bound.host, bound.port))


def test_a_thousand_datagrams_round_trip(threading_proxy, udp_echo):
    control, bound = associate(threading_proxy)
    target = Address(AddressType.IPV4, *udp_echo.address)
    received: set[bytes] = set()
    with control, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(TIMEOUT)
        for window in range(0, 1000, 50):  # 50 in flight: loopback buffers never overflow
            for index in range(window, window + 50):
                payload = f"datagram {index:04d}".encode()
                client.sendto(encode_udp_datagram(target, payload), (bound.host, bound.port))
            for _ in range(50):
                received.add(parse_udp_datagram(client.recv(65536)).data)
    assert received == {f"datagram {index:04d}".encode() for index in range(1000)}


def test_pysocks_udp_client(proxy, udp_echo):
    sock = socks.socksocket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.set_proxy(socks.SOCKS5, proxy.host, proxy.port)
    sock.settimeout(TIMEOUT)
    with sock:
        sock.bind(("127.0.0.1", 0))  # PySocks associates on bind
        sock.sendto(b"through pysocks", udp_echo.address)
        data, sender = sock.recvfrom(65536)
    assert data == b"through pysocks"
    assert sender == udp_echo.address
