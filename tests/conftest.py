"""Shared fixtures: loopback targets, an in-process SOCKS server, the real `socks5d` command.

Everything binds 127.0.0.1 or ::1 on port 0; every wait has a timeout.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from clients import TIMEOUT
from streams import needs_splice

from socks5d.ops.config import User
from socks5d.ops.daemon import ThreadingSocksServer, attach_event_loops
from socks5d.ops.probe import ipv6_loopback
from socks5d.policy.auth import Authenticator
from socks5d.socks.handler import HandlerContext, HandlerSettings, Socks5Handler

ROOT = Path(__file__).resolve().parent.parent


# Whether ::1 can be bound here (the probe's IPv6 targets need it too).
ipv6_available = ipv6_loopback

needs_ipv6 = pytest.mark.skipif(not ipv6_available(), reason="::1 is not available here")


def echo(conn: socket.socket) -> None:
    """Echo until EOF, then close (a half-close from the client ends the echo)."""
    while chunk := conn.recv(65536):
        conn.sendall(chunk)


class TargetServer:
    """A loopback TCP server running `behaviour(conn)` for each connection in a thread."""

    def __init__(self, behaviour: Callable[[socket.socket], None], host: str = "127.0.0.1"):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((host, 0))
        self.listener.listen(512)
        self.listener.settimeout(0.2)
        self.host = host
        self.port = self.listener.getsockname()[1]
        self.behaviour = behaviour
        self.stopping = threading.Event()
        self.errors: list[BaseException] = []
        self.threads: list[threading.Thread] = []
        self.accepted = 0
        self.thread = threading.Thread(target=self._accept_loop, daemon=True)
        self.thread.start()

    def _accept_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            conn.settimeout(TIMEOUT)
            worker = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self.threads.append(worker)
            worker.start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                self.behaviour(conn)
            except Exception as exc:  # recorded for the test to assert on
                self.errors.append(exc)

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(TIMEOUT)
        self.listener.close()
        for worker in self.threads:
            worker.join(TIMEOUT)


@pytest.fixture
def target_factory() -> Iterator[Callable[..., TargetServer]]:
    servers: list[TargetServer] = []

    def make(behaviour: Callable[[socket.socket], None] = echo, host: str = "127.0.0.1"):
        server = TargetServer(behaviour, host)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close()


@pytest.fixture
def echo_target(target_factory: Callable[..., TargetServer]) -> TargetServer:
    return target_factory(echo)


@dataclass
class RunningProxy:
    server: object
    host: str
    port: int

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)


@contextlib.contextmanager
def running_proxy(
    mode: str = "threading",
    users: tuple[User, ...] = (),
    host: str = "127.0.0.1",
    max_connections: int = 1024,
    handshake_timeout: float = 10.0,
    relay_threads: int = 2,
    **settings: Any,
) -> Iterator[RunningProxy]:
    """A SOCKS server on port 0, closed afterwards.

    Threading mode serves in-process from a thread, with `relay_threads` event loops as
    the daemon has (0: each handler thread relays its own tunnel). Forking mode (which
    always relays in the child) runs the real `socks5d`
    command instead: a child forked from the test process would inherit the test's own
    client sockets and keep them open after the test closes them.
    """
    if mode == "forking":
        assert not settings, "forking mode takes its settings from a config file"
        with tempfile.TemporaryDirectory() as folder:
            config = Path(folder) / "config.toml"
            config.write_text(
                f'[server]\nhost = "{host}"\nport = 0\nmode = "forking"\n'
                f"[limits]\nmax_connections = {max_connections}\n"
                f"[timeouts]\nhandshake = {handshake_timeout}\n"
                + "".join(
                    f'[[users]]\nname = "{user.name}"\npassword = "{user.password}"\n'
                    for user in users
                )
            )
            daemon = DaemonProcess("--config", str(config))
            try:
                yield RunningProxy(daemon, host, daemon.port)
            finally:
                daemon.stop()
        return
    server = ThreadingSocksServer((host, 0), Socks5Handler, max_connections=max_connections)
    handler_settings = HandlerSettings(
        authenticator=Authenticator.from_users(users),
        handshake_timeout=handshake_timeout,
        **settings,
    )
    # As the daemon's, without the login back-off, check gate and per-user slots.
    server.context = HandlerContext(
        settings=lambda: handler_settings,
        active_count=lambda: server.active_count,
        relay_in_loop=server.relay_in_loop,
    )
    if relay_threads:
        attach_event_loops(server, relay_threads)  # as the daemon does
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1})
    thread.start()
    try:
        yield RunningProxy(server, host, server.server_address[1])
    finally:
        server.shutdown()
        thread.join(TIMEOUT)
        server.stop_listening()  # the loops let go of the listeners first
        server.abort_active_requests()
        server.server_close()  # and the loops with it


@pytest.fixture(params=[pytest.param("splice", marks=needs_splice), "copy"])
def mode(request: pytest.FixtureRequest) -> str:
    """Each way of moving bytes; the tests assert that the tunnel really used it."""
    return str(request.param)


@pytest.fixture(params=["threading", "forking"])
def proxy_mode(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def proxy(proxy_mode: str) -> Iterator[RunningProxy]:
    with running_proxy(proxy_mode) as running:
        yield running


@pytest.fixture
def threading_proxy() -> Iterator[RunningProxy]:
    with running_proxy("threading") as running:
        yield running


class DaemonProcess:
    """The real `socks5d` command in a subprocess; learns its port from the startup line."""

    LISTENING = re.compile(r"listening on (\S+):(\d+) \((\w+)\)")

    def __init__(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        python_args: tuple[str, ...] = ("-m", "socks5d"),
    ) -> None:
        # python_args: how Python runs the command (a -c wrapper that sets a limit first).
        self.args = [sys.executable, *python_args, *args]
        self.proc = subprocess.Popen(
            self.args,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=ROOT,
            env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"},
        )
        self.lines: list[str] = []
        self.listening = threading.Event()
        self.port = 0
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        if not self.listening.wait(TIMEOUT):
            self.stop()
            raise AssertionError(f"socks5d did not start: {self.output()}")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            match = self.LISTENING.search(line)
            if match and not self.listening.is_set():
                self.port = int(match.group(2))
                self.listening.set()

    def output(self) -> str:
        return "\n".join(self.lines)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(TIMEOUT)
        self.reader.join(TIMEOUT)
        return code


@pytest.fixture
def daemon_factory() -> Iterator[Callable[..., DaemonProcess]]:
    started: list[DaemonProcess] = []

    def start(*args: str, **kwargs: object) -> DaemonProcess:
        process = DaemonProcess(*args, **kwargs)  # type: ignore[arg-type]
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


@pytest.fixture
def blackhole() -> Iterator[int]:
    """The port of a loopback listener that swallows SYNs, so a connect() to it hangs.

    A listener with listen(0) whose accept queue is full (one connection the kernel completed
    and nobody accepts) makes Linux drop every further SYN without an answer. Two more
    never-completing clients keep it full; a probe connect must time out, else skip.
    """
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(0)
    port = hole.getsockname()[1]
    fillers: list[socket.socket] = []
    try:
        fillers.append(socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT))
        for _ in range(2):
            filler = socket.socket()
            fillers.append(filler)
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
        with socket.socket() as probe:
            probe.settimeout(0.3)
            try:
                probe.connect(("127.0.0.1", port))
            except TimeoutError:
                pass
            else:
                pytest.skip("a full accept queue does not drop SYNs here")
        yield port
    finally:
        for filler in fillers:
            filler.close()
        hole.close()
