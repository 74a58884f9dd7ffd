"""The targets `socks5d probe` starts for itself: what the proxy under test connects to.

Each target listens on an address the probe was given (loopback by default), lives for one
probe run and remembers what it saw (the peer addresses of its connections, the bytes a
client sent after a half-close), so a check can compare the proxy's replies with what
really happened. Every accepted connection has a timeout and is shut down when the
targets close, so no thread or descriptor outlives the run.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable
from typing import Any

# Sent by the target that speaks first and then half-closes (halfclose.target-eof).
TARGET_FIRST = b"target speaks first\n"
_POLL = 0.1  # how often an accept or receive loop looks at the stop flag


def family_of(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


class TcpTarget:
    """A listening socket; each connection runs ``behaviour(target, conn)`` in a thread."""

    def __init__(
        self,
        host: str,
        behaviour: Callable[[TcpTarget, socket.socket], None],
        timeout: float,
        port: int = 0,
    ) -> None:
        self.listener = socket.socket(family_of(host), socket.SOCK_STREAM)
        try:
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.listener.bind((host, port))
            self.listener.listen(64)
            self.listener.settimeout(_POLL)
        except OSError:
            self.listener.close()
            raise
        self.address: tuple[str, int] = self.listener.getsockname()[:2]
        self.behaviour = behaviour
        self.timeout = timeout
        self.stopping = threading.Event()
        self.changed = threading.Condition()
        self.peers: list[tuple[str, int]] = []  # source address of each accepted connection
        self.received: list[bytes] = []  # what behaviours chose to record
        self.connections: list[socket.socket] = []
        self.threads: list[threading.Thread] = []
        self.thread = threading.Thread(target=self._accept_loop, daemon=True)
        self.thread.start()

    def _accept_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, peer = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(self.timeout)
            with self.changed:
                self.peers.append(peer[:2])
                self.connections.append(conn)
                self.changed.notify_all()
            worker = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self.threads.append(worker)
            worker.start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            self.behaviour(self, conn)
        except OSError:
            pass  # the proxy cut the connection, or the run is over: nothing to record
        finally:
            conn.close()

    def record(self, data: bytes) -> None:
        with self.changed:
            self.received.append(data)
            self.changed.notify_all()

    def wait_for(self, condition: Callable[[], bool], timeout: float) -> bool:
        """Wait until ``condition()`` holds (called under the lock), within ``timeout``."""
        with self.changed:
            return self.changed.wait_for(condition, timeout)

    def close(self) -> None:
        self.stopping.set()
        self.thread.join()
        self.listener.close()
        with self.changed:
            connections = list(self.connections)
        for conn in connections:  # wakes a thread blocked in recv (close alone would not)
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for worker in self.threads:
            worker.join(self.timeout)


def echo(target: TcpTarget, conn: socket.socket) -> None:
    """Echo until EOF, then half-close back."""
    while chunk := conn.recv(65536):
        conn.sendall(chunk)
    conn.shutdown(socket.SHUT_WR)


def drain_then_answer(target: TcpTarget, conn: socket.socket) -> None:
    """Read until the client's EOF, then answer how many bytes came (halfclose.client-eof)."""
    total = 0
    while chunk := conn.recv(65536):
        total += len(chunk)
    conn.sendall(b"got %d bytes\n" % total)


def speak_first(target: TcpTarget, conn: socket.socket) -> None:
    """Send a line and half-close, then record what the client still sends until its EOF
    (halfclose.target-eof): a proxy that ends the tunnel at the first EOF loses it."""
    conn.sendall(TARGET_FIRST)
    conn.shutdown(socket.SHUT_WR)
    data = bytearray()
    while chunk := conn.recv(65536):
        data += chunk
    target.record(bytes(data))


class UdpEcho:
    """A UDP socket that sends every datagram back to its sender."""

    def __init__(self, host: str) -> None:
        self.sock = socket.socket(family_of(host), socket.SOCK_DGRAM)
        try:
            self.sock.bind((host, 0))
            self.sock.settimeout(_POLL)
        except OSError:
            self.sock.close()
            raise
        self.address: tuple[str, int] = self.sock.getsockname()[:2]
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping.is_set():
            try:
                data, source = self.sock.recvfrom(65536)
                self.sock.sendto(data, source)
            except TimeoutError:
                continue
            except OSError:
                return

    def close(self) -> None:
        self.stopping.set()
        self.thread.join()
        self.sock.close()


class ClosedPort:
    """A port bound but not listening: a connection to it is refused (RST), and while we
    hold it no other program can start listening there during the run."""

    def __init__(self, host: str) -> None:
        self.sock = socket.socket(family_of(host), socket.SOCK_STREAM)
        try:
            self.sock.bind((host, 0))
        except OSError:
            self.sock.close()
            raise
        self.address: tuple[str, int] = self.sock.getsockname()[:2]

    def close(self) -> None:
        self.sock.close()


class Targets:
    """Every target of one run, on the IPv4 and/or IPv6 target host; closed as a whole."""

    def __init__(self, ipv4: str | None, ipv6: str | None, timeout: float) -> None:
        self.opened: list[Any] = []
        self.ipv4 = ipv4
        self.ipv6 = ipv6
        self.timeout = timeout
        self.echo: dict[int, TcpTarget] = {}
        self.udp: dict[int, UdpEcho] = {}
        self.drain: TcpTarget | None = None
        self.speak: TcpTarget | None = None
        self.closed: ClosedPort | None = None
        self.name_echo_v6: TcpTarget | None = None

    def __enter__(self) -> Targets:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _keep(self, target: Any) -> Any:
        self.opened.append(target)
        return target

    def _start(self) -> None:
        for version, host in ((4, self.ipv4), (6, self.ipv6)):
            if host is None:
                continue
            self.echo[version] = self._keep(TcpTarget(host, echo, self.timeout))
            self.udp[version] = self._keep(UdpEcho(host))
        first = self.ipv4 or self.ipv6
        if first is None:
            return
        self.drain = self._keep(TcpTarget(first, drain_then_answer, self.timeout))
        self.speak = self._keep(TcpTarget(first, speak_first, self.timeout))
        self.closed = self._keep(ClosedPort(first))
        if 4 in self.echo and first.startswith("127."):
            # "localhost" may also resolve to ::1: an echo on the same port there means a
            # proxy that tries ::1 first still reaches an echo. Best effort.
            with contextlib.suppress(OSError):
                port = self.echo[4].address[1]
                self.name_echo_v6 = self._keep(TcpTarget("::1", echo, self.timeout, port))

    def close(self) -> None:
        while self.opened:
            self.opened.pop().close()
