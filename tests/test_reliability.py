"""Defects the reliability suite (tests/reliability) found, each pinned by a fast test.

The suite runs the real daemon for minutes; these reproduce each defect in process, in
a second or two, so the normal run keeps them fixed.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import time
from typing import Any

import pytest
from clients import TIMEOUT, children_of, connect_through, recv_exactly, wait_until
from conftest import running_proxy

from socks5d.socks.protocol import Address, AddressType


def test_a_request_a_relay_loop_finished_is_no_longer_held_as_detached(echo_target):
    """The fast path (a loop runs the handshake and the tunnel, no thread) detached each
    request and never let go of it: the server kept every closed socket object for ever,
    ~100 bytes per connection (the daemon's RSS grew 25.6 → 39.1 MiB over 100,000 short
    connections; flat at 25.6 MiB with the fix)."""
    target = Address(AddressType.IPV4, "127.0.0.1", echo_target.port)
    with running_proxy("threading") as proxy:
        server: Any = proxy.server
        detached: list[socket.socket] = []
        detach = server.detach_request

        def recording_detach(request: socket.socket) -> Any:
            detached.append(request)
            return detach(request)

        server.detach_request = recording_detach
        for index in range(50):
            payload = b"tunnel %d" % index
            with connect_through(proxy.address, target) as sock:
                sock.sendall(payload)
                assert recv_exactly(sock, len(payload)) == payload
        assert wait_until(lambda: server.active_count == 0)
        assert len(detached) == 50  # each went through the loop
        assert [request for request in detached if server.reclaim_request(request)] == []


def refused(address: tuple[str, int]) -> bool:
    """Whether a connect to `address` is refused (one that gets through is closed)."""
    try:
        socket.create_connection(address, timeout=1.0).close()
    except ConnectionRefusedError:
        return True
    except OSError:  # a full backlog drops the SYN: not refused either
        pass
    return False


def test_with_workers_sigterm_refuses_new_clients_at_once(daemon_factory, echo_target, tmp_path):
    """With workers, the supervisor kept its copy of the listening socket until every
    worker had drained: for the whole grace period the kernel went on completing
    handshakes no one accepted, and those clients hung until they were reset. Now a
    client is refused as soon as the stop begins, as without workers."""
    config = tmp_path / "config.toml"
    config.write_text("[timeouts]\nshutdown_grace = 60\n")  # longer than any wait below
    daemon = daemon_factory("--config", str(config), "--port", "0", "--workers", "2")
    proxy = ("127.0.0.1", daemon.port)
    target = Address(AddressType.IPV4, "127.0.0.1", echo_target.port)
    assert wait_until(lambda: len(children_of(daemon.proc.pid)) == 2)
    with connect_through(proxy, target) as held:  # keeps one worker draining
        held.sendall(b"held")
        assert recv_exactly(held, 4) == b"held"
        daemon.proc.send_signal(signal.SIGTERM)
        assert wait_until(lambda: "waiting up to 60.0 s for 1 open" in daemon.output())
        assert wait_until(lambda: refused(proxy))
        held.sendall(b"still relayed")  # the drain goes on for the tunnel already open
        assert recv_exactly(held, 13) == b"still relayed"
    assert daemon.proc.wait(TIMEOUT) == 0


@pytest.mark.parametrize("args", [(), ("--workers", "2")], ids=["single", "workers"])
def test_signals_while_the_process_exits_do_not_spoil_exit_0(daemon_factory, args):
    """Python gives handled signals their default action back while the interpreter
    shuts down: a SIGTERM that arrived then (20 of 20 runs with one every millisecond)
    killed the stopped daemon, exit -15 instead of 0."""
    daemon = daemon_factory("--port", "0", *args)
    deadline = time.monotonic() + TIMEOUT
    while daemon.proc.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(ProcessLookupError):
            daemon.proc.send_signal(signal.SIGTERM)
        time.sleep(0.001)
    assert daemon.proc.wait(TIMEOUT) == 0
