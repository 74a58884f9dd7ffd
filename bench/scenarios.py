"""The scenarios: one measured run of one scenario against one endpoint (a proxy or direct).

A :class:`Harness` owns the client worker processes and the target processes for the whole
benchmark; each ``run_*`` function snapshots the proxy tree's CPU time from /proc around the
work and returns a :class:`Sample` with the raw figures (medians are the report's job).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import client, procfs
from bench.proxies import stop_process, track
from bench.targets import KINDS

Address = tuple[str, int]
MiB = 1 << 20
GiB = 1 << 30
TARGET_WORKERS = {"source": 2, "sink": 2, "echo": 1, "arc": 2}


@dataclass(frozen=True)
class Endpoint:
    """Where the client connects: a proxy (address and root PID) or, for direct, nothing."""

    name: str
    address: Address | None = None
    pid: int | None = None


@dataclass
class Sample:
    """One run's raw figures; ``metrics`` maps a metric name to its value."""

    round: int
    scenario: str
    case: str
    proxy: str
    metrics: dict[str, float] = field(default_factory=dict)
    proxy_cpu_s: float | None = None
    client_cpu_s: float | None = None
    target_cpu_s: float | None = None
    wall_s: float = 0.0
    failures: dict[str, int] = field(default_factory=dict)
    error: str | None = None


class Harness:
    """Client worker processes plus target processes, started once and reused by every run."""

    def __init__(self, workers: int, pin: bool = False) -> None:
        self.workers = workers
        self.pin = pin
        # fork: workers start fast and share the imported modules; they are made before any
        # target or proxy exists, so they hold none of their descriptors.
        self.pool = ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("fork"), initializer=_ignore_sigint
        )
        list(self.pool.map(time.sleep, [0.05] * workers))  # start every worker now
        self.targets: dict[str, tuple[Address, subprocess.Popen[bytes]]] = {}

    def start_targets(self) -> None:
        """One process (tree) per kind of target, each on its own free port."""
        script = Path(__file__).resolve().parent / "targets.py"
        for kind in KINDS:
            process = subprocess.Popen(
                [sys.executable, str(script), kind, "--workers", str(TARGET_WORKERS[kind])],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                start_new_session=True,
            )
            track(process)
            assert process.stdout is not None
            line = process.stdout.readline().strip()  # the port, or EOF if it failed
            if not line.isdigit():
                raise RuntimeError(f"target {kind} did not start")
            self.targets[kind] = (("127.0.0.1", int(line)), process)

    def target(self, kind: str) -> Address:
        return self.targets[kind][0]

    def target_cpu(self) -> float:
        return sum(procfs.tree_cpu_seconds(proc.pid) for _, proc in self.targets.values())

    def close(self, interrupted: bool = False) -> None:
        """Stop targets and client workers by PID; interrupted: do not wait for running work."""
        for _, process in self.targets.values():
            stop_process(process, grace=2.0)
        self.targets.clear()
        workers = list(getattr(self.pool, "_processes", {}) or {})
        self.pool.shutdown(wait=not interrupted, cancel_futures=True)
        if interrupted:
            for pid in workers:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGTERM)


def _ignore_sigint() -> None:
    """Ctrl-C reaches the whole foreground group: only the harness reacts, then stops us."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _proxy_cpu(endpoint: Endpoint) -> float | None:
    return procfs.tree_cpu_seconds(endpoint.pid) if endpoint.pid else None


def _delta(after: float | None, before: float | None) -> float | None:
    return None if after is None or before is None else after - before


class _Meter:
    """CPU of proxy and targets and wall time around a block of work."""

    def __init__(self, harness: Harness, endpoint: Endpoint, sample: Sample) -> None:
        self.harness, self.endpoint, self.sample = harness, endpoint, sample

    def __enter__(self) -> _Meter:
        self.proxy = _proxy_cpu(self.endpoint)
        self.targets = self.harness.target_cpu()
        self.began = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        self.sample.wall_s = time.monotonic() - self.began
        self.sample.proxy_cpu_s = _delta(_proxy_cpu(self.endpoint), self.proxy)
        self.sample.target_cpu_s = self.harness.target_cpu() - self.targets


def run_throughput(
    harness: Harness, endpoint: Endpoint, rnd: int, direction: str, streams: int, total: int
) -> Sample:
    """``streams`` parallel streams (one worker process each) moving ``total`` bytes in all."""
    sample = Sample(rnd, "throughput", f"{direction} x{streams}", endpoint.name)
    size = max(1, total // streams)
    target = harness.target("source" if direction == "down" else "sink")
    limit = 60.0 + total / MiB  # at least 1 MiB/s, or the run is cut
    with _Meter(harness, endpoint, sample):
        futures = [
            harness.pool.submit(
                client.stream_task, endpoint.address, target, direction, size, limit
            )
            for _ in range(streams)
        ]
        results = [future.result(timeout=limit + 60) for future in futures]
    moved = sum(result["bytes"] for result in results)
    span = max(r["end"] for r in results) - min(r["start"] for r in results)
    sample.client_cpu_s = sum(result["cpu"] for result in results)
    errors = [result["error"] for result in results if result["error"]]
    if errors:
        sample.error = f"{len(errors)}/{streams} streams failed: {errors[0]}"
        sample.failures = dict(Counter(error.split(":")[0] for error in errors))
        return sample
    sample.metrics["MiB/s"] = moved / MiB / span
    sample.metrics["bytes"] = moved
    if sample.proxy_cpu_s is not None:
        sample.metrics["cpu s/GiB"] = sample.proxy_cpu_s / (moved / GiB)
    sample.metrics["client+target cpu s/GiB"] = (
        sample.client_cpu_s + (sample.target_cpu_s or 0.0)
    ) / (moved / GiB)
    return sample


def run_connrate(
    harness: Harness, endpoint: Endpoint, rnd: int, concurrency: int, duration: float
) -> Sample:
    """``concurrency`` loops of connect-handshake-read-close, spread over the worker processes."""
    sample = Sample(rnd, "connrate", f"c={concurrency}", endpoint.name)
    processes = min(concurrency, harness.workers)
    shares = [concurrency // processes + (i < concurrency % processes) for i in range(processes)]
    target = harness.target("arc")
    with _Meter(harness, endpoint, sample):
        start_at = time.monotonic() + 0.2
        futures = [
            harness.pool.submit(
                client.connrate_task, endpoint.address, target, share, start_at, duration
            )
            for share in shares
        ]
        results = [future.result(timeout=duration + 120) for future in futures]
    connections = sum(result["connections"] for result in results)
    failures: Counter[str] = Counter()
    for result in results:
        failures.update(result["failures"])
    sample.failures = dict(failures)
    sample.client_cpu_s = sum(result["cpu"] for result in results)
    span = max(result["end"] for result in results) - start_at
    if connections == 0:
        sample.error = f"no connection succeeded: {dict(failures)}"
        return sample
    sample.metrics["conn/s"] = connections / span
    sample.metrics["connections"] = connections
    sample.metrics["failed"] = sum(failures.values())
    if sample.proxy_cpu_s is not None:
        sample.metrics["cpu us/conn"] = sample.proxy_cpu_s / connections * 1e6
    return sample


def _percentile(ordered: list[float], fraction: float) -> float:
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def run_latency(
    harness: Harness, endpoint: Endpoint, rnd: int, count: int, max_seconds: float
) -> Sample:
    """64-byte ping-pong; with ``harness.pin`` client, proxy and echo all share CPU 0."""
    sample = Sample(rnd, "latency", "64 B ping-pong", endpoint.name)
    echo_pid = harness.targets["echo"][1].pid
    everywhere = os.sched_getaffinity(0)
    if harness.pin:
        for pid in filter(None, (endpoint.pid, echo_pid)):
            procfs.set_tree_affinity(pid, {0})
    try:
        with _Meter(harness, endpoint, sample):
            future = harness.pool.submit(
                client.latency_task,
                endpoint.address,
                harness.target("echo"),
                count,
                max_seconds,
                0 if harness.pin else None,
            )
            result = future.result(timeout=max_seconds + 60)
    finally:
        if harness.pin:
            for pid in filter(None, (endpoint.pid, echo_pid)):
                procfs.set_tree_affinity(pid, everywhere)
    rtts = result["rtts_us"]
    if result["error"] or not rtts:
        sample.error = result["error"] or "no round trip"
        return sample
    sample.metrics.update(
        {
            "p50 us": _percentile(rtts, 0.50),
            "p90 us": _percentile(rtts, 0.90),
            "p99 us": _percentile(rtts, 0.99),
            "max us": rtts[-1],
            "pings": len(rtts),
        }
    )
    if sample.proxy_cpu_s is not None:
        sample.metrics["cpu us/ping"] = sample.proxy_cpu_s / len(rtts) * 1e6
    return sample


def _settle(port: int, max_seconds: float = 10.0) -> int:
    """Wait (bounded) until no connection to the proxy's port is left open; return how many are.

    Connections, not threads or processes: a proxy may keep idle ones for later clients.
    """
    deadline = time.monotonic() + max_seconds
    while (left := procfs.tcp_connections(port)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def run_idle(harness: Harness, endpoint: Endpoint, rnd: int, tunnels: int) -> Sample:
    """K verified idle tunnels: the proxy tree's RSS/PSS growth per tunnel, threads, processes."""
    sample = Sample(rnd, "idle", f"K={tunnels}", endpoint.name)
    if endpoint.address is None or endpoint.pid is None:
        sample.error = "no proxy"
        return sample
    before = procfs.tree_memory(endpoint.pid)
    opened: list[Any] = []
    try:
        with _Meter(harness, endpoint, sample):
            opened, failures = client.open_idle_tunnels(
                endpoint.address, harness.target("echo"), tunnels, max_seconds=120.0 + tunnels / 10
            )
        time.sleep(0.2)  # let lazily started threads or children finish starting
        after = procfs.tree_memory(endpoint.pid)
    finally:
        client.close_all(opened)
    sample.failures = dict(failures)
    left = _settle(endpoint.address[1])
    if not opened:
        sample.error = f"no tunnel opened: {dict(failures)}"
        return sample
    count = len(opened)
    sample.metrics.update(
        {
            "tunnels": count,
            "tunnels/s": count / sample.wall_s if sample.wall_s else 0.0,
            "rss KiB/tunnel": (after.rss_kib - before.rss_kib) / count,
            "pss KiB/tunnel": (after.pss_kib - before.pss_kib) / count,
            "threads": after.threads,
            "processes": after.processes,
            "baseline rss KiB": before.rss_kib,
            "baseline pss KiB": before.pss_kib,
            "baseline threads": before.threads,
            "baseline processes": before.processes,
        }
    )
    if sample.proxy_cpu_s is not None:
        sample.metrics["cpu us/tunnel"] = sample.proxy_cpu_s / count * 1e6
    if failures:
        sample.error = f"{sum(failures.values())} of {tunnels} tunnels failed: {dict(failures)}"
    if left:
        sample.failures["still-open-10s-after-close"] = left
    return sample
