"""Connection limits that fit where the proxy listens, counted correctly under concurrency.

- `limits.max_connections = "auto"`: as many connections as the open-file limit can back.
- `limits.max_connections_per_ip = "auto"`: no cap while every listener is loopback-only
  (every client is 127.0.0.1 or ::1 there), 256 when a listener is exposed; judged by the
  bound (or adopted) addresses, again on every reload.
- A refusal before the greeting is a bare close, logged at most once a second with counts.
- The slot check and the slot taking are one step, however many loop threads accept.
- IPv6 clients count per /64 (limits.ipv6_client_prefix).

Real `socks5d` processes on loopback (or in a private network namespace for exposed
listeners and extra IPv6 addresses); every wait is bounded.
"""

from __future__ import annotations

import contextlib
import logging
import re
import selectors
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from clients import TIMEOUT, recv_all, recv_exactly, wait_until
from conftest import DaemonProcess, TargetServer, echo
from netns import call_in_netns, needs_netns, netns_only

from socks5d.core.server import BaseRequestHandler, ThreadingTCPServer
from socks5d.ops import systemd
from socks5d.ops.cli import main
from socks5d.ops.config import ConfigError, LimitsConfig, load_config, parse_config
from socks5d.ops.daemon import Daemon
from socks5d.policy.capacity import (
    DESCRIPTORS_PER_CONNECTION,
    EXPOSED_PER_ADDRESS,
    FORKING_AUTO,
    ProcessLimits,
    descriptor_capacity,
    process_limits,
    resolve_limits,
)
from socks5d.socks.protocol import (
    Address,
    AddressType,
    Command,
    Method,
    encode_greeting,
    encode_request,
)

# VER NMETHODS METHOD, then VER CMD RSV ATYP addr port: sent in one go.
GRANTED = b"\x05\x00" + b"\x05\x00"  # method reply (no auth), then VER REP=00
REPLY_SIZE = 2 + 10  # method reply + an IPv4 reply (VER REP RSV ATYP addr port)


def tunnel_request(target: Address) -> bytes:
    return encode_greeting([Method.NO_AUTHENTICATION_REQUIRED]) + encode_request(
        Command.CONNECT, target
    )


def open_tunnels_at_once(
    proxy: tuple[str, int], target: Address, count: int, source: str | None = None
) -> tuple[list[socket.socket], int]:
    """Start `count` connections together, each sending greeting and CONNECT at once.

    Returns (the granted tunnels, left open for the caller to close; how many the proxy
    closed before answering). Anything else (another reply, a timeout) fails the test.
    """
    family = socket.AF_INET6 if ":" in proxy[0] else socket.AF_INET
    request = tunnel_request(target)
    reply_size = REPLY_SIZE + (12 if target.type == AddressType.IPV6 else 0)
    selector = selectors.DefaultSelector()
    received: dict[socket.socket, bytes] = {}
    granted: list[socket.socket] = []
    closed = 0
    try:
        for _ in range(count):
            sock = socket.socket(family)
            if source is not None:
                sock.bind((source, 0))
            sock.setblocking(False)
            sock.connect_ex(proxy)
            selector.register(sock, selectors.EVENT_WRITE)
            received[sock] = b""
        deadline = time.monotonic() + 3 * TIMEOUT
        while received and time.monotonic() < deadline:
            for key, events in selector.select(1.0):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if events & selectors.EVENT_WRITE:
                    try:
                        sock.send(request)  # 13-25 bytes: one send on a fresh socket
                    except OSError:  # reset while connecting: refused
                        closed += 1
                        _forget(selector, received, sock)
                        continue
                    selector.modify(sock, selectors.EVENT_READ)
                    continue
                try:
                    chunk = sock.recv(reply_size)
                except ConnectionError:
                    chunk = b""
                if not chunk:
                    closed += 1
                    _forget(selector, received, sock)
                    continue
                received[sock] += chunk
                if len(received[sock]) >= reply_size:
                    assert received[sock].startswith(GRANTED), received[sock]
                    selector.unregister(sock)
                    del received[sock]
                    sock.setblocking(True)
                    sock.settimeout(TIMEOUT)
                    granted.append(sock)
        assert not received, f"{len(received)} connection(s) got no answer"
    except BaseException:
        for sock in granted:
            sock.close()
        raise
    finally:
        for sock in received:
            sock.close()
        selector.close()
    return granted, closed


def _forget(selector: selectors.BaseSelector, received: dict, sock: socket.socket) -> None:
    selector.unregister(sock)
    del received[sock]
    sock.close()


def ip_target(port: int, host: str = "127.0.0.1") -> Address:
    kind = AddressType.IPV6 if ":" in host else AddressType.IPV4
    return Address(kind, host, port)


def refused_in_log(output: str) -> int:
    """The refusals the daemon's rate-limited warnings add up to."""
    return sum(int(n) for n in re.findall(r"refused (\d+) connection", output))


@contextlib.contextmanager
def closing_all(sockets: list[socket.socket]) -> Iterator[list[socket.socket]]:
    try:
        yield sockets
    finally:
        for sock in sockets:
            sock.close()


def write_config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return str(path)


# ---- config: "auto" or a number ----


def test_both_limits_default_to_auto():
    limits = LimitsConfig()
    assert (limits.max_connections, limits.max_connections_per_ip) == ("auto", "auto")


def test_limits_take_auto_or_numbers():
    config = parse_config({"limits": {"max_connections": 10, "max_connections_per_ip": "auto"}})
    assert (config.limits.max_connections, config.limits.max_connections_per_ip) == (10, "auto")
    config = parse_config({"limits": {"max_connections": "auto", "max_connections_per_ip": 0}})
    assert (config.limits.max_connections, config.limits.max_connections_per_ip) == ("auto", 0)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("max_connections", 0),
        ("max_connections", "many"),
        ("max_connections", True),
        ("max_connections_per_ip", -1),
        ("max_connections_per_ip", "Auto"),
    ],
)
def test_a_bad_limit_names_its_key_and_the_choices(key, value):
    with pytest.raises(ConfigError) as caught:
        parse_config({"limits": {key: value}}, "c.toml")
    assert f"limits.{key}" in str(caught.value)
    assert 'or "auto"' in str(caught.value)


def test_check_config_exits_2_naming_a_bad_limit(tmp_path):
    path = write_config(tmp_path, '[limits]\nmax_connections_per_ip = "lots"\n')
    result = CliRunner().invoke(main, ["check-config", path])
    assert result.exit_code == 2
    assert "limits.max_connections_per_ip" in result.output
    assert "Traceback" not in result.output


# ---- what "auto" resolves to ----

PLENTY = ProcessLimits(open_files=20000, processes=None)


def resolve(
    listening: list[tuple[str, int]],
    process: ProcessLimits = PLENTY,
    mode: str = "threading",
    relay_threads: int = 1,
    **limits: Any,
):
    return resolve_limits(
        LimitsConfig(**limits),
        mode=mode,
        relay_threads=relay_threads,
        listening=listening,
        process=process,
    )


@pytest.mark.parametrize(
    "listening",
    [[("127.0.0.1", 1080)], [("::1", 1080)], [("127.0.0.1", 1), ("::1", 2)], [("localhost", 1)]],
)
def test_auto_per_address_is_unlimited_while_every_listener_is_loopback(listening):
    caps = resolve(listening)
    assert caps.max_connections_per_ip is None
    assert "unlimited (auto: every listener is loopback-only)" in caps.describe()


@pytest.mark.parametrize(
    ("listening", "where"),
    [
        ([("0.0.0.0", 1080)], "0.0.0.0:1080"),
        ([("::", 1080)], "[::]:1080"),
        ([("127.0.0.1", 1080), ("192.0.2.1", 1081)], "192.0.2.1:1081"),
    ],
)
def test_auto_per_address_caps_when_any_listener_is_exposed(listening, where):
    caps = resolve(listening)
    assert caps.max_connections_per_ip == EXPOSED_PER_ADDRESS == 256
    assert f"= 256 (auto: {where} reachable from other hosts)" in caps.describe()


def test_a_per_address_number_wins_and_zero_is_unlimited():
    assert resolve([("0.0.0.0", 1)], max_connections_per_ip=10).max_connections_per_ip == 10
    assert resolve([("0.0.0.0", 1)], max_connections_per_ip=0).max_connections_per_ip is None
    assert resolve([("127.0.0.1", 1)], max_connections_per_ip=3).max_connections_per_ip == 3


def test_auto_max_connections_is_what_the_descriptors_can_back():
    caps = resolve([("127.0.0.1", 1)])
    expected = descriptor_capacity(20000, relay_threads=1, listeners=1)
    assert caps.max_connections == expected
    # Every connection's worst case fits the limit, with what the daemon keeps.
    assert expected * DESCRIPTORS_PER_CONNECTION <= 20000 - 32
    assert 3000 < expected < 20000 // DESCRIPTORS_PER_CONNECTION
    assert caps.warning is None
    assert f"max_connections = {expected} (auto: RLIMIT_NOFILE 20000" in caps.describe()
    # A common soft limit, and a tiny one: still at least one connection.
    small = resolve([("127.0.0.1", 1)], ProcessLimits(1024, None)).max_connections
    assert small == (1024 - 32 - 3 - 1) // DESCRIPTORS_PER_CONNECTION
    assert resolve([("127.0.0.1", 1)], ProcessLimits(16, None)).max_connections == 1
    # More loops keep more descriptors for themselves.
    assert resolve([("127.0.0.1", 1)], relay_threads=8).max_connections < expected


def test_a_thread_per_connection_is_also_bounded_by_rlimit_nproc():
    process = ProcessLimits(open_files=20000, processes=500)
    assert resolve([("127.0.0.1", 1)], process, relay_threads=0).max_connections == 500 - 64
    assert resolve([("127.0.0.1", 1)], process, relay_threads=1).max_connections > 500


def test_an_explicit_max_connections_wins_and_is_warned_about_when_unbacked():
    caps = resolve([("127.0.0.1", 1)], max_connections=500)
    assert (caps.max_connections, caps.warning) == (500, None)
    caps = resolve([("127.0.0.1", 1)], ProcessLimits(1024, None), max_connections=10000)
    assert caps.max_connections == 10000
    assert caps.warning is not None
    assert "limits.max_connections = 10000" in caps.warning
    assert "RLIMIT_NOFILE 1024" in caps.warning
    assert "EMFILE" in caps.warning


def test_forking_auto_is_bounded_by_processes_not_descriptors():
    tiny_files = ProcessLimits(open_files=64, processes=None)
    assert resolve([("127.0.0.1", 1)], tiny_files, mode="forking").max_connections == FORKING_AUTO
    few = ProcessLimits(open_files=20000, processes=300)
    assert resolve([("127.0.0.1", 1)], few, mode="forking").max_connections == 300 - 64
    caps = resolve([("127.0.0.1", 1)], few, mode="forking", max_connections=2000)
    assert caps.max_connections == 2000
    assert caps.warning is not None and "RLIMIT_NPROC (300)" in caps.warning


# ---- the daemon: start-up, socket activation, reload ----


@pytest.fixture
def quiet_systemd(monkeypatch):
    """No socket passed by a service manager, unless the test says so."""
    monkeypatch.setattr(systemd, "listen_fds", lambda: [])
    return monkeypatch


def test_adopted_sockets_are_judged_by_their_bound_address(tmp_path, quiet_systemd, caplog):
    caplog.set_level(logging.INFO, logger="socks5d")
    # The file says "every interface", but systemd hands over a loopback socket.
    config = load_config(write_config(tmp_path, '[server]\nhost = "0.0.0.0"\n'))
    adopted = socket.socket()
    adopted.bind(("127.0.0.1", 0))
    adopted.listen()
    quiet_systemd.setattr(systemd, "listen_fds", lambda: [adopted])
    daemon = Daemon(config)
    server = daemon.bind()
    try:
        assert server.max_connections_per_ip is None
        assert "unlimited (auto: every listener is loopback-only)" in caplog.text
    finally:
        server.server_close()


def test_a_reload_recomputes_the_limits(tmp_path, quiet_systemd, caplog):
    caplog.set_level(logging.INFO, logger="socks5d")
    path = write_config(tmp_path, "[server]\nport = 0\n[limits]\nmax_connections_per_ip = 2\n")
    daemon = Daemon(load_config(path), path)
    server = daemon.bind()
    try:
        assert server.max_connections_per_ip == 2
        auto = descriptor_capacity(process_limits().open_files, relay_threads=1, listeners=1)
        assert server.max_connections == auto
        Path(path).write_text("[server]\nport = 0\n[limits]\nmax_connections = 7\n")
        assert daemon.reload()
        assert (server.max_connections_per_ip, server.max_connections) == (None, 7)
        lines = [r.getMessage() for r in caplog.records if "connection limits" in r.getMessage()]
        assert lines[-1] == (
            "connection limits: max_connections = 7 (set), max_connections_per_ip = "
            "unlimited (auto: every listener is loopback-only)"
        )
    finally:
        server.server_close()


@pytest.mark.parametrize(("mode", "count"), [("threading", 300), ("forking", 100)])
def test_defaults_grant_every_tunnel_a_local_client_opens_at_once(
    daemon_factory, echo_target, mode, count
):
    # One local client, many tunnels at once (a browser, a download manager): at the
    # defaults none is turned away (the old per-address cap of 64 closed most).
    open_files = process_limits(raised=True).open_files
    if mode == "threading" and descriptor_capacity(open_files, 1, 1) < count:
        pytest.skip(f"an open-file limit of {open_files} cannot back {count} tunnels")
    daemon = daemon_factory("--port", "0", "--mode", mode)
    proxy = ("127.0.0.1", daemon.port)
    granted, closed = open_tunnels_at_once(proxy, ip_target(echo_target.port), count)
    with closing_all(granted):
        assert (len(granted), closed) == (count, 0)
        for sock in (granted[0], granted[-1]):
            sock.sendall(b"still here")
            assert recv_exactly(sock, 10) == b"still here"
    output = daemon.output()
    assert "max_connections_per_ip = unlimited (auto: every listener is loopback-only)" in output
    assert re.search(r"connection limits: max_connections = \d+ \(auto: ", output)
    assert "connection limit reached" not in output


def test_a_reload_to_auto_lifts_the_per_address_cap(daemon_factory, tmp_path, echo_target):
    path = write_config(tmp_path, "[limits]\nmax_connections_per_ip = 2\n")
    daemon = daemon_factory("--port", "0", "--config", path)
    proxy = ("127.0.0.1", daemon.port)
    target = ip_target(echo_target.port)
    granted, closed = open_tunnels_at_once(proxy, target, 5)
    with closing_all(granted):
        assert (len(granted), closed) == (2, 3)
    Path(path).write_text('[limits]\nmax_connections_per_ip = "auto"\n')
    daemon.proc.send_signal(signal.SIGHUP)
    assert wait_until(lambda: "reloaded" in daemon.output()), daemon.output()
    granted, closed = open_tunnels_at_once(proxy, target, 5)
    with closing_all(granted):
        assert (len(granted), closed) == (5, 0)


# ---- refusals under concurrency: never over the cap, logged once a second ----


@pytest.mark.parametrize(
    ("mode", "relay_threads"), [("threading", 2), ("threading", 0), ("forking", 1)]
)
def test_a_per_address_cap_holds_with_many_accepting_threads(
    daemon_factory, tmp_path, echo_target, mode, relay_threads
):
    path = write_config(
        tmp_path,
        f'[server]\nmode = "{mode}"\nrelay_threads = {relay_threads}\n'
        "[limits]\nmax_connections_per_ip = 50\n",
    )
    daemon = daemon_factory("--port", "0", "--config", path)
    proxy = ("127.0.0.1", daemon.port)
    started = time.monotonic()
    granted, closed = open_tunnels_at_once(proxy, ip_target(echo_target.port), 300)
    with closing_all(granted):
        # Every granted tunnel is still open: this many were admitted at the same time.
        assert (len(granted), closed) == (50, 250)
        assert wait_until(lambda: refused_in_log(daemon.output()) == 250), daemon.output()
        elapsed = time.monotonic() - started
    warnings = [line for line in daemon.lines if "connection limit reached" in line]
    # At most one line per second (the first at once), not one per refusal.
    assert 1 <= len(warnings) <= 2 + elapsed, warnings
    assert all("at max_connections_per_ip" in line for line in warnings)
    assert "most from 127.0.0.1" in warnings[0]


@pytest.fixture
def holding() -> Iterator[Any]:
    """A handler that keeps its slot until Hold.release is set (at the latest when the
    test ends)."""

    class Hold(BaseRequestHandler):
        release = threading.Event()

        def handle(self) -> None:
            self.release.wait(TIMEOUT)

    yield Hold
    Hold.release.set()


@contextlib.contextmanager
def direct_requests(server: ThreadingTCPServer, count: int) -> Iterator[list[socket.socket]]:
    """`count` connected sockets to pass to server.process_request() ourselves; at the end
    the handlers are let go (RequestHandlerClass.release) and the server closed."""
    pairs = [socket.socketpair() for _ in range(count)]
    try:
        yield [ours for ours, _ in pairs]
    finally:
        server.RequestHandlerClass.release.set()  # type: ignore[attr-defined]
        server.abort_active_requests()
        server.server_close()
        for _, theirs in pairs:
            theirs.close()


def test_two_threads_cannot_both_take_the_last_slot(holding):
    # Both check the cap at the same moment. The old code checked, let go of the lock,
    # then counted: both saw a free slot and both got in. Now the second waits for the
    # first to take it (the check runs under the accounting lock) and is refused.
    both_checking = threading.Barrier(2)

    class SlowCheck(ThreadingTCPServer):
        def over_limit(self, client_address: Any) -> bool:
            over = super().over_limit(client_address)
            with contextlib.suppress(threading.BrokenBarrierError):
                both_checking.wait(1.0)  # the old race, made wide
            return over

    refused: list[Any] = []

    class Counting(SlowCheck):
        def handle_overload(self, request: socket.socket, client_address: Any) -> None:
            refused.append(client_address)
            super().handle_overload(request, client_address)

    server = Counting(("127.0.0.1", 0), holding)
    server.max_connections_per_ip = 1
    with direct_requests(server, 2) as requests:
        threads = [
            threading.Thread(target=server.process_request, args=(ours, ("192.0.2.7", 1000 + i)))
            for i, ours in enumerate(requests)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(TIMEOUT)
        assert server.active_for("192.0.2.7") == 1
        assert len(refused) == 1


# ---- IPv6 clients count per /64 ----

PROXY_V6 = "2001:db8:ffff::1"
SAME_NET = ("2001:db8:1::1", "2001:db8:1::2")
OTHER_NET = "2001:db8:2::1"


@netns_only
def per_network_scenario(mode: str, prefix: int, per_ip: str) -> dict[str, Any]:
    """In a private namespace: a proxy on an exposed IPv6 address, clients from two
    addresses of one /64 and one of another."""
    for address in (PROXY_V6, *SAME_NET, OTHER_NET):
        subprocess.run(
            ["ip", "-6", "addr", "add", f"{address}/64", "dev", "lo", "nodad"],
            check=True,
            timeout=TIMEOUT,
        )
    target = TargetServer(echo, "::1")
    folder = tempfile.mkdtemp()
    config = write_config(
        Path(folder),
        f'[server]\nmode = "{mode}"\nallow_open = true\n'
        f'[access]\nprivate_destinations = "allow"\n'
        f"[limits]\nmax_connections_per_ip = {per_ip}\nipv6_client_prefix = {prefix}\n",
    )
    daemon = DaemonProcess("--config", config, "--listen", f"[{PROXY_V6}]:0")
    counts: dict[str, list[int]] = {}
    held: list[socket.socket] = []
    try:
        proxy = (PROXY_V6, daemon.port)
        tunnels = ip_target(target.port, "::1")
        for source in (*SAME_NET, OTHER_NET):
            granted, closed = open_tunnels_at_once(proxy, tunnels, 3, source)
            held.extend(granted)
            counts[source] = [len(granted), closed]
    finally:
        for sock in held:
            sock.close()
        daemon.stop()
        target.close()
        shutil.rmtree(folder)
    return {"counts": counts, "output": daemon.output()}


@needs_netns
@pytest.mark.parametrize("mode", ["threading", "forking"])
def test_ipv6_clients_of_one_64_share_the_per_address_cap(mode):
    result = call_in_netns(per_network_scenario, mode, 64, "3")
    assert result["counts"] == {
        SAME_NET[0]: [3, 0],
        SAME_NET[1]: [0, 3],  # the same /64: its cap is used up
        OTHER_NET: [3, 0],
    }, result["output"]
    assert "most from 2001:db8:1::/64" in result["output"]


@needs_netns
def test_ipv6_prefix_128_counts_each_address_and_exposed_auto_caps():
    result = call_in_netns(per_network_scenario, "threading", 128, '"auto"')
    assert result["counts"] == {
        SAME_NET[0]: [3, 0],
        SAME_NET[1]: [3, 0],
        OTHER_NET: [3, 0],
    }, result["output"]
    assert f"max_connections_per_ip = 256 (auto: [{PROXY_V6}]:" in result["output"]


def test_describe_names_both_limits_for_the_log():
    caps = resolve([("127.0.0.1", 1)], max_connections=5, max_connections_per_ip=0)
    assert caps.describe() == (
        "connection limits: max_connections = 5 (set), "
        "max_connections_per_ip = unlimited (set: 0 is unlimited)"
    )


def test_a_refused_client_sees_a_bare_close_before_the_greeting(daemon_factory, tmp_path):
    path = write_config(tmp_path, "[limits]\nmax_connections = 1\n")
    daemon = daemon_factory("--port", "0", "--config", path)
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=TIMEOUT) as holder:
        holder.sendall(encode_greeting([Method.NO_AUTHENTICATION_REQUIRED]))
        assert recv_exactly(holder, 2) == b"\x05\x00"
        with socket.create_connection(("127.0.0.1", daemon.port), timeout=TIMEOUT) as extra:
            assert recv_all(extra) == b""
    assert wait_until(lambda: "refused 1 connection(s): 1 at max_connections" in daemon.output())


def test_refusals_held_back_by_the_rate_limit_are_logged_at_close(caplog, holding):
    caplog.set_level(logging.WARNING, logger="socks5d.core.server")
    server = ThreadingTCPServer(("127.0.0.1", 0), holding, max_connections=1)
    server.overload_log_interval = 3600.0
    with direct_requests(server, 4) as requests:
        for i, ours in enumerate(requests):
            server.process_request(ours, ("192.0.2.8", 2000 + i))
        messages = [r.getMessage() for r in caplog.records]
        assert len(messages) == 1 and "refused 1 connection(s): 1 at max_connections" in messages[0]
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert "refused 2 connection(s): 2 at max_connections" in messages[1]
