"""The benchmark's own loopback targets, each run as a separate process.

Run as ``python bench/targets.py KIND [--workers N]``: it listens on 127.0.0.1 on a free
port, prints the port on stdout, and serves until SIGTERM or until its stdin closes (so a
harness that dies takes its targets with it). Kinds and their wire protocol:

* ``source``: reads an 8-byte big-endian size, sends that many bytes of :func:`pattern`.
* ``sink``: reads an 8-byte size, reads that many bytes comparing them with the pattern,
  answers with the 8-byte count and the offset of the first wrong block (-1: all correct).
* ``echo``: echoes everything (one selector loop, so thousands of idle tunnels cost little).
* ``arc``: accept, respond with :data:`ARC_RESPONSE`, close (connection-rate target).

Sizes are announced up front, so no scenario relies on half-close: peers that end a tunnel
at the first EOF are measured on equal terms. Stdlib only; never imports socks5d.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import random
import selectors
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from functools import lru_cache

# Not a power of two, so the pattern's period never lines up with buffer sizes: a proxy
# that drops or repeats a buffer is caught by the digest.
PATTERN_SIZE = (1 << 20) + 4093
HEADER = struct.Struct("!Q")
VERDICT = struct.Struct("!Qq")  # sink's answer: bytes received, first bad offset or -1
ARC_RESPONSE = b"ok\n"
TIMEOUT = 30.0
KINDS = ("source", "sink", "echo", "arc")


@lru_cache(maxsize=1)
def pattern() -> bytes:
    """The deterministic byte pattern every stream repeats (same on both ends)."""
    return random.Random(1928).randbytes(PATTERN_SIZE)


def send_pattern(sock: socket.socket, size: int, deadline: float = math.inf) -> None:
    """Send ``size`` bytes of the pattern with sendall of memoryview slices (no copies)."""
    data = memoryview(pattern())
    remaining = size
    while remaining > 0:
        if time.monotonic() > deadline:
            raise TimeoutError(f"deadline passed with {remaining} of {size} bytes unsent")
        chunk = min(remaining, PATTERN_SIZE)
        sock.sendall(data[:chunk])
        remaining -= chunk


def recv_verified(
    sock: socket.socket, size: int, buffer: bytearray, deadline: float = math.inf
) -> tuple[int, int]:
    """Receive up to ``size`` bytes, comparing them with the pattern byte for byte.

    ``buffer`` (PATTERN_SIZE long) is filled in step with the pattern, so each full block is
    checked with one memcmp (``bytearray == bytes``, tens of GB/s): stronger than a checksum
    and cheaper than any hash. Returns the count and the offset of the first block that
    differed (-1: none).
    """
    expected, view = pattern(), memoryview(buffer)
    got = fill = 0
    bad = -1
    while got < size:
        if time.monotonic() > deadline:
            raise TimeoutError(f"deadline passed after {got} of {size} bytes")
        count = sock.recv_into(view[fill:], min(PATTERN_SIZE - fill, size - got))
        if count == 0:
            break
        fill += count
        got += count
        if fill == PATTERN_SIZE:
            if bad < 0 and buffer != expected:
                bad = got - fill
            fill = 0
    if fill and bad < 0 and bytes(view[:fill]) != expected[:fill]:
        bad = got - fill
    return got, bad


def recv_exactly(sock: socket.socket, count: int) -> bytes:
    """Read exactly ``count`` bytes: one recv is not one message."""
    data = bytearray()
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise EOFError(f"EOF after {len(data)} of {count} bytes")
        data += chunk
    return bytes(data)


def _drain_and_close(conn: socket.socket) -> None:
    """Wait for the client's close before ours, so the client never sees a reset."""
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_WR)
        for _ in range(1000):
            if not conn.recv(65536):
                break
    conn.close()


def serve_source(conn: socket.socket) -> None:
    (size,) = HEADER.unpack(recv_exactly(conn, HEADER.size))
    send_pattern(conn, size)
    _drain_and_close(conn)


def serve_sink(conn: socket.socket) -> None:
    (size,) = HEADER.unpack(recv_exactly(conn, HEADER.size))
    got, bad = recv_verified(conn, size, bytearray(PATTERN_SIZE))
    conn.sendall(VERDICT.pack(got, bad))
    _drain_and_close(conn)


def _threaded_loop(
    listener: socket.socket, serve: Callable[[socket.socket], None], stop: threading.Event
) -> None:
    """Accept loop with a thread per connection (source and sink are few, long streams)."""

    def run(conn: socket.socket) -> None:
        try:
            conn.settimeout(TIMEOUT)
            serve(conn)
        except (OSError, EOFError):
            pass
        finally:
            conn.close()

    while not stop.is_set():
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        threading.Thread(target=run, args=(conn,), daemon=True).start()


def _arc_loop(listener: socket.socket, stop: threading.Event) -> None:
    """Accept, respond, close: as cheap as a Python target can be, no threads."""
    while not stop.is_set():
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        with contextlib.suppress(OSError):
            conn.settimeout(TIMEOUT)
            conn.sendall(ARC_RESPONSE)
        conn.close()


def _echo_loop(listener: socket.socket, stop: threading.Event) -> None:
    """One selector loop for all echo connections; a partial send keeps the rest pending."""
    selector = selectors.DefaultSelector()
    listener.setblocking(False)
    selector.register(listener, selectors.EVENT_READ, None)
    pending: dict[socket.socket, bytes] = {}
    while not stop.is_set():
        for key, events in selector.select(timeout=0.5):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            if key.data is None:
                with contextlib.suppress(BlockingIOError, OSError):
                    conn, _ = sock.accept()
                    conn.setblocking(False)
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    selector.register(conn, selectors.EVENT_READ, "conn")
                continue
            try:
                if events & selectors.EVENT_WRITE:
                    data = pending.pop(sock)
                else:
                    try:
                        data = sock.recv(65536)
                    except BlockingIOError:
                        continue
                    if not data:
                        raise ConnectionResetError
                try:
                    sent = sock.send(data)
                except BlockingIOError:
                    sent = 0
                if sent < len(data):
                    # Stop reading this client until its echo is written (backpressure).
                    pending[sock] = data[sent:]
                    selector.modify(sock, selectors.EVENT_WRITE, "conn")
                elif events & selectors.EVENT_WRITE:
                    selector.modify(sock, selectors.EVENT_READ, "conn")
            except OSError:
                selector.unregister(sock)
                pending.pop(sock, None)
                sock.close()


def serve(kind: str, listener: socket.socket, stop: threading.Event) -> None:
    """Serve one kind of target on ``listener`` until ``stop`` is set."""
    listener.settimeout(0.5)
    if kind == "echo":
        _echo_loop(listener, stop)
    elif kind == "arc":
        _arc_loop(listener, stop)
    else:
        _threaded_loop(listener, serve_source if kind == "source" else serve_sink, stop)


def _watch_parent(stop: threading.Event, parent: int) -> None:
    """A forked worker ends when the process that started it is gone (bounded polling)."""
    while not stop.wait(0.5):
        if os.getppid() != parent:
            os._exit(0)


def _watch_stdin() -> None:
    """The harness holds our stdin: EOF means it is gone, so we go too."""
    with contextlib.suppress(OSError):
        while os.read(0, 4096):  # raw reads: no buffered-reader lock held at shutdown
            pass
    os._exit(0)


def main(argv: list[str] | None = None) -> int:
    """Listen, print the port, fork workers sharing the listener, serve until told to stop."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("--workers", type=int, default=1, help="processes sharing the listener")
    args = parser.parse_args(argv)

    pattern()  # build it before forking, so the workers share it
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(4096)
    threading.stack_size(256 * 1024)

    children: list[int] = []
    stop = threading.Event()
    me = os.getpid()
    for _ in range(max(0, args.workers - 1)):
        pid = os.fork()
        if pid == 0:
            threading.Thread(target=_watch_parent, args=(stop, me), daemon=True).start()
            serve(args.kind, listener, stop)
            os._exit(0)
        children.append(pid)

    def on_term(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_term)
    threading.Thread(target=_watch_stdin, daemon=True).start()
    print(listener.getsockname()[1], flush=True)
    try:
        serve(args.kind, listener, stop)
    except KeyboardInterrupt:
        pass
    finally:
        for pid in children:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
    listener.close()
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown: daemon threads may still be in a syscall


if __name__ == "__main__":
    sys.exit(main())
