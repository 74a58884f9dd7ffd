"""--workers N: processes sharing the listening sockets under a supervising parent."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from clients import children_of, connect_through, recv_exactly, wait_until

from socks5d.socks.protocol import Address, AddressType

TIMEOUT = 10.0


def round_trip(port: int, target, payload: bytes) -> bytes:
    address = Address(AddressType.IPV4, "127.0.0.1", target.port)
    with connect_through(("127.0.0.1", port), address) as sock:
        sock.sendall(payload)
        return recv_exactly(sock, len(payload))


def test_workers_serve_restart_reload_and_stop(daemon_factory, echo_target):
    daemon = daemon_factory("--port", "0", "--workers", "2")
    parent = daemon.proc.pid
    assert wait_until(lambda: len(children_of(parent)) == 2)
    assert wait_until(lambda: "started 2 worker processes" in daemon.output())
    for index in range(20):  # both workers take clients; every one is served
        payload = f"client {index}".encode()
        assert round_trip(daemon.port, echo_target, payload) == payload

    victim = children_of(parent)[0]
    os.kill(victim, signal.SIGKILL)  # a crashed worker is replaced
    assert wait_until(lambda: "starting a new one" in daemon.output())
    assert wait_until(lambda: len(children_of(parent)) == 2 and victim not in children_of(parent))
    assert f"worker {victim} exited (killed by signal 9)" in daemon.output()
    assert round_trip(daemon.port, echo_target, b"after restart") == b"after restart"

    daemon.proc.send_signal(signal.SIGHUP)  # the parent reloads, then each worker takes it
    assert wait_until(lambda: daemon.output().count("reload 1 in effect") == 2)
    assert daemon.output().count("reloaded") == 1  # read and accepted once, by the parent

    workers = children_of(parent)
    assert daemon.stop(signal.SIGTERM) == 0
    for pid in workers:
        assert not Path(f"/proc/{pid}").exists(), f"worker {pid} outlived the supervisor"
    assert "starting a new one" not in daemon.output().split("stopping 2 worker(s)")[1]


def test_workers_auto_means_one_per_cpu(daemon_factory):
    daemon = daemon_factory("--port", "0", "--workers", "auto")
    expected = os.cpu_count() or 1
    if expected == 1:
        assert children_of(daemon.proc.pid) == []  # one worker: the process serves itself
    else:
        assert wait_until(lambda: len(children_of(daemon.proc.pid)) == expected)
    assert daemon.stop() == 0
