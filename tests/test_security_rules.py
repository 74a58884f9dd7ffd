"""Regression tests for the destination-policy holes of the security review (issue 9):
this host's own addresses (1), a handshake spanning a reload (3), `/0` rules opening
private destinations (8), BIND with an all-zero DST on an exposed listener (12),
IPv4-mapped networks in rules (13), and the smaller ones found with them (local-use
NAT64 and a cloud host address as private destinations, a name denied by a later rule
leaking to DNS).

Each test performs the attack; on the code before the fix each one got reply 00 (or a
working datagram) where it now gets 02. Exposed listeners run inside a private network
namespace (tests/netns.py), where 198.51.100.1/32 on `lo` plays this host's public
address.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest
from clients import TIMEOUT, UdpEcho, read_reply, recv_all, recv_exactly, wait_until
from conftest import DaemonProcess, TargetServer, echo, running_proxy
from netns import call_in_netns, needs_netns, netns_only
from test_security import matching, name, udp_through

from socks5d.ops.config import parse_config
from socks5d.policy.rules import Policy, describe_policy, is_private
from socks5d.socks.protocol import (
    Address,
    AddressType,
    Command,
    Reply,
    encode_greeting,
    encode_request,
)

OWN = "198.51.100.1"  # this host's "public" address inside the test namespace


def policy(*entries: dict[str, Any], default: str = "allow", own: str = OWN) -> Policy:
    """An exposed listener's policy (private destinations protected) with [[rules]];
    `own` is the one address this pretend host has besides loopback."""
    config = parse_config({"rules": list(entries)})
    return Policy(
        rules=config.rules,
        default_allow=default == "allow",
        protect_private=True,
        own_address=lambda ip: ip == own,
    )


def decide(p: Policy, ip: str | None, command: str = "connect", host: str | None = None):
    decision = p.check("203.0.113.9", None, command, host, ip, 8080)
    return decision.allowed, decision.reason


# ---- 1. this host's own addresses ----


@pytest.mark.parametrize("command", ["connect", "bind", "udp"])
@pytest.mark.parametrize(
    ("rules", "expected"),
    [
        pytest.param([], (False, "own address"), id="no rules"),
        pytest.param(
            [{"action": "allow", "to": ["0.0.0.0/0", "::/0"]}],
            (False, "own address"),
            id="allow /0 does not name it",
        ),
        pytest.param(
            [{"action": "allow", "to": ["198.51.100.0/24"]}],
            (False, "own address"),
            id="allow its /24 does not name it",
        ),
        pytest.param(
            [{"action": "allow", "to": [OWN]}], (True, "rules[0]"), id="allow the address itself"
        ),
        pytest.param(
            [{"action": "allow", "to": ["::ffff:198.51.100.1"]}],
            (True, "rules[0]"),
            id="allow its mapped spelling",
        ),
    ],
)
def test_own_address_is_a_private_destination(rules, expected, command):
    assert decide(policy(*rules), OWN, command) == expected


def test_own_address_in_every_spelling_is_denied():
    p = policy()
    for spelling in (OWN, f"::ffff:{OWN}"):
        assert decide(p, spelling) == (False, "own address"), spelling
    assert decide(p, "198.51.100.2") == (True, "default allow")  # a neighbour is not us


def test_own_address_check_is_off_for_a_loopback_listener():
    config = parse_config({})
    p = Policy.from_config(config, [("127.0.0.1", 1080)])
    assert p.check("127.0.0.1", None, "connect", None, "127.0.0.1", 80).allowed


@netns_only
def own_address_in_netns(config_text: str) -> dict[str, Any]:
    """Inside a private network namespace: this host has 198.51.100.1/32 on lo and a
    service bound to 0.0.0.0; socks5d listens on 0.0.0.0 with a login. CONNECT, BIND and
    a UDP datagram to the own address, then an address added after start."""
    subprocess.run(["ip", "addr", "add", f"{OWN}/32", "dev", "lo"], check=True)
    service = TargetServer(echo, host="0.0.0.0")
    udp_service = UdpEcho(host="0.0.0.0")
    with tempfile.TemporaryDirectory() as folder:
        config = Path(folder) / "config.toml"
        config.write_text(config_text)
        daemon = DaemonProcess("--config", str(config), "--host", "0.0.0.0", "--port", "0")
    proxy = ("127.0.0.1", daemon.port)
    login = (b"alice", b"secret")
    result: dict[str, Any] = {}
    try:
        target = Address(AddressType.IPV4, OWN, service.port)
        result["connect"] = reply_with_login(proxy, Command.CONNECT, target, login)
        result["bind"] = reply_with_login(proxy, Command.BIND, target, login)
        result["udp"] = udp_through(proxy, [(udp_service.port, b"ping")], host=OWN, login=login)
        result["udp received"] = len(udp_service.received)
        subprocess.run(["ip", "addr", "add", "198.51.100.7/32", "dev", "lo"], check=True)
        later = Address(AddressType.IPV4, "198.51.100.7", service.port)
        result["added later"] = reply_with_login(proxy, Command.CONNECT, later, login)
        result["service accepted"] = service.accepted
        wait_until(lambda: len(matching(daemon.lines, "cmd=")) >= 4)
    finally:
        daemon.stop()
        service.close()
        udp_service.close()
    result["output"] = daemon.output()
    return result


def reply_with_login(
    proxy: tuple[str, int], command: Command, target: Address, login: tuple[bytes, bytes]
) -> int:
    """The first reply to `command` after an RFC 1929 login."""
    from test_security import handshake

    sock, reply, _ = handshake(proxy, target, credentials=login, command=command)
    sock.close()
    return reply


LOGIN = '[[users]]\nname = "alice"\npassword = "secret"\n'


@needs_netns
def test_exposed_proxy_does_not_reach_services_on_the_hosts_own_address():
    result = call_in_netns(own_address_in_netns, LOGIN)
    assert result["connect"] == Reply.CONNECTION_NOT_ALLOWED, result["output"]
    assert result["bind"] == Reply.CONNECTION_NOT_ALLOWED
    assert result["udp"] == [Reply.SUCCEEDED, [None]]  # the association works, the datagram not
    assert result["udp received"] == 0
    assert result["added later"] == Reply.CONNECTION_NOT_ALLOWED
    assert result["service accepted"] == 0
    assert "rule=own address" in result["output"]


@needs_netns
def test_an_allow_rule_naming_the_own_address_opens_it():
    config = LOGIN + f'[[rules]]\naction = "allow"\nto = ["{OWN}"]\n'
    result = call_in_netns(own_address_in_netns, config)
    assert result["connect"] == Reply.SUCCEEDED, result["output"]
    assert result["udp"] == [Reply.SUCCEEDED, ["ping"]]
    assert result["added later"] == Reply.CONNECTION_NOT_ALLOWED  # not named by the rule


# ---- 8. an allow rule to 0.0.0.0/0 does not open private destinations ----

OPEN_EVERYTHING = [
    {"action": "allow", "from": ["127.0.0.0/8"], "to": ["0.0.0.0/0", "::/0"]},
]


@pytest.mark.parametrize(
    "target", ["127.0.0.1", "::1", "169.254.169.254", "10.1.2.3", "::ffff:10.1.2.3", "fd00::1"]
)
def test_allow_to_slash_zero_does_not_open_private_destinations(target):
    p = policy(*OPEN_EVERYTHING, default="deny")
    decision = p.check("127.0.0.1", None, "connect", None, target, 80)
    assert (decision.allowed, decision.reason) == (False, "private destination")
    public = p.check("127.0.0.1", None, "connect", None, "203.0.113.5", 80)
    assert (public.allowed, public.reason) == (True, "rules[0]")


def test_allow_to_slash_zero_with_a_name_does_not_open_localhost():
    p = policy(*OPEN_EVERYTHING, default="deny")
    decision = p.check("127.0.0.1", None, "connect", "localhost", "127.0.0.1", 80)
    assert (decision.allowed, decision.reason) == (False, "private destination")


@pytest.mark.parametrize(
    ("to", "target", "opened"),
    [
        ("10.0.0.0/8", "10.1.2.3", True),  # the private range itself
        ("10.1.0.0/16", "10.1.2.3", True),  # a network inside it
        ("10.1.2.3", "10.1.2.3", True),  # the address
        ("8.0.0.0/6", "10.1.2.3", False),  # holds 10/8 and public space: merely contains
        ("0.0.0.0/1", "10.1.2.3", False),
        ("::/0", "::1", False),
        ("::1", "::1", True),
        ("fd00::/8", "fd00::1", True),
        ("169.254.169.254", "169.254.169.254", True),
        ("64:ff9b::a00:0/104", "64:ff9b::a01:203", True),  # NAT64 form of 10.0.0.0/8
        ("64:ff9b::/96", "64:ff9b::a01:203", False),  # all of IPv4 behind NAT64
    ],
)
def test_only_a_network_inside_a_private_range_opens_it(to, target, opened):
    decision = decide(policy({"action": "allow", "to": [to]}, default="deny"), target)
    assert decision == ((True, "rules[0]") if opened else (False, "private destination"))


def test_check_config_tells_that_slash_zero_opens_no_private_destination():
    config = parse_config({"access": {"default_action": "deny"}, "rules": OPEN_EVERYTHING})
    lines = describe_policy(config, [("0.0.0.0", 1080)])
    assert (
        "private destinations and this host's own addresses: denied unless an allow rule "
        "names them explicitly in `to` (a network inside a private range, the address itself"
        ", or the exact host name)" in "\n".join(lines)
    )
    assert (
        "note: rules[0] `to` 0.0.0.0/0, ::/0 covers private destinations but does not open "
        "them; name them explicitly" in lines
    )


@netns_only
def slash_zero_in_netns() -> dict[str, Any]:
    """Inside a private network namespace: the finding's exact setup, on 0.0.0.0."""
    target = TargetServer(echo)
    with tempfile.TemporaryDirectory() as folder:
        config = Path(folder) / "config.toml"
        config.write_text(
            '[access]\ndefault_action = "deny"\n[[rules]]\naction = "allow"\n'
            'from = ["127.0.0.0/8"]\nto = ["0.0.0.0/0", "::/0"]\n'
        )
        daemon = DaemonProcess("--config", str(config), "--host", "0.0.0.0", "--port", "0")
    from test_security import reply_to

    proxy = ("127.0.0.1", daemon.port)
    try:
        replies = {
            "127.0.0.1": reply_to(proxy, Address(AddressType.IPV4, "127.0.0.1", target.port)),
            "localhost": reply_to(proxy, name("localhost", target.port)),
            "::1": reply_to(proxy, Address(AddressType.IPV6, "::1", target.port)),
            "10.1.2.3": reply_to(proxy, Address(AddressType.IPV4, "10.1.2.3", 80)),
        }
    finally:
        daemon.stop()
        target.close()
    return {"replies": replies, "accepted": target.accepted, "output": daemon.output()}


@needs_netns
def test_exposed_default_deny_with_slash_zero_rule_keeps_private_destinations_shut():
    result = call_in_netns(slash_zero_in_netns)
    assert result["replies"] == {
        "127.0.0.1": Reply.CONNECTION_NOT_ALLOWED,
        "localhost": Reply.CONNECTION_NOT_ALLOWED,
        "::1": Reply.CONNECTION_NOT_ALLOWED,
        "10.1.2.3": Reply.CONNECTION_NOT_ALLOWED,
    }, result["output"]
    assert result["accepted"] == 0


# ---- 12. BIND with an all-zero DST on an exposed listener ----


@pytest.mark.parametrize("zero", ["0.0.0.0", "::"])
def test_bind_from_anyone_is_not_a_private_destination(zero):
    p = policy()
    assert decide(p, zero, "bind") == (True, "default allow")
    assert decide(p, zero, "connect") == (False, "private destination")  # connect(0.0.0.0)


def test_bind_from_anyone_is_still_subject_to_rules():
    p = policy({"action": "deny", "commands": ["bind"]})
    assert decide(p, "0.0.0.0", "bind") == (False, "rules[0]")
    deny_default = policy(default="deny")
    assert decide(deny_default, "0.0.0.0", "bind") == (False, "default deny")


@netns_only
def bind_from_anyone_in_netns() -> dict[str, Any]:
    """Inside a private network namespace: BIND 0.0.0.0:0 through socks5d on 0.0.0.0,
    then a peer connects to the announced port and a byte crosses."""
    with tempfile.TemporaryDirectory() as folder:
        config = Path(folder) / "config.toml"
        config.write_text(LOGIN)
        daemon = DaemonProcess("--config", str(config), "--host", "0.0.0.0", "--port", "0")
    from test_security import handshake

    try:
        sock, first, bound = handshake(
            ("127.0.0.1", daemon.port),
            Address(AddressType.IPV4, "0.0.0.0", 0),
            credentials=(b"alice", b"secret"),
            command=Command.BIND,
        )
        with sock:
            result: dict[str, Any] = {"first": first}
            if first == Reply.SUCCEEDED:
                with socket.create_connection(("127.0.0.1", bound.port), timeout=TIMEOUT) as peer:
                    second, _ = read_reply(sock)
                    peer.sendall(b"hello")
                    peer.shutdown(socket.SHUT_WR)
                    result["second"] = second
                    result["data"] = recv_all(sock).decode()
    finally:
        daemon.stop()
    result["output"] = daemon.output()
    return result


@needs_netns
def test_bind_with_all_zero_dst_works_on_an_exposed_listener():
    result = call_in_netns(bind_from_anyone_in_netns)
    assert result["first"] == Reply.SUCCEEDED, result["output"]
    assert result["second"] == Reply.SUCCEEDED
    assert result["data"] == "hello"


# ---- 13. IPv4-mapped networks in rules ----


@pytest.mark.parametrize(
    ("written", "meant"),
    [
        ("::ffff:10.0.0.0/104", "10.0.0.0/8"),
        ("::ffff:192.0.2.7", "192.0.2.7/32"),
        ("[::ffff:0:0]/96", "0.0.0.0/0"),
        ("2001:db8::/32", "2001:db8::/32"),  # an ordinary IPv6 network stays as it is
        ("::/0", "::/0"),  # holds the mapped range but is not inside it: IPv6 only
    ],
)
def test_mapped_networks_are_normalised_at_load(written, meant):
    config = parse_config({"rules": [{"action": "deny", "from": [written], "to": [written]}]})
    rule = config.rules[0]
    assert [str(n) for n in rule.sources] == [meant]
    assert [str(n) for n in rule.destinations] == [meant]


def test_mapped_networks_in_rules_match():
    p = policy(
        {"action": "deny", "to": ["::ffff:10.0.0.0/104"]},
        {"action": "deny", "from": ["::ffff:203.0.113.0/120"], "to": ["198.51.100.0/24"]},
    )
    assert p.check("192.0.2.1", None, "connect", None, "10.1.2.3", 80).reason == "rules[0]"
    denied = p.check("203.0.113.9", None, "connect", None, "198.51.100.5", 80)
    assert (denied.allowed, denied.reason) == (False, "rules[1]")


# ---- smaller findings ----


@pytest.mark.parametrize(
    ("address", "private"),
    [
        ("64:ff9b:1::a00:1", True),  # RFC 8215 local-use NAT64
        ("64:ff9b:1:ffff::1", True),
        ("168.63.129.16", True),  # a cloud platform's host address
        ("168.63.129.17", False),
        ("64:ff9b::808:808", False),  # well-known NAT64 of a public address
    ],
)
def test_more_private_destinations(address, private):
    assert is_private(address) is private


def test_a_name_denied_by_a_later_rule_is_refused_before_dns():
    p = policy(
        {"action": "allow", "to": ["10.0.0.0/8"]},
        {"action": "deny", "to": ["*.blocked.test"]},
    )
    # Before resolution (ip None): the later deny wins, so the name is never looked up.
    assert decide(p, None, host="www.blocked.test") == (False, "rules[1]")
    assert decide(p, None, host="www.fine.test") == (True, "rules[0]")  # may resolve into 10/8


def test_the_handler_never_resolves_a_name_a_later_rule_denies():
    looked_up: list[str] = []

    def resolver(host: str, port: int, *args: Any) -> list[Any]:
        looked_up.append(host)
        raise OSError("no DNS here")

    config = parse_config(
        {
            "rules": [
                {"action": "allow", "to": ["10.0.0.0/8"]},
                {"action": "deny", "to": ["*.blocked.test"]},
            ]
        }
    )
    with running_proxy(
        resolver=resolver, policy=Policy.from_config(config, [("127.0.0.1", 1)])
    ) as proxy:
        with socket.create_connection(proxy.address, timeout=TIMEOUT) as sock:
            sock.sendall(encode_greeting([0]))
            assert recv_exactly(sock, 2) == b"\x05\x00"
            sock.sendall(encode_request(Command.CONNECT, name("www.blocked.test", 80)))
            reply, _ = read_reply(sock)
    assert reply == Reply.CONNECTION_NOT_ALLOWED
    assert looked_up == []


# ---- 3. a handshake that spans a reload ----

CONFIG_A = (  # only clients in 10/8; no login
    '[access]\ndefault_action = "deny"\n[[rules]]\naction = "allow"\nfrom = ["10.0.0.0/8"]\n'
)
CONFIG_B = '[[users]]\nname = "alice"\npassword = "secret"\n'  # a login, default allow


@pytest.mark.parametrize("command", [Command.CONNECT, Command.UDP_ASSOCIATE])
@pytest.mark.parametrize("relay_threads", ["1", "0"])
def test_a_handshake_spanning_a_reload_keeps_the_policy_it_began_under(
    tmp_path, echo_target, command, relay_threads
):
    """A greeting answered under config A (no login) must not be carried into config B
    (login required, default allow): the request is judged by A and refused (02)."""
    config = tmp_path / "config.toml"
    config.write_text(CONFIG_A)
    daemon = DaemonProcess("--config", str(config), "--port", "0", "--relay-threads", relay_threads)
    try:
        with socket.create_connection(("127.0.0.1", daemon.port), timeout=TIMEOUT) as sock:
            sock.sendall(encode_greeting([0]))  # NO AUTHENTICATION REQUIRED only
            assert recv_exactly(sock, 2) == b"\x05\x00"
            config.write_text(CONFIG_B)
            daemon.proc.send_signal(signal.SIGHUP)
            assert wait_until(lambda: bool(matching(daemon.lines, "reloaded"))), daemon.output()
            target = Address(AddressType.IPV4, "127.0.0.1", echo_target.port)
            sock.sendall(encode_request(command, target))
            reply, _ = read_reply(sock)
        assert reply == Reply.CONNECTION_NOT_ALLOWED, daemon.output()
        assert wait_until(lambda: bool(matching(daemon.lines, "reply=02")))
        assert echo_target.accepted == 0
        # A new connection is judged by B: it must log in.
        with socket.create_connection(("127.0.0.1", daemon.port), timeout=TIMEOUT) as fresh:
            fresh.sendall(encode_greeting([0]))
            assert recv_exactly(fresh, 2) == b"\x05\xff"
    finally:
        daemon.stop()
