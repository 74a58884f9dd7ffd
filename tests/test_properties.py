"""Properties of the wire format (socks5d.socks.protocol), checked by hypothesis.

For every parser (greeting, username/password, request, reply, UDP datagram):

- arbitrary bytes, as bytes, bytearray or memoryview, give "need more" (None), a message
  with 0 < consumed <= len, or ProtocolError carrying a Reply or None; nothing else;
- encode then parse gives back what was encoded, consuming exactly the encoding;
- a valid message cut anywhere needs more data until its last byte, and bytes after it
  are left for the caller (a client may pipeline its next message);
- a whole handshake (greeting, login, request) split into chunks at arbitrary points and
  parsed as it arrives gives the same three messages.

Fast (a few seconds): example counts are bounded, there is no deadline (a loaded CI
machine must not fail a test for being slow) and no example database is written.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from socks5d.socks.protocol import (
    Address,
    AddressType,
    Command,
    Greeting,
    ProtocolError,
    Reply,
    Request,
    UdpDatagram,
    UsernamePassword,
    encode_greeting,
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

FAST = settings(max_examples=300, deadline=None, database=None)
MANY = settings(FAST, max_examples=1500)

STREAM_PARSERS: dict[str, Callable[[Any], Any]] = {
    "greeting": parse_greeting,
    "username/password": parse_username_password,
    "request": parse_request,
    "reply": parse_reply,
}

# ---- strategies ----

ports = st.integers(0, 0xFFFF)
ipv4 = st.builds(
    lambda ip, port: Address(AddressType.IPV4, str(ip), port), st.ip_addresses(v=4), ports
)
ipv6 = st.builds(
    lambda ip, port: Address(AddressType.IPV6, ip.compressed, port), st.ip_addresses(v=6), ports
)
# RFC 1035 §2.3.4: a name of labels of 1-63 characters, 253 in all (+ a root dot).
labels = st.from_regex(r"[A-Za-z0-9_-]{1,63}", fullmatch=True)
names = st.builds(
    lambda parts, root: ".".join(parts)[:253].rstrip(".") + root,
    st.lists(labels, min_size=1, max_size=8),
    st.sampled_from(["", "."]),
)
domains = st.builds(lambda name, port: Address(AddressType.DOMAINNAME, name, port), names, ports)
addresses = st.one_of(ipv4, ipv6, domains)

methods = st.lists(st.integers(0, 255), min_size=1, max_size=255)
credentials = st.binary(max_size=255)
commands = st.sampled_from(list(Command))
reply_codes = st.one_of(st.sampled_from(list(Reply)), st.integers(0, 255))

# Arbitrary bytes, and arbitrary bytes behind the first bytes of a plausible message, so
# the parsers are driven past their version checks as well.
prefixes = st.sampled_from(
    [
        b"",
        b"\x05",
        b"\x01",
        b"\x05\x01\x00",
        b"\x05\x01\x00\x01",
        b"\x05\x01\x00\x03",
        b"\x05\x01\x00\x04",
        b"\x00\x00\x00",
        b"\x00\x00\x00\x03",
    ]
)
# A request for a name of any characters, UTF-8 encoded (what curl sends for an IDN):
# the IDNA path of the name check.
unicode_names = st.builds(
    lambda text, port: b"\x05\x01\x00\x03" + bytes([len(text[:255])]) + text[:255] + port,
    st.text(min_size=1, max_size=100).map(lambda text: text.encode("utf-8", "surrogatepass")),
    st.binary(min_size=2, max_size=2),
)
raw = st.one_of(
    st.builds(lambda prefix, tail: prefix + tail, prefixes, st.binary(max_size=600)),
    unicode_names,
)
buffers = st.builds(
    lambda data, kind: kind(data), raw, st.sampled_from([bytes, bytearray, memoryview])
)


def parsed_or_protocol_error(parse: Callable[[Any], Any], buffer: Any) -> Any:
    """parse(buffer); a ProtocolError is returned instead of raised (any other exception
    propagates and fails the property)."""
    try:
        return parse(buffer)
    except ProtocolError as exc:
        assert exc.reply is None or isinstance(exc.reply, Reply)
        return exc


# ---- arbitrary bytes ----


@MANY
@given(buffers)
def test_stream_parsers_on_arbitrary_bytes_need_more_parse_or_raise_protocol_error(buffer):
    for name, parse in STREAM_PARSERS.items():
        result = parsed_or_protocol_error(parse, buffer)
        if result is None or isinstance(result, ProtocolError):
            continue
        _, consumed = result
        assert 0 < consumed <= len(buffer), name


@MANY
@given(buffers)
def test_udp_datagram_parser_on_arbitrary_bytes_parses_or_raises_protocol_error(buffer):
    result = parsed_or_protocol_error(parse_udp_datagram, buffer)
    if isinstance(result, UdpDatagram):  # DATA is what follows the header, untouched
        header = len(buffer) - len(result.data)
        assert header >= 8 and result.data == bytes(buffer[header:])


@FAST
@given(st.text(max_size=300), ports)
def test_address_from_any_host_text_is_an_address_or_a_value_error(host, port):
    try:
        address = Address.from_host(host, port)
    except ValueError:
        return
    assert address.type in AddressType and address.port == port


# ---- round trips, and every cut of a valid message ----


def assert_parses_whole_only(parse: Callable[[Any], Any], wire: bytes, expected: object) -> None:
    """Every strict prefix needs more data; the whole parses to `expected`, and so does
    the whole with bytes behind it, which are left unconsumed."""
    for cut in range(len(wire)):
        assert parse(wire[:cut]) is None, f"a {cut}-byte prefix of {wire!r} did not need more"
    assert parse(wire) == (expected, len(wire))
    assert parse(bytearray(wire + b"\x05\x01 pipelined")) == (expected, len(wire))


@FAST
@given(methods)
def test_greeting_round_trips_and_needs_every_byte(offered):
    assert_parses_whole_only(parse_greeting, encode_greeting(offered), Greeting(tuple(offered)))


@FAST
@given(credentials, credentials)
def test_username_password_round_trips_and_needs_every_byte(username, password):
    wire = encode_username_password(username, password)
    assert_parses_whole_only(parse_username_password, wire, UsernamePassword(username, password))


@FAST
@given(commands, addresses)
def test_request_round_trips_and_needs_every_byte(command, address):
    wire = encode_request(command, address)
    assert_parses_whole_only(parse_request, wire, Request(command, address))


@FAST
@given(reply_codes, addresses)
def test_reply_round_trips_and_needs_every_byte(code, address):
    wire = encode_reply(code, address)
    assert_parses_whole_only(parse_reply, wire, (code, address))


@FAST
@given(addresses, st.binary(max_size=2000), st.integers(0, 255))
def test_udp_datagram_round_trips_and_a_cut_header_is_a_protocol_error(address, data, frag):
    wire = encode_udp_datagram(address, data, frag)
    assert parse_udp_datagram(memoryview(wire)) == UdpDatagram(frag, address, data)
    header = len(wire) - len(data)
    for cut in range(header):  # RFC 1928 §7: a datagram is whole; a cut header is bad
        assert isinstance(parsed_or_protocol_error(parse_udp_datagram, wire[:cut]), ProtocolError)
    for cut in range(header, len(wire), max(1, len(data) // 8)):  # a shorter payload
        assert parse_udp_datagram(wire[:cut]) == UdpDatagram(frag, address, data[: cut - header])


# ---- a whole handshake, split anywhere ----


@FAST
@given(methods, credentials, credentials, commands, addresses, st.data())
def test_a_handshake_split_anywhere_parses_as_the_same_three_messages(
    offered, username, password, command, address, data
):
    messages = [
        (parse_greeting, encode_greeting(offered), Greeting(tuple(offered))),
        (
            parse_username_password,
            encode_username_password(username, password),
            UsernamePassword(username, password),
        ),
        (parse_request, encode_request(command, address), Request(command, address)),
    ]
    stream = b"".join(wire for _, wire, _ in messages)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=12).map(sorted))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    # A reader as the handler has: append what arrives, parse the next expected message
    # from the front of the buffer, keep the rest for the one after.
    buffer, got, pending = bytearray(), [], list(messages)
    for chunk in chunks:
        buffer += chunk
        while pending and (parsed := pending[0][0](buffer)) is not None:
            message, consumed = parsed
            got.append(message)
            del buffer[:consumed]
            pending.pop(0)
    assert got == [expected for _, _, expected in messages]
    assert buffer == b""
