"""The benchmark client: a raw SOCKS5 CONNECT and the per-process work of each scenario.

The functions ending in ``_task`` run in the harness's worker processes (one process per
stream, so parallel streams are not serialised by one GIL) and return plain dicts. Each
socket operation has a timeout and each loop a bound in count and time.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct
import threading
import time
from collections import Counter
from typing import Any

from bench.targets import (
    ARC_RESPONSE,
    HEADER,
    PATTERN_SIZE,
    VERDICT,
    pattern,
    recv_exactly,
    recv_verified,
    send_pattern,
)

Address = tuple[str, int]
TIMEOUT = 30.0


class SocksError(Exception):
    """The proxy answered, but not with success: ``kind`` names the failure for counting."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


def socks5_connect(proxy: Address, target: Address, timeout: float = TIMEOUT) -> socket.socket:
    """Open a tunnel to ``target`` (an IPv4 address) through ``proxy``, no authentication.

    Greeting and request are sent one after the other, each after its answer, as ordinary
    clients do (RFC 1928 §3, §4, §6); the reply's BND address is read whole, however split.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.connect(proxy)
        sock.sendall(b"\x05\x01\x00")  # VER NMETHODS METHODS=[no auth]
        if recv_exactly(sock, 2) != b"\x05\x00":
            raise SocksError("method-refused")
        # VER CMD=CONNECT RSV ATYP=IPv4 DST.ADDR DST.PORT
        sock.sendall(
            b"\x05\x01\x00\x01" + socket.inet_aton(target[0]) + struct.pack("!H", target[1])
        )
        version, reply, _, atyp = recv_exactly(sock, 4)
        if version != 5:
            raise SocksError("bad-reply")
        if atyp == 1:
            recv_exactly(sock, 4 + 2)
        elif atyp == 4:
            recv_exactly(sock, 16 + 2)
        elif atyp == 3:
            recv_exactly(sock, recv_exactly(sock, 1)[0] + 2)
        else:
            raise SocksError("bad-reply")
        if reply != 0:
            raise SocksError(f"reply-{reply:02x}")
    except BaseException:
        sock.close()
        raise
    return sock


def open_connection(
    proxy: Address | None, target: Address, timeout: float = TIMEOUT
) -> socket.socket:
    """Through the proxy, or straight to the target when ``proxy`` is None (the direct run)."""
    if proxy is not None:
        return socks5_connect(proxy, target, timeout)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.connect(target)
    except BaseException:
        sock.close()
        raise
    return sock


def failure_kind(exc: BaseException) -> str:
    """A short name for counting failures by kind (refused, timeout, reset, reply-05, ...)."""
    if isinstance(exc, SocksError):
        return exc.kind
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, EOFError):
        return "eof"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, ConnectionResetError):
        return "reset"
    if isinstance(exc, BrokenPipeError):
        return "broken-pipe"
    if isinstance(exc, OSError) and exc.errno is not None:
        return errno.errorcode.get(exc.errno, str(exc.errno)).lower()
    return type(exc).__name__


def _cpu_now() -> float:
    times = os.times()
    return times.user + times.system


def stream_task(
    proxy: Address | None,
    target: Address,
    direction: str,
    size: int,
    max_seconds: float,
) -> dict[str, Any]:
    """One download or upload stream of ``size`` bytes, verified by count and content."""
    start, cpu = time.monotonic(), _cpu_now()
    deadline = start + max_seconds
    result: dict[str, Any] = {"bytes": 0, "error": None}
    try:
        with open_connection(proxy, target) as sock:
            sock.sendall(HEADER.pack(size))
            if direction == "down":
                got, bad = recv_verified(sock, size, bytearray(PATTERN_SIZE), deadline)
            else:
                send_pattern(sock, size, deadline)
                got, bad = VERDICT.unpack(recv_exactly(sock, VERDICT.size))
            result["bytes"] = got
            if got != size:
                result["error"] = f"short: {got} of {size} bytes"
            elif bad >= 0:
                result["error"] = f"corrupt: wrong bytes in the block at offset {bad}"
    except (OSError, EOFError, SocksError) as exc:
        result["error"] = f"{failure_kind(exc)}: {exc}"
    result.update(start=start, end=time.monotonic(), cpu=_cpu_now() - cpu)
    return result


def _one_short_connection(proxy: Address | None, target: Address, timeout: float) -> None:
    """CONNECT, read the target's whole response until the tunnel closes, close."""
    with open_connection(proxy, target, timeout) as sock:
        data = bytearray()
        for _ in range(64):
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
        if bytes(data) != ARC_RESPONSE:
            raise SocksError("bad-data" if data else "eof")


def connrate_task(
    proxy: Address | None,
    target: Address,
    threads: int,
    start_at: float,
    duration: float,
    timeout: float = 10.0,
    max_per_thread: int = 1_000_000,
) -> dict[str, Any]:
    """``threads`` loops of short connections from ``start_at`` for ``duration`` seconds."""
    lock = threading.Lock()
    done = [0]
    failures: Counter[str] = Counter()
    ends: list[float] = []
    deadline = start_at + duration

    def loop() -> None:
        ok, failed = 0, Counter[str]()
        while time.monotonic() < start_at:
            time.sleep(min(0.01, max(0.0, start_at - time.monotonic())))
        for _ in range(max_per_thread):
            if time.monotonic() >= deadline:
                break
            try:
                _one_short_connection(proxy, target, timeout)
                ok += 1
            except (OSError, EOFError, SocksError) as exc:
                failed[failure_kind(exc)] += 1
        with lock:
            done[0] += ok
            failures.update(failed)
            ends.append(time.monotonic())

    cpu = _cpu_now()
    workers = [threading.Thread(target=loop, daemon=True) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(duration + timeout + 60)
    return {
        "connections": done[0],
        "failures": dict(failures),
        "start": start_at,
        "end": max(ends, default=time.monotonic()),
        "cpu": _cpu_now() - cpu,
    }


def latency_task(
    proxy: Address | None,
    target: Address,
    count: int,
    max_seconds: float,
    cpu: int | None = None,
    warmup: int = 50,
) -> dict[str, Any]:
    """64-byte ping-pong on one tunnel: round-trip times in microseconds, sorted."""
    previous = os.sched_getaffinity(0)
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    rtts: list[float] = []
    error = None
    message = bytes(range(64))
    try:
        with open_connection(proxy, target, 10.0) as sock:
            deadline = time.monotonic() + max_seconds
            for index in range(warmup + count):
                began = time.perf_counter_ns()
                sock.sendall(message)
                if recv_exactly(sock, 64) != message:
                    raise SocksError("bad-data")
                if index >= warmup:
                    rtts.append((time.perf_counter_ns() - began) / 1000)
                if time.monotonic() > deadline:
                    break
    except (OSError, EOFError, SocksError) as exc:
        error = f"{failure_kind(exc)}: {exc}"
    finally:
        os.sched_setaffinity(0, previous)
    rtts.sort()
    return {"rtts_us": rtts, "error": error}


def open_idle_tunnels(
    proxy: Address, target: Address, count: int, max_seconds: float
) -> tuple[list[socket.socket], Counter[str]]:
    """Open ``count`` tunnels to the echo target, each proven by a 16-byte round trip."""
    tunnels: list[socket.socket] = []
    failures: Counter[str] = Counter()
    deadline = time.monotonic() + max_seconds
    for index in range(count):
        if time.monotonic() > deadline:
            failures["harness-deadline"] += count - index
            break
        try:
            sock = socks5_connect(proxy, target, 10.0)
        except (OSError, EOFError, SocksError) as exc:
            failures[failure_kind(exc)] += 1
            continue
        probe = index.to_bytes(16, "big")
        try:
            sock.sendall(probe)
            if recv_exactly(sock, 16) != probe:
                raise SocksError("bad-data")
        except (OSError, EOFError, SocksError) as exc:
            failures[failure_kind(exc)] += 1
            sock.close()
            continue
        tunnels.append(sock)
    return tunnels, failures


def close_all(sockets: list[socket.socket]) -> None:
    """Close every socket, ignoring errors (cleanup must not fail)."""
    for sock in sockets:
        with contextlib.suppress(OSError):
            sock.close()


def verify_speed_mib_s(seconds: float = 0.3) -> float:
    """Single-core speed of the content check (one memcmp per block), printed with results."""
    expected, block = pattern(), bytearray(pattern())
    done, began = 0, time.perf_counter()
    while time.perf_counter() - began < seconds and done < 1_000_000:
        if block != expected:
            raise AssertionError("the pattern differs from itself")
        done += 1
    return done * PATTERN_SIZE / (1 << 20) / (time.perf_counter() - began)
