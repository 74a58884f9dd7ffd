"""What the reliability scenarios share: their sizes, the daemon under test, /proc figures.

Sizes: every scenario has a CI size (the default, small enough that the whole `pytest`
run stays within its budget) and a full size, run with ``SOCKS5D_STRESS=full``.

The daemon is the real `socks5d` command (tests/conftest.py's DaemonProcess) with a
config file written here: threading mode, forking mode, or threading with two workers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clients import TIMEOUT, children_of, connect_through, recv_exactly, wait_until

from socks5d.socks.protocol import Address, AddressType

ROOT = Path(__file__).resolve().parent.parent.parent

STRESS_FULL = os.environ.get("SOCKS5D_STRESS", "").strip().lower() == "full"


def scaled(ci: int, full: int) -> int:
    """The count a scenario uses: `full` under SOCKS5D_STRESS=full, else the CI subset."""
    return full if STRESS_FULL else ci


# Limits the suite's daemons run with instead of the defaults. Empty: the defaults, whose
# "auto" limits (no per-address cap while every listener is loopback-only, max_connections
# from RLIMIT_NOFILE) take this load from one client address. Under the old fixed defaults
# (64 per address, 1024 in all) it was {"max_connections_per_ip": 0, "max_connections":
# 100_000}; put that back to run the suite against a daemon that has them.
DEFAULT_LIMITS_WORKAROUND: dict[str, Any] = {}


@dataclass(frozen=True)
class Serving:
    """How the daemon serves: its mode and number of worker processes."""

    name: str
    mode: str
    workers: int = 1


SERVINGS = (
    Serving("threading", "threading"),
    Serving("forking", "forking"),
    Serving("workers2", "threading", workers=2),
)
# Fault scenarios: workers run threading mode's code, so CI runs them in the two modes and
# the full run in all three.
FAULT_SERVINGS = SERVINGS if STRESS_FULL else SERVINGS[:2]


def loopback(port: int) -> Address:
    return Address(AddressType.IPV4, "127.0.0.1", port)


def config_text(serving: Serving, **sections: Any) -> str:
    """A config file: `serving`'s mode and workers, DEFAULT_LIMITS_WORKAROUND, `sections`.

    A section is a dict of keys (``timeouts={"connect": 1}``) or, for arrays of tables
    (``users=[{...}]``, ``rules=[{...}]``), a list of dicts. JSON spells every value
    these tests use the way TOML does.
    """
    tables: dict[str, Any] = {
        "server": {"port": 0, "mode": serving.mode, "workers": serving.workers},
    }
    if DEFAULT_LIMITS_WORKAROUND:
        tables["limits"] = dict(DEFAULT_LIMITS_WORKAROUND)
    for name, values in sections.items():
        if isinstance(values, list):
            tables[name] = values
        else:
            tables.setdefault(name, {}).update(values)
    lines: list[str] = []
    for name, values in tables.items():
        for header, table in (
            [(f"[[{name}]]", table) for table in values]  # an array of tables
            if isinstance(values, list)
            else [(f"[{name}]", values)]
        ):
            lines += [header, *(f"{key} = {json.dumps(value)}" for key, value in table.items())]
    return "\n".join(lines) + "\n"


def start_daemon(
    daemon_factory: Callable[..., Any], tmp_path: Path, serving: Serving, **sections: Any
) -> Any:
    """The real `socks5d` on 127.0.0.1, port 0, with config_text(serving, **sections)."""
    config = tmp_path / f"{serving.name}.toml"
    config.write_text(config_text(serving, **sections))
    daemon = daemon_factory("--config", str(config))
    if serving.workers > 1:
        pid = proc_pid(daemon.proc.pid)
        assert wait_until(lambda: len(children_of(pid)) == serving.workers)
    return daemon


# ---- /proc figures ----


def _status(pid: int) -> dict[str, str]:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:  # gone meanwhile
        return {}
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


def _fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def proc_pid(pid: int) -> int:
    """`pid` (of a child of this process) as /proc names it. Inside the netns helper's PID
    namespace /proc is still the host's, where the child has another number: its NSpid
    line pairs the two."""
    me = int(os.readlink("/proc/self"))
    if me == os.getpid():
        return pid
    for task in os.listdir(f"/proc/{me}/task"):
        for child in Path(f"/proc/{me}/task/{task}/children").read_text().split():
            if _status(int(child)).get("NSpid", "").split()[-1:] == [str(pid)]:
                return int(child)
    raise LookupError(f"no child {pid} in /proc")


def is_zombie(pid: int) -> bool:
    return _status(pid).get("State", "").strip().startswith("Z")


@dataclass(frozen=True)
class Figures:
    """What the daemon holds: summed over its serving processes (the daemon, or its
    workers and their supervisor); `children` are per-client forked processes."""

    fds: int
    threads: int
    rss_kib: int
    children: int
    zombies: int
    children_private_kib: int = 0

    @property
    def memory_kib(self) -> int:
        """The daemon's RSS and its forked children's private memory."""
        return self.rss_kib + self.children_private_kib

    def __str__(self) -> str:
        return (
            f"fds={self.fds} threads={self.threads} rss={self.rss_kib / 1024:.1f}MiB "
            f"children={self.children} ({self.children_private_kib / 1024:.1f}MiB) "
            f"zombies={self.zombies}"
        )


def serving_pids(pid: int, serving: Serving) -> list[int]:
    return [pid, *children_of(pid)] if serving.workers > 1 else [pid]


def client_children(pid: int, serving: Serving) -> list[int]:
    """The per-client processes of forking mode (none in threading mode)."""
    if serving.mode != "forking":
        return []
    return [child for server in serving_pids(pid, serving) for child in children_of(server)]


def _rss_kib(status: dict[str, str]) -> int:
    return int(status.get("VmRSS", "0 kB").split()[0])


def _private_kib(pid: int) -> int:
    """Memory only this process holds (a forked child's RSS counts the pages it still
    shares with its parent; these are the ones it has written to)."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0
    return sum(
        int(line.split()[1])
        for line in text.splitlines()
        if line.startswith(("Private_Clean:", "Private_Dirty:"))
    )


def figures(pid: int, serving: Serving) -> Figures:
    fds = threads = rss = 0
    for server in serving_pids(pid, serving):
        status = _status(server)
        fds += _fd_count(server)
        threads += int(status.get("Threads", "0"))
        rss += _rss_kib(status)
    children = client_children(pid, serving)
    children_private = sum(map(_private_kib, children))
    return Figures(
        fds, threads, rss, len(children), sum(map(is_zombie, children)), children_private
    )


@dataclass(frozen=True)
class Margin:
    """How far above the baseline the daemon may stay once the load is gone (RSS None:
    not compared)."""

    fds: int = 3
    threads: int = 2
    rss_kib: int | None = 16 * 1024


# After bulk transfers only descriptors, threads and children must come back: the relay's
# 1 MiB buffers are freed, but glibc keeps the memory for the next ones (RSS after 100
# stalled tunnels: +127 MiB, the same after each of 5 rounds: kept, not leaked). The
# scenarios about memory bound the peak instead.
AFTER_BULK = Margin(rss_kib=None)


# Handshakes the relay loop does not finish itself (a login, a name, an error, EOF) go to
# a pool of handler threads, which keep up to 32 idle threads for 60 s after use. A CI
# run allows for them; a full run waits until they have gone.
AFTER_HANDLER_THREADS = Margin(threads=2 if STRESS_FULL else 34)
SETTLE_AFTER_HANDLER_THREADS = 90.0 if STRESS_FULL else 30.0


def settle(
    pid: int, serving: Serving, baseline: Figures, margin: Margin = Margin(), timeout: float = 60
) -> Figures:
    """Poll until the daemon is back within `margin` of `baseline` and has no child left;
    return the figures it settled at (an AssertionError says where it stuck)."""
    latest = [baseline]

    def back() -> bool:
        now = latest[0] = figures(pid, serving)
        return (
            now.fds <= baseline.fds + margin.fds
            and now.threads <= baseline.threads + margin.threads
            and (margin.rss_kib is None or now.rss_kib <= baseline.rss_kib + margin.rss_kib)
            and now.children == 0
        )

    assert wait_until(back, timeout), f"not back to baseline ({baseline}): {latest[0]}"
    return latest[0]


@dataclass
class Running:
    """A daemon under test and its baseline, read once it has warmed up."""

    daemon: Any
    serving: Serving
    baseline: Figures
    pid: int  # as /proc names it (see proc_pid)

    @property
    def proxy(self) -> tuple[str, int]:
        return ("127.0.0.1", self.daemon.port)

    def figures(self) -> Figures:
        return figures(self.pid, self.serving)

    def settle(self, margin: Margin = Margin(), timeout: float = 60) -> Figures:
        return settle(self.pid, self.serving, self.baseline, margin, timeout)


def run_daemon(
    daemon_factory: Callable[..., Any],
    tmp_path: Path,
    serving: Serving,
    echo_port: int,
    warm_up: int = 20,
    credentials: tuple[bytes, bytes] | None = None,
    **sections: Any,
) -> Running:
    """start_daemon(), then `warm_up` short tunnels to the echo target on `echo_port` (the
    daemon loads its code paths and fills its caches), then the baseline."""
    daemon = start_daemon(daemon_factory, tmp_path, serving, **sections)
    proxy = ("127.0.0.1", daemon.port)
    for index in range(warm_up):
        payload = b"warm-up %d " % index * 50
        assert echo_round_trip(proxy, echo_port, payload, credentials) == payload
    pid = proc_pid(daemon.proc.pid)
    return Running(daemon, serving, settle(pid, serving, figures(pid, serving), timeout=30), pid)


# ---- clients and targets ----


def echo_round_trip(
    proxy: tuple[str, int],
    port: int,
    payload: bytes,
    credentials: tuple[bytes, bytes] | None = None,
) -> bytes:
    """One short tunnel: send `payload` to an echo target, read it back, close."""
    with connect_through(proxy, loopback(port), credentials) as sock:
        sock.sendall(payload)
        return recv_exactly(sock, len(payload))


class EchoProcess:
    """bench/targets.py's echo target in a process of its own: one selector loop serves
    thousands of tunnels, and its work does not compete with the test for the GIL."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "bench" / "targets.py"), "echo"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], TIMEOUT)
        line = self.proc.stdout.readline() if ready else ""
        if not line.strip().isdigit():
            self.close()
            raise AssertionError(f"the echo target did not start: {line!r}")
        self.port = int(line)

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()  # EOF on its stdin: it exits
        try:
            self.proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(TIMEOUT)


class PeakSampler:
    """Reads the daemon's figures every `interval` seconds in a thread, keeping the peak
    memory (Figures.memory_kib) until the `with` block ends."""

    def __init__(self, pid: int, serving: Serving, interval: float = 0.1) -> None:
        self.pid, self.serving, self.interval = pid, serving, interval
        self.peak_kib = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            now = figures(self.pid, self.serving)
            self.peak_kib = max(self.peak_kib, now.memory_kib)
            self.samples += 1

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(TIMEOUT)


# A block that is not a power of two long, so its period never lines up with a buffer
# size: a dropped or repeated buffer changes the digest.
PATTERN = random.Random(1928).randbytes((1 << 20) + 4093)


def pattern_digest(size: int) -> str:
    """sha256 of the first `size` bytes of the repeated PATTERN."""
    digest = hashlib.sha256()
    for offset in range(0, size, len(PATTERN)):
        digest.update(PATTERN[: min(len(PATTERN), size - offset)])
    return digest.hexdigest()


def send_pattern(conn: socket.socket, size: int, pause: float = 0.0) -> None:
    """Send the first `size` bytes of the repeated PATTERN, at most 1 MiB per sendall,
    sleeping `pause` seconds after each (a paced source)."""
    view, sent = memoryview(PATTERN), 0
    while sent < size:
        offset = sent % len(PATTERN)
        piece = view[offset : offset + min(1 << 20, len(PATTERN) - offset, size - sent)]
        conn.sendall(piece)
        sent += len(piece)
        if pause:
            time.sleep(pause)


def vanish(sock: socket.socket) -> None:
    """Close with a reset (SO_LINGER 0): the peer gets RST, not FIN, as when a client
    crashes or its host drops off the network."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
