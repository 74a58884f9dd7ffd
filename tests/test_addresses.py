"""socks5d.core.addresses: one parser, one unmapping rule, one host:port format for every layer."""

import ipaddress
import re
from pathlib import Path

import pytest

from socks5d.core.addresses import (
    canonical_ip,
    client_ip,
    client_key,
    format_address,
    format_host_port,
    parse_ip,
    strip_brackets,
    unmapped,
    unmapped_host,
)
from socks5d.socks.protocol import Address, AddressType

PACKAGE = Path(__file__).resolve().parent.parent / "socks5d"

# (spelling, canonical): every way an address reaches us, from sockets, the wire or config.
SPELLINGS = [
    ("192.0.2.7", "192.0.2.7"),  # IPv4
    ("[192.0.2.7]", "192.0.2.7"),  # bracketed IPv4: tolerated like IPv6
    ("::ffff:192.0.2.7", "192.0.2.7"),  # IPv4-mapped, as a dual-stack socket reports it
    ("::FFFF:c000:207", "192.0.2.7"),  # the same, hex and upper case
    ("[::ffff:192.0.2.7]", "192.0.2.7"),  # mapped and bracketed
    ("2001:db8::1", "2001:db8::1"),  # IPv6
    ("2001:DB8:0:0:0:0:0:1", "2001:db8::1"),  # uncompressed, upper case: RFC 5952 form
    ("[2001:db8::1]", "2001:db8::1"),  # bracketed (URL, config)
    ("fe80::1%eth0", "fe80::1"),  # zone id (RFC 4007 §11): not part of the address
    ("[fe80::1%2]", "fe80::1"),  # numeric zone, bracketed
    ("::1", "::1"),
    ("::", "::"),
    ("::ffff:0.0.0.0", "0.0.0.0"),
]


@pytest.mark.parametrize(("spelling", "canonical"), SPELLINGS)
def test_canonical_ip_gives_one_spelling_per_address(spelling: str, canonical: str) -> None:
    assert canonical_ip(spelling) == canonical
    assert str(unmapped(parse_ip(spelling))) == canonical


@pytest.mark.parametrize("text", ["example.com", "", "/run/socks5d.sock", "1.2.3", "[::1"])
def test_canonical_ip_leaves_what_is_not_an_address_alone(text: str) -> None:
    assert canonical_ip(text) == text
    with pytest.raises(ValueError):
        parse_ip(text)


@pytest.mark.parametrize(("spelling", "canonical"), SPELLINGS)
def test_the_wire_format_agrees_with_canonical_ip(spelling: str, canonical: str) -> None:
    # Address.from_sockaddr (BND.ADDR, logs) and the comparisons in bind/udp/rules used to
    # unmap with copies of their own; now they cannot disagree.
    address = Address.from_sockaddr((spelling, 1080))
    assert address.host == canonical
    assert address.type is (AddressType.IPV6 if ":" in canonical else AddressType.IPV4)


def test_from_host_keeps_a_mapped_address_as_ipv6() -> None:
    # A client that names ::ffff:a.b.c.d (ATYP 04) asked for IPv6: only sockets are unmapped.
    assert Address.from_host("[::ffff:192.0.2.7]", 1) == Address(
        AddressType.IPV6, "::ffff:c000:207", 1
    )
    assert Address.from_host("fe80::1%eth0", 1) == Address(AddressType.IPV6, "fe80::1", 1)


def test_unmapped_keeps_other_addresses() -> None:
    for text in ("192.0.2.7", "2001:db8::1", "::1", "64:ff9b::c000:207"):
        assert unmapped(ipaddress.ip_address(text)) == ipaddress.ip_address(text)


@pytest.mark.parametrize(
    ("host", "result"),
    [
        ("::ffff:192.0.2.7", "192.0.2.7"),
        ("192.0.2.7", "192.0.2.7"),
        ("fe80::1%eth0", "fe80::1%eth0"),  # the zone stays: the result is bound to
        ("2001:db8::1", "2001:db8::1"),
        ("example.com", "example.com"),
    ],
)
def test_unmapped_host_unmaps_and_keeps_the_zone(host: str, result: str) -> None:
    assert unmapped_host(host) == result


def test_client_ip_takes_a_socket_address_or_a_host() -> None:
    assert client_ip(("::ffff:192.0.2.1", 5, 0, 0)) == "192.0.2.1"
    assert client_ip(("2001:db8::1", 5, 0, 0)) == "2001:db8::1"
    assert client_ip(("192.0.2.1", 5)) == "192.0.2.1"
    assert client_ip("::ffff:192.0.2.1") == "192.0.2.1"
    assert client_ip("") == ""  # a Unix socket peer has no address


def test_strip_brackets() -> None:
    assert strip_brackets("[::1]") == "::1"
    assert strip_brackets("::1") == "::1"
    assert strip_brackets("[::1") == "[::1"
    assert strip_brackets("localhost") == "localhost"


@pytest.mark.parametrize(
    ("host", "port", "text"),
    [
        ("192.0.2.7", 1080, "192.0.2.7:1080"),
        ("2001:db8::1", 1080, "[2001:db8::1]:1080"),
        ("fe80::1%eth0", 80, "[fe80::1%eth0]:80"),
        ("example.com", 443, "example.com:443"),
    ],
)
def test_format_host_port(host: str, port: int, text: str) -> None:
    assert format_host_port(host, port) == text
    assert format_address((host, port, 0, 0)) == text
    assert str(Address.from_host(host, port)) == text.replace("%eth0", "")


def test_format_address_unmaps_like_the_access_log() -> None:
    assert format_address(("::ffff:192.0.2.7", 5, 0, 0)) == "192.0.2.7:5"


def test_format_address_of_something_else_is_its_text() -> None:
    assert format_address("/run/socks5d.sock") == "/run/socks5d.sock"
    assert format_address(("192.0.2.7",)) == "('192.0.2.7',)"


@pytest.mark.parametrize(
    ("ip", "prefix", "key"),
    [
        ("192.0.2.7", 64, "192.0.2.7"),
        ("::ffff:192.0.2.7", 64, "192.0.2.7"),  # dual-stack listener: the IPv4 client
        ("2001:db8:1:2:aaaa::1", 64, "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff:ffff:ffff:ffff", 64, "2001:db8:1:2::/64"),  # same /64
        ("2001:db8:1:3::1", 64, "2001:db8:1:3::/64"),  # next /64: another client
        ("2001:db8:1:2:aaaa::1", 48, "2001:db8:1::/48"),
        ("2001:db8:1:2:aaaa::1", 128, "2001:db8:1:2:aaaa::1"),
        ("[::1]", 64, "::/64"),
        ("fe80::1%eth0", 64, "fe80::/64"),
        ("not-an-address", 64, "not-an-address"),
    ],
)
def test_client_key(ip: str, prefix: int, key: str) -> None:
    assert client_key(ip, prefix) == key


def test_no_module_keeps_its_own_copy_of_these_helpers() -> None:
    # Five copies of the unmapping and four of the host:port format had drifted apart
    # (one kept the zone, one parsed by string prefix): each lives here only.
    copies = {
        "ipv4_mapped": re.compile(r"\.ipv4_mapped\b"),
        "host:port": re.compile(r"""f["']\[\{"""),
    }
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "addresses.py":
            continue
        text = path.read_text()
        for what, pattern in copies.items():
            for match in pattern.finditer(text):
                line = text[: match.start()].count("\n") + 1
                found.append(f"{path.name}:{line}: {what}")
    # config.unmapped_network maps whole networks (a rule's ::ffff:10.0.0.0/104), not one
    # address: the one place left that reads ipv4_mapped.
    assert found == [f"config.py:{_line_of('config.py', '.ipv4_mapped')}: ipv4_mapped"]


def _line_of(name: str, needle: str) -> int:
    (path,) = PACKAGE.rglob(name)
    text = path.read_text()
    return text[: text.index(needle)].count("\n") + 1
