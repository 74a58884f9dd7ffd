"""The PROXY protocol header a load balancer puts in front of a connection: pure parse
and encode.

HAProxy's PROXY protocol (doc/proxy-protocol.txt, versions 1 and 2) tells the server
behind a TCP balancer (HAProxy, nginx ``stream``, a cloud load balancer) who the real
client is: one header, sent once, before any byte of the proxied stream. Version 1 is a
line of text, version 2 a binary block; both name the source and destination address.

Like the other wire-format parsers here (in the manner of h11): bytes in, ``None`` for
"need more", a :class:`ProxyHeaderError` for bytes that cannot be a header, never a
socket or a clock. The header's size is bounded (107 bytes for v1, 16 + at most
:data:`MAX_V2_LENGTH` for v2), so whoever buffers for it holds a bounded amount.

Knows no SOCKS: imports the standard library only. Who may send a header at all (only
trusted balancers) is the caller's business; this module only reads it.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass

__all__ = [
    "MAX_V1_LENGTH",
    "MAX_V2_LENGTH",
    "MODES",
    "V2_SIGNATURE",
    "ProxyHeader",
    "ProxyHeaderError",
    "encode_v1",
    "encode_v2",
    "max_header_size",
    "parse_proxy_header",
]

#: proxy-protocol.txt §2.1: "a receiver can safely assume that it will never need to read
#: more than 107 bytes", CRLF included.
MAX_V1_LENGTH = 107
V1_PREFIX = b"PROXY "
#: §2.2: the 12-byte signature that starts a v2 header ("\r\n\r\n\0\r\nQUIT\n").
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V2_FIXED = 16  # signature, version/command, family/protocol, 2-byte length
#: The most address and TLV bytes accepted after the 16 fixed bytes. The format allows
#: 65535; the largest address block (AF_UNIX) is 216 bytes and HAProxy's TLVs (ALPN,
#: authority, unique id, SSL details) fit well within this. More is refused, so a
#: client cannot make us buffer 64 KiB by lying about the length.
MAX_V2_LENGTH = 1024

#: server.proxy_protocol values that expect a header: which versions each accepts.
MODES: dict[str, tuple[int, ...]] = {"v1": (1,), "v2": (2,), "any": (1, 2)}

# §2.2: the command (low nibble of byte 13), family and transport (byte 14).
_LOCAL, _PROXY = 0x0, 0x1
_UNSPEC, _INET, _INET6, _UNIX = 0x0, 0x1, 0x2, 0x3
_STREAM, _DGRAM = 0x1, 0x2
_FAMILY_NAMES = {_UNSPEC: "UNSPEC", _INET: "TCP4", _INET6: "TCP6", _UNIX: "UNIX"}
# §2.2: the address block of each family: two addresses and two ports.
_ADDRESS_LENGTHS = {_INET: 12, _INET6: 36, _UNIX: 216}

SockAddr = tuple[str, int]


class ProxyHeaderError(ValueError):
    """Bytes that are not a valid PROXY header (of an accepted version): the
    connection must be closed (proxy-protocol.txt §2: never served as if unproxied)."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """What a header said.

    ``source`` and ``destination`` are None when the header carries no usable address:
    a v2 LOCAL command (the balancer's own connection, a health check), or a family the
    spec says to take the connection's own addresses for (v1 UNKNOWN, v2 UNSPEC and
    UNIX, a transport other than STREAM). Then the connection's peer is the client.
    """

    version: int  # 1 or 2
    command: str  # "PROXY" or "LOCAL"
    family: str  # "TCP4", "TCP6", "UNKNOWN" (v1), "UNSPEC", "UNIX" (v2)
    source: SockAddr | None = None
    destination: SockAddr | None = None


def max_header_size(mode: str) -> int:
    """The most bytes a header of `mode` ("v1", "v2", "any") can take."""
    versions = MODES[mode]
    return max(MAX_V1_LENGTH if v == 1 else _V2_FIXED + MAX_V2_LENGTH for v in versions)


def parse_proxy_header(
    buffer: bytes | bytearray, mode: str = "any"
) -> tuple[ProxyHeader, int] | None:
    """The header at the start of `buffer` and its length, or None when `buffer` is a
    prefix of one (need more bytes). Raises ProxyHeaderError as soon as the bytes cannot
    become a header of a version `mode` accepts ("v1", "v2" or "any")."""
    versions = MODES[mode]
    if not buffer:
        return None
    first = buffer[0]
    if first == V1_PREFIX[0] and 1 in versions:
        return _parse_v1(buffer)
    if first == V2_SIGNATURE[0] and 2 in versions:
        return _parse_v2(buffer)
    wanted = " or ".join(f"v{v}" for v in versions)
    raise ProxyHeaderError(f"no PROXY protocol {wanted} header (first byte 0x{first:02x})")


# ---- version 1: text (§2.1) ----


def _parse_v1(buffer: bytes | bytearray) -> tuple[ProxyHeader, int] | None:
    head = bytes(buffer[: len(V1_PREFIX)])
    if not V1_PREFIX.startswith(head):
        raise ProxyHeaderError("not a PROXY v1 header")
    end = buffer.find(b"\n", 0, MAX_V1_LENGTH)
    if end < 0:
        if len(buffer) >= MAX_V1_LENGTH:
            raise ProxyHeaderError(f"v1 header longer than {MAX_V1_LENGTH} bytes")
        if b"\r" in buffer[:-1]:  # a CR not right before the line feed
            raise ProxyHeaderError("v1 header with a stray CR")
        return None
    if end < len(V1_PREFIX) or buffer[end - 1] != 0x0D:
        raise ProxyHeaderError("v1 header not ended by CRLF")
    line = bytes(buffer[len(V1_PREFIX) : end - 1])
    return _v1_fields(line), end + 1


def _v1_fields(line: bytes) -> ProxyHeader:
    if b"\r" in line:
        raise ProxyHeaderError("v1 header with a stray CR")
    protocol, _, rest = line.partition(b" ")
    if protocol == b"UNKNOWN":
        # §2.1: "the receiver must ignore anything presented before the CRLF" and use
        # the connection's own addresses.
        return ProxyHeader(1, "PROXY", "UNKNOWN")
    if protocol not in (b"TCP4", b"TCP6"):
        raise ProxyHeaderError(f"v1 header with unknown protocol {protocol[:8]!r}")
    fields = rest.split(b" ")
    if len(fields) != 4:
        raise ProxyHeaderError("v1 header needs source, destination and two ports")
    family = socket.AF_INET if protocol == b"TCP4" else socket.AF_INET6
    source = (_v1_address(fields[0], family), _v1_port(fields[2]))
    destination = (_v1_address(fields[1], family), _v1_port(fields[3]))
    return ProxyHeader(1, "PROXY", protocol.decode(), source, destination)


def _v1_address(text: bytes, family: socket.AddressFamily) -> str:
    try:
        decoded = text.decode("ascii")
        if family == socket.AF_INET:
            return str(ipaddress.IPv4Address(decoded))
        if "%" in decoded:  # a zone means nothing on the balancer's far side
            raise ValueError(decoded)
        return str(ipaddress.IPv6Address(decoded))
    except (UnicodeDecodeError, ValueError):
        kind = "IPv4" if family == socket.AF_INET else "IPv6"
        raise ProxyHeaderError(f"v1 header with a bad {kind} address {text[:46]!r}") from None


def _v1_port(text: bytes) -> int:
    # §2.1: decimal, 0-65535; no sign, no spaces, no leading zero.
    if not (text.isdigit() and text.isascii() and 0 < len(text) <= 5):
        raise ProxyHeaderError(f"v1 header with a bad port {text[:8]!r}")
    if len(text) > 1 and text.startswith(b"0"):
        raise ProxyHeaderError(f"v1 header with a bad port {text[:8]!r}")
    port = int(text)
    if port > 65535:
        raise ProxyHeaderError(f"v1 header with a bad port {text[:8]!r}")
    return port


# ---- version 2: binary (§2.2) ----


def _parse_v2(buffer: bytes | bytearray) -> tuple[ProxyHeader, int] | None:
    signature = bytes(buffer[: len(V2_SIGNATURE)])
    if not V2_SIGNATURE.startswith(signature):
        raise ProxyHeaderError("not a PROXY v2 header (bad signature)")
    if len(buffer) < _V2_FIXED:
        return None
    version_command, family_protocol, length = struct.unpack_from("!BBH", buffer, 12)
    if version_command >> 4 != 2:
        raise ProxyHeaderError(f"v2 header with version {version_command >> 4}")
    command = version_command & 0x0F
    if command not in (_LOCAL, _PROXY):
        raise ProxyHeaderError(f"v2 header with unknown command 0x{command:x}")
    family, transport = family_protocol >> 4, family_protocol & 0x0F
    if family not in _FAMILY_NAMES or transport > _DGRAM:
        raise ProxyHeaderError(f"v2 header with unknown family/protocol 0x{family_protocol:02x}")
    if length > MAX_V2_LENGTH:
        raise ProxyHeaderError(f"v2 header length {length} over {MAX_V2_LENGTH}")
    total = _V2_FIXED + length
    if len(buffer) < total:
        return None
    name = _FAMILY_NAMES[family]
    if command == _LOCAL:
        # §2.2: LOCAL is the balancer's own connection (a health check): the receiver
        # must use the real connection endpoints and skip the address block.
        return ProxyHeader(2, "LOCAL", name), total
    needed = _ADDRESS_LENGTHS.get(family, 0)
    if length < needed:
        raise ProxyHeaderError(f"v2 {name} header with {length} address bytes, {needed} needed")
    if family not in (_INET, _INET6) or transport != _STREAM:
        # §2.2: UNSPEC (and families or transports we do not serve, such as UNIX):
        # accept with the connection's own addresses. What follows the addresses (TLVs)
        # is skipped in every case.
        return ProxyHeader(2, "PROXY", name), total
    block = bytes(buffer[_V2_FIXED : _V2_FIXED + needed])
    size = 4 if family == _INET else 16
    kind = ipaddress.IPv4Address if family == _INET else ipaddress.IPv6Address
    source_port, destination_port = struct.unpack_from("!HH", block, 2 * size)
    # ipaddress, not inet_ntop: one (RFC 5952) spelling, as v1's and the log's.
    source = (str(kind(block[:size])), source_port)
    destination = (str(kind(block[size : 2 * size])), destination_port)
    return ProxyHeader(2, "PROXY", name, source, destination), total


# ---- encoding (tests, and whoever sends a header) ----


def encode_v1(source: SockAddr | None, destination: SockAddr | None = None) -> bytes:
    """A v1 line; None addresses give "PROXY UNKNOWN"."""
    if source is None or destination is None:
        return b"PROXY UNKNOWN\r\n"
    protocol = "TCP6" if ":" in source[0] else "TCP4"
    return (
        f"PROXY {protocol} {source[0]} {destination[0]} {source[1]} {destination[1]}\r\n"
    ).encode("ascii")


def encode_v2(
    source: SockAddr | None,
    destination: SockAddr | None = None,
    *,
    local: bool = False,
    tlvs: bytes = b"",
) -> bytes:
    """A v2 block: PROXY with INET/INET6 STREAM addresses, or UNSPEC when `source` is
    None; LOCAL when `local`. `tlvs` are appended after the addresses, as given."""
    command = _LOCAL if local else _PROXY
    if source is None or destination is None:
        block, family, transport = b"", _UNSPEC, 0
    else:
        af = socket.AF_INET6 if ":" in source[0] else socket.AF_INET
        family = _INET6 if af == socket.AF_INET6 else _INET
        transport = _STREAM
        block = (
            socket.inet_pton(af, source[0])
            + socket.inet_pton(af, destination[0])
            + struct.pack("!HH", source[1], destination[1])
        )
    payload = block + tlvs
    return (
        V2_SIGNATURE
        + struct.pack("!BBH", 0x20 | command, family << 4 | transport, len(payload))
        + payload
    )
