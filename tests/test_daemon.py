"""The real `socks5d` command: start-up, both modes end to end, logs, signals, exit codes."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from clients import (
    TIMEOUT,
    children_of,
    connect_through,
    open_tunnel,
    recv_all,
    recv_exactly,
    wait_until,
)
from conftest import DaemonProcess, TargetServer, echo, needs_ipv6
from netns import call_in_netns, needs_netns, netns_only

from socks5d import __version__
from socks5d.ops.cli import main
from socks5d.socks.protocol import Address, AddressType, Reply

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "socks5d", *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )


def local(target) -> Address:
    return Address(AddressType.IPV4, "127.0.0.1", target.port)


@pytest.mark.parametrize("mode", ["threading", "forking"])
def test_socks5d_command_serves_and_stops_on_sigterm(daemon_factory, echo_target, mode):
    daemon = daemon_factory("--port", "0", "--mode", mode)
    assert f"listening on 127.0.0.1:{daemon.port} ({mode})" in daemon.output()
    with connect_through(("127.0.0.1", daemon.port), local(echo_target)) as sock:
        sock.sendall(b"through the real command")
        assert recv_exactly(sock, 24) == b"through the real command"
    assert wait_until(lambda: "cmd=CONNECT" in daemon.output())
    line = next(line for line in daemon.lines if "cmd=CONNECT" in line)
    assert f"target=127.0.0.1:{echo_target.port}" in line
    assert "reply=00 up=24 down=24" in line
    assert daemon.stop(signal.SIGTERM) == 0


@pytest.mark.parametrize("mode", ["threading", "forking"])
def test_sigterm_cuts_idle_tunnels_after_the_grace_and_leaves_no_child(
    daemon_factory, echo_target, mode, tmp_path
):
    config = tmp_path / "config.toml"
    config.write_text(f'[server]\nmode = "{mode}"\n[timeouts]\nshutdown_grace = 0.5\n')
    daemon = daemon_factory("--config", str(config), "--port", "0")
    tunnels = [connect_through(("127.0.0.1", daemon.port), local(echo_target)) for _ in range(3)]
    try:
        for sock in tunnels:
            sock.sendall(b"x")
            assert recv_exactly(sock, 1) == b"x"
        if mode == "forking":
            assert wait_until(lambda: len(children_of(daemon.proc.pid)) == 3)
        children = children_of(daemon.proc.pid)
        started = time.monotonic()
        assert daemon.stop(signal.SIGTERM) == 0
        assert time.monotonic() - started < 5.0
        for sock in tunnels:
            sock.settimeout(TIMEOUT)
            assert recv_all(sock) == b""  # the tunnel was closed, not left hanging
        for child in children:
            assert not Path(f"/proc/{child}").exists(), f"child {child} outlived the daemon"
        assert "waiting up to 0.5 s for 3 open connection(s)" in daemon.output()
        if mode == "forking":
            assert "cut 3 connection(s) still open" in daemon.output()
        else:  # idle loop tunnels: closed once nothing moved for half the grace
            assert "no tunnel moved a byte for 0.2 s; closed 3 idle one(s)" in daemon.output()
    finally:
        for sock in tunnels:
            sock.close()


@pytest.mark.parametrize("mode", ["threading", "forking"])
def test_sigterm_lets_an_in_flight_50_mib_transfer_finish(
    daemon_factory, target_factory, mode, tmp_path
):
    blob = os.urandom(50 * 1024 * 1024)
    expected = hashlib.sha256(blob).hexdigest()
    started_sending = threading.Event()

    def slow_source(conn):
        view = memoryview(blob)
        for offset in range(0, len(blob), 1024 * 1024):
            conn.sendall(view[offset : offset + 1024 * 1024])
            started_sending.set()
            time.sleep(0.01)  # ~0.5 s in all: the transfer is still running at SIGTERM

    target = target_factory(slow_source)
    config = tmp_path / "config.toml"
    config.write_text(f'[server]\nmode = "{mode}"\n[timeouts]\nshutdown_grace = 20\n')
    daemon = daemon_factory("--config", str(config), "--port", "0")
    with connect_through(("127.0.0.1", daemon.port), local(target)) as sock:
        assert started_sending.wait(TIMEOUT)
        daemon.proc.send_signal(signal.SIGTERM)
        assert wait_until(lambda: "waiting up to 20.0 s" in daemon.output())
        with pytest.raises(OSError):  # no new clients while draining
            socket.create_connection(("127.0.0.1", daemon.port), timeout=TIMEOUT).close()
        received = hashlib.sha256(recv_all(sock)).hexdigest()
    assert received == expected  # every byte arrived, then EOF
    # The drain ends by itself once the tunnel has (a forked child may still be exiting
    # when the client sees EOF: a second SIGTERM from stop() would cut it short).
    assert daemon.proc.wait(TIMEOUT) == 0
    assert daemon.stop() == 0
    assert "cut" not in daemon.output()


def test_a_second_sigterm_cuts_the_grace_short(daemon_factory, echo_target, tmp_path):
    config = tmp_path / "config.toml"
    config.write_text("[timeouts]\nshutdown_grace = 60\n")
    daemon = daemon_factory("--config", str(config), "--port", "0")
    with connect_through(("127.0.0.1", daemon.port), local(echo_target)) as sock:
        daemon.proc.send_signal(signal.SIGTERM)
        assert wait_until(lambda: "waiting up to 60.0 s" in daemon.output())
        started = time.monotonic()
        assert daemon.stop(signal.SIGTERM) == 0
        assert time.monotonic() - started < 5.0
        assert recv_all(sock) == b""
    assert "cut 1 connection(s) still open" in daemon.output()


def test_sigint_also_stops_cleanly(daemon_factory):
    daemon = daemon_factory("--port", "0")
    assert daemon.stop(signal.SIGINT) == 0
    assert "stopped" in daemon.output()


def test_users_flag_requires_login_and_never_logs_the_password(daemon_factory, echo_target):
    daemon = daemon_factory("--port", "0", "--user", "alice:pa55word", "--log-level", "debug")
    proxy = ("127.0.0.1", daemon.port)
    with connect_through(proxy, local(echo_target), (b"alice", b"pa55word")) as sock:
        sock.sendall(b"ok")
        assert recv_exactly(sock, 2) == b"ok"
    with pytest.raises(AssertionError):
        open_tunnel(proxy, local(echo_target), (b"alice", b"wrong-password"))
    assert wait_until(lambda: "authentication failed" in daemon.output())
    daemon.stop()
    assert "user=alice" in daemon.output()
    assert "pa55word" not in daemon.output() and "wrong-password" not in daemon.output()


def test_config_file_and_flag_override(daemon_factory, tmp_path, echo_target):
    config = tmp_path / "config.toml"
    config.write_text(
        '[server]\nport = 1\nmode = "forking"\n[[users]]\nname = "bob"\npassword = "b"\n'
    )
    daemon = daemon_factory("--config", str(config), "--port", "0")
    assert "(forking)" in daemon.output()
    with connect_through(("127.0.0.1", daemon.port), local(echo_target), (b"bob", b"b")) as sock:
        sock.sendall(b"file")
        assert recv_exactly(sock, 4) == b"file"


def test_sighup_reloads_users_and_keeps_tunnels(daemon_factory, tmp_path, echo_target):
    config = tmp_path / "config.toml"
    config.write_text('[[users]]\nname = "old"\npassword = "one"\n')
    daemon = daemon_factory("--config", str(config), "--port", "0")
    proxy = ("127.0.0.1", daemon.port)
    tunnel = connect_through(proxy, local(echo_target), (b"old", b"one"))
    with tunnel:
        config.write_text('[[users]]\nname = "new"\npassword = "two"\n')
        daemon.proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda: "reloaded" in daemon.output())
        with connect_through(proxy, local(echo_target), (b"new", b"two")) as sock:
            sock.sendall(b"new user")
            assert recv_exactly(sock, 8) == b"new user"
        with pytest.raises(AssertionError):
            open_tunnel(proxy, local(echo_target), (b"old", b"one"))
        config.write_text("[server\n")  # broken: rejected, the running config stays
        daemon.proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda: "reload rejected" in daemon.output())
        tunnel.sendall(b"survived")
        assert recv_exactly(tunnel, 8) == b"survived"
    assert daemon.proc.poll() is None


def test_port_in_use_exits_1_with_a_message():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = run_cli("--port", str(port))
    assert result.returncode == 1
    assert result.stderr.strip() == f"Error: address already in use: 127.0.0.1:{port}"
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[server]\nport = 70000\n", "server.port: must be between 0 and 65535, got 70000"),
        ("[server]\nbogus = 1\n", "unknown key 'server.bogus'"),
        ('[server]\nport = "x"\n', "server.port: must be an integer, got str 'x'"),
    ],
)
def test_bad_config_exits_2_with_one_line_naming_file_and_key(tmp_path, text, message):
    config = tmp_path / "bad.toml"
    config.write_text(text)
    result = run_cli("--config", str(config))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"Error: {config}: {message}")


def test_bad_flags_exit_2():
    runner = CliRunner()
    assert runner.invoke(main, ["--port", "70000"]).exit_code == 2
    assert runner.invoke(main, ["--port", "abc"]).exit_code == 2
    assert runner.invoke(main, ["--mode", "async"]).exit_code == 2
    assert runner.invoke(main, ["--config", "/nonexistent/socks5d.toml"]).exit_code == 2
    bad_user = runner.invoke(main, ["--user", "nocolon"])
    assert bad_user.exit_code == 2
    assert "--user 'nocolon': expected NAME:PASSWORD" in bad_user.output


def test_help_shows_options_and_examples():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for text in ("--host", "--port", "--mode", "--config", "--user", "--log-level", "Examples:"):
        assert text in result.output


def test_version():
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


def test_refused_reply_through_the_command(daemon_factory):
    daemon = daemon_factory("--port", "0")
    sock, reply, _ = open_tunnel(
        ("127.0.0.1", daemon.port), Address(AddressType.IPV4, "127.0.0.1", 1)
    )
    sock.close()
    assert reply == Reply.CONNECTION_REFUSED
    assert wait_until(lambda: "reply=05" in daemon.output())


def test_no_descriptor_leak_in_the_daemon(daemon_factory, echo_target):
    daemon = daemon_factory("--port", "0")
    fd_dir = Path(f"/proc/{daemon.proc.pid}/fd")
    baseline = len(os.listdir(fd_dir))
    for _ in range(50):
        with connect_through(("127.0.0.1", daemon.port), local(echo_target)) as sock:
            sock.sendall(b"z")
            assert recv_exactly(sock, 1) == b"z"
    for _ in range(20):
        with socket.create_connection(("127.0.0.1", daemon.port), timeout=TIMEOUT) as sock:
            sock.sendall(b"\x06garbage")  # neither SOCKS5 nor SOCKS4
            assert recv_all(sock) == b""
    assert wait_until(lambda: len(os.listdir(fd_dir)) <= baseline)


@netns_only
def double_colon_in_netns(config: str) -> dict[str, object]:
    """Run inside a private network namespace (call_in_netns): `socks5d --host ::`."""
    target = TargetServer(echo)
    daemon = DaemonProcess("--config", config, "--host", "::", "--port", "0", "--allow-open")
    echoed = {}
    try:
        for proxy_host in ("127.0.0.1", "::1"):
            with connect_through((proxy_host, daemon.port), local(target)) as sock:
                sock.sendall(proxy_host.encode())
                echoed[proxy_host] = recv_exactly(sock, len(proxy_host)).decode()
    finally:
        daemon.stop()
        target.close()
    return {"port": daemon.port, "echoed": echoed, "output": daemon.output()}


@needs_ipv6
@needs_netns
def test_host_double_colon_listens_dual_stack(tmp_path):
    config = tmp_path / "config.toml"  # an exposed listener: say open and local are fine
    config.write_text('[access]\nprivate_destinations = "allow"\n')
    # "::" listens on every address of the host: only in a private network namespace.
    result = call_in_netns(double_colon_in_netns, str(config))
    assert f"listening on [::]:{result['port']} (threading)" in result["output"]
    assert result["echoed"] == {"127.0.0.1": "127.0.0.1", "::1": "::1"}
    assert "client=127.0.0.1:" in result["output"]  # v4-mapped clients are logged as IPv4
    assert "client=[::1]:" in result["output"]


@pytest.mark.parametrize("mode", ["threading", "forking"])
def test_over_max_connections_a_client_is_closed_and_logged(
    daemon_factory, tmp_path, echo_target, mode
):
    config = tmp_path / "config.toml"
    config.write_text(f'[server]\nmode = "{mode}"\n[limits]\nmax_connections = 2\n')
    daemon = daemon_factory("--config", str(config), "--port", "0")
    proxy = ("127.0.0.1", daemon.port)
    held = [connect_through(proxy, local(echo_target)) for _ in range(2)]
    try:
        with socket.create_connection(proxy, timeout=TIMEOUT) as extra:
            assert recv_all(extra) == b""  # closed without a word, before the greeting
        assert wait_until(lambda: "connection limit reached" in daemon.output())
        for sock in held:  # the held tunnels are unharmed
            sock.sendall(b"held")
            assert recv_exactly(sock, 4) == b"held"
    finally:
        for sock in held:
            sock.close()
    assert daemon.proc.poll() is None


@needs_ipv6
def test_listen_on_several_addresses_from_the_command_line(daemon_factory, echo_target):
    daemon = daemon_factory("--listen", "127.0.0.1:0", "--listen", "[::1]:0")
    pattern = r"listening on (\S+):(\d+) \(threading\)"
    assert wait_until(lambda: len(re.findall(pattern, daemon.output())) == 2)
    found = re.findall(pattern, daemon.output())
    assert [host for host, _ in found] == ["127.0.0.1", "[::1]"]
    for host, port in found:
        proxy = (host.strip("[]"), int(port))
        with connect_through(proxy, local(echo_target)) as sock:
            sock.sendall(b"multi")
            assert recv_exactly(sock, 5) == b"multi"


def test_outgoing_address_is_the_source_targets_see(daemon_factory, target_factory):
    try:
        with socket.socket() as probe:
            probe.bind(("127.0.0.2", 0))
    except OSError:
        pytest.skip("127.0.0.2 is not bindable here")

    def tell_peer(conn):
        conn.sendall(conn.getpeername()[0].encode())

    target = target_factory(tell_peer)
    daemon = daemon_factory("--port", "0", "--outgoing-address", "127.0.0.2")
    with connect_through(("127.0.0.1", daemon.port), local(target)) as sock:
        assert recv_all(sock) == b"127.0.0.2"


def test_listen_and_port_flags_together_exit_2():
    result = run_cli("--listen", "127.0.0.1:0", "--port", "1")
    assert result.returncode == 2
    assert "either --listen or --host/--port" in result.stderr


def test_sigterm_closes_idle_tunnels_once_nothing_is_in_flight(
    daemon_factory, echo_target, tmp_path
):
    """Idle tunnels (a browser's keep-alive connections) do not hold the stop for the
    whole grace period: once no tunnel has moved a byte for half of it, they are closed
    and the daemon exits 0. (A transfer in flight keeps it waiting: see the 50 MiB test.)"""
    config = tmp_path / "config.toml"
    config.write_text("[timeouts]\nshutdown_grace = 8\n")
    daemon = daemon_factory("--config", str(config), "--port", "0")
    tunnels = [connect_through(("127.0.0.1", daemon.port), local(echo_target)) for _ in range(3)]
    try:
        for sock in tunnels:
            sock.sendall(b"x")
            assert recv_exactly(sock, 1) == b"x"
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.proc.wait(TIMEOUT) == 0
        for sock in tunnels:
            sock.settimeout(TIMEOUT)
            assert recv_all(sock) == b""
        daemon.reader.join(TIMEOUT)
        # 4 s of quiet ended it, not the 8 s grace (the log says which, whatever the load)
        assert "no tunnel moved a byte for 4.0 s; closed 3 idle one(s)" in daemon.output()
        assert "cut" not in daemon.output()
    finally:
        for sock in tunnels:
            sock.close()
