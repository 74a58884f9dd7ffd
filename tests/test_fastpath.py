"""Tests for socks5d.socks.fastpath: the handshake run inside a event loop.

The common case (no login, CONNECT to an IP literal the rules allow, a connect that
succeeds) must never reach a handler thread; everything else must reach one at the right
stage and get exactly the reply and access line the threaded handler gives. Each test
wraps the server's ``resume_in_thread`` to see which stage (if any) a connection was
handed over at. Real sockets on loopback; every wait is bounded.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
from clients import (
    TIMEOUT,
    closed_port,
    connect_through,
    open_tunnel,
    read_reply,
    recv_all,
    recv_exactly,
    wait_until,
)
from conftest import RunningProxy, TargetServer, ipv6_available, running_proxy

from socks5d.core import relay as relay_module
from socks5d.ops.config import User
from socks5d.policy.rules import Policy
from socks5d.socks import handler as handler_module
from socks5d.socks.protocol import (
    Address,
    AddressType,
    Command,
    Method,
    Reply,
    encode_greeting,
    encode_request,
)

ACCESS = "socks5d.access"


class HandOverLog:
    """Wraps a server's resume_in_thread: the handshake states its connections were
    handed at (the Negotiation the loop passes on)."""

    def __init__(self, server: Any) -> None:
        self.stages: list[str] = []
        original = server.resume_in_thread

        def resume_in_thread(
            request: socket.socket, client_address: Any, handover: Any = None
        ) -> None:
            self.stages.append(handover.handshake.state.value)
            original(request, client_address, handover)

        server.resume_in_thread = resume_in_thread


@pytest.fixture
def fast_proxy(request: pytest.FixtureRequest) -> Iterator[tuple[RunningProxy, HandOverLog]]:
    settings = getattr(request, "param", {})
    with running_proxy(relay_threads=1, **settings) as proxy:
        yield proxy, HandOverLog(proxy.server)


def ipv4(port: int) -> Address:
    return Address(AddressType.IPV4, "127.0.0.1", port)


def access_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.name == ACCESS]


def one_access_record(caplog: pytest.LogCaptureFixture) -> Any:
    """The session of the one access line, once it is written (bounded wait)."""
    assert wait_until(lambda: len(access_records(caplog)) >= 1), "no access line"
    records = access_records(caplog)
    assert len(records) == 1, [r.getMessage() for r in records]
    return records[0].access  # type: ignore[attr-defined]


# ---- the fast path itself ----


def test_ipv4_connect_is_served_in_the_loop_without_a_thread(
    fast_proxy: tuple[RunningProxy, HandOverLog],
    echo_target: TargetServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS)
    proxy, handed = fast_proxy
    with connect_through(proxy.address, ipv4(echo_target.port)) as client:
        client.sendall(b"ping" * 1000)
        assert recv_exactly(client, 4000) == b"ping" * 1000
        client.shutdown(socket.SHUT_WR)
        assert recv_all(client) == b""
    session = one_access_record(caplog)
    assert handed.stages == []
    assert session.reply is Reply.SUCCEEDED
    assert session.command == "CONNECT"
    assert session.target == f"127.0.0.1:{echo_target.port}"
    assert (session.up, session.down) == (4000, 4000)
    server: Any = proxy.server
    assert wait_until(lambda: server.active_count == 0)


@pytest.mark.skipif(not ipv6_available(), reason="needs IPv6 on loopback (::1)")
def test_ipv6_literal_connect_is_served_in_the_loop(
    target_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    target = target_factory(host="::1")
    with running_proxy(relay_threads=1) as proxy:
        handed = HandOverLog(proxy.server)
        sock, reply, bound = open_tunnel(
            proxy.address, Address(AddressType.IPV6, "::1", target.port)
        )
        with sock:
            assert reply == Reply.SUCCEEDED
            assert bound.type is AddressType.IPV6 and bound.host == "::1"
            sock.sendall(b"six")
            assert recv_exactly(sock, 3) == b"six"
        assert handed.stages == []


def test_greeting_request_and_data_in_one_segment_arrive_in_order(
    fast_proxy: tuple[RunningProxy, HandOverLog], echo_target: TargetServer
) -> None:
    proxy, handed = fast_proxy
    with socket.create_connection(proxy.address, timeout=TIMEOUT) as client:
        client.sendall(
            encode_greeting([Method.NO_AUTHENTICATION_REQUIRED])
            + encode_request(Command.CONNECT, ipv4(echo_target.port))
            + b"early bytes"
        )
        assert recv_exactly(client, 2) == b"\x05\x00"
        reply, bound = read_reply(client)
        assert reply == Reply.SUCCEEDED and bound.host == "127.0.0.1" and bound.port > 0
        assert recv_exactly(client, 11) == b"early bytes"
    assert handed.stages == []


def test_a_handshake_sent_byte_by_byte_is_reassembled(
    fast_proxy: tuple[RunningProxy, HandOverLog], echo_target: TargetServer
) -> None:
    proxy, handed = fast_proxy
    with socket.create_connection(proxy.address, timeout=TIMEOUT) as client:
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        greeting = encode_greeting([Method.NO_AUTHENTICATION_REQUIRED])
        for byte in greeting:
            client.sendall(bytes([byte]))
        assert recv_exactly(client, 2) == b"\x05\x00"
        for byte in encode_request(Command.CONNECT, ipv4(echo_target.port)):
            client.sendall(bytes([byte]))
        reply, _ = read_reply(client)
        assert reply == Reply.SUCCEEDED
        client.sendall(b"x")
        assert recv_exactly(client, 1) == b"x"
    assert handed.stages == []


# ---- handed to a thread at the right stage, with the handler's own answers ----


def test_a_login_is_answered_in_the_loop_and_checked_in_a_thread(
    echo_target: TargetServer,
) -> None:
    with running_proxy(relay_threads=1, users=(User("ann", "secret"),)) as proxy:
        handed = HandOverLog(proxy.server)
        with connect_through(proxy.address, ipv4(echo_target.port), (b"ann", b"secret")) as c:
            c.sendall(b"auth")
            assert recv_exactly(c, 4) == b"auth"
        assert handed.stages == ["checking"]  # the loop sent 05 02, the thread checks


def test_a_domain_name_is_handed_over_at_the_command_and_resolved_there(
    fast_proxy: tuple[RunningProxy, HandOverLog], echo_target: TargetServer
) -> None:
    proxy, handed = fast_proxy
    target = Address(AddressType.DOMAINNAME, "localhost", echo_target.port)
    sock, reply, _ = open_tunnel(proxy.address, target)
    with sock:
        assert reply == Reply.SUCCEEDED
        sock.sendall(b"name")
        assert recv_exactly(sock, 4) == b"name"
    assert handed.stages == ["command"]


@pytest.mark.parametrize(
    "fast_proxy", [{"policy": Policy(default_allow=False, protect_private=False)}], indirect=True
)
def test_a_denied_destination_gets_reply_02_from_the_handler(
    fast_proxy: tuple[RunningProxy, HandOverLog],
    echo_target: TargetServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS)
    proxy, handed = fast_proxy
    sock, reply, _ = open_tunnel(proxy.address, ipv4(echo_target.port))
    with sock:
        assert reply == Reply.CONNECTION_NOT_ALLOWED
        assert recv_all(sock) == b""
    assert handed.stages == ["command"]
    assert one_access_record(caplog).reply is Reply.CONNECTION_NOT_ALLOWED


def test_a_refused_connect_gets_reply_05_once(
    fast_proxy: tuple[RunningProxy, HandOverLog], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS)
    proxy, handed = fast_proxy
    sock, reply, _ = open_tunnel(proxy.address, ipv4(closed_port()))
    with sock:
        assert reply == Reply.CONNECTION_REFUSED
        assert recv_all(sock) == b""
    assert handed.stages == ["closed"]  # the loop's connect failed: the thread sends 05
    session = one_access_record(caplog)
    assert session.reply is Reply.CONNECTION_REFUSED


def test_a_wrong_version_is_closed_cleanly_by_the_handler(
    fast_proxy: tuple[RunningProxy, HandOverLog],
) -> None:
    proxy, handed = fast_proxy
    with socket.create_connection(proxy.address, timeout=TIMEOUT) as client:
        client.sendall(b"GET / HTTP/1.1\r\n\r\n")  # neither SOCKS5 nor SOCKS4
        assert recv_all(client) == b""
    assert handed.stages == ["closed"]  # nothing to answer: the thread closes and logs
    server: Any = proxy.server
    assert wait_until(lambda: server.active_count == 0)


def test_eof_inside_the_greeting_is_handed_over_and_closed(
    fast_proxy: tuple[RunningProxy, HandOverLog],
) -> None:
    proxy, handed = fast_proxy
    with socket.create_connection(proxy.address, timeout=TIMEOUT) as client:
        client.sendall(b"\x05\x02")  # two methods announced, none sent
        client.shutdown(socket.SHUT_WR)
        assert recv_all(client) == b""
    assert handed.stages == ["greeting"]
    server: Any = proxy.server
    assert wait_until(lambda: server.active_count == 0)


@pytest.mark.parametrize("fast_proxy", [{"handshake_timeout": 0.3}], indirect=True)
def test_a_silent_client_times_out_through_the_handler(
    fast_proxy: tuple[RunningProxy, HandOverLog], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS)
    proxy, handed = fast_proxy
    with socket.create_connection(proxy.address, timeout=TIMEOUT) as client:
        client.sendall(b"\x05")  # then nothing
        assert recv_all(client) == b""
    assert handed.stages == ["greeting"]
    assert one_access_record(caplog).end == "handshake timeout"


def test_closing_the_loop_ends_a_handshake_in_progress(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS)
    with running_proxy(relay_threads=1) as proxy:
        server: Any = proxy.server
        with socket.create_connection(proxy.address, timeout=TIMEOUT) as client:
            client.sendall(encode_greeting([Method.NO_AUTHENTICATION_REQUIRED]))
            assert recv_exactly(client, 2) == b"\x05\x00"  # now waiting for the request
            server.loops.forget_listeners()
            server.loops.close(TIMEOUT)
            assert recv_all(client) == b""
        session = one_access_record(caplog)
        assert session.end == "stopped during the handshake"
        assert session.closed_by == "proxy"
        assert wait_until(lambda: server.active_count == 0)


# ---- socket buffers of the tunnel (server.socket_buffer) ----


@pytest.mark.parametrize("via", ["loop", "thread"])
def test_loopback_tunnels_get_fixed_buffers_on_both_sockets(
    via: str, echo_target: TargetServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Both peers are on loopback: with the default "auto" both proxy sockets get
    # LOCAL_SOCKET_BUFFER, read back from the kernel; the fast path and the handler
    # thread (a host name) alike.
    seen: list[tuple[str, int, int]] = []
    original = handler_module.fix_socket_buffers

    def recording(sock: socket.socket, size: int) -> None:
        original(sock, size)
        seen.append(
            (
                str(sock.getpeername()[0]),
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF),
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF),
            )
        )

    monkeypatch.setattr(handler_module, "fix_socket_buffers", recording)
    host, kind = (
        ("127.0.0.1", AddressType.IPV4) if via == "loop" else ("localhost", AddressType.DOMAINNAME)
    )
    with running_proxy(relay_threads=1) as proxy:
        handed = HandOverLog(proxy.server)
        with connect_through(proxy.address, Address(kind, host, echo_target.port)) as client:
            client.sendall(b"sized")
            assert recv_exactly(client, 5) == b"sized"
        assert handed.stages == ([] if via == "loop" else ["command"])
    expected = 2 * relay_module.LOCAL_SOCKET_BUFFER  # Linux reports the doubled size
    assert len(seen) == 2  # the client's socket, then the upstream one
    assert seen[0] == ("127.0.0.1", expected, expected)
    assert seen[1][0] in ("127.0.0.1", "::1")  # "localhost" may resolve to either
    assert seen[1][1:] == (expected, expected)


def test_socket_buffer_zero_leaves_the_sockets_alone(
    echo_target: TargetServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    monkeypatch.setattr(handler_module, "fix_socket_buffers", lambda sock, size: calls.append(size))
    with running_proxy(relay_threads=1, socket_buffer=0) as proxy:
        with connect_through(proxy.address, ipv4(echo_target.port)) as client:
            client.sendall(b"auto")
            assert recv_exactly(client, 4) == b"auto"
    assert calls == []


def test_closing_the_loop_does_not_wait_on_silent_clients() -> None:
    # Three clients mid-handshake that neither read nor close: the loop lets them go at
    # once. (A lingering close would hold the loop's thread about a second for each.)
    with running_proxy(relay_threads=1) as proxy:
        server: Any = proxy.server
        clients = [socket.create_connection(proxy.address, timeout=TIMEOUT) for _ in range(3)]
        try:
            for client in clients:
                client.sendall(encode_greeting([Method.NO_AUTHENTICATION_REQUIRED]))
                assert recv_exactly(client, 2) == b"\x05\x00"
            server.loops.forget_listeners()
            began = time.monotonic()
            server.loops.close(TIMEOUT)
            assert time.monotonic() - began < 1.5
            for client in clients:
                assert recv_all(client) == b""
            assert wait_until(lambda: server.active_count == 0)
        finally:
            for client in clients:
                client.close()
