"""socks5d behind a load balancer that speaks the PROXY protocol (server.proxy_protocol).

Three layers of test:

- the server in process, on both ways of serving a handshake (a handler thread, or an
  event loop), fed headers by hand: the header's client is the client everywhere, and
  every abuse (an untrusted sender, no header, a header split byte by byte, an oversized
  or lying one) ends in a clean, logged close that never reaches a target;
- the real `socks5d` command: start-up refusals, rules on the header's client, reload,
  `check-config`;
- real balancers on loopback in front of two socks5d instances: HAProxy with
  `send-proxy-v2` and a SOCKS5 health check (deploy/haproxy.cfg's structure), and nginx
  `stream` with `proxy_protocol on`; 200 requests from 127.0.0.2 with curl and PySocks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import http.server
import ipaddress
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import socks
from click.testing import CliRunner
from clients import (
    TIMEOUT,
    closed_port,
    loopback_alias_available,
    recv_all,
    recv_exactly,
    wait_until,
)
from conftest import ROOT, DaemonProcess, TargetServer, echo, running_proxy
from streams import Worker

from socks5d.core.proxyheader import V2_SIGNATURE, encode_v1, encode_v2
from socks5d.ops import systemd
from socks5d.ops.cli import main
from socks5d.ops.config import User, load_config
from socks5d.ops.daemon import Daemon
from socks5d.policy.throttle import FailedLoginBackoff
from socks5d.socks.handler import handler_context
from socks5d.socks.protocol import Address, Command, encode_request
from socks5d.socks.session import Session

NO_AUTH = b"\x05\x01\x00"  # VER NMETHODS METHODS=00
OK_PREFIX = b"\x05\x00\x00\x01"  # VER REP=00 RSV ATYP=01
PAYLOAD = b"through the balancer"
CLIENT = ("192.0.2.7", 5555)  # the real client a header names (TEST-NET-1)
OTHER = ("192.0.2.8", 6666)
LOOPBACK_ONLY = ipaddress.ip_network("127.0.0.1/32")

needs_alias = pytest.mark.skipif(
    not loopback_alias_available("127.0.0.2"), reason="127.0.0.2 cannot be bound here"
)


def connect_request(port: int, host: str = "127.0.0.1") -> bytes:
    return encode_request(Command.CONNECT, Address.from_host(host, port))


# ---- the server in process, on both paths ----------------------------------------------------


@pytest.fixture(params=[0, 2], ids=["thread", "loop"])
def path(request: pytest.FixtureRequest) -> int:
    """--relay-threads: 0 serves every handshake in a thread, 2 begins it in a loop."""
    return int(request.param)


@pytest.fixture
def access(caplog: pytest.LogCaptureFixture) -> Callable[[int], list[Session]]:
    """`access(n)`: the first `n` access records once that many were logged."""
    caplog.set_level(logging.INFO, logger="socks5d.access")

    def records(count: int) -> list[Session]:
        found: list[Session] = []

        def logged() -> bool:
            found[:] = [r.access for r in caplog.records if hasattr(r, "access")]
            return len(found) >= count

        assert wait_until(logged), f"{len(found)} access record(s), {count} expected"
        return found[:count]

    return records


@contextlib.contextmanager
def proxied_server(
    relay_threads: int, trusted: str = "127.0.0.1/32", mode: str = "any", **settings: Any
) -> Iterator[Any]:
    with running_proxy(
        relay_threads=relay_threads,
        proxy_protocol=mode,
        proxy_trusted=(ipaddress.ip_network(trusted),),
        **settings,
    ) as running:
        # As the daemon does (make_context, trusted_balancer): caps apply per named client.
        server = running.server
        context = handler_context(server.context)
        server.context = dataclasses.replace(context, readdress=server.readdress_request)
        settings_now = context.settings()
        server.per_client_exempt = lambda address: settings_now.trusts_balancer(address[0])
        yield running


def balancer_socket(port: int, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.create_connection(
        ("127.0.0.1", port), timeout=TIMEOUT, source_address=(source, 0)
    )
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def closed_without_answer(sock: socket.socket) -> bool:
    """The proxy closed (EOF or reset) without sending a byte."""
    try:
        return sock.recv(1024) == b""
    except ConnectionResetError:
        return True


def echo_through(sock: socket.socket, first: bytes) -> None:
    """After `first` (header, greeting and request, sent): the method, a success reply,
    then PAYLOAD echoed."""
    sock.sendall(first)
    assert recv_exactly(sock, 2) == b"\x05\x00"
    assert recv_exactly(sock, 10)[:4] == OK_PREFIX
    sock.sendall(PAYLOAD)
    sock.shutdown(socket.SHUT_WR)
    assert recv_all(sock) == PAYLOAD


@pytest.mark.parametrize(
    "header",
    [encode_v1(CLIENT, ("127.0.0.1", 1080)), encode_v2(CLIENT, ("127.0.0.1", 1080))],
    ids=["v1", "v2"],
)
def test_the_header_names_the_client_of_the_tunnel_and_its_log(path, access, echo_target, header):
    with proxied_server(path) as proxy, balancer_socket(proxy.port) as sock:
        echo_through(sock, header + NO_AUTH + connect_request(echo_target.port))
        balancer = sock.getsockname()
    (record,) = access(1)
    assert record.client == "192.0.2.7:5555"
    assert record.balancer == f"{balancer[0]}:{balancer[1]}"
    assert record.up == record.down == len(PAYLOAD) and record.end == "client eof"
    assert "client=192.0.2.7:5555 " in record.log_line()
    assert record.log_line().endswith(f" balancer={balancer[0]}:{balancer[1]}")


def test_a_header_split_byte_by_byte_is_the_same_header(path, access, echo_target):
    script = encode_v2(CLIENT, ("127.0.0.1", 1080)) + NO_AUTH
    with proxied_server(path) as proxy, balancer_socket(proxy.port) as sock:
        for byte in script:
            sock.sendall(bytes([byte]))
        assert recv_exactly(sock, 2) == b"\x05\x00"
        sock.sendall(connect_request(echo_target.port))
        assert recv_exactly(sock, 10)[:4] == OK_PREFIX
        sock.sendall(PAYLOAD)
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == PAYLOAD
    assert access(1)[0].client == "192.0.2.7:5555"


def test_a_local_header_is_a_health_check_from_the_balancer_itself(path, access):
    with proxied_server(path) as proxy, balancer_socket(proxy.port) as sock:
        sock.sendall(encode_v2(None, local=True) + NO_AUTH)
        assert recv_exactly(sock, 2) == b"\x05\x00"  # what haproxy's tcp-check expects
        balancer = sock.getsockname()
    (record,) = access(1)
    assert record.client == record.balancer == f"{balancer[0]}:{balancer[1]}"
    assert record.end == "client closed during handshake"


def test_a_header_from_an_untrusted_address_is_closed_and_never_reaches_the_target(
    path, access, echo_target
):
    # Only 127.0.0.3 may send headers; this balancer is 127.0.0.1.
    with proxied_server(path, trusted="127.0.0.3/32") as proxy:
        with balancer_socket(proxy.port) as sock:
            sock.sendall(encode_v1(CLIENT, ("127.0.0.1", 1080)) + NO_AUTH)
            with contextlib.suppress(OSError):  # closed already: fine
                sock.sendall(connect_request(echo_target.port))
            assert closed_without_answer(sock)
            peer = sock.getsockname()
        (record,) = access(1)
    assert echo_target.accepted == 0
    assert record.client == f"{peer[0]}:{peer[1]}" and record.balancer == "-"
    assert "untrusted" in record.end and record.command == "-"


@needs_alias
def test_a_spoofed_header_from_a_client_outside_proxy_trusted_is_refused(path, access, echo_target):
    """A client at 127.0.0.2 claims to be the balancer's client 127.0.0.1 (and so to get
    its rights): it is closed before a byte is read."""
    with proxied_server(path) as proxy:
        with balancer_socket(proxy.port, source="127.0.0.2") as sock:
            spoof = encode_v2(("127.0.0.1", 4444), ("127.0.0.1", proxy.port))
            with contextlib.suppress(OSError):
                sock.sendall(spoof + NO_AUTH + connect_request(echo_target.port))
            assert closed_without_answer(sock)
        (record,) = access(1)
    assert record.client.startswith("127.0.0.2:") and "untrusted" in record.end
    assert echo_target.accepted == 0


def test_a_socks_greeting_without_the_header_is_closed_unanswered(path, access, echo_target):
    with proxied_server(path) as proxy, balancer_socket(proxy.port) as sock:
        sock.sendall(NO_AUTH + connect_request(echo_target.port))
        assert closed_without_answer(sock)
    (record,) = access(1)
    assert record.end == "bad PROXY header: no PROXY protocol v1 or v2 header (first byte 0x05)"
    assert echo_target.accepted == 0


@pytest.mark.parametrize(
    ("data", "end"),
    [
        (b"PROXY UNKNOWN " + b"x" * 300 + b"\r\n", "v1 header longer than 107 bytes"),
        (V2_SIGNATURE + b"\x21\x11\xff\xff" + bytes(4000), "v2 header length 65535 over 1024"),
        (encode_v1(CLIENT, ("127.0.0.1", 1))[:-2] + b"\n", "v1 header not ended by CRLF"),
        (V2_SIGNATURE + b"\x21\x11\x00\x04" + bytes(4), "v2 TCP4 header with 4 address bytes"),
    ],
    ids=["oversized-v1", "v2-length-65535", "v1-lf-only", "v2-length-short"],
)
def test_a_malformed_or_oversized_header_is_closed_and_logged(path, access, data, end):
    with proxied_server(path) as proxy, balancer_socket(proxy.port) as sock:
        with contextlib.suppress(OSError):
            sock.sendall(data + NO_AUTH)
        assert closed_without_answer(sock)
    (record,) = access(1)
    assert record.end.startswith(f"bad PROXY header: {end}"), record.end


def test_a_v2_length_that_promises_more_than_comes_ends_at_the_handshake_timeout(path, access):
    # Says 12 address bytes, sends 4, then waits: bounded by timeouts.handshake.
    with proxied_server(path, handshake_timeout=0.5) as proxy, balancer_socket(proxy.port) as sock:
        sock.sendall(V2_SIGNATURE + b"\x21\x11\x00\x0c" + bytes(4))
        assert closed_without_answer(sock)
    (record,) = access(1)
    assert record.end == "handshake timeout"


def test_the_slot_moves_from_the_balancer_to_the_client_the_header_names(path, access, echo_target):
    """max_connections_per_ip = 2 counts real clients: a third tunnel of one client is
    refused (and logged as that client's), while the balancer carries four at once."""
    with proxied_server(path) as proxy:
        server = proxy.server
        server.max_connections_per_ip = 2
        held = []
        try:
            for client in (CLIENT, CLIENT, OTHER, OTHER):
                sock = balancer_socket(proxy.port)
                held.append(sock)
                sock.sendall(
                    encode_v2(client, ("127.0.0.1", 1))
                    + NO_AUTH
                    + connect_request(echo_target.port)
                )
                assert recv_exactly(sock, 2) == b"\x05\x00"
                assert recv_exactly(sock, 10)[:4] == OK_PREFIX
            assert server.active_for("192.0.2.7") == server.active_for("192.0.2.8") == 2
            assert server.active_for("127.0.0.1") == 0
            with balancer_socket(proxy.port) as third:
                third.sendall(encode_v1(CLIENT, ("127.0.0.1", 1)) + NO_AUTH)
                assert closed_without_answer(third)
            (record,) = access(1)
            assert record.client == "192.0.2.7:5555"
            assert record.end == "max_connections_per_ip (proxied client)"
        finally:
            for sock in held:
                sock.close()
        assert wait_until(lambda: server.active_count == 0)


def test_the_login_back_off_counts_the_failures_of_the_header_client(path):
    backoff = FailedLoginBackoff(delay=0.0)
    users = (User("alice", "open sesame"),)
    with proxied_server(path, users=users) as proxy:
        proxy.server.context = dataclasses.replace(proxy.server.context, login_backoff=backoff)
        with balancer_socket(proxy.port) as sock:
            header = encode_v1(CLIENT, ("127.0.0.1", 1080))
            # VER NMETHODS METHODS=02, then RFC 1929: VER ULEN "alice" PLEN "wrong"
            sock.sendall(header + b"\x05\x01\x02" + b"\x01\x05alice\x05wrong")
            assert recv_exactly(sock, 4) == b"\x05\x02\x01\x01"  # method 02, status failure
    assert wait_until(lambda: backoff.failures("192.0.2.7", b"alice") == 1)
    assert backoff.failures("127.0.0.1", b"alice") == 0  # not the balancer's


# ---- the real command -------------------------------------------------------------------------


def run_cli(*args: str) -> Any:
    return CliRunner().invoke(main, list(args))


@pytest.mark.parametrize(
    ("server", "message"),
    [
        ('proxy_protocol = "v2"\n', "server.proxy_trusted: required when"),
        ('proxy_protocol = "v3"\nproxy_trusted = ["127.0.0.1"]\n', "server.proxy_protocol:"),
        ('proxy_protocol = "v1"\nproxy_trusted = ["10.0.0.300/32"]\n', "server.proxy_trusted:"),
        ('proxy_protocol = "v1"\nproxy_trusted = ["10.0.0.1/8"]\n', "server.proxy_trusted:"),
        ('proxy_protocol = "v1"\nproxy_trusted = "10.0.0.0/8"\n', "server.proxy_trusted:"),
    ],
)
def test_a_bad_proxy_protocol_setting_refuses_to_start_naming_the_key(tmp_path, server, message):
    config = tmp_path / "config.toml"
    config.write_text(f"[server]\nport = 0\nallow_open = true\n{server}")
    result = subprocess.run(
        [sys.executable, "-m", "socks5d", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode != 0
    assert message in result.stderr + result.stdout


def test_check_config_shows_the_setting_and_the_trusted_networks(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text(
        '[server]\nport = 1080\nproxy_protocol = "v2"\n'
        'proxy_trusted = ["10.0.0.5", "10.1.0.0/16"]\n[[users]]\nname = "alice"\npassword = "pw"\n'
    )
    result = run_cli("check-config", str(config))
    assert result.exit_code == 0, result.output
    assert 'PROXY protocol: v2 (server.proxy_protocol = "v2")' in result.output
    assert "only from 10.0.0.5/32, 10.1.0.0/16 (server.proxy_trusted)" in result.output
    # Behind the balancer even a loopback listener serves other hosts' clients.
    assert "listening on 127.0.0.1:1080 (loopback only; clients come through the PROXY" in (
        result.output
    )
    assert "max_connections_per_ip = 256 (auto: 127.0.0.1:1080 reachable through a PROXY" in (
        result.output
    )


def test_behind_a_balancer_a_loopback_listener_is_no_excuse_for_an_open_proxy(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text(
        '[server]\nport = 1080\nproxy_protocol = "v1"\nproxy_trusted = ["127.0.0.1"]\n'
    )
    result = run_cli("check-config", str(config))
    assert result.exit_code == 2
    assert "refusing to run an open proxy on 127.0.0.1:1080" in result.output


def backend_config(mode: str, client: str = "127.0.0.2/32") -> str:
    """A socks5d behind a balancer on this host: headers from 127.0.0.1 only; only the
    header's `client` may use it, and only towards loopback targets."""
    return f"""
[server]
host = "127.0.0.1"
port = 0
proxy_protocol = "{mode}"
proxy_trusted = ["127.0.0.1/32"]
[access]
default_action = "deny"
[[rules]]
action = "allow"
from = ["{client}"]
to = ["127.0.0.1/32"]
"""


RULES_CONFIG = backend_config("any", client="192.0.2.7/32")


def test_rules_match_the_client_the_header_names_not_the_balancer(tmp_path, echo_target):
    config = tmp_path / "config.toml"
    config.write_text(RULES_CONFIG)
    daemon = DaemonProcess("--config", str(config))
    try:
        with balancer_socket(daemon.port) as allowed:
            header = encode_v1(CLIENT, ("127.0.0.1", daemon.port))
            echo_through(allowed, header + NO_AUTH + connect_request(echo_target.port))
        with balancer_socket(daemon.port) as denied:
            denied.sendall(encode_v2(OTHER, ("127.0.0.1", 1)) + NO_AUTH)
            assert recv_exactly(denied, 2) == b"\x05\x00"
            denied.sendall(connect_request(echo_target.port))
            assert recv_exactly(denied, 10)[:2] == b"\x05\x02"  # not allowed by the rules
        assert wait_until(lambda: "client=192.0.2.8:6666" in daemon.output())
    finally:
        assert daemon.stop() == 0
    lines = [line for line in daemon.lines if " cmd=CONNECT " in line]
    assert any(
        "client=192.0.2.7:5555 " in line and "reply=00" in line and " balancer=127.0.0.1:" in line
        for line in lines
    ), daemon.output()
    assert any(
        "client=192.0.2.8:6666 " in line and "reply=02" in line and "end='denied by" in line
        for line in lines
    ), daemon.output()
    assert "Traceback" not in daemon.output()


def test_forking_mode_serves_the_header_client_in_the_child(tmp_path, echo_target):
    config = tmp_path / "config.toml"
    config.write_text(RULES_CONFIG.replace("port = 0\n", 'port = 0\nmode = "forking"\n', 1))
    daemon = DaemonProcess("--config", str(config))
    try:
        with balancer_socket(daemon.port) as sock:
            header = encode_v2(CLIENT, ("127.0.0.1", daemon.port))
            echo_through(sock, header + NO_AUTH + connect_request(echo_target.port))
        with balancer_socket(daemon.port) as unheaded:
            unheaded.sendall(NO_AUTH)
            assert closed_without_answer(unheaded)
        assert wait_until(lambda: "bad PROXY header" in daemon.output())
    finally:
        assert daemon.stop() == 0
    assert any(
        "client=192.0.2.7:5555 " in line and "reply=00" in line and "balancer=127.0.0.1:" in line
        for line in daemon.lines
    ), daemon.output()


@pytest.mark.parametrize(("before", "after"), [("off", "any"), ("any", "off")])
def test_a_reload_keeps_the_proxy_protocol_setting_until_a_restart(
    tmp_path, monkeypatch, caplog, before, after
):
    """[server] changes need a restart: a reload says so and keeps the setting, so every
    connection (old or new) is served as the running setting says."""
    monkeypatch.setattr(systemd, "listen_fds", lambda: [])
    caplog.set_level(logging.WARNING, logger="socks5d")
    path = tmp_path / "config.toml"

    def text(mode: str) -> str:
        trusted = 'proxy_trusted = ["127.0.0.1/32"]\n' if mode != "off" else ""
        return f'[server]\nport = 0\nallow_open = true\nproxy_protocol = "{mode}"\n{trusted}'

    path.write_text(text(before))
    daemon = Daemon(load_config(str(path)), str(path))
    server = daemon.bind()
    try:
        running = daemon.server.context.settings().proxy_protocol
        path.write_text(text(after))
        assert daemon.reload()
        assert daemon.server.context.settings().proxy_protocol == running
        assert daemon.config.server.proxy_protocol == before
        warnings = [r.getMessage() for r in caplog.records if "need a restart" in r.getMessage()]
        assert warnings and "proxy_protocol" in warnings[0]
    finally:
        server.server_close()


# ---- real balancers ------------------------------------------------------------------------------

HAPROXY = shutil.which("haproxy")
NGINX = shutil.which("nginx")
NGINX_STREAM = Path("/usr/lib/nginx/modules/ngx_stream_module.so")
CURL = shutil.which("curl")
REQUESTS = 200  # through each balancer: half curl, half PySocks
BODY_SIZES = (1, 1000, 70_000, 300_000)


class Bodies(http.server.BaseHTTPRequestHandler):
    """GET /N/anything: N pseudo-random bytes (the same N gives the same bytes)."""

    def do_GET(self) -> None:
        size = int(self.path.strip("/").split("/")[0])
        body = body_of(size)
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def body_of(size: int) -> bytes:
    seed = hashlib.sha256(str(size).encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


@contextlib.contextmanager
def http_target() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Bodies)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1})
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        thread.join(TIMEOUT)
        server.server_close()


@contextlib.contextmanager
def two_backends(folder: Path, mode: str) -> Iterator[list[DaemonProcess]]:
    config = folder / "backend.toml"
    config.write_text(backend_config(mode))
    backends: list[DaemonProcess] = []
    try:
        for _ in range(2):
            backends.append(DaemonProcess("--config", str(config)))
        yield backends
    finally:
        codes = [backend.stop() for backend in backends]
        assert codes == [0] * len(backends), [b.output() for b in backends]


def free_port() -> int:
    return closed_port()


def haproxy_config(listen_port: int, backends: list[int], inter: str = "300ms") -> str:
    """deploy/haproxy.cfg with the test's addresses and ports, and a short check interval."""
    text = (ROOT / "deploy" / "haproxy.cfg").read_text()
    text = text.replace("bind :1080", f"bind 127.0.0.1:{listen_port}")
    text = text.replace("10.0.0.11:1080", f"127.0.0.1:{backends[0]}")
    text = text.replace("10.0.0.12:1080", f"127.0.0.1:{backends[1]}")
    text = re.sub(r"\binter \S+", f"inter {inter}", text)
    # No syslog socket in a test: log nothing. Fewer connections than a real balancer,
    # within this process's open-file limit.
    text = re.sub(r"^\s*(log|option tcplog)\b.*$", "", text, flags=re.M)
    text = re.sub(r"\bmaxconn \d+", "maxconn 1000", text)
    return text


@contextlib.contextmanager
def balancer_process(args: list[str], ready: Callable[[], bool], name: str) -> Iterator[None]:
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        if not wait_until(lambda: proc.poll() is not None or ready()):
            raise AssertionError(f"{name} did not come up")
        if proc.poll() is not None:
            raise AssertionError(f"{name} exited: {proc.communicate(timeout=TIMEOUT)[0]}")
        yield
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # its PID: the one we started
        try:
            proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate(timeout=TIMEOUT)


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def health_checked(backend: DaemonProcess) -> bool:
    """A LOCAL health check was served: the balancer is the client and the balancer."""
    return any(re.search(r"client=(\S+) .* balancer=\1$", line) for line in backend.lines)


def curl_request(port: int, target: int, size: int, index: int) -> tuple[str, int]:
    """curl via the balancer from 127.0.0.2 (its --interface): the body's hash and size."""
    assert CURL is not None
    result = subprocess.run(
        [
            CURL,
            "--silent",
            "--show-error",
            "--fail",
            "--max-time",
            str(TIMEOUT * 2),
            "--interface",
            "127.0.0.2",
            "--socks5",
            f"127.0.0.1:{port}",
            f"http://127.0.0.1:{target}/{size}/{index}",
        ],
        capture_output=True,
        timeout=TIMEOUT * 3,
    )
    assert result.returncode == 0, result.stderr
    return hashlib.sha256(result.stdout).hexdigest(), len(result.stdout)


def pysocks_request(port: int, echo_port: int, size: int, index: int) -> tuple[str, int]:
    """PySocks via the balancer from 127.0.0.2: what an echo target sent back. No
    half-close: nginx 1.22's stream proxy ends the whole session at the client's EOF."""
    data = body_of(size + index)
    with socks.create_connection(
        ("127.0.0.1", echo_port),
        timeout=TIMEOUT * 2,
        source_address=("127.0.0.2", 0),
        proxy_type=socks.SOCKS5,
        proxy_addr="127.0.0.1",
        proxy_port=port,
    ) as sock:
        sender = Worker(sock.sendall, data)
        sender.start()
        received = recv_exactly(sock, len(data))
        sender.result()
    assert hashlib.sha256(received).digest() == hashlib.sha256(data).digest()
    return hashlib.sha256(received).hexdigest(), len(received)


def run_requests(port: int, http_port: int, echo_port: int) -> dict[str, int]:
    """REQUESTS requests through the balancer, four at a time: curl for even indices,
    PySocks for odd ones; each body checked by hash. Returns counts."""
    errors: list[BaseException] = []
    done = {"curl": 0, "pysocks": 0}
    lock = threading.Lock()
    indices = iter(range(REQUESTS))

    def work() -> None:
        for index in indices:
            size = BODY_SIZES[index % len(BODY_SIZES)]
            try:
                if index % 2 == 0:
                    digest, length = curl_request(port, http_port, size, index)
                    assert digest == hashlib.sha256(body_of(size)).hexdigest()
                    kind = "curl"
                else:
                    digest, length = pysocks_request(port, echo_port, size, index)
                    assert length == size + index
                    kind = "pysocks"
            except BaseException as exc:  # recorded, counted as a failure
                errors.append(exc)
                continue
            with lock:
                done[kind] += 1

    workers = [Worker(work) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.result(REQUESTS * TIMEOUT)
    assert not errors, f"{len(errors)} request(s) failed, first: {errors[0]!r}"
    return done


def served_from(backend: DaemonProcess, targets: tuple[int, ...]) -> list[str]:
    """The backend's access lines of tunnels to `targets`."""
    wanted = tuple(f"target=127.0.0.1:{port} " for port in targets)
    return [
        line for line in backend.lines if " cmd=CONNECT " in line and any(w in line for w in wanted)
    ]


def assert_backends_saw_the_real_client(
    backends: list[DaemonProcess], targets: tuple[int, ...]
) -> list[int]:
    """Every tunnel was logged with the client 127.0.0.2 and a loopback balancer,
    succeeded, and moved all its bytes; both backends served some. Returns the split."""
    split = []
    for backend in backends:

        def all_logged() -> bool:
            return sum(len(served_from(b, targets)) for b in backends) >= REQUESTS

        assert wait_until(all_logged, TIMEOUT * 3), [b.output()[-2000:] for b in backends]
        lines = served_from(backend, targets)
        assert lines, "a backend served nothing"
        for line in lines:
            assert " client=127.0.0.2:" in line, line
            assert " reply=00 " in line, line
            assert re.search(r" balancer=127\.0\.0\.1:\d+$", line), line
        assert "Traceback" not in backend.output()
        split.append(len(lines))
    assert sum(split) == REQUESTS
    return split


needs_haproxy = pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed")
needs_curl = pytest.mark.skipif(CURL is None, reason="curl is not installed")
needs_nginx = pytest.mark.skipif(
    NGINX is None or not NGINX_STREAM.exists(),
    reason="nginx with the stream module (nginx-light, libnginx-mod-stream) is not installed",
)


@needs_haproxy
@needs_curl
@needs_alias
def test_haproxy_send_proxy_v2_in_front_of_two_instances(tmp_path, capsys):
    with (
        two_backends(tmp_path, "v2") as backends,
        http_target() as http_port,
        contextlib.closing(TargetServer(echo)) as echo_target,
    ):
        port = free_port()
        config = tmp_path / "haproxy.cfg"
        config.write_text(haproxy_config(port, [b.port for b in backends]))
        check = subprocess.run([HAPROXY, "-c", "-f", str(config)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        args = [HAPROXY, "-db", "-f", str(config)]  # -db: foreground, ours to stop
        with balancer_process(args, lambda: listening(port), "haproxy"):
            # Both backends pass the SOCKS5 health check (a LOCAL header, then 05 00).
            assert wait_until(lambda: all(health_checked(b) for b in backends), TIMEOUT * 2)
            done = run_requests(port, http_port, echo_target.port)
        split = assert_backends_saw_the_real_client(backends, (http_port, echo_target.port))
    with capsys.disabled():
        print(f"\nhaproxy: {sum(done.values())} requests {done}, 0 failures, split {split}")


def nginx_config(prefix: Path, listen_port: int, backends: list[int]) -> str:
    servers = "".join(f"        server 127.0.0.1:{port};\n" for port in backends)
    return f"""
load_module {NGINX_STREAM};
daemon off;
master_process on;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 1024; }}
stream {{
    upstream socks5d {{
{servers}    }}
    server {{
        listen 127.0.0.1:{listen_port};
        proxy_pass socks5d;
        proxy_protocol on;
        proxy_connect_timeout 5s;
    }}
}}
"""


@needs_nginx
@needs_curl
@needs_alias
@pytest.mark.skipif(os.geteuid() != 0, reason="the nginx test runs nginx as root")
def test_nginx_stream_proxy_protocol_in_front_of_two_instances(tmp_path, capsys):
    prefix = Path(tempfile.mkdtemp(prefix="nginx-", dir=tmp_path))
    with (
        two_backends(tmp_path, "any") as backends,
        http_target() as http_port,
        contextlib.closing(TargetServer(echo)) as echo_target,
    ):
        port = free_port()
        config = prefix / "nginx.conf"
        config.write_text(nginx_config(prefix, port, [b.port for b in backends]))
        args = [NGINX, "-p", str(prefix), "-e", str(prefix / "error.log"), "-c", str(config)]
        with balancer_process(args, lambda: listening(port), "nginx"):
            done = run_requests(port, http_port, echo_target.port)
        split = assert_backends_saw_the_real_client(backends, (http_port, echo_target.port))
    with capsys.disabled():
        print(f"\nnginx: {sum(done.values())} requests {done}, 0 failures, split {split}")
