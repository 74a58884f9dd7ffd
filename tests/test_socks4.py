"""SOCKS4 and SOCKS4A on the SOCKS5 port: the wire format, the handshake, real clients.

The SOCKS4 document (Ying-Da Lee, "SOCKS: A protocol for TCP proxy across firewalls")
and its SOCKS4A extension define the bytes:

    request  VN=04 CD DSTPORT(2) DSTIP(4) USERID NULL             CD 01 CONNECT, 02 BIND
    4a       ... DSTIP = 0.0.0.x (x != 0), then NAME NULL after USERID's NULL
    reply    VN=00 CD DSTPORT(2) DSTIP(4)                         CD 5A granted, 5B failed

Pure functions and the state machine are tested on literal bytes; the rest against the
real `socks5d` command (JSON access log) with curl, PySocks and raw sockets, on loopback.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import socks
from click.testing import CliRunner
from clients import TIMEOUT, closed_port, recv_all, recv_exactly, wait_until
from conftest import DaemonProcess, TargetServer, echo, needs_ipv6
from hypothesis import given, settings
from hypothesis import strategies as st

from socks5d.ops.cli import main
from socks5d.ops.config import ConfigError, User, parse_config
from socks5d.policy.auth import Authenticator
from socks5d.socks.handshake import Close, Dispatch, Send, ServerHandshake, State
from socks5d.socks.protocol import (
    MAX_SOCKS4_NAME,
    MAX_SOCKS4_USERID,
    Address,
    AddressType,
    Command,
    ProtocolError,
    Reply,
    Request,
    Socks4Reply,
    Socks4Request,
    encode_socks4_reply,
    encode_socks4_request,
    parse_socks4_reply,
    parse_socks4_request,
)
from socks5d.socks.session import Session

# VN CD=01 DSTPORT=80 DSTIP=127.0.0.1 USERID="bob" NULL
CONNECT_V4 = b"\x04\x01\x00\x50\x7f\x00\x00\x01bob\x00"
# VN CD=01 DSTPORT=443 DSTIP=0.0.0.1 USERID="" NULL NAME="example.com" NULL
CONNECT_4A = b"\x04\x01\x01\xbb\x00\x00\x00\x01\x00example.com\x00"
# VN=00 CD=5B DSTPORT=0 DSTIP=0.0.0.0: every refusal
REJECTED = b"\x00\x5b\x00\x00\x00\x00\x00\x00"
BOUND = Address(AddressType.IPV4, "192.0.2.1", 4321)
GRANTED_BOUND = b"\x00\x5a\x10\xe1\xc0\x00\x02\x01"  # 5A, 4321, 192.0.2.1


# ---- the wire format (pure) ---------------------------------------------------------------


def test_a_socks4_connect_parses_with_its_userid_and_leaves_what_follows():
    parsed = parse_socks4_request(CONNECT_V4 + b"payload")
    expected = Socks4Request(Command.CONNECT, Address(AddressType.IPV4, "127.0.0.1", 80), b"bob")
    assert parsed == (expected, len(CONNECT_V4))
    assert not expected.is_4a


def test_a_socks4a_request_carries_the_name_after_the_userid():
    parsed = parse_socks4_request(CONNECT_4A + b"GET")
    address = Address(AddressType.DOMAINNAME, "example.com", 443)
    assert parsed == (Socks4Request(Command.CONNECT, address, b""), len(CONNECT_4A))
    assert parsed[0].is_4a


def test_dstip_0_0_0_0_is_plain_socks4_not_4a():
    """SOCKS4A: 0.0.0.x with x NONZERO; 0.0.0.0 is an address (BIND: any peer)."""
    request = b"\x04\x02\x00\x00\x00\x00\x00\x00\x00"  # BIND 0.0.0.0:0, USERID ""
    parsed = parse_socks4_request(request)
    assert parsed == (
        Socks4Request(Command.BIND, Address(AddressType.IPV4, "0.0.0.0", 0), b""),
        len(request),
    )


@pytest.mark.parametrize("message", [CONNECT_V4, CONNECT_4A])
def test_every_prefix_of_a_request_needs_more(message):
    for cut in range(len(message)):
        assert parse_socks4_request(message[:cut]) is None, cut


@pytest.mark.parametrize(
    ("data", "reply", "text"),
    [
        pytest.param(
            b"\x04\x03\x00\x35\x7f\x00\x00\x01\x00",
            Reply.COMMAND_NOT_SUPPORTED,
            "unknown SOCKS4 command 0x03",
            id="udp-has-no-socks4-command",
        ),
        pytest.param(
            b"\x04\x01\x00\x50\x7f\x00\x00\x01" + b"u" * (MAX_SOCKS4_USERID + 1),
            Reply.GENERAL_FAILURE,
            f"SOCKS4 USERID longer than {MAX_SOCKS4_USERID} bytes",
            id="userid-past-its-bound",
        ),
        pytest.param(
            b"\x04\x01\x00\x50\x00\x00\x00\x01\x00" + b"n" * (MAX_SOCKS4_NAME + 1),
            Reply.GENERAL_FAILURE,
            f"SOCKS4 name longer than {MAX_SOCKS4_NAME} bytes",
            id="name-past-its-bound",
        ),
        pytest.param(
            b"\x04\x01\x00\x50\x00\x00\x00\x01\x00\x00",
            Reply.GENERAL_FAILURE,
            "empty domain name",
            id="empty-name",
        ),
        pytest.param(
            b"\x04\x01\x00\x50\x00\x00\x00\x01\x00bad name\x00",
            Reply.HOST_UNREACHABLE,
            "invalid domain name b'bad name'",
            id="unusable-name",
        ),
    ],
)
def test_a_malformed_request_raises_with_a_reply(data, reply, text):
    with pytest.raises(ProtocolError) as raised:
        parse_socks4_request(data)
    assert (raised.value.reply, raised.value.message) == (reply, text)


def test_the_longest_userid_and_name_are_accepted():
    userid, name = b"u" * MAX_SOCKS4_USERID, "n" * MAX_SOCKS4_NAME
    request = encode_socks4_request(Command.CONNECT, Address.from_host(name, 1), userid)
    parsed = parse_socks4_request(request)
    assert parsed is not None
    assert (parsed[0].userid, parsed[0].address.host, parsed[1]) == (userid, name, len(request))


@pytest.mark.parametrize(
    ("code", "bound", "wire"),
    [
        (Socks4Reply.GRANTED, BOUND, GRANTED_BOUND),
        (Socks4Reply.REJECTED, None, REJECTED),
        # What SOCKS4 cannot carry: DSTIP 0.0.0.0 ("the server's address"), the port kept.
        (
            Socks4Reply.GRANTED,
            Address(AddressType.IPV6, "::1", 4321),
            b"\x00\x5a\x10\xe1" + bytes(4),
        ),
    ],
)
def test_a_reply_is_vn_0_cd_dstport_dstip(code, bound, wire):
    assert encode_socks4_reply(code, bound) == wire
    parsed = parse_socks4_reply(wire + b"tunnel")
    assert parsed is not None and parsed[0][0] == code and parsed[1] == 8


def test_every_rfc_1928_failure_is_91_in_socks4():
    assert Socks4Reply.for_reply(Reply.SUCCEEDED) is Socks4Reply.GRANTED
    for reply in Reply:
        if reply is not Reply.SUCCEEDED:
            assert Socks4Reply.for_reply(reply) is Socks4Reply.REJECTED


def test_socks4_cannot_carry_ipv6_or_udp():
    with pytest.raises(ValueError):
        encode_socks4_request(Command.CONNECT, Address(AddressType.IPV6, "::1", 80))
    with pytest.raises(ValueError):
        encode_socks4_request(Command.UDP_ASSOCIATE, Address.from_host("127.0.0.1", 80))


# hypothesis: in the style of tests/test_properties.py
FAST = settings(max_examples=300, deadline=None, database=None)
ipv4 = st.builds(
    lambda ip, port: Address(AddressType.IPV4, str(ip), port),
    st.ip_addresses(v=4).filter(lambda ip: not (ip.packed[:3] == bytes(3) and ip.packed[3])),
    st.integers(0, 0xFFFF),
)
names = st.from_regex(r"[A-Za-z0-9_-]{1,63}(\.[A-Za-z0-9_-]{1,63}){0,3}", fullmatch=True)
domains = st.builds(
    lambda name, port: Address(AddressType.DOMAINNAME, name, port), names, st.integers(0, 0xFFFF)
)
userids = st.binary(max_size=MAX_SOCKS4_USERID).map(lambda b: b.replace(b"\x00", b"x"))
requests = st.builds(
    Socks4Request,
    st.sampled_from([Command.CONNECT, Command.BIND]),
    st.one_of(ipv4, domains),
    userids,
)


@FAST
@given(st.binary(max_size=600))
def test_any_bytes_give_need_more_a_request_or_an_error_with_a_reply(data):
    data = b"\x04" + data
    try:
        parsed = parse_socks4_request(data)
    except ProtocolError as exc:
        assert exc.reply is not None  # the handshake answers every one with 91
        return
    if parsed is not None:
        assert 0 < parsed[1] <= len(data)


@FAST
@given(requests, st.binary(max_size=16))
def test_encode_then_parse_gives_the_request_back(request, trailing):
    wire = encode_socks4_request(request.command, request.address, request.userid)
    assert parse_socks4_request(wire + trailing) == (request, len(wire))


@FAST
@given(requests, st.lists(st.integers(1, 40), max_size=8))
def test_a_handshake_fed_in_any_chunks_dispatches_the_same_request(request, cuts):
    wire = encode_socks4_request(request.command, request.address, request.userid)
    hs = handshake()
    actions: list[Any] = []
    rest = wire
    for cut in cuts:
        actions += hs.receive(rest[:cut])
        rest = rest[cut:]
    actions += hs.receive(rest)
    assert actions == [Dispatch(Request(request.command, request.address))]
    assert hs.session.proto == ("socks4a" if request.is_4a else "socks4")


# ---- the handshake (no I/O) ---------------------------------------------------------------

LOGIN = Authenticator.from_users([User("alice", password="secret")])


def handshake(authenticator: Authenticator | None = None) -> ServerHandshake:
    return ServerHandshake(authenticator or Authenticator(), Session(client="127.0.0.1:5000"))


def test_the_first_byte_04_switches_the_handshake_to_socks4():
    hs = handshake()
    actions = [
        action for i in range(len(CONNECT_V4)) for action in hs.receive(CONNECT_V4[i : i + 1])
    ]
    assert actions == [
        Dispatch(Request(Command.CONNECT, Address(AddressType.IPV4, "127.0.0.1", 80)))
    ]
    session = hs.session
    assert (session.proto, session.userid, session.user) == ("socks4", "bob", "-")
    assert (session.command, session.target) == ("CONNECT", "127.0.0.1:80")
    assert hs.user is None  # the USERID is never a login
    assert hs.reply(Reply.SUCCEEDED, BOUND) == [Send(GRANTED_BOUND)]
    assert hs.state is State.ESTABLISHED


def test_a_failure_is_91_with_zero_address_and_a_close():
    hs = handshake()
    hs.receive(CONNECT_4A)
    assert hs.session.proto == "socks4a"
    assert hs.reply(Reply.CONNECTION_REFUSED, reason="refused") == [
        Send(REJECTED),
        Close("refused"),
    ]
    assert hs.session.reply is Reply.CONNECTION_REFUSED  # the outcome, in RFC 1928 words


def test_bind_gets_both_replies_in_socks4():
    hs = handshake()
    request = b"\x04\x02\x00\x15\xc0\x00\x02\x07\x00"  # BIND 192.0.2.7:21
    assert hs.receive(request) == [
        Dispatch(Request(Command.BIND, Address(AddressType.IPV4, "192.0.2.7", 21)))
    ]
    assert hs.bind_listening(BOUND) == [Send(GRANTED_BOUND)]
    peer = Address(AddressType.IPV4, "192.0.2.7", 40000)
    assert hs.reply(Reply.SUCCEEDED, peer) == [Send(b"\x00\x5a\x9c\x40\xc0\x00\x02\x07")]


@pytest.mark.parametrize(
    ("authenticator", "end"),
    [
        (LOGIN, "SOCKS4 refused: logins are required and SOCKS4 has none (server.socks4 = auto)"),
        (Authenticator(socks4=False), "SOCKS4 refused (server.socks4 = false)"),
    ],
    ids=["auto-with-users", "false"],
)
def test_a_refused_socks4_client_gets_91_and_is_logged(authenticator, end):
    hs = handshake(authenticator)
    assert hs.receive(CONNECT_V4 + b"early") == [Send(REJECTED), Close(end)]
    session = hs.session
    assert (session.proto, session.userid, session.target, session.end, session.reply) == (
        "socks4",
        "bob",
        "127.0.0.1:80",
        end,
        Reply.CONNECTION_NOT_ALLOWED,
    )


def test_true_serves_socks4_even_with_users_but_not_as_a_user():
    hs = handshake(Authenticator.from_users([User("bob", "pw")], socks4=True))
    assert hs.receive(CONNECT_V4) == [
        Dispatch(Request(Command.CONNECT, Address(AddressType.IPV4, "127.0.0.1", 80)))
    ]
    assert hs.user is None and hs.session.user == "-" and hs.session.userid == "bob"


def test_a_malformed_socks4_request_is_answered_with_91():
    hs = handshake()
    assert hs.receive(b"\x04\x03") == [
        Send(REJECTED),
        Close("protocol error: unknown SOCKS4 command 0x03"),
    ]


def test_a_silent_socks4_client_times_out_without_a_reply():
    hs = handshake()
    assert hs.receive(b"\x04\x01\x00\x50\x7f\x00\x00\x01bo") == []
    assert hs.timed_out() == [Close("handshake timeout")]
    assert hs.session.proto == "socks4"


def test_socks5_is_unchanged_and_says_so_in_the_log():
    hs = handshake()
    assert hs.receive(b"\x05\x01\x00") == [Send(b"\x05\x00")]
    assert hs.session.proto == "socks5" and hs.replies_carry_ipv6


def test_server_socks4_takes_auto_true_or_false_and_nothing_else():
    assert parse_config({}).server.socks4 == "auto"
    for value in ("auto", True, False):
        assert parse_config({"server": {"socks4": value}}).server.socks4 == value
    for bad in ("yes", 1, "true"):
        with pytest.raises(ConfigError, match=r"server\.socks4: must be \"auto\", true or false"):
            parse_config({"server": {"socks4": bad}}, "x.toml")


# ---- the real daemon ----------------------------------------------------------------------

OPEN = """
[server]
host = "127.0.0.1"
port = 0
[timeouts]
handshake = 2
[[rules]]
action = "deny"
to = ["127.0.0.2"]
"""
LOGIN_AUTO = """
[server]
host = "127.0.0.1"
port = 0
[[users]]
name = "alice"
password = "open sesame"
"""
LOGIN_TRUE = """
[server]
host = "127.0.0.1"
port = 0
socks4 = true
[access]
default_action = "deny"
[[rules]]
action = "allow"
users = ["alice"]
[[users]]
name = "alice"
password = "open sesame"
"""
OFF = """
[server]
host = "127.0.0.1"
port = 0
socks4 = false
"""
CONFIGS = {"open": OPEN, "login-auto": LOGIN_AUTO, "login-true": LOGIN_TRUE, "off": OFF}


@pytest.fixture(scope="module")
def daemons(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], DaemonProcess]]:
    folder = tmp_path_factory.mktemp("socks4")
    running: dict[str, DaemonProcess] = {}

    def get(name: str) -> DaemonProcess:
        if name not in running:
            path = Path(folder) / f"{name}.toml"
            path.write_text(CONFIGS[name])
            running[name] = DaemonProcess("--config", str(path), "--log-format", "json")
        return running[name]

    yield get
    for daemon in running.values():
        assert daemon.stop() == 0, daemon.output()
        assert not [line for line in daemon.lines if "Traceback" in line or '"error"' in line]


@pytest.fixture(scope="module")
def echo_server() -> Iterator[TargetServer]:
    server = TargetServer(echo)
    yield server
    server.close()


def record_of(daemon: DaemonProcess, client: tuple[Any, ...]) -> dict[str, Any]:
    """The access record of the connection from `client` (waits for it)."""
    wanted = f"{client[0]}:{client[1]}"
    found: list[dict[str, Any]] = []

    def logged() -> bool:
        found[:] = [
            record
            for line in daemon.lines
            if line.startswith("{") and '"event":"access"' in line
            for record in [json.loads(line)]
            if record["client"] == wanted
        ]
        return bool(found)

    assert wait_until(logged), f"no access record for {wanted}:\n{daemon.output()}"
    (record,) = found
    return record


def exchange(
    daemon: DaemonProcess, *sends: bytes, pause: float = 0.0
) -> tuple[bytes, dict[str, Any]]:
    """Send `sends` (with `pause` between them), half-close, read to the end: what came
    back and the access record."""
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=TIMEOUT) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for index, data in enumerate(sends):
            if index and pause:
                time.sleep(pause)  # shapes the traffic (two segments); not a synchronisation
            sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        received = recv_all(sock)
        client = sock.getsockname()
    return received, record_of(daemon, client)


def socks4_connect(port: int, host: str = "127.0.0.1", userid: bytes = b"bob") -> bytes:
    return encode_socks4_request(Command.CONNECT, Address.from_host(host, port), userid)


def granted_to(data: bytes, record: dict[str, Any]) -> bytes:
    """Check `data` opens with a 5A reply naming the egress the record names; the rest."""
    parsed = parse_socks4_reply(data)
    assert parsed is not None, data
    (code, bound), used = parsed
    assert code == Socks4Reply.GRANTED, data
    assert record["egress"] == str(bound)
    return data[used:]


def test_a_raw_socks4_connect_tunnels_and_logs_proto_and_userid(daemons, echo_server):
    daemon = daemons("open")
    received, record = exchange(daemon, socks4_connect(echo_server.port) + b"payload!")
    assert granted_to(received, record) == b"payload!"
    target = f"127.0.0.1:{echo_server.port}"
    assert {k: record[k] for k in ("proto", "userid", "user", "command", "target", "reply")} == {
        "proto": "socks4",
        "userid": "bob",
        "user": None,
        "command": "CONNECT",
        "target": target,
        "reply": 0,
    }
    assert (record["resolved"], record["bytes_up"], record["bytes_down"]) == (target, 8, 8)


@pytest.mark.parametrize("dialect", ["socks4", "socks4a"])
def test_a_request_split_at_every_offset_is_served_alike(daemons, echo_server, dialect):
    daemon = daemons("open")
    host = "127.0.0.1" if dialect == "socks4" else "localhost"
    whole = socks4_connect(echo_server.port, host) + b"payload!"
    for offset in range(1, len(whole)):
        received, record = exchange(daemon, whole[:offset], whole[offset:], pause=0.02)
        assert granted_to(received, record) == b"payload!", offset
        assert (record["proto"], record["userid"], record["bytes_up"]) == (dialect, "bob", 8)


@pytest.mark.parametrize(
    ("data", "end"),
    [
        pytest.param(
            b"\x04\x01\x00\x50\x7f\x00\x00\x01" + b"u" * 4096,
            "protocol error: SOCKS4 USERID longer than 255 bytes",
            id="oversized-userid",
        ),
        pytest.param(
            b"\x04\x01\x00\x50\x00\x00\x00\x01\x00" + b"n" * 4096,
            "protocol error: SOCKS4 name longer than 255 bytes",
            id="name-without-terminator",
        ),
        pytest.param(
            b"\x04\x01\x00\x50\x00\x00\x00\x01\x00" + b"n" * 300 + b"\x00",
            "protocol error: SOCKS4 name longer than 255 bytes",
            id="4a-name-too-long",
        ),
        pytest.param(
            b"\x04\x03\x00\x35\x7f\x00\x00\x01\x00",
            "protocol error: unknown SOCKS4 command 0x03",
            id="udp-associate",
        ),
    ],
)
def test_abusive_requests_get_91_and_a_clean_close(daemons, data, end):
    received, record = exchange(daemons("open"), data)
    assert received == REJECTED
    assert (record["proto"], record["end"], record["closed_by"]) == ("socks4", end, "proxy")


def test_a_name_without_terminator_is_bounded_by_the_handshake_timeout(daemons):
    daemon = daemons("open")  # timeouts.handshake = 2
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=TIMEOUT) as sock:
        sock.sendall(b"\x04\x01\x00\x50\x00\x00\x00\x01\x00example")  # no NULL, then silence
        assert recv_all(sock) == b""  # closed at the deadline, no reply
        client = sock.getsockname()
    record = record_of(daemon, client)
    assert (record["proto"], record["end"], record["reply"]) == (
        "socks4",
        "handshake timeout",
        None,
    )


def test_a_rule_denial_is_91(daemons, echo_server):
    received, record = exchange(daemons("open"), socks4_connect(echo_server.port, "127.0.0.2"))
    assert received == REJECTED
    assert (record["rule"], record["reply"], record["end"]) == ("rules[0]", 2, "denied by rules[0]")


def test_a_refused_connection_is_91(daemons):
    port = closed_port()
    received, record = exchange(daemons("open"), socks4_connect(port))
    assert received == REJECTED
    assert record["reply"] == 5
    assert record["end"] == "connect failed: Connection refused (1 address tried)"


@pytest.mark.parametrize(
    ("config", "end"),
    [
        (
            "login-auto",
            "SOCKS4 refused: logins are required and SOCKS4 has none (server.socks4 = auto)",
        ),
        ("off", "SOCKS4 refused (server.socks4 = false)"),
    ],
)
def test_socks4_is_refused_with_91_where_the_config_says(daemons, echo_server, config, end):
    received, record = exchange(daemons(config), socks4_connect(echo_server.port, userid=b"alice"))
    assert received == REJECTED
    assert (record["proto"], record["userid"], record["user"], record["end"], record["reply"]) == (
        "socks4",
        "alice",
        None,
        end,
        2,
    )


def test_with_socks4_true_a_userid_never_matches_a_rule_that_names_users(daemons, echo_server):
    """server.socks4 = true with users: a SOCKS4 client is served, but USERID "alice" is
    not the login alice: the rule `users = ["alice"]` does not match, the default denies."""
    received, record = exchange(
        daemons("login-true"), socks4_connect(echo_server.port, userid=b"alice")
    )
    assert received == REJECTED
    assert (record["rule"], record["user"], record["userid"]) == ("default deny", None, "alice")


def test_socks5_lines_say_proto_socks5(daemons, echo_server):
    greeting_and_connect = (
        b"\x05\x01\x00" + b"\x05\x01\x00\x01\x7f\x00\x00\x01" + echo_server.port.to_bytes(2, "big")
    )
    received, record = exchange(daemons("open"), greeting_and_connect)
    assert received[:3] == b"\x05\x00\x05"
    assert (record["proto"], record["userid"]) == ("socks5", None)


@needs_ipv6
def test_a_4a_name_that_resolves_only_to_ipv6_is_connected_and_replied_as_0_0_0_0(daemons):
    """The reply cannot carry an IPv6 address: DSTIP 0.0.0.0, DSTPORT the egress port."""
    server = TargetServer(echo, "::1")
    try:
        # A 4a name that the resolver reads as ::1 (a literal sent as a name).
        name = Address(AddressType.DOMAINNAME, "::1", server.port)
        request = encode_socks4_request(Command.CONNECT, name, b"bob")
        received, record = exchange(daemons("open"), request + b"six")
    finally:
        server.close()
    assert received[:2] == b"\x00\x5a" and received[4:8] == bytes(4)
    egress_port = int(record["egress"].rpartition(":")[2])
    assert received[2:4] == egress_port.to_bytes(2, "big")
    assert received[8:] == b"six"
    assert (record["proto"], record["resolved"]) == ("socks4a", f"[::1]:{server.port}")


# ---- BIND: both replies -------------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"], ids=["socks4", "socks4a"])
def test_bind_gives_both_replies_and_a_tunnel(daemons, host):
    daemon = daemons("open")
    request = encode_socks4_request(Command.BIND, Address.from_host(host, 0), b"ftp")
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=TIMEOUT) as control:
        control.sendall(request)
        first = parse_socks4_reply(recv_exactly(control, 8))
        assert first is not None
        (code, listening), _ = first
        assert (
            code == Socks4Reply.GRANTED and listening.host == "127.0.0.1"
        )  # IPv4, even for localhost
        with socket.create_connection((listening.host, listening.port), timeout=TIMEOUT) as peer:
            second = parse_socks4_reply(recv_exactly(control, 8))
            assert second is not None
            assert second[0] == (Socks4Reply.GRANTED, Address.from_sockaddr(peer.getsockname()))
            control.sendall(b"client->peer")
            control.shutdown(socket.SHUT_WR)
            assert recv_all(peer) == b"client->peer"
            peer.sendall(b"peer->client")
            peer.shutdown(socket.SHUT_WR)
            assert recv_all(control) == b"peer->client"
        client = control.getsockname()
    record = record_of(daemon, client)
    assert (record["proto"], record["command"], record["reply"], record["userid"]) == (
        "socks4" if host == "127.0.0.1" else "socks4a",
        "BIND",
        0,
        "ftp",
    )
    assert record["egress"] == str(listening)


# ---- real clients -------------------------------------------------------------------------


@pytest.mark.parametrize("rdns", [False, True], ids=["socks4", "socks4a"])
def test_pysocks_socks4_mode(daemons, echo_server, rdns):
    daemon = daemons("open")
    sock = socks.socksocket()
    sock.set_proxy(socks.SOCKS4, "127.0.0.1", daemon.port, rdns, "carol")
    sock.settimeout(TIMEOUT)
    with sock:
        sock.connect(("localhost", echo_server.port))
        sock.sendall(b"through pysocks")
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == b"through pysocks"
        client = sock.getsockname()
    record = record_of(daemon, client)
    expected_target = f"localhost:{echo_server.port}" if rdns else f"127.0.0.1:{echo_server.port}"
    assert (record["proto"], record["userid"], record["target"]) == (
        "socks4a" if rdns else "socks4",
        "carol",
        expected_target,
    )


def http_once(conn: socket.socket) -> None:
    """A one-page HTTP server: read the request head, answer, close."""
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = conn.recv(4096)
        if not chunk:
            return
        head += chunk
    conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 11\r\n\r\nhello socks")


needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")


@needs_curl
@pytest.mark.parametrize("flag", ["--socks4", "--socks4a"])
def test_curl_fetches_a_page(daemons, flag):
    daemon = daemons("open")
    web = TargetServer(http_once)
    try:
        logged = len(daemon.lines)
        result = subprocess.run(
            [
                "curl",
                "--silent",
                "--show-error",
                "--max-time",
                "10",
                flag,
                f"127.0.0.1:{daemon.port}",
                f"http://localhost:{web.port}/",
            ],
            capture_output=True,
            timeout=TIMEOUT * 2,
        )
    finally:
        web.close()
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"hello socks"
    proto = flag.removeprefix("--")
    assert wait_until(lambda: any(f'"proto":"{proto}"' in line for line in daemon.lines[logged:]))
    (record,) = [json.loads(line) for line in daemon.lines[logged:] if f'"proto":"{proto}"' in line]
    target = f"localhost:{web.port}" if proto == "socks4a" else f"127.0.0.1:{web.port}"
    assert (record["target"], record["reply"], record["command"]) == (target, 0, "CONNECT")


@pytest.mark.parametrize(
    ("config", "line"),
    [
        (
            LOGIN_AUTO,
            'refused (reply 91): logins are required and SOCKS4 has none (server.socks4 = "auto")',
        ),
        (OFF, "refused (reply 91) (server.socks4 = false)"),
        (OPEN, 'accepted (no logins are configured) (server.socks4 = "auto")'),
        (
            LOGIN_TRUE,
            "accepted WITHOUT a login; rules that name users never match them"
            " (server.socks4 = true)",
        ),
    ],
)
def test_check_config_shows_the_socks4_setting(tmp_path, config, line):
    path = tmp_path / "c.toml"
    path.write_text(config)
    result = CliRunner().invoke(main, ["check-config", str(path)])
    assert result.exit_code == 0, result.output
    assert f"SOCKS4/4a: {line}\n" in result.output


def test_socks4_true_with_users_on_an_exposed_listener_is_an_open_proxy(tmp_path):
    """SOCKS4 has no password: `true` lets its clients past the logins, so an exposed
    listener needs a client restriction or allow_open, as with no users at all."""
    path = tmp_path / "c.toml"
    path.write_text(
        LOGIN_TRUE.replace('host = "127.0.0.1"', 'host = "0.0.0.0"').replace(
            'default_action = "deny"', 'default_action = "allow"'
        )
    )
    result = CliRunner().invoke(main, ["check-config", str(path)])
    assert result.exit_code == 2
    assert "server.socks4 = true serves SOCKS4 clients without a login" in result.output
