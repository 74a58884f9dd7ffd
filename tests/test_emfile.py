"""Out of descriptors (EMFILE): the real `socks5d` command, started with a low
RLIMIT_NOFILE, backs off without burning CPU and serves again as soon as a connection
closes and gives a descriptor back, not when its back-off happens to end.

The daemon runs through a `python -c` wrapper that lowers RLIMIT_NOFILE (soft and hard,
so raise_open_file_limit() cannot undo it) and may lengthen the accept back-off (the
fallback for descriptors freed by something other than a closing request) before it
calls the command's own entry point. With a 30 s fallback, only the wake-up on close can
explain a client served within seconds.

Clients are held in the handshake (connected, nothing sent, a long handshake timeout):
each costs the daemon exactly one descriptor, so accept() is the one call that fails.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from clients import TIMEOUT, recv_exactly, wait_until
from conftest import DaemonProcess

from socks5d.core.server import BaseRequestHandler, ThreadingTCPServer
from socks5d.socks.protocol import Method, encode_greeting

WRAPPER = textwrap.dedent(
    """
    import resource, sys
    from socks5d.core.server import BaseServer
    nofile, backoff = int(sys.argv.pop(1)), float(sys.argv.pop(1))
    resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
    if backoff:
        BaseServer.accept_backoff_min = BaseServer.accept_backoff_max = backoff
    from socks5d.ops.cli import main
    main(prog_name="socks5d")
    """
)
# The fallback back-off in the wake-up tests: far longer than any bound asserted below.
LONG_BACKOFF = 30.0
GREETING = encode_greeting([Method.NO_AUTHENTICATION_REQUIRED])
NO_AUTH = b"\x05\x00"  # VER METHOD


@contextlib.contextmanager
def limited_daemon(
    tmp_path: Path, nofile: int, backoff: float, config: str
) -> Iterator[DaemonProcess]:
    """The command with RLIMIT_NOFILE = nofile (and a fallback back-off, 0: the default),
    explicit caps (so the descriptors run out before any cap) and a long handshake."""
    path = tmp_path / "config.toml"
    path.write_text(
        config + "[limits]\nmax_connections = 10000\nmax_connections_per_ip = 0\n"
        "[timeouts]\nhandshake = 300\n"
    )
    daemon = DaemonProcess(
        str(nofile),
        str(backoff),
        "--port",
        "0",
        "--config",
        str(path),
        python_args=("-c", WRAPPER),
    )
    try:
        yield daemon
    finally:
        daemon.stop()


def descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used (/proc/PID/stat, utime + stime)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)


def starve(daemon: DaemonProcess, limit: int) -> tuple[list[socket.socket], socket.socket]:
    """Connect clients one by one, each accepted (one more descriptor in the daemon),
    until accept() fails. Returns (the accepted clients, a client waiting in the backlog,
    first in line)."""
    held: list[socket.socket] = []
    pid = daemon.proc.pid

    def warned() -> bool:
        return "accept() failed" in daemon.output()

    try:
        for _ in range(limit):
            before = descriptors(pid)
            client = connect(daemon.port)
            moved = wait_until(lambda before=before: descriptors(pid) > before or warned())
            assert moved, f"neither accepted nor refused: {daemon.output()}"
            if not warned():
                held.append(client)
                continue
            # Paused now, so the count stands still. accept() takes a descriptor before it
            # looks at the queue: the failure usually follows the accept that took the
            # last one, and then the client to wait is the next.
            if descriptors(pid) > before:
                held.append(client)
                client = connect(daemon.port)
            return held, client
    except BaseException:
        for client in held:
            client.close()
        raise
    raise AssertionError(f"{limit} clients and still no EMFILE: {daemon.output()}")


@pytest.mark.parametrize("relay_threads", [1, 2, 0], ids=["loop", "two-loops", "threads"])
def test_a_closed_connection_ends_the_emfile_back_off_at_once(tmp_path, relay_threads):
    config = f"[server]\nrelay_threads = {relay_threads}\n"
    with limited_daemon(tmp_path, 48, LONG_BACKOFF, config) as daemon:
        held, waiting = starve(daemon, 48)
        try:
            # The daemon says its fallback is the long one: nothing but a wake-up can
            # serve the waiting client before LONG_BACKOFF.
            assert f"or for up to {LONG_BACKOFF:.1f} s" in daemon.output()
            waiting.sendall(GREETING)  # queued in the kernel until the daemon accepts
            held.pop().close()  # one descriptor comes back
            freed_at = time.monotonic()
            assert recv_exactly(waiting, 2) == NO_AUTH
            delay = time.monotonic() - freed_at
            assert delay < LONG_BACKOFF / 3, f"served {delay:.2f} s after a close"
            assert wait_until(lambda: "accept() recovered" in daemon.output()), daemon.output()
            # The others are still held, still answered.
            held[0].sendall(GREETING)
            assert recv_exactly(held[0], 2) == NO_AUTH
        finally:
            waiting.close()
            for client in held:
                client.close()


def test_starved_daemon_uses_little_cpu_and_logs_once(tmp_path):
    # The default fallback (doubling to 1 s): retrying at once would burn a core here.
    with limited_daemon(tmp_path, 48, 0.0, "") as daemon:
        held, waiting = starve(daemon, 48)
        try:
            pid = daemon.proc.pid
            cpu_before, wall_before = cpu_seconds(pid), time.monotonic()
            # A window to measure in, not a wait for something: nothing comes.
            time.sleep(2.0)
            cpu = cpu_seconds(pid) - cpu_before
            wall = time.monotonic() - wall_before
            assert cpu < 0.25 * wall, f"{cpu:.2f} s of CPU in {wall:.2f} s while starved"
            assert daemon.output().count("accept() failed") == 1
            waiting.sendall(GREETING)
            for client in held[:3]:
                client.close()
            assert recv_exactly(waiting, 2) == NO_AUTH
        finally:
            waiting.close()
            for client in held:
                client.close()


def test_forking_parent_never_runs_out_of_descriptors(tmp_path):
    # The parent closes each client socket right after fork(): clients held by children
    # cost it nothing, so many more than RLIMIT_NOFILE are served.
    nofile = 24
    forking = '[server]\nmode = "forking"\n'
    with limited_daemon(tmp_path, nofile, LONG_BACKOFF, forking) as daemon:
        clients = []
        try:
            for _ in range(3 * nofile):
                client = connect(daemon.port)
                clients.append(client)
                client.sendall(GREETING)
                assert recv_exactly(client, 2) == NO_AUTH
            assert "accept() failed" not in daemon.output()
        finally:
            for client in clients:
                client.close()


# ---- the pieces: the core's back-off state and the loops' listeners ----


class _Refusing(ThreadingTCPServer):
    """accept() fails with EMFILE while `starved`, else finds nothing pending; `during`
    runs inside the failing call (a request closing in another thread at that moment)."""

    starved = True
    during: Callable[[], None] | None = None

    def get_request_from(self, listener: Any) -> tuple[socket.socket, Any]:
        if not self.starved:
            raise BlockingIOError(errno.EAGAIN, "nothing pending")
        if self.during is not None:
            self.during()
        raise OSError(errno.EMFILE, "Too many open files")


def test_accept_ready_pauses_and_a_closed_request_ends_the_pause():
    with _Refusing(("127.0.0.1", 0), BaseRequestHandler) as server:
        server.accept_backoff_min = server.accept_backoff_max = LONG_BACKOFF
        woken: list[bool] = []
        server.accounting.add_waker(lambda: woken.append(True))
        paused_until = server.accept_ready(server.socket)
        assert paused_until > time.monotonic() + LONG_BACKOFF / 2
        # Another loop asking now is told the same, without calling accept() again.
        assert server.accept_ready(server.socket) == paused_until
        server.close_request(socket.socket())  # a request ends: its descriptor is free
        assert woken == [True]
        server.starved = False
        assert server.accept_ready(server.socket) == 0.0


def test_a_request_closing_during_the_failed_accept_is_not_lost():
    # The close came after accept() failed but before the pause was set: there was no
    # pause for it to end, so the failure itself must not pause.
    with _Refusing(("127.0.0.1", 0), BaseRequestHandler) as server:
        server.accept_backoff_min = server.accept_backoff_max = LONG_BACKOFF

        def close_one_then_recover() -> None:
            server.close_request(socket.socket())
            server.starved = False

        server.during = close_one_then_recover
        assert server.accept_ready(server.socket) == 0.0  # retried at once, drained
