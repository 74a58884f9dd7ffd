"""Process lifecycle under attack or accident, through the real `socks5d` command: worker
processes killed and restarted, reloads, forked children killed mid-tunnel, a daemon
that dropped root to `run_as_user`.

- A restarted worker serves the last config the parent accepted, not the start-up one,
  nor what the file says now; a rejected reload changes nothing anywhere.
- Per-user slots held by a process that died (a worker, a forked child, a forked child
  orphaned by its worker) are given back.
- With run_as_user, a reload still applies its policy although the log file was opened
  as root; a log file that cannot be reopened keeps the descriptor it has.
- The supervising parent reopens its own log file on SIGHUP (logrotate).

Workers are children of the daemon this test started (found through /proc); only they,
and their own children, are ever killed. Every wait is bounded.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from clients import (
    TIMEOUT,
    children_of,
    closed_port,
    connect_through,
    open_tunnel,
    recv_exactly,
    wait_until,
)
from conftest import DaemonProcess, TargetServer
from test_operations import Process

from socks5d.socks.protocol import Address, Reply

ALICE = (b"alice", b"alice-pw")
ALICE_USER = '[[users]]\nname = "alice"\npassword = "alice-pw"\n'

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop privileges")


# ---- helpers ----


@pytest.fixture
def start_logging_to_file() -> Iterator[Callable[[Path, Path], Process]]:
    """Start socks5d with `config`, found listening through its log file `log`
    (test_operations.Process); each one is stopped after the test."""
    started: list[Process] = []

    def start(config: Path, log: Path) -> Process:
        daemon = Process([sys.executable, "-m", "socks5d", "--config", str(config)], log_file=log)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.stop()


def local(target: TargetServer) -> Address:
    return Address.from_host("127.0.0.1", target.port)


def reply_of(port: int, target: TargetServer, credentials: tuple[bytes, bytes] | None = None):
    """The reply code of one CONNECT through the proxy (closed right after)."""
    sock, reply, _ = open_tunnel(("127.0.0.1", port), local(target), credentials)
    sock.close()
    return reply


def deny_rule(target: TargetServer) -> str:
    return f'[[rules]]\naction = "deny"\nto = ["127.0.0.1"]\nports = [{target.port}]\n'


def count(lines: list[str], *needles: str) -> int:
    return sum(1 for line in lines if all(needle in line for needle in needles))


def workers_of(parent: int, expected: int) -> list[int]:
    assert wait_until(lambda: len(children_of(parent)) == expected), children_of(parent)
    return children_of(parent)


def kill_and_await_replacements(parent: int, victims: list[int], total: int) -> list[int]:
    """SIGKILL `victims` (children of `parent`); wait until `total` children are up again,
    none of them a victim. Returns the children then."""
    for pid in victims:
        os.kill(pid, signal.SIGKILL)

    def replaced() -> bool:
        now = children_of(parent)
        return len(now) == total and not set(now) & set(victims)

    assert wait_until(replaced, timeout=3 * TIMEOUT), children_of(parent)
    return children_of(parent)


def reload_workers(daemon: DaemonProcess, generation: int, workers: int = 2) -> None:
    daemon.proc.send_signal(signal.SIGHUP)
    needle = f"reload {generation} in effect"
    assert wait_until(lambda: daemon.output().count(needle) == workers), daemon.output()


# ---- a restarted worker serves the last accepted config ----


def test_restarted_workers_serve_the_last_accepted_config(daemon_factory, tmp_path, echo_target):
    config = tmp_path / "config.toml"
    config.write_text("[server]\nworkers = 2\n")
    daemon = daemon_factory("--config", str(config), "--port", "0")
    parent = daemon.proc.pid
    workers = workers_of(parent, 2)
    assert reply_of(daemon.port, echo_target) == Reply.SUCCEEDED

    config.write_text("[server]\nworkers = 2\n" + deny_rule(echo_target))
    reload_workers(daemon, 1)
    assert daemon.output().count("reloaded") == 1  # the parent read and accepted it
    assert reply_of(daemon.port, echo_target) == Reply.CONNECTION_NOT_ALLOWED
    assert wait_until(lambda: count(daemon.lines, "cmd=CONNECT", "reply=02") == 1)
    # The file changes again without a SIGHUP: nothing may take this version up.
    config.write_text("[server]\nworkers = 2\n")

    kill_and_await_replacements(parent, workers, 2)
    replies = [reply_of(daemon.port, echo_target) for _ in range(30)]
    assert replies == [Reply.CONNECTION_NOT_ALLOWED] * 30
    assert wait_until(lambda: count(daemon.lines, "cmd=CONNECT", "reply=02") == 31)


def test_a_rejected_reload_keeps_the_accepted_config_in_old_and_new_workers(
    daemon_factory, tmp_path, echo_target
):
    config = tmp_path / "config.toml"
    config.write_text("[server]\nworkers = 2\n" + deny_rule(echo_target))
    daemon = daemon_factory("--config", str(config), "--port", "0")
    parent = daemon.proc.pid
    workers = workers_of(parent, 2)
    config.write_text("[server]\nworkers = 2\n[access]\ndefault_action = 'deny'\n")
    reload_workers(daemon, 1)  # deny everything
    config.write_text("[server\nworkers = 2\n")  # not TOML
    daemon.proc.send_signal(signal.SIGHUP)
    assert wait_until(lambda: "reload rejected" in daemon.output())
    other = Address.from_host("127.0.0.1", closed_port())
    # Both old workers keep generation 1 (once each: never told to reload again).
    assert [reply_of(daemon.port, echo_target) for _ in range(10)] == [2] * 10
    sock, reply, _ = open_tunnel(("127.0.0.1", daemon.port), other)
    sock.close()
    assert reply == Reply.CONNECTION_NOT_ALLOWED  # the default_action of generation 1
    kill_and_await_replacements(parent, workers[:1], 2)
    assert [reply_of(daemon.port, echo_target) for _ in range(10)] == [2] * 10
    output = daemon.output()
    assert output.count("reload rejected") == 1 and output.count("reload 1 in effect") == 2
    assert "reload 2" not in output


# ---- per-user slots of dead processes are given back ----


def limited_config(mode: str, workers: int) -> str:
    return (
        f'[server]\nmode = "{mode}"\nworkers = {workers}\n'
        "[limits]\nmax_connections_per_user = 1\n" + ALICE_USER
    )


def assert_slot_given_back(daemon: DaemonProcess, target: TargetServer, pid: int) -> None:
    assert wait_until(
        lambda: f"process {pid} killed by signal 9 holding 1 per-user" in (daemon.output())
    ), daemon.output()
    with connect_through(("127.0.0.1", daemon.port), local(target), ALICE) as again:
        again.sendall(b"slot back")
        assert recv_exactly(again, 9) == b"slot back"
        # ... and the limit still holds: the slot given back was the only one.
        assert reply_of(daemon.port, target, ALICE) == Reply.GENERAL_FAILURE


def test_slots_held_by_killed_workers_are_given_back(daemon_factory, tmp_path, echo_target):
    config = tmp_path / "config.toml"
    config.write_text(limited_config("threading", 2))
    daemon = daemon_factory("--config", str(config), "--port", "0")
    parent = daemon.proc.pid
    workers = workers_of(parent, 2)
    with connect_through(("127.0.0.1", daemon.port), local(echo_target), ALICE):
        assert reply_of(daemon.port, echo_target, ALICE) == Reply.GENERAL_FAILURE  # 1 of 1
        kill_and_await_replacements(parent, workers, 2)
    # Whichever worker served the tunnel held the slot; the other held none.

    def holders() -> list[int]:
        return [pid for pid in workers if f"process {pid} killed" in daemon.output()]

    assert wait_until(lambda: len(holders()) == 1), daemon.output()
    assert_slot_given_back(daemon, echo_target, holders()[0])


def test_slot_of_a_killed_forked_child_is_given_back(daemon_factory, tmp_path, echo_target):
    config = tmp_path / "config.toml"
    config.write_text(limited_config("forking", 1))
    daemon = daemon_factory("--config", str(config), "--port", "0")
    tunnel = connect_through(("127.0.0.1", daemon.port), local(echo_target), ALICE)
    with tunnel:
        (child,) = workers_of(daemon.proc.pid, 1)
        os.kill(child, signal.SIGKILL)
        assert_slot_given_back(daemon, echo_target, child)


def test_slot_of_a_forked_child_orphaned_by_its_worker_is_given_back(
    daemon_factory, tmp_path, echo_target
):
    config = tmp_path / "config.toml"
    config.write_text(limited_config("forking", 2))
    daemon = daemon_factory("--config", str(config), "--port", "0")
    parent = daemon.proc.pid
    workers = workers_of(parent, 2)
    tunnel = connect_through(("127.0.0.1", daemon.port), local(echo_target), ALICE)
    with tunnel:
        assert wait_until(lambda: sum(len(children_of(pid)) for pid in workers) == 1)
        (worker,) = [pid for pid in workers if children_of(pid)]
        (child,) = children_of(worker)
        os.kill(worker, signal.SIGKILL)  # the child lives on, re-parented to the supervisor
        assert wait_until(lambda: child in children_of(parent)), children_of(parent)
        tunnel.sendall(b"orphan")
        assert recv_exactly(tunnel, 6) == b"orphan"
        assert wait_until(lambda: "starting a new one" in daemon.output())
        os.kill(child, signal.SIGKILL)
        assert_slot_given_back(daemon, echo_target, child)


# ---- the parent's own log file ----


def test_supervisor_reopens_its_own_log_file_on_sighup(start_logging_to_file, tmp_path):
    log, rotated = tmp_path / "socks5d.log", tmp_path / "socks5d.log.1"
    config = tmp_path / "config.toml"
    config.write_text(
        f'[server]\nlisten = ["127.0.0.1:0"]\nworkers = 2\n[logging]\nfile = "{log}"\n'
    )
    daemon = start_logging_to_file(config, log)
    parent = daemon.proc.pid
    workers = workers_of(parent, 2)
    log.rename(rotated)  # logrotate moves the file, then sends SIGHUP
    daemon.proc.send_signal(signal.SIGHUP)
    assert wait_until(lambda: count(daemon.file_lines(log), "reload 1 in effect") == 2)
    assert count(daemon.file_lines(log), "reloaded") == 1  # the parent's line, in the new file
    kill_and_await_replacements(parent, workers[:1], 2)
    exited = f"worker {workers[0]} exited (killed by signal 9)"
    assert wait_until(lambda: count(daemon.file_lines(log), exited) == 1)
    assert count(daemon.file_lines(rotated), exited) == 0
    assert daemon.stop() == 0
    assert count(daemon.file_lines(log), "stopped") >= 1


# ---- run_as_user with a log file ----


@pytest.fixture
def nobody_folder() -> Iterator[Path]:
    """A folder `nobody` can enter (a pytest tmp_path is private to root)."""
    try:
        pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody' here")
    folder = Path(tempfile.mkdtemp(prefix="socks5d-as-nobody-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def start_as_nobody(
    start: Callable[[Path, Path], Process], folder: Path, workers: int
) -> tuple[Process, Path]:
    log, config = folder / "socks5d.log", folder / "config.toml"
    config.write_text(as_nobody_config(log, workers, ""))
    config.chmod(0o644)  # a reload reads it as nobody
    return start(config, log), config


def as_nobody_config(log: Path, workers: int, rules: str) -> str:
    return (
        f'[server]\nlisten = ["127.0.0.1:0"]\nrun_as_user = "nobody"\nworkers = {workers}\n'
        f'[logging]\nfile = "{log}"\n' + rules
    )


@needs_root
@pytest.mark.parametrize("workers", [1, 2])
def test_run_as_user_with_a_log_file_reloads_the_policy(
    start_logging_to_file, nobody_folder, echo_target, workers
):
    daemon, config = start_as_nobody(start_logging_to_file, nobody_folder, workers)
    log = nobody_folder / "socks5d.log"
    assert log.stat().st_uid == pwd.getpwnam("nobody").pw_uid  # handed over before the drop
    assert reply_of(daemon.port, echo_target) == Reply.SUCCEEDED
    config.write_text(as_nobody_config(log, workers, deny_rule(echo_target)))
    daemon.proc.send_signal(signal.SIGHUP)
    assert wait_until(lambda: count(daemon.file_lines(), "reloaded") == 1), daemon.file_lines()
    if workers > 1:
        assert wait_until(lambda: count(daemon.file_lines(), "reload 1 in effect") == workers)
    assert reply_of(daemon.port, echo_target) == Reply.CONNECTION_NOT_ALLOWED
    assert count(daemon.file_lines(), "reload rejected") == 0
    assert count(daemon.file_lines(), "cannot open log file") == 0
    assert daemon.stop() == 0


@needs_root
def test_run_as_user_log_file_that_cannot_be_reopened_keeps_the_old_one(
    start_logging_to_file, nobody_folder, echo_target
):
    daemon, config = start_as_nobody(start_logging_to_file, nobody_folder, 1)
    log, rotated = nobody_folder / "socks5d.log", nobody_folder / "socks5d.log.1"
    log.rename(rotated)
    log.touch(mode=0o600)  # made by root, for root: nobody cannot open it
    config.write_text(as_nobody_config(log, 1, deny_rule(echo_target)))
    daemon.proc.send_signal(signal.SIGHUP)
    assert wait_until(lambda: count(daemon.file_lines(rotated), "reloaded") == 1)
    (warning,) = [line for line in daemon.file_lines(rotated) if "cannot open log file" in line]
    assert " WARNING " in warning and "Permission denied" in warning
    assert reply_of(daemon.port, echo_target) == Reply.CONNECTION_NOT_ALLOWED  # applied
    assert wait_until(lambda: count(daemon.file_lines(rotated), "cmd=CONNECT", "reply=02") == 1)
    assert log.read_text() == ""
    assert daemon.stop() == 0
