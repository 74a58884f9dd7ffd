"""The SOCKS5 handler against raw bytes: every phase, split and pipelined, every reply code."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time

import pytest
from clients import (
    TIMEOUT,
    closed_port,
    connect_through,
    open_tunnel,
    read_reply,
    recv_all,
    recv_exactly,
)
from conftest import needs_ipv6, running_proxy

from socks5d.ops.config import User
from socks5d.socks.protocol import Address, AddressType, Reply

ALICE = (User("alice", "secret"),)


def target_address(target) -> Address:
    kind = AddressType.IPV6 if ":" in target.host else AddressType.IPV4
    return Address(kind, target.host, target.port)


def test_connect_ipv4_relays_and_reports_the_outbound_address(proxy, echo_target):
    sock, reply, bound = open_tunnel(proxy.address, target_address(echo_target))
    with sock:
        assert reply == Reply.SUCCEEDED
        assert bound.type is AddressType.IPV4 and bound.host == "127.0.0.1"
        assert bound.port not in (0, proxy.port, echo_target.port)
        sock.sendall(b"hello through the proxy")
        assert recv_exactly(sock, 23) == b"hello through the proxy"


@needs_ipv6
def test_connect_ipv6_target(proxy, target_factory):
    target = target_factory(host="::1")
    sock, reply, bound = open_tunnel(proxy.address, Address(AddressType.IPV6, "::1", target.port))
    with sock:
        assert reply == Reply.SUCCEEDED
        assert bound.type is AddressType.IPV6 and bound.host == "::1"
        sock.sendall(b"v6")
        assert recv_exactly(sock, 2) == b"v6"


@needs_ipv6
def test_proxy_listening_on_ipv6(echo_target):
    with running_proxy(host="::1") as proxy:
        with connect_through(proxy.address, target_address(echo_target)) as sock:
            sock.sendall(b"over v6 to v4")
            assert recv_exactly(sock, 13) == b"over v6 to v4"


def test_connect_domain_name_is_resolved_by_the_proxy(proxy, echo_target):
    target = Address(AddressType.DOMAINNAME, "localhost", echo_target.port)
    with connect_through(proxy.address, target) as sock:
        sock.sendall(b"by name")
        assert recv_exactly(sock, 7) == b"by name"


def test_handshake_in_one_byte_writes(threading_proxy, echo_target):
    request = bytes([5, 1, 0, 5, 1, 0, 1, 127, 0, 0, 1]) + echo_target.port.to_bytes(2, "big")
    with socket.create_connection(threading_proxy.address, timeout=TIMEOUT) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(request[:1])
        sock.sendall(request[1:2])
        sock.sendall(request[2:3])  # greeting complete
        assert recv_exactly(sock, 2) == b"\x05\x00"
        for index in range(3, len(request)):
            sock.sendall(request[index : index + 1])
        reply, _ = read_reply(sock)
        assert reply == Reply.SUCCEEDED
        sock.sendall(b"x")
        assert recv_exactly(sock, 1) == b"x"


def test_auth_handshake_one_byte_at_a_time():
    with running_proxy(users=ALICE) as proxy:
        with socket.create_connection(proxy.address, timeout=TIMEOUT) as sock:
            for byte in b"\x05\x01\x02":
                sock.sendall(bytes([byte]))
            assert recv_exactly(sock, 2) == b"\x05\x02"
            for byte in b"\x01\x05alice\x06secret":
                sock.sendall(bytes([byte]))
            assert recv_exactly(sock, 2) == b"\x01\x00"


def test_everything_pipelined_in_one_write_reaches_the_target(target_factory):
    received = []

    def record(conn):
        received.append(recv_exactly(conn, 11))
        conn.sendall(b"ok")

    target = target_factory(record)
    with running_proxy(users=ALICE) as proxy:
        payload = (
            b"\x05\x01\x02"  # VER NMETHODS USERNAME/PASSWORD
            + b"\x01\x05alice\x06secret"  # VER ULEN UNAME PLEN PASSWD
            + b"\x05\x01\x00\x01\x7f\x00\x00\x01"  # VER CMD RSV ATYP 127.0.0.1
            + target.port.to_bytes(2, "big")  # DST.PORT
            + b"first bytes"  # payload pipelined before any reply
        )
        with socket.create_connection(proxy.address, timeout=TIMEOUT) as sock:
            sock.sendall(payload)
            assert recv_exactly(sock, 2) == b"\x05\x02"
            assert recv_exactly(sock, 2) == b"\x01\x00"
            reply, _ = read_reply(sock)
            assert reply == Reply.SUCCEEDED
            assert recv_exactly(sock, 2) == b"ok"
    assert received == [b"first bytes"]


def test_right_password_connects(echo_target):
    with running_proxy(users=ALICE) as proxy:
        with connect_through(
            proxy.address, target_address(echo_target), (b"alice", b"secret")
        ) as s:
            s.sendall(b"authenticated")
            assert recv_exactly(s, 13) == b"authenticated"


@pytest.mark.parametrize("credentials", [b"\x05alice\x05wrong", b"\x05carol\x06secret"])
def test_wrong_password_gets_status_01_then_close(credentials):
    with running_proxy(users=ALICE) as proxy:
        with socket.create_connection(proxy.address, timeout=TIMEOUT) as sock:
            sock.sendall(b"\x05\x01\x02")
            assert recv_exactly(sock, 2) == b"\x05\x02"
            sock.sendall(b"\x01" + credentials)
            assert recv_all(sock) == b"\x01\x01"


def test_no_acceptable_method_gets_05_ff_then_close():
    with running_proxy(users=ALICE) as proxy:
        with socket.create_connection(proxy.address, timeout=TIMEOUT) as sock:
            sock.sendall(b"\x05\x01\x00")  # only NO AUTHENTICATION offered
            assert recv_all(sock) == b"\x05\xff"


def test_open_proxy_refuses_a_client_offering_only_gssapi(threading_proxy):
    with socket.create_connection(threading_proxy.address, timeout=TIMEOUT) as sock:
        sock.sendall(b"\x05\x01\x01")
        assert recv_all(sock) == b"\x05\xff"


def test_connection_refused_gets_05_then_close(proxy):
    target = Address(AddressType.IPV4, "127.0.0.1", closed_port())
    sock, reply, _ = open_tunnel(proxy.address, target)
    with sock:
        assert reply == Reply.CONNECTION_REFUSED
        assert recv_all(sock) == b""


def test_unresolvable_name_gets_04():
    # The resolver's answer for an unknown name, injected: a real lookup of it would send a
    # query to the machine's name server, off this host.
    def resolver(host: str, port: int):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    target = Address(AddressType.DOMAINNAME, "no-such-host.invalid", 80)
    with running_proxy(resolver=resolver) as proxy:
        sock, reply, _ = open_tunnel(proxy.address, target)
        with sock:
            assert reply == Reply.HOST_UNREACHABLE
            assert recv_all(sock) == b""


def test_unknown_command_gets_07(proxy):
    with socket.create_connection(proxy.address, timeout=TIMEOUT) as sock:
        sock.sendall(b"\x05\x01\x00")
        assert recv_exactly(sock, 2) == b"\x05\x00"
        sock.sendall(b"\x05\x09\x00\x01\x7f\x00\x00\x01\x00\x50")  # CMD 0x09
        assert recv_all(sock) == b"\x05\x07\x00\x01\x00\x00\x00\x00\x00\x00"


def test_unknown_address_type_gets_08(proxy):
    with socket.create_connection(proxy.address, timeout=TIMEOUT) as sock:
        sock.sendall(b"\x05\x01\x00")
        assert recv_exactly(sock, 2) == b"\x05\x00"
        sock.sendall(b"\x05\x01\x00\x02\x7f\x00\x00\x01\x00\x50")  # ATYP 0x02
        assert recv_all(sock) == b"\x05\x08\x00\x01\x00\x00\x00\x00\x00\x00"


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x06\x01\x00",  # a version neither 5 nor 4 (SOCKS4: tests/test_socks4.py)
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # HTTP to the SOCKS port
        b"\x05\x00",  # NMETHODS 0
        b"\xff" * 600,
    ],
)
def test_garbage_greeting_gets_a_clean_close(proxy, garbage):
    with socket.create_connection(proxy.address, timeout=TIMEOUT) as sock:
        sock.sendall(garbage)
        assert recv_all(sock) == b""


def test_wrong_version_in_request_gets_a_clean_close(proxy):
    with socket.create_connection(proxy.address, timeout=TIMEOUT) as sock:
        sock.sendall(b"\x05\x01\x00")
        assert recv_exactly(sock, 2) == b"\x05\x00"
        sock.sendall(b"\x04\x01\x00\x01\x7f\x00\x00\x01\x00\x50")
        assert recv_all(sock) == b""


def test_client_closing_mid_handshake_leaves_the_server_serving(threading_proxy, echo_target):
    for partial in (b"", b"\x05", b"\x05\x01\x00\x05\x01\x00\x03\x10abc"):
        with socket.create_connection(threading_proxy.address, timeout=TIMEOUT) as sock:
            sock.sendall(partial)
    with connect_through(threading_proxy.address, target_address(echo_target)) as sock:
        sock.sendall(b"still here")
        assert recv_exactly(sock, 10) == b"still here"


def test_silent_client_is_closed_by_the_handshake_timeout_while_others_are_served(echo_target):
    with running_proxy(handshake_timeout=0.5) as proxy:
        silent = socket.create_connection(proxy.address, timeout=TIMEOUT)
        trickler = socket.create_connection(proxy.address, timeout=TIMEOUT)
        with silent, trickler:
            started = time.monotonic()
            with connect_through(proxy.address, target_address(echo_target)) as sock:
                sock.sendall(b"served")
                assert recv_exactly(sock, 6) == b"served"
            trickler.sendall(b"\x05")  # a greeting that never completes
            assert recv_all(silent) == b""
            assert recv_all(trickler) == b""
            waited = time.monotonic() - started
            assert 0.4 < waited < 5.0


def test_ten_mib_each_way_with_matching_sha256(proxy, echo_target):
    blob = os.urandom(10 * 1024 * 1024)
    with connect_through(proxy.address, target_address(echo_target)) as sock:
        sender = threading.Thread(
            target=lambda: (sock.sendall(blob), sock.shutdown(socket.SHUT_WR))
        )
        sender.start()
        echoed = recv_all(sock)
        sender.join(TIMEOUT)
    assert hashlib.sha256(echoed).hexdigest() == hashlib.sha256(blob).hexdigest()


def test_half_close_from_the_client_still_delivers_the_answer(proxy, target_factory):
    def answer_after_eof(conn):
        request = recv_all(conn)  # returns at the client's half-close
        conn.sendall(hashlib.sha256(request).digest())

    target = target_factory(answer_after_eof)
    with connect_through(proxy.address, target_address(target)) as sock:
        sock.sendall(b"question" * 1000)
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == hashlib.sha256(b"question" * 1000).digest()


def test_half_close_from_the_target_still_carries_the_clients_data(proxy, target_factory):
    got = []

    def speak_then_listen(conn):
        conn.sendall(b"banner")
        conn.shutdown(socket.SHUT_WR)
        got.append(recv_all(conn))

    target = target_factory(speak_then_listen)
    with connect_through(proxy.address, target_address(target)) as sock:
        assert recv_all(sock) == b"banner"  # the target's EOF reached us
        sock.sendall(b"late words")
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(TIMEOUT)
        assert sock.recv(1) == b""
    target.close()
    assert got == [b"late words"]


def test_two_hundred_concurrent_tunnels_carry_distinct_data(threading_proxy, echo_target):
    count = 200
    results: dict[int, bool] = {}
    errors: list[BaseException] = []
    sockets = []
    try:
        for _index in range(count):
            sock = connect_through(threading_proxy.address, target_address(echo_target))
            sockets.append(sock)

        def exchange(index: int, sock: socket.socket) -> None:
            try:
                data = hashlib.sha256(str(index).encode()).digest() * 64
                sock.sendall(data)
                results[index] = recv_exactly(sock, len(data)) == data
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=exchange, args=item) for item in enumerate(sockets)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(TIMEOUT)
    finally:
        for sock in sockets:
            sock.close()
    assert errors == []
    assert len(results) == count and all(results.values())


def test_happy_eyeballs_through_the_proxy_skips_a_silent_first_address(echo_target, blackhole):
    silent_port = blackhole

    def resolver(host: str, port: int):
        assert host == "two.test"
        return [
            (socket.AF_INET, ("127.0.0.1", silent_port)),
            (socket.AF_INET, ("127.0.0.1", echo_target.port)),
        ]

    with running_proxy(resolver=resolver, connect_timeout=5.0, attempt_delay=0.1) as proxy:
        started = time.monotonic()
        target = Address(AddressType.DOMAINNAME, "two.test", 80)
        with connect_through(proxy.address, target) as sock:
            elapsed = time.monotonic() - started
            sock.sendall(b"raced")
            assert recv_exactly(sock, 5) == b"raced"
    assert elapsed < 1.0  # the 5 s connect timeout was not spent on the silent address
