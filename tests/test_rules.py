"""Access rules: each rule key, first match, defaults, private destinations, the loop guard,
and what a configuration exposes. Pure tables: no server, no network (but one bind() probe)."""

from __future__ import annotations

from typing import Any

import pytest

from socks5d.ops.config import Config, parse_config
from socks5d.policy import rules
from socks5d.policy.rules import (
    COMMAND_NAMES,
    Decision,
    Policy,
    describe_policy,
    describe_rule,
    exposure_problem,
    is_local_address,
    is_private,
)
from socks5d.socks.protocol import Command, Reply

# The request every table starts from; a case overrides some of it.
REQUEST: dict[str, Any] = {
    "client_ip": "192.0.2.10",
    "user": "alice",
    "command": "connect",
    "host": None,
    "ip": "198.51.100.7",
    "port": 443,
}


def policy(
    *entries: dict[str, Any],
    default: str = "allow",
    protect: bool = False,
    listeners: tuple[tuple[str, int], ...] = (),
) -> Policy:
    """A Policy from [[rules]] tables, validated by config.py as the file would be."""
    config = parse_config({"rules": list(entries)})
    return Policy(
        rules=config.rules,
        default_allow=default == "allow",
        protect_private=protect,
        own_listeners=frozenset(listeners),
    )


def check(p: Policy, **changes: Any) -> Decision:
    return p.check(**{**REQUEST, **changes})


def config(**document: Any) -> Config:
    return parse_config(document)


# ---- each rule key ----


@pytest.mark.parametrize(
    ("keys", "request_changes", "matches"),
    [
        # from: client CIDRs, bare IPs, IPv6, IPv4-mapped clients unmapped first
        ({"from": ["192.0.2.0/24"]}, {}, True),
        ({"from": ["203.0.113.0/24"]}, {}, False),
        ({"from": ["192.0.2.10"]}, {}, True),
        ({"from": ["192.0.2.11"]}, {}, False),
        ({"from": ["203.0.113.0/24", "192.0.2.0/28"]}, {}, True),
        ({"from": ["2001:db8::/32"]}, {"client_ip": "2001:db8::5"}, True),
        ({"from": ["2001:db8::/32"]}, {"client_ip": "2001:db9::5"}, False),
        ({"from": ["2001:db8::/32"]}, {}, False),
        ({"from": ["192.0.2.0/24"]}, {"client_ip": "2001:db8::5"}, False),
        ({"from": ["192.0.2.0/24"]}, {"client_ip": "::ffff:192.0.2.10"}, True),
        ({"from": ["192.0.2.0/24"]}, {"client_ip": "::ffff:203.0.113.1"}, False),
        ({"from": ["fe80::/10"]}, {"client_ip": "fe80::1%eth0"}, True),
        # to: destination CIDRs (IPv4, IPv6, IPv4-mapped targets) and host patterns
        ({"to": ["198.51.100.0/24"]}, {}, True),
        ({"to": ["198.51.100.7"]}, {}, True),
        ({"to": ["203.0.113.0/24"]}, {}, False),
        ({"to": ["198.51.100.0/24"]}, {"ip": "::ffff:198.51.100.7"}, True),
        ({"to": ["2001:db8::/32"]}, {"ip": "2001:db8::1"}, True),
        ({"to": ["2001:db8::/32"]}, {"ip": "2001:db9::1"}, False),
        ({"to": ["*.example.com"]}, {"host": "www.example.com"}, True),
        ({"to": ["*.example.com"]}, {"host": "www.example.org"}, False),
        ({"to": ["*.example.com"]}, {}, False),  # an IP-address target never matches a name
        ({"to": ["*.example.com", "198.51.100.0/24"]}, {"host": "other.test"}, True),
        ({"to": ["*.example.com", "203.0.113.0/24"]}, {"host": "other.test"}, False),
        # ports and ranges
        ({"ports": [443]}, {}, True),
        ({"ports": [80]}, {}, False),
        ({"ports": [80, "400-500"]}, {}, True),
        ({"ports": ["444-500"]}, {}, False),
        ({"ports": ["443-443"]}, {}, True),
        ({"ports": ["1-442"]}, {}, False),
        ({"ports": ["0-65535"]}, {"port": 0}, True),
        # users: a client without a login never matches a users list
        ({"users": ["alice"]}, {}, True),
        ({"users": ["bob", "alice"]}, {}, True),
        ({"users": ["bob"]}, {}, False),
        ({"users": ["alice"]}, {"user": None}, False),
        ({"users": ["Alice"]}, {}, False),  # login names are case-sensitive
        # commands
        ({"commands": ["connect"]}, {}, True),
        ({"commands": ["bind"]}, {}, False),
        ({"commands": ["bind", "udp"]}, {"command": "udp"}, True),
        ({"commands": ["udp"]}, {"command": "bind"}, False),
        # every key the rule has must match
        ({"from": ["192.0.2.0/24"], "ports": [443], "users": ["alice"]}, {}, True),
        ({"from": ["192.0.2.0/24"], "ports": [80]}, {}, False),
        ({"to": ["198.51.100.0/24"], "commands": ["bind"]}, {}, False),
        # no keys but the action: matches everything
        ({}, {"user": None, "command": "bind", "port": 1}, True),
    ],
)
def test_rule_key_matches(keys, request_changes, matches):
    decision = check(policy({"action": "deny", **keys}), **request_changes)
    assert decision.allowed is not matches
    assert decision.reason == ("rules[0]" if matches else "default allow")


@pytest.mark.parametrize(
    ("pattern", "host", "matches"),
    [
        ("*.example.com", "www.example.com", True),
        ("*.example.com", "a.b.c.example.com", True),
        ("*.example.com", "example.com", False),
        ("*.example.com", "notexample.com", False),
        ("*.example.com", "www.notexample.com", False),
        ("*.example.com", "WWW.Example.COM.", True),
        ("*.example.com", "example.com.evil.test", False),
        ("example.com", "example.com", True),
        ("example.com", "EXAMPLE.com.", True),
        ("example.com", "www.example.com", False),
        ("example.com", "notexample.com", False),
        ("example.com", "example.co", False),
        ("*.Example.COM.", "x.example.com", True),  # patterns are normalised too
        ("EXAMPLE.com.", "example.com", True),
    ],
)
def test_host_patterns(pattern, host, matches):
    p = policy({"action": "deny", "to": [pattern]})
    assert check(p, host=host, ip=None).allowed is not matches
    assert check(p, host=host).allowed is not matches  # with a resolved address as well


def test_first_match_wins():
    p = policy(
        {"action": "allow", "from": ["192.0.2.10"]},
        {"action": "deny", "from": ["192.0.2.0/24"]},
        {"action": "allow"},
        default="deny",
    )
    assert check(p) == Decision(True, "rules[0]", Reply.SUCCEEDED)
    assert check(p, client_ip="192.0.2.11") == Decision(
        False, "rules[1]", Reply.CONNECTION_NOT_ALLOWED
    )
    assert check(p, client_ip="203.0.113.1") == Decision(True, "rules[2]", Reply.SUCCEEDED)


@pytest.mark.parametrize(
    ("default", "expected"),
    [
        ("allow", Decision(True, "default allow", Reply.SUCCEEDED)),
        ("deny", Decision(False, "default deny", Reply.CONNECTION_NOT_ALLOWED)),
    ],
)
def test_default_action_when_no_rule_matches(default, expected):
    assert check(policy(default=default)) == expected
    assert check(policy({"action": "allow", "ports": [1]}, default=default)) == expected


def test_a_denial_carries_reply_02():
    decision = check(policy({"action": "deny"}))
    assert decision.reply == Reply.CONNECTION_NOT_ALLOWED == 0x02


def test_command_names_and_unknown_commands():
    assert COMMAND_NAMES == {
        Command.CONNECT: "connect",
        Command.BIND: "bind",
        Command.UDP_ASSOCIATE: "udp",
    }
    with pytest.raises(ValueError, match="unknown command 'udp_associate'"):
        check(policy(), command="udp_associate")


# ---- deciding on a name before resolving it ----


def test_name_check_denies_only_what_every_address_would_be_denied():
    # Default deny, allow a network: the name may resolve into it, so the name passes and
    # each resolved address decides.
    p = policy({"action": "allow", "to": ["198.51.100.0/24"]}, default="deny")
    assert check(p, host="intranet.test", ip=None).allowed
    assert check(p, host="intranet.test", ip="198.51.100.9").reason == "rules[0]"
    assert check(p, host="intranet.test", ip="203.0.113.9").reason == "default deny"
    # A deny network cannot be decided on the name: it falls through to the default.
    p = policy({"action": "deny", "to": ["198.51.100.0/24"]})
    assert check(p, host="intranet.test", ip=None) == Decision(True, "default allow", 0)
    assert check(p, host="intranet.test", ip="198.51.100.9").reason == "rules[0]"
    # A deny pattern is decided on the name, before any DNS query.
    p = policy({"action": "deny", "to": ["*.tracker.test"]})
    assert check(p, host="a.tracker.test", ip=None).reason == "rules[0]"
    # So is default deny when no rule could match any address.
    p = policy({"action": "allow", "to": ["*.example.com"]}, default="deny")
    assert check(p, host="other.test", ip=None).reason == "default deny"


@pytest.mark.parametrize(
    ("entries", "default", "allowed", "reason"),
    [
        # Allow rules whose destination keys cannot be told yet may apply: allowed for now.
        ([{"action": "allow", "commands": ["udp"], "ports": [53]}], "deny", True, "rules[0]"),
        ([{"action": "allow", "to": ["*.example.com"]}], "deny", True, "rules[0]"),
        ([{"action": "allow", "to": ["198.51.100.0/24"]}], "deny", True, "rules[0]"),
        # Deny rules that may not apply are passed over.
        ([{"action": "deny", "ports": [53]}], "allow", True, "default allow"),
        ([{"action": "deny", "to": ["*.example.com"]}], "deny", False, "default deny"),
        # Keys that are known still decide.
        ([{"action": "allow", "commands": ["connect"]}], "deny", False, "default deny"),
        ([{"action": "allow", "from": ["203.0.113.0/24"]}], "deny", False, "default deny"),
        ([{"action": "deny", "commands": ["udp"]}], "allow", False, "rules[0]"),
        ([{"action": "deny", "users": ["alice"]}], "allow", False, "rules[0]"),
    ],
)
def test_pre_check_with_an_unknown_destination(entries, default, allowed, reason):
    # UDP ASSOCIATE: the datagrams' destinations are not known when the request arrives.
    p = policy(*entries, default=default, protect=True, listeners=(("0.0.0.0", 53),))
    decision = check(p, command="udp", host=None, ip=None, port=None)
    assert (decision.allowed, decision.reason) == (allowed, reason)


def test_name_check_skips_private_and_loop_checks_until_an_address_is_known():
    p = policy(protect=True, listeners=(("0.0.0.0", 443),))
    assert check(p, host="localhost", ip=None).allowed
    assert check(p, host="localhost", ip="127.0.0.1").reason == "own listener"


# ---- private destinations ----

PRIVATE = [
    "127.0.0.1",
    "127.8.9.10",
    "10.1.2.3",
    "172.16.0.1",
    "172.31.255.254",
    "192.168.1.1",
    "100.64.0.1",
    "169.254.169.254",
    "0.0.0.0",
    "224.0.0.1",
    "255.255.255.255",
    "::1",
    "::",
    "fe80::1",
    "fd00::1",
    "fc00::1",
    "ff02::1",
    "::ffff:127.0.0.1",
    "::ffff:10.0.0.1",
    "::ffff:169.254.169.254",
    "64:ff9b::a00:1",  # NAT64 of 10.0.0.1
]
PUBLIC = [
    "198.51.100.7",
    "8.8.8.8",
    "172.32.0.1",
    "100.128.0.1",
    "192.0.2.1",
    "2001:4860:4860::8888",
    "::ffff:8.8.8.8",
    "64:ff9b::808:808",
]


@pytest.mark.parametrize("ip", PRIVATE)
def test_private_destination_denied_when_protected_and_allowed_when_not(ip):
    assert is_private(ip)
    assert check(policy(protect=True), ip=ip) == Decision(
        False, "private destination", Reply.CONNECTION_NOT_ALLOWED
    )
    assert check(policy(protect=False), ip=ip) == Decision(True, "default allow", Reply.SUCCEEDED)


@pytest.mark.parametrize("ip", PUBLIC)
def test_public_destination_is_not_private(ip):
    assert not is_private(ip)
    assert check(policy(protect=True), ip=ip).allowed


@pytest.mark.parametrize(
    ("entry", "changes", "expected"),
    [
        # An allow rule naming the destination by CIDR or exact host name unlocks it.
        ({"action": "allow", "to": ["10.0.0.0/8"]}, {"ip": "10.1.2.3"}, "rules[0]"),
        ({"action": "allow", "to": ["169.254.169.254"]}, {"ip": "169.254.169.254"}, "rules[0]"),
        ({"action": "allow", "to": ["fd00::/8"]}, {"ip": "fd00::1"}, "rules[0]"),
        (
            {"action": "allow", "to": ["db.corp.test"]},
            {"host": "db.corp.test", "ip": "10.1.2.3"},
            "rules[0]",
        ),
        # A wildcard is not explicit: whoever runs a matching name's DNS picks the address.
        (
            {"action": "allow", "to": ["*.corp.test"]},
            {"host": "db.corp.test", "ip": "10.1.2.3"},
            "private destination",
        ),
        (
            {"action": "allow", "to": ["*.com"]},
            {"host": "evil.com", "ip": "169.254.169.254"},
            "private destination",
        ),
        # ... only what it names.
        ({"action": "allow", "to": ["10.0.0.0/8"]}, {"ip": "192.168.1.1"}, "private destination"),
        # A catch-all allow rule, or one restricting anything but `to`, does not.
        ({"action": "allow"}, {"ip": "10.1.2.3"}, "private destination"),
        ({"action": "allow", "from": ["192.0.2.0/24"]}, {"ip": "127.0.0.1"}, "private destination"),
        ({"action": "allow", "users": ["alice"]}, {"ip": "169.254.169.254"}, "private destination"),
        ({"action": "allow", "ports": [443]}, {"ip": "::1"}, "private destination"),
        # A deny rule says why itself.
        ({"action": "deny", "to": ["10.0.0.0/8"]}, {"ip": "10.1.2.3"}, "rules[0]"),
    ],
)
def test_explicit_allow_rule_with_to_unlocks_private_destinations(entry, changes, expected):
    decision = check(policy(entry, protect=True), **changes)
    assert decision.reason == expected
    assert decision.allowed is (expected == "rules[0]" and entry["action"] == "allow")


# ---- the loop guard ----


@pytest.mark.parametrize(
    ("listener", "ip", "port", "looped"),
    [
        # an exact listener
        (("127.0.0.1", 1080), "127.0.0.1", 1080, True),
        (("127.0.0.1", 1080), "::ffff:127.0.0.1", 1080, True),
        (("127.0.0.1", 1080), "0.0.0.0", 1080, True),  # connect() to 0.0.0.0 is this host
        (("127.0.0.1", 1080), "127.0.0.1", 1081, False),
        (("127.0.0.1", 1080), "127.0.0.2", 1080, False),
        (("192.0.2.10", 1080), "192.0.2.10", 1080, True),
        (("192.0.2.10", 1080), "127.0.0.1", 1080, False),
        (("::1", 1080), "::1", 1080, True),
        (("[::1]", 1080), "::1", 1080, True),
        (("::1", 1080), "::", 1080, True),
        (("localhost", 1080), "127.0.0.1", 1080, True),
        (("localhost", 1080), "::1", 1080, True),
        # a wildcard listener: loopback, unspecified and this host's addresses on its port
        (("0.0.0.0", 1080), "127.0.0.1", 1080, True),
        (("0.0.0.0", 1080), "127.99.0.1", 1080, True),
        (("0.0.0.0", 1080), "0.0.0.0", 1080, True),
        (("0.0.0.0", 1080), "203.0.113.5", 1080, True),  # local (see the fake below)
        (("0.0.0.0", 1080), "::ffff:203.0.113.5", 1080, True),
        (("0.0.0.0", 1080), "198.51.100.7", 1080, False),
        (("0.0.0.0", 1080), "127.0.0.1", 80, False),
        (("::", 1080), "::1", 1080, True),
        (("::", 1080), "::", 1080, True),
        (("::", 1080), "127.0.0.1", 1080, True),  # dual-stack
        (("::", 1080), "2001:db8::5", 1080, True),  # local (see the fake below)
        (("::", 1080), "2001:db8::6", 1080, False),
        (("[::]", 1080), "::1", 1080, True),
    ],
)
def test_loop_guard(monkeypatch, listener, ip, port, looped):
    monkeypatch.setattr(rules, "is_local_address", lambda ip: ip in {"203.0.113.5", "2001:db8::5"})
    # Even an allow rule naming the destination cannot open a loop; private protection is off
    # here so only the guard can deny.
    p = policy({"action": "allow", "to": ["0.0.0.0/0", "::/0"]}, listeners=(listener,))
    decision = check(p, ip=ip, port=port)
    if looped:
        assert decision == Decision(False, "own listener", Reply.CONNECTION_NOT_ALLOWED)
    else:
        assert decision == Decision(True, "rules[0]", Reply.SUCCEEDED)


def test_is_local_address_probes_this_host():
    assert is_local_address("127.0.0.1")
    assert is_local_address("::ffff:127.0.0.1")
    assert not is_local_address("192.0.2.1")  # TEST-NET-1: never assigned


# ---- Policy.from_config ----


@pytest.mark.parametrize(
    ("setting", "listening", "protected"),
    [
        ("auto", [("127.0.0.1", 1080)], False),
        ("auto", [("::1", 1080)], False),
        ("auto", [("[::1]", 1080)], False),
        ("auto", [("localhost", 1080)], False),
        ("auto", [("::1", 1080, 0, 0)], False),  # an IPv6 getsockname() tuple
        ("auto", [("127.0.0.1", 1080), ("::1", 1080)], False),
        ("auto", [("0.0.0.0", 1080)], True),
        ("auto", [("::", 1080)], True),
        ("auto", [("127.0.0.1", 1080), ("192.0.2.10", 1080)], True),
        ("auto", [("proxy.example", 1080)], True),  # a name: assume reachable
        ("allow", [("0.0.0.0", 1080)], False),
        ("deny", [("127.0.0.1", 1080)], True),
    ],
)
def test_from_config_resolves_private_destinations(setting, listening, protected):
    c = config(access={"private_destinations": setting})
    assert Policy.from_config(c, listening).protect_private is protected


def test_from_config_takes_rules_default_and_listeners():
    c = config(
        access={"default_action": "deny"},
        rules=[{"action": "allow", "from": ["192.0.2.0/24"]}],
    )
    p = Policy.from_config(c, [("[::1]", 1080, 0, 0), ("127.0.0.1", 1081)])
    assert p.rules == c.rules
    assert p.default_allow is False
    assert p.own_listeners == frozenset({("::1", 1080), ("127.0.0.1", 1081)})
    assert Policy.from_config(Config(), []).default_allow is True


# ---- exposure_problem ----

OPEN = "refusing to run an open proxy on"


@pytest.mark.parametrize(
    ("document", "listening", "expected"),
    [
        ({}, [("127.0.0.1", 1080)], None),
        ({}, [("[::1]", 1080)], None),
        ({}, [("localhost", 1080)], None),
        ({}, [("0.0.0.0", 1080)], f"{OPEN} 0.0.0.0:1080:"),
        ({}, [("::", 1080)], f"{OPEN} [::]:1080:"),
        ({}, [("[::]", 1080)], f"{OPEN} [::]:1080:"),
        ({}, [("127.0.0.1", 1080), ("192.0.2.10", 1081)], f"{OPEN} 192.0.2.10:1081:"),
        ({}, [("proxy.example", 1080)], f"{OPEN} proxy.example:1080:"),
        ({"users": [{"name": "a", "password": "b"}]}, [("0.0.0.0", 1080)], None),
        ({"server": {"allow_open": True}}, [("::", 1080)], None),
        (
            {
                "access": {"default_action": "deny"},
                "rules": [{"action": "allow", "from": ["192.0.2.0/24"]}],
            },
            [("0.0.0.0", 1080)],
            None,
        ),
        ({"access": {"default_action": "deny"}}, [("0.0.0.0", 1080)], None),  # nobody at all
        (
            {
                "access": {"default_action": "deny"},
                "rules": [
                    {"action": "deny", "to": ["10.0.0.0/8"]},  # deny rules restrict nothing
                    {"action": "allow", "from": ["192.0.2.0/24"]},
                ],
            },
            [("0.0.0.0", 1080)],
            None,
        ),
        (
            {  # one allow rule without `from`: anyone gets through it
                "access": {"default_action": "deny"},
                "rules": [
                    {"action": "allow", "from": ["192.0.2.0/24"]},
                    {"action": "allow", "ports": [443]},
                ],
            },
            [("0.0.0.0", 1080)],
            OPEN,
        ),
        (
            {  # default allow: clients outside `from` fall through to it
                "rules": [{"action": "allow", "from": ["192.0.2.0/24"]}],
            },
            [("0.0.0.0", 1080)],
            OPEN,
        ),
        (
            {  # /0 is no restriction
                "access": {"default_action": "deny"},
                "rules": [{"action": "allow", "from": ["0.0.0.0/0", "::/0"]}],
            },
            [("0.0.0.0", 1080)],
            OPEN,
        ),
    ],
)
def test_exposure_problem(document, listening, expected):
    problem = exposure_problem(config(**document), listening)
    if expected is None:
        assert problem is None
    else:
        assert problem is not None and problem.startswith(expected)


def test_exposure_problem_names_every_fix():
    assert exposure_problem(Config(), [("0.0.0.0", 1080)]) == (
        "refusing to run an open proxy on 0.0.0.0:1080: add [[users]], or restrict clients "
        'with [[rules]] (from = [...]) and access.default_action = "deny", or set '
        "server.allow_open = true (--allow-open)"
    )


# ---- describe_policy / describe_rule ----


def test_describe_rule_in_one_line():
    c = config(
        rules=[
            {
                "action": "deny",
                "from": ["192.0.2.0/24"],
                "to": ["*.example.com", "198.51.100.0/24"],
                "ports": [80, "8000-8080"],
                "users": ["bob", "alice"],
                "commands": ["udp", "connect"],
            },
            {"action": "allow"},
        ]
    )
    assert [describe_rule(rule) for rule in c.rules] == [
        "rules[0]: deny from 192.0.2.0/24 to *.example.com, 198.51.100.0/24 ports 80, "
        "8000-8080 users alice, bob commands connect, udp",
        "rules[1]: allow everything",
    ]


def test_describe_policy_of_the_defaults():
    lines = describe_policy(Config(), [("127.0.0.1", 1080)])
    assert lines == [
        "listening on 127.0.0.1:1080 (loopback only)",
        'PROXY protocol: off (server.proxy_protocol = "off"): clients connect directly; '
        "a connection that begins with a PROXY header is not SOCKS and is closed",
        "authentication: none (any client that can connect may use the proxy)",
        'SOCKS4/4a: accepted (no logins are configured) (server.socks4 = "auto")',
        "rules: none",
        "default action: allow",
        "upstreams: none (every CONNECT goes directly to its target)",
        'private destinations: allowed (access.private_destinations = "auto")',
        "exposure: loopback only; only this host can use the proxy",
    ]


def test_describe_policy_states_the_key_facts():
    c = config(
        users=[{"name": "alice", "password": "x"}, {"name": "bob", "password": "y"}],
        access={"default_action": "deny"},
        rules=[
            {"action": "allow", "users": ["alice", "carol"]},
            {"action": "deny", "ports": [25]},
        ],
    )
    text = "\n".join(describe_policy(c, [("::", 1080)]))
    assert "listening on [::]:1080 (reachable from other hosts)" in text
    assert "authentication: required (RFC 1929), 2 user(s): alice, bob" in text
    assert "rules[0]: allow users alice, carol" in text
    assert "rules[1]: deny ports 25" in text
    assert "default action: deny" in text
    assert (
        "private destinations and this host's own addresses:"
        " denied unless an allow rule names them explicitly in `to`" in text
    )
    assert "exposure: [::]:1080 reachable from other hosts; clients must log in" in text
    assert "warning: rules[0] names user(s) not in [[users]]: carol" in text


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        ({}, "exposure: OPEN PROXY, refusing to run an open proxy on 0.0.0.0:1080"),
        (
            {"server": {"allow_open": True}},
            "exposure: OPEN PROXY on 0.0.0.0:1080 (server.allow_open = true)",
        ),
        (
            {
                "access": {"default_action": "deny"},
                "rules": [{"action": "allow", "from": ["192.0.2.0/24"]}],
            },
            "exposure: 0.0.0.0:1080 reachable; only clients matched by `from` of allow rules",
        ),
    ],
)
def test_describe_policy_exposure_line(document, expected):
    lines = describe_policy(config(**document), [("0.0.0.0", 1080)])
    assert any(line.startswith(expected) for line in lines), lines


def test_describe_policy_warns_about_rules_after_a_catch_all():
    c = config(rules=[{"action": "deny", "ports": [25]}, {"action": "allow"}, {"action": "deny"}])
    lines = describe_policy(c, [("127.0.0.1", 1080)])
    assert "warning: rules[1] matches everything; the rules after it are never used" in lines
