"""Upstream chaining: CONNECT through a parent proxy (SOCKS5, SOCKS5 with names, HTTP).

Pure parts first (the url, the rules' `via`, the HTTP answer parser, the reply mapping),
then a front socks5d in the test process chaining through a second socks5d (the real
command), tinyproxy (when installed) and scripted parents that refuse, reset, stall or
flood. Everything on loopback; every wait bounded.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from clients import (
    TIMEOUT,
    closed_port,
    open_tunnel,
    recv_all,
    recv_exactly,
    wait_until,
)
from conftest import DaemonProcess, TargetServer, echo, running_proxy
from streams import MiB, Worker, sha256_of_stream

from socks5d.ops.config import ConfigError, parse_config
from socks5d.policy.rules import Policy, describe_policy, masked_url
from socks5d.socks.handler import HandlerSettings
from socks5d.socks.protocol import (
    Address,
    AddressType,
    Command,
    ProtocolError,
    Reply,
    encode_reply,
    parse_request,
)
from socks5d.socks.session import Session
from socks5d.socks.upstream import (
    MAX_HTTP_HEAD,
    MAX_HTTP_STATUS_LINE,
    encode_http_connect,
    parse_http_response,
    reply_for_http_status,
    reply_for_socks_code,
)

# A password holding every character a url makes special; percent-encoded in the url.
PASSWORD = "p@ss:w%rd/x"
PASSWORD_IN_URL = "p%40ss%3Aw%25rd%2Fx"


def ipv4(port: int) -> Address:
    return Address(AddressType.IPV4, "127.0.0.1", port)


def name(host: str, port: int) -> Address:
    return Address(AddressType.DOMAINNAME, host, port)


def config_of(text: str) -> Any:
    return parse_config(tomllib.loads(text), "test.toml")


def upstream_toml(url: str, via_default: bool = True, name_: str = "corp") -> str:
    default = f'[access]\ndefault_via = "{name_}"\n' if via_default else ""
    return f'{default}[[upstreams]]\nname = "{name_}"\nurl = "{url}"\n'


# ---- the config: urls, via, default_via ----


def test_an_upstream_url_is_split_and_its_credentials_percent_decoded():
    config = config_of(upstream_toml(f"socks5h://us%40er:{PASSWORD_IN_URL}@127.0.0.1:1080"))
    (upstream,) = config.upstreams
    assert (upstream.name, upstream.scheme, upstream.host, upstream.port) == (
        "corp",
        "socks5h",
        "127.0.0.1",
        1080,
    )
    assert (upstream.username, upstream.password) == ("us@er", PASSWORD)
    assert upstream.resolves_names
    assert PASSWORD not in repr(upstream) and "us@er" not in repr(upstream)
    assert masked_url(upstream) == "socks5h://us%40er:***@127.0.0.1:1080"
    assert config.access.default_via == "corp"


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("ftp://u:secret@h:1", "scheme must be one of socks5, socks5h, http"),
        ("socks5://u:secret@h", "must end with a port from 1 to 65535"),
        ("socks5://u:secret@h:0", "must end with a port from 1 to 65535"),
        ("socks5://u:secret@h:70000", "must end with a port from 1 to 65535"),
        ("socks5://u:secret@h:x", "must end with a port from 1 to 65535"),
        ("socks5://u:secret@:1080", "has no host"),
        ("socks5://u:secret@h:1/path", "no path or query"),
        ("socks5://u:secret@h:1?q", "no path or query"),
        ("socks5://usersecret@h:1", "a user without a password"),
        ("socks5://u:sec%FFret@h:1", "not UTF-8 once percent-decoded"),
        ("socks5://u:secret\n@h:1", "spaces or control characters"),
        ("http://u%3Ax:secret@h:1", "cannot contain ':'"),
        (f"socks5://u:{'s' * 256}secret@h:1", "1 to 255 bytes"),
        ("socks5://u:secret@bad_host!:1", "not an IP address or host name"),
    ],
)
def test_a_bad_upstream_url_names_the_key_and_never_quotes_the_password(url, problem):
    with pytest.raises(ConfigError) as caught:
        parse_config({"upstreams": [{"name": "corp", "url": url}]}, "test.toml")
    message = str(caught.value)
    assert message.startswith("test.toml: upstreams[0].url: ")
    assert problem in message
    assert "secret" not in message


@pytest.mark.parametrize(
    ("toml", "problem"),
    [
        (
            '[[rules]]\naction = "deny"\nvia = "corp"\n',
            "rules[0].via: only an allow rule can route via an upstream",
        ),
        (
            '[[rules]]\naction = "allow"\n[[rules]]\naction = "allow"\nvia = "nope"\n',
            "rules[1].via: no [[upstreams]] entry is named 'nope' (configured: corp)",
        ),
        ('[access]\ndefault_via = "nope"\n', "access.default_via: no [[upstreams]] entry"),
        (
            '[[upstreams]]\nname = "corp"\nurl = "http://127.0.0.1:1"\n',
            "upstreams[1].name: duplicate upstream 'corp'",
        ),
        ('[[upstreams]]\nurl = "http://127.0.0.1:1"\n', "upstreams[1].name: missing"),
        ('[[upstreams]]\nname = "x y"\nurl = "http://127.0.0.1:1"\n', "upstreams[1].name: "),
    ],
)
def test_a_via_must_name_a_configured_upstream_on_an_allow_rule(toml, problem):
    base = upstream_toml("http://127.0.0.1:3128", via_default=False)
    with pytest.raises(ConfigError, match=re.escape(problem)):
        config_of(base + toml)


def policy_of(text: str) -> Policy:
    return Policy.from_config(config_of(text), [("127.0.0.1", 1080)])


ROUTED = (
    upstream_toml("socks5h://127.0.0.1:1081", via_default=False, name_="corp")
    + upstream_toml("socks5://127.0.0.1:1082", via_default=False, name_="plain")
    + """
[access]
default_via = "plain"
[[rules]]
action = "allow"
to = ["*.corp.example"]
via = "corp"
[[rules]]
action = "allow"
to = ["198.51.100.0/24"]
via = ""
[[rules]]
action = "deny"
to = ["blocked.example"]
"""
)


def test_the_decision_carries_the_rules_via_else_the_default():
    policy = policy_of(ROUTED)
    corp = policy.check("127.0.0.1", None, "connect", "a.corp.example", None, 443, unresolved=True)
    assert (corp.allowed, corp.reason, corp.via.name) == (True, "rules[0]", "corp")
    direct = policy.check("127.0.0.1", None, "connect", None, "198.51.100.7", 443)
    assert (direct.allowed, direct.reason, direct.via) == (True, "rules[1]", None)
    default = policy.check("127.0.0.1", None, "connect", None, "192.0.2.1", 443)
    assert (default.reason, default.via.name) == ("default allow", "plain")
    denied = policy.check("127.0.0.1", None, "connect", "blocked.example", None, 443)
    assert (denied.allowed, denied.via) == (False, None)


def test_a_name_no_one_here_resolves_matches_no_to_network():
    policy = policy_of(ROUTED)
    # Before a lookup of ours, rules[1]'s network "may match" the name...
    maybe = policy.check("127.0.0.1", None, "connect", "www.example", None, 443)
    assert maybe.reason == "rules[1]"
    # ...but a name handed on to a parent is never resolved here: it cannot.
    final = policy.check("127.0.0.1", None, "connect", "www.example", None, 443, unresolved=True)
    assert (final.reason, final.via.name) == ("default allow", "plain")


def test_no_upstreams_means_every_decision_is_direct():
    decision = policy_of("").check("127.0.0.1", None, "connect", None, "192.0.2.1", 80)
    assert decision.allowed and decision.via is None and not policy_of("").routes


def test_check_config_lines_show_routes_and_mask_the_password():
    text = (
        upstream_toml(f"socks5h://alice:{PASSWORD_IN_URL}@127.0.0.1:1081", via_default=False)
        + '[[rules]]\naction = "allow"\nto = ["*.corp.example"]\nvia = "corp"\n'
        + '[[rules]]\naction = "allow"\nto = ["192.0.2.0/24"]\nvia = ""\n'
    )
    lines = describe_policy(config_of(text), [("127.0.0.1", 1080)])
    joined = "\n".join(lines)
    assert "rules[0]: allow to *.corp.example via corp" in lines
    assert "rules[1]: allow to 192.0.2.0/24 directly" in lines
    assert (
        "upstream corp: socks5h://alice:***@127.0.0.1:1081 (the parent resolves names); "
        "CONNECT via it: rules[0]" in lines
    )
    assert "default route: directly (no default_via)" in lines
    assert PASSWORD not in joined and PASSWORD_IN_URL not in joined


# ---- the HTTP parent's answer, pure ----


def test_an_http_answer_parses_whole_split_and_with_the_tunnels_first_bytes():
    answer = b"HTTP/1.1 200 Connection established\r\nVia: x\r\n\r\nearly"
    assert parse_http_response(answer) == ((200, "Connection established"), len(answer) - 5)
    for cut in range(len(answer) - 5):
        assert parse_http_response(answer[:cut]) is None, cut
    assert parse_http_response(b"HTTP/1.0 407 Proxy Auth\n\n") == ((407, "Proxy Auth"), 25)
    assert parse_http_response(b"HTTP/1.1 200\r\n\r\n") == ((200, ""), 16)
    # A reason phrase is one safe log field: control bytes replaced, length bounded.
    (status, reason), _ = parse_http_response(b"HTTP/1.1 403 a\x1b[2Jb" + b"c" * 99 + b"\r\n\r\n")
    assert status == 403 and reason == "a?[2Jb" + "c" * 58


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 " + b"x" * MAX_HTTP_STATUS_LINE,  # no end of the status line
        b"HTTP/1.1 200 " + b"x" * MAX_HTTP_STATUS_LINE + b"\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n" + b"X: " + b"y" * MAX_HTTP_HEAD,  # an endless header
        b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * (MAX_HTTP_HEAD // 6) + b"\r\n",
        b"SSH-2.0-OpenSSH\r\n",
        b"HTTP/2 200\r\n\r\n",
        b"HTTP/1.1 20 OK\r\n\r\n",
        b"\x05\x00\n",
        b"\n",
    ],
)
def test_a_bad_or_oversized_http_answer_is_a_protocol_error(answer):
    with pytest.raises(ProtocolError):
        parse_http_response(answer)


@pytest.mark.parametrize(
    ("status", "reply"),
    [
        (200, None),
        (204, None),
        (401, Reply.CONNECTION_NOT_ALLOWED),
        (403, Reply.CONNECTION_NOT_ALLOWED),
        (407, Reply.CONNECTION_NOT_ALLOWED),
        (502, Reply.HOST_UNREACHABLE),
        (503, Reply.HOST_UNREACHABLE),
        (504, Reply.HOST_UNREACHABLE),
        (500, Reply.GENERAL_FAILURE),
        (400, Reply.GENERAL_FAILURE),
        (301, Reply.GENERAL_FAILURE),
    ],
)
def test_http_statuses_map_to_rfc_1928_replies(status, reply):
    assert reply_for_http_status(status) == reply


def test_socks_codes_pass_on_and_unknown_ones_are_general_failure():
    assert [reply_for_socks_code(code) for code in range(9)] == list(Reply)
    assert reply_for_socks_code(0x09) == reply_for_socks_code(0xFF) == Reply.GENERAL_FAILURE


def test_the_connect_request_carries_basic_credentials_and_brackets_ipv6():
    head = encode_http_connect(Address(AddressType.IPV6, "::1", 443), "us@er", PASSWORD)
    token = base64.b64encode(f"us@er:{PASSWORD}".encode()).decode()
    assert head == (
        b"CONNECT [::1]:443 HTTP/1.1\r\nHost: [::1]:443\r\n"
        b"Proxy-Authorization: Basic " + token.encode() + b"\r\n\r\n"
    )
    assert encode_http_connect(name("a.example", 80), None, None) == (
        b"CONNECT a.example:80 HTTP/1.1\r\nHost: a.example:80\r\n\r\n"
    )


def test_a_direct_sessions_log_line_is_unchanged_and_a_chained_one_names_the_parent():
    session = Session(client="127.0.0.1:5")
    assert "via=" not in session.log_line() and session.as_dict()["via"] is None
    session.via, session.parent = "corp", "HTTP 403 Forbidden"
    assert session.log_line().endswith(" via=corp parent='HTTP 403 Forbidden'")
    assert (session.as_dict()["via"], session.as_dict()["parent"]) == ("corp", "HTTP 403 Forbidden")


# ---- a front socks5d (in this process) chaining through parents ----


@contextlib.contextmanager
def front(text: str, resolver: Callable[[str, int], Any] | None = None, **extra: Any):
    """A socks5d in this process with the config `text` (its [[upstreams]], rules and
    timeouts); `resolver` replaces its name lookups (to prove when none happens)."""
    config = config_of(text)
    built = HandlerSettings.from_config(config, [])
    settings: dict[str, Any] = {
        "policy": built.policy,
        "connect_timeout": built.connect_timeout,
        "resolve_timeout": built.resolve_timeout,
        **extra,
    }
    if resolver is not None:
        settings["resolver"] = resolver
    with running_proxy(relay_threads=1, **settings) as proxy:
        yield proxy


def access_sessions(caplog: pytest.LogCaptureFixture) -> list[Session]:
    return [r.access for r in caplog.records if r.name == "socks5d.access"]  # type: ignore[attr-defined]


def one_session(caplog: pytest.LogCaptureFixture) -> Session:
    assert wait_until(lambda: len(access_sessions(caplog)) >= 1)
    (session,) = access_sessions(caplog)
    return session


def one_request(text: str, target: Address, caplog: pytest.LogCaptureFixture) -> Any:
    """(reply, access record) of one request through a front with the config `text`."""
    with front(text) as proxy:
        sock, reply, _ = open_tunnel(proxy.address, target)
        sock.close()
        return reply, one_session(caplog)


def echo_both_ways(sock: socket.socket, size: int = 3 * MiB, half_close: bool = True) -> None:
    """Send `size` random bytes and read them back from an echo: same digest both ways.

    `half_close` False for tinyproxy, which ends both directions at the client's EOF.
    """
    data = os.urandom(size)
    sender = Worker(lambda: (sock.sendall(data), half_close and sock.shutdown(socket.SHUT_WR)))
    sender.start()
    if half_close:
        assert sha256_of_stream(sock) == (hashlib.sha256(data).hexdigest(), size)
    else:
        assert hashlib.sha256(recv_exactly(sock, size)).digest() == hashlib.sha256(data).digest()
    sender.result()


def no_lookups(calls: list[str]) -> Callable[[str, int], Any]:
    def resolver(host: str, port: int) -> Any:
        calls.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "the front must not resolve this")

    return resolver


def socks5d_parent(
    daemon_factory: Callable[..., DaemonProcess], *args: str
) -> tuple[DaemonProcess, int]:
    parent = daemon_factory("--port", "0", *args)
    return parent, parent.port


@pytest.mark.parametrize("login", [False, True], ids=["no-login", "login"])
@pytest.mark.parametrize("scheme", ["socks5", "socks5h"])
def test_a_connect_chains_through_a_second_socks5d(
    daemon_factory, echo_target, caplog, scheme, login
):
    caplog.set_level(logging.INFO, logger="socks5d.access")
    parent, port = socks5d_parent(daemon_factory, *(["--user", f"bob:{PASSWORD}"] if login else []))
    credentials = f"bob:{PASSWORD_IN_URL}@" if login else ""
    lookups: list[str] = []
    resolver = no_lookups(lookups) if scheme == "socks5h" else None
    if scheme == "socks5":

        def resolver(host: str, port_: int) -> Any:
            lookups.append(host)
            return [(socket.AF_INET, ("127.0.0.1", port_))]

    with front(upstream_toml(f"{scheme}://{credentials}127.0.0.1:{port}"), resolver) as proxy:
        target = name("localhost", echo_target.port)
        sock, reply, _ = open_tunnel(proxy.address, target)
        with sock:
            assert reply == Reply.SUCCEEDED
            echo_both_ways(sock)
        session = one_session(caplog)
    assert (session.via, session.parent, session.reply) == ("corp", "reply 00", Reply.SUCCEEDED)
    assert session.up == session.down == 3 * MiB
    assert session.target == f"localhost:{echo_target.port}"
    # socks5h: the parent resolves (no lookup here; it is asked for the name); socks5:
    # resolved here, the parent is sent the address.
    assert wait_until(lambda: "cmd=CONNECT" in parent.output())
    asked = "localhost" if scheme == "socks5h" else "127.0.0.1"
    assert f"target={asked}:{echo_target.port}" in parent.output()
    assert lookups == ([] if scheme == "socks5h" else ["localhost"])
    assert session.resolved == ("-" if scheme == "socks5h" else f"127.0.0.1:{echo_target.port}")
    if login:
        assert "user=bob" in parent.output()


def test_a_wrong_login_at_the_socks5_parent_is_02(daemon_factory, echo_target, caplog):
    caplog.set_level(logging.INFO, logger="socks5d.access")
    _, port = socks5d_parent(daemon_factory, "--user", "bob:right")
    reply, session = one_request(
        upstream_toml(f"socks5://bob:wrong@127.0.0.1:{port}"), ipv4(echo_target.port), caplog
    )
    assert reply == Reply.CONNECTION_NOT_ALLOWED
    assert (session.via, session.parent) == ("corp", "login refused")


def test_a_parent_without_a_login_we_need_says_ff_and_we_say_01(
    daemon_factory, echo_target, caplog
):
    caplog.set_level(logging.INFO, logger="socks5d.access")
    _, port = socks5d_parent(daemon_factory, "--user", "bob:right")
    text = upstream_toml(f"socks5://127.0.0.1:{port}")
    reply, session = one_request(text, ipv4(echo_target.port), caplog)
    assert (reply, session.parent) == (Reply.GENERAL_FAILURE, "method ff")


def test_a_socks5_parent_that_cannot_reach_the_target_has_its_code_passed_on(
    daemon_factory, caplog
):
    caplog.set_level(logging.INFO, logger="socks5d.access")
    _, port = socks5d_parent(daemon_factory)
    reply, session = one_request(
        upstream_toml(f"socks5://127.0.0.1:{port}"), ipv4(closed_port()), caplog
    )
    assert reply == Reply.CONNECTION_REFUSED
    assert (session.via, session.parent, session.reply) == ("corp", "reply 05", Reply(5))
    assert "via=corp parent='reply 05'" in session.log_line()


# ---- scripted SOCKS5 parents ----


def socks5_parent_answering(
    code: int, early: bytes = b"", then: Callable[[socket.socket], None] | None = None
) -> Callable[[socket.socket], None]:
    """A parent that takes any greeting and request and answers with `code`, then the
    bytes `early` right behind the reply, then `then(conn)`."""

    def behaviour(conn: socket.socket) -> None:
        assert recv_exactly(conn, 2)[0] == 5
        conn.recv(255)  # the methods (one, from us)
        conn.sendall(b"\x05\x00")
        buffer = b""
        while parse_request(buffer) is None:
            buffer += conn.recv(512)
        bound = Address(AddressType.IPV4, "192.0.2.9", 4242)
        conn.sendall(encode_reply(Reply(code) if code < 9 else code, bound) + early)  # type: ignore[arg-type]
        if then is not None:
            then(conn)

    return behaviour


@pytest.mark.parametrize("code", [0x02, 0x05, 0x03])
def test_a_refusing_socks5_parents_code_is_passed_on(target_factory, caplog, code):
    caplog.set_level(logging.INFO, logger="socks5d.access")
    parent = target_factory(socks5_parent_answering(code))
    reply, session = one_request(
        upstream_toml(f"socks5h://127.0.0.1:{parent.port}"), name("x.example", 443), caplog
    )
    assert reply == code
    assert session.parent == f"reply {code:02x}"


def test_bytes_a_parent_sends_behind_its_reply_reach_the_client_first(target_factory, caplog):
    caplog.set_level(logging.INFO, logger="socks5d.access")
    banner = b"SSH-2.0-early banner\r\n"
    parent = target_factory(socks5_parent_answering(0, early=banner, then=echo))
    with front(upstream_toml(f"socks5h://127.0.0.1:{parent.port}")) as proxy:
        sock, reply, bound = open_tunnel(proxy.address, name("x.example", 22))
        with sock:
            assert reply == Reply.SUCCEEDED
            # RFC 1928 §6: the parent's BND (where it reaches the target from) passed on.
            assert bound == Address(AddressType.IPV4, "192.0.2.9", 4242)
            assert recv_exactly(sock, len(banner)) == banner
            sock.sendall(b"ping")
            assert recv_exactly(sock, 4) == b"ping"
            sock.shutdown(socket.SHUT_WR)
            assert recv_all(sock) == b""
        session = one_session(caplog)
    assert (session.up, session.down) == (4, len(banner) + 4)


def test_a_parent_that_resets_mid_handshake_is_01(target_factory, caplog):
    caplog.set_level(logging.INFO, logger="socks5d.access")

    def reset(conn: socket.socket) -> None:
        recv_exactly(conn, 3)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")

    parent = target_factory(reset)
    reply, session = one_request(
        upstream_toml(f"socks5://127.0.0.1:{parent.port}"), ipv4(9), caplog
    )
    assert reply == Reply.GENERAL_FAILURE
    assert session.parent == "closed" and "mid-handshake" in session.end


def test_a_parent_that_is_down_is_04(caplog):
    caplog.set_level(logging.INFO, logger="socks5d.access")
    reply, session = one_request(
        upstream_toml(f"socks5://127.0.0.1:{closed_port()}"), ipv4(9), caplog
    )
    assert reply == Reply.HOST_UNREACHABLE
    assert session.parent == "unreachable" and "connection refused" in session.end.lower()


@pytest.mark.parametrize("scheme", ["socks5", "http"])
def test_a_parent_that_never_answers_is_04_within_the_connect_timeout(
    target_factory, caplog, scheme
):
    caplog.set_level(logging.INFO, logger="socks5d.access")

    def silent(conn: socket.socket) -> None:
        conn.settimeout(TIMEOUT)
        with contextlib.suppress(OSError):
            while conn.recv(4096):  # reads, never answers, until we give up
                pass

    parent = target_factory(silent)
    text = upstream_toml(f"{scheme}://127.0.0.1:{parent.port}") + "[timeouts]\nconnect = 1\n"
    with front(text) as proxy:
        started = time.monotonic()
        sock, reply, _ = open_tunnel(proxy.address, ipv4(9))
        elapsed = time.monotonic() - started
        sock.close()
        session = one_session(caplog)
    assert reply == Reply.HOST_UNREACHABLE
    assert session.parent == "timeout"
    assert 0.9 <= elapsed < TIMEOUT  # bounded by timeouts.connect, not the parent


# ---- HTTP CONNECT parents ----


class HttpParent:
    """A scripted HTTP CONNECT parent: records each request head, answers `answer`
    (bytes), and on a 2xx really connects to the requested target and relays."""

    def __init__(self, target_factory: Callable[..., TargetServer], answer: bytes) -> None:
        self.answer = answer
        self.heads: list[bytes] = []
        self.server = target_factory(self.serve)
        self.port = self.server.port

    def serve(self, conn: socket.socket) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = conn.recv(4096)
            if not chunk:
                return
            head += chunk
        self.heads.append(head)
        with contextlib.suppress(OSError):
            conn.sendall(self.answer)
        if not self.answer.startswith(b"HTTP/1.1 2"):
            return
        authority = head.split(b" ")[1].decode()
        host, _, port = authority.rpartition(":")
        with socket.create_connection((host.strip("[]"), int(port)), timeout=TIMEOUT) as out:
            pump = Worker(lambda: (out.sendall(recv_all(conn)), out.shutdown(socket.SHUT_WR)))
            pump.start()
            while chunk := out.recv(65536):
                conn.sendall(chunk)
            conn.shutdown(socket.SHUT_WR)
            pump.result()


@pytest.mark.parametrize(
    ("answer", "reply"),
    [
        (b"HTTP/1.1 403 Forbidden\r\n\r\n", Reply.CONNECTION_NOT_ALLOWED),
        (b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n", Reply.CONNECTION_NOT_ALLOWED),
        (b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n", Reply.HOST_UNREACHABLE),
        (b"HTTP/1.0 503 Service Unavailable\r\n\r\n", Reply.HOST_UNREACHABLE),
        (b"HTTP/1.1 504 Gateway Timeout\n\n", Reply.HOST_UNREACHABLE),
        (b"HTTP/1.1 500 Unable to connect\r\n\r\n", Reply.GENERAL_FAILURE),
        (b"HTTP/1.1 200 " + b"x" * 5000 + b"\r\n\r\n", Reply.GENERAL_FAILURE),
        (b"garbage that is no HTTP\r\n\r\n", Reply.GENERAL_FAILURE),
        (b"HTTP/1.1 200 OK\r\n", Reply.GENERAL_FAILURE),  # then closes: mid-handshake
    ],
)
def test_an_http_parents_answer_maps_to_a_reply_and_the_log_says_what_it_said(
    target_factory, caplog, answer, reply
):
    caplog.set_level(logging.INFO, logger="socks5d.access")
    parent = HttpParent(target_factory, answer)
    got, session = one_request(
        upstream_toml(f"http://127.0.0.1:{parent.port}"), name("x.example", 443), caplog
    )
    assert got == reply
    assert parent.heads == [b"CONNECT x.example:443 HTTP/1.1\r\nHost: x.example:443\r\n\r\n"]
    if answer.startswith(b"HTTP/1.") and len(answer) < 100 and answer.count(b"\n") > 1:
        status = answer.split(b"\n")[0].decode().strip().split(" ", 1)[1]
        assert session.parent == f"HTTP {status}"
        assert f"parent='HTTP {status}'" in session.log_line()
    assert session.via == "corp"


def test_an_endless_header_is_cut_off_cleanly(target_factory, caplog):
    caplog.set_level(logging.INFO, logger="socks5d.access")

    def endless(conn: socket.socket) -> None:
        conn.recv(4096)
        conn.sendall(b"HTTP/1.1 200 OK\r\n")
        with contextlib.suppress(OSError):
            for _ in range(4096):  # 4 MiB at most: the front must stop reading long before
                conn.sendall(b"X-Flood: " + b"a" * 1013 + b"\r\n")

    parent = target_factory(endless)
    reply, session = one_request(upstream_toml(f"http://127.0.0.1:{parent.port}"), ipv4(9), caplog)
    assert reply == Reply.GENERAL_FAILURE
    assert session.parent == "malformed answer" and "longer than" in session.end


def test_an_http_parent_gets_basic_credentials_and_its_early_bytes_reach_the_client(
    target_factory, echo_target, caplog
):
    caplog.set_level(logging.INFO, logger="socks5d.access")
    parent = HttpParent(target_factory, b"HTTP/1.1 200 Connection established\r\n\r\nhi!")
    url = f"http://us%40er:{PASSWORD_IN_URL}@127.0.0.1:{parent.port}"
    with front(upstream_toml(url)) as proxy:
        sock, reply, _ = open_tunnel(proxy.address, ipv4(echo_target.port))
        with sock:
            assert reply == Reply.SUCCEEDED
            assert recv_exactly(sock, 3) == b"hi!"
            echo_both_ways(sock, MiB)
        session = one_session(caplog)
    token = base64.b64encode(f"us@er:{PASSWORD}".encode())
    assert b"Proxy-Authorization: Basic " + token + b"\r\n" in parent.heads[0]
    assert parent.heads[0].startswith(f"CONNECT 127.0.0.1:{echo_target.port} HTTP/1.1".encode())
    assert (session.parent, session.up, session.down) == (
        "HTTP 200 Connection established",
        MiB,
        MiB + 3,
    )
    assert PASSWORD not in session.log_line()


# ---- tinyproxy, a real HTTP CONNECT proxy ----

needs_tinyproxy = pytest.mark.skipif(
    shutil.which("tinyproxy") is None, reason="tinyproxy is not installed (Debian: tinyproxy)"
)


@contextlib.contextmanager
def tinyproxy(folder: Path, auth: tuple[str, str] | None) -> Iterator[int]:
    """tinyproxy in the foreground on a free loopback port (it has no port 0)."""
    for _attempt in range(5):
        port = closed_port()
        conf = folder / "tinyproxy.conf"
        lines = [f"Port {port}", "Listen 127.0.0.1", "Timeout 30", "Allow 127.0.0.1"]
        lines += [f'LogFile "{folder / "tinyproxy.log"}"', "LogLevel Info"]
        if auth:
            lines.append(f"BasicAuth {auth[0]} {auth[1]}")
        conf.write_text("\n".join(lines) + "\n")
        proc = subprocess.Popen(
            ["tinyproxy", "-d", "-c", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            if wait_until(_started(proc, port)) and proc.poll() is None:
                yield port
                return
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(TIMEOUT)
    pytest.skip("tinyproxy did not start on a free port")


def _started(proc: subprocess.Popen[bytes], port: int) -> Callable[[], bool]:
    """Whether tinyproxy listens on `port` now, or has exited (a port taken meanwhile)."""

    def check() -> bool:
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", port)) == 0 or proc.poll() is not None

    return check


@needs_tinyproxy
@pytest.mark.parametrize("auth", [None, ("alice", "tiny-secret")], ids=["no-auth", "basic-auth"])
def test_a_connect_chains_through_tinyproxy(tmp_path, echo_target, caplog, auth):
    caplog.set_level(logging.INFO, logger="socks5d.access")
    with tinyproxy(tmp_path, auth) as port:
        login = f"{auth[0]}:{auth[1]}@" if auth else ""
        lookups: list[str] = []
        with front(upstream_toml(f"http://{login}127.0.0.1:{port}"), no_lookups(lookups)) as proxy:
            sock, reply, _ = open_tunnel(proxy.address, name("localhost", echo_target.port))
            with sock:
                assert reply == Reply.SUCCEEDED
                echo_both_ways(sock, half_close=False)
            sock, refused, _ = open_tunnel(proxy.address, ipv4(closed_port()))
            sock.close()
            assert wait_until(lambda: len(access_sessions(caplog)) == 2)
    assert lookups == []  # the HTTP parent resolved "localhost"
    # Logged as each ends, in any order: told apart by their replies.
    ok, failed = sorted(access_sessions(caplog), key=lambda session: int(session.reply or 0))
    assert ok.parent.startswith("HTTP 200") and ok.up == ok.down == 3 * MiB
    # tinyproxy reports a failed connect as "500 Unable to connect": 01, words logged.
    assert (refused, failed.parent) == (Reply.GENERAL_FAILURE, "HTTP 500 Unable to connect")


@needs_tinyproxy
def test_a_wrong_login_at_tinyproxy_is_02(tmp_path, echo_target, caplog):
    caplog.set_level(logging.INFO, logger="socks5d.access")
    with tinyproxy(tmp_path, ("alice", "right")) as port:
        text = upstream_toml(f"http://alice:wrong@127.0.0.1:{port}")
        reply, session = one_request(text, ipv4(echo_target.port), caplog)
    assert reply == Reply.CONNECTION_NOT_ALLOWED
    assert session.parent.split(" ")[1] in ("401", "407")


# ---- what is not chained, and the rules around it ----


def test_bind_and_udp_through_a_parent_get_07(target_factory, caplog):
    caplog.set_level(logging.INFO, logger="socks5d.access")
    parent = target_factory(echo)
    with front(upstream_toml(f"socks5://127.0.0.1:{parent.port}")) as proxy:
        for command in (Command.BIND, Command.UDP_ASSOCIATE):
            sock, reply, _ = open_tunnel(proxy.address, ipv4(0), command=command)
            sock.close()
            assert reply == Reply.COMMAND_NOT_SUPPORTED
        assert wait_until(lambda: len(access_sessions(caplog)) == 2)
    assert sorted(s.end for s in access_sessions(caplog)) == [
        "BIND via a parent proxy: not supported",
        "UDP ASSOCIATE via a parent proxy: not supported",
    ]
    assert parent.accepted == 0


def test_only_routed_names_go_to_the_parent_and_rules_still_deny(
    target_factory, echo_target, caplog
):
    caplog.set_level(logging.INFO, logger="socks5d.access")
    parent = target_factory(socks5_parent_answering(0, then=echo))
    text = (
        upstream_toml(f"socks5h://127.0.0.1:{parent.port}", via_default=False)
        + '[[rules]]\naction = "deny"\nto = ["bad.corp.example"]\n'
        + '[[rules]]\naction = "allow"\nto = ["*.corp.example"]\nvia = "corp"\n'
    )
    with front(text) as proxy:
        sock, reply, _ = open_tunnel(proxy.address, name("bad.corp.example", 80))
        sock.close()
        assert reply == Reply.CONNECTION_NOT_ALLOWED
        with open_tunnel(proxy.address, name("ok.corp.example", 80))[0] as sock:
            sock.sendall(b"via")
            assert recv_exactly(sock, 3) == b"via"
        # Not routed: straight to the target (an IP literal, the loop's fast path).
        with open_tunnel(proxy.address, ipv4(echo_target.port))[0] as sock:
            sock.sendall(b"direct")
            assert recv_exactly(sock, 6) == b"direct"
        assert wait_until(lambda: len(access_sessions(caplog)) == 3)
    # Logged as each ends, in any order: told apart by their targets.
    by_target = {session.target: session for session in access_sessions(caplog)}
    denied = by_target["bad.corp.example:80"]
    routed = by_target["ok.corp.example:80"]
    direct = by_target[f"127.0.0.1:{echo_target.port}"]
    assert (denied.rule, denied.via) == ("rules[0]", "-")
    assert (routed.via, routed.parent) == ("corp", "reply 00")
    assert (direct.via, direct.reply) == ("-", Reply.SUCCEEDED)
    assert parent.accepted == 1


def test_a_private_literal_is_still_denied_before_any_parent(target_factory, caplog):
    caplog.set_level(logging.INFO, logger="socks5d.access")
    parent = target_factory(socks5_parent_answering(0))
    text = upstream_toml(f"socks5h://127.0.0.1:{parent.port}", via_default=False) + (
        '[access]\ndefault_via = "corp"\nprivate_destinations = "deny"\n'
    )
    metadata = Address(AddressType.IPV4, "169.254.169.254", 80)
    reply, session = one_request(text, metadata, caplog)
    assert reply == Reply.CONNECTION_NOT_ALLOWED
    assert session.rule == "private destination" and parent.accepted == 0


# ---- the real daemon: the log, check-config and reload never show the password ----


def daemon_config(folder: Path, parent_port: int) -> Path:
    config = folder / "front.toml"
    config.write_text(
        '[server]\nhost = "127.0.0.1"\nport = 0\n[logging]\nlevel = "debug"\n'
        + upstream_toml(f"socks5h://bob:{PASSWORD_IN_URL}@127.0.0.1:{parent_port}", False)
        + '[[rules]]\naction = "allow"\nto = ["*.chain.test", "localhost"]\nvia = "corp"\n'
    )
    return config


def test_the_password_never_reaches_the_log_or_check_config_and_a_bad_reload_is_refused(
    tmp_path, daemon_factory, echo_target
):
    parent = daemon_factory("--port", "0", "--user", f"bob:{PASSWORD}")
    config = daemon_config(tmp_path, parent.port)
    checked = subprocess.run(
        [sys.executable, "-m", "socks5d", "check-config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert checked.returncode == 0, checked.stderr
    assert "rules[0]: allow to *.chain.test, localhost via corp" in checked.stdout
    assert f"socks5h://bob:***@127.0.0.1:{parent.port}" in checked.stdout
    front_daemon = daemon_factory("--config", str(config))
    address = ("127.0.0.1", front_daemon.port)
    with open_tunnel(address, name("localhost", echo_target.port))[0] as sock:
        sock.sendall(b"through")
        assert recv_exactly(sock, 7) == b"through"
    # A reload that removes the upstream the rule names: refused, the old config kept.
    without_upstream = config.read_text().split("[[upstreams]]")[0]
    config.write_text(without_upstream + '[[rules]]\naction = "allow"\nvia = "corp"\n')
    front_daemon.proc.send_signal(signal.SIGHUP)
    assert wait_until(lambda: "reload rejected" in front_daemon.output())
    assert "rules[0].via: no [[upstreams]] entry is named 'corp'" in front_daemon.output()
    with open_tunnel(address, name("localhost", echo_target.port))[0] as sock:
        sock.sendall(b"still")
        assert recv_exactly(sock, 5) == b"still"
    assert wait_until(lambda: front_daemon.output().count("via=corp parent='reply 00'") == 2)
    front_daemon.stop()
    everything = front_daemon.output() + checked.stdout + checked.stderr
    for secret in (PASSWORD, PASSWORD_IN_URL, base64.b64encode(PASSWORD.encode()).decode()):
        assert secret not in everything
    assert front_daemon.proc.returncode == 0


def test_check_config_refuses_a_via_to_nowhere_naming_the_rule(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text('[[rules]]\naction = "allow"\nvia = "corp"\n')
    checked = subprocess.run(
        [sys.executable, "-m", "socks5d", "check-config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert checked.returncode != 0
    assert "rules[0].via: no [[upstreams]] entry is named 'corp'" in checked.stderr
