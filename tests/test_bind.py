"""BIND (RFC 1928 §4, §6) with raw bytes: both replies, the relay, timeout, wrong peer."""

from __future__ import annotations

import contextlib
import socket
import threading

import pytest
from clients import (
    TIMEOUT,
    loopback_alias_available,
    open_tunnel,
    read_reply,
    recv_all,
    recv_exactly,
)
from conftest import needs_ipv6, running_proxy

from socks5d.socks.outbound import OutgoingAddresses
from socks5d.socks.protocol import Address, AddressType, Command, Reply

ANYONE = Address(AddressType.IPV4, "0.0.0.0", 0)


def bind_request(proxy, expected: Address = ANYONE):
    sock, reply, bound = open_tunnel(proxy.address, expected, None, Command.BIND)
    assert reply == Reply.SUCCEEDED, f"first BIND reply {reply:#04x}"
    return sock, bound


def connect_from(source_ip: str, bound: Address) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in source_ip else socket.AF_INET)
    sock.settimeout(TIMEOUT)
    sock.bind((source_ip, 0))
    sock.connect((bound.host, bound.port))
    return sock


def test_bind_sends_two_replies_then_relays(proxy):
    control, bound = bind_request(proxy)
    with control:
        # First reply: where the application server must connect (never 0.0.0.0).
        assert bound.type is AddressType.IPV4 and bound.host == "127.0.0.1"
        assert bound.port not in (0, proxy.port)
        with connect_from("127.0.0.1", bound) as incoming:
            reply, peer = read_reply(control)
            # Second reply: the address and port of the host that connected.
            assert reply == Reply.SUCCEEDED
            assert (peer.host, peer.port) == incoming.getsockname()
            incoming.sendall(b"data from the server side")
            assert recv_exactly(control, 25) == b"data from the server side"
            control.sendall(b"and back")
            assert recv_exactly(incoming, 8) == b"and back"
            incoming.shutdown(socket.SHUT_WR)
            assert recv_all(control) == b""  # half-close crossed the relay


def test_bind_pipelined_bytes_reach_the_peer_after_the_second_reply(threading_proxy):
    control, bound = bind_request(threading_proxy)
    with control:
        control.sendall(b"early")  # sent before anyone connected
        with connect_from("127.0.0.1", bound) as incoming:
            reply, _ = read_reply(control)
            assert reply == Reply.SUCCEEDED
            assert recv_exactly(incoming, 5) == b"early"


def test_bind_timeout_sends_04_and_closes():
    with running_proxy(bind_timeout=0.3) as proxy:
        control, _ = bind_request(proxy)
        with control:
            assert recv_all(control) == b"\x05\x04\x00\x01\x00\x00\x00\x00\x00\x00"


@pytest.mark.skipif(not loopback_alias_available(), reason="127.0.0.2 is not bindable here")
def test_bind_refuses_a_stranger_and_keeps_waiting_for_the_expected_peer():
    with running_proxy(bind_timeout=5.0) as proxy:
        control, bound = bind_request(proxy, Address(AddressType.IPV4, "127.0.0.2", 0))
        with control:
            with connect_from("127.0.0.1", bound) as stranger:
                with contextlib.suppress(ConnectionResetError):
                    assert stranger.recv(1) == b""  # refused: closed at once
            with connect_from("127.0.0.2", bound) as expected:
                reply, peer = read_reply(control)
                assert reply == Reply.SUCCEEDED
                assert peer.host == "127.0.0.2"
                expected.sendall(b"me")
                assert recv_exactly(control, 2) == b"me"


def test_client_leaving_during_the_wait_frees_the_listener(caplog):
    caplog.set_level("INFO", logger="socks5d.access")
    with running_proxy(bind_timeout=30.0) as proxy:
        control, bound = bind_request(proxy)
        control.close()
        done = threading.Event()

        def wait_for_log() -> None:
            while not any("cmd=BIND" in r.getMessage() for r in caplog.records):
                if done.wait(0.02):
                    return

        watcher = threading.Thread(target=wait_for_log)
        watcher.start()
        watcher.join(TIMEOUT)
        done.set()
        line = next(r.getMessage() for r in caplog.records if "cmd=BIND" in r.getMessage())
        assert "client closed while waiting" in line
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((bound.host, bound.port), timeout=TIMEOUT)


@needs_ipv6
def test_bind_for_an_ipv6_peer_listens_on_ipv6(threading_proxy):
    control, bound = bind_request(threading_proxy, Address(AddressType.IPV6, "::1", 0))
    with control:
        assert (bound.type, bound.host) == (AddressType.IPV6, "::1")
        with connect_from("::1", bound) as incoming:
            reply, peer = read_reply(control)
            assert reply == Reply.SUCCEEDED
            assert (peer.host, peer.port) == incoming.getsockname()[:2]
            incoming.sendall(b"v6 peer")
            assert recv_exactly(control, 7) == b"v6 peer"


def test_bind_for_a_named_peer_expects_its_addresses(threading_proxy):
    control, bound = bind_request(threading_proxy, Address(AddressType.DOMAINNAME, "localhost", 0))
    with control:
        assert bound.host in ("127.0.0.1", "::1")  # the route towards localhost
        with connect_from(bound.host, bound) as incoming:
            reply, peer = read_reply(control)
            assert reply == Reply.SUCCEEDED
            assert peer.host == bound.host
            incoming.sendall(b"named")
            assert recv_exactly(control, 5) == b"named"


@pytest.mark.skipif(not loopback_alias_available(), reason="127.0.0.2 is not bindable here")
def test_bind_listens_on_the_outgoing_address_when_one_is_set():
    with running_proxy(outgoing=OutgoingAddresses(ipv4="127.0.0.2")) as proxy:
        control, bound = bind_request(proxy, Address(AddressType.IPV4, "127.0.0.1", 0))
        with control:
            assert bound.host == "127.0.0.2"
            with connect_from("127.0.0.1", bound):
                reply, peer = read_reply(control)
                assert (reply, peer.host) == (Reply.SUCCEEDED, "127.0.0.1")


def test_a_flood_of_strangers_costs_two_log_lines_not_one_each(caplog):
    """50 connections from an unexpected address during one BIND wait: all refused, the
    first logged, the rest counted in one closing line (a flood cannot fill the log)."""
    from socks5d.socks.bind import wait_for_peer

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    control, client_end = socket.socketpair()
    strays = [socket.create_connection(listener.getsockname(), timeout=TIMEOUT) for _ in range(50)]
    try:
        with caplog.at_level("INFO", logger="socks5d.socks.bind"):
            accepted = wait_for_peer(listener, control, frozenset({"192.0.2.1"}), timeout=3.0)
        assert accepted is None
        for stray in strays:  # each was closed by the proxy: EOF
            assert stray.recv(1) == b""
        lines = [r.getMessage() for r in caplog.records if r.name == "socks5d.socks.bind"]
        assert len(lines) == 2, lines
        assert lines[0].startswith("BIND: refused a connection from 127.0.0.1:")
        assert lines[1] == "BIND: refused 50 connections from unexpected peers in all"
    finally:
        for stray in strays:
            stray.close()
        listener.close()
        control.close()
        client_end.close()
