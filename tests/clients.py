"""Small client-side helpers the tests share: exact reads and a raw SOCKS5 handshake."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from socks5d.socks.protocol import (
    Address,
    Command,
    Method,
    Reply,
    encode_greeting,
    encode_request,
    encode_username_password,
    parse_reply,
)

TIMEOUT = 10.0


def recv_exactly(sock: socket.socket, count: int) -> bytes:
    data = bytearray()
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise EOFError(f"EOF after {len(data)} of {count} bytes")
        data += chunk
    return bytes(data)


def recv_all(sock: socket.socket) -> bytes:
    """Read until EOF."""
    data = bytearray()
    while chunk := sock.recv(65536):
        data += chunk
    return bytes(data)


def read_reply_bytes(sock: socket.socket) -> bytes:
    """Read one RFC 1928 §6 reply, however it is split: its bytes as they came, no more."""
    buffer = bytearray()
    while parse_reply(buffer) is None:
        chunk = sock.recv(1)
        if not chunk:
            raise EOFError(f"EOF inside a reply after {bytes(buffer)!r}")
        buffer += chunk
    return bytes(buffer)


def read_reply(sock: socket.socket) -> tuple[int, Address]:
    """Read one RFC 1928 §6 reply, however it is split."""
    parsed = parse_reply(read_reply_bytes(sock))
    assert parsed is not None
    (reply, bound), _ = parsed
    return int(reply), bound


def open_tunnel(
    proxy: tuple[str, int],
    target: Address,
    credentials: tuple[bytes, bytes] | None = None,
    command: Command = Command.CONNECT,
) -> tuple[socket.socket, int, Address]:
    """Handshake through `proxy` with raw bytes; returns (socket, reply code, bound address)."""
    sock = socket.create_connection(proxy, timeout=TIMEOUT)
    try:
        method = Method.USERNAME_PASSWORD if credentials else Method.NO_AUTHENTICATION_REQUIRED
        sock.sendall(encode_greeting([method]))
        assert recv_exactly(sock, 2) == bytes([5, method])
        if credentials:
            sock.sendall(encode_username_password(*credentials))
            assert recv_exactly(sock, 2) == b"\x01\x00"
        sock.sendall(encode_request(command, target))
        reply, bound = read_reply(sock)
    except BaseException:
        sock.close()
        raise
    return sock, reply, bound


def connect_through(
    proxy: tuple[str, int], target: Address, credentials: tuple[bytes, bytes] | None = None
) -> socket.socket:
    """A tunnel that must succeed."""
    sock, reply, _ = open_tunnel(proxy, target, credentials)
    if reply != Reply.SUCCEEDED:
        sock.close()
        raise AssertionError(f"CONNECT {target} failed with reply {reply:#04x}")
    return sock


# ---- small helpers shared by the test files ----


def wait_until(condition: Callable[[], bool], timeout: float = TIMEOUT) -> bool:
    """Poll state that has no event to wait on (a log line, /proc), within a deadline."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def children_of(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(child) for child in path.read_text().split()] if path.exists() else []


def loopback_alias_available(ip: str = "127.0.0.2") -> bool:
    """Linux routes all of 127/8 to lo; elsewhere only 127.0.0.1 may be bindable."""
    try:
        with socket.socket() as sock:
            sock.bind((ip, 0))
        return True
    except OSError:
        return False


def closed_port() -> int:
    """A loopback port with nothing listening (bound and released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def udp_socket(host: str = "127.0.0.1") -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind((host, 0))
    sock.settimeout(TIMEOUT)
    return sock


class UdpEcho:
    """A UDP echo server in a thread; remembers every (payload, source) it received."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.sock = udp_socket(host)
        self.sock.settimeout(0.05)  # how often the loop looks at `stopping`
        self.address = self.sock.getsockname()
        self.port = self.address[1]
        self.received: list[tuple[bytes, Any]] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping.is_set():
            try:
                data, source = self.sock.recvfrom(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            self.received.append((data, source))
            self.sock.sendto(data, source)

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(TIMEOUT)
        self.sock.close()
