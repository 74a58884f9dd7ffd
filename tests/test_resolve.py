"""Name resolution: bounded in time and in threads, and every name the system resolver takes.

A. getaddrinfo has no timeout and cannot be cancelled. Lookups run on the bounded threads of
   socks5d.socks.lookups within `timeouts.resolve`: CONNECT and BIND get 04 ("resolve timed out")
   when a name does not resolve in time, and 04 at once when every lookup thread is taken; in
   UDP ASSOCIATE a slow name holds back only its own datagrams. The resolver here is injected
   (HandlerSettings.resolver) and blocks on an event, except in the end-to-end test, which
   runs the real `socks5d` in a private network namespace whose /etc/resolv.conf names a
   local server that never answers.
B. A name goes to getaddrinfo as the ASCII bytes the client sent, so the 255-byte numeric
   form of 127.0.0.1 (four 63-character labels, resolved with no DNS traffic) works for
   CONNECT, BIND and UDP; a non-ASCII name still goes out in its IDNA form.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from clients import (
    TIMEOUT,
    UdpEcho,
    open_tunnel,
    read_reply,
    recv_all,
    recv_exactly,
    udp_socket,
    wait_until,
)
from conftest import ROOT, DaemonProcess, TargetServer, echo, running_proxy
from netns import call_in_netns, needs_netns, netns_only
from test_udp import Association, domain_header, ipv4_header

from socks5d.socks.lookups import LookupBusy, LookupPool, LookupTimedOut
from socks5d.socks.outbound import ConnectFailed, resolve_target, system_resolver
from socks5d.socks.protocol import (
    UNSPECIFIED_IPV4,
    Address,
    AddressType,
    Command,
    Method,
    Reply,
    encode_greeting,
    encode_request,
    encode_udp_datagram,
    parse_udp_datagram,
)
from socks5d.socks.udp import system_resolver as udp_system_resolver

# The numbers-and-dots form of 127.0.0.1 in four hexadecimal labels of 63 characters each,
# 255 bytes in all: the longest name RFC 1928 §5 can carry, beyond what DNS carries (253),
# and resolved by getaddrinfo (inet_aton) without any DNS query.
LONG_LOOPBACK_NAME = ".".join(
    ["0x" + "0" * 59 + "7f", "0x" + "0" * 61, "0x" + "0" * 61, "0x" + "0" * 60 + "1"]
)
assert len(LONG_LOOPBACK_NAME) == 255 and all(
    len(label) == 63 for label in LONG_LOOPBACK_NAME.split(".")
)

POOL_NUMBERS = itertools.count()
SockAddrs = list[tuple[socket.AddressFamily, tuple[Any, ...]]]


class BlockingResolver:
    """A resolver that never answers the names in `slow` until released (a dead name
    server), and resolves every other name to 127.0.0.1 at once. Records every call."""

    def __init__(self, *slow: str) -> None:
        self.slow = set(slow)
        self.released = threading.Event()
        self.calls: list[str] = []

    def __call__(self, host: str, port: int) -> SockAddrs:
        self.calls.append(host)
        if host in self.slow or not self.slow:
            # Bounded, so a test that fails cannot leave a thread behind for good.
            self.released.wait(TIMEOUT * 3)
        return [(socket.AF_INET, ("127.0.0.1", port))]

    def release(self) -> None:
        self.released.set()


@pytest.fixture
def blocking_resolver() -> Iterator[Callable[..., BlockingResolver]]:
    made: list[BlockingResolver] = []

    def make(*slow: str) -> BlockingResolver:
        made.append(BlockingResolver(*slow))
        return made[-1]

    yield make
    for resolver in made:
        resolver.release()


@pytest.fixture
def pool() -> Iterator[Callable[..., LookupPool]]:
    """Small lookup pools for one test; their workers exit soon after it."""
    made: list[LookupPool] = []

    def make(max_threads: int = 4) -> LookupPool:
        name = f"test-lookup-{next(POOL_NUMBERS)}"  # unique: threads_named counts one pool's
        made.append(LookupPool(max_threads, idle_seconds=0.2, name=name))
        return made[-1]

    yield make


def threads_named(name: str) -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == name]


def access_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "socks5d.access"]


def name(host: str, port: int = 80) -> Address:
    return Address(AddressType.DOMAINNAME, host, port)


# --- the lookup pool ------------------------------------------------------------------------


def test_a_lookup_runs_on_a_daemon_worker_and_returns_its_answer(pool):
    lookups = pool()
    seen: list[threading.Thread] = []

    def resolver(host: str, port: int) -> SockAddrs:
        seen.append(threading.current_thread())
        return [(socket.AF_INET, ("127.0.0.1", port))]

    assert lookups.run(resolver, "a.test", 80, timeout=TIMEOUT) == [
        (socket.AF_INET, ("127.0.0.1", 80))
    ]
    assert seen[0] is not threading.current_thread() and seen[0].daemon
    assert wait_until(lambda: lookups.in_flight == 0)


def test_a_lookup_past_its_timeout_raises_and_frees_its_slot_when_it_ends(pool, blocking_resolver):
    lookups = pool()
    resolver = blocking_resolver("never.test")
    with pytest.raises(LookupTimedOut):
        lookups.run(resolver, "never.test", 80, timeout=0.2)
    assert lookups.in_flight == 1  # getaddrinfo cannot be cancelled: it still holds a thread
    resolver.release()
    assert wait_until(lambda: lookups.in_flight == 0)


def test_a_full_pool_refuses_at_once_and_serves_again_when_a_thread_frees(pool, blocking_resolver):
    lookups = pool(max_threads=2)
    resolver = blocking_resolver("never.test")
    stuck = [lookups.submit(resolver, "never.test", 80) for _ in range(2)]
    with pytest.raises(LookupBusy):
        lookups.submit(resolver, "other.test", 80)
    resolver.release()
    for future in stuck:
        assert future.result(TIMEOUT)[0][1] == ("127.0.0.1", 80)
    assert wait_until(lambda: lookups.in_flight == 0)
    assert lookups.run(resolver, "other.test", 80, timeout=TIMEOUT)


def test_a_flood_of_never_answering_names_costs_at_most_max_threads(pool, blocking_resolver):
    lookups = pool(max_threads=4)
    resolver = blocking_resolver("never.test")
    outcomes = {"busy": 0, "admitted": 0}
    for _ in range(200):
        try:
            lookups.submit(resolver, "never.test", 80)
            outcomes["admitted"] += 1
        except LookupBusy:
            outcomes["busy"] += 1
    assert outcomes == {"busy": 196, "admitted": 4}
    assert len(threads_named(lookups.name)) == 4
    resolver.release()
    # Idle workers exit: nothing is left behind once the lookups are over.
    assert wait_until(lambda: not threads_named(lookups.name))
    assert (lookups.in_flight, lookups.threads) == (0, 0)


def test_a_forked_child_starts_with_an_empty_pool():
    # In a separate interpreter: forking the test process, with its threads, is not safe.
    code = """
import os, socket
from socks5d.socks.lookups import LookupPool
pool = LookupPool(2, idle_seconds=60)
answer = lambda host, port: [(socket.AF_INET, (host, port))]
pool.run(answer, "127.0.0.1", 1, timeout=5)
pid = os.fork()
if pid == 0:
    ok = pool.threads == 0 and pool.run(answer, "127.0.0.1", 2, timeout=5)[0][1][1] == 2
    os._exit(0 if ok else 1)
print(os.waitpid(pid, 0)[1], pool.threads)
"""
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert result.stdout.split() == ["0", "1"], result.stderr


# --- resolve_target -------------------------------------------------------------------------


def test_resolve_target_times_out_with_04(pool, blocking_resolver):
    resolver = blocking_resolver("never.test")
    started = time.monotonic()
    with pytest.raises(ConnectFailed) as caught:
        resolve_target(name("never.test"), resolver, timeout=0.3, lookups=pool())
    assert (caught.value.reply, caught.value.reason) == (
        Reply.HOST_UNREACHABLE,
        "resolve timed out",
    )
    assert time.monotonic() - started < TIMEOUT  # not the resolver's own (endless) time


def test_resolve_target_with_a_full_pool_fails_at_once_with_04(pool, blocking_resolver):
    lookups = pool(max_threads=1)
    resolver = blocking_resolver("never.test")
    lookups.submit(resolver, "never.test", 80)
    with pytest.raises(ConnectFailed) as caught:
        resolve_target(name("other.test"), resolver, timeout=TIMEOUT, lookups=lookups)
    assert caught.value.reply == Reply.HOST_UNREACHABLE
    assert caught.value.reason.startswith("resolver busy")
    assert "other.test" not in resolver.calls  # the refused name never reached it


def test_the_system_resolver_gets_an_ascii_name_as_bytes(monkeypatch):
    asked: list[object] = []
    real = socket.getaddrinfo

    def spy(host: Any, *args: Any, **kwargs: Any) -> Any:
        asked.append(host)
        return real("127.0.0.1", *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", spy)
    system_resolver("x" * 70 + ".test", 80)  # a label Python's IDNA codec refuses
    udp_system_resolver("xn--bcher-kva.test", 53)
    assert asked == [b"x" * 70 + b".test", b"xn--bcher-kva.test"]


@pytest.mark.parametrize("resolver", [system_resolver, udp_system_resolver])
def test_the_255_byte_numeric_name_resolves_to_loopback(resolver):
    assert {sockaddr[:2] for _, sockaddr in resolver(LONG_LOOPBACK_NAME, 80)} == {("127.0.0.1", 80)}


def test_a_non_ascii_name_the_idna_codec_refuses_gets_04_not_a_traceback():
    # Built directly (the wire parser would refuse it): an embedding caller's name, which
    # goes through Python's IDNA codec and fails there, before any DNS query.
    address = Address(AddressType.DOMAINNAME, "b\u00fccher" + "x" * 70 + ".test", 80)
    with pytest.raises(ConnectFailed) as caught:
        resolve_target(address, system_resolver, timeout=TIMEOUT)
    assert caught.value.reply == Reply.HOST_UNREACHABLE
    assert caught.value.reason.startswith("resolve failed")


# --- CONNECT and BIND through the proxy -----------------------------------------------------


def test_connect_to_a_name_that_never_resolves_gets_04_promptly(blocking_resolver, caplog):
    caplog.set_level(logging.INFO, logger="socks5d.access")
    resolver = blocking_resolver("never.test")
    with running_proxy(resolver=resolver, resolve_timeout=0.5, connect_timeout=1.0) as proxy:
        started = time.monotonic()
        sock, reply, _ = open_tunnel(proxy.address, name("never.test"))
        elapsed = time.monotonic() - started
        with sock:
            assert reply == Reply.HOST_UNREACHABLE
            assert recv_all(sock) == b""
        assert wait_until(lambda: any("resolve timed out" in x for x in access_lines(caplog)))
    # The reply came at the resolve timeout, long before the resolver would have answered.
    assert elapsed < TIMEOUT
    assert not resolver.released.is_set()


def test_bind_to_a_name_that_never_resolves_gets_04(blocking_resolver, caplog):
    caplog.set_level(logging.INFO, logger="socks5d.access")
    resolver = blocking_resolver("never.test")
    with running_proxy(resolver=resolver, resolve_timeout=0.5) as proxy:
        sock, reply, _ = open_tunnel(proxy.address, name("never.test"), None, Command.BIND)
        with sock:
            assert reply == Reply.HOST_UNREACHABLE
        assert wait_until(lambda: any("resolve timed out" in x for x in access_lines(caplog)))
    assert not resolver.released.is_set()


def test_with_every_lookup_thread_taken_a_connect_gets_04_at_once(
    pool, blocking_resolver, echo_target, caplog
):
    caplog.set_level(logging.INFO, logger="socks5d.access")
    lookups = pool(max_threads=2)
    resolver = blocking_resolver("slow.test")
    settings = {"resolver": resolver, "lookups": lookups, "resolve_timeout": TIMEOUT * 2}
    with running_proxy(**settings) as proxy:
        waiting: list[Any] = []
        threads = [
            threading.Thread(
                target=lambda: waiting.append(
                    open_tunnel(proxy.address, name("slow.test", echo_target.port))
                )
            )
            for _ in range(2)
        ]
        for thread in threads:
            thread.start()
        assert wait_until(lambda: lookups.in_flight == 2)
        # The pool is full: the third name is refused without queueing behind the others.
        sock, reply, _ = open_tunnel(proxy.address, name("fast.test", echo_target.port))
        with sock:
            assert reply == Reply.HOST_UNREACHABLE
        assert wait_until(lambda: any("resolver busy" in x for x in access_lines(caplog)))
        assert not resolver.released.is_set()  # answered while the other two still wait
        resolver.release()
        for thread in threads:
            thread.join(TIMEOUT)
        assert [reply for _, reply, _ in waiting] == [Reply.SUCCEEDED] * 2
        for sock, _, _ in waiting:
            sock.close()


def test_a_flood_of_connects_to_dead_names_is_answered_and_holds_few_threads(
    pool, blocking_resolver
):
    lookups = pool(max_threads=3)
    resolver = blocking_resolver("never.test")
    replies: list[int] = []
    lock = threading.Lock()

    def client() -> None:
        sock, reply, _ = open_tunnel(proxy.address, name("never.test"))
        sock.close()
        with lock:
            replies.append(reply)

    with running_proxy(resolver=resolver, lookups=lookups, resolve_timeout=0.5) as proxy:
        clients = [threading.Thread(target=client) for _ in range(30)]
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join(TIMEOUT * 2)
        assert replies == [Reply.HOST_UNREACHABLE] * 30
        assert len(threads_named(lookups.name)) <= 3
    assert resolver.calls == ["never.test"] * len(resolver.calls) and len(resolver.calls) <= 3


# --- UDP ASSOCIATE: one slow name stalls only its own datagrams ------------------------------
# serve_association driven directly, with tests/test_udp.py's Association.


@pytest.fixture
def udp_echo() -> Iterator[UdpEcho]:
    with contextlib.closing(UdpEcho()) as server:
        yield server


@pytest.fixture
def association() -> Iterator[Callable[..., Association]]:
    with contextlib.ExitStack() as stack:
        yield lambda **options: stack.enter_context(contextlib.closing(Association(**options)))


def test_a_slow_name_does_not_hold_up_other_destinations(
    association, udp_echo, blocking_resolver, pool
):
    resolver = blocking_resolver("slow.test")
    assoc = association(resolver=resolver, resolve_timeout=TIMEOUT * 2, lookups=pool())
    assoc.send(domain_header(b"slow.test", udp_echo.port) + b"waits")
    assoc.send(ipv4_header("127.0.0.1", udp_echo.port) + b"literal")
    assert assoc.recv() == ipv4_header("127.0.0.1", udp_echo.port) + b"literal"
    assoc.send(domain_header(b"fast.test", udp_echo.port) + b"other name")
    assert assoc.recv() == ipv4_header("127.0.0.1", udp_echo.port) + b"other name"
    assert not resolver.released.is_set()  # both went out while slow.test was resolving
    resolver.release()
    # The datagram that waited for its name goes out once the name resolves.
    assert assoc.recv() == ipv4_header("127.0.0.1", udp_echo.port) + b"waits"
    stats = assoc.finish()
    assert (stats.datagrams_up, stats.dropped) == (3, 0)


def test_a_slow_names_datagrams_queue_up_to_a_bound_then_drop_at_its_timeout(
    association, udp_echo, blocking_resolver, pool, caplog
):
    caplog.set_level(logging.DEBUG, logger="socks5d.socks.udp")
    resolver = blocking_resolver("slow.test")
    assoc = association(resolver=resolver, resolve_timeout=0.3, lookups=pool())
    for index in range(12):  # 8 wait for the name, 4 are dropped at once
        assoc.send(domain_header(b"slow.test", udp_echo.port) + b"slow %d" % index)
    assoc.send(ipv4_header("127.0.0.1", udp_echo.port) + b"meanwhile")
    assert assoc.recv() == ipv4_header("127.0.0.1", udp_echo.port) + b"meanwhile"
    assert wait_until(lambda: "resolving slow.test timed out" in caplog.text)
    resolver.release()  # too late: what waited was dropped at the timeout
    # Failed names are remembered briefly: the next datagram does not start a new lookup.
    assoc.send(domain_header(b"slow.test", udp_echo.port) + b"after")
    assoc.send(ipv4_header("127.0.0.1", udp_echo.port) + b"still flowing")
    assert assoc.recv() == ipv4_header("127.0.0.1", udp_echo.port) + b"still flowing"
    stats = assoc.finish()
    assert (stats.datagrams_up, stats.dropped) == (2, 13)
    assert resolver.calls == ["slow.test"]
    assert [payload for payload, _ in udp_echo.received] == [b"meanwhile", b"still flowing"]


def test_one_association_resolves_at_most_eight_names_at_once(
    association, udp_echo, blocking_resolver, pool
):
    names = [b"slow%d.test" % index for index in range(10)]
    resolver = blocking_resolver(*(n.decode() for n in names))
    lookups = pool(max_threads=16)
    assoc = association(resolver=resolver, resolve_timeout=TIMEOUT * 2, lookups=lookups)
    for host in names:
        assoc.send(domain_header(host, udp_echo.port) + host)
    assoc.send(ipv4_header("127.0.0.1", udp_echo.port) + b"marker")
    assert assoc.recv() == ipv4_header("127.0.0.1", udp_echo.port) + b"marker"
    assert lookups.in_flight == 8  # the other two names were dropped, not looked up
    resolver.release()
    answers = {assoc.recv() for _ in range(8)}
    assert answers == {ipv4_header("127.0.0.1", udp_echo.port) + host for host in names[:8]}
    stats = assoc.finish()
    assert (stats.datagrams_up, stats.dropped) == (9, 2)


def test_datagrams_still_waiting_when_the_association_ends_are_counted_dropped(
    association, udp_echo, blocking_resolver, pool
):
    resolver = blocking_resolver("slow.test")
    assoc = association(resolver=resolver, resolve_timeout=TIMEOUT * 2, lookups=pool())
    assoc.send(domain_header(b"slow.test", udp_echo.port) + b"one")
    assoc.send(domain_header(b"slow.test", udp_echo.port) + b"two")
    assoc.send(ipv4_header("127.0.0.1", udp_echo.port) + b"marker")
    assert assoc.recv() == ipv4_header("127.0.0.1", udp_echo.port) + b"marker"
    stats = assoc.finish()
    assert (stats.datagrams_up, stats.dropped) == (1, 2)


# --- B: the 255-byte name, and non-ASCII names, in CONNECT, BIND and UDP ---------------------


def test_connect_to_the_255_byte_numeric_name_reaches_127_0_0_1(proxy, echo_target):
    sock, reply, _ = open_tunnel(proxy.address, name(LONG_LOOPBACK_NAME, echo_target.port))
    with sock:
        assert reply == Reply.SUCCEEDED
        sock.sendall(b"long name")
        assert recv_exactly(sock, 9) == b"long name"


def test_bind_expecting_the_255_byte_name_accepts_a_peer_from_127_0_0_1(proxy):
    expected = name(LONG_LOOPBACK_NAME, 0)
    control, reply, bound = open_tunnel(proxy.address, expected, None, Command.BIND)
    with control:
        assert reply == Reply.SUCCEEDED
        assert bound.host == "127.0.0.1"
        with socket.create_connection((bound.host, bound.port), timeout=TIMEOUT) as peer:
            reply, who = read_reply(control)
            assert (reply, who.host, who.port) == (
                Reply.SUCCEEDED,
                "127.0.0.1",
                peer.getsockname()[1],
            )
            peer.sendall(b"from the peer")
            assert recv_exactly(control, 13) == b"from the peer"


def test_udp_datagram_to_the_255_byte_name_is_forwarded(proxy, udp_echo):
    control, reply, bound = open_tunnel(
        proxy.address, UNSPECIFIED_IPV4, None, Command.UDP_ASSOCIATE
    )
    with control, udp_socket() as client:
        assert reply == Reply.SUCCEEDED
        target = name(LONG_LOOPBACK_NAME, udp_echo.port)
        client.sendto(encode_udp_datagram(target, b"long"), (bound.host, bound.port))
        datagram = parse_udp_datagram(client.recv(65536))
        assert (datagram.address.host, datagram.data) == ("127.0.0.1", b"long")


def test_a_non_ascii_name_goes_to_the_resolver_in_its_idna_form(echo_target):
    asked: list[str] = []

    def resolver(host: str, port: int) -> SockAddrs:
        asked.append(host)
        if host != "xn--bcher-kva.test":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, ("127.0.0.1", port))]

    with running_proxy(resolver=resolver) as proxy:
        for raw, expected in [
            ("bücher.test", Reply.SUCCEEDED),
            ("öde.test", Reply.HOST_UNREACHABLE),  # the resolver fails it: 04, no traceback
        ]:
            # The name as UTF-8 on the wire, as curl sends it.
            encoded = raw.encode()
            request = b"\x05\x01\x00\x03" + bytes([len(encoded)]) + encoded
            with socket.create_connection(proxy.address, timeout=TIMEOUT) as sock:
                sock.sendall(b"\x05\x01\x00")  # VER NMETHODS NO-AUTH
                assert recv_exactly(sock, 2) == b"\x05\x00"
                sock.sendall(request + echo_target.port.to_bytes(2, "big"))
                reply, _ = read_reply(sock)
                assert reply == expected
    assert asked == ["xn--bcher-kva.test", "xn--de-eka.test"]


def test_a_non_ascii_udp_destination_is_resolved_in_its_idna_form(association, udp_echo, pool):
    asked: list[str] = []

    def resolver(host: str, port: int) -> SockAddrs:
        asked.append(host)
        return [(socket.AF_INET, ("127.0.0.1", port))]

    assoc = association(resolver=resolver, lookups=pool())
    assoc.send(domain_header("bücher.test".encode(), udp_echo.port) + b"umlaut")
    assert assoc.recv() == ipv4_header("127.0.0.1", udp_echo.port) + b"umlaut"
    assert asked == ["xn--bcher-kva.test"]
    assoc.finish()


# --- end to end: the real command with a name server that never answers ----------------------


class SilentNameServer:
    """A UDP socket on 127.0.0.1:53 that takes DNS queries and never answers them."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 53))
        self.sock.settimeout(0.1)
        self.queries: list[bytes] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping.is_set():
            with contextlib.suppress(TimeoutError):
                self.queries.append(self.sock.recv(4096))

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(TIMEOUT)
        self.sock.close()


def time_to_reply(proxy: tuple[str, int], target: Address) -> tuple[int, float]:
    """(reply code, seconds) of a CONNECT; waits up to a minute, to measure old code too."""
    started = time.monotonic()
    with socket.create_connection(proxy, timeout=60) as sock:
        sock.sendall(encode_greeting([Method.NO_AUTHENTICATION_REQUIRED]))
        assert recv_exactly(sock, 2) == b"\x05\x00"
        sock.sendall(encode_request(Command.CONNECT, target))
        reply, _ = read_reply(sock)
    return reply, time.monotonic() - started


@netns_only
def dead_name_server_scenario(resolv_options: str, config: str) -> dict[str, Any]:
    """In a private network and mount namespace: /etc/resolv.conf names a local server that
    never answers; the real `socks5d` serves CONNECTs; then SIGTERM while a lookup hangs."""
    server = SilentNameServer()
    folder = Path(tempfile.mkdtemp())
    resolv = folder / "resolv.conf"
    resolv.write_text(f"nameserver 127.0.0.1\n{resolv_options}\n")
    subprocess.run(["mount", "--bind", str(resolv), "/etc/resolv.conf"], check=True)
    (folder / "config.toml").write_text(config)
    target = TargetServer(echo)
    daemon = DaemonProcess("--config", str(folder / "config.toml"))
    facts: dict[str, Any] = {}
    try:
        proxy = ("127.0.0.1", daemon.port)
        facts["dead"] = time_to_reply(proxy, name("never.answers.test"))
        facts["dead_queries"] = len(server.queries)
        facts["long"] = time_to_reply(proxy, name(LONG_LOOPBACK_NAME, target.port))
        facts["queries_after_long"] = len(server.queries)
        # A lookup still hangs in the daemon (the C library waits for its own timeout):
        # the daemon must stop anyway, promptly.
        started = time.monotonic()
        facts["exit"] = daemon.stop(signal.SIGTERM)
        facts["stop_seconds"] = time.monotonic() - started
    finally:
        daemon.stop()
        target.close()
        server.close()
    facts["log"] = daemon.output()
    return facts


E2E_CONFIG = """
[server]
host = "127.0.0.1"
port = 0
[timeouts]
handshake = 1
connect = 1
resolve = 1
"""


@needs_netns
def test_the_real_daemon_answers_04_at_the_resolve_timeout_when_dns_never_answers():
    # The C library would wait 30 s for this name server (options below); the old code did.
    facts = call_in_netns(
        dead_name_server_scenario,
        "options timeout:30 attempts:1",
        E2E_CONFIG,
        mount=True,
        timeout=90,
    )
    reply, elapsed = facts["dead"]
    assert reply == Reply.HOST_UNREACHABLE, facts["log"]
    assert facts["dead_queries"] >= 1  # the name really went to the silent server
    assert elapsed < 15.0, f"04 after {elapsed:.1f} s; resolve = 1"
    assert "end='resolve timed out'" in facts["log"]
    # The 255-byte numeric name connects, and sends nothing to the name server.
    assert facts["long"][0] == Reply.SUCCEEDED, facts["log"]
    assert facts["queries_after_long"] == facts["dead_queries"]
    # The hung lookup is on a daemon thread: SIGTERM still ends the process, exit 0.
    assert facts["exit"] == 0, facts["log"]
    assert facts["stop_seconds"] < 20.0
