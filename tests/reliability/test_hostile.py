"""Hostile input: a seeded fuzzer against the live daemon, and slowloris clients.

The fuzzer runs in a private network namespace (tests/netns.py): a mutated request may
name any host, and a name the daemon tries to resolve there fails at once instead of
becoming a DNS query on the real network. Its rules allow the namespace's own echo
targets only, so no mutation reaches anything else even inside it.
"""

from __future__ import annotations

import collections
import random
import select
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from clients import TIMEOUT, UdpEcho, connect_through, open_tunnel, recv_exactly
from netns import call_in_netns, needs_netns, netns_only

from socks5d.socks.protocol import (
    Address,
    AddressType,
    Command,
    Reply,
    encode_greeting,
    encode_request,
    encode_udp_datagram,
    encode_username_password,
    parse_udp_datagram,
)

from .support import (
    AFTER_HANDLER_THREADS,
    SERVINGS,
    SETTLE_AFTER_HANDLER_THREADS,
    STRESS_FULL,
    echo_round_trip,
    loopback,
    run_daemon,
    scaled,
    vanish,
)

pytestmark = pytest.mark.stress

FUZZ_CASES = scaled(ci=1000, full=20_000)
CHECK_EVERY = scaled(ci=250, full=1000)
UDP_CASES = FUZZ_CASES // 4
SEED = 1928
CREDENTIALS = (b"fuzzer", b"fuzzer-pw")
CASE_TIMEOUT = 5.0  # after the client's EOF, the daemon must close within this


# ---- building cases ----


def random_address(rng: random.Random, echo_port: int) -> Address:
    """Mostly the echo target (so valid requests get far), sometimes anything."""
    port = echo_port if rng.random() < 0.6 else rng.randrange(65536)
    return rng.choice(
        [
            Address(AddressType.IPV4, "127.0.0.1", port),
            Address(AddressType.IPV6, "::1", port),
            Address(AddressType.DOMAINNAME, "localhost", port),
            Address(AddressType.IPV4, ".".join(str(rng.randrange(256)) for _ in "...."), port),
            Address(AddressType.DOMAINNAME, f"h{rng.randrange(10**6)}.example", port),
            Address(AddressType.IPV4, "0.0.0.0", 0),
        ]
    )


def valid_handshake(rng: random.Random, echo_port: int, login: bool) -> list[bytes]:
    """Greeting, login (when the daemon wants one), request, and maybe pipelined data."""
    methods = [2 if login else 0, *rng.sample(range(256), rng.randrange(3))]
    rng.shuffle(methods)
    parts = [encode_greeting(methods)]
    if login:
        good = rng.random() < 0.7
        username = CREDENTIALS[0] if good else rng.randbytes(rng.randrange(256))
        password = CREDENTIALS[1] if good else rng.randbytes(rng.randrange(256))
        parts.append(encode_username_password(username, password))
    parts.append(encode_request(rng.choice(list(Command)), random_address(rng, echo_port)))
    if rng.random() < 0.5:
        parts.append(rng.randbytes(rng.randrange(1, 2000)))
    return parts


FOREIGN = [
    b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n",
    b"CONNECT example.com:443 HTTP/1.1\r\n\r\n",
    b"\x04\x01\x00\x50\x7f\x00\x00\x01user\x00",  # SOCKS4
    b"\x04\x01\x00\x50\x00\x00\x00\x01\x00example.com\x00",  # SOCKS4a
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32),  # a TLS ClientHello start
    b"SSH-2.0-OpenSSH_9.6\r\n",
]


def length_fields(message: bytes, first: bool) -> list[int]:
    """Offsets of the length bytes in a message: NMETHODS of a greeting (RFC 1928 §3),
    ULEN and PLEN of a login (RFC 1929 §2), the name length of a request (§4); any
    byte of anything else."""
    if first and message[0] == 5:
        return [1]
    if message[0] == 1 and len(message) > 2 + message[1]:
        return [1, 2 + message[1]]
    if message[0] == 5 and len(message) > 4 and message[3] == AddressType.DOMAINNAME:
        return [4]
    return [len(message) // 2]


def mutate(rng: random.Random, parts: list[bytes]) -> bytes:
    """One of the mutations the fuzzer knows, applied to a valid handshake."""
    data = bytearray(b"".join(parts))
    kind = rng.randrange(10)
    if kind == 0:  # truncated
        return bytes(data[: rng.randrange(len(data))])
    if kind == 1:  # a few bytes changed
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        return bytes(data)
    if kind == 2:  # a wrong version in one message
        index = rng.randrange(len(parts))
        message = bytearray(parts[index])
        message[0] = rng.choice([0, 1, 4, 6, 0xFF, rng.randrange(256)])
        parts[index] = bytes(message)
        return b"".join(parts)
    if kind == 3:  # a length field zero, maximal or random
        index = rng.randrange(len(parts))
        message = bytearray(parts[index])
        at = rng.choice(length_fields(message, first=index == 0))
        message[at] = rng.choice([0, 255, rng.randrange(256)])
        parts[index] = bytes(message)
        return b"".join(parts)
    if kind == 4:  # junk after a valid prefix
        cut = rng.randrange(len(data) + 1)
        return bytes(data[:cut]) + rng.randbytes(rng.randrange(1, 600))
    if kind == 5:  # oversized: far more than any message may hold
        return bytes(data) + rng.randbytes(rng.randrange(300, 6000))
    if kind == 6:  # pure noise
        return rng.randbytes(rng.randrange(0, 700))
    if kind == 7:  # another protocol
        return rng.choice(FOREIGN)
    if kind == 8:  # every message of the handshake, but each one cut short
        return b"".join(part[: rng.randrange(len(part) + 1)] for part in parts)
    return bytes(data)  # valid, unchanged


def split(rng: random.Random, data: bytes) -> list[bytes]:
    """The bytes cut into 1-3 writes at random points."""
    cuts = sorted(rng.sample(range(1, len(data)), min(rng.randrange(3), len(data) - 1)))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


# ---- running cases ----


def describe(response: bytes, login: bool) -> str:
    """What the daemon answered, message by message (RFC 1928 §3, RFC 1929 §2, §6; a
    SOCKS4 reply, VN=00 CD=5A/5B, to what began with 0x04)."""
    if not response:
        return "closed"
    if len(response) >= 8 and response[0] == 0 and response[1] in (0x5A, 0x5B):
        return f"socks4 reply {response[1]:02x}"
    words, rest = [], response
    if len(rest) >= 2 and rest[0] == 5:
        words.append(f"method {rest[1]:02x}")
        rest = rest[2:]
    if login and len(rest) >= 2 and rest[0] == 1:
        words.append(f"auth {rest[1]:02x}")
        rest = rest[2:]
    if len(rest) >= 2 and rest[0] == 5:
        words.append(f"reply {rest[1]:02x}")
    elif rest:
        words.append("other bytes")
    return " ".join(words)


def run_case(proxy: tuple[str, int], pieces: list[bytes]) -> bytes | None:
    """Send the pieces, half-close, read to EOF; None when the daemon held on past
    CASE_TIMEOUT after our EOF."""
    sock = socket.create_connection(proxy, timeout=CASE_TIMEOUT)
    response = bytearray()
    try:
        for piece in pieces:
            sock.sendall(piece)
        sock.shutdown(socket.SHUT_WR)
        while chunk := sock.recv(65536):
            response += chunk
    except TimeoutError:
        vanish(sock)
        return None
    except (ConnectionResetError, BrokenPipeError):
        pass  # closed with a reset while we still sent: also an ending
    sock.close()
    return bytes(response)


def udp_fuzz(
    rng: random.Random, proxy: tuple[str, int], echo: UdpEcho, credentials: Any, count: int
) -> dict[str, int]:
    """UDP ASSOCIATE, then `count` mutated or random datagrams to the relay, with a valid
    one to the UDP echo every 100 that must come back."""
    control, reply, relay = open_tunnel(
        proxy, Address(AddressType.IPV4, "0.0.0.0", 0), credentials, Command.UDP_ASSOCIATE
    )
    checks = {"sent": 0, "echoed": 0}
    with control, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        assert reply == Reply.SUCCEEDED
        client.bind(("127.0.0.1", 0))
        client.settimeout(TIMEOUT)
        echo_address = Address(AddressType.IPV4, *echo.address)
        for index in range(count):
            valid = encode_udp_datagram(random_address(rng, echo.port), rng.randbytes(64))
            datagram = mutate(rng, [valid[:3], valid[3:]])
            client.sendto(datagram, (relay.host, relay.port))
            checks["sent"] += 1
            if index % 100 == 99:
                marker = b"alive %d" % index
                client.sendto(encode_udp_datagram(echo_address, marker), (relay.host, relay.port))
                while parse_udp_datagram(client.recv(65536)).data != marker:
                    pass  # an echo of an earlier fuzzed datagram
                checks["echoed"] += 1
    return checks


@netns_only
def fuzz_in_netns(serving_name: str, login: bool, cases: int, seed: int) -> dict[str, Any]:
    """The whole fuzz run, in a private network namespace: daemon, targets and fuzzer."""
    from conftest import DaemonProcess, TargetServer, echo

    serving = next(serving for serving in SERVINGS if serving.name == serving_name)
    target, udp_echo = TargetServer(echo), UdpEcho()
    rules = [{"action": "allow", "to": ["127.0.0.1", "::1"], "ports": [target.port, udp_echo.port]}]
    sections: dict[str, Any] = {"access": {"default_action": "deny"}, "rules": rules}
    if login:  # every failed login comes from this one address: no back-off for the fuzzer
        sections |= {"users": [{"name": "fuzzer", "password": "fuzzer-pw"}]}
        sections |= {"auth": {"failure_delay": 0}}
    credentials = CREDENTIALS if login else None
    rng = random.Random(seed)
    outcomes: collections.Counter[str] = collections.Counter()
    result: dict[str, Any] = {"held": [], "checks": 0}

    def normal_client() -> None:
        payload = b"normal client %d" % result["checks"]
        with connect_through(proxy, loopback(target.port), credentials) as sock:
            sock.sendall(payload)
            assert recv_exactly(sock, len(payload)) == payload
        result["checks"] += 1

    with tempfile.TemporaryDirectory() as folder:
        run = run_daemon(
            DaemonProcess, Path(folder), serving, target.port, credentials=credentials, **sections
        )
        proxy = run.proxy
        try:
            started = time.monotonic()
            for index in range(cases):
                data = mutate(rng, valid_handshake(rng, target.port, login))
                response = run_case(proxy, split(rng, data) if data else [])
                if response is None:
                    result["held"].append(data.hex())
                else:
                    outcomes[describe(response, login)] += 1
                if index % CHECK_EVERY == CHECK_EVERY - 1:
                    normal_client()
            result["udp"] = udp_fuzz(rng, proxy, udp_echo, credentials, UDP_CASES)
            result["seconds"] = round(time.monotonic() - started, 1)
            normal_client()
            result["alive"] = run.daemon.proc.poll() is None
            result["baseline"] = str(run.baseline)
            try:
                result["after"] = str(
                    run.settle(AFTER_HANDLER_THREADS, SETTLE_AFTER_HANDLER_THREADS)
                )
            except AssertionError as exc:
                result["after"] = f"not settled: {exc}"
            result["tracebacks"] = sum("Traceback" in line for line in run.daemon.lines)
        finally:
            run.daemon.stop()
            target.close()
            udp_echo.close()
    result["outcomes"] = dict(outcomes.most_common())
    return result


FUZZ_RUNS = [("threading", False), ("threading", True), ("forking", False)]


@needs_netns
@pytest.mark.parametrize(
    ("serving_name", "login"), FUZZ_RUNS, ids=["threading", "threading-login", "forking"]
)
def test_fuzzed_handshakes_and_datagrams_never_hurt_the_daemon(serving_name, login):
    """20,000 seeded mutated or random handshakes (CI: 1,000) per run (truncated,
    zero/maximal/random lengths, wrong versions, junk after valid prefixes, oversized,
    noise, other protocols), then 5,000 (CI: 250) mutated or random UDP datagrams to an
    association: the daemon answers only in well-formed messages, closes every
    connection within 5 s of the client's EOF (none held), a normal client succeeds
    every 1,000 cases (CI: 250) and at the end, a valid datagram is echoed every 100, no
    traceback is logged, and descriptors and threads return to baseline."""
    result = call_in_netns(
        fuzz_in_netns, serving_name, login, FUZZ_CASES, SEED, timeout=1800 if STRESS_FULL else 300
    )
    print(f"{serving_name} login={login}: {result}")
    assert result["held"] == []
    assert result["checks"] == FUZZ_CASES // CHECK_EVERY + 1
    assert result["udp"] == {"sent": UDP_CASES, "echoed": UDP_CASES // 100}
    assert result["alive"] and result["tracebacks"] == 0
    assert not result["after"].startswith("not settled"), result["after"]
    assert sum(result["outcomes"].values()) == FUZZ_CASES
    # Every answer was well-formed: a method choice, a login status, a reply, in order.
    assert not [outcome for outcome in result["outcomes"] if "other bytes" in outcome]


# ---- slowloris ----

SLOWLORIS = scaled(ci=100, full=500)
SLOW_INTERVAL = 2.0  # one byte every 2 s
HANDSHAKE_TIMEOUT = 10.0  # the default timeouts.handshake


def serve_normal_clients(
    proxy: tuple[str, int], port: int, stop: threading.Event, failures: list[str]
) -> int:
    served = 0
    while not stop.is_set():
        payload = b"normal %d" % served
        try:
            assert echo_round_trip(proxy, port, payload) == payload
        except (OSError, EOFError, AssertionError) as exc:
            failures.append(f"client {served}: {exc!r}")
            return served
        served += 1
    return served


def test_slowloris_from_the_same_address_does_not_stop_normal_clients(
    daemon_factory, tmp_path, echo_process, fault_serving
):
    """500 connections (CI: 100) from 127.0.0.1, each sending its handshake one byte
    every 2 s, next to normal clients from the same address: every normal client is
    served all along, and the daemon closes every slow connection at the 10 s
    handshake timeout (none before 9 s, none still open after 30 s)."""
    run = run_daemon(daemon_factory, tmp_path, fault_serving, echo_process.port)
    handshake = encode_greeting([0]) + encode_request(Command.CONNECT, loopback(echo_process.port))
    slow, opened_at = [], []
    for _ in range(SLOWLORIS):
        slow.append(socket.create_connection(run.proxy, timeout=TIMEOUT))
        opened_at.append(time.monotonic())  # the daemon's handshake clock starts after
    opened = opened_at[-1]
    stop, failures = threading.Event(), []
    normal = threading.Thread(
        target=lambda: served.append(
            serve_normal_clients(run.proxy, echo_process.port, stop, failures)
        ),
        daemon=True,
    )
    served: list[int] = []
    normal.start()
    closed_after: dict[int, float] = {}
    poller, by_fd = select.poll(), {}
    for index, sock in enumerate(slow):
        poller.register(sock, select.POLLIN)
        by_fd[sock.fileno()] = index

    def closed(index: int) -> None:
        closed_after[index] = time.monotonic() - opened_at[index]
        poller.unregister(slow[index])

    try:
        sent = 0
        while len(closed_after) < SLOWLORIS and time.monotonic() - opened < 30:
            for index, sock in enumerate(slow):
                if index not in closed_after and sent < len(handshake):
                    try:
                        sock.send(handshake[sent : sent + 1])
                    except OSError:
                        closed(index)
            sent += 1
            tick = time.monotonic() + SLOW_INTERVAL
            while (left := tick - time.monotonic()) > 0 and len(closed_after) < SLOWLORIS:
                for fd, _ in poller.poll(left * 1000):
                    try:
                        ended = slow[by_fd[fd]].recv(1) == b""  # else a method selection
                    except OSError:
                        ended = True
                    if ended:
                        closed(by_fd[fd])
    finally:
        stop.set()
        normal.join(TIMEOUT)
        for sock in slow:
            sock.close()
    times = sorted(closed_after.values())
    print(
        f"{fault_serving.name}: {len(times)} of {SLOWLORIS} slow connections closed after "
        f"{times[0] if times else 0:.1f}-{times[-1] if times else 0:.1f} s; "
        f"{served} normal clients served"
    )
    assert failures == []
    assert served and served[0] > 0
    assert len(closed_after) == SLOWLORIS
    assert times[0] >= HANDSHAKE_TIMEOUT - 1.0
    run.settle(AFTER_HANDLER_THREADS, SETTLE_AFTER_HANDLER_THREADS)
