"""Logging never stops the proxy: a stderr nobody reads must not freeze serving or stopping.

Before, every log line was a blocking write to stderr: once a pipe nobody drained was
full (64 KiB: ~300 access lines), every thread that logged blocked for good, and SIGTERM
never finished.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
from clients import TIMEOUT
from conftest import ROOT, TargetServer, echo

from socks5d.ops.logs import _StderrHandler

F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


@pytest.fixture
def small_pipe() -> Iterator[tuple[int, int]]:
    """A pipe of one page nobody reads yet: (read end, write end)."""
    read_end, write_end = os.pipe()
    with contextlib.suppress(OSError):  # else the default size: it only needs to fill
        fcntl.fcntl(write_end, F_SETPIPE_SZ, 4096)
    yield read_end, write_end
    for fd in (read_end, write_end):
        with contextlib.suppress(OSError):  # closed by the test already
            os.close(fd)


def record(number: int) -> logging.LogRecord:
    return logging.makeLogRecord({"msg": "line %06d " + "x" * 150, "args": (number,)})


def emit_in_thread(handler: _StderrHandler, count: int) -> threading.Thread:
    thread = threading.Thread(target=lambda: [handler.emit(record(i)) for i in range(count)])
    thread.start()
    return thread


def drain(read_end: int) -> list[str]:
    os.set_blocking(read_end, False)
    data = bytearray()
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        try:
            chunk = os.read(read_end, 65536)
        except BlockingIOError:
            time.sleep(0.05)
            continue
        if not chunk:
            break
        data += chunk
    return data.decode().splitlines()


def test_lines_to_a_pipe_nobody_reads_never_block_the_caller(small_pipe: tuple[int, int]) -> None:
    read_end, write_end = small_pipe
    handler = _StderrHandler(write_end)
    handler.BACKLOG_BYTES = 64 * 1024
    count = 5000  # ~800 KB: far more than the pipe and the backlog hold
    thread = emit_in_thread(handler, count)
    thread.join(TIMEOUT)
    assert not thread.is_alive(), "emit() blocked on a full pipe"
    handler.flush(0.2)  # the output is stuck: a bounded wait, then gives up
    # Now a reader comes: what was kept arrives in order, and how much was dropped.
    flusher = threading.Thread(target=handler.flush, args=(TIMEOUT,))
    flusher.start()
    collected: list[str] = []
    reader = threading.Thread(target=lambda: collected.extend(drain(read_end)))
    reader.start()
    flusher.join(TIMEOUT)
    handler.close()
    os.close(write_end)  # the reader sees EOF once everything written is read
    reader.join(TIMEOUT)
    received = [line for line in collected if "dropped" not in line]
    dropped = sum(int(line.split(": ")[1].split()[0]) for line in collected if "dropped" in line)
    numbers = [int(line.split()[1]) for line in received]
    # Kept lines arrive whole and in order; the dropped ones are those that found the
    # backlog full, so later lines may follow a gap.
    assert numbers == sorted(set(numbers))
    assert dropped > 0
    assert len(numbers) + dropped == count, "every line is either written or counted"
    assert handler.backlog_bytes == 0


def test_flush_gives_up_on_a_stuck_output_and_does_not_wait_again(
    small_pipe: tuple[int, int],
) -> None:
    read_end, write_end = small_pipe
    handler = _StderrHandler(write_end)
    thread = emit_in_thread(handler, 200)
    thread.join(TIMEOUT)
    assert not thread.is_alive()
    started = time.monotonic()
    handler.flush(0.5)
    first = time.monotonic() - started
    started = time.monotonic()
    handler.close()  # logging.shutdown() flushed already, and gave up: no second wait
    second = time.monotonic() - started
    assert first >= 0.4
    assert second < first
    # The writer is still blocked: the reader's end closing ends its write (EPIPE).
    writer = handler.writer
    os.close(read_end)
    if writer is not None:
        writer.join(TIMEOUT)
        assert not writer.is_alive()


def test_a_writable_output_gets_every_line_in_order(small_pipe: tuple[int, int]) -> None:
    read_end, write_end = small_pipe
    handler = _StderrHandler(write_end)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(drain(read_end)))
    reader.start()
    for i in range(2000):
        handler.emit(record(i))
    handler.close()
    os.close(write_end)
    reader.join(TIMEOUT)
    assert [int(line.split()[1]) for line in lines] == list(range(2000))


def test_the_daemon_serves_and_stops_while_nobody_reads_its_output() -> None:
    """300 tunnels (300 access lines, more than a pipe holds), then SIGTERM: the daemon
    must exit 0 within its grace, not hang on a write to stderr."""
    target = TargetServer(echo)
    proc = subprocess.Popen(
        [sys.executable, "-m", "socks5d", "--port", "0", "--log-level", "info"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        port = 0
        deadline = time.monotonic() + TIMEOUT
        line = b""
        while time.monotonic() < deadline and not port:
            line = proc.stdout.readline()
            if b"listening on" in line:
                port = int(line.split(b":")[-1].split()[0])
        assert port, line
        # From here on nobody reads the daemon's output.
        request = b"\x05\x01\x00\x05\x01\x00\x01\x7f\x00\x00\x01" + target.port.to_bytes(2, "big")
        clients = []
        for _ in range(300):
            client = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
            client.sendall(request)
            clients.append(client)
        granted = 0
        for client in clients:
            reply = b""
            while len(reply) < 12:
                chunk = client.recv(12 - len(reply))
                if not chunk:
                    break
                reply += chunk
            granted += reply[:4] == b"\x05\x00\x05\x00"
        for client in clients:
            client.close()
        assert granted == 300
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(TIMEOUT * 3) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(TIMEOUT)
        target.close()
        if proc.stdout is not None:
            proc.stdout.close()


def test_lines_from_many_threads_never_interleave_while_the_reader_lags(
    small_pipe: tuple[int, int],
) -> None:
    """Direct writes and the writer thread's take turns: every line arrives whole, and
    each thread's lines in its order, though the reader keeps the pipe nearly full."""
    read_end, write_end = small_pipe
    handler = _StderrHandler(write_end)
    lines: list[str] = []

    def slow_reader() -> None:
        data = bytearray()
        while chunk := os.read(read_end, 512):
            data += chunk
            time.sleep(0.0005)
        lines.extend(data.decode().splitlines())

    reader = threading.Thread(target=slow_reader)
    reader.start()

    def emit_lines(thread: int) -> None:
        for i in range(300):
            message = "thread %d line %06d " + "y" * 100
            handler.emit(logging.makeLogRecord({"msg": message, "args": (thread, i)}))

    emitters = [threading.Thread(target=emit_lines, args=(t,)) for t in range(6)]
    for thread in emitters:
        thread.start()
    for thread in emitters:
        thread.join(TIMEOUT)
    handler.flush(TIMEOUT)
    handler.close()
    os.close(write_end)
    reader.join(TIMEOUT * 3)
    assert not reader.is_alive()
    by_thread: dict[int, list[int]] = {}
    for line in lines:
        words = line.split()
        assert len(words) == 5 and words[4] == "y" * 100, f"a line cut or mixed: {line!r}"
        by_thread.setdefault(int(words[1]), []).append(int(words[3]))
    assert by_thread == {t: list(range(300)) for t in range(6)}
