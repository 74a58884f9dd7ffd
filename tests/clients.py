"""Small client-side helpers the tests share: exact reads and a raw SOCKS5 handshake."""

from __future__ import annotations

import socket

from socks5d.protocol import (
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


def read_reply(sock: socket.socket) -> tuple[int, Address]:
    """Read one RFC 1928 §6 reply, however it is split."""
    buffer = bytearray()
    while True:
        parsed = parse_reply(buffer)
        if parsed is not None:
            (reply, bound), consumed = parsed
            assert consumed == len(buffer), "the proxy sent bytes after its reply"
            return int(reply), bound
        chunk = sock.recv(1)
        if not chunk:
            raise EOFError(f"EOF inside a reply after {bytes(buffer)!r}")
        buffer += chunk


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
