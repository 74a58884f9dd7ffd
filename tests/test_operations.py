"""Running socks5d as an operator does: log formats and files, logrotate, reloads under
load, the open-file limit, and reloads that must be refused.

The real command in a subprocess on loopback, port 0. Listeners that must be reachable
from other hosts are bound in a private network namespace (tests/netns.py). Every wait
is bounded; the daemon's log lines are polled because they have no event to wait on.
"""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from clients import TIMEOUT, connect_through, open_tunnel, recv_all, recv_exactly, wait_until
from conftest import DaemonProcess, TargetServer, echo
from netns import call_in_netns, needs_netns, netns_only

from socks5d.socks.protocol import (
    Address,
    AddressType,
    Method,
    Reply,
    encode_greeting,
)

ROOT = Path(__file__).resolve().parent.parent
LISTENING = re.compile(r"listening on (\S+):(\d+) \((\w+)\)")


# ---- helpers ----


def local(port: int) -> Address:
    return Address(AddressType.IPV4, "127.0.0.1", port)


def matching(lines: list[str], *needles: str) -> list[str]:
    return [line for line in lines if all(needle in line for needle in needles)]


def greeter(conn: socket.socket) -> None:
    """Say "hello" first, then echo: bytes down != bytes up, so the counts can't be swapped."""
    conn.sendall(b"hello")
    echo(conn)


class Process:
    """socks5d, or a wrapper that execs it, with stdout and stderr read by threads.

    The port comes from the "listening on" line, on stderr or in `log_file`.
    """

    def __init__(self, argv: list[str], log_file: Path | None = None) -> None:
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self.readers = [
            threading.Thread(target=self._read, args=(self.proc.stdout, self.stdout), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, self.stderr), daemon=True),
        ]
        for reader in self.readers:
            reader.start()
        self.log_file = log_file
        self.port = 0
        if not (wait_until(self._started) and self.port):
            self.stop()
            raise AssertionError(f"socks5d did not start: {self.stderr} {self.file_lines()}")

    @staticmethod
    def _read(stream: Any, into: list[str]) -> None:
        for line in stream:
            into.append(line.rstrip("\n"))

    def file_lines(self, path: Path | None = None) -> list[str]:
        path = path or self.log_file
        if path is None or not path.exists():
            return []
        return path.read_text().splitlines()

    def _started(self) -> bool:
        lines = self.file_lines() if self.log_file else self.stderr
        for line in lines:
            if match := LISTENING.search(line):
                self.port = int(match.group(2))
                return True
        return self.proc.poll() is not None  # exited: no point waiting

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(TIMEOUT)
        for reader in self.readers:
            reader.join(TIMEOUT)
        return code


@pytest.fixture
def processes() -> Iterator[list[Process]]:
    started: list[Process] = []
    yield started
    for process in started:
        process.stop()


def round_trip(
    proxy: tuple[str, int],
    port: int,
    payload: bytes,
    credentials: tuple[bytes, bytes] | None = None,
) -> bytes:
    with connect_through(proxy, local(port), credentials) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        return recv_all(sock)


# ---- log formats ----


def test_json_log_lines_and_the_access_record(daemon_factory, target_factory):
    target = target_factory(greeter)
    daemon = daemon_factory("--port", "0", "--log-format", "json", "--user", "alice:pw")
    proxy = ("127.0.0.1", daemon.port)
    payload = b"json payload of 27 bytes..."
    sock, reply, bound = open_tunnel(proxy, local(target.port), (b"alice", b"pw"))
    with sock:
        assert reply == Reply.SUCCEEDED
        client_port = sock.getsockname()[1]
        assert recv_exactly(sock, 5) == b"hello"
        sock.sendall(payload)
        assert recv_exactly(sock, len(payload)) == payload
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == b""
    assert wait_until(lambda: '"event":"access"' in daemon.output())
    daemon.stop()
    records = [json.loads(line) for line in daemon.lines]  # every line is a JSON object
    assert all(isinstance(record, dict) for record in records)
    assert any(record.get("message", "").startswith("listening on") for record in records)
    (access,) = [record for record in records if record.get("event") == "access"]
    expected_keys = {
        "time",
        "session",
        "client",
        "user",
        "command",
        "target",
        "resolved",
        "egress",
        "reply",
        "bytes_up",
        "bytes_down",
        "duration",
        "closed_by",
    }
    assert expected_keys <= access.keys()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", access["time"])
    assert re.fullmatch(r"[0-9a-f]{12}", access["session"])
    assert access["client"] == f"127.0.0.1:{client_port}"
    assert access["user"] == "alice"
    assert access["command"] == "CONNECT"
    assert access["target"] == f"127.0.0.1:{target.port}"
    assert access["resolved"] == f"127.0.0.1:{target.port}"
    assert access["egress"] == f"{bound.host}:{bound.port}"  # what the reply told the client
    assert bound.host == "127.0.0.1"
    assert access["reply"] == 0
    assert access["bytes_up"] == len(payload)
    assert access["bytes_down"] == 5 + len(payload)
    assert isinstance(access["duration"], float) and 0 <= access["duration"] < TIMEOUT
    assert access["closed_by"] == "client"
    assert "pw" not in [value for record in records for value in record.values()]


def test_text_access_line_names_the_session_and_both_ends(daemon_factory, target_factory):
    target = target_factory(greeter)
    daemon = daemon_factory("--port", "0")
    sock, reply, bound = open_tunnel(("127.0.0.1", daemon.port), local(target.port))
    with sock:
        assert reply == Reply.SUCCEEDED
        client_port = sock.getsockname()[1]
        assert recv_exactly(sock, 5) == b"hello"
        sock.sendall(b"abc")
        assert recv_exactly(sock, 3) == b"abc"
    assert wait_until(lambda: bool(matching(daemon.lines, "cmd=CONNECT")))
    (line,) = matching(daemon.lines, "cmd=CONNECT")
    assert re.search(r"\bid=[0-9a-f]{12} ", line)
    assert f"client=127.0.0.1:{client_port} " in line
    assert f"target=127.0.0.1:{target.port} " in line
    assert f"resolved=127.0.0.1:{target.port} " in line
    assert f"egress=127.0.0.1:{bound.port} " in line
    assert "reply=00 up=3 down=8 " in line
    assert "closed_by=client " in line


# ---- log file and logrotate ----


@pytest.mark.parametrize("mode", ["threading", "forking"])
def test_log_file_is_reopened_on_sighup_after_logrotate_moved_it(
    processes, tmp_path, echo_target, mode
):
    log = tmp_path / "socks5d.log"
    rotated = tmp_path / "socks5d.log.1"
    config = tmp_path / "config.toml"
    config.write_text(f'[server]\nlisten = ["127.0.0.1:0"]\nmode = "{mode}"\n')
    daemon = Process(
        [sys.executable, "-m", "socks5d", "--config", str(config), "--log-file", str(log)],
        log_file=log,
    )
    processes.append(daemon)
    proxy = ("127.0.0.1", daemon.port)

    def access(path: Path, size: int) -> list[str]:
        return matching(daemon.file_lines(path), "cmd=CONNECT", f"up={size} down={size} ")

    # One tunnel stays open across the rotation and the reload.
    across = connect_through(proxy, local(echo_target.port))
    with across:
        assert round_trip(proxy, echo_target.port, b"1") == b"1"
        assert wait_until(lambda: len(access(log, 1)) == 1)
        log.rename(rotated)  # logrotate's "create" mode: move, then SIGHUP
        assert round_trip(proxy, echo_target.port, b"22") == b"22"
        assert wait_until(lambda: len(access(rotated, 2)) == 1)  # still the old file
        daemon.proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda: bool(matching(daemon.file_lines(log), "reloaded")))
        assert round_trip(proxy, echo_target.port, b"333") == b"333"
        assert wait_until(lambda: len(access(log, 3)) == 1)
        across.sendall(b"4444")
        assert recv_exactly(across, 4) == b"4444"
    assert wait_until(lambda: len(access(rotated, 4) + access(log, 4)) == 1)
    assert daemon.stop() == 0

    old, new = daemon.file_lines(rotated), daemon.file_lines(log)
    assert matching(old, "listening on") and not matching(new, "listening on")
    assert [len(access(rotated, n)) for n in (1, 2, 3)] == [1, 1, 0]
    assert [len(access(log, n)) for n in (1, 2, 3)] == [0, 0, 1]
    # The tunnel open across the rotation is logged once, in one file or the other (a
    # forked child keeps the descriptor it was born with).
    assert len(access(rotated, 4)) + len(access(log, 4)) == 1
    assert matching(new, "reloaded") and matching(new, "stopped")
    # Lines in a file carry a timestamp (journald is not there to add one).
    for line in old + new:
        assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ ", line), line
    assert daemon.stderr == []  # nothing on stderr: the file has it all


def test_reload_that_cannot_open_the_new_log_file_keeps_the_old_one_and_applies(
    processes, tmp_path, echo_target
):
    log = tmp_path / "socks5d.log"
    config = tmp_path / "config.toml"
    config.write_text(f'[server]\nlisten = ["127.0.0.1:0"]\n[logging]\nfile = "{log}"\n')
    daemon = Process([sys.executable, "-m", "socks5d", "--config", str(config)], log_file=log)
    processes.append(daemon)
    proxy = ("127.0.0.1", daemon.port)
    unopenable = tmp_path / "missing-directory" / "socks5d.log"
    config.write_text(
        f'[server]\nlisten = ["127.0.0.1:0"]\n[logging]\nfile = "{unopenable}"\n'
        '[[users]]\nname = "alice"\npassword = "pw"\n'
    )
    daemon.proc.send_signal(signal.SIGHUP)
    assert wait_until(lambda: bool(matching(daemon.file_lines(), "reloaded")))
    (line,) = matching(daemon.file_lines(), "cannot open log file")
    assert " WARNING " in line and str(unopenable) in line
    assert not matching(daemon.file_lines(), "reload rejected")
    # The policy applied (a login is required now); the lines still go to this file.
    assert round_trip(proxy, echo_target.port, b"login", (b"alice", b"pw")) == b"login"
    assert wait_until(lambda: bool(matching(daemon.file_lines(), "cmd=CONNECT", "up=5 ")))
    assert not unopenable.parent.exists()


def test_unwritable_log_file_at_start_exits_2(tmp_path):
    unopenable = tmp_path / "missing-directory" / "socks5d.log"
    result = subprocess.run(
        [sys.executable, "-m", "socks5d", "--port", "0", "--log-file", str(unopenable)],
        capture_output=True,
        text=True,
        timeout=15,
        cwd=ROOT,
    )
    assert result.returncode == 2
    assert str(unopenable) in result.stderr
    assert "Traceback" not in result.stderr and "listening on" not in result.stderr


def test_reload_with_a_malformed_password_hash_is_rejected(daemon_factory, tmp_path, echo_target):
    config = tmp_path / "config.toml"
    config.write_text('[[users]]\nname = "alice"\npassword = "pw"\n')
    daemon = daemon_factory("--config", str(config), "--port", "0")
    proxy = ("127.0.0.1", daemon.port)
    config.write_text('[[users]]\nname = "bob"\npassword_hash = "scrypt$ln=14,r=8,p=1$%%$x"\n')
    daemon.proc.send_signal(signal.SIGHUP)
    assert wait_until(lambda: "reload rejected" in daemon.output())
    (line,) = matching(daemon.lines, "reload rejected")
    assert line.startswith("ERROR ") and f"{config}: users[0].password_hash:" in line
    assert round_trip(proxy, echo_target.port, b"alice", (b"alice", b"pw")) == b"alice"


# ---- SIGHUP under load ----


LOAD_CONFIG = """\
[server]
mode = "{mode}"
[limits]
max_connections_per_ip = {per_ip}
[timeouts]
idle = {idle}
[[users]]
name = "alice"
password = "alice-pw"
{extra}"""
BOB = '[[users]]\nname = "bob"\npassword = "bob-pw"\n'
TUNNELS = 20


@pytest.mark.parametrize("mode", ["threading", "forking"])
def test_sighup_under_load_keeps_every_tunnel_and_new_connection(
    daemon_factory, tmp_path, target_factory, mode
):
    target = target_factory(echo)
    config = tmp_path / "config.toml"
    config.write_text(LOAD_CONFIG.format(mode=mode, per_ip=100, idle=600, extra=""))
    daemon = daemon_factory("--config", str(config), "--port", "0")
    proxy = ("127.0.0.1", daemon.port)
    alice = (b"alice", b"alice-pw")
    stop = threading.Event()
    errors: list[str] = []
    trips = [0] * TUNNELS
    short = {"ok": 0}
    deadline = time.monotonic() + 30

    tunnels = [connect_through(proxy, local(target.port), alice) for _ in range(TUNNELS)]

    def keep_round_tripping(index: int, sock: socket.socket) -> None:
        try:
            for count in range(100_000):
                if stop.is_set() or time.monotonic() > deadline:
                    return
                payload = f"tunnel {index} trip {count};".encode() * (1 + count % 50)
                sock.sendall(payload)
                if recv_exactly(sock, len(payload)) != payload:
                    errors.append(f"tunnel {index}: wrong bytes on trip {count}")
                    return
                trips[index] += 1
        except (OSError, EOFError) as exc:
            errors.append(f"tunnel {index}: {exc!r} after {trips[index]} trips")

    def keep_connecting() -> None:
        for count in range(5_000):
            if stop.is_set() or time.monotonic() > deadline:
                return
            payload = f"short {count}".encode()
            try:
                if round_trip(proxy, target.port, payload, alice) != payload:
                    errors.append(f"short connection {count}: wrong bytes")
                    return
            except (OSError, EOFError, AssertionError) as exc:
                errors.append(f"short connection {count}: {exc!r}")
                return
            short["ok"] += 1

    workers = [
        threading.Thread(target=keep_round_tripping, args=(index, sock), daemon=True)
        for index, sock in enumerate(tunnels)
    ]
    workers.append(threading.Thread(target=keep_connecting, daemon=True))
    for worker in workers:
        worker.start()

    def everyone_moved_on() -> Callable[[], bool]:
        """A condition: every tunnel and the short loop made progress since now."""
        marks, short_mark = list(trips), short["ok"]
        return lambda: (
            errors != []
            or (
                all(now >= mark + 3 for now, mark in zip(trips, marks, strict=True))
                and short["ok"] >= short_mark + 3
            )
        )

    changes = [
        dict(per_ip=100, idle=600, extra=BOB),  # add a user
        dict(per_ip=200, idle=600, extra=BOB),  # change a limit
        dict(per_ip=200, idle=900, extra=""),  # change a timeout, remove the user
    ]
    try:
        assert wait_until(everyone_moved_on())
        for number, change in enumerate(changes, start=1):
            config.write_text(LOAD_CONFIG.format(mode=mode, **change))
            daemon.proc.send_signal(signal.SIGHUP)
            assert wait_until(lambda n=number: len(matching(daemon.lines, "reloaded")) == n), (
                f"reload {number} not logged:\n{daemon.output()}"
            )
            assert wait_until(everyone_moved_on()), f"no progress after reload {number}"
            users = 2 if change["extra"] else 1
            assert f"reloaded {config} ({users} user(s), 0 rule(s))" in daemon.output()
            if number == 1:  # the added user can log in at once
                bob = round_trip(proxy, target.port, b"bob", (b"bob", b"bob-pw"))
                assert bob == b"bob"
    finally:
        stop.set()
        for worker in workers:
            worker.join(TIMEOUT)
        for sock in tunnels:
            sock.close()
    assert errors == []
    assert not any(worker.is_alive() for worker in workers)
    assert min(trips) >= 12 and short["ok"] >= 12
    assert "reload rejected" not in daemon.output()
    # The removed user is gone for new connections; tunnels it had are not affected.
    with pytest.raises(AssertionError):
        open_tunnel(proxy, local(target.port), (b"bob", b"bob-pw"))


@pytest.mark.parametrize("mode", ["threading", "forking"])
def test_reload_lowers_the_per_user_limit_for_new_tunnels_only(
    daemon_factory, tmp_path, echo_target, mode
):
    config = tmp_path / "config.toml"
    users = '[[users]]\nname = "alice"\npassword = "a"\n[[users]]\nname = "bob"\npassword = "b"\n'
    config.write_text(f'[server]\nmode = "{mode}"\n' + users)
    daemon = daemon_factory("--config", str(config), "--port", "0")
    proxy = ("127.0.0.1", daemon.port)
    held = [connect_through(proxy, local(echo_target.port), (b"alice", b"a")) for _ in range(2)]
    try:
        config.write_text(
            f'[server]\nmode = "{mode}"\n[limits]\nmax_connections_per_user = 2\n' + users
        )
        daemon.proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda: "reloaded" in daemon.output())
        sock, reply, _ = open_tunnel(proxy, local(echo_target.port), (b"alice", b"a"))
        sock.close()
        assert reply == Reply.GENERAL_FAILURE  # alice holds 2 of 2 now
        assert round_trip(proxy, echo_target.port, b"bob", (b"bob", b"b")) == b"bob"
        for sock in held:  # the tunnels opened before the reload are not cut
            sock.sendall(b"kept")
            assert recv_exactly(sock, 4) == b"kept"
    finally:
        for sock in held:
            sock.close()
    assert wait_until(lambda: len(matching(daemon.lines, "user=alice ", "reply=00")) == 2)
    # Both held tunnels gave their slots back: alice may open one again.
    assert round_trip(proxy, echo_target.port, b"again", (b"alice", b"a")) == b"again"


# ---- the open-file limit ----


def test_soft_open_file_limit_is_raised_to_the_hard_limit(processes):
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < 4096 and os.geteuid() != 0:
        pytest.skip(f"the hard open-file limit here is {hard}, below 4096")
    wrapper = (
        "import resource, os, sys; "
        "resource.setrlimit(resource.RLIMIT_NOFILE, (256, 4096)); "
        'os.execv(sys.executable, [sys.executable, "-m", "socks5d", "--port", "0"])'
    )
    daemon = Process([sys.executable, "-c", wrapper])
    processes.append(daemon)
    limits = Path(f"/proc/{daemon.proc.pid}/limits").read_text()
    line = next(line for line in limits.splitlines() if line.startswith("Max open files"))
    assert line.split()[3:5] == ["4096", "4096"], line
    assert not matching(daemon.stderr, "open-file limit")  # raised without a warning


# ---- reloads that must not take effect ----


OPEN_AFTER_RELOAD = '[access]\nprivate_destinations = "allow"\n'


@netns_only
def open_proxy_reload_in_netns(config_path: str) -> dict[str, Any]:
    """Run inside a private network namespace: socks5d on 0.0.0.0 with users, then a
    SIGHUP with a config that has none (an open proxy)."""
    config = Path(config_path)
    config.write_text(OPEN_AFTER_RELOAD + '[[users]]\nname = "alice"\npassword = "pw"\n')
    target = TargetServer(echo)
    daemon = DaemonProcess("--config", config_path, "--host", "0.0.0.0", "--port", "0")
    proxy = ("127.0.0.1", daemon.port)
    try:
        config.write_text(OPEN_AFTER_RELOAD)  # no users left: an open proxy on 0.0.0.0
        daemon.proc.send_signal(signal.SIGHUP)
        rejected = wait_until(lambda: "reload rejected" in daemon.output())
        echoed = round_trip(proxy, target.port, b"alice still", (b"alice", b"pw")).decode()
        with socket.create_connection(proxy, timeout=TIMEOUT) as anonymous:
            anonymous.sendall(encode_greeting([Method.NO_AUTHENTICATION_REQUIRED]))
            method = recv_exactly(anonymous, 2).hex()
    finally:
        code = daemon.stop()
        target.close()
    return {
        "rejected": rejected,
        "echoed": echoed,
        "method": method,
        "port": daemon.port,
        "exit": code,
        "output": daemon.output(),
    }


@needs_netns
def test_sighup_to_an_open_proxy_is_rejected_and_the_users_stay(tmp_path):
    result = call_in_netns(open_proxy_reload_in_netns, str(tmp_path / "config.toml"))
    assert result["rejected"], result["output"]
    (line,) = matching(result["output"].splitlines(), "reload rejected")
    assert line.startswith("ERROR ")
    assert f"refusing to run an open proxy on 0.0.0.0:{result['port']}" in line
    assert result["echoed"] == "alice still"
    assert result["method"] == "05ff"  # a login is still required: no acceptable method
    assert "reloaded" not in result["output"]
    assert result["exit"] == 0


def test_sighup_with_new_listen_addresses_warns_they_need_a_restart(
    daemon_factory, tmp_path, echo_target
):
    config = tmp_path / "config.toml"
    config.write_text('[server]\nlisten = ["127.0.0.1:0"]\n')
    daemon = daemon_factory("--config", str(config))
    proxy = ("127.0.0.1", daemon.port)
    # New listeners and a login; the listeners wait for a restart, the login applies now.
    config.write_text(
        '[server]\nlisten = ["127.0.0.1:0", "127.0.0.2:0"]\n'
        '[[users]]\nname = "alice"\npassword = "pw"\n'
    )
    daemon.proc.send_signal(signal.SIGHUP)
    assert wait_until(lambda: "reloaded" in daemon.output())
    (warning,) = matching(daemon.lines, "need a restart")
    assert warning.startswith("WARNING ") and "listen" in warning
    assert len(matching(daemon.lines, "listening on")) == 1  # nothing new was bound
    assert round_trip(proxy, echo_target.port, b"same port", (b"alice", b"pw")) == b"same port"
    with socket.create_connection(proxy, timeout=TIMEOUT) as anonymous:
        anonymous.sendall(encode_greeting([Method.NO_AUTHENTICATION_REQUIRED]))
        assert recv_exactly(anonymous, 2) == b"\x05\xff"
