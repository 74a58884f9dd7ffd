"""Logins under attack (issue 9), each attack run against a real server.

Many wrong logins at once must not run as many 16 MiB scrypt checks at once; logging in
as one user must not clear the back-off of guesses at another; a client must not be able
to aim its back-off at someone else's; and a wrong password must take as long for a
plaintext entry or an unknown name as for a default hash.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import signal
import socket
import statistics
import subprocess
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from clients import TIMEOUT, recv_exactly, wait_until
from conftest import DaemonProcess, running_proxy
from netns import call_in_netns, needs_netns, netns_only
from test_security import needs_127_0_0_2, start

from socks5d.ops.config import ConfigError, User, parse_config
from socks5d.ops.daemon import Daemon
from socks5d.policy import auth
from socks5d.policy.auth import Authenticator, hash_password
from socks5d.policy.throttle import CLIENT_FREE_FAILURES, CheckGate, FailedLoginBackoff
from socks5d.socks.protocol import Method, encode_greeting, encode_username_password

SCRYPT_CHECK_MIB = 16  # what one check with the default parameters holds (128 * N * r)
DEFAULTS = (auth.SCRYPT_LOG_N, auth.SCRYPT_R, auth.SCRYPT_P)


def greeted(proxy: tuple[str, int], source: str = "127.0.0.1") -> socket.socket:
    """A connection from `source` that offered RFC 1929 and had it chosen (05 02)."""
    family = socket.AF_INET6 if ":" in proxy[0] else socket.AF_INET
    sock = socket.socket(family)
    try:
        sock.settimeout(TIMEOUT * 3)
        sock.bind((source, 0))
        sock.connect(proxy)
        sock.sendall(encode_greeting([Method.USERNAME_PASSWORD]))
        assert recv_exactly(sock, 2) == b"\x05\x02"
    except BaseException:
        sock.close()
        raise
    return sock


def login(
    proxy: tuple[str, int], user: bytes, password: bytes, source: str = "127.0.0.1"
) -> tuple[bytes, float]:
    """(RFC 1929 status, seconds from sending the credentials to the answer)."""
    with greeted(proxy, source) as sock:
        started = time.monotonic()
        sock.sendall(encode_username_password(user, password))
        return recv_exactly(sock, 2), time.monotonic() - started


def status_of(proxy: tuple[str, int], user: bytes, password: bytes, source: str = "127.0.0.1"):
    return login(proxy, user, password, source)[0]


def peak_memory_mib(pid: int) -> float:
    """VmHWM: the most memory the process ever had resident."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status)[1]) / 1024


def access_ends(daemon: DaemonProcess) -> list[str]:
    return re.findall(r"end='([^']*)'", daemon.output())


# ---- finding 2: hash checks at once are bounded, in memory and across processes ----


def test_simultaneous_wrong_logins_hash_one_at_a_time_in_bounded_memory(daemon_factory, tmp_path):
    # One scrypt user; 60 connections send their wrong logins at the same moment. Each
    # check holds 16 MiB: unbounded, the daemon peaked 775 MiB above its start.
    config = (
        "[limits]\nmax_connections_per_ip = 0\n[timeouts]\nhandshake = 120\n"
        "[auth]\nfailure_delay = 0\nmax_parallel_checks = 1\n"
        f'[[users]]\nname = "alice"\npassword_hash = "{hash_password("right")}"\n'
    )
    daemon = start(daemon_factory, tmp_path, config, "--port", "0")
    proxy = ("127.0.0.1", daemon.port)
    connections = [greeted(proxy) for _ in range(60)]
    try:
        before = peak_memory_mib(daemon.proc.pid)
        for sock in connections:
            sock.sendall(encode_username_password(b"alice", b"wrong"))
        statuses = {recv_exactly(sock, 2) for sock in connections}
        grown = peak_memory_mib(daemon.proc.pid) - before
    finally:
        for sock in connections:
            sock.close()
    assert statuses == {b"\x01\x01"}
    # Every one of them was really checked, none refused unchecked.
    assert wait_until(lambda: access_ends(daemon).count("authentication failed") == 60)
    margin = 16
    assert grown < 1 * SCRYPT_CHECK_MIB + margin, f"peak memory grew {grown:.0f} MiB"


@pytest.fixture
def busy_gate_proxy(monkeypatch) -> Iterator[tuple[tuple[str, int], CheckGate, list[bytes]]]:
    """An in-process server whose one check slot the test can hold; records checks."""
    checked: list[bytes] = []
    verify = Authenticator.verify

    def counting_verify(self: Authenticator, username: bytes, password: bytes) -> bool:
        checked.append(username)
        return verify(self, username, password)

    monkeypatch.setattr(Authenticator, "verify", counting_verify)
    with running_proxy(users=(User("alice", "right"),), handshake_timeout=1.0) as proxy:
        gate = CheckGate(1)
        server: Any = proxy.server
        server.context = dataclasses.replace(server.context, check_gate=gate)
        yield proxy.address, gate, checked


def test_a_login_still_queued_at_the_handshake_deadline_is_refused_unchecked(
    busy_gate_proxy, caplog
):
    proxy, gate, checked = busy_gate_proxy
    held = gate.acquire(time.monotonic() + TIMEOUT)  # every check slot is taken
    assert held is not None
    try:
        with caplog.at_level(logging.INFO, logger="socks5d.access"):
            assert status_of(proxy, b"alice", b"wrong") == b"\x01\x01"  # RFC 1929: failure
            assert wait_until(lambda: any(hasattr(r, "access") for r in caplog.records))
    finally:
        gate.release(held)
    assert checked == []
    (record,) = [r for r in caplog.records if hasattr(r, "access")]
    assert record.access.end == "login refused unchecked: password checks busy"
    # With the slot free again, the same login is checked.
    assert status_of(proxy, b"alice", b"wrong") == b"\x01\x01"
    assert checked == [b"alice"]


def test_a_remembered_login_skips_the_hash_and_the_queue(busy_gate_proxy):
    proxy, gate, checked = busy_gate_proxy
    assert status_of(proxy, b"alice", b"right") == b"\x01\x00"
    assert checked == [b"alice"]
    held = gate.acquire(time.monotonic() + TIMEOUT)
    try:
        # Every slot is busy, yet the heavy legitimate client goes on logging in.
        for _ in range(5):
            assert status_of(proxy, b"alice", b"right") == b"\x01\x00"
    finally:
        gate.release(held)
    assert checked == [b"alice"]


def hold_a_slot_until_killed(gate: CheckGate, ready: int) -> None:
    """In a forked child: take the one slot, say so, and wait to be killed."""
    try:
        if gate.acquire(time.monotonic() + TIMEOUT) is not None:
            os.write(ready, b"held")
        time.sleep(TIMEOUT)
    finally:
        os._exit(0)


def test_the_bound_holds_across_processes_and_a_killed_holder_frees_its_slot():
    gate = CheckGate(1)  # made before the fork, as the daemon makes it
    ready_read, ready_write = os.pipe()
    pid = os.fork()
    if pid == 0:
        hold_a_slot_until_killed(gate, ready_write)
    try:
        os.close(ready_write)
        assert os.read(ready_read, 4) == b"held"
        assert gate.acquire(time.monotonic() + 0.3) is None  # the other process has it
        os.kill(pid, signal.SIGKILL)  # the OOM killer's way: no chance to clean up
        os.waitpid(pid, 0)
        pid = 0
        index = gate.acquire(time.monotonic() + TIMEOUT)  # the kernel freed its lock
        assert index == 0
        gate.release(index)
    finally:
        os.close(ready_read)
        if pid:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


def test_threads_of_one_process_share_the_bound():
    gate = CheckGate(2)
    first = gate.acquire(time.monotonic() + TIMEOUT)
    second = gate.acquire(time.monotonic() + TIMEOUT)
    assert {first, second} == {0, 1}  # fcntl locks are per process: never one byte twice
    assert gate.acquire(time.monotonic() + 0.1) is None
    gate.release(first)
    assert gate.acquire(time.monotonic() + TIMEOUT) == first


@pytest.mark.parametrize(
    ("value", "problem"),
    [(0, "between 1 and 1024"), ("many", 'or "auto"'), (True, "must be an integer")],
)
def test_max_parallel_checks_must_be_a_count_or_auto(value, problem):
    with pytest.raises(ConfigError, match=f"auth.max_parallel_checks: .*{problem}"):
        parse_config({"auth": {"max_parallel_checks": value}})
    assert parse_config({"auth": {"max_parallel_checks": 3}}).auth.parallel_checks == 3
    assert parse_config({}).auth.parallel_checks == len(os.sched_getaffinity(0))


# ---- finding 4: a success clears only that user's failures ----


def back_off_config(delay: float, delay_max: float) -> str:
    return (
        f"[auth]\nfailure_delay = {delay}\nfailure_delay_max = {delay_max}\n"
        '[[users]]\nname = "alice"\npassword = "alice-pw"\n'
        '[[users]]\nname = "bob"\npassword = "bob-pw"\n'
    )


def gaps_between_failures(
    proxy: tuple[str, int], guesses: list[bytes], between: Callable[[], None]
) -> list[float]:
    """Guess bob's password once per name in `guesses`, calling `between` after each;
    the seconds from each failed answer to the next."""
    gaps, failed_at = [], None
    for user in guesses:
        status, _ = login(proxy, user, b"guess")
        assert status == b"\x01\x01"
        now = time.monotonic()
        if failed_at is not None:
            gaps.append(now - failed_at)
        failed_at = now
        between()
    return gaps


def test_logging_in_as_another_user_does_not_clear_the_guessed_users_back_off(
    daemon_factory, tmp_path, proxy_mode
):
    # The attack: one wrong guess for bob, one correct login as the attacker's own alice,
    # again and again. Before, each success cleared the address: bob's guesses never waited.
    config = f'[server]\nmode = "{proxy_mode}"\n' + back_off_config(0.5, 2.0)
    daemon = start(daemon_factory, tmp_path, config, "--port", "0")
    proxy = ("127.0.0.1", daemon.port)

    def log_in_as_alice() -> None:
        assert status_of(proxy, b"alice", b"alice-pw") == b"\x01\x00"

    gaps = gaps_between_failures(proxy, [b"bob"] * 5, log_in_as_alice)
    # Bob's failures space out 0.5, 1, 2, 2 s: doubling up to the cap as if alone.
    assert all(gap >= want - 0.05 for gap, want in zip(gaps, [0.5, 1.0, 2.0, 2.0], strict=True)), (
        gaps
    )


def test_guessing_one_password_for_each_of_many_names_is_slowed_too(daemon_factory, tmp_path):
    # Spraying: one guess at each of many names, a correct login of one's own between
    # them. The per-client count is cleared by no success: from its 4th failure on, the
    # client waits, doubling, whatever the name.
    daemon = start(daemon_factory, tmp_path, back_off_config(0.5, 2.0), "--port", "0")
    proxy = ("127.0.0.1", daemon.port)
    names = [f"user{number}".encode() for number in range(CLIENT_FREE_FAILURES + 4)]

    def log_in_as_alice() -> None:
        assert status_of(proxy, b"alice", b"alice-pw") == b"\x01\x00"

    gaps = gaps_between_failures(proxy, names, log_in_as_alice)
    assert all(gap >= want - 0.05 for gap, want in zip(gaps[-3:], [0.5, 1.0, 2.0], strict=True)), (
        gaps
    )


def test_a_user_who_mistyped_once_is_not_held_up_afterwards(daemon_factory, tmp_path, proxy_mode):
    config = f'[server]\nmode = "{proxy_mode}"\n' + back_off_config(4.0, 10.0)
    daemon = start(daemon_factory, tmp_path, config, "--port", "0")
    proxy = ("127.0.0.1", daemon.port)
    assert status_of(proxy, b"alice", b"alice-pw") == b"\x01\x00"
    assert status_of(proxy, b"alice", b"alice-typo") == b"\x01\x01"
    # Threading mode remembers the password and lets it in at once; a forking-mode child
    # cannot remember, so this one login waits its 4 s turn and clears alice's count.
    status, _ = login(proxy, b"alice", b"alice-pw")
    assert status == b"\x01\x00"
    for _ in range(3):  # and no later login waits: the client's own count is below 4
        status, elapsed = login(proxy, b"alice", b"alice-pw")
        assert status == b"\x01\x00"
        assert elapsed < 3.0, f"a later login waited {elapsed:.1f} s"


# ---- finding 5: back-off slots cannot be aimed at someone else ----

VICTIM = "127.0.0.1"
# The old table slot was crc32(ip) % 65536: this address shares 127.0.0.1's.
OLD_SCHEME_TWIN = "127.1.140.163"


@needs_127_0_0_2
def test_a_flood_from_a_colliding_address_does_not_lock_out_the_victim(daemon_factory, tmp_path):
    assert zlib.crc32(OLD_SCHEME_TWIN.encode()) % 65536 == zlib.crc32(VICTIM.encode()) % 65536
    config = (
        "[limits]\nmax_connections_per_ip = 0\n"
        '[auth]\nfailure_delay = 0.5\n[[users]]\nname = "alice"\npassword = "right"\n'
    )
    daemon = start(daemon_factory, tmp_path, config, "--port", "0")
    proxy = ("127.0.0.1", daemon.port)
    assert status_of(proxy, b"alice", b"wrong", OLD_SCHEME_TWIN) == b"\x01\x01"
    flood = [greeted(proxy, OLD_SCHEME_TWIN) for _ in range(200)]
    try:
        for sock in flood:
            sock.sendall(encode_username_password(b"alice", b"wrong"))
        # Once most of the flood is answered (refused), the victim's correct login goes in.
        wait_until(lambda: len(access_ends(daemon)) > 150)
        assert status_of(proxy, b"alice", b"right", VICTIM) == b"\x01\x00"
        assert {recv_exactly(sock, 2) for sock in flood} == {b"\x01\x01"}
    finally:
        for sock in flood:
            sock.close()
    ends = access_ends(daemon)
    assert ends.count("login refused unchecked: back-off turn after the deadline") > 150


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_clients_in_one_bucket_never_see_each_others_failures():
    clock = Clock()
    backoff = FailedLoginBackoff(capacity=8, delay=1.0, clock=clock)  # a single bucket
    backoff.failed("192.0.2.1", b"alice")
    assert backoff.book("192.0.2.99", b"alice").wait == 0.0
    # A full bucket forgets its least recently failed entry; it never mixes two up.
    for number in range(2, 10):
        clock.now += 1
        backoff.failed(f"192.0.2.{number}", b"alice")
    assert backoff.failures("192.0.2.1", b"alice") == 0
    assert backoff.failures("192.0.2.9", b"alice") == 1


def test_where_a_client_lands_depends_on_a_secret_of_the_process_tree():
    first, second = FailedLoginBackoff(), FailedLoginBackoff()
    keys = [f"client-{number}".encode() for number in range(20)]
    assert [first._slot(key) for key in keys] != [second._slot(key) for key in keys]


def test_a_refused_attempt_books_no_turn():
    clock = Clock()
    backoff = FailedLoginBackoff(delay=4.0, clock=clock)
    backoff.failed("192.0.2.1", b"alice")
    deadline = clock.now + 10.0
    assert [backoff.book("192.0.2.1", b"alice", deadline).wait for _ in range(2)] == [4.0, 8.0]
    for _ in range(100):  # the flood: refused, unchecked
        assert backoff.book("192.0.2.1", b"alice", deadline) is None
    # The queue did not move: the next turn is the third, as without the flood.
    assert backoff.book("192.0.2.1", b"alice", clock.now + 60).wait == 12.0


def test_an_ipv6_client_is_its_slash_64():
    backoff = FailedLoginBackoff(delay=1.0, clock=Clock())
    backoff.failed("2001:db8:1:2::a", b"alice")
    assert backoff.book("2001:db8:1:2:ffff::b", b"alice").wait == 1.0
    assert backoff.book("2001:db8:1:3::a", b"alice").wait == 0.0
    exact = FailedLoginBackoff(delay=1.0, clock=Clock(), ipv6_prefix=128)
    exact.failed("2001:db8:1:2::a", b"alice")
    assert exact.book("2001:db8:1:2::b", b"alice").wait == 0.0


def test_the_daemon_keys_its_back_off_by_limits_ipv6_client_prefix():
    config = parse_config({"server": {"port": 0}, "limits": {"ipv6_client_prefix": 56}})
    server = Daemon(config).bind()
    try:
        assert server.context.login_backoff.ipv6_prefix == 56
        assert server.context.check_gate.limit == config.auth.parallel_checks
    finally:
        server.server_close()


SAME_64 = ("2001:db8:1:2::a", "2001:db8:1:2::b")
OTHER_64 = "2001:db8:1:3::a"


@netns_only
def ipv6_neighbours_scenario() -> list[str]:
    """In a namespace: a wrong login from one address of a /64, then another guess from
    another /64 and from another address of the first; the statuses and who waited."""
    for address in (*SAME_64, OTHER_64):
        subprocess.run(
            ["ip", "-6", "addr", "add", f"{address}/128", "dev", "lo", "nodad"], check=True
        )
    with tempfile.NamedTemporaryFile("w", suffix=".toml") as config:
        config.write(
            '[server]\nhost = "::1"\nport = 0\n[auth]\nfailure_delay = 3\n'
            '[[users]]\nname = "alice"\npassword = "right"\n'
        )
        config.flush()
        return logins_from_one_slash_64(DaemonProcess("--config", config.name))


def logins_from_one_slash_64(daemon: DaemonProcess) -> list[str]:
    try:
        proxy = ("::1", daemon.port)
        results = [status_of(proxy, b"alice", b"wrong", SAME_64[0]).hex()]
        for source in (OTHER_64, SAME_64[1]):
            status, elapsed = login(proxy, b"alice", b"another guess", source)
            results.append(f"{status.hex()} {'waited' if elapsed >= 2.5 else 'at once'}")
        return results
    finally:
        daemon.stop()


@needs_netns
def test_ipv6_addresses_of_one_slash_64_share_a_back_off():
    assert call_in_netns(ipv6_neighbours_scenario) == ["0101", "0101 at once", "0101 waited"]


# ---- finding 10: a wrong password takes as long whoever the user is ----


@pytest.fixture
def kdf_calls(monkeypatch) -> list[tuple[int, int, int]]:
    """(log2 N, r, p) of every scrypt run through socks5d.policy.auth, in order."""
    calls: list[tuple[int, int, int]] = []
    scrypt = auth._scrypt

    def recording(secret: bytes, salt: bytes, log_n: int, r: int, p: int) -> bytes:
        calls.append((log_n, r, p))
        return scrypt(secret, salt, log_n, r, p)

    monkeypatch.setattr(auth, "_scrypt", recording)
    return calls


def test_unknown_and_plaintext_users_cost_one_default_scrypt_check(kdf_calls):
    users = [
        User("plain", "secret"),
        User("default", password_hash=hash_password("secret")),
        User("pbkdf2", password_hash=hash_password("secret", "pbkdf2_sha256")),
    ]
    authenticator = Authenticator.from_users(users)
    for name in (b"plain", b"default", b"nobody"):
        kdf_calls.clear()
        assert not authenticator.verify(name, b"wrong")
        assert kdf_calls == [DEFAULTS], name
    kdf_calls.clear()
    assert authenticator.verify(b"plain", b"secret")
    assert kdf_calls == [DEFAULTS]


def test_a_wrong_password_takes_as_long_for_any_name(daemon_factory, tmp_path):
    config = (
        "[auth]\nfailure_delay = 0\n"
        f'[[users]]\nname = "hashed"\npassword_hash = "{hash_password("right")}"\n'
        '[[users]]\nname = "plain"\npassword = "right"\n'
    )
    daemon = start(daemon_factory, tmp_path, config, "--port", "0")
    proxy = ("127.0.0.1", daemon.port)
    times: dict[bytes, list[float]] = {b"hashed": [], b"plain": [], b"nobody": []}
    for _ in range(7):
        for name, samples in times.items():
            status, elapsed = login(proxy, name, b"wrong")
            assert status == b"\x01\x01"
            samples.append(elapsed)
    medians = {name: statistics.median(samples) for name, samples in times.items()}
    for name in (b"plain", b"nobody"):
        ratio = medians[name] / medians[b"hashed"]
        assert 0.33 < ratio < 3.0, f"{name!r}: {ratio:.2f} of a default hash's time {medians}"


def test_a_hash_with_other_costs_is_named_at_startup(daemon_factory, tmp_path):
    encoded = hash_password("secret", "pbkdf2_sha256")
    config = f'[[users]]\nname = "carol"\npassword_hash = "{encoded}"\n'
    daemon = start(daemon_factory, tmp_path, config, "--port", "0")
    assert "users[0] (carol) has a password_hash with other costs" in daemon.output()
