"""Wire-format tests for socks5d.socks.protocol (RFC 1928, RFC 1929).

Tests speak bytes: each message is an annotated literal. Every parser case is checked whole,
byte by byte (each strict prefix needs more data), and with trailing bytes (left unconsumed).
"""

from __future__ import annotations

import ast
import random
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from socks5d.socks.protocol import (
    MAX_GREETING_SIZE,
    MAX_REQUEST_SIZE,
    MAX_USERNAME_PASSWORD_SIZE,
    SOCKS_VERSION,
    UNSPECIFIED_IPV4,
    USERNAME_PASSWORD_VERSION,
    Address,
    AddressType,
    AuthStatus,
    Command,
    Greeting,
    Method,
    ProtocolError,
    Reply,
    Request,
    UdpDatagram,
    UsernamePassword,
    encode_address,
    encode_auth_status,
    encode_greeting,
    encode_method_selection,
    encode_reply,
    encode_request,
    encode_udp_datagram,
    encode_username_password,
    parse_greeting,
    parse_reply,
    parse_request,
    parse_udp_datagram,
    parse_username_password,
)

Parser = Callable[[Any], Any]

TRAILING = b"\x16\x03\x01 pipelined"  # e.g. a TLS ClientHello the client sent right behind


def assert_parses(parse: Parser, wire: bytes, expected: object) -> None:
    """Whole, byte by byte, with trailing bytes, and as bytearray/memoryview."""
    for i in range(len(wire)):
        assert parse(wire[:i]) is None, f"prefix of {i} bytes should need more data"
    assert parse(wire) == (expected, len(wire))
    assert parse(wire + TRAILING) == (expected, len(wire))
    assert parse(bytearray(wire + TRAILING)) == (expected, len(wire))
    assert parse(memoryview(wire + TRAILING)) == (expected, len(wire))


def assert_rejects(parse: Parser, wire: bytes, reply: Reply | None) -> ProtocolError:
    """The message fails with `reply`, with or without trailing bytes."""
    for data in (wire, wire + TRAILING, memoryview(wire)):
        with pytest.raises(ProtocolError) as info:
            parse(data)
        assert info.value.reply is reply
    return info.value


# --- constants and enums --------------------------------------------------------------------


def test_versions_and_size_bounds_match_the_rfcs() -> None:
    assert SOCKS_VERSION == 5
    assert USERNAME_PASSWORD_VERSION == 1
    assert MAX_GREETING_SIZE == 257
    assert MAX_REQUEST_SIZE == 262
    assert MAX_USERNAME_PASSWORD_SIZE == 513


def test_enum_values_are_the_rfc_values() -> None:
    assert [int(m) for m in Method] == [0x00, 0x01, 0x02, 0xFF]
    assert [int(c) for c in Command] == [1, 2, 3]
    assert [int(a) for a in AddressType] == [1, 3, 4]
    assert [int(r) for r in Reply] == list(range(9))
    assert [int(s) for s in AuthStatus] == [0, 1]


def test_protocol_error_carries_message_and_reply() -> None:
    err = ProtocolError("bad", Reply.GENERAL_FAILURE)
    assert err.message == "bad"
    assert err.reply is Reply.GENERAL_FAILURE
    assert str(err) == "bad"
    assert ProtocolError("bad").reply is None


def test_module_imports_stdlib_only_and_no_socket() -> None:
    # protocol.py may use socks5d.core.addresses (pure address helpers), held to the same rule.
    import socks5d.socks.protocol as protocol

    package = Path(protocol.__file__).parent.parent
    for name in ("socks/protocol", "core/addresses"):
        tree = ast.parse((package / f"{name}.py").read_text(encoding="utf-8"))
        imported: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level:
                assert (name, node.module) == ("socks/protocol", "core.addresses"), node.module
            elif isinstance(node, ast.ImportFrom):
                imported.add((node.module or "").split(".")[0])
        assert "socket" not in imported
        assert imported <= sys.stdlib_module_names


# --- RFC 1928 §3: greeting and method selection -----------------------------------------------


def test_greeting_with_one_method() -> None:
    wire = b"\x05\x01\x00"  # VER NMETHODS METHODS(no auth)
    assert_parses(parse_greeting, wire, Greeting((0x00,)))


def test_greeting_keeps_methods_in_order_including_unknown_ones() -> None:
    wire = b"\x05\x04\x02\x00\x80\xfe"  # VER NMETHODS METHODS(user/pass, none, private, 0xfe)
    assert_parses(parse_greeting, wire, Greeting((0x02, 0x00, 0x80, 0xFE)))


def test_greeting_with_255_methods() -> None:
    wire = b"\x05\xff" + bytes(range(255))  # VER NMETHODS(255) METHODS
    assert len(wire) == MAX_GREETING_SIZE
    assert_parses(parse_greeting, wire, Greeting(tuple(range(255))))


@pytest.mark.parametrize(
    "wire",
    [
        b"\x04\x01\x00\x50\x7f\x00\x00\x01\x00",  # SOCKS4 CONNECT: VER(4) CMD PORT IP USERID NUL
        b"GET / HTTP/1.1\r\n",  # an HTTP client pointed at the proxy port
        b"\x00",  # VER 0
    ],
)
def test_greeting_with_wrong_version_closes_without_reply(wire: bytes) -> None:
    assert_rejects(parse_greeting, wire, None)
    assert_rejects(parse_greeting, wire[:1], None)  # decided on the first byte


def test_greeting_with_no_methods_closes_without_reply() -> None:
    assert_rejects(parse_greeting, b"\x05\x00", None)  # VER NMETHODS(0)


def test_encode_greeting() -> None:
    assert encode_greeting([Method.NO_AUTHENTICATION_REQUIRED, Method.USERNAME_PASSWORD]) == (
        b"\x05\x02\x00\x02"  # VER NMETHODS METHODS
    )


@pytest.mark.parametrize("methods", [[], list(range(256)), [256], [-1]])
def test_encode_greeting_rejects_bad_method_lists(methods: list[int]) -> None:
    with pytest.raises(ValueError):
        encode_greeting(methods)


def test_greeting_round_trip() -> None:
    methods = (0x00, 0x01, 0x02, 0x7F)
    wire = encode_greeting(methods)
    assert parse_greeting(wire) == (Greeting(methods), len(wire))


def test_encode_method_selection() -> None:
    assert encode_method_selection(Method.USERNAME_PASSWORD) == b"\x05\x02"  # VER METHOD
    assert encode_method_selection(Method.NO_ACCEPTABLE_METHODS) == b"\x05\xff"
    with pytest.raises(ValueError):
        encode_method_selection(256)


# --- RFC 1929 §2: username/password -------------------------------------------------------------


def test_username_password() -> None:
    wire = b"\x01\x04user\x06secret"  # VER ULEN UNAME PLEN PASSWD
    assert_parses(parse_username_password, wire, UsernamePassword(b"user", b"secret"))


def test_username_password_of_255_bytes_each() -> None:
    wire = b"\x01\xff" + b"u" * 255 + b"\xff" + b"p" * 255  # VER ULEN UNAME PLEN PASSWD
    assert len(wire) == MAX_USERNAME_PASSWORD_SIZE
    assert parse_username_password(wire) == (
        UsernamePassword(b"u" * 255, b"p" * 255),
        MAX_USERNAME_PASSWORD_SIZE,
    )


def test_username_password_keeps_arbitrary_bytes() -> None:
    wire = b"\x01\x03\x00\xff\xc3\x02\x00\n"  # VER ULEN UNAME(NUL 0xff 0xc3) PLEN PASSWD
    assert_parses(parse_username_password, wire, UsernamePassword(b"\x00\xff\xc3", b"\x00\n"))


def test_username_password_accepts_empty_fields_leniently() -> None:
    wire = b"\x01\x00\x00"  # VER ULEN(0) PLEN(0)
    assert_parses(parse_username_password, wire, UsernamePassword(b"", b""))


@pytest.mark.parametrize("version", [0x00, 0x05, 0x02])
def test_username_password_with_wrong_version_closes_without_reply(version: int) -> None:
    wire = bytes((version,)) + b"\x04user\x06secret"  # VER(bad) ULEN UNAME PLEN PASSWD
    assert_rejects(parse_username_password, wire, None)
    assert_rejects(parse_username_password, wire[:1], None)


def test_username_password_repr_hides_the_password() -> None:
    creds = UsernamePassword(b"alice", b"hunter2")
    assert "alice" in repr(creds)
    assert "hunter2" not in repr(creds)
    assert "hunter2" not in str(creds)


def test_username_password_round_trip() -> None:
    wire = encode_username_password(b"alice", b"hunter2")
    assert wire == b"\x01\x05alice\x07hunter2"  # VER ULEN UNAME PLEN PASSWD
    assert parse_username_password(wire) == (UsernamePassword(b"alice", b"hunter2"), len(wire))


@pytest.mark.parametrize(("user", "password"), [(b"u" * 256, b"p"), (b"u", b"p" * 256)])
def test_encode_username_password_rejects_fields_over_255_bytes(
    user: bytes, password: bytes
) -> None:
    with pytest.raises(ValueError):
        encode_username_password(user, password)


def test_encode_auth_status() -> None:
    assert encode_auth_status(AuthStatus.SUCCESS) == b"\x01\x00"  # VER STATUS
    assert encode_auth_status(AuthStatus.FAILURE) == b"\x01\x01"


# --- RFC 1928 §4/§5: requests -------------------------------------------------------------------


def test_connect_request_with_ipv4() -> None:
    wire = b"\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x50"  # VER CMD RSV ATYP addr port(80)
    assert_parses(
        parse_request,
        wire,
        Request(Command.CONNECT, Address(AddressType.IPV4, "127.0.0.1", 80)),
    )


def test_connect_request_with_ipv6_gives_compressed_text() -> None:
    wire = (
        b"\x05\x01\x00\x04"  # VER CMD RSV ATYP(IPv6)
        b"\x20\x01\x0d\xb8\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x01"  # 2001:db8::1
        b"\x01\xbb"  # port 443
    )
    assert_parses(
        parse_request,
        wire,
        Request(Command.CONNECT, Address(AddressType.IPV6, "2001:db8::1", 443)),
    )


def test_request_with_ipv6_loopback() -> None:
    wire = b"\x05\x01\x00\x04" + b"\x00" * 15 + b"\x01" + b"\x00\x16"  # ... ::1 port(22)
    assert parse_request(wire) == (
        Request(Command.CONNECT, Address(AddressType.IPV6, "::1", 22)),
        len(wire),
    )


def test_connect_request_with_domain_name() -> None:
    wire = b"\x05\x01\x00\x03\x0bexample.com\x01\xbb"  # VER CMD RSV ATYP len name port(443)
    assert_parses(
        parse_request,
        wire,
        Request(Command.CONNECT, Address(AddressType.DOMAINNAME, "example.com", 443)),
    )


def test_bind_request() -> None:
    wire = b"\x05\x02\x00\x01\x0a\x00\x00\x05\x1f\x90"  # VER CMD(BIND) RSV ATYP addr port(8080)
    assert_parses(
        parse_request, wire, Request(Command.BIND, Address(AddressType.IPV4, "10.0.0.5", 8080))
    )


def test_udp_associate_request_with_unspecified_address() -> None:
    wire = b"\x05\x03\x00\x01\x00\x00\x00\x00\x00\x00"  # VER CMD(UDP) RSV ATYP 0.0.0.0 port(0)
    assert_parses(parse_request, wire, Request(Command.UDP_ASSOCIATE, UNSPECIFIED_IPV4))


@pytest.mark.parametrize(("port_bytes", "port"), [(b"\x00\x00", 0), (b"\xff\xff", 65535)])
def test_request_port_extremes(port_bytes: bytes, port: int) -> None:
    wire = b"\x05\x01\x00\x01\x01\x02\x03\x04" + port_bytes  # VER CMD RSV ATYP addr port
    assert_parses(
        parse_request, wire, Request(Command.CONNECT, Address(AddressType.IPV4, "1.2.3.4", port))
    )


def test_request_ignores_nonzero_reserved_byte() -> None:
    wire = b"\x05\x01\xff\x01\x01\x02\x03\x04\x00\x50"  # VER CMD RSV(0xff) ATYP addr port
    assert_parses(
        parse_request, wire, Request(Command.CONNECT, Address(AddressType.IPV4, "1.2.3.4", 80))
    )


def test_request_with_domain_that_is_an_ip_literal_stays_a_domain() -> None:
    wire = b"\x05\x01\x00\x03\x09127.0.0.1\x00\x50"  # VER CMD RSV ATYP len name port
    assert_parses(
        parse_request,
        wire,
        Request(Command.CONNECT, Address(AddressType.DOMAINNAME, "127.0.0.1", 80)),
    )


def test_request_with_ipv6_literal_as_domain_stays_a_domain() -> None:
    wire = b"\x05\x01\x00\x03\x03::1\x00\x50"  # VER CMD RSV ATYP len name port
    parsed = parse_request(wire)
    assert parsed == (
        Request(Command.CONNECT, Address(AddressType.DOMAINNAME, "::1", 80)),
        len(wire),
    )
    assert str(parsed[0].address) == "[::1]:80"


def test_request_with_idna_domain_gives_a_label_form() -> None:
    name = "bücher.example".encode()  # UTF-8 on the wire
    wire = b"\x05\x01\x00\x03" + bytes((len(name),)) + name + b"\x00\x50"
    assert_parses(
        parse_request,
        wire,
        Request(Command.CONNECT, Address(AddressType.DOMAINNAME, "xn--bcher-kva.example", 80)),
    )


@pytest.mark.parametrize(
    "name",
    [
        b"localhost",
        b"example.com.",  # fully qualified with the root dot
        b"_sip._tcp.example.com",  # underscores occur in real names
        b"Example.COM",  # case is kept; DNS is case-insensitive
        b"a" * 63 + b".com",  # longest label DNS carries
        b"xn--bcher-kva.example",  # already in A-label form
        # Lengths are the resolver's to judge: it answers names DNS could not carry.
        b"0x" + b"0" * 62 + b"7f",  # one 66-character label: 0.0.0.127 to getaddrinfo
        (b"a" * 62 + b".") * 4 + b"a" * 3,  # 255 bytes: over DNS's 253 characters of text
    ],
)
def test_request_accepts_usable_domain_names(name: bytes) -> None:
    wire = b"\x05\x01\x00\x03" + bytes((len(name),)) + name + b"\x00\x50"
    parsed = parse_request(wire)
    assert parsed is not None
    assert parsed[0].address.host == name.decode("ascii")


def test_request_with_unknown_command_replies_command_not_supported() -> None:
    wire = b"\x05\x09\x00\x01\x7f\x00\x00\x01\x00\x50"  # VER CMD(0x09) RSV ATYP addr port
    assert_rejects(parse_request, wire, Reply.COMMAND_NOT_SUPPORTED)
    assert_rejects(parse_request, wire[:2], Reply.COMMAND_NOT_SUPPORTED)  # as soon as seen
    assert_rejects(parse_request, b"\x05\x00", Reply.COMMAND_NOT_SUPPORTED)  # CMD 0


def test_request_with_unknown_address_type_replies_address_type_not_supported() -> None:
    wire = b"\x05\x01\x00\x02\x7f\x00\x00\x01\x00\x50"  # VER CMD RSV ATYP(0x02) ...
    assert_rejects(parse_request, wire, Reply.ADDRESS_TYPE_NOT_SUPPORTED)
    assert_rejects(parse_request, wire[:4], Reply.ADDRESS_TYPE_NOT_SUPPORTED)  # as soon as seen
    assert_rejects(parse_request, b"\x05\x01\x00\x00", Reply.ADDRESS_TYPE_NOT_SUPPORTED)


@pytest.mark.parametrize("version", [0x04, 0x00, 0x01])
def test_request_with_wrong_version_closes_without_reply(version: int) -> None:
    wire = bytes((version,)) + b"\x01\x00\x01\x7f\x00\x00\x01\x00\x50"  # VER(bad) CMD ...
    assert_rejects(parse_request, wire, None)
    assert_rejects(parse_request, wire[:1], None)


def test_request_with_empty_domain_replies_general_failure() -> None:
    wire = b"\x05\x01\x00\x03\x00\x00\x50"  # VER CMD RSV ATYP len(0) port
    assert_rejects(parse_request, wire, Reply.GENERAL_FAILURE)
    assert_rejects(parse_request, wire[:5], Reply.GENERAL_FAILURE)


@pytest.mark.parametrize(
    "name",
    [
        b"\xff\xfe.example",  # invalid UTF-8
        b"exa\x00mple.com",  # NUL
        b"example.com\x00",  # C-style terminator the RFC says is not there
        b"exa\nmple.com",  # control character (log injection)
        b"exa mple.com",  # space
        b"b\xc3\xbc cher.example",  # space in an IDNA name
        b"example..com",  # empty label
        b".",  # root only
        b".example.com",  # leading dot
        b"user@example.com",  # '@'
        b"example.com:80",  # port in the name
        b"example.com/path",  # '/'
        b"fe80::1%eth0",  # zone index
        b"[::1]",  # brackets
        "\u00e9\u0301" * 40,  # too long once converted
    ],
)
def test_request_with_bad_domain_bytes_replies_host_unreachable(name: bytes | str) -> None:
    raw = name.encode() if isinstance(name, str) else name
    raw = raw[:255]
    wire = b"\x05\x01\x00\x03" + bytes((len(raw),)) + raw + b"\x00\x50"
    err = assert_rejects(parse_request, wire, Reply.HOST_UNREACHABLE)
    assert "\n" not in err.message


def test_request_round_trip() -> None:
    for address in [
        Address(AddressType.IPV4, "192.0.2.1", 0),
        Address(AddressType.IPV6, "2001:db8::ff00:42:8329", 65535),
        Address(AddressType.DOMAINNAME, "example.org", 8443),
    ]:
        for command in Command:
            wire = encode_request(command, address)
            assert parse_request(wire) == (Request(command, address), len(wire))


def test_encode_request_bytes() -> None:
    address = Address(AddressType.DOMAINNAME, "example.com", 443)
    assert encode_request(Command.CONNECT, address) == (
        b"\x05\x01\x00\x03\x0bexample.com\x01\xbb"  # VER CMD RSV ATYP len name port
    )


# --- RFC 1928 §6: replies -----------------------------------------------------------------------


def test_encode_reply_without_address_is_ipv4_unspecified() -> None:
    assert encode_reply(Reply.SUCCEEDED) == (
        b"\x05\x00\x00\x01\x00\x00\x00\x00\x00\x00"  # VER REP RSV ATYP 0.0.0.0 port(0)
    )
    assert encode_reply(Reply.CONNECTION_REFUSED) == b"\x05\x05\x00\x01\x00\x00\x00\x00\x00\x00"


def test_encode_reply_with_ipv6_bound_address() -> None:
    bound = Address(AddressType.IPV6, "::1", 1080)
    assert encode_reply(Reply.SUCCEEDED, bound) == (
        b"\x05\x00\x00\x04" + b"\x00" * 15 + b"\x01" + b"\x04\x38"  # VER REP RSV ATYP ::1 1080
    )


def test_reply_parses_byte_by_byte() -> None:
    wire = b"\x05\x00\x00\x01\xc0\x00\x02\x01\x04\x38"  # VER REP RSV ATYP 192.0.2.1 port(1080)
    assert_parses(
        parse_reply, wire, (Reply.SUCCEEDED, Address(AddressType.IPV4, "192.0.2.1", 1080))
    )


def test_reply_with_unknown_code_is_a_plain_int() -> None:
    wire = b"\x05\x42\x00\x01\x00\x00\x00\x00\x00\x00"  # VER REP(0x42) RSV ATYP addr port
    parsed = parse_reply(wire)
    assert parsed == ((0x42, UNSPECIFIED_IPV4), len(wire))
    assert not isinstance(parsed[0][0], Reply)


def test_reply_with_wrong_version_or_address_type_closes_without_reply() -> None:
    assert_rejects(parse_reply, b"\x04\x5a\x00\x50\x00\x00\x00\x00", None)  # a SOCKS4 reply
    assert_rejects(parse_reply, b"\x05\x00\x00\x02", None)  # ATYP 0x02


def test_reply_round_trip() -> None:
    for reply in Reply:
        for bound in [
            UNSPECIFIED_IPV4,
            Address(AddressType.IPV4, "203.0.113.7", 65535),
            Address(AddressType.IPV6, "fe80::1", 1),
            Address(AddressType.DOMAINNAME, "proxy.example", 1080),
        ]:
            wire = encode_reply(reply, bound)
            assert parse_reply(wire) == ((reply, bound), len(wire))


# --- RFC 1928 §7: UDP datagrams -----------------------------------------------------------------


def test_udp_datagram_with_ipv4() -> None:
    wire = b"\x00\x00\x00\x01\x08\x08\x08\x08\x00\x35dns query"  # RSV FRAG ATYP addr port DATA
    assert parse_udp_datagram(wire) == UdpDatagram(
        0, Address(AddressType.IPV4, "8.8.8.8", 53), b"dns query"
    )


def test_udp_datagram_with_domain_and_empty_data() -> None:
    wire = b"\x00\x00\x00\x03\x0bexample.com\x00\x35"  # RSV FRAG ATYP len name port (no DATA)
    assert parse_udp_datagram(memoryview(wire)) == UdpDatagram(
        0, Address(AddressType.DOMAINNAME, "example.com", 53), b""
    )


def test_udp_datagram_keeps_frag_for_the_caller_to_drop() -> None:
    wire = b"\x00\x00\x01\x01\x01\x02\x03\x04\x00\x50data"  # RSV FRAG(1) ATYP addr port DATA
    assert parse_udp_datagram(bytearray(wire)).frag == 1


def test_udp_datagram_truncated_anywhere_is_an_error_without_reply() -> None:
    wire = b"\x00\x00\x00\x04" + b"\x00" * 15 + b"\x01" + b"\x00\x35"  # RSV FRAG ATYP ::1 port
    assert parse_udp_datagram(wire).address == Address(AddressType.IPV6, "::1", 53)
    for i in range(len(wire)):
        with pytest.raises(ProtocolError) as info:
            parse_udp_datagram(memoryview(wire)[:i])
        assert info.value.reply is None


@pytest.mark.parametrize(
    "wire",
    [
        b"\x00\x00\x00\x02\x01\x02\x03\x04\x00\x50",  # unknown ATYP
        b"\x00\x00\x00\x03\x00\x00\x50",  # empty domain
        b"\x00\x00\x00\x03\x03a b\x00\x50",  # bad domain
    ],
)
def test_udp_datagram_garbage_is_an_error_without_reply(wire: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_udp_datagram(wire)
    assert info.value.reply is None


def test_udp_datagram_round_trip() -> None:
    for address in [
        Address(AddressType.IPV4, "198.51.100.9", 0),
        Address(AddressType.IPV6, "2001:db8::1", 65535),
        Address(AddressType.DOMAINNAME, "xn--bcher-kva.example", 53),
    ]:
        for frag in (0, 1, 0x80, 0xFF):
            payload = bytes(range(256))
            wire = encode_udp_datagram(address, payload, frag)
            assert parse_udp_datagram(wire) == UdpDatagram(frag, address, payload)
    with pytest.raises(ValueError):
        encode_udp_datagram(UNSPECIFIED_IPV4, b"", frag=256)


# --- Address ------------------------------------------------------------------------------------


def test_encode_address_for_each_type() -> None:
    assert encode_address(Address(AddressType.IPV4, "1.2.3.4", 80)) == (
        b"\x01\x01\x02\x03\x04\x00\x50"  # ATYP addr port
    )
    assert encode_address(Address(AddressType.IPV6, "::1", 80)) == (
        b"\x04" + b"\x00" * 15 + b"\x01\x00\x50"  # ATYP addr port
    )
    assert encode_address(Address(AddressType.DOMAINNAME, "a.b", 65535)) == (
        b"\x03\x03a.b\xff\xff"  # ATYP len name port
    )


@pytest.mark.parametrize(
    "address",
    [
        Address(AddressType.IPV4, "::1", 80),
        Address(AddressType.IPV6, "1.2.3.4", 80),
        Address(AddressType.DOMAINNAME, "", 80),
        Address(AddressType.DOMAINNAME, "a" * 256, 80),
        Address(AddressType.DOMAINNAME, "bücher.example", 80),
    ],
)
def test_encode_address_rejects_hosts_that_do_not_fit(address: Address) -> None:
    with pytest.raises(ValueError):
        encode_address(address)


@pytest.mark.parametrize("port", [-1, 65536])
def test_address_rejects_port_out_of_range(port: int) -> None:
    with pytest.raises(ValueError):
        Address(AddressType.IPV4, "1.2.3.4", port)


@pytest.mark.parametrize(
    ("sockaddr", "expected"),
    [
        (("1.2.3.4", 80), Address(AddressType.IPV4, "1.2.3.4", 80)),
        (("::1", 80, 0, 0), Address(AddressType.IPV6, "::1", 80)),
        (("2001:0db8:0:0:0:0:0:0001", 443, 0, 0), Address(AddressType.IPV6, "2001:db8::1", 443)),
        (("::ffff:1.2.3.4", 8080, 0, 0), Address(AddressType.IPV4, "1.2.3.4", 8080)),
        (("::ffff:7f00:1", 0, 0, 0), Address(AddressType.IPV4, "127.0.0.1", 0)),
        (("fe80::1%eth0", 22, 0, 2), Address(AddressType.IPV6, "fe80::1", 22)),
    ],
)
def test_address_from_sockaddr(sockaddr: tuple[Any, ...], expected: Address) -> None:
    assert Address.from_sockaddr(sockaddr) == expected


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("10.1.2.3", Address(AddressType.IPV4, "10.1.2.3", 80)),
        ("2001:DB8:0::1", Address(AddressType.IPV6, "2001:db8::1", 80)),
        ("[::1]", Address(AddressType.IPV6, "::1", 80)),
        ("example.com", Address(AddressType.DOMAINNAME, "example.com", 80)),
        ("bücher.example", Address(AddressType.DOMAINNAME, "xn--bcher-kva.example", 80)),
    ],
)
def test_address_from_host(host: str, expected: Address) -> None:
    assert Address.from_host(host, 80) == expected


@pytest.mark.parametrize("host", ["", "exa mple.com", "a..b", "[example.com]", "\udcff.com"])
def test_address_from_host_rejects_bad_hosts(host: str) -> None:
    with pytest.raises(ValueError):
        Address.from_host(host, 80)


@pytest.mark.parametrize(
    ("address", "text"),
    [
        (Address(AddressType.IPV4, "1.2.3.4", 80), "1.2.3.4:80"),
        (Address(AddressType.IPV6, "::1", 80), "[::1]:80"),
        (Address(AddressType.DOMAINNAME, "example.com", 443), "example.com:443"),
        (UNSPECIFIED_IPV4, "0.0.0.0:0"),
    ],
)
def test_str_of_address(address: Address, text: str) -> None:
    assert str(address) == text


def test_records_are_frozen() -> None:
    address = Address(AddressType.IPV4, "1.2.3.4", 80)
    with pytest.raises(AttributeError):
        address.port = 81  # type: ignore[misc]


# --- property-style fuzz ------------------------------------------------------------------------

VALID_MESSAGES = [
    b"\x05\x02\x00\x02",
    b"\x01\x04user\x06secret",
    b"\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x50",
    b"\x05\x01\x00\x04" + b"\x00" * 15 + b"\x01\x01\xbb",
    b"\x05\x01\x00\x03\x0bexample.com\x01\xbb",
    b"\x05\x01\x00\x03\x0fb\xc3\xbccher.example\x00\x50",
    b"\x05\x00\x00\x01\x00\x00\x00\x00\x00\x00",
    b"\x00\x00\x00\x01\x08\x08\x08\x08\x00\x35data",
    b"\x00\x00\x00\x03\x0bexample.com\x00\x35data",
]

STREAM_PARSERS: list[Parser] = [parse_greeting, parse_username_password, parse_request, parse_reply]


def _fuzz_inputs(rng: random.Random, count: int) -> list[bytes]:
    inputs: list[bytes] = []
    for i in range(count):
        kind = i % 4
        if kind == 0:  # pure noise
            inputs.append(rng.randbytes(rng.randint(0, 300)))
        elif kind == 1:  # a valid message with a few bytes changed, inserted or cut
            data = bytearray(rng.choice(VALID_MESSAGES))
            for _ in range(rng.randint(1, 3)):
                pos = rng.randrange(len(data) + 1)
                op = rng.randrange(3)
                if op == 0 and pos < len(data):
                    data[pos] = rng.randrange(256)
                elif op == 1:
                    data.insert(pos, rng.randrange(256))
                else:
                    del data[pos:]
            inputs.append(bytes(data))
        elif kind == 2:  # a request/datagram header followed by random domain bytes
            name = bytes(rng.choice(b"ab.-_ \x00\xc3\xbc\xe2\x80\x8b\xff") for _ in range(16))
            name = name[: rng.randint(0, 16)] + rng.randbytes(rng.randint(0, 40))
            inputs.append(b"\x05\x01\x00\x03" + bytes((len(name),)) + name + b"\x00\x50")
        else:  # valid framing, random address bytes and ATYP
            atyp = rng.choice([1, 3, 4, rng.randrange(256)])
            inputs.append(
                bytes((5, rng.randrange(1, 4), 0, atyp)) + rng.randbytes(rng.randint(0, 300))
            )
    return inputs


def test_fuzz_parsers_raise_only_protocol_error() -> None:
    rng = random.Random(1928)
    for data in _fuzz_inputs(rng, 2000):
        for parse in STREAM_PARSERS:
            try:
                result = parse(data)
            except ProtocolError as err:
                assert err.reply is None or isinstance(err.reply, Reply)
                continue
            if result is not None:
                _message, consumed = result
                assert 0 < consumed <= len(data)
        try:
            parse_udp_datagram(data)
            parse_udp_datagram(b"\x00\x00\x00" + data[3:])
        except ProtocolError as err:
            assert err.reply is None


def test_fuzz_parsed_requests_re_encode_to_the_same_request() -> None:
    # Whatever the parser accepts, its normalised form encodes and parses back unchanged.
    rng = random.Random(1928)
    for data in _fuzz_inputs(rng, 2000):
        try:
            result = parse_request(data)
        except ProtocolError:
            continue
        if result is not None:
            request, _consumed = result
            wire = encode_request(request.command, request.address)
            assert parse_request(wire) == (request, len(wire))
