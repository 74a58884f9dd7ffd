"""Prometheus metrics: exact values after known traffic in every process model, live tunnel
bytes before the tunnel closes, the endpoint under abuse, and the switches around it.

Every daemon is the real `socks5d` command on loopback, its metrics on a loopback port it
picks (--metrics-listen 127.0.0.1:0, read back from its log line).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from clients import (
    TIMEOUT,
    UdpEcho,
    closed_port,
    loopback_alias_available,
    open_tunnel,
    recv_exactly,
    udp_socket,
    wait_until,
)
from conftest import DaemonProcess, TargetServer
from streams import Worker

from socks5d import __version__
from socks5d.core.relay import RelayResult, TrafficMeter, relay, set_traffic_meter
from socks5d.ops.metrics import (
    Metrics,
    command_label,
    exposure_warning,
    reply_label,
    rule_label,
)
from socks5d.socks.protocol import (
    Address,
    AddressType,
    Command,
    Method,
    Reply,
    encode_greeting,
    encode_socks4_request,
    encode_udp_datagram,
    encode_username_password,
    parse_udp_datagram,
)
from socks5d.socks.session import Session

parser = pytest.importorskip("prometheus_client.parser")

ALICE = (b"alice", b"secret")
METRICS_LINE = re.compile(r"metrics on http://(\S+):(\d+)/metrics(?: \(multiprocess: (\S+)\))?")
# A second client address for the per-address limit, so the main traffic never meets it.
OTHER_CLIENT = "127.0.0.3"
PER_IP = 3

MODES = {
    "threading": 'mode = "threading"\n',
    "forking": 'mode = "forking"\n',
    "workers": 'mode = "threading"\nworkers = 2\n',
}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


# ---- scraping ----


def http_get(port: int, request: bytes | None = None, host: str = "127.0.0.1") -> bytes:
    """One HTTP exchange with the metrics endpoint: the whole response, read to EOF."""
    with socket.create_connection((host, port), timeout=TIMEOUT) as sock:
        sock.sendall(request or b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def scrape(port: int) -> Samples:
    response = http_get(port)
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK"), head
    assert b"Content-Type: text/plain; version=" in head, head
    samples: Samples = {}
    for family in parser.text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def socks5d_samples(samples: Samples) -> dict[str, float]:
    """The socks5d_* samples as "name{label=value,...}" -> value, for exact comparison
    (histogram buckets and sums left out: their values depend on timing)."""
    out = {}
    for (name, labels), number in samples.items():
        if not name.startswith("socks5d_") or name.endswith(("_bucket", "_sum", "_created")):
            continue
        text = ",".join(f"{k}={v}" for k, v in sorted(labels))
        out[f"{name}{{{text}}}"] = number
    return out


def poll_scrape(port: int, done: Callable[[Samples], bool], timeout: float = 20.0) -> Samples:
    """Scrape until `done` says the values are in (metrics settle after the traffic: a
    tunnel's end is seen by the proxy a moment after the client's)."""
    last: list[Samples] = [{}]

    def check() -> bool:
        last[0] = scrape(port)
        return done(last[0])

    wait_until(check, timeout)
    return last[0]


# ---- the daemon ----


@contextlib.contextmanager
def metrics_daemon(
    tmp_path: Path, mode: str, extra: str = "", *args: str
) -> Iterator[tuple[DaemonProcess, int, str | None]]:
    """socks5d with metrics in `mode`, alice as its one user, rules that deny port 9 by
    rules[0], allow 127.0.0.1 (and UDP associations), deny the rest by default."""
    config = tmp_path / "config.toml"
    config.write_text(
        '[server]\nlisten = ["127.0.0.1:0"]\n'
        + MODES[mode]
        + f"[limits]\nmax_connections_per_ip = {PER_IP}\n"
        '[access]\ndefault_action = "deny"\n'
        '[metrics]\nlisten = "127.0.0.1:0"\n'
        '[[users]]\nname = "alice"\npassword = "secret"\n'
        '[[rules]]\naction = "deny"\nports = [9]\n'
        '[[rules]]\naction = "allow"\nto = ["127.0.0.1"]\n'
        '[[rules]]\naction = "allow"\ncommands = ["udp"]\n' + extra
    )
    daemon = DaemonProcess("--config", str(config), *args)
    try:
        match = next(m for line in daemon.lines if (m := METRICS_LINE.search(line)))
        yield daemon, int(match.group(2)), match.group(3)
    finally:
        code = daemon.stop()
        print(daemon.output())  # shown when the test fails
        assert code == 0, daemon.output()


def login(sock: socket.socket, credentials: tuple[bytes, bytes] = ALICE) -> bytes:
    sock.sendall(encode_greeting([Method.USERNAME_PASSWORD]))
    assert recv_exactly(sock, 2) == b"\x05\x02"
    sock.sendall(encode_username_password(*credentials))
    return recv_exactly(sock, 2)


def echo_through(proxy: tuple[str, int], target: TargetServer, size: int) -> None:
    """One CONNECT that sends `size` bytes and reads them back, then closes."""
    address = Address(AddressType.IPV4, "127.0.0.1", target.port)
    sock, reply, _ = open_tunnel(proxy, address, ALICE)
    with sock:
        assert reply == Reply.SUCCEEDED
        payload = os.urandom(size)
        sock.sendall(payload)
        assert recv_exactly(sock, size) == payload


def denied(proxy: tuple[str, int], host: str, port: int) -> None:
    sock, reply, _ = open_tunnel(proxy, Address(AddressType.IPV4, host, port), ALICE)
    sock.close()
    assert reply == Reply.CONNECTION_NOT_ALLOWED


def udp_round_trip(proxy: tuple[str, int], echo: UdpEcho, payload: bytes) -> None:
    """UDP ASSOCIATE: one datagram dropped (FRAG 1), one there and back, then the end."""
    control, reply, relay = open_tunnel(
        proxy, Address(AddressType.IPV4, "0.0.0.0", 0), ALICE, Command.UDP_ASSOCIATE
    )
    with control, udp_socket() as client:
        assert reply == Reply.SUCCEEDED
        target = Address(AddressType.IPV4, "127.0.0.1", echo.port)
        # Dropped; read in order, so it is counted before the next one is relayed.
        client.sendto(encode_udp_datagram(target, b"fragment", frag=1), (relay.host, relay.port))
        client.sendto(encode_udp_datagram(target, payload), (relay.host, relay.port))
        answer = parse_udp_datagram(client.recv(65536))
        assert answer.data == payload
        assert [data for data, _ in echo.received] == [payload]


def refused_once(proxy: tuple[str, int]) -> int:
    """Open connections from OTHER_CLIENT (greeted, so surely accepted) until one is closed
    unanswered at the per-address limit; the number held when it was. Workers count the
    limit each, so how many get in first depends on which worker accepts them."""
    held: list[socket.socket] = []
    try:
        for _ in range(2 * PER_IP + 2):
            sock = socket.create_connection(
                proxy, timeout=TIMEOUT, source_address=(OTHER_CLIENT, 0)
            )
            try:
                sock.sendall(encode_greeting([Method.USERNAME_PASSWORD]))
                answer = sock.recv(2)
            except ConnectionResetError:
                answer = b""
            if not answer:
                sock.close()
                return len(held)
            assert answer == b"\x05\x02"
            held.append(sock)
        raise AssertionError(f"no refusal after {len(held)} connections")
    finally:
        for sock in held:
            sock.close()


# ---- exact values after known traffic, in each process model ----

SIZES = (1000, 2000, 3000, 4000, 5000)
UDP_PAYLOAD = b"u" * 300
LIVE = 7777


@pytest.mark.parametrize("mode", list(MODES))
def test_scrape_after_known_traffic_is_exact(tmp_path, target_factory, mode):
    if not loopback_alias_available(OTHER_CLIENT):
        pytest.skip(f"{OTHER_CLIENT} is not a usable loopback address here")
    target = target_factory()
    echo = UdpEcho()
    try:
        with metrics_daemon(tmp_path, mode) as (daemon, port, directory):
            proxy = ("127.0.0.1", daemon.port)
            for size in SIZES:
                echo_through(proxy, target, size)
            denied(proxy, "127.0.0.1", 9)  # rules[0]
            denied(proxy, "127.0.0.2", target.port)  # no rule: the default
            udp_round_trip(proxy, echo, UDP_PAYLOAD)
            held = refused_once(proxy)

            # A tunnel still open: its bytes show before it closes.
            address = Address(AddressType.IPV4, "127.0.0.1", target.port)
            live, reply, _ = open_tunnel(proxy, address, ALICE)
            with live:
                assert reply == Reply.SUCCEEDED
                live.sendall(b"x" * LIVE)
                assert recv_exactly(live, LIVE) == b"x" * LIVE
                moved = sum(SIZES) + len(UDP_PAYLOAD) + LIVE
                # The earlier tunnels end in the proxy a moment after their clients close:
                # wait for those to settle too, not only for the bytes.
                samples = poll_scrape(
                    port,
                    lambda s: (
                        value(s, "socks5d_bytes_total", direction="down") >= moved
                        and value(s, "socks5d_connections_active", command="connect") <= 1
                    ),
                )
                assert value(samples, "socks5d_bytes_total", direction="up") == moved
                assert value(samples, "socks5d_bytes_total", direction="down") == moved
                assert value(samples, "socks5d_connections_active", command="connect") == 1

            with socket.create_connection(proxy, timeout=TIMEOUT) as sock:  # a wrong login
                assert login(sock, (b"mallory", b"guess")) == b"\x01\x01"
                assert sock.recv(1) == b""

            expected = {
                "socks5d_auth_failures_total{}": 1,
                "socks5d_build_info{version=0.1.0}": 1,
                "socks5d_bytes_total{direction=down}": moved,
                "socks5d_bytes_total{direction=up}": moved,
                "socks5d_connect_duration_seconds_count{}": len(SIZES) + 3,
                "socks5d_connections_active{command=bind}": 0,
                "socks5d_connections_active{command=connect}": 0,
                "socks5d_connections_active{command=none}": 0,
                "socks5d_connections_active{command=udp}": 0,
                "socks5d_connections_total{command=connect,protocol=socks5,reply=00}": 6,
                "socks5d_connections_total{command=connect,protocol=socks5,reply=02}": 2,
                "socks5d_connections_total{command=none,protocol=socks5,reply=none}": held + 1,
                "socks5d_connections_total{command=udp,protocol=socks5,reply=00}": 1,
                "socks5d_handshake_duration_seconds_count{}": len(SIZES) + 4,
                "socks5d_limit_refusals_total{limit=per_ip}": 1,
                "socks5d_rule_denials_total{rule=0}": 1,
                "socks5d_rule_denials_total{rule=default}": 1,
                "socks5d_udp_datagrams_total{direction=down,result=relayed}": 1,
                "socks5d_udp_datagrams_total{direction=up,result=dropped}": 1,
                "socks5d_udp_datagrams_total{direction=up,result=relayed}": 1,
            }
            samples = poll_scrape(port, lambda s: socks5d_samples(s) == expected)
            assert socks5d_samples(samples) == expected
            assert value(samples, "process_open_fds") > 0  # the process collector is there
            if directory is not None:
                # Ended children's files were folded: a set per live process, not per
                # connection served.
                assert wait_until(lambda: len(list(Path(directory).glob("counter_*.db"))) <= 3)
                assert socks5d_samples(scrape(port)) == expected  # folding lost nothing
    finally:
        echo.close()
    if directory is not None:
        assert not Path(directory).exists(), "the multiprocess directory outlived the daemon"


# ---- the endpoint under abuse ----


def test_scrape_flood_while_tunnels_relay(tmp_path, target_factory):
    target = target_factory()
    with metrics_daemon(tmp_path, "threading") as (daemon, port, _):
        proxy = ("127.0.0.1", daemon.port)
        answers: list[bytes] = []
        stop = threading.Event()

        def flood() -> None:
            while not stop.is_set():
                with contextlib.suppress(OSError):
                    answers.append(http_get(port)[:15])

        flooders = [threading.Thread(target=flood) for _ in range(12)]
        for thread in flooders:
            thread.start()
        try:
            for _ in range(20):
                echo_through(proxy, target, 50_000)
        finally:
            stop.set()
            for thread in flooders:
                thread.join(TIMEOUT)
        assert answers.count(b"HTTP/1.1 200 OK") > 20
        assert set(answers) <= {b"HTTP/1.1 200 OK", b""}  # or closed at the 8-scrape cap
        samples = poll_scrape(
            port, lambda s: value(s, "socks5d_bytes_total", direction="up") >= 20 * 50_000
        )
        assert value(samples, "socks5d_bytes_total", direction="up") == 20 * 50_000
        assert (
            value(
                samples,
                "socks5d_connections_total",
                protocol="socks5",
                command="connect",
                reply="00",
            )
            == 20
        )


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"POST /metrics HTTP/1.1\r\n\r\n", b"HTTP/1.1 405"),
        (b"GET /secret HTTP/1.1\r\n\r\n", b"HTTP/1.1 404"),
        (b"HEAD /metrics HTTP/1.1\r\n\r\n", b"HTTP/1.1 200"),
        (b"\x05\x01\x00", b""),  # a SOCKS greeting: not HTTP, closed (at EOF)
        (b"GET /" + b"a" * 10_000 + b" HTTP/1.1\r\n\r\n", b""),  # request line too long
        (b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 200 + b"\r\n", b""),  # too many headers
    ],
)
def test_bad_requests_get_an_error_or_a_close(tmp_path, request_bytes, status):
    with metrics_daemon(tmp_path, "threading") as (_, port, _dir):
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
            sock.sendall(request_bytes)
            sock.shutdown(socket.SHUT_WR)
            response = b""
            while chunk := sock.recv(65536):
                response += chunk
        assert response.startswith(status)
        if status == b"HTTP/1.1 200":
            assert response.endswith(b"\r\n\r\n")  # HEAD: the head alone
        assert scrape(port)  # and the endpoint still serves


def test_a_silent_client_does_not_block_scrapes(tmp_path):
    with metrics_daemon(tmp_path, "threading") as (_, port, _dir):
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT):
            assert value(scrape(port), "socks5d_build_info", version="0.1.0") == 1


# ---- switching it on and off ----


def listening_inodes(pid: int) -> set[str]:
    """Socket inodes of `pid` that are listening TCP sockets (from /proc)."""
    mine = {
        target[8:-1]
        for fd in Path(f"/proc/{pid}/fd").iterdir()
        if (target := os.readlink(fd)).startswith("socket:[")
    }
    listening = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A":  # TCP_LISTEN
                    listening.add(fields[9])
    return mine & listening


def test_no_metrics_port_when_off(daemon_factory):
    daemon = daemon_factory("--port", "0")
    assert not any("metrics" in line for line in daemon.lines), daemon.output()
    assert len(listening_inodes(daemon.proc.pid)) == 1  # the SOCKS listener only
    assert "prometheus_client" not in daemon.output()


def test_metrics_port_listens_when_on(tmp_path):
    with metrics_daemon(tmp_path, "threading") as (daemon, _port, directory):
        assert directory is None  # one process: no multiprocess directory
        assert len(listening_inodes(daemon.proc.pid)) == 2


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--metrics-listen", "nope"], "--metrics-listen"),
        (["--metrics-listen", "127.0.0.1:99999"], "--metrics-listen"),
        (["--metrics-listen", "::1:9180"], "--metrics-listen: IPv6 addresses need brackets"),
    ],
)
def test_bad_metrics_listen_exits_2_naming_the_flag(args, needle):
    result = run_socks5d("--port", "0", *args)
    assert result.returncode == 2, result.stderr
    assert needle in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_metrics_listen_in_the_file_names_the_key(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text("[metrics]\nlisten = 9180\n")
    result = run_socks5d("--config", str(config))
    assert result.returncode == 2
    assert "metrics.listen" in result.stderr


def test_metrics_port_in_use_exits_1_naming_the_key():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        where = f"127.0.0.1:{taken.getsockname()[1]}"
        result = run_socks5d("--port", "0", "--metrics-listen", where)
    assert result.returncode == 1
    assert f"metrics.listen: cannot listen on {where}: Address already in use" in result.stderr


def test_without_prometheus_client_exits_2_with_the_install_line():
    # As if the extra were not installed: the import fails.
    wrapper = (
        "import sys; sys.modules['prometheus_client'] = None; "
        "from socks5d.ops.cli import main; main()"
    )
    result = run_socks5d(
        "--port", "0", "--metrics-listen", "127.0.0.1:0", python_args=("-c", wrapper)
    )
    assert result.returncode == 2, result.stderr
    assert "pip install 'socks5d[metrics]'" in result.stderr
    assert "Traceback" not in result.stderr


def run_socks5d(
    *args: str, python_args: tuple[str, ...] = ("-m", "socks5d")
) -> subprocess.CompletedProcess[str]:
    """A socks5d that is expected to exit at once."""
    return subprocess.run(
        [sys.executable, *python_args, *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 3,
        cwd=Path(__file__).resolve().parent.parent,
    )


# ---- the pure parts ----


@contextlib.contextmanager
def installed_meter(report: Callable[[int, int], None]) -> Iterator[TrafficMeter]:
    meter = TrafficMeter(report)  # sampled by hand below
    set_traffic_meter(meter)
    try:
        yield meter
    finally:
        set_traffic_meter(None)


@contextlib.contextmanager
def relaying() -> Iterator[tuple[socket.socket, socket.socket, Worker]]:
    """A client and a target socket with relay() between them in a thread."""
    client, a = socket.socketpair()
    b, target = socket.socketpair()
    with client, a, b, target:
        tunnel = Worker(relay, a, b)
        tunnel.start()
        yield client, target, tunnel


def end_relay(client: socket.socket, target: socket.socket, tunnel: Worker) -> RelayResult:
    client.shutdown(socket.SHUT_WR)
    target.shutdown(socket.SHUT_WR)
    return tunnel.result()


def test_traffic_meter_reports_open_tunnels_then_the_rest_once_closed():
    reports: list[tuple[int, int]] = []

    def reported() -> tuple[int, int]:
        return (sum(up for up, _ in reports), sum(down for _, down in reports))

    def sampled(expected: tuple[int, int]) -> bool:
        # The relay counts a chunk just after sending it: the peer may read it first.
        meter.sample()
        return reported() == expected

    with installed_meter(lambda up, down: reports.append((up, down))) as meter:
        with relaying() as (client, target, tunnel):
            client.sendall(b"x" * 1000)
            assert recv_exactly(target, 1000) == b"x" * 1000
            assert wait_until(lambda: sampled((1000, 0)))  # open, and counted
            target.sendall(b"y" * 500)
            assert recv_exactly(client, 500) == b"y" * 500
            assert wait_until(lambda: sampled((1000, 500)))
            count = len(reports)
            meter.sample()  # nothing moved since: nothing reported
            assert len(reports) == count
            client.sendall(b"z" * 10)
            assert recv_exactly(target, 10) == b"z" * 10
            result = end_relay(client, target, tunnel)
        # The rest comes with the first sample after it closed, whether an earlier one
        # caught it or not.
        meter.sample()
        assert reported() == (result.a_to_b, result.b_to_a) == (1010, 500)
        count = len(reports)
        meter.sample()
        assert len(reports) == count  # a closed tunnel is not read again


def test_traffic_meter_counts_nothing_twice_when_sampled_while_relaying():
    reports: list[tuple[int, int]] = []
    with installed_meter(lambda up, down: reports.append((up, down))) as meter:
        with relaying() as (client, target, tunnel):
            for _ in range(50):
                client.sendall(b"q" * 4096)
                recv_exactly(target, 4096)
                meter.sample()
            result = end_relay(client, target, tunnel)
        meter.sample()
    assert sum(up for up, _ in reports) == result.a_to_b == 50 * 4096


def test_a_forked_meter_forgets_the_parents_tunnels():
    reports: list[tuple[int, int]] = []
    with installed_meter(lambda up, down: reports.append((up, down))) as meter:
        with relaying() as (client, target, tunnel):
            client.sendall(b"x" * 10)
            recv_exactly(target, 10)
            meter._start_process()  # as in a forked child: the parent's tunnels are not its
            meter.sample()
            end_relay(client, target, tunnel)
        meter.sample()
    assert reports == []


@pytest.mark.parametrize(
    ("reason", "label"),
    [
        ("rules[0]", "0"),
        ("rules[12]", "12"),
        ("default deny", "default"),
        ("private destination", "private_destination"),
        ("own address", "own_address"),
        ("own listener", "own_listener"),
    ],
)
def test_rule_labels(reason, label):
    assert rule_label(reason) == label


def test_reply_and_command_labels():
    assert reply_label(None) == "none"
    assert reply_label(Reply.SUCCEEDED) == "00"
    assert reply_label(Reply.ADDRESS_TYPE_NOT_SUPPORTED) == "08"
    assert [command_label(c) for c in ("CONNECT", "BIND", "UDP_ASSOCIATE", "-")] == [
        "connect",
        "bind",
        "udp",
        "none",
    ]


@pytest.mark.parametrize(
    ("listen", "exposed"),
    [
        (("127.0.0.1", 9180), False),
        (("127.0.0.2", 9180), False),
        (("::1", 9180), False),
        (("localhost", 9180), False),
        (("0.0.0.0", 9180), True),
        (("::", 9180), True),
        (("192.0.2.7", 9180), True),
    ],
)
def test_an_exposed_metrics_address_is_warned_about(listen, exposed):
    warning = exposure_warning(listen)
    assert (warning is not None) == exposed
    if exposed:
        assert "reveal traffic volumes" in warning


def test_the_observer_counts_one_connection_through_its_life():
    metrics = Metrics()
    registry = metrics.registry

    def sample(name: str, **labels: str) -> float:
        metrics.flush()  # events are tallied, then put into the metric objects
        return registry.get_sample_value(name, labels) or 0.0

    session = Session(client="127.0.0.1:5000")
    metrics.begun(session)
    assert sample("socks5d_connections_active", command="none") == 1
    session.command = "CONNECT"
    metrics.dispatched(session)
    assert sample("socks5d_connections_active", command="none") == 0
    assert sample("socks5d_connections_active", command="connect") == 1
    assert sample("socks5d_handshake_duration_seconds_count") == 1
    session.reply = Reply.CONNECTION_NOT_ALLOWED
    session.rule = "rules[2]"
    metrics.replied(session)
    assert sample("socks5d_connect_duration_seconds_count") == 1
    metrics.concluded(session)
    assert sample("socks5d_connections_active", command="connect") == 0
    assert (
        sample("socks5d_connections_total", protocol="socks5", command="connect", reply="02") == 1
    )
    assert sample("socks5d_rule_denials_total", rule="2") == 1
    metrics.limit_refused("max_connections_per_ip")
    metrics.limit_refused("per_user")
    assert sample("socks5d_limit_refusals_total", limit="per_ip") == 1
    assert sample("socks5d_limit_refusals_total", limit="per_user") == 1
    metrics.relayed(100, 7)
    assert sample("socks5d_bytes_total", direction="up") == 100
    assert sample("socks5d_bytes_total", direction="down") == 7
    assert sample("socks5d_build_info", version=__version__) == 1
    metrics.close()


# ---- both ways of serving a handshake count alike ----


def path_script(proxy: tuple[str, int], target: TargetServer) -> None:
    """Connections the event loop serves whole (CONNECT to an address) and ones it hands
    to a thread (a refused connect, a rule's denial, a bad request, an early EOF)."""
    for size in (100, 200, 300):
        sock, reply, _ = open_tunnel(proxy, Address(AddressType.IPV4, "127.0.0.1", target.port))
        with sock:
            assert reply == Reply.SUCCEEDED
            sock.sendall(b"p" * size)
            assert recv_exactly(sock, size) == b"p" * size
    sock, reply, _ = open_tunnel(proxy, Address(AddressType.IPV4, "127.0.0.1", closed_port()))
    sock.close()
    assert reply == Reply.CONNECTION_REFUSED
    denied_sock, reply, _ = open_tunnel(proxy, Address(AddressType.IPV4, "127.0.0.1", 9))
    denied_sock.close()
    assert reply == Reply.CONNECTION_NOT_ALLOWED
    with socket.create_connection(proxy, timeout=TIMEOUT) as sock:
        sock.sendall(encode_greeting([Method.NO_AUTHENTICATION_REQUIRED]))
        assert recv_exactly(sock, 2) == b"\x05\x00"
        sock.sendall(b"\x05\x09\x00\x01\x7f\x00\x00\x01\x00\x50")  # CMD 09: unknown
        assert recv_exactly(sock, 2) == b"\x05\x07"
    with socket.create_connection(proxy, timeout=TIMEOUT) as sock:
        sock.sendall(b"\x05")  # half a greeting, then EOF


PATH_EXPECTED = {
    "socks5d_auth_failures_total{}": 0,
    "socks5d_build_info{version=0.1.0}": 1,
    "socks5d_bytes_total{direction=down}": 600,
    "socks5d_bytes_total{direction=up}": 600,
    "socks5d_connect_duration_seconds_count{}": 5,
    "socks5d_connections_active{command=bind}": 0,
    "socks5d_connections_active{command=connect}": 0,
    "socks5d_connections_active{command=none}": 0,
    "socks5d_connections_active{command=udp}": 0,
    "socks5d_connections_total{command=connect,protocol=socks5,reply=00}": 3,
    "socks5d_connections_total{command=connect,protocol=socks5,reply=02}": 1,
    "socks5d_connections_total{command=connect,protocol=socks5,reply=05}": 1,
    "socks5d_connections_total{command=none,protocol=socks5,reply=07}": 1,
    "socks5d_connections_total{command=none,protocol=socks5,reply=none}": 1,
    "socks5d_handshake_duration_seconds_count{}": 5,
    "socks5d_rule_denials_total{rule=0}": 1,
}


@pytest.mark.parametrize("relay_threads", ["0", "1"])
def test_thread_path_and_loop_path_count_alike(tmp_path, target_factory, relay_threads):
    target = target_factory()
    config = tmp_path / "config.toml"
    config.write_text(
        '[metrics]\nlisten = "127.0.0.1:0"\n[[rules]]\naction = "deny"\nports = [9]\n'
    )
    daemon = DaemonProcess("--port", "0", "--config", str(config), "--relay-threads", relay_threads)
    try:
        port = int(next(m for line in daemon.lines if (m := METRICS_LINE.search(line))).group(2))
        path_script(("127.0.0.1", daemon.port), target)
        samples = poll_scrape(port, lambda s: socks5d_samples(s) == PATH_EXPECTED)
        assert socks5d_samples(samples) == PATH_EXPECTED
    finally:
        assert daemon.stop() == 0, daemon.output()


def test_a_reload_keeps_the_metrics_address_and_says_so(tmp_path):
    with metrics_daemon(tmp_path, "threading") as (daemon, port, _dir):
        config = tmp_path / "config.toml"
        config.write_text(
            config.read_text().replace(
                'listen = "127.0.0.1:0"\n[[users]]', 'listen = ""\n[[users]]'
            )
        )
        daemon.proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda: "reloaded" in daemon.output()), daemon.output()
        assert "reload: [metrics] changes need a restart, kept as they were" in daemon.output()
        assert value(scrape(port), "socks5d_build_info", version="0.1.0") == 1


def test_check_config_shows_the_metrics_address_and_warns_when_exposed(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text('[metrics]\nlisten = "127.0.0.1:9180"\n')
    result = run_socks5d("check-config", str(config))
    assert result.returncode == 0, result.stderr
    assert "metrics: http://127.0.0.1:9180/metrics\n" in result.stdout
    assert "reveal traffic volumes" not in result.stdout
    config.write_text('[metrics]\nlisten = "0.0.0.0:9180"\n')  # only read, never bound
    result = run_socks5d("check-config", str(config))
    assert "warning: metrics.listen 0.0.0.0:9180 is reachable from other hosts" in result.stdout


def test_socks4_connections_count_under_their_protocol(tmp_path, target_factory):
    target = target_factory()
    config = tmp_path / "config.toml"
    config.write_text('[metrics]\nlisten = "127.0.0.1:0"\n')
    daemon = DaemonProcess("--port", "0", "--config", str(config))
    try:
        port = int(next(m for line in daemon.lines if (m := METRICS_LINE.search(line))).group(2))
        address = Address(AddressType.IPV4, "127.0.0.1", target.port)
        for userid in (b"", b"bob"):  # SOCKS4 without and with a USERID
            with socket.create_connection(("127.0.0.1", daemon.port), timeout=TIMEOUT) as sock:
                sock.sendall(encode_socks4_request(Command.CONNECT, address, userid))
                assert recv_exactly(sock, 8)[:2] == b"\x00\x5a"  # VN 0, CD 90: granted
                sock.sendall(b"four")
                assert recv_exactly(sock, 4) == b"four"
        expected = {
            ("socks4", "connect", "00"): 2,
            ("socks5", "connect", "00"): 0,
        }

        def counted(samples: Samples) -> dict[tuple[str, str, str], float]:
            return {
                key: value(
                    samples,
                    "socks5d_connections_total",
                    protocol=key[0],
                    command=key[1],
                    reply=key[2],
                )
                for key in expected
            }

        samples = poll_scrape(port, lambda s: counted(s) == expected)
        assert counted(samples) == expected
        assert value(samples, "socks5d_bytes_total", direction="up") == 8
    finally:
        assert daemon.stop() == 0, daemon.output()
