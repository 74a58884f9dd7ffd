"""Tests for socks5d.core.relay: real TCP sockets on 127.0.0.1, the relay running in a thread.

Topology of every test::

    client <──TCP──> a ══ relay ══ b <──TCP──> target

The behaviour tests run once per way of moving bytes (``mode``: "splice", "copy") and check
that the tunnel really used that way. Every wait is bounded (socket timeouts, join timeouts,
``wait_until`` deadlines); nothing sleeps to synchronise.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
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
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from streams import (
    MiB,
    Worker,
    needs_proc_fd,
    needs_splice,
    open_fds,
    send_and_shut,
    sha256_of_stream,
)

from socks5d.core import relay as relay_module
from socks5d.core.relay import RelayResult, relay

TIMEOUT = 10.0  # upper bound for any single wait; a healthy run never comes close
REPO = Path(__file__).resolve().parent.parent


def open_pipes() -> set[tuple[int, str]]:
    """The pipe descriptors (both ends of each pipe) as (fd, "pipe:[inode]")."""
    return {(fd, target) for fd, target in open_fds().items() if target.startswith("pipe:")}


def more_pipes_than(before: set[tuple[int, str]]) -> bool:
    return open_pipes() > before


def wait_until(condition: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    """Poll an observable condition (bounded); for states the relay does not announce."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


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
    make_tunnel: Callable[..., Tunnel], mode: str
) -> None:
    rng = random.Random(1928)
    up = rng.randbytes(10 * MiB)
    down = rng.randbytes(10 * MiB)
    t = make_tunnel().start(mode=mode)

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
    assert res.mode == mode


def test_pending_bytes_reach_target_before_later_client_data(
    make_tunnel: Callable[..., Tunnel], mode: str
) -> None:
    # Larger than the buffer, so delivering it takes several sends interleaved with polls.
    pending = b"P" * 5000 + b"<end of pipelined bytes>"
    later = b"L" * 3000
    t = make_tunnel().start(pending_a_to_b=pending, buffer_size=1024, mode=mode)

    t.client.sendall(later)
    t.client.shutdown(socket.SHUT_WR)
    assert recv_all(t.target) == pending + later
    t.target.shutdown(socket.SHUT_WR)

    res = t.result()
    assert res.a_to_b == len(pending) + len(later)
    assert (res.b_to_a, res.closed_first, res.reason, res.mode) == (0, "a", "eof", mode)


@pytest.mark.parametrize("first", ["client", "target"])
def test_half_close_passes_eof_and_keeps_the_other_direction_flowing(
    make_tunnel: Callable[..., Tunnel], first: str, mode: str
) -> None:
    t = make_tunnel().start(mode=mode)
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
    assert (res.reason, res.mode) == ("eof", mode)
    if first == "client":
        assert (res.closed_first, res.a_to_b, res.b_to_a) == ("a", len(request), len(reply))
    else:
        assert (res.closed_first, res.b_to_a, res.a_to_b) == ("b", len(request), len(reply))


def test_backpressure_bounds_what_the_relay_accepts_from_a_fast_sender(
    make_tunnel: Callable[..., Tunnel], mode: str
) -> None:
    buffer_size = 65536  # the bound on each direction's backlog: buffer, or bytes in the pipe
    small = 128 * 1024  # fixed socket buffers disable autotuning, so the bound is tight
    t = make_tunnel(
        client_opts={socket.SO_SNDBUF: small},
        a_to_client_opts={socket.SO_RCVBUF: small},
        b_opts={socket.SO_SNDBUF: small},
        target_opts={socket.SO_RCVBUF: small},
    ).start(buffer_size=buffer_size, mode=mode)
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
    assert (res.a_to_b, res.b_to_a, res.reason, res.mode) == (len(data), 0, "eof", mode)


def test_target_reset_ends_the_relay_promptly_with_reason_reset(
    make_tunnel: Callable[..., Tunnel], mode: str
) -> None:
    t = make_tunnel().start(mode=mode)
    t.client.sendall(b"ping")
    assert recv_exactly(t.target, 4) == b"ping"

    # SO_LINGER on, timeout 0: close() sends RST instead of FIN.
    t.target.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    started = time.monotonic()
    t.target.close()
    res = t.result(timeout=2)
    assert time.monotonic() - started < 1
    assert (res.closed_first, res.reason, res.a_to_b, res.b_to_a) == ("b", "reset", 4, 0)
    assert res.mode == mode

    t.a.close()  # what the handler does after relay() returns
    with contextlib.suppress(ConnectionResetError):  # EOF or a reset, never a hang
        assert t.client.recv(1) == b""


def test_idle_timeout_ends_a_quiet_tunnel(make_tunnel: Callable[..., Tunnel], mode: str) -> None:
    t = make_tunnel()
    started = time.monotonic()
    t.start(idle_timeout=0.3, mode=mode)
    res = t.result(timeout=3)
    elapsed = time.monotonic() - started
    assert 0.2 <= elapsed <= 2, elapsed
    assert (res.closed_first, res.reason, res.a_to_b, res.b_to_a) == ("idle", "idle timeout", 0, 0)


def test_idle_timeout_does_not_cut_a_tunnel_that_keeps_moving_bytes(
    make_tunnel: Callable[..., Tunnel], mode: str
) -> None:
    # Ping-pong for more than twice the idle timeout: every exchange restarts the idle clock.
    idle = 0.3
    t = make_tunnel().start(idle_timeout=idle, mode=mode)
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
    assert (res.a_to_b, res.b_to_a, res.reason, res.mode) == (4 * rounds, 5 * rounds, "eof", mode)


@pytest.mark.parametrize("side", ["a", "b"])
def test_shutdown_rdwr_from_another_thread_aborts_an_idle_relay_within_a_second(
    make_tunnel: Callable[..., Tunnel], side: str, mode: str
) -> None:
    t = make_tunnel().start(mode=mode)
    t.client.sendall(b"x")  # proves the relay loop is running before we pull the plug
    assert recv_exactly(t.target, 1) == b"x"

    started = time.monotonic()
    (t.a if side == "a" else t.b).shutdown(socket.SHUT_RDWR)  # how the server stops tunnels
    res = t.result(timeout=1)
    assert time.monotonic() - started < 1
    assert (res.closed_first, res.a_to_b, res.b_to_a, res.mode) == ("abort", 1, 0, mode)


HIGH_FD_SCRIPT = textwrap.dedent(
    """
    import hashlib, json, os, random, resource, socket, sys, threading
    from socks5d.core.relay import relay

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
    result = relay(a, b, idle_timeout=10, mode=sys.argv[1])
    for t in threads:
        t.join(10)
    print(json.dumps({
        "fds": [s.fileno() for s in (client, a, b, target)],
        "a_to_b": result.a_to_b,
        "b_to_a": result.b_to_a,
        "reason": result.reason,
        "mode": result.mode,
        "up_ok": digests.get("up") == hashlib.sha256(up).hexdigest(),
        "down_ok": digests.get("down") == hashlib.sha256(down).hexdigest(),
    }))
    """
)


def test_relays_through_descriptors_above_1024(mode: str) -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2048:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < 2048")
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    )
    proc = subprocess.run(
        [sys.executable, "-c", HIGH_FD_SCRIPT, mode],
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
        "mode": mode,
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


def count_partial_splices_into(monkeypatch: pytest.MonkeyPatch, fd: int) -> list[int]:
    """Wrap the relay's os.splice; the returned list grows by one per partial write to ``fd``."""
    real = relay_module._splice
    assert real is not None
    partial: list[int] = []

    def splice(src: int, dst: int, count: int, *args: Any, **kwargs: Any) -> int:
        n = real(src, dst, count, *args, **kwargs)
        if dst == fd and n < count:
            partial.append(n)
        return n

    monkeypatch.setattr(relay_module, "_splice", splice)
    return partial


def test_partial_writes_to_a_tiny_send_buffer_lose_nothing(
    make_tunnel: Callable[..., Tunnel], mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The relay's outbound socket gets a tiny SO_SNDBUF before connect, like a slow target.
    # Copy: a socket class counts partial sends. Splice: os.splice is counted instead (a
    # class that overrides send is never spliced; see the test after this one).
    b_class = PartialSendCountingSocket if mode == "copy" else socket.socket
    t = make_tunnel(b_opts={socket.SO_SNDBUF: 4096}, b_class=b_class)
    partial_splices = count_partial_splices_into(monkeypatch, t.b.fileno())
    t.start(mode=mode)
    data = random.Random(4).randbytes(4 * MiB)
    sender = Worker(send_and_shut, t.client, data)
    sender.start()
    assert sha256_of_stream(t.target) == (hashlib.sha256(data).hexdigest(), len(data))
    sender.result()
    t.target.shutdown(socket.SHUT_WR)
    res = t.result()
    assert res == RelayResult(len(data), 0, "a", "eof")
    assert res.mode == mode
    partial = t.b.partial_sends if isinstance(t.b, PartialSendCountingSocket) else partial_splices
    assert partial, "the test did not exercise partial writes"


@needs_splice
def test_socket_classes_that_override_io_are_copied_not_spliced(
    make_tunnel: Callable[..., Tunnel],
) -> None:
    # Splicing the descriptor would bypass the override (think ssl.SSLSocket).
    t = make_tunnel(b_opts={socket.SO_SNDBUF: 4096}, b_class=PartialSendCountingSocket)
    t.start(mode="splice")
    data = random.Random(5).randbytes(1 * MiB)
    send_and_shut(t.client, data)
    assert recv_all(t.target) == data
    t.target.shutdown(socket.SHUT_WR)
    res = t.result()
    assert (res.a_to_b, res.mode) == (len(data), "copy")
    assert isinstance(t.b, PartialSendCountingSocket) and t.b.partial_sends > 0


def test_sets_tcp_nodelay_and_restores_socket_timeouts(
    make_tunnel: Callable[..., Tunnel], mode: str
) -> None:
    t = make_tunnel()
    t.a.settimeout(7.0)
    t.b.settimeout(None)
    t.start(idle_timeout=0.05, mode=mode)
    assert t.result().closed_first == "idle"
    assert t.a.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    assert t.b.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    assert (t.a.gettimeout(), t.b.gettimeout()) == (7.0, None)


def relay_over_socketpairs(**kwargs: Any) -> RelayResult:
    """client <-AF_UNIX-> a == relay == b <-AF_UNIX-> target, one exchange each way."""
    client, a = socket.socketpair()
    b, target = socket.socketpair()
    socks = (client, a, b, target)
    try:
        for s in socks:
            s.settimeout(TIMEOUT)
        worker = Worker(relay, a, b, **kwargs)
        worker.start()
        send_and_shut(client, b"hello")
        assert recv_all(target) == b"hello"
        send_and_shut(target, b"world")
        assert recv_all(client) == b"world"
        res = worker.result()
        assert isinstance(res, RelayResult)
        return res
    finally:
        for s in socks:
            s.close()


def test_works_on_unix_socketpairs_where_tcp_nodelay_does_not_apply(mode: str) -> None:
    # Whether this kernel splices AF_UNIX or not, the bytes and counts are the same.
    assert relay_over_socketpairs(mode=mode) == RelayResult(5, 5, "a", "eof")


@needs_splice
@pytest.mark.parametrize(
    ("refused", "used"), [("socket to pipe", "copy"), ("pipe to socket", "mixed")]
)
def test_splice_falls_back_to_copy_when_the_kernel_refuses_the_socket(
    monkeypatch: pytest.MonkeyPatch, refused: str, used: str
) -> None:
    # Like a kernel without splice support for AF_UNIX: EINVAL for any AF_UNIX descriptor,
    # on the way in (nothing read yet) or on the way out (bytes already in the pipe: those
    # are read back and sent, hence "mixed").
    real = relay_module._splice
    assert real is not None

    def is_unix(fd: int) -> bool:
        if not os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
            return False  # one of the relay's pipes
        with socket.socket(fileno=os.dup(fd)) as sock:
            return sock.family == socket.AF_UNIX

    def splice(src: int, dst: int, count: int, *args: Any, **kwargs: Any) -> int:
        if is_unix(src if refused == "socket to pipe" else dst):
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real(src, dst, count, *args, **kwargs)

    monkeypatch.setattr(relay_module, "_splice", splice)
    pipes_before = open_pipes()
    res = relay_over_socketpairs(mode="splice")
    assert res == RelayResult(5, 5, "a", "eof")
    assert res.mode == used
    assert open_pipes() <= pipes_before


@needs_splice
def test_splice_forbidden_by_seccomp_is_not_tried_again(monkeypatch: pytest.MonkeyPatch) -> None:
    # systemd's SystemCallErrorNumber=EPERM: splice fails with EPERM. Copy instead, and let
    # later tunnels of this process skip splice altogether.
    monkeypatch.setattr(relay_module, "_splice_gone", False)
    calls: list[int] = []

    def splice(src: int, dst: int, count: int, *args: Any, **kwargs: Any) -> int:
        calls.append(src)
        raise PermissionError(errno.EPERM, os.strerror(errno.EPERM))

    monkeypatch.setattr(relay_module, "_splice", splice)
    assert relay_over_socketpairs(mode="splice").mode == "copy"
    assert calls
    calls.clear()
    assert relay_over_socketpairs(mode="splice").mode == "copy"
    assert calls == []


@needs_splice
def test_auto_copies_when_the_pipe_cannot_get_its_size(
    make_tunnel: Callable[..., Tunnel], monkeypatch: pytest.MonkeyPatch
) -> None:
    # An unprivileged user past /proc/sys/fs/pipe-user-pages-soft gets 2-page pipes that
    # F_SETPIPE_SZ may not grow; splicing through those loses to copying, so "auto" copies.
    # "splice" keeps splicing through whatever pipe it got.
    real_fcntl = relay_module.fcntl.fcntl

    def fcntl(fd: int, cmd: int, arg: int = 0) -> Any:
        if cmd == relay_module._F_SETPIPE_SZ:
            raise PermissionError(errno.EPERM, os.strerror(errno.EPERM))
        return real_fcntl(fd, cmd, arg)

    monkeypatch.setattr(relay_module.fcntl, "fcntl", fcntl)
    data = random.Random(6).randbytes(2 * MiB)
    for mode, used in [("auto", "copy"), ("splice", "splice")]:
        t = make_tunnel().start(mode=mode)
        send_and_shut(t.client, data)
        assert recv_all(t.target) == data
        send_and_shut(t.target, data)
        assert recv_all(t.client) == data
        res = t.result()
        assert (res.a_to_b, res.b_to_a, res.mode) == (len(data), len(data), used)


@needs_splice
def test_splice_moves_64_mib_through_a_tiny_receive_buffer(
    make_tunnel: Callable[..., Tunnel], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The target's tiny receive window keeps b's send buffer full, so splices into b come
    # out partial: the pipe holds the backlog, a is not read meanwhile, and nothing is lost
    # or reordered.
    t = make_tunnel(target_opts={socket.SO_RCVBUF: 4096})
    partial = count_partial_splices_into(monkeypatch, t.b.fileno())
    t.start(mode="splice")
    data = random.Random(7).randbytes(64 * MiB)
    sender = Worker(send_and_shut, t.client, data)
    sender.start()
    assert sha256_of_stream(t.target) == (hashlib.sha256(data).hexdigest(), len(data))
    sender.result()
    t.target.shutdown(socket.SHUT_WR)
    res = t.result()
    assert (res.a_to_b, res.b_to_a, res.reason, res.mode) == (len(data), 0, "eof", "splice")
    assert len(partial) >= 10, f"only {len(partial)} partial splices"


@needs_splice
def test_splice_sends_the_pending_bytes_first_even_to_a_slow_target(
    make_tunnel: Callable[..., Tunnel],
) -> None:
    # The pending bytes go out with plain sends (partial ones here: tiny window), and the
    # client's later bytes, spliced, only after the last pending byte.
    t = make_tunnel(target_opts={socket.SO_RCVBUF: 4096})
    rng = random.Random(8)
    pending, later = rng.randbytes(1 * MiB), rng.randbytes(4 * MiB)
    t.start(pending_a_to_b=pending, mode="splice")
    sender = Worker(send_and_shut, t.client, later)
    sender.start()
    assert sha256_of_stream(t.target) == (
        hashlib.sha256(pending + later).hexdigest(),
        len(pending) + len(later),
    )
    sender.result()
    t.target.shutdown(socket.SHUT_WR)
    res = t.result()
    assert (res.a_to_b, res.b_to_a, res.mode) == (len(pending) + len(later), 0, "splice")


def test_tcp_urgent_data_neither_stalls_nor_truncates_the_stream(
    make_tunnel: Callable[..., Tunnel], mode: str
) -> None:
    # splice stops for good at TCP's urgent mark (EAGAIN, or 0 once the FIN is in), where
    # recv skips the out-of-band byte: the relay must switch to recv, not spin or cut short.
    t = make_tunnel().start(mode=mode)
    t.client.sendall(b"abc")
    assert recv_exactly(t.target, 3) == b"abc"
    t.client.send(b"!", socket.MSG_OOB)
    t.client.sendall(b"def")
    t.client.shutdown(socket.SHUT_WR)
    assert recv_all(t.target) == b"def"
    t.target.shutdown(socket.SHUT_WR)
    res = t.result()
    assert (res.a_to_b, res.b_to_a, res.reason) == (6, 0, "eof")
    assert res.mode == ("mixed" if mode == "splice" else "copy")  # spliced "abc", copied "def"


@needs_proc_fd
def test_no_descriptor_leaks_after_many_relays(
    make_tunnel: Callable[..., Tunnel], mode: str
) -> None:
    # Every way a tunnel ends; but for idle ones, with bytes still on their way to a target
    # that does not read, so a splice tunnel ends with its pipes open (and holding data).
    before = open_fds()
    stuck = random.Random(9).randbytes(512 * 1024)
    reasons = {
        "eof": {"eof"},
        "reset": {"reset"},
        "abort": {"hangup", "reset"},  # an abort while writing into b may surface as EPIPE
        "idle": {"idle timeout"},
    }
    for ending in list(reasons) * 10:
        t = make_tunnel(target_opts={socket.SO_RCVBUF: 4096})
        pipes_before = open_pipes()
        t.start(mode=mode, idle_timeout=0.05 if ending == "idle" else None)
        if ending == "eof":
            send_and_shut(t.client, b"bye")
            assert recv_all(t.target) == b"bye"
            send_and_shut(t.target, b"bye")
            assert recv_all(t.client) == b"bye"
        elif ending != "idle":
            t.client.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                t.client.send(stuck)
            if mode == "splice":
                wait_until(functools.partial(more_pipes_than, pipes_before), "the relay's pipe")
            if ending == "reset":
                t.target.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01" + b"\x00" * 7)
                t.target.close()
            else:
                t.b.shutdown(socket.SHUT_RDWR)  # how the server aborts a tunnel
        assert t.result().reason in reasons[ending]
        t.close()
    leaked = {fd: target for fd, target in open_fds().items() if before.get(fd) != target}
    assert leaked == {}


@needs_splice
@needs_proc_fd
def test_pipes_are_closed_when_the_loop_raises(
    make_tunnel: Callable[..., Tunnel], monkeypatch: pytest.MonkeyPatch
) -> None:
    real = relay_module._splice
    assert real is not None
    calls = 0

    def splice(src: int, dst: int, count: int, *args: Any, **kwargs: Any) -> int:
        nonlocal calls
        calls += 1
        if calls > 3:
            raise RuntimeError("a bug in the loop")
        return real(src, dst, count, *args, **kwargs)

    monkeypatch.setattr(relay_module, "_splice", splice)
    pipes_before = open_pipes()
    t = make_tunnel()
    t.a.settimeout(3.0)
    t.start(mode="splice")
    t.client.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        t.client.send(random.Random(10).randbytes(1 * MiB))
    with pytest.raises(RuntimeError, match="a bug in the loop"):
        t.result()
    assert open_pipes() <= pipes_before
    assert t.a.gettimeout() == 3.0


def test_an_idle_tunnel_holds_no_pipe_and_no_buffer(
    monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    # Run in this thread until the idle timeout, tracing allocations: no buffer (copy),
    # no pipe (splice), and a few KiB of Python objects in all.
    pipes: list[tuple[int, int]] = []
    real_pipe2 = os.pipe2

    def pipe2(flags: int) -> tuple[int, int]:
        pipes.append(real_pipe2(flags))
        return pipes[-1]

    monkeypatch.setattr(os, "pipe2", pipe2)
    client, a = tcp_pair()
    b, target = tcp_pair()
    with client, a, b, target:
        tracemalloc.start()
        try:
            baseline = tracemalloc.get_traced_memory()[0]
            res = relay(a, b, idle_timeout=0.1, mode=mode, buffer_size=1 * MiB)
            peak = tracemalloc.get_traced_memory()[1] - baseline
        finally:
            tracemalloc.stop()
    assert (res.reason, res.mode) == ("idle timeout", mode)
    assert pipes == []
    assert peak <= 10 * 1024, f"an idle tunnel allocated {peak} bytes"


def pipe_sizes(pipes: set[tuple[int, str]]) -> list[int]:
    return sorted(fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ) for fd, _ in pipes)


@needs_proc_fd
def test_a_quiet_tunnel_gives_its_pipes_and_buffers_back(
    make_tunnel: Callable[..., Tunnel], monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    # Small exchanges only ever get the first, small pipe (64 KiB), and once the tunnel
    # is quiet for RELEASE_AFTER seconds, not even that; copying needs no buffer of its own.
    monkeypatch.setattr(relay_module, "RELEASE_AFTER", 0.5)
    first = relay_module._FIRST_CHUNK
    pipes_before = open_pipes()
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        t = make_tunnel().start(mode=mode)
        for _ in range(2):  # the second round trip proves a released tunnel still works
            t.client.sendall(b"ping")
            assert recv_exactly(t.target, 4) == b"ping"
            t.target.sendall(b"pong")
            assert recv_exactly(t.client, 4) == b"pong"
            if mode == "splice":
                assert pipe_sizes(open_pipes() - pipes_before) == [first] * 4  # 2 fds each
                wait_until(lambda: open_pipes() <= pipes_before, "the pipes to be closed")
            else:
                # Both directions read into the relay thread's one scratch buffer (made
                # once per thread): the tunnel holds no buffer of its own, busy or quiet.
                assert tracemalloc.get_traced_memory()[0] - baseline < first + 16384
    finally:
        tracemalloc.stop()
    send_and_shut(t.client, b"")
    send_and_shut(t.target, b"")
    res = t.result()
    assert (res.a_to_b, res.b_to_a, res.reason, res.mode) == (8, 8, "eof", mode)


@needs_proc_fd
def test_a_bulk_transfer_grows_the_pipe_or_buffer_to_buffer_size(
    make_tunnel: Callable[..., Tunnel], mode: str
) -> None:
    buffer_size = 1 * MiB  # /proc/sys/fs/pipe-max-size by default
    pipes_before = open_pipes()
    data = random.Random(11).randbytes(32 * MiB)
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        t = make_tunnel().start(mode=mode, buffer_size=buffer_size)
        sender = Worker(send_and_shut, t.client, data)
        sender.start()  # the target does not read yet: the a->b backlog fills up
        if mode == "splice":
            wait_until(
                lambda: buffer_size in pipe_sizes(open_pipes() - pipes_before), "a grown pipe"
            )
        else:
            wait_until(
                lambda: tracemalloc.get_traced_memory()[0] - baseline >= buffer_size,
                "a grown buffer",
            )
    finally:
        tracemalloc.stop()
    assert sha256_of_stream(t.target) == (hashlib.sha256(data).hexdigest(), len(data))
    sender.result()
    t.target.shutdown(socket.SHUT_WR)
    res = t.result()
    assert (res.a_to_b, res.b_to_a, res.reason, res.mode) == (len(data), 0, "eof", mode)


def test_mode_none_follows_the_module_default(monkeypatch: pytest.MonkeyPatch) -> None:
    assert relay_module.get_default_mode() == "auto"
    monkeypatch.setattr(relay_module, "_default_mode", "auto")  # restored after the test
    relay_module.set_default_mode("copy")
    assert relay_over_socketpairs().mode == "copy"
    with pytest.raises(ValueError, match="relay mode"):
        relay_module.set_default_mode("zero-copy")
    assert relay_module.get_default_mode() == "copy"


@pytest.mark.parametrize(
    "kwargs",
    [{"buffer_size": 0}, {"idle_timeout": 0}, {"idle_timeout": -1.0}, {"mode": "fast"}],
)
def test_rejects_invalid_options(kwargs: dict[str, Any]) -> None:
    a, b = socket.socketpair()
    with a, b, pytest.raises(ValueError):
        relay(a, b, **kwargs)


def test_rejects_the_same_socket_twice() -> None:
    a, b = socket.socketpair()
    with a, b, pytest.raises(ValueError):
        relay(a, a)


@pytest.mark.skipif(not relay_module.SPLICE_AVAILABLE, reason="os.splice is not available here")
def test_auto_copies_small_exchanges_and_splices_bulk(make_tunnel: Callable[..., Tunnel]) -> None:
    small = make_tunnel().start(mode="auto")
    small.client.sendall(b"GET / HTTP/1.0\r\n\r\n")
    assert recv_exactly(small.target, 18) == b"GET / HTTP/1.0\r\n\r\n"
    small.target.sendall(b"HTTP/1.0 200 OK\r\n\r\n")
    small.target.shutdown(socket.SHUT_WR)
    assert recv_all(small.client) == b"HTTP/1.0 200 OK\r\n\r\n"
    small.client.shutdown(socket.SHUT_WR)
    assert small.result().mode == "copy"  # no pipe for a few hundred bytes

    bulk = make_tunnel().start(mode="auto")
    blob = random.Random(8305).randbytes(4 * MiB)
    sender = Worker(send_and_shut, bulk.target, blob)
    sender.start()
    bulk.client.shutdown(socket.SHUT_WR)
    assert recv_all(bulk.client) == blob
    sender.result()
    result = bulk.result()
    assert result.b_to_a == len(blob)
    assert result.mode == "mixed"  # copied the first bytes, then spliced the rest


# ---- socket buffers (server.socket_buffer) ----


@pytest.mark.parametrize(
    ("setting", "peer", "size"),
    [
        ("auto", "127.0.0.1", relay_module.LOCAL_SOCKET_BUFFER),
        ("auto", "127.3.2.1", relay_module.LOCAL_SOCKET_BUFFER),
        ("auto", "::1", relay_module.LOCAL_SOCKET_BUFFER),
        ("auto", "::ffff:127.0.0.1", relay_module.LOCAL_SOCKET_BUFFER),
        ("auto", "192.0.2.7", 0),  # a real network: the kernel's autotuning
        ("auto", "2001:db8::1", 0),
        ("auto", "::ffff:192.0.2.7", 0),
        (0, "127.0.0.1", 0),
        (65536, "192.0.2.7", 65536),
    ],
)
def test_socket_buffer_is_fixed_for_loopback_peers_only_on_auto(
    setting: int | str, peer: str, size: int
) -> None:
    assert relay_module.socket_buffer_for(setting, peer) == size


@pytest.mark.parametrize(
    ("connections", "size"),
    [
        (0, 512 * 1024),
        (1, 512 * 1024),
        (2, 512 * 1024),
        (3, 349525),  # 1 MiB / 3
        (4, 256 * 1024),
        (8, 256 * 1024),
        (10_000, 256 * 1024),
    ],
)
def test_loopback_buffers_shrink_as_connections_share_the_cache(
    connections: int, size: int
) -> None:
    assert relay_module.socket_buffer_for("auto", "127.0.0.1", connections) == size
    assert relay_module.socket_buffer_for(65536, "127.0.0.1", connections) == 65536
    assert relay_module.socket_buffer_for("auto", "192.0.2.7", connections) == 0


def test_fix_socket_buffers_sets_both_and_zero_leaves_autotuning() -> None:
    with socket.socket() as fixed, socket.socket() as untouched:
        default = untouched.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        relay_module.fix_socket_buffers(fixed, 131072)
        relay_module.fix_socket_buffers(untouched, 0)
        # Linux doubles the value for its bookkeeping; others keep it.
        for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            assert fixed.getsockopt(socket.SOL_SOCKET, option) in (131072, 262144)
        assert untouched.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == default


def test_stalled_directions_share_a_bounded_budget_of_full_size_buffers(
    make_tunnel: Callable[..., Tunnel], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four copy-mode tunnels whose targets do not read while their clients push 8 MiB:
    each stalled direction wants a 1 MiB buffer, but with a 2 MiB budget only two get
    one (the others keep to the 64 KiB path). Once the targets read, every byte arrives
    intact, and the budget is whole again when the tunnels end."""
    monkeypatch.setattr(relay_module, "GROWN_BUFFER_BUDGET", 2 * MiB)
    assert relay_module.grown_buffer_bytes() == 0
    rng = random.Random(5)
    tunnels, senders, payloads = [], [], []
    for _ in range(4):
        data = rng.randbytes(8 * MiB)
        t = make_tunnel().start(mode="copy", buffer_size=1 * MiB)
        sender = Worker(send_and_shut, t.client, data)
        sender.start()
        tunnels.append(t)
        senders.append(sender)
        payloads.append(data)
    wait_until(lambda: relay_module.grown_buffer_bytes() == 2 * MiB, "the budget spent")
    for _ in range(20):  # stays spent, never above, while all four are stalled
        assert relay_module.grown_buffer_bytes() == 2 * MiB
        time.sleep(0.01)
    for t, sender, data in zip(tunnels, senders, payloads, strict=True):
        assert sha256_of_stream(t.target) == (hashlib.sha256(data).hexdigest(), len(data))
        sender.result()
        t.target.shutdown(socket.SHUT_WR)
        res = t.result()
        assert (res.a_to_b, res.reason, res.mode) == (len(data), "eof", "copy")
    assert relay_module.grown_buffer_bytes() == 0
