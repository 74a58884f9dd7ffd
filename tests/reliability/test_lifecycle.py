"""Signals under load, and forked children: reload storms, a graceful stop mid-transfer,
and thousands of children reaped.

Against the real `socks5d`: signals go to the daemon's PID, as `systemctl reload` and
`systemctl stop` send them (with workers, the supervisor passes them on).
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
from clients import TIMEOUT, children_of, connect_through, recv_exactly, wait_until
from streams import MiB, Worker

from .support import (
    SERVINGS,
    echo_round_trip,
    loopback,
    pattern_digest,
    run_daemon,
    scaled,
    send_pattern,
)

pytestmark = pytest.mark.stress


# ---- SIGHUP every 100 ms ----

BUSY_TUNNELS = scaled(ci=20, full=50)
STORM_SECONDS = scaled(ci=3, full=20)
HUP_INTERVAL = 0.1
TAKEN = re.compile(r"worker (\d+): reload \d+ in effect")


def round_trips(sock: socket.socket, index: int, stop: threading.Event) -> int:
    """Echo round trips of 1-64 KiB until `stop`; how many, each checked byte for byte."""
    trips = 0
    while not stop.is_set():
        size = 1 + (index * 7919 + trips * 104729) % (64 * 1024)
        payload = (b"%d:%d;" % (index, trips) * (size // 4 + 1))[:size]
        sock.sendall(payload)
        if recv_exactly(sock, size) != payload:
            raise AssertionError(f"tunnel {index}: wrong bytes on trip {trips}")
        trips += 1
    return trips


def short_connections(proxy: tuple[str, int], port: int, stop: threading.Event) -> int:
    count = 0
    while not stop.is_set():
        payload = b"short %d" % count
        assert echo_round_trip(proxy, port, payload) == payload
        count += 1
    return count


def test_sighup_every_100_ms_drops_no_busy_tunnel(daemon_factory, tmp_path, echo_process, serving):
    """50 tunnels (CI: 20) doing echo round trips of 1-64 KiB non-stop, and short
    connections one after another, while the daemon gets SIGHUP every 100 ms for 20 s
    (CI: 3 s): no tunnel dropped, every byte right, every short connection served, at
    least one reload per 2 signals logged, none rejected."""
    run = run_daemon(daemon_factory, tmp_path, serving, echo_process.port)
    stop = threading.Event()
    tunnels = [connect_through(run.proxy, loopback(echo_process.port)) for _ in range(BUSY_TUNNELS)]
    try:
        workers = [Worker(round_trips, sock, index, stop) for index, sock in enumerate(tunnels)]
        workers.append(Worker(short_connections, run.proxy, echo_process.port, stop))
        for worker in workers:
            worker.start()
        signals = 0
        deadline = time.monotonic() + STORM_SECONDS
        while time.monotonic() < deadline and not any(w.error for w in workers):
            os.kill(run.pid, signal.SIGHUP)
            signals += 1
            time.sleep(HUP_INTERVAL)
        stop.set()
        counts = [worker.result(TIMEOUT * 2) for worker in workers]
    finally:
        stop.set()
        for sock in tunnels:
            sock.close()
    # The daemon (with workers: their supervisor) logs each reload it accepted; a worker
    # logs the newest one it took, so it may skip some that came in quick succession.
    reloads = sum("reloaded" in line for line in run.daemon.lines)
    taken = set(TAKEN.findall(run.daemon.output()))
    print(f"{serving.name}: {signals} SIGHUPs, {reloads} reloads; trips {counts}")
    assert min(counts) > 0
    assert reloads >= signals / 2
    assert len(taken) == (serving.workers if serving.workers > 1 else 0)
    assert "reload rejected" not in run.daemon.output()
    assert run.daemon.proc.poll() is None
    run.settle()


# ---- SIGTERM mid-transfer ----

DRAINING = scaled(ci=10, full=50)
DRAIN_SIZE = scaled(ci=8, full=32) * MiB
GRACE = 30.0
WAITING = re.compile(r"waiting up to 30\.0 s for (\d+) open connection")


def download(proxy: tuple[str, int], port: int, flowing: threading.Event) -> tuple[str, int]:
    """Read a tunnel to EOF, setting `flowing` once the first MiB is in."""
    digest, total = hashlib.sha256(), 0
    with connect_through(proxy, loopback(port)) as sock:
        while chunk := sock.recv(MiB):
            digest.update(chunk)
            total += len(chunk)
            if total >= MiB:
                flowing.set()
    return digest.hexdigest(), total


def test_sigterm_under_load_lets_every_transfer_finish_and_exits_0(
    daemon_factory, tmp_path, target_factory, echo_target, serving
):
    """50 tunnels (CI: 10) each in the middle of a 32 MiB download (CI: 8 MiB) from a
    paced source when SIGTERM arrives: no new client is accepted, every download
    completes with the right sha256 within the grace period (30 s here, for a loaded
    machine; the default is 5 s), nothing is cut, and the daemon exits 0 by itself."""
    target = target_factory(lambda conn: send_pattern(conn, DRAIN_SIZE, pause=0.02))
    run = run_daemon(
        daemon_factory, tmp_path, serving, echo_target.port, timeouts={"shutdown_grace": GRACE}
    )
    flowing = [threading.Event() for _ in range(DRAINING)]
    workers = [Worker(download, run.proxy, target.port, event) for event in flowing]
    for worker in workers:
        worker.start()
    assert all(event.wait(TIMEOUT) for event in flowing)
    stopped_at = time.monotonic()
    os.kill(run.pid, signal.SIGTERM)
    assert wait_until(lambda: "waiting up to 30.0 s" in run.daemon.output())
    with pytest.raises(OSError):  # listeners closed at once
        socket.create_connection(run.proxy, timeout=TIMEOUT).close()
    results = [worker.result(GRACE + TIMEOUT) for worker in workers]
    assert results == [(pattern_digest(DRAIN_SIZE), DRAIN_SIZE)] * DRAINING
    assert run.daemon.proc.wait(GRACE + TIMEOUT) == 0
    print(f"{serving.name}: stopped {time.monotonic() - stopped_at:.1f} s after SIGTERM")
    assert "cut" not in run.daemon.output()
    assert not target.errors
    # Every download was open when the stop began (each worker counts its own).
    draining = [int(match) for match in WAITING.findall(run.daemon.output())]
    assert sum(draining) == DRAINING, draining


# ---- forking: children reaped ----

FORKED = scaled(ci=200, full=2000)
AT_ONCE = 20
HELD = 20


def start_time(pid: int) -> str | None:
    """A process's start time (field 22 of /proc/PID/stat): with the PID it names the
    process, so a PID reused by something else is not mistaken for it."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2 :].split()[19]


def test_forking_mode_reaps_every_child_and_leaves_none_after_stop(
    daemon_factory, tmp_path, echo_process
):
    """2,000 connections (CI: 200), 20 at a time, through forking mode: afterwards no
    child is left and none is a zombie; then 20 tunnels held open through a SIGTERM with
    a 0.5 s grace: exit 0, and none of the children that served them is left alive or
    unreaped."""
    serving = SERVINGS[1]
    run = run_daemon(
        daemon_factory, tmp_path, serving, echo_process.port, timeouts={"shutdown_grace": 0.5}
    )

    def batch(first: int) -> None:
        for index in range(first, FORKED, AT_ONCE):
            payload = b"child %d" % index
            assert echo_round_trip(run.proxy, echo_process.port, payload) == payload

    workers = [Worker(batch, first) for first in range(AT_ONCE)]
    most_zombies = 0
    for worker in workers:
        worker.start()
    while any(worker.is_alive() for worker in workers):
        most_zombies = max(most_zombies, run.figures().zombies)
        time.sleep(0.05)
    for worker in workers:
        worker.result()
    after = run.settle()
    assert (after.children, after.zombies) == (0, 0)

    held = [connect_through(run.proxy, loopback(echo_process.port)) for _ in range(HELD)]
    try:
        for sock in held:
            sock.sendall(b"held")
            assert recv_exactly(sock, 4) == b"held"
        assert wait_until(lambda: len(children_of(run.pid)) == HELD)
        served_by = {pid: start_time(pid) for pid in children_of(run.pid)}
        assert run.daemon.stop(signal.SIGTERM) == 0
    finally:
        for sock in held:
            sock.close()
    left = [pid for pid, started in served_by.items() if start_time(pid) == started]
    print(f"forking: {FORKED} children, at most {most_zombies} zombies at a time; {after}")
    assert left == [], "children outlived the daemon"
    assert "cut 20 connection(s) still open" in run.daemon.output()
