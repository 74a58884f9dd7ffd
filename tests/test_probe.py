"""`socks5d probe`: every check passes against socks5d, the known gaps of microsocks and
Dante are named, and a broken server gives failures, in bounded time, never a traceback.

The probe runs in-process here (its targets are threads of this process), so the tests can
also count this process's descriptors and threads before and after a run.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from clients import TIMEOUT, children_of, wait_until
from conftest import ROOT, TargetServer, ipv6_available, running_proxy
from streams import needs_proc_fd, open_fds

from socks5d.ops.config import User
from socks5d.ops.probe import (
    CHECK_NAMES,
    EXPECTED,
    FAIL,
    NOT_SUPPORTED,
    PASS,
    SKIPPED,
    CheckResult,
    ProbeOptions,
    Report,
    probe,
    target_hosts_by_version,
)

LOGIN_CHECKS = {"login.success", "login.failure"}
IPV6_CHECKS = {"connect.ipv6", "udp.round-trip-ipv6"}


def options(address: tuple[str, int], **overrides: object) -> ProbeOptions:
    """Probe settings for a proxy whose handshake timeout is short (see each test)."""
    settings: dict[str, object] = {"timeout": 5.0, "handshake_wait": 8.0}
    settings.update(overrides)
    return ProbeOptions(address, **settings)  # type: ignore[arg-type]


def by_result(report: Report) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {PASS: set(), FAIL: set(), NOT_SUPPORTED: set(), SKIPPED: set()}
    for row in report.results:
        found[row.result].add(row.check)
    return found


def table(report: Report) -> str:
    return "\n" + report.as_table()


def expected_skips(with_login: bool) -> set[str]:
    skips = set() if with_login else set(LOGIN_CHECKS)
    return skips if ipv6_available() else skips | IPV6_CHECKS


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """`python -m socks5d ARGS` with its output, bounded."""
    return subprocess.run(
        [sys.executable, "-m", "socks5d", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        check=False,
    )


# ---- pure parts ----


def test_every_check_has_an_expectation_and_runs_in_order():
    assert CHECK_NAMES[0] == "greeting.no-auth"
    assert CHECK_NAMES[-1] == "timeout.handshake"
    assert len(set(CHECK_NAMES)) == len(CHECK_NAMES) == 23
    assert all(EXPECTED[name] for name in CHECK_NAMES)


def test_report_is_ok_only_without_failures_or_a_missing_login():
    rows = [CheckResult("a", PASS, "x", "y"), CheckResult("b", NOT_SUPPORTED, "x", "07")]
    assert Report("127.0.0.1:1080", rows).ok
    assert not Report("127.0.0.1:1080", [*rows, CheckResult("c", FAIL, "x", "y")]).ok
    assert not Report("127.0.0.1:1080", rows, note="the server requires a login").ok
    document = json.loads(Report("127.0.0.1:1080", rows).as_json())
    assert document == {
        "server": "127.0.0.1:1080",
        "ok": True,
        "note": "",
        "checks": [
            {"check": "a", "result": "pass", "expected": "x", "got": "y"},
            {"check": "b", "result": "not-supported", "expected": "x", "got": "07"},
        ],
    }
    text = Report("127.0.0.1:1080", rows).as_table().splitlines()
    assert text[0].split() == ["CHECK", "RESULT", "EXPECTED", "GOT"]
    assert text[1].split() == ["a", "pass", "x", "y"]
    assert text[-1] == "127.0.0.1:1080: 1 passed, 0 failed, 1 not supported or skipped"


def test_target_hosts_one_per_family_or_loopback_by_default():
    assert target_hosts_by_version(("127.0.0.2", "[::1]")) == ("127.0.0.2", "::1")
    assert target_hosts_by_version(("::1",)) == (None, "::1")
    assert target_hosts_by_version(())[0] == "127.0.0.1"
    with pytest.raises(ValueError):
        target_hosts_by_version(("localhost",))


# ---- against socks5d ----


@needs_proc_fd
@pytest.mark.parametrize("mode", ["threading", "forking"])
def test_every_check_passes_against_socks5d(mode):
    with running_proxy(mode, handshake_timeout=1.0) as proxy:
        fds, threads = open_fds(), threading.active_count()
        report = probe(options(proxy.address))
        if mode == "forking":  # the proxy is another process: what this one has is ours
            assert open_fds() == fds
            assert wait_until(lambda: threading.active_count() <= threads)
    found = by_result(report)
    assert found[FAIL] == set(), table(report)
    assert found[NOT_SUPPORTED] == set(), table(report)
    assert found[SKIPPED] == expected_skips(with_login=False), table(report)
    assert report.ok and report.note == ""
    rows = {row.check: row for row in report.results}
    assert rows["reply.host-unreachable"].got == "04 (host unreachable), then closed"
    assert rows["timeout.handshake"].got.startswith("closed after ")


@pytest.mark.parametrize("mode", ["threading", "forking"])
def test_every_check_passes_against_socks5d_with_a_login(mode):
    users = (User("alice", "s3cret:with colon"),)
    with running_proxy(mode, users=users, handshake_timeout=1.0) as proxy:
        report = probe(options(proxy.address, user=(b"alice", b"s3cret:with colon")))
    found = by_result(report)
    assert found[FAIL] == set(), table(report)
    assert found[SKIPPED] == expected_skips(with_login=True), table(report)
    rows = {row.check: row for row in report.results}
    assert rows["greeting.no-auth"].got == "05 ff (a login is required)"
    assert rows["login.success"].got == "05 02, 01 00"
    assert rows["login.failure"].got == "05 02, 01 01, then closed"
    assert report.ok


def test_a_login_server_without_user_says_so_and_fails_the_run():
    with running_proxy("threading", users=(User("alice", "secret"),), handshake_timeout=1.0) as p:
        report = probe(options(p.address))
    found = by_result(report)
    assert found[PASS] == {
        "greeting.no-auth",
        "greeting.methods",
        "greeting.no-acceptable",
        "timeout.handshake",
    }, table(report)
    assert found[FAIL] == set()
    rows = {row.check: row for row in report.results}
    assert rows["connect.ipv4"].got == "the server requires a login: give --user NAME:PASSWORD"
    assert rows["login.success"].got == "no --user given"
    assert "run again with --user NAME:PASSWORD" in report.note
    assert not report.ok


def test_cli_prints_json_and_exits_0_against_socks5d():
    with running_proxy("threading", handshake_timeout=1.0) as proxy:
        done = run_cli("probe", f"127.0.0.1:{proxy.port}", "--json", "--handshake-wait", "8")
    assert done.returncode == 0, done.stdout + done.stderr
    document = json.loads(done.stdout)
    assert document["ok"] is True
    assert document["server"] == f"127.0.0.1:{proxy.port}"
    assert [row["check"] for row in document["checks"]] == list(CHECK_NAMES)
    assert {row["result"] for row in document["checks"]} <= {PASS, SKIPPED}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["probe"], "Missing argument 'HOST:PORT'"),
        (["probe", "127.0.0.1"], "HOST:PORT"),
        (["probe", "::1:1080"], "brackets"),
        (["probe", "127.0.0.1:99999"], "between 0 and 65535"),
        (["probe", "127.0.0.1:1080", "--user", "alice"], "NAME:PASSWORD"),
        (["probe", "127.0.0.1:1080", "--user", ":secret"], "NAME:PASSWORD"),
        (["probe", "127.0.0.1:1080", "--target-host", "example.com"], "not an IP address"),
        (["probe", "127.0.0.1:1080", "--timeout", "0"], "--timeout"),
    ],
)
def test_cli_usage_errors_exit_2(args, message):
    done = run_cli(*args)
    assert done.returncode == 2, done.stdout + done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_a_proxy_that_is_not_there_fails_every_check_quickly():
    with socket.socket() as holder:  # bound, not listening: connections are refused
        holder.bind(("127.0.0.1", 0))
        started = time.monotonic()
        report = probe(options(holder.getsockname(), timeout=1.0, handshake_wait=1.0))
    assert time.monotonic() - started < 60
    rows = {row.check: row for row in report.results}
    assert rows["greeting.no-auth"].result == FAIL
    assert rows["greeting.no-auth"].got == "Connection refused"
    assert rows["connect.ipv4"].result == SKIPPED
    assert rows["timeout.handshake"].result == FAIL
    assert not report.ok


# ---- against broken servers (abuse: the probe must report, not crash or hang) ----


def wrong_version(conn: socket.socket) -> None:
    """Answers every greeting as if it were SOCKS4."""
    while conn.recv(512):
        conn.sendall(b"\x04\x00")


def never_answers(conn: socket.socket) -> None:
    while conn.recv(512):
        pass


def closes_mid_reply(conn: socket.socket) -> None:
    """A valid method selection, then half a reply to any request, then a close."""
    conn.recv(512)
    conn.sendall(b"\x05\x00")
    if conn.recv(512):
        conn.sendall(b"\x05\x00\x00\x01\x7f")


def floods(conn: socket.socket) -> None:
    """A valid method selection, then bytes that never end (until the client goes away)."""
    conn.recv(512)
    conn.sendall(b"\x05\x00")
    while True:
        conn.sendall(b"\xff" * 65536)


@needs_proc_fd
@pytest.mark.parametrize(
    ("behaviour", "greeting_got", "connect_got"),
    [
        (wrong_version, "04 00: version 04, not 05", "greeting.no-auth did not pass"),
        (never_answers, "no method selection in time", "greeting.no-auth did not pass"),
        (
            closes_mid_reply,
            "05 00 (no login needed)",
            "connection closed before the reply (got 05 00 00 01 7f)",
        ),
        (floods, "05 00 (no login needed)", "malformed reply: unsupported SOCKS version 0xff"),
    ],
)
def test_a_broken_server_gets_failures_in_bounded_time(behaviour, greeting_got, connect_got):
    server = TargetServer(behaviour)
    try:
        fds, threads = open_fds(), threading.active_count()
        started = time.monotonic()
        report = probe(options((server.host, server.port), timeout=0.5, handshake_wait=0.5))
        elapsed = time.monotonic() - started
        assert open_fds() == fds  # every probe socket and target closed
        assert wait_until(lambda: threading.active_count() <= threads)
    finally:
        server.close()
    assert elapsed < 60  # 23 checks, each bounded by a few timeouts of 0.5 s
    rows = {row.check: row for row in report.results}
    assert [row.check for row in report.results] == list(CHECK_NAMES)
    assert rows["greeting.no-auth"].got == greeting_got
    assert connect_got in rows["connect.ipv4"].got
    assert rows["connect.ipv4"].result in {FAIL, SKIPPED}
    assert not report.ok
    assert not any("probe error" in row.got for row in report.results), table(report)


def test_cli_against_a_broken_server_exits_1_without_a_traceback():
    server = TargetServer(closes_mid_reply)
    try:
        done = run_cli(
            "probe", f"127.0.0.1:{server.port}", "--timeout", "0.5", "--handshake-wait", "0.5"
        )
    finally:
        server.close()
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert "connect.ipv4" in done.stdout and "fail" in done.stdout


# ---- against other servers, where installed ----


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def accepting(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process we started, then any children it left, each by PID."""
    children = children_of(process.pid)
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(TIMEOUT)
    for child in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)


def start(argv: list[str], port: int) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if not wait_until(lambda: accepting(port) or process.poll() is not None) or not accepting(port):
        stop(process)
        pytest.fail(f"{argv[0]} did not start on 127.0.0.1:{port}")
    return process


@pytest.fixture
def microsocks() -> Iterator[int]:
    program = shutil.which("microsocks")
    if program is None:
        pytest.skip("microsocks is not installed (apt-get install microsocks)")
    port = free_port()
    process = start([program, "-i", "127.0.0.1", "-p", str(port)], port)
    try:
        yield port
    finally:
        stop(process)


# microsocks 1.0.x: BND.ADDR 0.0.0.0:0; 01 for a name that does not resolve; one recv()
# taken as one message (a split greeting fails, pipelined bytes are lost); the tunnel
# ends at the first EOF either way; no BIND, no UDP ASSOCIATE, no handshake timeout.
MICROSOCKS_FAILS = {
    "connect.bnd-addr",
    "reply.host-unreachable",
    "stream.split-bytes",
    "stream.pipelined",
    "halfclose.client-eof",
    "halfclose.target-eof",
}
MICROSOCKS_NOT_SUPPORTED = {
    "bind.first-reply",
    "bind.second-reply",
    "udp.associate",
    "udp.round-trip-ipv4",
    "udp.round-trip-ipv6",
    "timeout.handshake",
}


def test_microsocks_gaps_are_reported_by_name(microsocks):
    report = probe(options(("127.0.0.1", microsocks), timeout=2.0, handshake_wait=2.0))
    found = by_result(report)
    assert found[FAIL] == MICROSOCKS_FAILS - (set() if ipv6_available() else IPV6_CHECKS), table(
        report
    )
    assert found[NOT_SUPPORTED] == MICROSOCKS_NOT_SUPPORTED, table(report)
    rows = {row.check: row for row in report.results}
    assert rows["connect.bnd-addr"].got.startswith("bound 0.0.0.0:0, but the target saw ")
    assert rows["reply.host-unreachable"].got == "01 (general failure)"
    assert rows["bind.first-reply"].got == "07 (command not supported)"
    assert not report.ok


DANTE_CONFIG = """\
logoutput: {folder}/danted.log
internal: 127.0.0.1 port = {port}
external: 127.0.0.1
{external6}
socksmethod: none
clientmethod: none
user.privileged: root
user.unprivileged: nobody
timeout.negotiate: 2
client pass {{
    from: 127.0.0.0/8 to: 127.0.0.0/8
    log: error
}}
socks pass {{
    from: 127.0.0.0/8 to: 127.0.0.0/8
    command: bind connect udpassociate bindreply udpreply
    log: error
}}
socks pass {{
    from: 127.0.0.0/8 to: ::1/128
    command: connect udpassociate
    log: error
}}
socks pass {{
    from: ::1/128 to: 127.0.0.0/8
    command: udpreply
    log: error
}}
"""


@pytest.fixture
def dante(tmp_path: Path) -> Iterator[int]:
    program = shutil.which("danted") or shutil.which("sockd")
    if program is None:
        pytest.skip("Dante is not installed (apt-get install dante-server)")
    if os.geteuid() != 0:
        pytest.skip("danted needs root here (user.privileged = root)")
    port = free_port()
    external6 = "external: ::1" if ipv6_available() else ""
    config = tmp_path / "danted.conf"
    config.write_text(DANTE_CONFIG.format(folder=tmp_path, port=port, external6=external6))
    process = start([program, "-f", str(config), "-p", str(tmp_path / "danted.pid")], port)
    try:
        yield port
    finally:
        stop(process)


def test_dante_gaps_are_reported_by_name(dante):
    report = probe(options(("127.0.0.1", dante), timeout=3.0, handshake_wait=8.0))
    found = by_result(report)
    # Dante 1.4 closes without a reply for an unknown command or address type.
    assert found[FAIL] == {"reply.command-not-supported", "reply.address-type-not-supported"}, (
        table(report)
    )
    assert found[NOT_SUPPORTED] == set(), table(report)
    rows = {row.check: row for row in report.results}
    assert rows["reply.command-not-supported"].got == "connection closed before the reply"
    assert rows["bind.second-reply"].result == PASS
    assert rows["timeout.handshake"].got.startswith("closed after ")
