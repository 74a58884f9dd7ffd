"""Faults: peers that reset, stall, never answer, vanish or close at the same moment.

Each scenario runs against the real `socks5d` (threading and forking mode; with two
workers too in a full run) and ends by checking that the daemon holds nothing for the
connections it served: descriptors, threads and children back at the baseline.
"""

from __future__ import annotations

import contextlib
import hashlib
import select
import socket
import struct
import threading
import time

import pytest
from clients import (
    TIMEOUT,
    UdpEcho,
    connect_through,
    open_tunnel,
    recv_all,
    recv_exactly,
    wait_until,
)
from streams import MiB, Worker

from socks5d.socks.protocol import (
    Address,
    AddressType,
    Command,
    Reply,
    encode_greeting,
    encode_request,
    encode_udp_datagram,
    parse_udp_datagram,
)

from .support import (
    AFTER_BULK,
    AFTER_HANDLER_THREADS,
    PATTERN,
    SETTLE_AFTER_HANDLER_THREADS,
    PeakSampler,
    echo_round_trip,
    loopback,
    pattern_digest,
    run_daemon,
    scaled,
    send_pattern,
    vanish,
)

pytestmark = pytest.mark.stress


# ---- the target resets ----

RESETS = scaled(ci=20, full=200)
RESET_AFTER = 512 * 1024  # past the 256 KiB after which a direction splices


def test_target_reset_mid_transfer_ends_each_tunnel_with_intact_bytes(
    daemon_factory, tmp_path, target_factory, echo_target, fault_serving
):
    """200 tunnels (CI: 20) whose target sends 512 KiB and then resets (RST) while the
    client still sends: every client sees its tunnel end (EOF or reset, never a hang)
    holding an intact prefix of the target's bytes; every tunnel is logged; descriptors
    and threads back to baseline."""

    def resetter(conn: socket.socket) -> None:
        conn.recv(65536)
        send_pattern(conn, RESET_AFTER)
        vanish(conn)

    target = target_factory(resetter)
    run = run_daemon(daemon_factory, tmp_path, fault_serving, echo_target.port)
    received: list[int] = []
    for _ in range(RESETS):
        with connect_through(run.proxy, loopback(target.port)) as sock:
            sock.sendall(b"go" * 1000)
            data = bytearray()
            try:
                while chunk := sock.recv(MiB):
                    data += chunk
                    sock.send(b"more")  # the client is still sending when the reset comes
            except (ConnectionResetError, BrokenPipeError):
                pass  # the reset passed on as a reset: fine, as long as the tunnel ended
            assert data == PATTERN[: len(data)], "bytes before the reset were corrupted"
            received.append(len(data))
    assert not target.errors
    assert wait_until(
        lambda: sum(f":{target.port} " in line for line in run.daemon.lines) >= RESETS
    )
    after = run.settle(AFTER_BULK)
    print(f"{fault_serving.name}: received {min(received)}-{max(received)} bytes; {after}")


# ---- the target never reads ----

STALLED = scaled(ci=10, full=50)
CHUNK = 64 * 1024


def push_until_blocked(socks: list[socket.socket], limit: int = 64 * MiB) -> list[int]:
    """Write to every socket until none has been writable for a second (or one took
    `limit` bytes); the bytes the kernel took from each."""
    poller = select.poll()
    for sock in socks:
        sock.setblocking(False)
        poller.register(sock, select.POLLOUT)
    chunk, sent = b"s" * CHUNK, [0] * len(socks)
    while max(sent) < limit:
        for index, sock in enumerate(socks):
            with contextlib.suppress(BlockingIOError):
                while sent[index] < limit:
                    sent[index] += sock.send(chunk)
        if not poller.poll(1000):
            break
    return sent


def test_target_that_never_reads_blocks_the_client_and_proxy_memory_stays_bounded(
    daemon_factory, tmp_path, target_factory, echo_target, fault_serving
):
    """50 tunnels (CI: 10) to a target that accepts and never reads: each client's writes
    stop after what the kernel buffers on the way hold (5-6.5 MiB measured: the ends'
    buffers autotune; under 16 MiB asserted) and a further round moves nothing; the
    daemon's memory grows by its 1 MiB copy buffer per stalled tunnel (+1.25 MiB each
    allowed; forking: the child's private pages, ~3.7 MiB, +6 MiB each allowed); once
    the clients close, descriptors, threads and children are back to baseline."""
    release = threading.Event()
    target = target_factory(lambda conn: release.wait(TIMEOUT * 6))
    run = run_daemon(daemon_factory, tmp_path, fault_serving, echo_target.port)
    tunnels: list[socket.socket] = []
    try:
        with PeakSampler(run.pid, fault_serving) as sampler:
            for _ in range(STALLED):
                tunnels.append(connect_through(run.proxy, loopback(target.port)))
            # Again until a round moves nothing: receive windows on the way may still grow.
            pushed, rounds = [0] * STALLED, [push_until_blocked(tunnels)]
            while any(rounds[-1]) and len(rounds) < 10:
                pushed = [total + more for total, more in zip(pushed, rounds[-1], strict=True)]
                rounds.append(push_until_blocked(tunnels))
            assert not any(rounds[-1]), f"the clients could always write more: {rounds}"
    finally:
        for sock in tunnels:
            sock.close()
        release.set()
    growth = sampler.peak_kib - run.baseline.memory_kib
    print(
        f"{fault_serving.name}: pushed {min(pushed) / MiB:.2f}-{max(pushed) / MiB:.2f} MiB "
        f"per tunnel; peak memory +{growth / 1024:.1f} MiB over {STALLED} tunnels"
    )
    assert max(pushed) < 16 * MiB
    per_tunnel = 6 * 1024 if fault_serving.mode == "forking" else 1280
    assert growth < STALLED * per_tunnel + 4096
    run.settle(AFTER_BULK)


# ---- the target never accepts ----

UNANSWERED = scaled(ci=10, full=50)


def test_target_that_never_accepts_gets_reply_04_after_the_connect_timeout(
    daemon_factory, tmp_path, blackhole, echo_target, fault_serving
):
    """50 CONNECTs at once (CI: 10) to a port whose accept queue is full (its SYNs are
    dropped, as a blackholed host's are): each gets reply 04 no sooner than
    timeouts.connect (1 s here) and is closed; then the daemon holds nothing for them."""
    run = run_daemon(
        daemon_factory, tmp_path, fault_serving, echo_target.port, timeouts={"connect": 1.0}
    )

    def attempt() -> tuple[int, float, bytes]:
        begun = time.monotonic()
        sock, reply, _ = open_tunnel(run.proxy, loopback(blackhole))
        with sock:
            return reply, time.monotonic() - begun, recv_all(sock)

    workers = [Worker(attempt) for _ in range(UNANSWERED)]
    for worker in workers:
        worker.start()
    results = [worker.result(TIMEOUT * 3) for worker in workers]
    assert [reply for reply, _, _ in results] == [Reply.HOST_UNREACHABLE] * UNANSWERED
    assert min(elapsed for _, elapsed, _ in results) >= 0.9
    assert all(rest == b"" for _, _, rest in results)  # closed after the reply
    after = run.settle(AFTER_HANDLER_THREADS, SETTLE_AFTER_HANDLER_THREADS)
    print(f"{fault_serving.name}: {UNANSWERED} x reply 04; {after}")


# ---- the client vanishes ----

VANISHINGS = scaled(ci=10, full=100)
GREETING = encode_greeting([0])


def handshake_cuts(echo_port: int) -> dict[str, bytes]:
    """What a client has sent when it vanishes, by phase."""
    by_name = encode_request(
        Command.CONNECT, Address(AddressType.DOMAINNAME, "localhost", echo_port)
    )
    by_ip = encode_request(Command.CONNECT, loopback(echo_port))
    return {
        "nothing": b"",
        "half a greeting": GREETING[:2],
        "a greeting": GREETING,
        "half a request": GREETING + by_ip[:6],
        "a request to an IP": GREETING + by_ip,
        "a request to a name": GREETING + by_name,
    }


def test_client_vanishing_mid_handshake_leaves_nothing_behind(
    daemon_factory, tmp_path, echo_target, fault_serving
):
    """A client that closes (FIN) or resets (RST) after sending nothing, half a greeting, a
    greeting, half a request or a whole request (to an IP, to a name), 100 times each
    (CI: 10): the daemon keeps serving, and its descriptors, threads and children return
    to baseline."""
    run = run_daemon(daemon_factory, tmp_path, fault_serving, echo_target.port)
    for name, sent in handshake_cuts(echo_target.port).items():
        for index in range(VANISHINGS):
            sock = socket.create_connection(run.proxy, timeout=TIMEOUT)
            sock.sendall(sent)
            if index % 2:
                vanish(sock)
            else:
                sock.close()
        assert echo_round_trip(run.proxy, echo_target.port, name.encode()) == name.encode()
    after = run.settle(AFTER_HANDLER_THREADS, SETTLE_AFTER_HANDLER_THREADS)
    print(f"{fault_serving.name}: {after}")


def test_client_vanishing_mid_relay_closes_the_target_side(
    daemon_factory, tmp_path, target_factory, echo_target, fault_serving
):
    """100 tunnels (CI: 10) each streaming from a target as fast as it can send while
    the client sends too, then the client resets: every target sees its connection end
    (no stuck sender), and the daemon's descriptors, threads and children are back
    to baseline."""
    ends: list[str] = []

    def streamer(conn: socket.socket) -> None:
        try:
            while True:
                conn.sendall(PATTERN)
        except TimeoutError:
            ends.append("stuck")  # nobody closed it for TIMEOUT seconds
        except OSError:
            ends.append("ended")

    target = target_factory(streamer)
    run = run_daemon(daemon_factory, tmp_path, fault_serving, echo_target.port)
    tunnels = [connect_through(run.proxy, loopback(target.port)) for _ in range(VANISHINGS)]
    for sock in tunnels:
        sock.sendall(b"u" * 100_000)
        recv_exactly(sock, 256 * 1024)
    for sock in tunnels:
        vanish(sock)
    assert wait_until(lambda: len(ends) == VANISHINGS, TIMEOUT * 2), ends
    assert ends == ["ended"] * VANISHINGS
    run.settle(AFTER_BULK)


def test_client_vanishing_mid_udp_association_frees_the_relay(
    daemon_factory, tmp_path, echo_target, fault_serving
):
    """100 UDP associations (CI: 10), each relaying a datagram both ways and then losing
    its control connection to a reset: the relay socket of each is closed (the daemon's
    descriptors and threads return to baseline) and the daemon keeps serving."""
    run = run_daemon(daemon_factory, tmp_path, fault_serving, echo_target.port)
    udp_echo = UdpEcho()
    try:
        for index in range(VANISHINGS):
            control, reply, relay = open_tunnel(
                run.proxy, Address(AddressType.IPV4, "0.0.0.0", 0), command=Command.UDP_ASSOCIATE
            )
            with control, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
                assert reply == Reply.SUCCEEDED
                client.settimeout(TIMEOUT)
                payload = b"datagram %d" % index
                destination = Address(AddressType.IPV4, *udp_echo.address)
                client.sendto(encode_udp_datagram(destination, payload), (relay.host, relay.port))
                assert parse_udp_datagram(client.recv(65536)).data == payload
                vanish(control)
    finally:
        udp_echo.close()
    assert echo_round_trip(run.proxy, echo_target.port, b"still serving") == b"still serving"
    after = run.settle(AFTER_HANDLER_THREADS, SETTLE_AFTER_HANDLER_THREADS)
    print(f"{fault_serving.name}: {after}")


# ---- both sides close at once ----

CROSSINGS = scaled(ci=50, full=500)
HEADER = struct.Struct("!III")  # tunnel index, bytes up, bytes down


def test_both_sides_half_closing_at_once_deliver_everything_both_ways(
    daemon_factory, tmp_path, target_factory, echo_target, fault_serving
):
    """500 tunnels (CI: 50) where client and target each send 0-128 KiB and shut down
    writing at the same moment (a barrier between the two threads): each side receives
    exactly the other's bytes, then EOF; every tunnel ends; descriptors, threads
    and children back to baseline."""
    barriers: dict[int, threading.Barrier] = {}
    target_got: dict[int, str] = {}

    def crossing(conn: socket.socket) -> None:
        index, up, down = HEADER.unpack(recv_exactly(conn, HEADER.size))
        barriers[index].wait(TIMEOUT)
        conn.sendall(PATTERN[:down])
        conn.shutdown(socket.SHUT_WR)
        got = recv_all(conn)
        target_got[index] = "ok" if got == PATTERN[-up:][:up] else f"{len(got)} of {up}"

    target = target_factory(crossing)
    run = run_daemon(daemon_factory, tmp_path, fault_serving, echo_target.port)
    sizes = [(index * 7919 % 131072, index * 104729 % 131072) for index in range(CROSSINGS)]
    client_got: list[str] = []
    for index, (up, down) in enumerate(sizes):
        barriers[index] = threading.Barrier(2)
        with connect_through(run.proxy, loopback(target.port)) as sock:
            sock.sendall(HEADER.pack(index, up, down))
            barriers[index].wait(TIMEOUT)
            sock.sendall(PATTERN[-up:][:up])
            sock.shutdown(socket.SHUT_WR)
            got = recv_all(sock)
            client_got.append("ok" if got == PATTERN[:down] else f"{len(got)} of {down}")
    assert client_got == ["ok"] * CROSSINGS
    assert wait_until(lambda: len(target_got) == CROSSINGS)
    assert sorted(target_got.values()) == ["ok"] * CROSSINGS
    assert not target.errors
    after = run.settle(AFTER_BULK)
    print(f"{fault_serving.name}: {CROSSINGS} crossings; {after}")


# ---- a slow reader ----

SLOW_DOWNLOAD = scaled(ci=24, full=200) * MiB
READ_SIZE = 64 * 1024


def read_slowly(sock: socket.socket, pause: float) -> tuple[str, int]:
    """Read to EOF, READ_SIZE bytes at a time with a pause after each: the sha256 and
    length of what arrived."""
    digest, total, buffer = hashlib.sha256(), 0, bytearray(READ_SIZE)
    while count := sock.recv_into(buffer):
        digest.update(memoryview(buffer)[:count])
        total += count
        time.sleep(pause)
    return digest.hexdigest(), total


def test_slow_reader_of_a_large_download_gets_every_byte_in_flat_memory(
    daemon_factory, tmp_path, target_factory, echo_target, fault_serving
):
    """A client reading 200 MiB (CI: 24 MiB) at under 6 MiB/s from a target that sends
    as fast as it can: the sha256 of what arrives is the sha256 of what was sent, and
    the daemon's memory (forked children's private pages included) never rises more than
    8 MiB above its baseline while it does."""
    target = target_factory(lambda conn: send_pattern(conn, SLOW_DOWNLOAD))
    run = run_daemon(daemon_factory, tmp_path, fault_serving, echo_target.port)
    with PeakSampler(run.pid, fault_serving) as sampler:
        with connect_through(run.proxy, loopback(target.port)) as sock:
            digest, total = read_slowly(sock, 0.01)  # 6 MiB/s at most
    growth = sampler.peak_kib - run.baseline.memory_kib
    print(f"{fault_serving.name}: {total / MiB:.0f} MiB, peak memory +{growth / 1024:.1f} MiB")
    assert (digest, total) == (pattern_digest(SLOW_DOWNLOAD), SLOW_DOWNLOAD)
    assert not target.errors
    assert sampler.samples >= 10 and growth < 8 * 1024
    run.settle(AFTER_BULK)
