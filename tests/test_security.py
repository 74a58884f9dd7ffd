"""Safe by default, end to end through the real `socks5d` command.

The open-proxy refusal, private destinations behind an exposed listener, the loop guard,
every kind of [[rules]] key (CONNECT, BIND and UDP), password hashes, what a client can
put in the log, the failed-login back-off, the per-address and per-user limits, and
`socks5d check-config`.

Every listener is on loopback. The ones that must be reachable from other hosts (0.0.0.0,
::) are bound inside a private network namespace (tests/netns.py), where "other hosts"
do not exist; the scenario functions named `*_in_netns` run only there.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
from clients import TIMEOUT, UdpEcho, read_reply, recv_all, recv_exactly, wait_until
from conftest import DaemonProcess, TargetServer, echo
from netns import call_in_netns, json_in_netns, needs_netns, netns_only, netns_unavailable

from socks5d.socks.protocol import (
    Address,
    AddressType,
    Command,
    Method,
    Reply,
    encode_greeting,
    encode_request,
    encode_udp_datagram,
    encode_username_password,
    parse_udp_datagram,
)

ROOT = Path(__file__).resolve().parent.parent
ANY_IPV4 = Address(AddressType.IPV4, "0.0.0.0", 0)


# ---- helpers ----


def ip(host: str, port: int) -> Address:
    return Address.from_host(host, port)


def name(host: str, port: int) -> Address:
    return Address(AddressType.DOMAINNAME, host, port)


def handshake(
    proxy: tuple[str, int],
    target: Address,
    credentials: tuple[bytes, bytes] | None = None,
    command: Command = Command.CONNECT,
    source: str | None = None,
) -> tuple[socket.socket, int, Address]:
    """Raw SOCKS5 from `source` (a local address to bind first): (socket, reply, bound)."""
    sock = socket.socket(socket.AF_INET6 if ":" in proxy[0] else socket.AF_INET)
    try:
        sock.settimeout(TIMEOUT)
        if source is not None:
            sock.bind((source, 0))
        sock.connect(proxy)
        method = Method.USERNAME_PASSWORD if credentials else Method.NO_AUTHENTICATION_REQUIRED
        sock.sendall(encode_greeting([method]))  # VER NMETHODS METHODS
        assert recv_exactly(sock, 2) == bytes([5, method])
        if credentials:
            sock.sendall(encode_username_password(*credentials))
            assert recv_exactly(sock, 2) == b"\x01\x00"  # VER STATUS=success
        sock.sendall(encode_request(command, target))
        reply, bound = read_reply(sock)
    except BaseException:
        sock.close()
        raise
    return sock, reply, bound


def reply_to(proxy: tuple[str, int], target: Address, **kwargs: Any) -> int:
    """The reply code for one request; the connection is closed right after."""
    sock, reply, _ = handshake(proxy, target, **kwargs)
    sock.close()
    return reply


def round_trip(proxy: tuple[str, int], target: Address, payload: bytes, **kwargs: Any) -> bytes:
    """CONNECT, send `payload` to an echo, half-close, return what came back."""
    sock, reply, _ = handshake(proxy, target, **kwargs)
    with sock:
        assert reply == Reply.SUCCEEDED, f"CONNECT {target} got reply {reply:#04x}"
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        return recv_all(sock)


def matching(lines: Iterable[str], *needles: str) -> list[str]:
    return [line for line in lines if all(needle in line for needle in needles)]


def access_line(daemon: DaemonProcess, *needles: str) -> str:
    """The one access-log line holding every needle (waits for it: lines come at close)."""
    assert wait_until(lambda: bool(matching(daemon.lines, *needles))), (
        f"no log line with {needles}:\n{daemon.output()}"
    )
    found = matching(daemon.lines, *needles)
    assert len(found) == 1, found
    return found[0]


def start(daemon_factory: Callable[..., DaemonProcess], tmp_path: Path, text: str, *args: str):
    config = tmp_path / "config.toml"
    config.write_text(text)
    return daemon_factory("--config", str(config), *args)


def run_cli(
    *args: str, input: str | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "socks5d", *args],
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def second_loopback_usable() -> bool:
    """Whether a client socket can be bound to 127.0.0.2 (Linux routes all of 127/8)."""
    try:
        with socket.socket() as probe:
            probe.bind(("127.0.0.2", 0))
        return True
    except OSError:
        return False


needs_127_0_0_2 = pytest.mark.skipif(
    not second_loopback_usable(), reason="127.0.0.2 is not bindable here"
)


# ---- the open-proxy refusal ----


def refused_start(*args: str) -> subprocess.CompletedProcess[str]:
    """Run socks5d where it must refuse to start, before binding anything.

    In a private network namespace when one can be made, so even a regression that did
    bind 0.0.0.0 would expose nothing; else here (the refusal comes before bind()).
    """
    if netns_unavailable() is not None:
        return run_cli(*args, timeout=15)
    code = """
        import json, os, subprocess, sys
        command = [sys.executable, "-m", "socks5d", *json.loads(os.environ["ARGS"])]
        done = subprocess.run(command, capture_output=True, text=True, timeout=15)
        print(json.dumps([done.returncode, done.stdout, done.stderr]))
    """
    returncode, stdout, stderr = json_in_netns(code, env={"ARGS": json.dumps(list(args))})
    return subprocess.CompletedProcess(list(args), returncode, stdout, stderr)


def assert_open_proxy_refused(result: subprocess.CompletedProcess[str], where: str) -> None:
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr
    assert "listening on" not in result.stderr
    message = result.stderr.strip()
    assert message.startswith("Error: "), message
    assert f"refusing to run an open proxy on {where}" in message
    for remedy in ("[[users]]", "[[rules]]", 'access.default_action = "deny"', "--allow-open"):
        assert remedy in message, f"{remedy!r} missing from {message!r}"


def test_wildcard_host_without_login_or_rules_is_refused_before_binding():
    result = refused_start("--host", "0.0.0.0", "--port", "0")
    assert_open_proxy_refused(result, "0.0.0.0:0")


def test_wildcard_listen_in_the_config_file_is_refused(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text('[server]\nlisten = ["[::]:0"]\n')
    result = refused_start("--config", str(config))
    assert_open_proxy_refused(result, "[::]:0")


@netns_only
def exposed_start_in_netns(args: list[str], credentials: list[str] | None) -> dict[str, Any]:
    """Run inside a private network namespace: socks5d on 0.0.0.0, one CONNECT to an echo."""
    target = TargetServer(echo)
    daemon = DaemonProcess(*args, "--host", "0.0.0.0", "--port", "0")
    try:
        creds = (credentials[0].encode(), credentials[1].encode()) if credentials else None
        proxy = ("127.0.0.1", daemon.port)
        sock, reply, _ = handshake(proxy, ip("127.0.0.1", target.port), creds)
        with sock:
            echoed = b""
            if reply == Reply.SUCCEEDED:
                sock.sendall(b"exposed")
                echoed = recv_exactly(sock, 7)
    finally:
        code = daemon.stop()
        target.close()
    return {
        "port": daemon.port,
        "reply": reply,
        "echoed": echoed.decode(),
        "exit": code,
        "output": daemon.output(),
    }


RESTRICTED = """\
[access]
default_action = "deny"
[[rules]]
action = "allow"
from = ["127.0.0.0/8"]
to = ["127.0.0.1"]
"""


@needs_netns
@pytest.mark.parametrize(
    ("case", "expected"),
    [
        # A login makes it safe; a loopback target is still a private destination: 02.
        pytest.param("user", Reply.CONNECTION_NOT_ALLOWED, id="user"),
        # Clients restricted by `from`; the allow rule names the target in `to`: allowed.
        pytest.param("rules", Reply.SUCCEEDED, id="rules"),
        # Open on purpose; private destinations are still denied: 02.
        pytest.param("allow-open", Reply.CONNECTION_NOT_ALLOWED, id="allow-open"),
    ],
)
def test_exposed_listener_starts_with_login_rules_or_allow_open(tmp_path, case, expected):
    config = tmp_path / "config.toml"
    config.write_text(RESTRICTED if case == "rules" else "")
    args = {"user": ["--user", "alice:secret"], "rules": [], "allow-open": ["--allow-open"]}[case]
    credentials = ["alice", "secret"] if case == "user" else None
    result = call_in_netns(exposed_start_in_netns, ["--config", str(config), *args], credentials)
    assert f"listening on 0.0.0.0:{result['port']} (threading)" in result["output"]
    assert "open proxy" not in result["output"]
    assert result["reply"] == expected
    if expected == Reply.SUCCEEDED:
        assert result["echoed"] == "exposed"
    assert result["exit"] == 0


@netns_only
def dual_stack_rules_in_netns(config_text: str) -> dict[str, Any]:
    """Run inside a private network namespace: socks5d on "::" (dual-stack) with
    `config_text`; one CONNECT from an IPv4 and one from an IPv6 client."""
    target = TargetServer(echo)
    with tempfile.TemporaryDirectory() as folder:
        config = Path(folder) / "config.toml"
        config.write_text(config_text)
        daemon = DaemonProcess("--config", str(config), "--host", "::", "--port", "0")
    try:
        replies = {
            client: reply_to((client, daemon.port), ip("127.0.0.1", target.port))
            for client in ("127.0.0.1", "::1")
        }
        wait_until(lambda: len(matching(daemon.lines, "cmd=CONNECT")) >= 2)
    finally:
        daemon.stop()
        target.close()
    return {"replies": replies, "output": daemon.output()}


@needs_netns
def test_from_rule_matches_ipv4_clients_of_a_dual_stack_listener():
    # An IPv4 client of a "::" socket arrives as ::ffff:127.0.0.1; `from` 127.0.0.0/8
    # must still match it (and the log shows it as IPv4).
    # Private destinations allowed, so the IPv6 client's denial is the default action's.
    config = RESTRICTED.replace("[access]\n", '[access]\nprivate_destinations = "allow"\n')
    result = call_in_netns(dual_stack_rules_in_netns, config)
    assert result["replies"] == {
        "127.0.0.1": Reply.SUCCEEDED,
        "::1": Reply.CONNECTION_NOT_ALLOWED,  # not in `from`: default deny
    }
    lines = result["output"].splitlines()
    assert len(matching(lines, "client=127.0.0.1:", "reply=00")) == 1
    assert len(matching(lines, "client=[::1]:", "reply=02", "rule=default deny")) == 1


# ---- private destinations behind an exposed listener ----


@netns_only
def private_destinations_in_netns(config_text: str) -> dict[str, Any]:
    """Run inside a private network namespace: socks5d --allow-open on 0.0.0.0 with
    `config_text`; the replies to loopback destinations, echo round trips, the log."""
    target = TargetServer(echo)
    with tempfile.TemporaryDirectory() as folder:
        config = Path(folder) / "config.toml"
        config.write_text(config_text)
        daemon = DaemonProcess(
            "--config", str(config), "--host", "0.0.0.0", "--port", "0", "--allow-open"
        )
    proxy = ("127.0.0.1", daemon.port)
    port = target.port
    result: dict[str, Any] = {"echo_port": port, "proxy_port": daemon.port, "replies": {}}
    try:
        destinations = {
            "127.0.0.1": ip("127.0.0.1", port),
            "localhost": name("localhost", port),
            "127.0.0.3": ip("127.0.0.3", port),
            "::1": ip("::1", port),
            "::ffff:127.0.0.1": ip("::ffff:127.0.0.1", port),  # IPv4-mapped: the same host
            "0.0.0.0": ip("0.0.0.0", port),  # connect() to 0.0.0.0 reaches this host
            "own listener": ip("127.0.0.1", daemon.port),
            "own listener, other address": ip("127.0.0.5", daemon.port),  # a wildcard listener
        }
        for label, destination in destinations.items():
            result["replies"][label] = reply_to(proxy, destination)
        echoed = {}
        for label in ("127.0.0.1", "localhost", "::ffff:127.0.0.1"):
            if result["replies"][label] == Reply.SUCCEEDED:
                echoed[label] = round_trip(proxy, destinations[label], label.encode()).decode()
        result["echoed"] = echoed
        expected_lines = len(destinations) + len(echoed)
        wait_until(lambda: len(matching(daemon.lines, "cmd=CONNECT")) >= expected_lines)
    finally:
        daemon.stop()
        target.close()
    result["output"] = daemon.output()
    return result


def denial(output: str, target: str) -> str:
    """The rule= field of the access line for a denied CONNECT to `target`."""
    lines = matching(output.splitlines(), f"target={target} ", "reply=02")
    assert len(lines) == 1, f"{target}: {lines}\n{output}"
    found = re.search(r" rule=(.+?) end=", lines[0])
    assert found, lines[0]
    return found.group(1)


@needs_netns
def test_exposed_listener_denies_private_destinations():
    result = call_in_netns(private_destinations_in_netns, "")
    port = result["echo_port"]
    assert result["replies"] == {
        "127.0.0.1": Reply.CONNECTION_NOT_ALLOWED,
        "localhost": Reply.CONNECTION_NOT_ALLOWED,  # the name's resolved address is checked
        "127.0.0.3": Reply.CONNECTION_NOT_ALLOWED,
        "::1": Reply.CONNECTION_NOT_ALLOWED,
        "::ffff:127.0.0.1": Reply.CONNECTION_NOT_ALLOWED,
        "0.0.0.0": Reply.CONNECTION_NOT_ALLOWED,
        "own listener": Reply.CONNECTION_NOT_ALLOWED,
        "own listener, other address": Reply.CONNECTION_NOT_ALLOWED,
    }
    output = result["output"]
    for target in ("127.0.0.1", "localhost", "::1", "::ffff:127.0.0.1", "0.0.0.0"):
        logged = str(Address.from_host(target, port))  # as the log spells it
        assert denial(output, logged) == "private destination", target
    assert denial(output, f"127.0.0.1:{result['proxy_port']}") == "own listener"
    assert denial(output, f"127.0.0.5:{result['proxy_port']}") == "own listener"


UNLOCK_LOOPBACK = """\
[[rules]]
action = "deny"
to = ["127.0.0.3"]
[[rules]]
action = "allow"
to = ["127.0.0.0/8"]
"""


@needs_netns
def test_allow_rule_naming_a_private_network_unlocks_it():
    result = call_in_netns(private_destinations_in_netns, UNLOCK_LOOPBACK)
    port = result["echo_port"]
    assert result["replies"] == {
        "127.0.0.1": Reply.SUCCEEDED,  # rules[1] names 127.0.0.0/8 in `to`
        "localhost": Reply.SUCCEEDED,  # resolves into 127.0.0.0/8
        "127.0.0.3": Reply.CONNECTION_NOT_ALLOWED,  # rules[0] comes first
        "::1": Reply.CONNECTION_NOT_ALLOWED,  # not in the `to` of rules[1]: still private
        "::ffff:127.0.0.1": Reply.SUCCEEDED,  # the mapped form is matched as IPv4
        "0.0.0.0": Reply.CONNECTION_NOT_ALLOWED,  # not in 127.0.0.0/8: still private
        "own listener": Reply.CONNECTION_NOT_ALLOWED,  # the loop guard beats every rule
        "own listener, other address": Reply.CONNECTION_NOT_ALLOWED,
    }
    assert result["echoed"] == {
        "127.0.0.1": "127.0.0.1",
        "localhost": "localhost",
        "::ffff:127.0.0.1": "::ffff:127.0.0.1",
    }
    output = result["output"]
    assert denial(output, f"127.0.0.3:{port}") == "rules[0]"
    assert denial(output, f"[::1]:{port}") == "private destination"
    assert denial(output, f"0.0.0.0:{port}") == "private destination"
    assert denial(output, f"127.0.0.1:{result['proxy_port']}") == "own listener"
    assert denial(output, f"127.0.0.5:{result['proxy_port']}") == "own listener"


# ---- a loopback-only listener ----


def test_loopback_listener_allows_private_destinations(daemon_factory, echo_target):
    daemon = daemon_factory("--port", "0")
    proxy = ("127.0.0.1", daemon.port)
    assert round_trip(proxy, ip("127.0.0.1", echo_target.port), b"local") == b"local"
    assert round_trip(proxy, name("localhost", echo_target.port), b"by name") == b"by name"
    line = access_line(daemon, f"target=127.0.0.1:{echo_target.port}")
    assert "reply=00" in line and "rule=-" in line


def test_private_destinations_deny_applies_to_a_loopback_listener_too(
    daemon_factory, tmp_path, echo_target
):
    config = '[access]\nprivate_destinations = "deny"\n'
    daemon = start(daemon_factory, tmp_path, config, "--port", "0")
    proxy = ("127.0.0.1", daemon.port)
    assert reply_to(proxy, ip("127.0.0.1", echo_target.port)) == Reply.CONNECTION_NOT_ALLOWED
    line = access_line(daemon, f"target=127.0.0.1:{echo_target.port}")
    assert "reply=02" in line and "rule=private destination" in line
    assert echo_target.accepted == 0


def test_loop_guard_denies_the_proxys_own_address(daemon_factory):
    daemon = daemon_factory("--port", "0")
    proxy = ("127.0.0.1", daemon.port)
    port = daemon.port
    own = [
        ip("127.0.0.1", port),
        name("localhost", port),  # checked after resolving
        ip("::ffff:127.0.0.1", port),  # the IPv4-mapped spelling
        ip("0.0.0.0", port),  # connect() to 0.0.0.0 reaches this host
    ]
    for target in own:
        assert reply_to(proxy, target) == Reply.CONNECTION_NOT_ALLOWED, target
    for target in own:
        line = access_line(daemon, f"target={target} ")
        assert "reply=02" in line and "rule=own listener" in line, line
    # Another loopback address on the same port is not us: nothing listens there.
    assert reply_to(proxy, ip("127.0.0.2", port)) == Reply.CONNECTION_REFUSED


# ---- [[rules]] through the daemon ----


def test_rule_denies_a_destination_network(daemon_factory, tmp_path, echo_target):
    config = '[[rules]]\naction = "deny"\nto = ["127.0.0.2/31"]\n'
    daemon = start(daemon_factory, tmp_path, config, "--port", "0")
    proxy = ("127.0.0.1", daemon.port)
    port = echo_target.port
    assert reply_to(proxy, ip("127.0.0.2", port)) == Reply.CONNECTION_NOT_ALLOWED
    assert reply_to(proxy, ip("127.0.0.3", port)) == Reply.CONNECTION_NOT_ALLOWED
    assert round_trip(proxy, ip("127.0.0.1", port), b"outside the /31") == b"outside the /31"
    assert "rule=rules[0]" in access_line(daemon, f"target=127.0.0.2:{port}", "reply=02")
    assert "rule=rules[0]" in access_line(daemon, f"target=127.0.0.3:{port}", "reply=02")
    assert "rule=-" in access_line(daemon, f"target=127.0.0.1:{port}", "reply=00")


def test_rule_denies_a_host_name_exactly_and_not_its_address(daemon_factory, tmp_path, echo_target):
    config = (
        '[[rules]]\naction = "deny"\nto = ["*.localhost"]\n'  # sub-domains only
        '[[rules]]\naction = "deny"\nto = ["LOCALHOST."]\n'  # case and final dot ignored
    )
    daemon = start(daemon_factory, tmp_path, config, "--port", "0")
    proxy = ("127.0.0.1", daemon.port)
    port = echo_target.port
    assert reply_to(proxy, name("localhost", port)) == Reply.CONNECTION_NOT_ALLOWED
    assert reply_to(proxy, name("LocalHost", port)) == Reply.CONNECTION_NOT_ALLOWED
    # An IP address is matched by CIDRs only, not by the name it belongs to.
    assert round_trip(proxy, ip("127.0.0.1", port), b"by address") == b"by address"
    assert "rule=rules[1]" in access_line(daemon, f"target=localhost:{port}", "reply=02")
    assert "rule=rules[1]" in access_line(daemon, f"target=LocalHost:{port}", "reply=02")


@netns_only
def denied_name_in_netns() -> dict[str, Any]:
    """Run inside a private network namespace (no DNS server is reachable): a loopback
    socks5d with a deny rule for a name that does not resolve."""
    with tempfile.TemporaryDirectory() as folder:
        config = Path(folder) / "config.toml"
        config.write_text('[[rules]]\naction = "deny"\nto = ["*.blocked.test"]\n')
        daemon = DaemonProcess("--config", str(config), "--port", "0")
    try:
        reply = reply_to(("127.0.0.1", daemon.port), name("www.blocked.test", 80))
        wait_until(lambda: bool(matching(daemon.lines, "cmd=CONNECT")))
    finally:
        daemon.stop()
    return {"reply": reply, "output": daemon.output()}


@needs_netns
def test_a_denied_name_is_refused_without_resolving_it():
    result = call_in_netns(denied_name_in_netns)
    assert result["reply"] == Reply.CONNECTION_NOT_ALLOWED, result["output"]
    assert "rule=rules[0]" in result["output"]


def test_rule_denies_a_port_range(daemon_factory, tmp_path, target_factory):
    denied, allowed = target_factory(echo), target_factory(echo)
    config = f'[[rules]]\naction = "deny"\nports = ["1-1023", "{denied.port}-{denied.port}"]\n'
    daemon = start(daemon_factory, tmp_path, config, "--port", "0")
    proxy = ("127.0.0.1", daemon.port)
    for port in (1, 1023, denied.port):
        assert reply_to(proxy, ip("127.0.0.1", port)) == Reply.CONNECTION_NOT_ALLOWED, port
        assert "rule=rules[0]" in access_line(daemon, f"target=127.0.0.1:{port} ", "reply=02")
    assert round_trip(proxy, ip("127.0.0.1", allowed.port), b"open port") == b"open port"
    assert denied.accepted == 0


USERS = """\
[[users]]
name = "alice"
password = "alice-pw"
[[users]]
name = "bob"
password = "bob-pw"
"""


def test_rule_denies_a_user(daemon_factory, tmp_path, echo_target):
    config = USERS + '[[rules]]\naction = "deny"\nusers = ["bob"]\n'
    daemon = start(daemon_factory, tmp_path, config, "--port", "0")
    proxy = ("127.0.0.1", daemon.port)
    target = ip("127.0.0.1", echo_target.port)
    assert reply_to(proxy, target, credentials=(b"bob", b"bob-pw")) == 2
    assert round_trip(proxy, target, b"alice", credentials=(b"alice", b"alice-pw")) == b"alice"
    assert "rule=rules[0]" in access_line(daemon, "user=bob ", "reply=02")
    assert "reply=00" in access_line(daemon, "user=alice ", "cmd=CONNECT")


def test_rule_denies_bind_but_not_connect(daemon_factory, tmp_path, echo_target):
    config = '[[rules]]\naction = "deny"\ncommands = ["bind"]\n'
    daemon = start(daemon_factory, tmp_path, config, "--port", "0")
    proxy = ("127.0.0.1", daemon.port)
    bind = reply_to(proxy, ip("127.0.0.1", 0), command=Command.BIND)
    assert bind == Reply.CONNECTION_NOT_ALLOWED
    assert round_trip(proxy, ip("127.0.0.1", echo_target.port), b"conn") == b"conn"
    assert "rule=rules[0]" in access_line(daemon, "cmd=BIND", "reply=02")


@needs_127_0_0_2
def test_rule_denies_a_client_network(daemon_factory, tmp_path, echo_target):
    config = '[[rules]]\naction = "deny"\nfrom = ["127.0.0.2/32"]\n'
    daemon = start(daemon_factory, tmp_path, config, "--port", "0")
    proxy = ("127.0.0.1", daemon.port)
    target = ip("127.0.0.1", echo_target.port)
    assert reply_to(proxy, target, source="127.0.0.2") == Reply.CONNECTION_NOT_ALLOWED
    assert round_trip(proxy, target, b"from .1", source="127.0.0.1") == b"from .1"
    assert "rule=rules[0]" in access_line(daemon, "client=127.0.0.2:", "reply=02")
    assert "reply=00" in access_line(daemon, "client=127.0.0.1:", "cmd=CONNECT")


def test_default_deny_allows_only_what_a_rule_allows(daemon_factory, tmp_path, target_factory):
    allowed, other = target_factory(echo), target_factory(echo)
    config = (
        '[access]\ndefault_action = "deny"\n'
        f'[[rules]]\naction = "allow"\nto = ["127.0.0.1"]\nports = [{allowed.port}]\n'
    )
    daemon = start(daemon_factory, tmp_path, config, "--port", "0")
    proxy = ("127.0.0.1", daemon.port)
    assert round_trip(proxy, ip("127.0.0.1", allowed.port), b"allowed") == b"allowed"
    assert reply_to(proxy, ip("127.0.0.1", other.port)) == Reply.CONNECTION_NOT_ALLOWED
    assert reply_to(proxy, name("localhost", allowed.port)) == Reply.SUCCEEDED  # resolved in
    assert "rule=default deny" in access_line(daemon, f"target=127.0.0.1:{other.port}", "reply=02")
    assert other.accepted == 0


def udp_through(
    proxy: tuple[str, int],
    datagrams: list[tuple[int, bytes]],
    silence: float = 0.5,
    host: str = "127.0.0.1",
    login: tuple[bytes, bytes] | None = None,
) -> tuple[int, list[str | None]]:
    """UDP ASSOCIATE, then each (port, payload) to a UDP echo on host:port through the
    relay, one at a time: (reply, the payloads echoed back, None for silence)."""
    control, reply, relay = handshake(
        proxy, ANY_IPV4, credentials=login, command=Command.UDP_ASSOCIATE
    )
    echoed: list[str | None] = []
    with control, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        if reply != Reply.SUCCEEDED:
            return reply, echoed
        udp.bind(("127.0.0.1", 0))
        for port, payload in datagrams:
            udp.sendto(encode_udp_datagram(ip(host, port), payload), (relay.host, relay.port))
            udp.settimeout(silence)
            try:
                answer = parse_udp_datagram(udp.recv(65536))
            except TimeoutError:
                echoed.append(None)  # dropped: nothing came back
                continue
            assert answer.address == ip(host, port)  # wrapped with the sender
            echoed.append(answer.data.decode())
    return reply, echoed


def test_udp_rule_drops_datagrams_to_a_denied_port(daemon_factory, tmp_path):
    allowed, denied = UdpEcho(), UdpEcho()
    try:
        config = f'[[rules]]\naction = "deny"\ncommands = ["udp"]\nports = [{denied.port}]\n'
        daemon = start(daemon_factory, tmp_path, config, "--port", "0")
        sends = [(allowed.port, b"one"), (denied.port, b"two"), (allowed.port, b"three")]
        reply, echoed = udp_through(("127.0.0.1", daemon.port), sends)
        assert reply == Reply.SUCCEEDED  # the association itself is allowed
        assert echoed == ["one", None, "three"]
        assert denied.received == []
        line = access_line(daemon, "cmd=UDP_ASSOCIATE")
        assert "datagrams up=2 down=2 dropped=1" in line
    finally:
        allowed.close()
        denied.close()


@netns_only
def udp_private_in_netns(config_text: str) -> dict[str, Any]:
    """Run inside a private network namespace: socks5d --allow-open on 0.0.0.0, a UDP
    association sending one datagram to a loopback UDP echo."""
    udp_echo = UdpEcho()
    with tempfile.TemporaryDirectory() as folder:
        config = Path(folder) / "config.toml"
        config.write_text(config_text)
        daemon = DaemonProcess(
            "--config", str(config), "--host", "0.0.0.0", "--port", "0", "--allow-open"
        )
    try:
        reply, echoed = udp_through(("127.0.0.1", daemon.port), [(udp_echo.port, b"ping")])
        wait_until(lambda: bool(matching(daemon.lines, "cmd=UDP_ASSOCIATE")))
    finally:
        daemon.stop()
        udp_echo.close()
    return {"reply": reply, "echoed": echoed, "received": len(udp_echo.received)}


@needs_netns
@pytest.mark.parametrize(
    ("config", "expected"),
    [
        pytest.param("", None, id="private"),
        pytest.param('[[rules]]\naction = "allow"\nto = ["127.0.0.1"]\n', "ping", id="allowed"),
    ],
)
def test_exposed_listener_drops_datagrams_to_private_destinations(config, expected):
    result = call_in_netns(udp_private_in_netns, config)
    assert result["reply"] == Reply.SUCCEEDED
    assert result["echoed"] == [expected]
    assert result["received"] == (0 if expected is None else 1)


# ---- users and password hashes ----


# Self-describing hashes: 16-byte salt and 32-byte digest in unpadded base64.
HASHES = {
    "scrypt": r"scrypt\$ln=14,r=8,p=1\$[A-Za-z0-9+/]{22}\$[A-Za-z0-9+/]{43}",
    "pbkdf2_sha256": r"pbkdf2_sha256\$600000\$[A-Za-z0-9+/]{22}\$[A-Za-z0-9+/]{43}",
}


@pytest.mark.parametrize("scheme", HASHES)
def test_hash_password_output_logs_in(daemon_factory, tmp_path, echo_target, scheme):
    result = run_cli("hash-password", "--scheme", scheme, input="correct horse\n")
    assert result.returncode == 0, result.stderr
    encoded = result.stdout.strip()
    assert re.fullmatch(HASHES[scheme], encoded), encoded
    assert result.stdout.count("\n") == 1 and "correct horse" not in result.stdout
    config = f'[[users]]\nname = "carol"\npassword_hash = "{encoded}"\n'
    daemon = start(daemon_factory, tmp_path, config, "--port", "0")
    proxy = ("127.0.0.1", daemon.port)
    target = ip("127.0.0.1", echo_target.port)
    echoed = round_trip(proxy, target, b"hashed", credentials=(b"carol", b"correct horse"))
    assert echoed == b"hashed"
    with pytest.raises(AssertionError):
        handshake(proxy, target, credentials=(b"carol", b"correct horse!"))
    assert "reply=00" in access_line(daemon, "user=carol ", "cmd=CONNECT")
    assert "plaintext" not in daemon.output()
    assert "correct horse" not in daemon.output()


def test_plaintext_password_logs_a_warning_naming_the_user(daemon_factory, tmp_path):
    config = '[[users]]\nname = "dave"\npassword = "plain-secret"\n'
    daemon = start(daemon_factory, tmp_path, config, "--port", "0")
    warning = next(line for line in daemon.lines if "plaintext password" in line)
    assert warning.startswith("WARNING ")
    assert "users[0] (dave)" in warning and "hash-password" in warning
    assert "plain-secret" not in daemon.output()


@pytest.mark.parametrize(
    ("stdin", "problem"),
    [
        ("", "the password is empty"),
        ("\n", "the password is empty"),
        ("x" * 256 + "\n", "RFC 1929 passwords are at most 255 bytes"),
    ],
)
def test_hash_password_with_an_unusable_password_exits_2(stdin, problem):
    result = run_cli("hash-password", input=stdin)
    assert result.returncode == 2
    assert result.stdout == ""
    assert problem in result.stderr


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("scrypt$ln=14,r=8,p=1$!!!$abc", "malformed scrypt hash"),
        ("scrypt$ln=99,r=8,p=1$c2FsdA$abc", "scrypt parameters out of range"),
        ("hunter2", "must be a password hash starting with"),
    ],
)
def test_malformed_password_hash_exits_2_naming_the_key(tmp_path, value, problem):
    config = tmp_path / "config.toml"
    config.write_text(f'[[users]]\nname = "erin"\npassword_hash = "{value}"\n')
    result = run_cli("--config", str(config), "--port", "0", timeout=15)
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"Error: {config}: users[0].password_hash: {problem}")
    assert "hunter2" not in result.stderr  # maybe a password in the wrong key: never echoed


# ---- what a client can put in the log ----

# An RFC 1929 username is up to 255 arbitrary bytes, sent before any check: a newline in
# it must not start a line of its own in the access log.
FORGED = "INFO id=000000000000 client=203.0.113.9:1 user=alice cmd=CONNECT"
INJECTING_NAME = f"mallory end='x'\n{FORGED}"


def failed_login(proxy: tuple[str, int], username: bytes) -> bytes:
    with socket.create_connection(proxy, timeout=TIMEOUT) as sock:
        sock.sendall(encode_greeting([Method.USERNAME_PASSWORD]))
        assert recv_exactly(sock, 2) == b"\x05\x02"
        sock.sendall(encode_username_password(username, b"wrong"))
        return recv_exactly(sock, 2)


def test_a_username_cannot_forge_an_access_log_line(daemon_factory):
    daemon = daemon_factory("--port", "0", "--user", "alice:pw")
    assert failed_login(("127.0.0.1", daemon.port), INJECTING_NAME.encode()) == b"\x01\x01"
    assert wait_until(lambda: "authentication failed" in daemon.output())
    daemon.stop()
    assert not [line for line in daemon.lines if line.startswith("INFO id=000000000000 ")]
    (line,) = matching(daemon.lines, "client=127.0.0.1:", "end='authentication failed'")
    assert line.startswith("INFO id=")


def test_json_log_keeps_a_hostile_username_inside_its_field(daemon_factory):
    daemon = daemon_factory("--port", "0", "--user", "alice:pw", "--log-format", "json")
    assert failed_login(("127.0.0.1", daemon.port), INJECTING_NAME.encode()) == b"\x01\x01"
    assert wait_until(lambda: "authentication failed" in daemon.output())
    daemon.stop()
    records = [json.loads(line) for line in daemon.lines]
    (access,) = [record for record in records if record.get("event") == "access"]
    assert access["user"] == INJECTING_NAME
    assert access["end"] == "authentication failed"
    assert access["client"].startswith("127.0.0.1:")


# ---- the failed-login back-off ----


def timed_login(
    proxy: tuple[str, int], credentials: tuple[bytes, bytes], source: str
) -> tuple[bytes, float]:
    """(RFC 1929 status reply, seconds from sending the credentials to the answer)."""
    with socket.socket() as sock:
        sock.settimeout(TIMEOUT)
        sock.bind((source, 0))
        sock.connect(proxy)
        sock.sendall(encode_greeting([Method.USERNAME_PASSWORD]))
        assert recv_exactly(sock, 2) == b"\x05\x02"
        started = time.monotonic()
        sock.sendall(encode_username_password(*credentials))
        status = recv_exactly(sock, 2)
        return status, time.monotonic() - started


@needs_127_0_0_2
def test_failed_login_slows_the_next_attempt_from_that_address_only(
    daemon_factory, tmp_path, proxy_mode
):
    # A long delay, so "not held back" and "waits its turn" differ by seconds whatever
    # the machine's load: the bounds below are fractions of it, not latency targets.
    delay = 3.0
    config = (
        f'[server]\nmode = "{proxy_mode}"\n[auth]\nfailure_delay = {delay}\n'
        '[[users]]\nname = "alice"\npassword = "right"\n'
        '[[users]]\nname = "bob"\npassword = "right"\n'
    )
    daemon = start(daemon_factory, tmp_path, config, "--port", "0")
    proxy = ("127.0.0.1", daemon.port)
    status, _ = timed_login(proxy, (b"alice", b"wrong"), "127.0.0.1")
    failed_at = time.monotonic()
    assert status == b"\x01\x01"
    # Another address is not held back. (As bob: a password that logged in moments ago
    # is let in without a check, or a wait.)
    status, elapsed = timed_login(proxy, (b"bob", b"right"), "127.0.0.2")
    assert status == b"\x01\x00"
    assert elapsed < delay / 2, f"127.0.0.2 waited {elapsed:.3f} s"
    # The failing address waits its turn, even with the right password.
    status, elapsed = timed_login(proxy, (b"alice", b"right"), "127.0.0.1")
    waited = time.monotonic() - failed_at
    assert status == b"\x01\x00"
    assert 0.9 * delay <= waited < 5 * delay, f"127.0.0.1 answered {waited:.3f} s after its failure"
    assert elapsed < 5 * delay


# ---- connection limits ----


@needs_127_0_0_2
def test_per_address_limit_closes_the_third_connection(
    daemon_factory, tmp_path, echo_target, proxy_mode
):
    config = f'[server]\nmode = "{proxy_mode}"\n[limits]\nmax_connections_per_ip = 2\n'
    daemon = start(daemon_factory, tmp_path, config, "--port", "0")
    proxy = ("127.0.0.1", daemon.port)
    target = ip("127.0.0.1", echo_target.port)
    held = [handshake(proxy, target)[0] for _ in range(2)]
    try:
        with socket.create_connection(proxy, timeout=TIMEOUT) as third:
            assert recv_all(third) == b""  # closed before the greeting, without a word
        assert round_trip(proxy, target, b"other address", source="127.0.0.2") == b"other address"
        for sock in held:  # the two held tunnels are unharmed
            sock.sendall(b"held")
            assert recv_exactly(sock, 4) == b"held"
        assert wait_until(lambda: "max_connections_per_ip=2" in daemon.output())
    finally:
        for sock in held:
            sock.close()

    def slot_free_again() -> bool:
        try:
            return round_trip(proxy, target, b"freed") == b"freed"
        except (EOFError, OSError):
            return False  # still refused: the held ones are not counted out yet

    assert wait_until(slot_free_again)  # closed tunnels give their slots back


def test_per_user_limit_fails_the_second_tunnel_of_that_user(
    daemon_factory, tmp_path, echo_target, proxy_mode
):
    config = f'[server]\nmode = "{proxy_mode}"\n[limits]\nmax_connections_per_user = 1\n' + USERS
    daemon = start(daemon_factory, tmp_path, config, "--port", "0")
    proxy = ("127.0.0.1", daemon.port)
    target = ip("127.0.0.1", echo_target.port)
    first, reply, _ = handshake(proxy, target, credentials=(b"alice", b"alice-pw"))
    with first:
        assert reply == Reply.SUCCEEDED
        # The login succeeds (handshake checks 01 00); the request then fails with 01.
        second = reply_to(proxy, target, credentials=(b"alice", b"alice-pw"))
        assert second == Reply.GENERAL_FAILURE
        echoed = round_trip(proxy, target, b"bob too", credentials=(b"bob", b"bob-pw"))
        assert echoed == b"bob too"
        first.sendall(b"first")
        assert recv_exactly(first, 5) == b"first"
    line = access_line(daemon, "user=alice ", "reply=01")
    assert "per-user connection limit" in line
    # The slot is given back before the access line of the first tunnel is written.
    access_line(daemon, "user=alice ", "reply=00")
    again = round_trip(proxy, target, b"again", credentials=(b"alice", b"alice-pw"))
    assert again == b"again"


# ---- socks5d check-config ----


CHECKED = """\
[server]
listen = ["127.0.0.1:1080", "[::1]:1080"]
[access]
default_action = "deny"
[[users]]
name = "alice"
password = "a"
[[users]]
name = "bob"
password = "b"
[[rules]]
action = "deny"
to = ["*.example.com", "10.0.0.0/8"]
ports = [25, "8000-8080"]
[[rules]]
action = "allow"
from = ["127.0.0.0/8"]
users = ["alice"]
commands = ["connect", "udp"]
"""


def test_check_config_prints_the_policy(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text(CHECKED)
    result = run_cli("check-config", str(config))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:11] == [
        "listening on 127.0.0.1:1080 (loopback only)",
        "listening on [::1]:1080 (loopback only)",
        'PROXY protocol: off (server.proxy_protocol = "off"): clients connect directly; '
        "a connection that begins with a PROXY header is not SOCKS and is closed",
        "authentication: required (RFC 1929), 2 user(s): alice, bob",
        "SOCKS4/4a: refused (reply 91): logins are required and SOCKS4 has none"
        ' (server.socks4 = "auto")',
        "rules[0]: deny to *.example.com, 10.0.0.0/8 ports 25, 8000-8080",
        "rules[1]: allow from 127.0.0.0/8 users alice commands connect, udp",
        "default action: deny",
        "upstreams: none (every CONNECT goes directly to its target)",
        'private destinations: allowed (access.private_destinations = "auto")',
        "exposure: loopback only; only this host can use the proxy",
    ]
    assert lines[-1] == f"{config}: OK"
    assert "password" not in result.stdout.replace("password_hash", "")


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[limits]\nmax_connections_per_ip = -1\n", "limits.max_connections_per_ip"),
        ('[[rules]]\naction = "allow"\nports = ["90-80"]\n', "rules[0].ports"),
        ('[[users]]\nname = "x"\npassword_hash = "scrypt$nope"\n', "users[0].password_hash"),
    ],
)
def test_check_config_rejects_a_bad_file_naming_the_key(tmp_path, text, key):
    config = tmp_path / "config.toml"
    config.write_text(text)
    result = run_cli("check-config", str(config))
    assert result.returncode == 2
    assert f"{config}: {key}:" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_config_flags_an_open_proxy(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text('[server]\nhost = "0.0.0.0"\n')  # checked, never bound
    result = run_cli("check-config", str(config))
    assert result.returncode == 2
    assert "listening on 0.0.0.0:1080 (reachable from other hosts)" in result.stdout
    assert "authentication: none" in result.stdout
    assert "open proxy" in (result.stdout + result.stderr).lower()
    assert "--allow-open" in result.stderr
    assert f"{config}: OK" not in result.stdout


@pytest.mark.parametrize(
    ("text", "exposure"),
    [
        (
            '[server]\nhost = "0.0.0.0"\n[[users]]\nname = "a"\npassword = "b"\n',
            "exposure: 0.0.0.0:1080 reachable from other hosts; clients must log in",
        ),
        (
            '[server]\nlisten = ["[::]:1080"]\n' + RESTRICTED,
            "exposure: [::]:1080 reachable; only clients matched by `from` of allow rules",
        ),
        (
            '[server]\nhost = "0.0.0.0"\nallow_open = true\n',
            "exposure: OPEN PROXY on 0.0.0.0:1080 (server.allow_open = true)",
        ),
    ],
    ids=["users", "rules", "allow_open"],
)
def test_check_config_accepts_an_exposed_listener_that_is_safe_or_meant(tmp_path, text, exposure):
    config = tmp_path / "config.toml"
    config.write_text(text)
    result = run_cli("check-config", str(config))
    assert result.returncode == 0, result.stderr
    assert any(line.startswith(exposure) for line in result.stdout.splitlines()), result.stdout
    assert (
        "private destinations and this host's own addresses:"
        " denied unless an allow rule names them explicitly" in result.stdout
    )
    assert result.stdout.splitlines()[-1] == f"{config}: OK"
