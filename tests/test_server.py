"""Tests for socks5d.core.server, the socketserver-style core (modelled on CPython's
Lib/test/test_socketserver.py).

Real sockets on 127.0.0.1 and ::1, port 0. Every wait is bounded (socket timeouts, events,
joins with timeouts); nothing sleeps to synchronise. Each of the core's improvements on the
stdlib has a test here: prompt shutdown from anywhere, accept back-off under EMFILE,
reaped threads and children, capped concurrency, logging instead of printing.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ipv6_available, needs_ipv6
from netns import call_in_netns, needs_netns, netns_only

from socks5d.core.server import (
    BaseRequestHandler,
    BaseServer,
    ForkingTCPServer,
    StreamRequestHandler,
    TCPServer,
    ThreadingTCPServer,
)

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 5.0
# How fast shutdown() must take effect: serve loops below poll every SLOW_POLL seconds,
# so only the wake-up socket can explain meeting it. Generous, for a loaded machine: a
# relative bound, not a latency target.
SLOW_POLL = 30.0
PROMPT = SLOW_POLL / 6
LOGGER = "socks5d.core.server"


# ---- helpers ----


needs_dualstack = pytest.mark.skipif(
    not (ipv6_available() and socket.has_dualstack_ipv6()), reason="no dual-stack IPv6 here"
)
HOSTS = ["127.0.0.1", pytest.param("::1", marks=needs_ipv6)]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def recv_all(conn: socket.socket) -> bytes:
    """Read until EOF (each recv bounded by the socket's timeout)."""
    chunks = []
    while chunk := conn.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def recv_exactly(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def connect(address: Any) -> socket.socket:
    return socket.create_connection(address[:2], timeout=TIMEOUT)


def round_trip(address: Any, payload: bytes) -> bytes:
    """Send payload, half-close, return everything the server sent back before EOF."""
    with connect(address) as conn:
        conn.sendall(payload)
        conn.shutdown(socket.SHUT_WR)
        return recv_all(conn)


@contextlib.contextmanager
def serving(server: BaseServer, poll_interval: float = 0.5) -> Iterator[threading.Thread]:
    """Run serve_forever() in a thread; shut down and close on the way out."""
    thread = threading.Thread(target=server.serve_forever, args=(poll_interval,), daemon=True)
    thread.start()
    try:
        yield thread
    finally:
        server.shutdown()
        thread.join(TIMEOUT)
        server.server_close()
        assert not thread.is_alive(), "serve_forever() did not return after shutdown()"


def server_records(caplog: pytest.LogCaptureFixture, level: int) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER and r.levelno == level]


def zombie_children() -> list[int]:
    """PIDs of our children that have exited but were never reaped."""
    me = os.getpid()
    zombies = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...; comm may contain spaces, so split after the ")".
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if state == "Z" and int(ppid) == me:
            zombies.append(int(entry))
    return zombies


def wait_until_blocked_in_poll(native_id: int) -> bool:
    """Wait (bounded) until the thread sleeps in the kernel's poll; False if unknowable."""
    path = Path(f"/proc/self/task/{native_id}/wchan")
    deadline = time.monotonic() + TIMEOUT
    tick = threading.Event()
    while time.monotonic() < deadline:
        try:
            if "poll" in path.read_text():
                return True
        except OSError:
            return False
        tick.wait(0.001)
    return False


def process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # a zombie still answers: only a reaped child is gone
    except ProcessLookupError:
        return True
    return False


class EchoHandler(BaseRequestHandler):
    """Echo until the client half-closes."""

    def handle(self) -> None:
        while chunk := self.request.recv(65536):
            self.request.sendall(chunk)


class PidEchoHandler(BaseRequestHandler):
    """Echo the whole request after this process's PID and a colon."""

    def handle(self) -> None:
        data = recv_all(self.request)
        self.request.sendall(f"{os.getpid()}:".encode() + data)


class ReadyThenBlockHandler(BaseRequestHandler):
    """Say b"ready" (with the PID), then block until the client sends or the socket ends."""

    def handle(self) -> None:
        self.request.sendall(b"ready %8d" % os.getpid())
        got = self.request.recv(64)
        results = getattr(self.server, "results", None)
        if results is not None:
            results.append(got)
        if got:
            self.request.sendall(b"echo " + got)


READY_SIZE = len(b"ready %8d" % 0)


def read_ready(conn: socket.socket) -> int:
    """Wait for the handler's greeting; returns the PID of the process serving us."""
    greeting = recv_exactly(conn, READY_SIZE)
    assert greeting.startswith(b"ready "), greeting
    return int(greeting[6:])


# ---- echo round trips ----


@pytest.mark.parametrize("server_class", [ThreadingTCPServer, ForkingTCPServer, TCPServer])
@pytest.mark.parametrize("host", HOSTS)
def test_echo_round_trips_distinct_payloads(server_class: type[TCPServer], host: str) -> None:
    server = server_class((host, 0), EchoHandler)
    payloads = [f"client {i}: ".encode() * (i * 300 + 1) for i in range(4)]
    with serving(server):
        # Open them all before any finishes, so concurrent servers really overlap.
        conns = [connect(server.server_address) for _ in payloads]
        try:
            for conn, payload in zip(conns, payloads, strict=True):
                conn.sendall(payload)
                conn.shutdown(socket.SHUT_WR)
            replies = [recv_all(conn) for conn in conns]
        finally:
            for conn in conns:
                conn.close()
    assert replies == payloads


@netns_only
def dual_stack_any_in_netns() -> dict[str, Any]:
    """Run inside a private network namespace (call_in_netns): an echo server on "::"."""
    server = ThreadingTCPServer(("::", 0), EchoHandler)
    port = server.server_address[1]
    with serving(server):
        return {
            "family": int(server.address_family),
            "v6only": server.socket.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY),
            "ipv4": round_trip(("127.0.0.1", port), b"IPv4 client on ::").decode(),
            "ipv6": round_trip(("::1", port), b"IPv6 client on ::").decode(),
        }


@needs_dualstack
@needs_netns
def test_dual_stack_any_accepts_ipv4_client() -> None:
    # "::" listens on every address of the host: bound only in a private network namespace.
    result = call_in_netns(dual_stack_any_in_netns)
    assert result["family"] == socket.AF_INET6
    assert result["v6only"] == 0
    assert result["ipv4"] == "IPv4 client on ::"
    assert result["ipv6"] == "IPv6 client on ::"


@netns_only
def empty_host_in_netns() -> dict[str, Any]:
    """Run inside a private network namespace (call_in_netns): an echo server on ""."""
    server = ThreadingTCPServer(("", 0), EchoHandler)
    ipv6 = server.address_family == socket.AF_INET6
    with serving(server):
        return {
            "dualstack": socket.has_dualstack_ipv6(),
            "family": int(server.address_family),
            "host": server.server_address[0],
            "v6only": (
                server.socket.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) if ipv6 else None
            ),
            "echo": round_trip(("127.0.0.1", server.server_address[1]), b"any").decode(),
        }


@needs_netns
def test_empty_host_listens_on_all_interfaces() -> None:
    # "" listens on every address of the host: bound only in a private network namespace.
    result = call_in_netns(empty_host_in_netns)
    if result["dualstack"]:
        assert result["family"] == socket.AF_INET6
        assert result["host"] == "::"
        assert result["v6only"] == 0
    else:
        assert result["family"] == socket.AF_INET
        assert result["host"] == "0.0.0.0"
    assert result["echo"] == "any"


# ---- the listening socket ----


@pytest.mark.parametrize(
    "host, family",
    [("127.0.0.1", socket.AF_INET), pytest.param("::1", socket.AF_INET6, marks=needs_ipv6)],
)
def test_address_family_follows_literal_host(host: str, family: socket.AddressFamily) -> None:
    with TCPServer((host, 0), EchoHandler, backlog=7) as server:
        assert server.address_family == family
        assert server.socket.family == family
        assert server.server_address[0] == host
        assert server.server_address[1] != 0  # port 0 became the real port
        assert server.backlog == 7
        assert server.socket.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) != 0
        assert server.socket.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        assert server.socket.gettimeout() == 0.0  # the listener is non-blocking


def test_host_name_is_resolved_with_getaddrinfo() -> None:
    first = socket.getaddrinfo(
        "localhost", 0, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE
    )[0]
    server = ThreadingTCPServer(("localhost", 0), EchoHandler)
    assert server.address_family == first[0]
    assert server.server_address[0] == first[4][0]
    with serving(server):
        assert round_trip(server.server_address, b"by name") == b"by name"


def test_accepted_socket_is_blocking() -> None:
    seen: list[tuple[bool, float | None]] = []

    class Report(BaseRequestHandler):
        def handle(self) -> None:
            seen.append((self.request.getblocking(), self.request.gettimeout()))
            self.request.sendall(b"ok")

    server = ThreadingTCPServer(("127.0.0.1", 0), Report)
    with serving(server):
        assert round_trip(server.server_address, b"") == b"ok"
    assert seen == [(True, None)]


@pytest.mark.parametrize("server_class", [TCPServer, ThreadingTCPServer, ForkingTCPServer])
def test_bind_to_port_in_use_raises_eaddrinuse(server_class: type[TCPServer]) -> None:
    before = open_fds()
    with TCPServer(("127.0.0.1", 0), EchoHandler) as first:
        with pytest.raises(OSError) as info:
            server_class(first.server_address, EchoHandler)
        assert info.value.errno == errno.EADDRINUSE
    assert open_fds() == before  # the failed constructor closed what it opened


def test_invalid_limits_are_rejected() -> None:
    before = open_fds()
    with pytest.raises(ValueError, match="max_connections"):
        ThreadingTCPServer(("127.0.0.1", 0), EchoHandler, max_connections=0)
    with pytest.raises(ValueError, match="backlog"):
        TCPServer(("127.0.0.1", 0), EchoHandler, backlog=-1)
    assert open_fds() == before


def test_mixin_servers_accept_the_keywords() -> None:
    with ThreadingTCPServer(("127.0.0.1", 0), EchoHandler, max_connections=50, backlog=256) as s:
        assert (s.max_connections, s.backlog) == (50, 256)
    with ForkingTCPServer(("127.0.0.1", 0), EchoHandler, max_connections=3, backlog=9) as f:
        assert (f.max_connections, f.backlog) == (3, 9)


def test_context_manager_closes_every_descriptor() -> None:
    before = open_fds()
    with TCPServer(("127.0.0.1", 0), EchoHandler) as server:
        assert server.fileno() >= 0
        assert open_fds() > before
    assert server.socket.fileno() == -1
    assert open_fds() == before


# ---- shutdown ----


def test_shutdown_from_another_thread_is_prompt() -> None:
    server = ThreadingTCPServer(("127.0.0.1", 0), EchoHandler)
    with serving(server, poll_interval=SLOW_POLL) as thread:
        assert round_trip(server.server_address, b"alive") == b"alive"
        started = time.monotonic()
        server.shutdown()
        elapsed = time.monotonic() - started
        thread.join(TIMEOUT)
        assert not thread.is_alive()
    assert elapsed < PROMPT


@pytest.mark.parametrize("server_class", [TCPServer, ThreadingTCPServer])
def test_shutdown_from_inside_a_handler(server_class: type[TCPServer]) -> None:
    # TCPServer runs the handler in the serving thread (the stdlib deadlocks there);
    # ThreadingTCPServer runs it in another thread, where shutdown() waits for the loop.
    class StopHandler(BaseRequestHandler):
        def handle(self) -> None:
            recv_all(self.request)  # unread data would make close() send a RST
            self.server.shutdown()
            self.request.sendall(b"shutdown returned")

    server = server_class(("127.0.0.1", 0), StopHandler)
    with serving(server, poll_interval=SLOW_POLL) as thread:
        assert round_trip(server.server_address, b"stop") == b"shutdown returned"
        thread.join(1.0)
        assert not thread.is_alive(), "serve_forever() still running"


@pytest.mark.parametrize("delivery", ["process", "other thread"])
def test_shutdown_from_signal_handler_in_serving_thread(delivery: str) -> None:
    # Python runs handlers in the main thread only; a signal the kernel hands to another
    # thread must still wake the main thread's poll() (serve_forever claims the signal
    # wake-up fd for that).
    server = TCPServer(("127.0.0.1", 0), EchoHandler)
    handled: list[float] = []
    sent: list[float] = []
    echoed: list[bytes] = []

    def on_signal(signum: int, frame: Any) -> None:
        handled.append(time.monotonic())
        server.shutdown()  # runs in the serving (main) thread: must not wait for itself

    def poke() -> None:
        echoed.append(round_trip(server.server_address, b"still serving"))
        # Signal only once the main thread sleeps in poll(): a handler that runs between
        # bytecodes is the easy case, this is the one the stdlib gets wrong.
        in_poll.append(wait_until_blocked_in_poll(main_thread))
        sent.append(time.monotonic())
        if delivery == "process":
            os.kill(os.getpid(), signal.SIGUSR1)
        else:
            signal.pthread_kill(threading.get_ident(), signal.SIGUSR1)

    main_thread = threading.get_native_id()
    in_poll: list[bool] = []

    previous = signal.signal(signal.SIGUSR1, on_signal)
    watchdog = threading.Timer(TIMEOUT, server.shutdown)  # a failure must not hang the run
    helper = threading.Thread(target=poke)
    try:
        watchdog.start()
        helper.start()
        server.serve_forever(poll_interval=SLOW_POLL)
        returned = time.monotonic()
    finally:
        watchdog.cancel()
        signal.signal(signal.SIGUSR1, previous)
        helper.join(TIMEOUT)
        server.server_close()
    assert echoed == [b"still serving"]
    if in_poll != [True]:
        pytest.skip("cannot see from /proc/*/wchan whether the main thread sleeps in poll()")
    assert handled, "the signal handler never ran"
    assert returned - sent[0] < PROMPT
    assert signal.set_wakeup_fd(-1) == -1  # serve_forever gave the wake-up fd back


def test_shutdown_before_and_after_serve_forever_does_not_hang() -> None:
    server = TCPServer(("127.0.0.1", 0), EchoHandler)
    started = time.monotonic()
    server.shutdown()  # no loop yet: returns at once (the stdlib deadlocks here)
    assert time.monotonic() - started < PROMPT

    # The early request is remembered, so a signal that arrives between installing the
    # handler and entering the loop is not lost.
    thread = threading.Thread(target=server.serve_forever, args=(SLOW_POLL,))
    thread.start()
    thread.join(1.0)
    assert not thread.is_alive()

    started = time.monotonic()
    server.shutdown()  # loop over: returns at once
    server.server_close()
    server.shutdown()  # closed: still no error, no wait
    assert time.monotonic() - started < PROMPT


def test_service_actions_runs_every_poll_interval() -> None:
    calls = threading.Event()

    class Counting(TCPServer):
        count = 0

        def service_actions(self) -> None:
            self.count += 1
            if self.count >= 3:
                calls.set()

    server = Counting(("127.0.0.1", 0), EchoHandler)
    with serving(server, poll_interval=0.02):
        assert calls.wait(TIMEOUT), "service_actions() did not run with no traffic"
    assert server.count >= 3


def test_handle_request_serves_one_and_times_out() -> None:
    class Timing(TCPServer):
        timeout = 0.05
        timed_out = 0

        def handle_timeout(self) -> None:
            self.timed_out += 1

    with Timing(("127.0.0.1", 0), EchoHandler) as server:
        server.handle_request()
        assert server.timed_out == 1
        with connect(server.server_address) as conn:
            conn.sendall(b"one request")
            conn.shutdown(socket.SHUT_WR)
            server.timeout = TIMEOUT
            server.handle_request()
            assert recv_all(conn) == b"one request"
        assert server.timed_out == 1


# ---- no leaks ----


def test_threading_leaks_no_threads_or_descriptors() -> None:
    threads_before = set(threading.enumerate())
    fds_before = open_fds()
    server = ThreadingTCPServer(("127.0.0.1", 0), EchoHandler)
    with serving(server):
        for i in range(20):
            payload = b"%d" % i * 50
            assert round_trip(server.server_address, payload) == payload
    assert set(threading.enumerate()) == threads_before
    assert open_fds() == fds_before


def test_thread_bookkeeping_stays_bounded() -> None:
    class Recording(ThreadingTCPServer):
        peak = 0

        def process_request(self, request: socket.socket, client_address: Any) -> None:
            self.peak = max(self.peak, len(self._threads))
            super().process_request(request, client_address)

    server = Recording(("127.0.0.1", 0), EchoHandler)
    with serving(server):
        for i in range(200):
            payload = b"request %d" % i
            assert round_trip(server.server_address, payload) == payload
            # The slot is freed before the socket closes, so our EOF implies it.
            assert server.active_count == 0
    assert server.peak < 10  # finished threads were dropped, not kept for server_close()
    assert len(server._threads) == 0
    assert len(server._active_requests) == 0


def test_forking_leaves_no_zombies_or_descriptors() -> None:
    all_reaped = threading.Event()

    class Reaping(ForkingTCPServer):
        def service_actions(self) -> None:
            super().service_actions()
            if self.active_count == 0:
                all_reaped.set()

    fds_before = open_fds()
    server = Reaping(("127.0.0.1", 0), PidEchoHandler)
    pids = set()
    with serving(server, poll_interval=0.05):
        for i in range(50):
            payload = b"fork %d" % i
            pid, _, echoed = round_trip(server.server_address, payload).partition(b":")
            assert echoed == payload
            pids.add(int(pid))
        # Reaped as we go, never waiting for the lot (at most a few not yet reaped) ...
        assert server.active_count < 50
        # ... and by the loop while idle, not only at server_close().
        all_reaped.clear()
        assert all_reaped.wait(TIMEOUT)
        assert zombie_children() == []
    assert len(pids) == 50 and os.getpid() not in pids
    assert server.active_count == 0
    assert zombie_children() == []
    assert all(process_gone(pid) for pid in pids)
    assert open_fds() == fds_before


# ---- forking child ----


def test_forked_child_closes_listening_socket_and_resets_signals() -> None:
    class Inspect(BaseRequestHandler):
        def handle(self) -> None:
            inodes = set()
            for name in os.listdir("/proc/self/fd"):
                with contextlib.suppress(OSError):
                    inodes.add(os.fstat(int(name)).st_ino)
            srv = self.server
            report = {
                "pid": os.getpid(),
                "listener_open": srv.listener_inode in inodes,  # type: ignore[attr-defined]
                "wakeup_open": bool(srv.wakeup_inodes & inodes),  # type: ignore[attr-defined]
                "request_open": os.fstat(self.request.fileno()).st_ino in inodes,
                "sigterm": signal.getsignal(signal.SIGTERM) == signal.SIG_DFL,
                "sighup": signal.getsignal(signal.SIGHUP) == signal.SIG_DFL,
            }
            self.request.sendall(json.dumps(report).encode())

    previous = {
        sig: signal.signal(sig, lambda signum, frame: None)
        for sig in (signal.SIGTERM, signal.SIGHUP)
    }
    try:
        server = ForkingTCPServer(("127.0.0.1", 0), Inspect)
        server.listener_inode = os.fstat(server.fileno()).st_ino  # type: ignore[attr-defined]
        server.wakeup_inodes = {  # type: ignore[attr-defined]
            os.fstat(server._wakeup_r.fileno()).st_ino,
            os.fstat(server._wakeup_w.fileno()).st_ino,
        }
        with serving(server):
            report = json.loads(round_trip(server.server_address, b""))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    assert report == {
        "pid": report["pid"],
        "listener_open": False,
        "wakeup_open": False,
        "request_open": True,
        "sigterm": True,
        "sighup": True,
    }
    assert report["pid"] != os.getpid()


# ---- max_connections ----


@pytest.mark.parametrize("server_class", [ThreadingTCPServer, ForkingTCPServer])
def test_max_connections_refuses_the_extra_client(
    server_class: type[TCPServer], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    server = server_class(("127.0.0.1", 0), ReadyThenBlockHandler, max_connections=2)
    with serving(server):
        first, second = connect(server.server_address), connect(server.server_address)
        with first, second:
            read_ready(first)
            read_ready(second)  # both handlers are running and blocked
            assert server.active_count == 2  # type: ignore[attr-defined]
            with connect(server.server_address) as third:
                assert third.recv(64) == b""  # refused: clean EOF, no reply
            warnings = server_records(caplog, logging.WARNING)
            assert len(warnings) == 1
            assert "max_connections=2" in warnings[0].getMessage()
            assert "refused 1 connection" in warnings[0].getMessage()
            # The blocked handlers still work.
            first.sendall(b"one")
            second.sendall(b"two")
            assert recv_all(first) == b"echo one"
            assert recv_all(second) == b"echo two"


def test_threading_slot_is_free_once_the_client_sees_eof() -> None:
    server = ThreadingTCPServer(("127.0.0.1", 0), ReadyThenBlockHandler, max_connections=1)
    with serving(server):
        for i in range(5):
            with connect(server.server_address) as conn:
                read_ready(conn)
                conn.sendall(b"%d" % i)
                assert recv_all(conn) == b"echo %d" % i


def test_overload_warning_is_rate_limited_and_overridable(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    server = ThreadingTCPServer(("127.0.0.1", 0), ReadyThenBlockHandler, max_connections=1)
    server.overload_log_interval = 3600.0
    with serving(server), connect(server.server_address) as holder:
        read_ready(holder)
        for _ in range(5):
            with connect(server.server_address) as refused:
                assert refused.recv(64) == b""
        messages = [r.getMessage() for r in server_records(caplog, logging.WARNING)]
        assert len(messages) == 1 and "refused 1 connection" in messages[0]
        server.overload_log_interval = 0.0
        with connect(server.server_address) as refused:
            assert refused.recv(64) == b""
        messages = [r.getMessage() for r in server_records(caplog, logging.WARNING)]
        # The 4 held back and this one: in one warning, or two if the serve loop's
        # periodic flush ran between the interval change and this connection.
        later = [int(re.findall(r"refused (\d+) connection", m)[0]) for m in messages[1:]]
        assert sum(later) == 5 and 1 <= len(later) <= 2
        holder.sendall(b"bye")
        assert recv_all(holder) == b"echo bye"

    class Busy(ThreadingTCPServer):
        def handle_overload(self, request: socket.socket, client_address: Any) -> None:
            request.sendall(b"busy\r\n")
            super().handle_overload(request, client_address)

    busy = Busy(("127.0.0.1", 0), ReadyThenBlockHandler, max_connections=1)
    with serving(busy), connect(busy.server_address) as holder:
        read_ready(holder)
        with connect(busy.server_address) as refused:
            assert recv_all(refused) == b"busy\r\n"
        holder.sendall(b"x")
        assert recv_all(holder) == b"echo x"


# ---- abort and close ----


def test_abort_active_requests_wakes_blocked_threads() -> None:
    server = ThreadingTCPServer(("127.0.0.1", 0), ReadyThenBlockHandler)
    server.results = []  # type: ignore[attr-defined]
    with serving(server):
        conns = [connect(server.server_address) for _ in range(2)]
        try:
            for conn in conns:
                read_ready(conn)
            assert server.abort_active_requests() == 2
            assert [recv_all(conn) for conn in conns] == [b"", b""]
        finally:
            for conn in conns:
                conn.close()
    # server_close() joined them: each handler's recv() returned EOF instead of blocking.
    assert server.results == [b"", b""]  # type: ignore[attr-defined]
    assert server.active_count == 0


def test_abort_active_requests_terminates_children() -> None:
    server = ForkingTCPServer(("127.0.0.1", 0), ReadyThenBlockHandler)
    with serving(server):
        conns = [connect(server.server_address) for _ in range(2)]
        try:
            pids = [read_ready(conn) for conn in conns]
            assert server.abort_active_requests() == 2
            # SIGTERM ended the children; their end of the connection closed with them.
            assert [recv_all(conn) for conn in conns] == [b"", b""]
        finally:
            for conn in conns:
                conn.close()
    assert server.active_count == 0
    assert all(process_gone(pid) for pid in pids)
    assert zombie_children() == []


def test_threading_close_timeout_abandons_stuck_handlers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    release = threading.Event()

    class Stuck(BaseRequestHandler):
        def handle(self) -> None:
            self.request.sendall(b"stuck")
            release.wait(TIMEOUT)

    server = ThreadingTCPServer(("127.0.0.1", 0), Stuck)
    server.close_timeout = 0.1
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    try:
        with connect(server.server_address) as conn:
            assert recv_exactly(conn, 5) == b"stuck"
            handlers = list(server._threads)
            server.shutdown()
            thread.join(TIMEOUT)
            started = time.monotonic()
            server.server_close()
            elapsed = time.monotonic() - started
            assert handlers[0].is_alive()  # abandoned, not joined
    finally:
        release.set()
        for handler in handlers:
            handler.join(TIMEOUT)
    assert 0.1 <= elapsed < 1.0
    messages = [r.getMessage() for r in server_records(caplog, logging.WARNING)]
    assert any("abandoning 1 handler thread" in m for m in messages), messages
    assert not any(t.is_alive() for t in handlers)


def test_forking_server_close_kills_stuck_children(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    server = ForkingTCPServer(("127.0.0.1", 0), ReadyThenBlockHandler)
    server.close_timeout = 0.1
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    # In a thread, so a server_close() that waited for ever fails instead of hanging.
    closer = threading.Thread(target=server.server_close)
    with connect(server.server_address) as conn:
        pid = read_ready(conn)
        try:
            server.shutdown()
            thread.join(TIMEOUT)
            started = time.monotonic()
            closer.start()
            closer.join(TIMEOUT)
            elapsed = time.monotonic() - started
            assert not closer.is_alive(), "server_close() waited for the stuck child"
            assert recv_all(conn) == b""  # the child is dead
        finally:
            if not process_gone(pid):
                # Only on failure. The child inherited our end of the connection too, so
                # closing it would not end the child: kill it (it is ours).
                os.kill(pid, signal.SIGKILL)
                if closer.is_alive():
                    closer.join(TIMEOUT)
                else:
                    server.server_close()
    assert elapsed < 2.0
    assert process_gone(pid)
    assert zombie_children() == []
    messages = [r.getMessage() for r in server_records(caplog, logging.WARNING)]
    assert any("killing 1 child process" in m for m in messages), messages


# ---- errors ----


@pytest.mark.parametrize("server_class", [TCPServer, ThreadingTCPServer])
def test_handle_error_logs_traceback_and_server_keeps_serving(
    server_class: type[TCPServer],
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)

    class Faulty(BaseRequestHandler):
        def handle(self) -> None:
            data = self.request.recv(64)
            if data == b"raise":
                raise ValueError("boom from the handler")
            self.request.sendall(data)

    server = server_class(("127.0.0.1", 0), Faulty)
    with serving(server):
        # The error is logged before the socket is closed, so our EOF means it is there.
        assert round_trip(server.server_address, b"raise") == b""
        assert round_trip(server.server_address, b"fine") == b"fine"
    errors = server_records(caplog, logging.ERROR)
    assert len(errors) == 1
    assert errors[0].exc_info is not None and errors[0].exc_info[0] is ValueError
    assert "boom from the handler" in caplog.text
    assert "Traceback" in caplog.text
    assert capsys.readouterr() == ("", "")


class Resetting(BaseRequestHandler):
    def handle(self) -> None:
        raise ConnectionResetError(errno.ECONNRESET, "peer vanished")


class SlowClient(StreamRequestHandler):
    timeout = 0.05

    def handle(self) -> None:
        self.rfile.readline()  # the client sends nothing: TimeoutError


@pytest.mark.parametrize(
    "handler, exc_type",
    [(Resetting, ConnectionResetError), (SlowClient, TimeoutError)],
)
def test_connection_errors_are_logged_at_debug(
    handler: type[BaseRequestHandler],
    exc_type: type[BaseException],
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    server = ThreadingTCPServer(("127.0.0.1", 0), handler)
    with serving(server), connect(server.server_address) as conn:
        assert recv_all(conn) == b""
    debug = [r for r in server_records(caplog, logging.DEBUG) if r.exc_info]
    assert len(debug) == 1 and debug[0].exc_info is not None
    assert debug[0].exc_info[0] is exc_type
    assert server_records(caplog, logging.ERROR) == []
    assert capsys.readouterr() == ("", "")


def test_stream_request_handler_files_and_timeout() -> None:
    seen: list[float | None] = []

    class Upper(StreamRequestHandler):
        timeout = 3.0

        def handle(self) -> None:
            seen.append(self.request.gettimeout())
            for line in self.rfile:
                self.wfile.write(line.upper())

    server = ThreadingTCPServer(("127.0.0.1", 0), Upper)
    with serving(server):
        assert round_trip(server.server_address, b"hello\nworld\n") == b"HELLO\nWORLD\n"
    assert seen == [3.0]


# ---- accept errors: EMFILE ----

EMFILE_SCRIPT = textwrap.dedent(
    """
    import json, logging, os, resource, socket, threading, time
    from socks5d.core.server import BaseRequestHandler, ThreadingTCPServer

    class CountingServer(ThreadingTCPServer):
        attempts = 0

        def get_request_from(self, listener):
            CountingServer.attempts += 1
            return super().get_request_from(listener)

    cond = threading.Condition()
    state = {"held": 0}
    records = []

    class Collect(logging.Handler):
        def emit(self, record):
            with cond:
                records.append(record)
                cond.notify_all()

    log = logging.getLogger("socks5d.core.server")
    log.addHandler(Collect())
    log.setLevel(logging.DEBUG)
    log.propagate = False

    def warned():
        return any("accept() failed" in r.getMessage() for r in records)

    release = threading.Event()

    class Handler(BaseRequestHandler):
        def handle(self):
            data = self.request.recv(64)
            if data.startswith(b"hold"):
                with cond:
                    state["held"] += 1
                    cond.notify_all()
                release.wait(10)
            self.request.sendall(data)

    def recv_all(conn):
        chunks = []
        while chunk := conn.recv(4096):
            chunks.append(chunk)
        return b"".join(chunks)

    server = CountingServer(("127.0.0.1", 0), Handler)
    serve = threading.Thread(target=server.serve_forever)
    serve.start()

    # Every client descriptor is made now: under the lowered limit none could be.
    clients = [socket.socket() for _ in range(16)]
    for c in clients:
        c.settimeout(5)

    def is_open(fd):
        try:
            os.fstat(fd)
            return True
        except OSError:
            return False

    # Leave exactly three free descriptor numbers below the limit.
    free = [fd for fd in range(4096) if not is_open(fd)][:3]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (free[-1] + 1, hard))

    held, pending = [], []
    for i, c in enumerate(clients[:-2]):
        c.connect(server.server_address)
        c.sendall(b"hold %d" % i)
        with cond:
            ok = cond.wait_for(lambda: state["held"] > len(held) or warned(), timeout=5)
        assert ok, "neither accepted nor refused"
        if warned():
            pending.append(c)  # accept() hit EMFILE: it waits in the backlog
            break
        held.append(c)

    # One second of clients knocking while accept() keeps failing: a server that
    # retried at once would call accept() thousands of times here, one that backs off
    # (doubling from 50 ms) a handful. (A measurement window, not a wait.)
    attempts_before = CountingServer.attempts
    late = clients[-2]
    late.connect(server.server_address)
    late.sendall(b"late")
    pending.append(late)
    threading.Event().wait(1.0)
    attempts = CountingServer.attempts - attempts_before
    warnings_during = sum("accept() failed" in r.getMessage() for r in records)

    release.set()
    replies = [recv_all(c).decode() for c in held + pending]
    for c in held + pending:
        c.close()
    fresh = clients[-1]
    fresh.connect(server.server_address)
    fresh.sendall(b"fresh client")
    fresh.shutdown(socket.SHUT_WR)
    fresh_reply = recv_all(fresh).decode()
    fresh.close()
    server.shutdown()
    serve.join(5)
    server.server_close()
    print(json.dumps({
        "held": len(held),
        "pending": len(pending),
        "attempts": attempts,
        "warnings_during": warnings_during,
        "warnings": [r.getMessage() for r in records if r.levelno == logging.WARNING],
        "recovered": sum("recovered" in r.getMessage() for r in records),
        "replies": replies,
        "fresh": fresh_reply,
    }))
    """
)


def test_emfile_backs_off_logs_once_and_recovers() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", EMFILE_SCRIPT],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["held"] >= 2
    assert result["attempts"] <= 10, result  # backed off, no busy loop
    assert result["warnings_during"] == 1
    assert len(result["warnings"]) == 1, result["warnings"]
    assert "Too many open files" in result["warnings"][0]
    assert result["recovered"] == 1
    expected = [f"hold {i}" for i in range(result["held"] + 1)] + ["late"]
    assert result["replies"] == expected  # every waiting client was served in the end
    assert result["fresh"] == "fresh client"


# ---- several listening addresses ----


class _AddressEcho(BaseRequestHandler):
    """Answers with the local address the client reached."""

    def handle(self) -> None:
        host, port = self.request.getsockname()[:2]
        self.request.sendall(f"{host} {port}".encode())


@pytest.mark.parametrize("server_class", [ThreadingTCPServer, ForkingTCPServer])
def test_one_server_listens_on_several_addresses(server_class):
    addresses = [("127.0.0.1", 0), ("127.0.0.1", 0)]
    if ipv6_available():
        addresses.append(("::1", 0))
    with server_class(addresses, _AddressEcho) as srv:
        thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05})
        thread.start()
        try:
            assert len(srv.sockets) == len(srv.server_addresses) == len(addresses)
            assert srv.server_address == srv.server_addresses[0]
            for bound in srv.server_addresses:
                host, port = bound[:2]
                with socket.create_connection((host, port), timeout=TIMEOUT) as client:
                    assert recv_all(client) == f"{host} {port}".encode()
        finally:
            srv.shutdown()
            thread.join(TIMEOUT)
    assert all(sock.fileno() == -1 for sock in srv.sockets)


def test_several_addresses_share_one_connection_cap():
    release = threading.Event()

    class Hold(BaseRequestHandler):
        def handle(self) -> None:
            self.request.sendall(b"in")
            release.wait(TIMEOUT)

    addresses = [("127.0.0.1", 0), ("127.0.0.1", 0)]
    srv = ThreadingTCPServer(addresses, Hold, max_connections=2)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    first, second = (addr[:2] for addr in srv.server_addresses)
    try:
        held = [socket.create_connection(first, timeout=TIMEOUT) for _ in range(2)]
        for client in held:
            assert client.recv(2) == b"in"
        with socket.create_connection(second, timeout=TIMEOUT) as extra:
            assert recv_all(extra) == b""  # the cap counts both listeners
        for client in held:
            client.close()
    finally:
        release.set()
        srv.shutdown()
        thread.join(TIMEOUT)
        srv.server_close()


def test_empty_address_list_is_rejected():
    with pytest.raises(ValueError, match="no address"):
        TCPServer([], BaseRequestHandler)


# ---- per-client-address cap ----


def _alias_ok() -> bool:
    try:
        with socket.socket() as sock:
            sock.bind(("127.0.0.2", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _alias_ok(), reason="127.0.0.2 is not bindable here")
@pytest.mark.parametrize("server_class", [ThreadingTCPServer, ForkingTCPServer])
def test_per_ip_cap_refuses_only_the_busy_address(server_class, caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)

    class Hold(BaseRequestHandler):
        def handle(self) -> None:
            self.request.sendall(b"in")
            self.request.recv(1)  # until the client closes

    srv = server_class(("127.0.0.1", 0), Hold)
    srv.max_connections_per_ip = 1
    with serving(srv, poll_interval=0.05):
        address = srv.server_address
        with connect(address) as first:
            assert first.recv(2) == b"in"
            with connect(address) as second:
                assert recv_all(second) == b""  # same address, over its cap
            other = socket.socket()
            other.settimeout(TIMEOUT)
            other.bind(("127.0.0.2", 0))
            with other:
                other.connect(address)
                assert other.recv(2) == b"in"  # another address still gets in
                assert srv.active_for("127.0.0.2") == 1
        # Forked children hold copies of this process's client sockets: end them now.
        srv.abort_active_requests()
    assert "max_connections_per_ip=1" in caplog.text


# ---- handler threads are reused ----


class _ThreadIdent(BaseRequestHandler):
    def handle(self) -> None:
        self.request.sendall(str(threading.get_ident()).encode())


def test_a_finished_thread_serves_the_next_request():
    srv = ThreadingTCPServer(("127.0.0.1", 0), _ThreadIdent)
    with serving(srv, poll_interval=0.05):
        first = round_trip(srv.server_address, b"")
        assert wait_for(lambda: len(srv._idle) == 1)
        second = round_trip(srv.server_address, b"")
    assert first == second  # no new thread for the second client


def test_idle_threads_exit_after_their_timeout_and_at_close():
    srv = ThreadingTCPServer(("127.0.0.1", 0), _ThreadIdent)
    srv.idle_thread_timeout = 0.2
    baseline = threading.active_count()
    with serving(srv, poll_interval=0.05):
        round_trip(srv.server_address, b"")
        assert wait_for(lambda: len(srv._threads) == 0)  # timed out and left
        round_trip(srv.server_address, b"")
    assert not srv._threads and not srv._idle  # server_close woke the idle one
    assert wait_for(lambda: threading.active_count() <= baseline)


def test_max_idle_threads_zero_means_a_thread_per_request():
    srv = ThreadingTCPServer(("127.0.0.1", 0), _ThreadIdent)
    srv.max_idle_threads = 0
    with serving(srv, poll_interval=0.05):
        round_trip(srv.server_address, b"")
        assert wait_for(lambda: len(srv._threads) == 0)
        assert srv._idle == []


def wait_for(condition, timeout: float = TIMEOUT) -> bool:
    """Poll internal state that has no event to wait on, within a deadline."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()
