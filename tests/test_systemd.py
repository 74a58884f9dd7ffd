"""systemd integration: sd_notify, socket activation, dropping root, the unit files.

Real processes on loopback; every wait is bounded.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from clients import TIMEOUT, connect_through, recv_exactly, wait_until
from conftest import ROOT, DaemonProcess, TargetServer, ipv6_available

from socks5d.core.server import StreamRequestHandler, ThreadingTCPServer
from socks5d.ops import privileges, systemd
from socks5d.socks.protocol import Address, AddressType

UNITS = ROOT / "systemd"


def local(target: TargetServer) -> Address:
    return Address(AddressType.IPV4, "127.0.0.1", target.port)


class NotifyListener:
    """The service manager's end of $NOTIFY_SOCKET: a datagram socket that keeps what came."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.messages: list[str] = []

    def expect(self, predicate: Callable[[str], bool], start: int = 0) -> tuple[int, str]:
        """(index, message) of the first message from index `start` on that satisfies
        predicate, waiting for more to arrive (at most TIMEOUT)."""
        deadline = time.monotonic() + TIMEOUT
        while True:
            for index in range(start, len(self.messages)):
                if predicate(self.messages[index]):
                    return index, self.messages[index]
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no matching notification from #{start}: {self.messages!r}")
            self.sock.settimeout(remaining)
            with contextlib.suppress(TimeoutError):
                self.messages.append(self.sock.recv(4096).decode())

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_path(tmp_path: Path) -> Iterator[tuple[str, NotifyListener]]:
    path = str(tmp_path / "notify.sock")
    listener = NotifyListener(path)
    yield path, listener
    listener.close()


# ---- notify() ----


def test_notify_sends_exactly_the_message_as_one_datagram(notify_path, monkeypatch):
    path, listener = notify_path
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert systemd.notify("READY=1\nSTATUS=up")
    listener.sock.settimeout(TIMEOUT)
    assert listener.sock.recv(4096) == b"READY=1\nSTATUS=up"
    assert systemd.notify("STATUS=again")
    assert listener.sock.recv(4096) == b"STATUS=again"


def test_notify_at_name_uses_the_abstract_namespace(monkeypatch):
    name = f"socks5d-test-{uuid.uuid4().hex}"
    listener = NotifyListener(b"\0" + name.encode())
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert systemd.notify("READY=1")
        listener.sock.settimeout(TIMEOUT)
        assert listener.sock.recv(4096) == b"READY=1"
    finally:
        listener.close()


def test_notify_without_notify_socket_returns_false(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify("READY=1") is False
    assert systemd.enabled() is False
    assert systemd.ready("x") is False


def test_notify_to_a_vanished_socket_returns_false_then_recovers(tmp_path, monkeypatch, caplog):
    path = tmp_path / "notify.sock"
    listener = NotifyListener(str(path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    assert systemd.notify("STATUS=one")
    listener.close()
    path.unlink()
    with caplog.at_level("DEBUG", logger="socks5d.ops.systemd"):
        assert systemd.notify("STATUS=two") is False
    assert "sd_notify" in caplog.text
    # The manager comes back (same path): the next message gets through on a new socket.
    listener = NotifyListener(str(path))
    try:
        assert systemd.notify("STATUS=three")
        listener.sock.settimeout(TIMEOUT)
        assert listener.sock.recv(4096) == b"STATUS=three"
    finally:
        listener.close()


def test_notify_with_a_relative_notify_socket_returns_false(monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", "not/absolute")
    assert systemd.notify("READY=1") is False


def test_helpers_send_the_documented_assignments(notify_path, monkeypatch):
    path, listener = notify_path
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    listener.sock.settimeout(TIMEOUT)

    assert systemd.ready()
    assert listener.sock.recv(4096) == b"READY=1"
    assert systemd.ready("serving\nsecond line")
    assert listener.sock.recv(4096) == b"READY=1\nSTATUS=serving second line"
    assert systemd.stopping()
    assert listener.sock.recv(4096) == b"STOPPING=1"
    assert systemd.status("3 active")
    assert listener.sock.recv(4096) == b"STATUS=3 active"

    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert systemd.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    match = re.fullmatch(rb"RELOADING=1\nMONOTONIC_USEC=(\d+)", listener.sock.recv(4096))
    assert match, "RELOADING=1 must carry MONOTONIC_USEC"
    assert before <= int(match.group(1)) <= after


# ---- listen_fds() ----


def free_fd_range(count: int, start: int = 200) -> int:
    """The first descriptor number n >= start with n .. n+count-1 all unused."""
    for base in range(start, start + 1000):
        if all(_fd_free(fd) for fd in range(base, base + count)):
            return base
    raise AssertionError("no free descriptor range")


def _fd_free(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as exc:
        return exc.errno == errno.EBADF
    return False


def listening_socket(host: str = "127.0.0.1") -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.bind((host, 0))
    sock.listen(8)
    return sock


def test_listen_fds_wraps_the_passed_sockets_and_cleans_the_environment(monkeypatch):
    hosts = ["127.0.0.1", "::1"] if ipv6_available() else ["127.0.0.1"]
    originals = [listening_socket(host) for host in hosts]
    base = free_fd_range(len(originals))
    adopted: list[socket.socket] = []
    try:
        # What systemd does: the listening sockets at consecutive, inheritable descriptors.
        for offset, sock in enumerate(originals):
            os.dup2(sock.fileno(), base + offset, inheritable=True)
        monkeypatch.setattr(systemd, "SD_LISTEN_FDS_START", base)
        monkeypatch.setattr(os, "getpid", lambda: 4242)
        monkeypatch.setenv("LISTEN_PID", "4242")
        monkeypatch.setenv("LISTEN_FDS", str(len(originals)))
        monkeypatch.setenv("LISTEN_FDNAMES", ":".join(["socks5d.socket"] * len(originals)))

        adopted = systemd.listen_fds()

        assert [sock.fileno() for sock in adopted] == list(range(base, base + len(originals)))
        for sock, original in zip(adopted, originals, strict=True):
            assert sock.family == original.family
            assert sock.type == socket.SOCK_STREAM
            assert sock.getsockname() == original.getsockname()
            assert sock.getblocking() is False
            assert sock.get_inheritable() is False
        for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            assert name not in os.environ
        # Called again (the variables are gone): nothing more to adopt.
        assert systemd.listen_fds() == []
        # The wrapped descriptor really is the listener: a client gets accepted on it.
        with socket.create_connection(originals[0].getsockname()[:2], timeout=TIMEOUT):
            adopted[0].settimeout(TIMEOUT)
            conn, _ = adopted[0].accept()
            conn.close()
    finally:
        for sock in adopted:
            sock.close()
        for offset in range(len(originals)):
            if not adopted:  # wrapping failed: close the duplicates we made ourselves
                with contextlib.suppress(OSError):
                    os.close(base + offset)
        for sock in originals:
            sock.close()


def test_listen_fds_names_a_descriptor_that_is_no_socket(monkeypatch):
    fd = free_fd_range(1)
    null = os.open(os.devnull, os.O_RDONLY)
    try:
        os.dup2(null, fd)
        monkeypatch.setattr(systemd, "SD_LISTEN_FDS_START", fd)
        monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
        monkeypatch.setenv("LISTEN_FDS", "1")
        with pytest.raises(OSError, match=f"LISTEN_FDS: descriptor {fd} is not a usable socket"):
            systemd.listen_fds()
        assert "LISTEN_PID" not in os.environ
    finally:
        os.close(null)
        with contextlib.suppress(OSError):
            os.close(fd)


def test_listen_fds_for_another_pid_adopts_nothing_and_leaves_the_environment(monkeypatch):
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    monkeypatch.setenv("LISTEN_FDS", "1")
    monkeypatch.setenv("LISTEN_FDNAMES", "x")
    assert systemd.listen_fds() == []
    assert os.environ["LISTEN_PID"] == str(os.getpid() + 1)
    assert os.environ["LISTEN_FDS"] == "1"
    assert os.environ["LISTEN_FDNAMES"] == "x"


def test_listen_fds_without_the_variables_adopts_nothing(monkeypatch):
    monkeypatch.delenv("LISTEN_PID", raising=False)
    monkeypatch.delenv("LISTEN_FDS", raising=False)
    assert systemd.listen_fds() == []


# ---- TCPServer(listen_sockets=...) ----


class EchoLine(StreamRequestHandler):
    def handle(self) -> None:
        self.wfile.write(self.rfile.readline())


def test_server_adopting_a_listening_socket_serves_on_it():
    sock = listening_socket()
    address = sock.getsockname()
    # The address argument is ignored: port 1 would need root and must not be bound.
    server = ThreadingTCPServer(("127.0.0.1", 1), EchoLine, listen_sockets=[sock])
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1})
    thread.start()
    try:
        assert server.sockets == [sock]
        assert server.socket is sock
        assert server.server_address == address
        assert server.server_addresses == [address]
        assert server.address_family == socket.AF_INET
        assert sock.getblocking() is False
        with socket.create_connection(address, timeout=TIMEOUT) as client:
            client.sendall(b"hello adopted\n")
            assert recv_exactly(client, 14) == b"hello adopted\n"
    finally:
        server.shutdown()
        thread.join(TIMEOUT)
        server.server_close()
    assert sock.fileno() == -1, "server_close() closes adopted sockets like its own"


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM), "SOCK_DGRAM"),
        (lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM), "not listening"),
        (lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM), "AF_UNIX"),
    ],
    ids=["udp", "unlistening", "unix"],
)
def test_server_refuses_to_adopt_what_it_cannot_serve(make, problem):
    with make() as sock:
        with pytest.raises(ValueError, match=problem):
            ThreadingTCPServer(None, EchoLine, listen_sockets=[sock])
        assert sock.fileno() != -1, "a refused socket stays the caller's"
    with pytest.raises(ValueError, match="empty"):
        ThreadingTCPServer(None, EchoLine, listen_sockets=[])


# ---- the real daemon talking to a NOTIFY_SOCKET ----


def test_daemon_notifies_ready_reloading_and_stopping(daemon_factory, notify_path):
    path, listener = notify_path
    daemon = daemon_factory("--port", "0", env={"NOTIFY_SOCKET": path})

    _, ready = listener.expect(lambda m: m.startswith("READY=1"))
    assert ready == (
        f"READY=1\nSTATUS=0 active connections, 0 served, listening on 127.0.0.1:{daemon.port}"
    )

    marker = len(listener.messages)
    daemon.proc.send_signal(signal.SIGHUP)
    reloading_at, reloading = listener.expect(lambda m: m.startswith("RELOADING=1"), marker)
    assert re.fullmatch(r"RELOADING=1\nMONOTONIC_USEC=\d+", reloading), reloading
    listener.expect(lambda m: m.startswith("READY=1\nSTATUS="), reloading_at + 1)

    marker = len(listener.messages)
    daemon.proc.send_signal(signal.SIGTERM)
    listener.expect(lambda m: m == "STOPPING=1", marker)
    assert daemon.proc.wait(TIMEOUT) == 0


def test_daemon_ready_after_a_rejected_reload(daemon_factory, notify_path, tmp_path):
    path, listener = notify_path
    config = tmp_path / "config.toml"
    config.write_text('[server]\nhost = "127.0.0.1"\nport = 0\n')
    daemon = daemon_factory("--config", str(config), env={"NOTIFY_SOCKET": path})
    listener.expect(lambda m: m.startswith("READY=1"))
    config.write_text("[server\n")  # not TOML: the reload is rejected
    marker = len(listener.messages)
    daemon.proc.send_signal(signal.SIGHUP)
    reloading_at, _ = listener.expect(lambda m: m.startswith("RELOADING=1"), marker)
    listener.expect(lambda m: m.startswith("READY=1"), reloading_at + 1)
    # The log line was written before READY=1 was sent, but reaches us through a pipe
    # and a reader thread: wait for it rather than race it.
    assert wait_until(lambda: "reload rejected" in daemon.output()), daemon.output()


@pytest.mark.parametrize("mode", ["threading", "forking"])
def test_daemon_status_counts_connections(daemon_factory, notify_path, echo_target, mode):
    path, listener = notify_path
    daemon = daemon_factory("--port", "0", "--mode", mode, env={"NOTIFY_SOCKET": path})
    listener.expect(lambda m: m.startswith("READY=1"))
    with connect_through(("127.0.0.1", daemon.port), local(echo_target)) as tunnel:
        tunnel.sendall(b"ping")
        assert recv_exactly(tunnel, 4) == b"ping"
        listener.expect(lambda m: m.startswith("STATUS=1 active connection, 1 served, "))
    _, status = listener.expect(lambda m: m.startswith("STATUS=0 active connections, 1 served"))
    assert status.endswith(f"listening on 127.0.0.1:{daemon.port}")


def test_daemon_without_notify_socket_sends_nothing_and_runs(daemon_factory, echo_target):
    daemon = daemon_factory("--port", "0", env={"NOTIFY_SOCKET": ""})
    with connect_through(("127.0.0.1", daemon.port), local(echo_target)) as tunnel:
        tunnel.sendall(b"ok")
        assert recv_exactly(tunnel, 2) == b"ok"
    assert daemon.stop() == 0


# ---- socket activation with the real command ----


class ActivatedDaemon(DaemonProcess):
    """`python -m socks5d` started the way systemd starts it: the socket at fd 3.

    sh sets LISTEN_PID to its own PID ($$) and exec()s Python, which keeps that PID; with
    listen_pid given, that value is used instead (to test a mismatch).
    """

    def __init__(self, listener: socket.socket, *args: str, listen_pid: str = "$$") -> None:
        fd = listener.fileno()

        def put_at_fd_3() -> None:
            # After fork, before exec: fd 3 becomes the listener (inheritable by default).
            os.dup2(fd, 3)

        self.args = [sys.executable, "-m", "socks5d", *args]
        env = {**os.environ, "LISTEN_FDS": "1", "PYTHONUNBUFFERED": "1"}
        for name in ("LISTEN_PID", "LISTEN_FDNAMES", "NOTIFY_SOCKET"):
            env.pop(name, None)
        with _fd_3_occupied():
            self.proc = subprocess.Popen(
                ["sh", "-c", f'LISTEN_PID={listen_pid} exec "$0" "$@"', *self.args],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                cwd=ROOT,
                env=env,
                pass_fds=(3,),
                preexec_fn=put_at_fd_3,
            )
        self.lines: list[str] = []
        self.listening = threading.Event()
        self.port = 0
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        if not self.listening.wait(TIMEOUT):
            self.stop()
            raise AssertionError(f"socks5d did not start: {self.output()}")


@contextlib.contextmanager
def _fd_3_occupied() -> Iterator[None]:
    """Keep fd 3 taken in this process while spawning, so Popen's own pipes (whose child
    ends the preexec_fn must not clobber) never land on it."""
    if not _fd_free(3):
        yield
        return
    placeholder = os.open(os.devnull, os.O_RDONLY)
    try:
        if placeholder != 3:
            os.dup2(placeholder, 3, inheritable=False)
        yield
    finally:
        os.close(3)
        if placeholder != 3:
            os.close(placeholder)


@pytest.fixture
def activated() -> Iterator[Callable[..., ActivatedDaemon]]:
    started: list[ActivatedDaemon] = []

    def start(*args: object, **kwargs: str) -> ActivatedDaemon:
        process = ActivatedDaemon(*args, **kwargs)  # type: ignore[arg-type]
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


def test_socket_activation_serves_on_the_passed_socket(activated, echo_target):
    with listening_socket() as listener:
        port = listener.getsockname()[1]
        # --port 1 is deliberately wrong (and privileged): it must be ignored.
        daemon = activated(listener, "--port", "1")
    # Our copy is closed: only the daemon's fd 3 listens now.
    assert daemon.port == port
    assert "adopted 1 socket(s) from systemd" in daemon.output()
    with connect_through(("127.0.0.1", port), local(echo_target)) as tunnel:
        tunnel.sendall(b"through the adopted socket")
        assert recv_exactly(tunnel, 26) == b"through the adopted socket"
    assert daemon.stop() == 0


def test_socket_activation_for_another_pid_is_ignored(activated, echo_target):
    with listening_socket() as listener:
        port = listener.getsockname()[1]
        daemon = activated(listener, "--port", "0", listen_pid="1")
        assert daemon.port not in (0, port), "it must bind its configured port instead"
        assert "adopted" not in daemon.output()
        with connect_through(("127.0.0.1", daemon.port), local(echo_target)) as tunnel:
            tunnel.sendall(b"own port")
            assert recv_exactly(tunnel, 8) == b"own port"
    assert daemon.stop() == 0


# ---- drop_privileges ----


@pytest.fixture
def no_identity_changes(monkeypatch):
    """Make any set*id call fail the test: for in-process calls that must not drop."""

    def forbidden(*args: object) -> None:
        raise AssertionError("drop_privileges changed the process identity")

    for name in ("setuid", "setgid", "setgroups"):
        monkeypatch.setattr(os, name, forbidden)


def test_drop_privileges_is_a_noop_when_not_root(monkeypatch, no_identity_changes):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    privileges.drop_privileges("nobody", None)
    privileges.drop_privileges("no-such-user-xyz", "no-such-group-xyz")


def test_drop_privileges_without_a_user_is_a_noop(monkeypatch, no_identity_changes):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    privileges.drop_privileges("", None)
    privileges.drop_privileges("", "nogroup")


def test_drop_privileges_names_an_unknown_user(monkeypatch, no_identity_changes):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    with pytest.raises(ValueError, match="no-such-user-xyz"):
        privileges.drop_privileges("no-such-user-xyz", None)


def test_drop_privileges_names_an_unknown_group(monkeypatch, no_identity_changes):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    with pytest.raises(ValueError, match="no-such-group-xyz"):
        privileges.drop_privileges("nobody", "no-such-group-xyz")


DROP_AND_REPORT = """
import os, sys
from socks5d.ops.privileges import drop_privileges
drop_privileges(sys.argv[1], sys.argv[2] or None)
try:
    os.setuid(0)
except PermissionError:
    regained = "no"
else:
    regained = "yes"
print(os.getuid(), os.geteuid(), os.getgid(), os.getegid(), os.getgroups(), regained)
"""


def _group_gid(name: str) -> int | None:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop privileges")


@needs_root
@pytest.mark.parametrize("group", ["", "nogroup"])
def test_drop_privileges_as_root_cannot_be_undone(group):
    nobody = pwd.getpwnam("nobody")
    gid = nobody.pw_gid if not group else _group_gid(group)
    if gid is None:
        pytest.skip(f"no group {group!r} here")
    result = subprocess.run(
        [sys.executable, "-c", DROP_AND_REPORT, "nobody", group],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=TIMEOUT,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split(None, 4)[:4] == [str(nobody.pw_uid)] * 2 + [str(gid)] * 2
    assert result.stdout.rstrip().endswith(f"[{gid}] no"), result.stdout


@needs_root
def test_daemon_drops_root_after_binding(daemon_factory, tmp_path, echo_target):
    from socks5d.ops.config import ServerConfig

    if "run_as_user" not in ServerConfig.__dataclass_fields__:
        pytest.skip("config.py has no run_as_user yet")
    config = tmp_path / "config.toml"
    config.write_text('[server]\nhost = "127.0.0.1"\nport = 0\nrun_as_user = "nobody"\n')
    config.chmod(0o644)
    daemon = daemon_factory("--config", str(config))
    status = Path(f"/proc/{daemon.proc.pid}/status").read_text()
    uids = re.search(r"^Uid:\s+(.*)$", status, re.MULTILINE)
    assert uids is not None
    assert set(uids.group(1).split()) == {str(pwd.getpwnam("nobody").pw_uid)}
    with connect_through(("127.0.0.1", daemon.port), local(echo_target)) as tunnel:
        tunnel.sendall(b"as nobody")
        assert recv_exactly(tunnel, 9) == b"as nobody"


# ---- the unit files ----


def test_unit_files_pass_systemd_analyze_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # verify insists that ExecStart's binary exists; point a copy at this Python.
    service = (UNITS / "socks5d.service").read_text()
    assert "ExecStart=/usr/local/bin/socks5d " in service
    (tmp_path / "socks5d.service").write_text(
        service.replace(
            "ExecStart=/usr/local/bin/socks5d ", f"ExecStart={sys.executable} -m socks5d "
        )
    )
    shutil.copy(UNITS / "socks5d.socket", tmp_path / "socks5d.socket")
    result = subprocess.run(
        [analyze, "verify", "socks5d.service", "socks5d.socket"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
        env={**os.environ, "SYSTEMD_LOG_LEVEL": "warning"},
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "socks5d" not in output, output


def unit_directives(text: str) -> dict[str, list[str]]:
    directives: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            directives.setdefault(key, []).append(value)
    return directives


def test_service_unit_declares_the_notify_protocol_and_the_hardening():
    service = unit_directives((UNITS / "socks5d.service").read_text())
    assert service["Type"] == ["notify"]
    assert service["NotifyAccess"] == ["main"]
    assert service["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert service["Restart"] == ["on-failure"]
    assert service["WantedBy"] == ["multi-user.target"]
    for key in (
        "DynamicUser",
        "NoNewPrivileges",
        "ProtectHome",
        "PrivateTmp",
        "PrivateDevices",
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "ProtectKernelLogs",
        "ProtectControlGroups",
        "ProtectClock",
        "ProtectHostname",
        "RestrictNamespaces",
        "RestrictRealtime",
        "RestrictSUIDSGID",
        "LockPersonality",
        "MemoryDenyWriteExecute",
    ):
        assert service[key] == ["yes"], key
    assert service["ProtectSystem"] == ["strict"]
    assert service["RestrictAddressFamilies"] == ["AF_INET AF_INET6 AF_UNIX"]
    assert service["CapabilityBoundingSet"] == ["CAP_NET_BIND_SERVICE"]
    assert service["AmbientCapabilities"] == ["CAP_NET_BIND_SERVICE"]
    assert service["SystemCallFilter"] == ["@system-service"]
    assert service["SystemCallArchitectures"] == ["native"]
    assert service["LimitNOFILE"] == ["65536"]
    assert service["ConfigurationDirectory"] == ["socks5d"]
    assert "UMask" in service
    # The daemon's shutdown grace is 5 s (close_timeout): systemd must wait longer.
    timeout = service["TimeoutStopSec"][0]
    assert timeout.endswith("s") and int(timeout[:-1]) >= 15


def test_socket_unit_listens_on_loopback_for_one_daemon():
    sockets = unit_directives((UNITS / "socks5d.socket").read_text())
    assert sockets["ListenStream"] == ["127.0.0.1:1080"]
    assert sockets["Accept"] == ["no"]
    assert sockets["WantedBy"] == ["sockets.target"]


@pytest.mark.parametrize("unit", ["socks5d.service", "socks5d.socket"])
def test_every_block_of_directives_says_why(unit):
    """Every block of the unit carries a comment saying why it is there."""
    block: list[str] = []
    for line in [*(UNITS / unit).read_text().splitlines(), ""]:
        if line.strip():
            block.append(line)
            continue
        settings = [entry for entry in block if not entry.startswith(("#", "[")) and "=" in entry]
        uncommented = {"Description", "WantedBy"}  # self-explanatory
        if settings and not any(entry.startswith("#") for entry in block):
            assert {entry.partition("=")[0] for entry in settings} <= uncommented, block
        block = []
