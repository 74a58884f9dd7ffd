"""Tests for socks5d.relay: real TCP sockets on 127.0.0.1, the relay running in a thread.

Topology of every test::

    client <──TCP──> a ══ relay ══ b <──TCP──> target

Every wait is bounded (socket timeouts, join timeouts); nothing sleeps to synchronise.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import resource
import select
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from socks5d.relay import RelayResult, relay

TIMEOUT = 10.0  # upper bound for any single wait; a healthy run never comes close
MiB = 1024 * 1024
REPO = Path(__file__).resolve().parent.parent


def tcp_pair(
    *,
    connector: type[socket.socket] = socket.socket,
    connect_opts: dict[int, int] | None = None,
    accept_opts: dict[int, int] | None = None,
) -> tuple[socket.socket, socket.socket]:
    """Two connected TCP sockets: (the connecting one, the accepted one).

    ``connect_opts`` / ``accept_opts`` are SOL_SOCKET options; the connector's are set before
    ``connect`` and the listener's before ``accept`` (so buffer sizes shape the handshake).
    """
    with socket.create_server(("127.0.0.1", 0)) as listener:
        for opt, value in (accept_opts or {}).items():
            listener.setsockopt(socket.SOL_SOCKET, opt, value)
        listener.settimeout(TIMEOUT)
        conn = connector(socket.AF_INET, socket.SOCK_STREAM)
        for opt, value in (connect_opts or {}).items():
            conn.setsockopt(socket.SOL_SOCKET, opt, value)
        conn.settimeout(TIMEOUT)
        conn.connect(listener.getsockname())
        accepted, _ = listener.accept()
    accepted.settimeout(TIMEOUT)
    return conn, accepted


def recv_all(sock: socket.socket) -> bytes:
    """Read until EOF (each recv bounded by the socket timeout)."""
    chunks = []
    while chunk := sock.recv(MiB):
        chunks.append(chunk)
    return b"".join(chunks)


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        assert chunk, f"EOF after {len(buf)} of {n} bytes"
        buf += chunk
    return bytes(buf)


def sha256_of_stream(sock: socket.socket) -> tuple[str, int]:
    h = hashlib.sha256()
    total = 0
    while chunk := sock.recv(MiB):
        h.update(chunk)
        total += len(chunk)
    return h.hexdigest(), total


class Worker(threading.Thread):
    """A daemon thread that keeps its target's return value or exception."""

    def __init__(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        super().__init__(daemon=True)
        self._call = (fn, args, kwargs)
        self.value: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        fn, args, kwargs = self._call
        try:
            self.value = fn(*args, **kwargs)
        except BaseException as exc:
            self.error = exc

    def result(self, timeout: float = TIMEOUT) -> Any:
        self.join(timeout)
        assert not self.is_alive(), f"{self._call[0].__name__} still running after {timeout}s"
        if self.error is not None:
            raise self.error
        return self.value


def send_and_shut(sock: socket.socket, data: bytes) -> None:
    sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)


class Tunnel:
    """client <-> a == relay == b <-> target, with the relay running in a Worker."""

    def __init__(
        self,
        client: socket.socket,
        a: socket.socket,
        b: socket.socket,
        target: socket.socket,
    ) -> None:
        self.client, self.a, self.b, self.target = client, a, b, target
        self.worker: Worker | None = None

    def start(self, **kwargs: Any) -> Tunnel:
        self.worker = Worker(relay, self.a, self.b, **kwargs)
        self.worker.start()
        return self

    def result(self, timeout: float = TIMEOUT) -> RelayResult:
        assert self.worker is not None
        res = self.worker.result(timeout)
        assert isinstance(res, RelayResult)
        return res

    def close(self) -> None:
        for sock in (self.client, self.a, self.b, self.target):
            sock.close()
        if self.worker is not None:
            self.worker.join(TIMEOUT)


@pytest.fixture
def make_tunnel() -> Iterator[Callable[..., Tunnel]]:
    made: list[Tunnel] = []

    def make(
        *,
        a_to_client_opts: dict[int, int] | None = None,
        b_opts: dict[int, int] | None = None,
        target_opts: dict[int, int] | None = None,
        client_opts: dict[int, int] | None = None,
        b_class: type[socket.socket] = socket.socket,
    ) -> Tunnel:
        client, a = tcp_pair(connect_opts=client_opts, accept_opts=a_to_client_opts)
        b, target = tcp_pair(connector=b_class, connect_opts=b_opts, accept_opts=target_opts)
        tunnel = Tunnel(client, a, b, target)
        made.append(tunnel)
        return tunnel

    yield make
    for tunnel in made:
        tunnel.close()


def test_ten_mib_each_way_at_once_arrives_intact_with_exact_counts(
    make_tunnel: Callable[..., Tunnel],
) -> None:
    rng = random.Random(1928)
    up = rng.randbytes(10 * MiB)
    down = rng.randbytes(10 * MiB)
    t = make_tunnel().start()

    senders = [Worker(send_and_shut, t.client, up), Worker(send_and_shut, t.target, down)]
    readers = [Worker(sha256_of_stream, t.target), Worker(sha256_of_stream, t.client)]
    for w in senders + readers:
        w.start()
    for w in senders:
        w.result()
    assert readers[0].result() == (hashlib.sha256(up).hexdigest(), len(up))
    assert readers[1].result() == (hashlib.sha256(down).hexdigest(), len(down))

    res = t.result()
    assert (res.a_to_b, res.b_to_a) == (len(up), len(down))
    assert res.reason == "eof"
    assert res.closed_first in ("a", "b")


def test_pending_bytes_reach_target_before_later_client_data(
    make_tunnel: Callable[..., Tunnel],
) -> None:
    # Larger than the buffer, so delivering it takes several sends interleaved with polls.
    pending = b"P" * 5000 + b"<end of pipelined bytes>"
    later = b"L" * 3000
    t = make_tunnel().start(pending_a_to_b=pending, buffer_size=1024)

    t.client.sendall(later)
    t.client.shutdown(socket.SHUT_WR)
    assert recv_all(t.target) == pending + later
    t.target.shutdown(socket.SHUT_WR)

    res = t.result()
    assert res.a_to_b == len(pending) + len(later)
    assert (res.b_to_a, res.closed_first, res.reason) == (0, "a", "eof")


@pytest.mark.parametrize("first", ["client", "target"])
def test_half_close_passes_eof_and_keeps_the_other_direction_flowing(
    make_tunnel: Callable[..., Tunnel], first: str
) -> None:
    t = make_tunnel().start()
    closer, other = (t.client, t.target) if first == "client" else (t.target, t.client)
    request = b"request body, then my FIN"
    reply = random.Random(1929).randbytes(1 * MiB)

    send_and_shut(closer, request)
    assert recv_exactly(other, len(request)) == request
    assert other.recv(1) == b"", "the FIN must be passed on as EOF"
    # The tunnel is half-open now: the reverse direction still works, in full.
    reader = Worker(recv_all, closer)
    reader.start()
    send_and_shut(other, reply)
    assert reader.result() == reply

    res = t.result()
    assert res.reason == "eof"
    if first == "client":
        assert (res.closed_first, res.a_to_b, res.b_to_a) == ("a", len(request), len(reply))
    else:
        assert (res.closed_first, res.b_to_a, res.a_to_b) == ("b", len(request), len(reply))


def test_backpressure_bounds_what_the_relay_accepts_from_a_fast_sender(
    make_tunnel: Callable[..., Tunnel],
) -> None:
    buffer_size = 65536
    small = 128 * 1024  # fixed socket buffers disable autotuning, so the bound is tight
    t = make_tunnel(
        client_opts={socket.SO_SNDBUF: small},
        a_to_client_opts={socket.SO_RCVBUF: small},
        b_opts={socket.SO_SNDBUF: small},
        target_opts={socket.SO_RCVBUF: small},
    ).start(buffer_size=buffer_size)
    data = random.Random(1080).randbytes(64 * MiB)
    view = memoryview(data)

    # The client pushes without blocking until the pipeline has been stalled for 0.3 s
    # (nothing reads at the target), then we measure how much was accepted.
    t.client.setblocking(False)
    poller = select.poll()
    poller.register(t.client, select.POLLOUT)
    accepted = 0
    while accepted < len(data):
        try:
            accepted += t.client.send(view[accepted : accepted + 65536])
        except BlockingIOError:
            if not poller.poll(300):
                break
    socket_buffers = sum(
        s.getsockopt(socket.SOL_SOCKET, opt)
        for s, opt in [
            (t.client, socket.SO_SNDBUF),
            (t.a, socket.SO_RCVBUF),
            (t.b, socket.SO_SNDBUF),
            (t.target, socket.SO_RCVBUF),
        ]
    )
    bound = socket_buffers + 2 * buffer_size + 1 * MiB  # margin: loopback skb overhead
    assert accepted < bound, f"relay took {accepted} bytes with a stalled reader (> {bound})"

    # Now the target reads; the rest flows and everything arrives intact.
    t.client.settimeout(TIMEOUT)
    sender = Worker(send_and_shut, t.client, view[accepted:])
    sender.start()
    assert sha256_of_stream(t.target) == (hashlib.sha256(data).hexdigest(), len(data))
    sender.result()
    t.target.shutdown(socket.SHUT_WR)
    res = t.result()
    assert (res.a_to_b, res.b_to_a, res.reason) == (len(data), 0, "eof")


def test_target_reset_ends_the_relay_promptly_with_reason_reset(
    make_tunnel: Callable[..., Tunnel],
) -> None:
    t = make_tunnel().start()
    t.client.sendall(b"ping")
    assert recv_exactly(t.target, 4) == b"ping"

    # SO_LINGER on, timeout 0: close() sends RST instead of FIN.
    t.target.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    started = time.monotonic()
    t.target.close()
    res = t.result(timeout=2)
    assert time.monotonic() - started < 1
    assert (res.closed_first, res.reason, res.a_to_b, res.b_to_a) == ("b", "reset", 4, 0)

    t.a.close()  # what the handler does after relay() returns
    with contextlib.suppress(ConnectionResetError):  # EOF or a reset, never a hang
        assert t.client.recv(1) == b""


def test_idle_timeout_ends_a_quiet_tunnel(make_tunnel: Callable[..., Tunnel]) -> None:
    t = make_tunnel()
    started = time.monotonic()
    t.start(idle_timeout=0.3)
    res = t.result(timeout=3)
    elapsed = time.monotonic() - started
    assert 0.2 <= elapsed <= 2, elapsed
    assert (res.closed_first, res.reason, res.a_to_b, res.b_to_a) == ("idle", "idle timeout", 0, 0)


def test_idle_timeout_does_not_cut_a_tunnel_that_keeps_moving_bytes(
    make_tunnel: Callable[..., Tunnel],
) -> None:
    # Ping-pong for more than twice the idle timeout: every exchange restarts the idle clock.
    idle = 0.3
    t = make_tunnel().start(idle_timeout=idle)
    started = time.monotonic()
    rounds = 0
    while time.monotonic() - started < 2.5 * idle:
        t.client.sendall(b"ping")
        assert recv_exactly(t.target, 4) == b"ping"
        t.target.sendall(b"pong!")
        assert recv_exactly(t.client, 5) == b"pong!"
        rounds += 1
    assert t.worker is not None and t.worker.is_alive()
    t.client.shutdown(socket.SHUT_WR)
    t.target.shutdown(socket.SHUT_WR)
    res = t.result()
    assert (res.a_to_b, res.b_to_a, res.reason) == (4 * rounds, 5 * rounds, "eof")


@pytest.mark.parametrize("side", ["a", "b"])
def test_shutdown_rdwr_from_another_thread_aborts_an_idle_relay_within_a_second(
    make_tunnel: Callable[..., Tunnel], side: str
) -> None:
    t = make_tunnel().start()
    t.client.sendall(b"x")  # proves the relay loop is running before we pull the plug
    assert recv_exactly(t.target, 1) == b"x"

    started = time.monotonic()
    (t.a if side == "a" else t.b).shutdown(socket.SHUT_RDWR)  # how the server stops tunnels
    res = t.result(timeout=1)
    assert time.monotonic() - started < 1
    assert (res.closed_first, res.a_to_b, res.b_to_a) == ("abort", 1, 0)


HIGH_FD_SCRIPT = textwrap.dedent(
    """
    import hashlib, json, os, random, resource, socket, sys, threading
    from socks5d.relay import relay

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2048:
        resource.setrlimit(resource.RLIMIT_NOFILE, (2048, hard))

    def pair():
        with socket.create_server(("127.0.0.1", 0)) as listener:
            conn = socket.create_connection(listener.getsockname(), timeout=10)
            accepted, _ = listener.accept()
        return conn, accepted

    def high(sock, fd):
        # Move the socket onto descriptor `fd` (> 1024, beyond select()'s FD_SETSIZE).
        os.dup2(sock.fileno(), fd)
        sock.close()
        moved = socket.socket(fileno=fd)
        moved.settimeout(10)
        return moved

    client, a = pair()
    b, target = pair()
    client, a, b, target = (high(s, fd) for s, fd in zip((client, a, b, target), range(1500, 1504)))

    up = random.Random(1).randbytes(1 << 20)
    down = random.Random(2).randbytes(1 << 20)
    digests = {}

    def send(sock, data):
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)

    def read(sock, key):
        h = hashlib.sha256()
        while chunk := sock.recv(1 << 16):
            h.update(chunk)
        digests[key] = h.hexdigest()

    threads = [
        threading.Thread(target=send, args=(client, up)),
        threading.Thread(target=send, args=(target, down)),
        threading.Thread(target=read, args=(target, "up")),
        threading.Thread(target=read, args=(client, "down")),
    ]
    for t in threads:
        t.start()
    result = relay(a, b, idle_timeout=10)
    for t in threads:
        t.join(10)
    print(json.dumps({
        "fds": [s.fileno() for s in (client, a, b, target)],
        "a_to_b": result.a_to_b,
        "b_to_a": result.b_to_a,
        "reason": result.reason,
        "up_ok": digests.get("up") == hashlib.sha256(up).hexdigest(),
        "down_ok": digests.get("down") == hashlib.sha256(down).hexdigest(),
    }))
    """
)


def test_relays_through_descriptors_above_1024() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2048:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < 2048")
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    )
    proc = subprocess.run(
        [sys.executable, "-c", HIGH_FD_SCRIPT],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert min(out["fds"]) > 1024
    assert out == {
        "fds": [1500, 1501, 1502, 1503],
        "a_to_b": 1 << 20,
        "b_to_a": 1 << 20,
        "reason": "eof",
        "up_ok": True,
        "down_ok": True,
    }


class PartialSendCountingSocket(socket.socket):
    """A socket that counts the sends the kernel only partly accepted."""

    partial_sends = 0

    def send(self, data: Any, flags: int = 0) -> int:
        n = super().send(data, flags)
        if n < len(data):
            self.partial_sends += 1
        return n


def test_partial_writes_to_a_tiny_send_buffer_lose_nothing(
    make_tunnel: Callable[..., Tunnel],
) -> None:
    # The relay's outbound socket gets a tiny SO_SNDBUF before connect, like a slow target.
    t = make_tunnel(b_opts={socket.SO_SNDBUF: 4096}, b_class=PartialSendCountingSocket).start()
    data = random.Random(4).randbytes(4 * MiB)
    sender = Worker(send_and_shut, t.client, data)
    sender.start()
    assert sha256_of_stream(t.target) == (hashlib.sha256(data).hexdigest(), len(data))
    sender.result()
    t.target.shutdown(socket.SHUT_WR)
    assert t.result() == RelayResult(len(data), 0, "a", "eof")
    assert isinstance(t.b, PartialSendCountingSocket)
    assert t.b.partial_sends > 0, "the test did not exercise partial sends"


def test_sets_tcp_nodelay_and_restores_socket_timeouts(
    make_tunnel: Callable[..., Tunnel],
) -> None:
    t = make_tunnel()
    t.a.settimeout(7.0)
    t.b.settimeout(None)
    t.start(idle_timeout=0.05)
    assert t.result().closed_first == "idle"
    assert t.a.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    assert t.b.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    assert (t.a.gettimeout(), t.b.gettimeout()) == (7.0, None)


def test_works_on_unix_socketpairs_where_tcp_nodelay_does_not_apply() -> None:
    client, a = socket.socketpair()
    b, target = socket.socketpair()
    socks = (client, a, b, target)
    try:
        for s in socks:
            s.settimeout(TIMEOUT)
        worker = Worker(relay, a, b)
        worker.start()
        send_and_shut(client, b"hello")
        assert recv_all(target) == b"hello"
        send_and_shut(target, b"world")
        assert recv_all(client) == b"world"
        assert worker.result() == RelayResult(5, 5, "a", "eof")
    finally:
        for s in socks:
            s.close()


@pytest.mark.parametrize(
    "kwargs",
    [{"buffer_size": 0}, {"idle_timeout": 0}, {"idle_timeout": -1.0}],
)
def test_rejects_invalid_options(kwargs: dict[str, Any]) -> None:
    a, b = socket.socketpair()
    with a, b, pytest.raises(ValueError):
        relay(a, b, **kwargs)


def test_rejects_the_same_socket_twice() -> None:
    a, b = socket.socketpair()
    with a, b, pytest.raises(ValueError):
        relay(a, a)
