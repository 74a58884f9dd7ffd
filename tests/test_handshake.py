"""ServerHandshake: the SOCKS5 negotiation as literal wire bytes in, actions out.

No sockets: each case feeds bytes whole, one byte at a time, and with the next message
pipelined behind, and checks the exact bytes the handshake asks to send.
"""

from __future__ import annotations

import pytest

from socks5d.ops.config import User
from socks5d.policy.auth import Authenticator
from socks5d.socks.handshake import Authenticate, Close, Dispatch, Send, ServerHandshake, State
from socks5d.socks.protocol import Address, AddressType, Command, Reply, Request
from socks5d.socks.session import Session

NO_AUTH = Authenticator()
LOGIN = Authenticator.from_users([User("alice", password="secret")])

GREETING_NO_AUTH = b"\x05\x01\x00"  # VER NMETHODS METHODS=00
GREETING_LOGIN = b"\x05\x01\x02"  # VER NMETHODS METHODS=02
CREDENTIALS = b"\x01\x05alice\x06secret"  # VER ULEN UNAME PLEN PASSWD
CONNECT_IPV4 = b"\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x50"  # CONNECT 127.0.0.1:80
CONNECT_NAME = b"\x05\x01\x00\x03\x0bexample.com\x01\xbb"  # CONNECT example.com:443
BOUND = Address(AddressType.IPV4, "192.0.2.1", 4321)
REPLY_OK = b"\x05\x00\x00\x01\xc0\x00\x02\x01\x10\xe1"  # 00, BND 192.0.2.1:4321


def new(authenticator: Authenticator = NO_AUTH) -> ServerHandshake:
    return ServerHandshake(authenticator, Session(client="127.0.0.1:5000"))


def feed_bytewise(hs: ServerHandshake, data: bytes) -> list:
    actions = []
    for i in range(len(data)):
        actions += hs.receive(data[i : i + 1])
    return actions


# ---- success paths ----


@pytest.mark.parametrize("split", ["whole", "bytewise"])
def test_no_auth_connect_to_an_address(split):
    hs = new()
    data = GREETING_NO_AUTH + CONNECT_IPV4
    actions = hs.receive(data) if split == "whole" else feed_bytewise(hs, data)
    request = Request(Command.CONNECT, Address(AddressType.IPV4, "127.0.0.1", 80))
    assert actions == [Send(b"\x05\x00"), Dispatch(request)]
    assert hs.state is State.COMMAND
    assert hs.reply(Reply.SUCCEEDED, BOUND) == [Send(REPLY_OK)]
    assert hs.state is State.ESTABLISHED
    assert (hs.session.command, hs.session.target, hs.session.reply) == (
        "CONNECT",
        "127.0.0.1:80",
        Reply.SUCCEEDED,
    )


def test_greeting_answer_comes_before_the_request_arrives():
    hs = new()
    assert hs.receive(GREETING_NO_AUTH) == [Send(b"\x05\x00")]
    assert hs.state is State.REQUEST
    assert hs.receive(CONNECT_NAME[:5]) == []
    actions = hs.receive(CONNECT_NAME[5:])
    assert actions == [Dispatch(Request(Command.CONNECT, Address.from_host("example.com", 443)))]


@pytest.mark.parametrize("split", ["whole", "bytewise"])
def test_login_then_request_pipelined_behind_it(split):
    hs = new(LOGIN)
    data = GREETING_LOGIN + CREDENTIALS + CONNECT_IPV4
    actions = hs.receive(data) if split == "whole" else feed_bytewise(hs, data)
    assert actions == [Send(b"\x05\x02"), Authenticate(b"alice", b"secret")]
    assert hs.state is State.CHECKING
    assert hs.session.user == "alice"
    # The request waited in the buffer; it comes out with the login's answer.
    actions = hs.credentials_checked(True)
    assert actions[0] == Send(b"\x01\x00")
    assert isinstance(actions[1], Dispatch)
    assert hs.user == "alice"


def test_early_data_after_the_request_is_kept_for_the_tunnel():
    hs = new()
    hs.receive(GREETING_NO_AUTH + CONNECT_IPV4 + b"GET / HTTP/1.0\r\n")
    hs.receive(b"\r\n")  # more payload while the connect runs
    hs.reply(Reply.SUCCEEDED, BOUND)
    assert hs.early_data() == b"GET / HTTP/1.0\r\n\r\n"
    assert hs.early_data() == b""


def test_bind_sends_two_replies():
    hs = new()
    actions = hs.receive(GREETING_NO_AUTH + b"\x05\x02\x00\x01\x00\x00\x00\x00\x00\x00")
    assert actions[-1] == Dispatch(Request(Command.BIND, Address(AddressType.IPV4, "0.0.0.0", 0)))
    assert hs.bind_listening(BOUND) == [Send(REPLY_OK)]
    assert hs.state is State.BIND_WAIT
    peer = Address(AddressType.IPV4, "198.51.100.7", 40000)
    assert hs.reply(Reply.SUCCEEDED, peer) == [
        Send(b"\x05\x00\x00\x01\xc6\x33\x64\x07\x9c\x40")  # 00, 198.51.100.7:40000
    ]
    assert hs.state is State.ESTABLISHED


def test_bind_listening_answers_only_a_bind():
    hs = new()
    hs.receive(GREETING_NO_AUTH + CONNECT_IPV4)
    with pytest.raises(RuntimeError):
        hs.bind_listening(BOUND)


# ---- refusals and errors ----


def test_no_acceptable_method_answers_ff_and_closes():
    hs = new(LOGIN)
    assert hs.receive(b"\x05\x01\x00") == [
        Send(b"\x05\xff"),
        Close("no acceptable method offered"),
    ]
    assert hs.state is State.CLOSED
    assert hs.receive(CONNECT_IPV4) == []  # nothing more is read


def test_wrong_login_answers_01_01_and_closes():
    hs = new(LOGIN)
    hs.receive(GREETING_LOGIN + CREDENTIALS + CONNECT_IPV4)
    assert hs.credentials_checked(False) == [
        Send(b"\x01\x01"),
        Close("authentication failed"),
    ]
    assert (hs.session.end, hs.session.closed_by, hs.user) == (
        "authentication failed",
        "proxy",
        None,
    )


@pytest.mark.parametrize(
    ("data", "sent", "end"),
    [
        pytest.param(
            b"GET / HTTP/1.1\r\n", [], "protocol error: unsupported SOCKS version 0x47", id="http"
        ),
        pytest.param(
            b"\x05\x00", [], "protocol error: greeting offers no methods", id="no methods"
        ),
        pytest.param(
            GREETING_NO_AUTH + b"\x05\x09\x00\x01",
            [Send(b"\x05\x07\x00\x01\x00\x00\x00\x00\x00\x00")],
            "protocol error: unknown command 0x09",
            id="unknown command",
        ),
        pytest.param(
            GREETING_NO_AUTH + b"\x05\x01\x00\x02",
            [Send(b"\x05\x08\x00\x01\x00\x00\x00\x00\x00\x00")],
            "protocol error: unknown address type 0x02",
            id="unknown address type",
        ),
    ],
)
def test_malformed_input_gets_its_reply_and_a_close(data, sent, end):
    hs = new()
    actions = hs.receive(data)
    actions = [a for a in actions if a != Send(b"\x05\x00")]  # the greeting's answer
    assert actions == [*sent, Close(end)]
    assert hs.session.end == end
    assert hs.state is State.CLOSED


def test_bad_subnegotiation_version_closes_without_a_status():
    hs = new(LOGIN)
    assert hs.receive(GREETING_LOGIN + b"\x05\x05alice") == [
        Send(b"\x05\x02"),
        Close("protocol error: unsupported username/password version 0x05"),
    ]


def test_a_failed_request_reply_closes_with_the_reason():
    hs = new()
    hs.receive(GREETING_NO_AUTH + CONNECT_IPV4)
    actions = hs.reply(Reply.CONNECTION_REFUSED, reason="connect failed: refused")
    assert actions == [
        Send(b"\x05\x05\x00\x01\x00\x00\x00\x00\x00\x00"),
        Close("connect failed: refused"),
    ]
    assert (hs.session.reply, hs.session.end) == (
        Reply.CONNECTION_REFUSED,
        "connect failed: refused",
    )


@pytest.mark.parametrize("stage", [b"", GREETING_NO_AUTH, GREETING_NO_AUTH + CONNECT_IPV4[:3]])
def test_eof_and_timeout_before_the_reply_close(stage):
    hs = new()
    hs.receive(stage)
    assert hs.eof() == [Close("client closed during handshake")]
    assert hs.session.closed_by == "client"
    late = new()
    late.receive(stage)
    assert late.timed_out() == [Close("handshake timeout")]
    assert late.session.closed_by == "proxy"


def test_eof_after_the_tunnel_is_established_is_not_the_handshakes():
    hs = new()
    hs.receive(GREETING_NO_AUTH + CONNECT_IPV4)
    hs.reply(Reply.SUCCEEDED, BOUND)
    assert hs.eof() == []
    assert hs.timed_out() == []


def test_answers_out_of_turn_are_refused():
    hs = new()
    with pytest.raises(RuntimeError):
        hs.reply(Reply.SUCCEEDED, BOUND)
    with pytest.raises(RuntimeError):
        hs.credentials_checked(True)


@pytest.mark.parametrize("cut", range(1, len(GREETING_LOGIN + CREDENTIALS + CONNECT_NAME)))
def test_any_split_gives_the_same_actions(cut):
    data = GREETING_LOGIN + CREDENTIALS + CONNECT_NAME
    whole = new(LOGIN)
    expected = whole.receive(data) + whole.credentials_checked(True)
    split = new(LOGIN)
    actions = split.receive(data[:cut]) + split.receive(data[cut:])
    actions += split.credentials_checked(True)
    assert actions == expected
