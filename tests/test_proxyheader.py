"""The PROXY protocol header parser (socks5d.core.proxyheader) and the handshake state
that uses it (ServerHandshake's PROXY_HEADER), as literal bytes.

Layouts from haproxy's doc/proxy-protocol.txt: v1 (§2.1) is one text line of at most
107 bytes, "PROXY TCP4|TCP6|UNKNOWN src dst sport dport\\r\\n"; v2 (§2.2) is the 12-byte
signature, a version/command byte (0x20 LOCAL, 0x21 PROXY), a family/protocol byte
(0x11 TCP over IPv4, 0x21 over IPv6, 0x31 UNIX stream, 0x00 UNSPEC), a 2-byte length and
that many bytes of addresses and TLVs.
"""

from __future__ import annotations

import ipaddress
import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from socks5d.core.proxyheader import (
    MAX_V1_LENGTH,
    MAX_V2_LENGTH,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyHeaderError,
    encode_v1,
    encode_v2,
    max_header_size,
    parse_proxy_header,
)
from socks5d.policy.auth import Authenticator
from socks5d.socks.handshake import Close, Proxied, Send, ServerHandshake, State
from socks5d.socks.session import Session

NO_AUTH = b"\x05\x01\x00"  # VER NMETHODS METHODS=00

# ---- v1 (text) ----


def test_v1_tcp4_names_source_and_destination():
    header = b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 1080\r\n"
    assert parse_proxy_header(header + NO_AUTH) == (
        ProxyHeader(1, "PROXY", "TCP4", ("192.0.2.7", 56324), ("198.51.100.1", 1080)),
        len(header),
    )


def test_v1_tcp6_names_source_and_destination():
    header = b"PROXY TCP6 2001:db8::7 2001:db8::1 56324 1080\r\n"
    parsed = parse_proxy_header(header)
    assert parsed is not None
    assert parsed[0].source == ("2001:db8::7", 56324)
    assert parsed[0].destination == ("2001:db8::1", 1080)


def test_v1_unknown_keeps_the_connection_addresses_and_ignores_the_rest_of_the_line():
    # §2.1: with UNKNOWN "the receiver must ignore anything presented before the CRLF".
    for header in (b"PROXY UNKNOWN\r\n", b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n"):
        assert parse_proxy_header(header) == (ProxyHeader(1, "PROXY", "UNKNOWN"), len(header))


def test_the_longest_v1_line_is_107_bytes_and_accepted():
    # §2.1's worst case: UNKNOWN followed by two full IPv6 addresses and ports.
    full = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    longest = f"PROXY UNKNOWN {full} {full} 65535 65535\r\n".encode()
    assert len(longest) == MAX_V1_LENGTH == 107
    assert parse_proxy_header(longest) == (ProxyHeader(1, "PROXY", "UNKNOWN"), 107)
    tcp6 = encode_v1((full, 65535), (full, 65535))
    assert parse_proxy_header(tcp6) is not None


@pytest.mark.parametrize(
    "line",
    [
        b"PROXY TCP4 192.0.2.7 198.51.100.1 56324\r\n",  # a port missing
        b"PROXY TCP4 192.0.2.7  198.51.100.1 1 2\r\n",  # two spaces
        b"PROXY TCP4 192.0.2.7 198.51.100.1 1 2 3\r\n",  # a field too many
        b"PROXY TCP4 2001:db8::7 2001:db8::1 1 2\r\n",  # IPv6 under TCP4
        b"PROXY TCP6 192.0.2.7 198.51.100.1 1 2\r\n",  # IPv4 under TCP6
        b"PROXY TCP4 192.0.2.256 198.51.100.1 1 2\r\n",  # not an address
        b"PROXY TCP4 192.0.2.07 198.51.100.1 1 2\r\n",  # a leading zero (octal?)
        b"PROXY TCP6 fe80::1%eth0 fe80::2 1 2\r\n",  # a zone
        b"PROXY TCP4 192.0.2.7 198.51.100.1 65536 2\r\n",  # port out of range
        b"PROXY TCP4 192.0.2.7 198.51.100.1 -1 2\r\n",  # a sign
        b"PROXY TCP4 192.0.2.7 198.51.100.1 01 2\r\n",  # a leading zero
        b"PROXY TCP4 192.0.2.7 198.51.100.1 1 2\n",  # LF without CR
        b"PROXY TCP4 192.0.2.7 198.51.100.1 1\r 2\r\n",  # a stray CR
        b"PROXY UDP4 192.0.2.7 198.51.100.1 1 2\r\n",  # not a protocol of v1
        b"PROXY tcp4 192.0.2.7 198.51.100.1 1 2\r\n",  # case matters
        b"PROXY \r\n",
        b"PROXY\r\n",
        b"proxy TCP4 192.0.2.7 198.51.100.1 1 2\r\n",
    ],
)
def test_a_malformed_v1_line_is_refused(line):
    with pytest.raises(ProxyHeaderError):
        parse_proxy_header(line)


def test_a_v1_line_without_crlf_in_107_bytes_is_refused_not_awaited():
    assert parse_proxy_header(b"PROXY UNKNOWN " + b"x" * 92) is None  # 106 bytes: maybe
    with pytest.raises(ProxyHeaderError, match="longer than 107"):
        parse_proxy_header(b"PROXY UNKNOWN " + b"x" * 93)  # 107 bytes, no line end
    with pytest.raises(ProxyHeaderError, match="longer than 107"):
        parse_proxy_header(b"PROXY UNKNOWN " + b"x" * 200 + b"\r\n")


# ---- v2 (binary) ----


def v2(command: int, family: int, block: bytes) -> bytes:
    """signature, VER|CMD, FAM|PROTO, LEN, the block"""
    return V2_SIGNATURE + bytes([command, family]) + struct.pack("!H", len(block)) + block


IPV4_BLOCK = (
    socket.inet_aton("192.0.2.7") + socket.inet_aton("198.51.100.1") + struct.pack("!HH", 5, 1080)
)
IPV6_BLOCK = (
    socket.inet_pton(socket.AF_INET6, "2001:db8::7")
    + socket.inet_pton(socket.AF_INET6, "2001:db8::1")
    + struct.pack("!HH", 5, 1080)
)


def test_v2_proxy_tcp_over_ipv4():
    header = v2(0x21, 0x11, IPV4_BLOCK)
    assert len(header) == 16 + 12
    assert parse_proxy_header(header + NO_AUTH) == (
        ProxyHeader(2, "PROXY", "TCP4", ("192.0.2.7", 5), ("198.51.100.1", 1080)),
        28,
    )


def test_v2_proxy_tcp_over_ipv6():
    header = v2(0x21, 0x21, IPV6_BLOCK)
    assert len(header) == 16 + 36
    parsed = parse_proxy_header(header)
    assert parsed is not None
    assert parsed[0].source == ("2001:db8::7", 5) and parsed[1] == 52


def test_v2_tlvs_after_the_addresses_are_skipped():
    # PP2_TYPE_ALPN (0x01) "h2", PP2_TYPE_AUTHORITY (0x02) "example.com"
    tlvs = b"\x01\x00\x02h2" + b"\x02\x00\x0bexample.com"
    header = v2(0x21, 0x11, IPV4_BLOCK + tlvs)
    parsed = parse_proxy_header(header + NO_AUTH)
    assert parsed is not None
    assert parsed[0].source == ("192.0.2.7", 5) and parsed[1] == len(header)


def test_v2_local_is_the_balancer_itself_whatever_the_block_says():
    # §2.2: LOCAL (health checks): use the real connection endpoints, skip the block.
    for family, block in ((0x00, b""), (0x11, IPV4_BLOCK), (0x21, IPV6_BLOCK)):
        header = v2(0x20, family, block)
        parsed = parse_proxy_header(header)
        assert parsed is not None
        assert parsed[0].command == "LOCAL" and parsed[0].source is None
        assert parsed[1] == len(header)


@pytest.mark.parametrize(
    ("family", "block", "name"),
    [
        (0x00, b"", "UNSPEC"),  # UNSPEC: unknown protocol, no address
        (0x31, b"/tmp/a".ljust(108, b"\0") + b"/tmp/b".ljust(108, b"\0"), "UNIX"),
        (0x12, IPV4_BLOCK, "TCP4"),  # INET over DGRAM: not a stream we serve
        (0x10, IPV4_BLOCK, "TCP4"),  # INET, UNSPEC transport
    ],
)
def test_v2_families_without_a_usable_address_keep_the_connections_own(family, block, name):
    header = v2(0x21, family, block)
    parsed = parse_proxy_header(header)
    assert parsed is not None
    assert parsed[0] == ProxyHeader(2, "PROXY", name) and parsed[1] == len(header)


@pytest.mark.parametrize(
    ("header", "problem"),
    [
        (v2(0x11, 0x11, IPV4_BLOCK), "version 1"),  # version nibble 1
        (v2(0x31, 0x11, IPV4_BLOCK), "version 3"),
        (v2(0x22, 0x11, IPV4_BLOCK), "command 0x2"),
        (v2(0x2F, 0x11, IPV4_BLOCK), "command 0xf"),
        (v2(0x21, 0x41, IPV4_BLOCK), "family/protocol 0x41"),
        (v2(0x21, 0x13, IPV4_BLOCK), "family/protocol 0x13"),
        (v2(0x21, 0x11, IPV4_BLOCK[:11]), "11 address bytes, 12 needed"),  # the length lies
        (v2(0x21, 0x21, IPV4_BLOCK), "12 address bytes, 36 needed"),
        (v2(0x21, 0x31, b"\0" * 215), "215 address bytes, 216 needed"),
        (b"\r\n\r\n\x00\r\nQUIX\n" + bytes(4), "signature"),
    ],
)
def test_a_malformed_v2_header_is_refused(header, problem):
    with pytest.raises(ProxyHeaderError, match=problem):
        parse_proxy_header(header)


def test_a_v2_length_past_the_cap_is_refused_from_the_fixed_part_alone():
    # A client that says 65535 must not make us buffer 64 KiB: refused at byte 16.
    lying = V2_SIGNATURE + b"\x21\x11\xff\xff"
    with pytest.raises(ProxyHeaderError, match="length 65535"):
        parse_proxy_header(lying)
    at_cap = V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", MAX_V2_LENGTH)
    assert parse_proxy_header(at_cap) is None  # allowed: waits for its bytes
    assert max_header_size("v2") == 16 + MAX_V2_LENGTH
    assert max_header_size("v1") == MAX_V1_LENGTH


# ---- which version a mode accepts, and what is no header at all ----


def test_each_mode_accepts_its_versions_only():
    one, two = encode_v1(("192.0.2.7", 5), ("198.51.100.1", 1080)), v2(0x21, 0x11, IPV4_BLOCK)
    assert parse_proxy_header(one, "v1") is not None
    assert parse_proxy_header(two, "v2") is not None
    assert parse_proxy_header(one, "any") is not None and parse_proxy_header(two, "any")
    with pytest.raises(ProxyHeaderError, match="v2 header"):
        parse_proxy_header(one, "v2")
    with pytest.raises(ProxyHeaderError, match="v1 header"):
        parse_proxy_header(two, "v1")


@pytest.mark.parametrize(
    "data",
    [
        NO_AUTH,  # a SOCKS5 client that did not come through the balancer
        b"\x04\x01\x00\x50\x7f\x00\x00\x01\x00",  # SOCKS4
        b"GET / HTTP/1.1\r\n",
        b"\x00",
        b"\r\n\r\n\r\n",  # starts like the v2 signature, then is not
        b"PROXZ",
    ],
)
def test_bytes_that_are_no_header_are_refused_at_once(data):
    with pytest.raises(ProxyHeaderError):
        parse_proxy_header(data)


# ---- properties ----

ipv4 = st.integers(0, 2**32 - 1).map(lambda n: str(ipaddress.IPv4Address(n)))
ipv6 = st.integers(0, 2**128 - 1).map(lambda n: str(ipaddress.IPv6Address(n)))
ports = st.integers(0, 65535)
address_pairs = st.one_of(
    st.tuples(st.tuples(ipv4, ports), st.tuples(ipv4, ports)),
    st.tuples(st.tuples(ipv6, ports), st.tuples(ipv6, ports)),
)
tlv_bytes = st.binary(max_size=64)


@settings(max_examples=200)
@given(pair=address_pairs, trailing=st.binary(max_size=32))
def test_v1_round_trips_and_leaves_what_follows(pair, trailing):
    source, destination = pair
    header = encode_v1(source, destination)
    assert len(header) <= MAX_V1_LENGTH
    parsed = parse_proxy_header(header + trailing, "v1")
    assert parsed is not None
    assert (parsed[0].source, parsed[0].destination, parsed[1]) == (
        source,
        destination,
        len(header),
    )


@settings(max_examples=200)
@given(pair=address_pairs, tlvs=tlv_bytes, trailing=st.binary(max_size=32))
def test_v2_round_trips_with_any_tlvs_and_leaves_what_follows(pair, tlvs, trailing):
    source, destination = pair
    header = encode_v2(source, destination, tlvs=tlvs)
    parsed = parse_proxy_header(header + trailing, "v2")
    assert parsed is not None
    assert (parsed[0].source, parsed[0].destination, parsed[1]) == (
        source,
        destination,
        len(header),
    )


@st.composite
def headers(draw: st.DrawFn) -> bytes:
    """Any valid header: v1 of each protocol, v2 of each command and family."""
    source, destination = draw(address_pairs)
    kind = draw(st.sampled_from(["v1", "v1-unknown", "v2", "v2-local", "v2-unspec", "v2-unix"]))
    tlvs = draw(tlv_bytes)
    if kind == "v1":
        return encode_v1(source, destination)
    if kind == "v1-unknown":
        return encode_v1(None)
    if kind == "v2":
        return encode_v2(source, destination, tlvs=tlvs)
    if kind == "v2-local":
        return encode_v2(None, local=True, tlvs=tlvs)
    if kind == "v2-unspec":
        return encode_v2(None, tlvs=tlvs)
    return v2(0x21, 0x31, bytes(216) + tlvs)


@settings(max_examples=300)
@given(header=headers())
def test_every_truncation_of_a_header_is_need_more(header):
    for end in range(len(header)):
        assert parse_proxy_header(header[:end]) is None, end
    assert parse_proxy_header(header) is not None


@settings(max_examples=500)
@given(data=st.binary(max_size=300))
def test_garbage_is_refused_awaited_or_parsed_never_anything_else(data):
    """Whatever the bytes: a header that leaves a valid rest, None while they may still
    become one (never past a header's bound), or ProxyHeaderError."""
    try:
        parsed = parse_proxy_header(data)
    except ProxyHeaderError:
        return
    if parsed is None:
        assert len(data) < max_header_size("any")
        return
    header, used = parsed
    assert 0 < used <= len(data) and header.version in (1, 2)


@settings(max_examples=300)
@given(header=headers(), cut=st.data())
def test_a_header_damaged_in_its_fixed_part_is_refused(header, cut):
    """Flip one byte of the v1 prefix or the v2 signature: refused as soon as it is
    seen, never awaited."""
    fixed = 6 if header.startswith(b"PROXY ") else 12
    index = cut.draw(st.integers(0, fixed - 1))
    damaged = bytearray(header)
    damaged[index] ^= cut.draw(st.integers(1, 255))
    with pytest.raises(ProxyHeaderError):
        parse_proxy_header(bytes(damaged[: index + 1]))


# ---- the handshake's PROXY_HEADER state ----


def handshake(mode: str = "any") -> ServerHandshake:
    return ServerHandshake(Authenticator(), Session(client="127.0.0.1:40000"), mode)


def test_the_header_names_the_client_then_the_greeting_is_answered():
    shake = handshake()
    header = encode_v2(("192.0.2.7", 5555), ("198.51.100.1", 1080))
    assert shake.receive(header + NO_AUTH) == [Proxied(("192.0.2.7", 5555), "127.0.0.1:40000")]
    assert shake.state is State.READDRESSING
    assert shake.session.client == "192.0.2.7:5555"
    assert shake.session.balancer == "127.0.0.1:40000"
    # The pipelined greeting waited for the driver's answer.
    assert shake.client_readdressed(True) == [Send(b"\x05\x00")]
    assert shake.state is State.REQUEST


def test_a_header_fed_byte_by_byte_is_the_same_header():
    shake = handshake("v1")
    data = encode_v1(("2001:db8::7", 5555), ("2001:db8::1", 1080)) + NO_AUTH
    actions = []
    for byte in data:
        actions += shake.receive(bytes([byte]))
    assert actions == [Proxied(("2001:db8::7", 5555), "127.0.0.1:40000")]
    assert shake.session.client == "[2001:db8::7]:5555"
    assert shake.client_readdressed(True) == [Send(b"\x05\x00")]


def test_a_local_header_serves_the_balancer_itself():
    shake = handshake("v2")
    assert shake.receive(encode_v2(None, local=True) + NO_AUTH) == [Send(b"\x05\x00")]
    assert shake.session.client == "127.0.0.1:40000"
    assert shake.session.balancer == "127.0.0.1:40000"


def test_a_client_refused_at_its_cap_is_closed_with_the_reason():
    shake = handshake()
    shake.receive(encode_v1(("192.0.2.7", 5555), ("198.51.100.1", 1080)) + NO_AUTH)
    assert shake.client_readdressed(False, "max_connections_per_ip") == [
        Close("max_connections_per_ip")
    ]
    assert shake.session.end == "max_connections_per_ip"
    assert shake.session.client == "192.0.2.7:5555"  # logged as the client it is


def test_a_socks_greeting_where_the_header_belongs_is_closed_without_an_answer():
    shake = handshake()
    (close,) = shake.receive(NO_AUTH)
    assert isinstance(close, Close) and close.reason.startswith("bad PROXY header")
    assert shake.state is State.CLOSED and shake.session.balancer == "-"


def test_an_untrusted_source_is_closed_before_any_byte():
    shake = handshake()
    (close,) = shake.untrusted_source()
    assert isinstance(close, Close) and "untrusted" in close.reason
    assert shake.receive(encode_v1(("192.0.2.7", 1), ("192.0.2.8", 2))) == []


def test_without_proxy_protocol_a_header_is_no_socks_greeting():
    shake = ServerHandshake(Authenticator(), Session(client="127.0.0.1:40000"))
    assert shake.state is State.GREETING
    (close,) = shake.receive(encode_v1(("192.0.2.7", 1), ("192.0.2.8", 2)))
    assert isinstance(close, Close) and "version" in close.reason
    assert shake.session.client == "127.0.0.1:40000"


def test_session_logs_the_balancer_only_when_there_is_one():
    session = Session(client="192.0.2.7:5555")
    assert "balancer=" not in session.log_line() and session.as_dict()["balancer"] is None
    session.balancer = "127.0.0.1:40000"
    assert session.log_line().endswith(" balancer=127.0.0.1:40000")
    assert session.as_dict()["balancer"] == "127.0.0.1:40000"
