"""The small core: serving from event loops (socks5d.core.loopserver) without SOCKS, the
handler context the core passes on unread, and the shape that keeps the core small.

Real sockets on 127.0.0.1; every wait is bounded.
"""

from __future__ import annotations

import ast
import queue
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from clients import TIMEOUT, connect_through, read_reply, recv_all, recv_exactly, wait_until
from conftest import TargetServer

from socks5d.core.eventloop import EventLoopPool
from socks5d.core.loopserver import EventLoopTCPServer
from socks5d.core.relay import RelayResult
from socks5d.core.server import BaseRequestHandler, BaseServer, ThreadingMixIn, ThreadingTCPServer
from socks5d.ops.config import User
from socks5d.ops.daemon import ThreadingSocksServer, attach_event_loops
from socks5d.policy.auth import Authenticator
from socks5d.socks.handler import HandlerContext, HandlerSettings, Socks5Handler
from socks5d.socks.protocol import (
    Address,
    AddressType,
    Command,
    Method,
    Reply,
    encode_greeting,
    encode_request,
)

PACKAGE = Path(__file__).resolve().parent.parent / "socks5d"


def ipv4(port: int) -> Address:
    return Address(AddressType.IPV4, "127.0.0.1", port)


def serve(server: BaseServer) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, args=(0.1,), daemon=True)
    thread.start()
    return thread


def stop(server: ThreadingMixIn, thread: threading.Thread) -> None:
    server.shutdown()
    thread.join(TIMEOUT)
    server.stop_listening()
    server.abort_active_requests()
    server.server_close()
    assert not thread.is_alive()


# ---- EventLoopMixIn on its own: no SOCKS, no loop handler ----


class RelayToTarget(BaseRequestHandler):
    """Connects to the server's target and hands the pair to an event loop."""

    server: LoopEcho

    def handle(self) -> None:
        self.server.handled_in.put(threading.current_thread().name)
        upstream = socket.create_connection(self.server.target, timeout=TIMEOUT)

        def on_done(result: RelayResult) -> None:
            upstream.close()
            self.server.ended.put((result, threading.current_thread().name))

        if not self.server.relay_in_loop(self.request, upstream, on_done):
            upstream.close()
            raise AssertionError("the loop refused the tunnel")


class LoopEcho(EventLoopTCPServer):
    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.handled_in: queue.Queue[str] = queue.Queue()
        self.ended: queue.Queue[tuple[RelayResult, str]] = queue.Queue()
        super().__init__(("127.0.0.1", 0), RelayToTarget)


@pytest.fixture
def loop_echo(echo_target: TargetServer) -> Iterator[LoopEcho]:
    server = LoopEcho(("127.0.0.1", echo_target.port))
    server.serve_in_loops(EventLoopPool(2, name="core-loop"))  # no loop handler
    thread = serve(server)
    try:
        yield server
    finally:
        stop(server, thread)


def test_loops_accept_threads_handle_and_a_handed_tunnel_is_relayed_in_a_loop(
    loop_echo: LoopEcho,
) -> None:
    with socket.create_connection(loop_echo.server_address, timeout=TIMEOUT) as client:
        assert loop_echo.handled_in.get(timeout=TIMEOUT) == "handler"
        client.sendall(b"round trip")
        assert recv_exactly(client, 10) == b"round trip"
        assert loop_echo.active_count == 1, "a tunnel in a loop holds its slot"
        client.shutdown(socket.SHUT_WR)
        assert recv_all(client) == b""
    result, ended_in = loop_echo.ended.get(timeout=TIMEOUT)
    assert (result.a_to_b, result.b_to_a) == (10, 10)
    assert ended_in.startswith("core-loop-")
    assert wait_until(lambda: loop_echo.active_count == 0)
    assert loop_echo.loops is not None and loop_echo.loops.tunnel_count == 0


def test_server_close_closes_the_loops_and_ends_their_tunnels(echo_target: TargetServer) -> None:
    server = LoopEcho(("127.0.0.1", echo_target.port))
    server.serve_in_loops(EventLoopPool(1, name="closing-core-loop"))
    thread = serve(server)
    try:
        client = socket.create_connection(server.server_address, timeout=TIMEOUT)
        with client:
            client.sendall(b"x")
            assert recv_exactly(client, 1) == b"x"
            assert server.loops is not None and server.loops.tunnel_count == 1
            server.shutdown()
            thread.join(TIMEOUT)
            server.server_close()  # no abort first: the tunnel is still open
            assert recv_all(client) == b""
        result, _ = server.ended.get(timeout=TIMEOUT)
        assert result.reason == "loop closed"
        assert server.active_count == 0
        assert not any(t.name.startswith("closing-core-loop") for t in threading.enumerate())
    finally:
        if thread.is_alive():
            stop(server, thread)


def test_without_loops_relay_in_loop_declines_and_nothing_is_detached() -> None:
    class Declined(BaseRequestHandler):
        server: EventLoopTCPServer

        def handle(self) -> None:
            left, right = socket.socketpair()
            with left, right:
                answer = self.server.relay_in_loop(self.request, left, lambda result: None)
            self.request.sendall(b"yes" if answer else b"no")

    server = EventLoopTCPServer(("127.0.0.1", 0), Declined)
    thread = serve(server)
    try:
        with socket.create_connection(server.server_address, timeout=TIMEOUT) as client:
            assert recv_all(client) == b"no"  # and its thread closed it: not detached
        assert wait_until(lambda: server.active_count == 0)
    finally:
        stop(server, thread)


# ---- the handler context: declared, built by its owner, passed on unread ----


def test_the_socks_handler_serves_on_a_bare_core_server_with_default_context(
    echo_target: TargetServer,
) -> None:
    # The core knows nothing of HandlerContext: a server nobody gave a context serves
    # with the defaults (no login, no rules), each tunnel relayed in its thread.
    server = ThreadingTCPServer(("127.0.0.1", 0), Socks5Handler)
    assert server.context is None
    thread = serve(server)
    try:
        with connect_through(server.server_address, ipv4(echo_target.port)) as client:
            client.sendall(b"plain core")
            assert recv_exactly(client, 10) == b"plain core"
        assert wait_until(lambda: server.active_count == 0)
    finally:
        stop(server, thread)


@pytest.mark.parametrize("relay_threads", [1, 0], ids=["loop", "thread"])
def test_a_connection_keeps_the_settings_it_began_under_and_the_next_gets_new_ones(
    echo_target: TargetServer, relay_threads: int
) -> None:
    # The context's settings provider is asked once per connection, in the loop (fast
    # path) or in the thread alike: what a reload does, without the daemon.
    open_settings = HandlerSettings()
    login_settings = HandlerSettings(authenticator=Authenticator.from_users((User("ann", "pw"),)))
    current = [open_settings]
    server = ThreadingSocksServer(("127.0.0.1", 0), Socks5Handler)
    server.context = HandlerContext(
        settings=lambda: current[0],
        active_count=lambda: server.active_count,
        relay_in_loop=server.relay_in_loop,
    )
    if relay_threads:
        attach_event_loops(server, relay_threads)
    thread = serve(server)
    no_login = encode_greeting([Method.NO_AUTHENTICATION_REQUIRED])
    try:
        with socket.create_connection(server.server_address, timeout=TIMEOUT) as early:
            early.sendall(no_login)
            assert recv_exactly(early, 2) == b"\x05\x00"  # VER METHOD: no login needed
            current[0] = login_settings
            with socket.create_connection(server.server_address, timeout=TIMEOUT) as late:
                late.sendall(no_login)
                assert recv_exactly(late, 2) == b"\x05\xff"  # a login is required now
                assert recv_all(late) == b""
            early.sendall(encode_request(Command.CONNECT, ipv4(echo_target.port)))
            assert read_reply(early)[0] == Reply.SUCCEEDED
            early.sendall(b"kept")
            assert recv_exactly(early, 4) == b"kept"
        assert wait_until(lambda: server.active_count == 0)
    finally:
        stop(server, thread)


# ---- the shape that keeps the core small ----


def calls_named(tree: ast.AST, name: str) -> list[ast.Call]:
    return [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == name
    ]


def server_attributes(tree: ast.AST) -> set[str]:
    """The attributes read through `self.server` or a bare `server`."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            owner = node.value
            through_self = (
                isinstance(owner, ast.Attribute)
                and owner.attr == "server"
                and isinstance(owner.value, ast.Name)
                and owner.value.id == "self"
            )
            if through_self or (isinstance(owner, ast.Name) and owner.id == "server"):
                names.add(node.attr)
    return names


@pytest.mark.parametrize(
    ("module", "allowed"), [("handler", set()), ("fastpath", {"context", "resume_in_thread"})]
)
def test_handlers_reach_the_server_only_through_declared_names(
    module: str, allowed: set[str]
) -> None:
    # Everything a handler uses of the process is in its HandlerContext; the core's own
    # API (resume_in_thread of EventLoopMixIn) is typed. No getattr() probing of it.
    tree = ast.parse((PACKAGE / "socks" / f"{module}.py").read_text())
    probes = [ast.unparse(call) for call in calls_named(tree, "getattr")]
    assert [probe for probe in probes if "server" in probe] == []
    assert server_attributes(tree) <= allowed


def test_the_event_loop_never_asks_what_a_watcher_is() -> None:
    # Tunnels, listeners and handshakes implement one Watcher interface; the loop (its
    # relay hot path, its timers, its close) dispatches without isinstance.
    tree = ast.parse((PACKAGE / "core" / "eventloop.py").read_text())
    (loop,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "EventLoop"]
    assert calls_named(loop, "isinstance") == []


def test_the_core_mixins_need_no_type_checking_tricks() -> None:
    core = PACKAGE / "core"
    source = (core / "server.py").read_text() + (core / "loopserver.py").read_text()
    assert "TYPE_CHECKING" not in source
    assert "super()" in source and "type: ignore[misc]" not in source
