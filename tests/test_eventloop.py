"""Tests for socks5d.core.eventloop (EventLoop, EventLoopPool), the server's detach_request and
reclaim_request, and the SOCKS handler relaying its tunnels through a loop.

Topology of the loop tests (real TCP sockets on 127.0.0.1)::

    client <──TCP──> a ══ loop ══ b <──TCP──> target

The test owns client and target; the loop owns a and b until it calls ``on_done``, which
closes them as the handler does. Every wait is bounded (socket timeouts, join timeouts,
``wait_until`` deadlines); nothing sleeps to synchronise.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import queue
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from clients import TIMEOUT, connect_through, recv_all, recv_exactly, wait_until
from conftest import TargetServer, running_proxy
from streams import (
    MiB,
    Worker,
    needs_proc_fd,
    needs_splice,
    open_fds,
    send_and_shut,
    sha256_of_stream,
)

from socks5d.core import eventloop as eventloop_module
from socks5d.core.eventloop import EventLoop, EventLoopPool
from socks5d.core.loopserver import EventLoopTCPServer
from socks5d.core.relay import RelayResult
from socks5d.core.server import BaseRequestHandler
from socks5d.socks.protocol import Address, AddressType

# ---- helpers ----


def pipe_count() -> int:
    return sum(1 for target in open_fds().values() if target.startswith("pipe:"))


def sha(data: bytes) -> tuple[str, int]:
    return hashlib.sha256(data).hexdigest(), len(data)


def tcp_pair(listener: socket.socket) -> tuple[socket.socket, socket.socket]:
    """Two connected TCP sockets through ``listener``: (the connecting one, the accepted one)."""
    conn = socket.create_connection(listener.getsockname(), timeout=TIMEOUT)
    try:
        accepted, _ = listener.accept()
    except BaseException:
        conn.close()
        raise
    accepted.settimeout(TIMEOUT)
    return conn, accepted


class Done:
    """An ``on_done``: records each call (result, thread name), closes a and b as an owner."""

    def __init__(self, *socks: socket.socket) -> None:
        self.socks = socks
        self.calls: list[tuple[RelayResult, str]] = []
        self.called = threading.Event()

    def __call__(self, result: RelayResult) -> None:
        self.calls.append((result, threading.current_thread().name))
        for sock in self.socks:
            sock.close()
        self.called.set()

    def wait(self, timeout: float = TIMEOUT) -> RelayResult:
        assert self.called.wait(timeout), "on_done was not called"
        return self.calls[0][0]

    @property
    def thread(self) -> str:
        return self.calls[0][1]


class Link:
    """client <-> a == (loop) == b <-> target."""

    def __init__(self, listener: socket.socket) -> None:
        self.client, self.a = tcp_pair(listener)
        try:
            self.b, self.target = tcp_pair(listener)
        except BaseException:
            self.client.close()
            self.a.close()
            raise
        self.done = Done(self.a, self.b)
        self.added = False

    def add_to(self, loop: EventLoop | EventLoopPool, **options: Any) -> Link:
        loop.add(self.a, self.b, self.done, **options)
        self.added = True
        return self

    def round_trip(self, up: bytes, down: bytes) -> None:
        """up from client to target, then down back: both arrive whole."""
        self.client.sendall(up)
        assert recv_exactly(self.target, len(up)) == up
        self.target.sendall(down)
        assert recv_exactly(self.client, len(down)) == down

    def close(self) -> None:
        for sock in (self.client, self.a, self.b, self.target):
            sock.close()


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    with socket.create_server(("127.0.0.1", 0), backlog=1024) as sock:
        sock.settimeout(TIMEOUT)
        yield sock


@pytest.fixture
def links(listener: socket.socket) -> Iterator[Callable[[], Link]]:
    """Makes Links; at the end (after the loop closed) every added one was ended once."""
    made: list[Link] = []

    def make() -> Link:
        link = Link(listener)
        made.append(link)
        return link

    yield make
    try:
        counts = [len(link.done.calls) for link in made if link.added]
        assert all(count == 1 for count in counts), f"on_done calls per tunnel: {counts}"
    finally:
        for link in made:
            link.close()


@pytest.fixture
def loop(links: Callable[[], Link]) -> Iterator[EventLoop]:
    """A loop, closed before the links' sockets are (it depends on ``links``)."""
    event_loop = EventLoop("test-loop")
    yield event_loop
    event_loop.close(TIMEOUT)


def ipv4(port: int) -> Address:
    return Address(AddressType.IPV4, "127.0.0.1", port)


# ---- one loop, one tunnel ----


def test_megabytes_both_ways_at_once_arrive_intact_with_exact_counts(
    loop: EventLoop, links: Callable[[], Link], mode: str
) -> None:
    rng = random.Random(1928)
    up, down = rng.randbytes(4 * MiB), rng.randbytes(4 * MiB)
    link = links().add_to(loop, mode=mode)
    assert loop.tunnel_count == 1

    senders = [Worker(send_and_shut, link.client, up), Worker(send_and_shut, link.target, down)]
    readers = [Worker(sha256_of_stream, link.target), Worker(sha256_of_stream, link.client)]
    for worker in senders + readers:
        worker.start()
    for worker in senders:
        worker.result()
    assert readers[0].result() == sha(up)
    assert readers[1].result() == sha(down)

    res = link.done.wait()
    assert (res.a_to_b, res.b_to_a, res.reason, res.mode) == (len(up), len(down), "eof", mode)
    assert res.closed_first in ("a", "b")
    assert link.done.thread == loop.name, "on_done runs in the loop's thread"
    assert loop.tunnel_count == 0
    assert link.a.fileno() == link.b.fileno() == -1


@pytest.mark.parametrize("first", ["client", "target"])
def test_half_close_passes_eof_and_keeps_the_other_direction_flowing(
    loop: EventLoop, links: Callable[[], Link], first: str, mode: str
) -> None:
    link = links().add_to(loop, mode=mode)
    closer, other = (link.client, link.target) if first == "client" else (link.target, link.client)
    request = b"request body, then my FIN"
    reply = random.Random(1929).randbytes(1 * MiB)

    send_and_shut(closer, request)
    assert recv_exactly(other, len(request)) == request
    assert other.recv(1) == b"", "the FIN must be passed on as EOF"
    assert not link.done.called.is_set(), "half-closed is not ended"
    # Half-open now: the reverse direction still works, in full.
    reader = Worker(recv_all, closer)
    reader.start()
    send_and_shut(other, reply)
    assert reader.result() == reply

    res = link.done.wait()
    assert (res.reason, res.mode) == ("eof", mode)
    if first == "client":
        assert (res.closed_first, res.a_to_b, res.b_to_a) == ("a", len(request), len(reply))
    else:
        assert (res.closed_first, res.b_to_a, res.a_to_b) == ("b", len(request), len(reply))


def test_pending_bytes_reach_target_before_later_client_data(
    loop: EventLoop, links: Callable[[], Link], mode: str
) -> None:
    # Larger than the buffer, so delivering it takes several sends between polls.
    pending = b"P" * 5000 + b"<end of pipelined bytes>"
    later = b"L" * 3000
    link = links()
    link.client.sendall(later)  # already waiting in a when the loop takes over
    link.add_to(loop, pending_a_to_b=pending, buffer_size=1024, mode=mode)
    link.client.shutdown(socket.SHUT_WR)

    assert recv_all(link.target) == pending + later
    link.target.shutdown(socket.SHUT_WR)
    res = link.done.wait()
    assert res == RelayResult(len(pending) + len(later), 0, "a", "eof")


@pytest.mark.parametrize("side", ["a", "b"])
def test_a_reset_ends_the_tunnel_with_reason_reset(
    loop: EventLoop, links: Callable[[], Link], side: str
) -> None:
    link = links().add_to(loop)
    link.round_trip(b"hello", b"world!")
    resetter, survivor = (link.client, link.target) if side == "a" else (link.target, link.client)
    resetter.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    resetter.close()  # linger 0: RST instead of FIN

    res = link.done.wait()
    assert res == RelayResult(5, 6, side, "reset")
    # on_done closed the other side's socket: its peer sees the end.
    with contextlib.suppress(ConnectionResetError):
        assert survivor.recv(1) == b""


def test_idle_timeout_ends_a_quiet_tunnel(loop: EventLoop, links: Callable[[], Link]) -> None:
    link = links().add_to(loop, idle_timeout=0.3)
    link.round_trip(b"up", b"down")
    quiet_since = time.monotonic()

    res = link.done.wait()
    waited = time.monotonic() - quiet_since
    assert res == RelayResult(2, 4, "idle", "idle timeout")
    assert 0.25 <= waited < 3.0, f"ended after {waited:.3f} s of quiet, idle_timeout 0.3 s"
    assert recv_all(link.client) == b"" and recv_all(link.target) == b""


def test_traffic_postpones_the_idle_timeout(loop: EventLoop, links: Callable[[], Link]) -> None:
    link = links().add_to(loop, idle_timeout=0.6)
    started = time.monotonic()
    rounds = 0
    # Round trips every 50 ms for 1.5 s: 2.5 idle timeouts, never 0.6 s of quiet.
    while time.monotonic() - started < 1.5:
        link.round_trip(b"p", b"q")
        rounds += 1
        assert not link.done.called.wait(0.05), "ended although bytes kept moving"
    quiet_since = time.monotonic()

    res = link.done.wait()
    waited = time.monotonic() - quiet_since
    assert res == RelayResult(rounds, rounds, "idle", "idle timeout")
    assert 0.5 <= waited < 3.0, f"ended after {waited:.3f} s of quiet, idle_timeout 0.6 s"


@needs_splice
@needs_proc_fd
def test_a_quiet_tunnel_gives_its_pipes_back_and_keeps_working(
    loop: EventLoop, links: Callable[[], Link]
) -> None:
    loop.start()  # its wake-up pipe is part of the baseline
    baseline = pipe_count()
    link = links().add_to(loop, mode="splice")
    data = random.Random(7).randbytes(1 * MiB)
    reader = Worker(recv_exactly, link.target, len(data))
    reader.start()
    link.client.sendall(data)
    assert reader.result() == data
    assert pipe_count() > baseline, "splice mode relays through a pipe"

    # RELEASE_AFTER (1 s) of quiet: the loop's timer gives the empty pipe back.
    assert wait_until(lambda: pipe_count() == baseline), "the quiet tunnel kept its pipe"
    assert not link.done.called.is_set()
    link.round_trip(b"still there?", b"yes")
    link.client.shutdown(socket.SHUT_WR)
    link.target.shutdown(socket.SHUT_WR)
    res = link.done.wait()
    assert (res.a_to_b, res.b_to_a, res.reason) == (len(data) + 12, 3, "eof")
    assert pipe_count() == baseline


# ---- one loop, many tunnels ----


@needs_proc_fd
def test_three_hundred_tunnels_in_one_loop_leak_nothing(
    loop: EventLoop, links: Callable[[], Link], mode: str
) -> None:
    loop.start()  # its own descriptors (wake-up pipe, epoll) are part of the baseline
    baseline = open_fds()
    made = [links() for _ in range(300)]
    for link in made:
        link.add_to(loop, mode=mode)
    assert loop.tunnel_count == 300
    ups = [f"tunnel {i} up ".encode() * (1 + i % 5) for i in range(len(made))]
    downs = [f"tunnel {i} down ".encode() * (1 + i % 3) for i in range(len(made))]

    for link, up in zip(made, ups, strict=True):
        link.client.sendall(up)
    for link, up, down in zip(made, ups, downs, strict=True):
        assert recv_exactly(link.target, len(up)) == up
        link.target.sendall(down)
    for link, down in zip(made, downs, strict=True):
        assert recv_exactly(link.client, len(down)) == down
    for link in made:
        link.client.shutdown(socket.SHUT_WR)
        link.target.shutdown(socket.SHUT_WR)

    for link, up, down in zip(made, ups, downs, strict=True):
        res = link.done.wait()
        assert (res.a_to_b, res.b_to_a, res.reason, res.mode) == (len(up), len(down), "eof", mode)
        assert recv_all(link.client) == b"" and recv_all(link.target) == b""
    assert loop.tunnel_count == 0
    assert {link.done.thread for link in made} == {loop.name}
    for link in made:
        link.close()
    leftover = {fd: target for fd, target in open_fds().items() if baseline.get(fd) != target}
    assert not leftover, f"descriptors left behind: {leftover}"


# ---- close() and failures ----


@needs_proc_fd
def test_close_ends_open_tunnels_calls_on_done_and_stops_the_thread(
    links: Callable[[], Link], mode: str
) -> None:
    baseline = open_fds()
    event_loop = EventLoop("closing-loop")
    made = [links().add_to(event_loop, mode=mode) for _ in range(3)]
    for i, link in enumerate(made):
        link.round_trip(b"x" * (i + 1), b"y" * 10 * (i + 1))
    assert event_loop.tunnel_count == 3
    assert any(t.name == "closing-loop" for t in threading.enumerate())

    assert event_loop.close(TIMEOUT) == 3
    for i, link in enumerate(made):
        assert link.done.called.is_set(), "close() returns after every on_done"
        assert link.done.calls == [
            (RelayResult(i + 1, 10 * (i + 1), "abort", "loop closed"), "closing-loop")
        ]
        assert recv_all(link.client) == b"" and recv_all(link.target) == b""
    assert event_loop.tunnel_count == 0
    assert not any(t.name == "closing-loop" for t in threading.enumerate())
    # Nothing of the loop or its tunnels is left: no pipe (splice held one per direction),
    # no epoll, no wake-up pipe.
    for link in made:
        link.close()
    leftover = {fd: target for fd, target in open_fds().items() if baseline.get(fd) != target}
    assert not leftover, f"descriptors left behind: {leftover}"

    a, b = socket.socketpair()
    with a, b:
        with pytest.raises(RuntimeError):
            event_loop.add(a, b, Done())
        with pytest.raises(RuntimeError):
            event_loop.start()
    assert event_loop.tunnel_count == 0


def test_close_before_any_tunnel_starts_no_thread() -> None:
    before = set(threading.enumerate())
    event_loop = EventLoop("never-started")
    assert event_loop.close(TIMEOUT) == 0
    assert set(threading.enumerate()) <= before
    a, b = socket.socketpair()
    with a, b, pytest.raises(RuntimeError):
        event_loop.add(a, b, Done())


def test_add_checks_its_arguments(loop: EventLoop) -> None:
    a, b = socket.socketpair()
    with a, b:
        with pytest.raises(ValueError, match="relay mode"):
            loop.add(a, b, Done(), mode="teleport")
        with pytest.raises(ValueError, match="idle_timeout"):
            loop.add(a, b, Done(), idle_timeout=0)
        with pytest.raises(ValueError, match="distinct"):
            loop.add(a, a, Done())
    assert loop.tunnel_count == 0


def test_an_on_done_that_raises_is_logged_and_the_loop_goes_on(
    loop: EventLoop, links: Callable[[], Link], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="socks5d.core.eventloop")
    broken_link = links()
    results: list[RelayResult] = []

    def broken(result: RelayResult) -> None:
        results.append(result)
        raise ZeroDivisionError("a bug in on_done")

    loop.add(broken_link.a, broken_link.b, broken, idle_timeout=0.2)
    broken_link.round_trip(b"abc", b"defg")

    def logged() -> bool:
        return any(
            r.name == "socks5d.core.eventloop"
            and "on_done failed" in r.getMessage()
            and r.exc_info is not None
            and r.exc_info[0] is ZeroDivisionError
            for r in caplog.records
        )

    assert wait_until(logged), "the failing on_done was not logged with its traceback"
    assert results == [RelayResult(3, 4, "idle", "idle timeout")]
    # on_done closed nothing; the loop did, so the peers see the end.
    assert recv_all(broken_link.client) == b"" and recv_all(broken_link.target) == b""

    # The loop's thread is alive and serves the next tunnel.
    link = links().add_to(loop)
    link.round_trip(b"after", b"the bug")
    link.client.shutdown(socket.SHUT_WR)
    link.target.shutdown(socket.SHUT_WR)
    res = link.done.wait()
    assert (res.a_to_b, res.b_to_a, res.reason) == (5, 7, "eof")
    assert loop.tunnel_count == 0


# ---- EventLoopPool ----


def test_a_pool_spreads_tunnels_over_its_loops(listener: socket.socket) -> None:
    with pytest.raises(ValueError):
        EventLoopPool(0)
    pool = EventLoopPool(2, name="test-pool")
    made = [Link(listener) for _ in range(4)]
    closed = False
    try:
        for link in made:
            link.add_to(pool)
        assert [h.tunnel_count for h in pool.loops] == [2, 2], "least loaded first"
        assert pool.tunnel_count == 4

        # Bulk through all four at once, two per loop.
        payloads = [random.Random(i).randbytes(2 * MiB) for i in range(4)]
        workers = []
        for link, data in zip(made, payloads, strict=True):
            workers += [
                Worker(link.client.sendall, data),
                Worker(recv_exactly, link.target, len(data)),
            ]
        for worker in workers:
            worker.start()
        for worker, data in zip(workers[1::2], payloads, strict=True):
            assert worker.result() == data
        for worker in workers[0::2]:
            worker.result()

        # End the two on the first loop: the next tunnel goes there.
        for link in made[0::2]:
            link.client.shutdown(socket.SHUT_WR)
            link.target.shutdown(socket.SHUT_WR)
        for link, data in zip(made[0::2], payloads[0::2], strict=True):
            res = link.done.wait()
            assert (res.a_to_b, res.b_to_a, res.reason) == (len(data), 0, "eof")
            assert link.done.thread == "test-pool-0"
        assert [h.tunnel_count for h in pool.loops] == [0, 2]
        late = Link(listener)
        made.append(late)
        late.add_to(pool)
        assert [h.tunnel_count for h in pool.loops] == [1, 2]
        late.round_trip(b"late", b"comer")

        closed = True
        assert pool.close(TIMEOUT) == 3
        for link in [*made[1::2], late]:
            assert link.done.calls[0][0].reason == "loop closed"
        assert {link.done.thread for link in made} == {"test-pool-0", "test-pool-1"}
        assert pool.tunnel_count == 0
        assert not any(t.name.startswith("test-pool-") for t in threading.enumerate())
        a, b = socket.socketpair()
        with a, b, pytest.raises(RuntimeError):
            pool.add(a, b, Done())
    finally:
        if not closed:
            pool.close(TIMEOUT)
        for link in made:
            link.close()


# ---- the server: detach_request / reclaim_request ----


@dataclass
class Handover:
    request: socket.socket
    finish: Callable[[], None] | None
    thread: threading.Thread
    reclaimed: tuple[bool, ...] = ()


class HandingServer(EventLoopTCPServer):
    """Handlers put what they hand over in ``handed``; threads exit after one request."""

    max_idle_threads = 0  # so the test can join the thread that served a request

    def __init__(self, handler: type[BaseRequestHandler], **kwargs: Any) -> None:
        self.handed: queue.Queue[Handover] = queue.Queue()
        super().__init__(("127.0.0.1", 0), handler, **kwargs)


class Detaching(BaseRequestHandler):
    """Passes the request on (to the test) and returns."""

    server: HandingServer

    def handle(self) -> None:
        finish = self.server.detach_request(self.request)
        self.server.handed.put(Handover(self.request, finish, threading.current_thread()))


class Reclaiming(BaseRequestHandler):
    """Detaches, then takes the request back (the hand-over failed) and returns."""

    server: HandingServer

    def handle(self) -> None:
        never_detached = self.server.reclaim_request(self.request)
        self.server.detach_request(self.request)
        first = self.server.reclaim_request(self.request)
        second = self.server.reclaim_request(self.request)
        self.server.handed.put(
            Handover(
                self.request, None, threading.current_thread(), (never_detached, first, second)
            )
        )


@contextlib.contextmanager
def serving(server: EventLoopTCPServer) -> Iterator[EventLoopTCPServer]:
    thread = threading.Thread(target=server.serve_forever, args=(0.1,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        thread.join(TIMEOUT)
        server.abort_active_requests()
        server.server_close()
        assert not thread.is_alive(), "serve_forever() did not return after shutdown()"


def handed_over(server: HandingServer) -> Handover:
    """The next hand-over, once the thread that served it has returned."""
    handover = server.handed.get(timeout=TIMEOUT)
    handover.thread.join(TIMEOUT)
    assert not handover.thread.is_alive(), "the handler thread did not return"
    handover.request.settimeout(TIMEOUT)
    return handover


def test_a_detached_request_outlives_its_thread_and_stays_counted() -> None:
    with serving(HandingServer(Detaching)) as server:
        with socket.create_connection(server.server_address, timeout=TIMEOUT) as client:
            handover = handed_over(server)
            assert server.active_count == 1
            assert server.active_for("127.0.0.1") == 1
            assert server.wait_for_idle(0.05) == 1
            # Its thread is gone, the connection is not: both ways still work.
            client.sendall(b"ping")
            assert recv_exactly(handover.request, 4) == b"ping"
            handover.request.sendall(b"pong")
            assert recv_exactly(client, 4) == b"pong"

            assert handover.finish is not None
            handover.finish()
            assert server.active_count == 0
            assert server.active_for("127.0.0.1") == 0
            assert server.wait_for_idle(TIMEOUT) == 0
            assert handover.request.fileno() == -1
            assert recv_all(client) == b""


def test_a_new_owner_thread_serves_the_request_and_ends_it_with_finish() -> None:
    class ToOwner(BaseRequestHandler):
        server: HandingServer

        def handle(self) -> None:
            finish = self.server.detach_request(self.request)
            owner = threading.Thread(target=echo_then_finish, args=(self.request, finish))
            owner.start()
            self.server.handed.put(Handover(self.request, finish, threading.current_thread()))

    def echo_then_finish(request: socket.socket, finish: Callable[[], None]) -> None:
        request.settimeout(TIMEOUT)
        try:
            while chunk := request.recv(65536):
                request.sendall(chunk[::-1])
        finally:
            finish()

    with serving(HandingServer(ToOwner)) as server:
        with socket.create_connection(server.server_address, timeout=TIMEOUT) as client:
            handed_over(server)
            for message in (b"first", b"second message", b"3"):
                client.sendall(message)
                assert recv_exactly(client, len(message)) == message[::-1]
            assert server.active_count == 1
            client.shutdown(socket.SHUT_WR)
            assert recv_all(client) == b""
            assert server.active_count == 0, "finish() frees the slot before the EOF"


def test_a_detached_request_holds_its_max_connections_slot() -> None:
    with serving(HandingServer(Detaching, max_connections=1)) as server:
        first = socket.create_connection(server.server_address, timeout=TIMEOUT)
        with first:
            handover = handed_over(server)
            # The only slot is taken by the detached request: the next client is refused.
            with socket.create_connection(server.server_address, timeout=TIMEOUT) as refused:
                assert recv_all(refused) == b""
            assert server.handed.empty()

            assert handover.finish is not None
            handover.finish()
            with socket.create_connection(server.server_address, timeout=TIMEOUT) as third:
                served = handed_over(server)
                assert served.request.getpeername() == third.getsockname()
                assert served.finish is not None
                served.finish()
                assert recv_all(third) == b""
            assert recv_all(first) == b""


def test_abort_active_requests_shuts_down_detached_requests() -> None:
    with serving(HandingServer(Detaching)) as server:
        with socket.create_connection(server.server_address, timeout=TIMEOUT) as client:
            handover = handed_over(server)
            assert server.abort_active_requests() == 1
            assert recv_all(client) == b"", "the client sees the abort"
            assert handover.request.recv(1) == b"", "the new owner sees it too"
            assert server.active_count == 1, "counted until its owner calls finish()"
            assert handover.finish is not None
            handover.finish()
            assert server.active_count == 0


def test_a_reclaimed_request_is_ended_by_its_thread() -> None:
    with serving(HandingServer(Reclaiming)) as server:
        with socket.create_connection(server.server_address, timeout=TIMEOUT) as client:
            handover = server.handed.get(timeout=TIMEOUT)
            assert handover.reclaimed == (False, True, False)
            assert recv_all(client) == b"", "the thread closed the reclaimed request"
            # The slot is free once the client has seen EOF.
            assert server.active_count == 0
            handover.thread.join(TIMEOUT)
            assert handover.request.fileno() == -1


# ---- the SOCKS handler with a loop ----


@pytest.mark.parametrize("relay_threads", [2, 0], ids=["loop", "inline"])
def test_connect_relays_four_mib_each_way(
    target_factory: Callable[..., TargetServer],
    caplog: pytest.LogCaptureFixture,
    relay_threads: int,
) -> None:
    rng = random.Random(relay_threads)
    up, down = rng.randbytes(4 * MiB), rng.randbytes(4 * MiB)
    arrived: list[tuple[str, int]] = []

    def exchange(conn: socket.socket) -> None:
        sender = Worker(send_and_shut, conn, down)
        sender.start()
        arrived.append(sha256_of_stream(conn))
        sender.result()

    target = target_factory(exchange)
    caplog.set_level(logging.INFO, logger="socks5d.access")
    with running_proxy(relay_threads=relay_threads) as proxy:
        with connect_through(proxy.address, ipv4(target.port)) as client:
            sender = Worker(send_and_shut, client, up)
            sender.start()
            assert sha256_of_stream(client) == sha(down)
            sender.result()

        def access_records() -> list[logging.LogRecord]:
            return [r for r in caplog.records if r.name == "socks5d.access"]

        assert wait_until(lambda: len(access_records()) == 1)
        assert wait_until(lambda: proxy.server.active_count == 0)  # type: ignore[attr-defined]
        assert wait_until(lambda: len(arrived) == 1)
        assert arrived == [sha(up)]
        record = access_records()[0]
        session = record.access  # type: ignore[attr-defined]
        assert (session.up, session.down) == (len(up), len(down))
        assert session.end in ("client eof", "target eof")
        # Where the tunnel ended (and its line was written): a loop, or the handler thread.
        assert record.threadName.startswith("relay-loop-" if relay_threads else "handler")
        if relay_threads:
            assert proxy.server.loops.tunnel_count == 0  # type: ignore[attr-defined]


@pytest.mark.parametrize("relay_threads", [2, 0], ids=["loop", "inline"])
def test_idle_tunnels_hold_no_handler_threads_with_a_loop(
    listener: socket.socket, relay_threads: int
) -> None:
    count = 50
    with running_proxy(relay_threads=relay_threads) as proxy:
        server: Any = proxy.server
        before = set(threading.enumerate())
        clients: list[socket.socket] = []
        upstreams: list[socket.socket] = []
        try:
            for _ in range(count):
                clients.append(connect_through(proxy.address, ipv4(listener.getsockname()[1])))
                upstream, _ = listener.accept()  # the proxy connected before it replied
                upstream.settimeout(TIMEOUT)
                upstreams.append(upstream)
            assert server.active_count == count
            new_threads = [t for t in threading.enumerate() if t not in before]
            if relay_threads:
                assert wait_until(lambda: server.loops.tunnel_count == count)
                assert len(new_threads) < 10, f"{len(new_threads)} threads for {count} tunnels"
            else:
                assert len(new_threads) >= count, "inline: a handler thread per tunnel"

            for i, (client, upstream) in enumerate(zip(clients, upstreams, strict=True)):
                client.sendall(bytes([i]))
                assert recv_exactly(upstream, 1) == bytes([i])
                upstream.sendall(bytes([255 - i]))
                assert recv_exactly(client, 1) == bytes([255 - i])
        finally:
            for sock in clients + upstreams:
                sock.close()
        assert wait_until(lambda: server.active_count == 0)
        if relay_threads:
            assert server.loops.tunnel_count == 0


def test_abort_active_requests_ends_loop_tunnels(
    listener: socket.socket, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="socks5d.access")
    with running_proxy(relay_threads=1) as proxy:
        server: Any = proxy.server
        with connect_through(proxy.address, ipv4(listener.getsockname()[1])) as client:
            upstream, _ = listener.accept()
            with upstream:
                upstream.settimeout(TIMEOUT)
                client.sendall(b"hi")
                assert recv_exactly(upstream, 2) == b"hi"
                assert wait_until(lambda: server.loops.tunnel_count == 1)

                assert server.abort_active_requests() == 1
                assert recv_all(client) == b""
                assert recv_all(upstream) == b"", "the loop's on_done closed the upstream"
                assert wait_until(lambda: server.active_count == 0)
                assert server.loops.tunnel_count == 0
        records = [r for r in caplog.records if r.name == "socks5d.access"]
        assert [r.access.end for r in records] == ["abort hangup"]  # type: ignore[attr-defined]


def test_a_closed_loop_makes_the_handler_relay_inline(
    echo_target: TargetServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="socks5d.access")
    with running_proxy(relay_threads=1) as proxy:
        server: Any = proxy.server
        closed = EventLoopPool(1, name="closed-loop")
        closed.close(TIMEOUT)
        working, server.loops = server.loops, closed
        try:
            with connect_through(proxy.address, ipv4(echo_target.port)) as client:
                data = random.Random(3).randbytes(256 * 1024)
                sender = Worker(send_and_shut, client, data)
                sender.start()
                assert recv_all(client) == data
                sender.result()
            assert wait_until(lambda: server.active_count == 0)
        finally:
            server.loops = working  # the fixture closes this one
        records = [r for r in caplog.records if r.name == "socks5d.access"]
        assert len(records) == 1
        assert records[0].threadName == "handler"
        session = records[0].access  # type: ignore[attr-defined]
        assert (session.up, session.down) == (len(data), len(data))


# ---- regressions: bugs found in review, fixed ----


@needs_proc_fd
def test_a_second_close_leaves_other_descriptors_alone() -> None:
    event_loop = EventLoop("closed-twice")
    before = open_fds()
    event_loop.start()
    own = sorted(fd for fd, target in open_fds().items() if before.get(fd) != target)
    wake = [fd for fd in own if open_fds().get(fd, "").startswith("pipe:")]
    assert len(wake) == 2, f"the loop's descriptors: {own}"
    r, w = os.pipe()  # ours, opened while the loop's numbers are still taken
    os.set_blocking(r, False)
    assert event_loop.close(TIMEOUT) == 0

    # The process reuses the freed numbers (dup2 makes it deterministic): our pipe's.
    mine = []
    try:
        for fd in wake:
            os.dup2(w, fd)
            mine.append(fd)
        assert event_loop.close(TIMEOUT) == 0
        gone = []
        for fd in mine:
            try:
                os.fstat(fd)
            except OSError:
                gone.append(fd)
        with contextlib.suppress(BlockingIOError):
            stray = os.read(r, 16)
            assert stray == b"", f"close() wrote {stray!r} into a pipe that is not the loop's"
        assert not gone, f"the second close() closed descriptors {gone} it did not own"
    finally:
        for fd in (r, w, *mine):
            with contextlib.suppress(OSError):
                os.close(fd)


def test_an_add_racing_close_is_refused_or_ended(
    listener: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    event_loop = EventLoop("racing")
    event_loop.start()
    link = Link(listener)
    inside, go_on = threading.Event(), threading.Event()
    prepare = eventloop_module.prepare_sockets

    def held_prepare(*socks: socket.socket) -> Any:
        inside.set()  # add() is past start(), its "is the loop closed?" check
        assert go_on.wait(TIMEOUT)
        return prepare(*socks)

    monkeypatch.setattr(eventloop_module, "prepare_sockets", held_prepare)
    try:
        adder = Worker(event_loop.add, link.a, link.b, link.done)
        adder.start()
        assert inside.wait(TIMEOUT)
        assert event_loop.close(TIMEOUT) == 0  # the thread is gone
        go_on.set()
        adder.join(TIMEOUT)
        assert not adder.is_alive()
        refused = isinstance(adder.error, RuntimeError)
        # Either add() says the loop is closed, or the loop still ends the tunnel it took.
        assert refused or link.done.called.wait(2.0), "add() returned, on_done never came"
        assert event_loop.tunnel_count == 0
    finally:
        go_on.set()
        link.close()


class FailingLoops:
    """An event loop pool whose every call fails as a loop's first add() does when its pipe2 or
    epoll cannot be created (EMFILE): anything but the RuntimeError of a closed loop."""

    tunnel_count = 0

    def current(self) -> Any:
        return None

    def pick(self) -> Any:
        raise OSError(24, "Too many open files")

    def add(self, *args: Any, **kwargs: Any) -> None:
        raise OSError(24, "Too many open files")

    def close(self, timeout: float = 5.0) -> int:
        return 0


def test_a_failing_loop_leaves_the_connection_to_its_thread(listener: socket.socket) -> None:
    # Neither the handshake nor the tunnel can go to the loop: the handler thread serves
    # both, the bytes flow, and the request is ended and uncounted afterwards.
    with running_proxy(relay_threads=1) as proxy:
        server: Any = proxy.server
        working, server.loops = server.loops, FailingLoops()
        try:
            with connect_through(proxy.address, ipv4(listener.getsockname()[1])) as client:
                upstream, _ = listener.accept()
                with upstream:
                    upstream.settimeout(TIMEOUT)
                    client.sendall(b"up")
                    assert recv_exactly(upstream, 2) == b"up"
                    upstream.sendall(b"down")
                    assert recv_exactly(client, 4) == b"down"
                    upstream.shutdown(socket.SHUT_WR)
                    assert recv_all(client) == b""
            assert wait_until(lambda: server.active_count == 0, timeout=TIMEOUT)
        finally:
            server.loops = working


# ---- the loop for others: call_soon, timers, watchers, listeners ----


def run_in_loop(event_loop: EventLoop, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` in the loop's thread and return its result (bounded wait)."""
    answer: queue.Queue[Any] = queue.Queue()
    event_loop.call_soon(lambda: answer.put(fn()))
    return answer.get(timeout=TIMEOUT)


def test_call_soon_runs_in_the_loop_thread_in_order(loop: EventLoop) -> None:
    seen: queue.Queue[tuple[int, int]] = queue.Queue()
    for i in range(3):
        loop.call_soon(lambda i=i: seen.put((i, threading.get_ident())))
    got = [seen.get(timeout=TIMEOUT) for _ in range(3)]
    assert [i for i, _ in got] == [0, 1, 2]
    assert {ident for _, ident in got} == {loop.thread_ident}
    assert loop.thread_ident != threading.get_ident()


def test_timers_fire_in_deadline_order_and_cancelled_ones_never(loop: EventLoop) -> None:
    fired: queue.Queue[str] = queue.Queue()

    def arm() -> None:
        loop.call_later(0.2, lambda: fired.put("late"))
        loop.call_later(0.05, lambda: fired.put("early"))
        loop.call_later(0.1, lambda: fired.put("cancelled")).cancel()
        loop.call_later(0.3, lambda: fired.put("last"))

    loop.call_soon(arm)
    assert [fired.get(timeout=TIMEOUT) for _ in range(3)] == ["early", "late", "last"]
    assert fired.empty()


def test_cancelled_timers_do_not_pile_up_in_the_heap(loop: EventLoop) -> None:
    # A handshake timer is set and cancelled per connection; at thousands of connections
    # a second their heap entries must be compacted, not kept until they would fire.
    def churn() -> None:
        for _ in range(5000):
            loop.call_later(3600.0, lambda: None).cancel()

    loop.call_soon(churn)
    size = run_in_loop(loop, lambda: len(loop._timers))  # the loop ran its timers in between
    assert size <= 2 * eventloop_module._STALE_SLACK + 2


class RecordingWatcher:
    """A Watcher that keeps what the loop told it."""

    def __init__(self) -> None:
        self.events: queue.Queue[dict[int, int]] = queue.Queue()
        self.closed = threading.Event()

    def on_events(self, revents: dict[int, int]) -> None:
        self.events.put(dict(revents))

    def on_loop_close(self) -> None:
        self.closed.set()


def test_a_watcher_sees_readiness_and_hears_the_loop_close() -> None:
    import select as select_module

    event_loop = EventLoop("watch-loop")
    left, right = socket.socketpair()
    with left, right:
        watcher = RecordingWatcher()
        run_in_loop(
            event_loop, lambda: event_loop.watch(left.fileno(), select_module.POLLIN, watcher)
        )
        right.sendall(b"!")
        revents = watcher.events.get(timeout=TIMEOUT)
        assert revents.keys() == {left.fileno()} and revents[left.fileno()] & select_module.POLLIN
        run_in_loop(event_loop, lambda: event_loop.unwatch(left.fileno()))
        run_in_loop(
            event_loop, lambda: event_loop.watch(left.fileno(), select_module.POLLIN, watcher)
        )
        assert event_loop.close(TIMEOUT) == 0  # no tunnels; the watcher is let go
        assert watcher.closed.is_set()


def test_a_loop_accepts_from_a_listener_until_it_forgets_it(listener: socket.socket) -> None:
    listener.setblocking(False)
    accepted: queue.Queue[tuple[socket.socket, int]] = queue.Queue()

    def accept(sock: socket.socket) -> float:
        conn, _ = sock.accept()
        accepted.put((conn, threading.get_ident()))
        return 0.0

    pool = EventLoopPool(2)
    try:
        pool.serve_listeners([listener], accept)
        with socket.create_connection(listener.getsockname(), timeout=TIMEOUT) as first:
            conn, ident = accepted.get(timeout=TIMEOUT)
            with conn:
                assert ident in {loop.thread_ident for loop in pool.loops}
                conn.sendall(b"hi")
                assert recv_exactly(first, 2) == b"hi"
        pool.forget_listeners(TIMEOUT)
        # No loop watches it now: the next connection waits in the backlog for us.
        with socket.create_connection(listener.getsockname(), timeout=TIMEOUT):
            listener.settimeout(TIMEOUT)
            conn, _ = listener.accept()
            conn.close()
        assert accepted.empty()
    finally:
        pool.close(TIMEOUT)


@pytest.mark.parametrize("woken", [False, True], ids=["timer", "resume_listeners"])
def test_an_accept_back_off_stops_watching_until_it_ends(
    listener: socket.socket, woken: bool
) -> None:
    # accept() failing with EMFILE leaves the listener readable; the loop must not spin on
    # it but come back when the back-off ends, or at once when told that it is over (a
    # request closed and gave its descriptor back).
    listener.setblocking(False)
    pause = 30.0 if woken else 0.3
    calls: list[float] = []
    accepted: queue.Queue[socket.socket] = queue.Queue()

    def accept(sock: socket.socket) -> float:
        calls.append(time.monotonic())
        if len(calls) == 1:
            return time.monotonic() + pause  # "out of descriptors": pause
        conn, _ = sock.accept()
        accepted.put(conn)
        return 0.0

    event_loop = EventLoop("backoff-loop")
    try:
        event_loop.serve_listeners([listener], accept)
        with socket.create_connection(listener.getsockname(), timeout=TIMEOUT):
            if woken:
                assert wait_until(lambda: len(calls) == 1)
                event_loop.resume_listeners()
            conn = accepted.get(timeout=TIMEOUT)
            conn.close()
        assert len(calls) == 2  # one refusal, then one accept: no busy loop
        if woken:
            assert calls[1] - calls[0] < pause / 3  # not the timer
        else:
            assert calls[1] - calls[0] >= pause - 0.01
    finally:
        event_loop.close(TIMEOUT)
