"""The SOCKS wire format: RFC 1928 (SOCKS5), RFC 1929 (username/password auth), and the
SOCKS4 and SOCKS4A documents (Ying-Da Lee, "SOCKS: A protocol for TCP proxy across
firewalls" and "SOCKS 4A: A Simple Extension to SOCKS 4 Protocol").

This module owns the bytes and nothing else: the RFC-named enums, small frozen records for each
message, ``parse_*`` functions and ``encode_*`` functions. It does no I/O, in the style of h11
and socksio: a parser is given a buffer prefix (``bytes``, ``bytearray`` or ``memoryview``) and
returns ``None`` when more bytes are needed, or ``(message, consumed)`` with the bytes after
``consumed`` left for the caller (a client may pipeline data behind its request). A malformed or
unsupported message raises :class:`ProtocolError`, which carries the RFC 1928 reply to send
before closing (or ``None`` to close without one). No other exception escapes a parser, whatever
the input.

It imports the standard library and :mod:`socks5d.core.addresses` (pure, stdlib only) and must
**not** import ``socket`` (or anything that does I/O): address text is handled with
``ipaddress``, so the module can be tested, fuzzed and reused on its own.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, TypeAlias

from ..core.addresses import canonical_ip, format_host_port, parse_ip

__all__ = [
    "MAX_GREETING_SIZE",
    "MAX_REPLY_SIZE",
    "MAX_REQUEST_SIZE",
    "MAX_SOCKS4_NAME",
    "MAX_SOCKS4_REQUEST_SIZE",
    "MAX_SOCKS4_USERID",
    "MAX_UDP_HEADER_SIZE",
    "MAX_USERNAME_PASSWORD_SIZE",
    "SOCKS4_REPLY_SIZE",
    "SOCKS4_VERSION",
    "SOCKS_VERSION",
    "UNSPECIFIED_IPV4",
    "USERNAME_PASSWORD_VERSION",
    "Address",
    "AddressType",
    "AuthStatus",
    "Buffer",
    "Command",
    "Greeting",
    "Method",
    "ProtocolError",
    "Reply",
    "Request",
    "Socks4Reply",
    "Socks4Request",
    "UdpDatagram",
    "UsernamePassword",
    "encode_address",
    "encode_auth_status",
    "encode_greeting",
    "encode_method_selection",
    "encode_reply",
    "encode_request",
    "encode_socks4_reply",
    "encode_socks4_request",
    "encode_udp_datagram",
    "encode_username_password",
    "parse_auth_status",
    "parse_greeting",
    "parse_method_selection",
    "parse_reply",
    "parse_request",
    "parse_socks4_reply",
    "parse_socks4_request",
    "parse_udp_datagram",
    "parse_username_password",
]

#: What a parser accepts. A memoryview must be a flat view of bytes (format ``"B"``).
Buffer: TypeAlias = bytes | bytearray | memoryview

# RFC 1928 §3: "The VER field is set to X'05' for this version of the protocol."
SOCKS_VERSION = 5
# RFC 1929 §2: "The VER field contains the current version of the subnegotiation, which is X'01'."
USERNAME_PASSWORD_VERSION = 1

# SOCKS4: "VN is the SOCKS protocol version number and should be 4"; in a reply "VN is the
# version of the reply code and should be 0".
SOCKS4_VERSION = 4
SOCKS4_REPLY_VERSION = 0

# Upper bounds on each message, so a reader can stop buffering a client that sends garbage.
# RFC 1928 §3: VER(1) NMETHODS(1) METHODS(1 to 255).
MAX_GREETING_SIZE = 2 + 255
# RFC 1928 §4: VER CMD RSV ATYP(4) + the longest DST.ADDR (length byte + 255) + DST.PORT(2).
MAX_REQUEST_SIZE = 4 + 1 + 255 + 2
# RFC 1929 §2: VER(1) ULEN(1) UNAME(1 to 255) PLEN(1) PASSWD(1 to 255).
MAX_USERNAME_PASSWORD_SIZE = 3 + 255 + 255
# RFC 1928 §6: a reply has the same layout as a request.
MAX_REPLY_SIZE = MAX_REQUEST_SIZE
# RFC 1928 §7: RSV(2) FRAG(1) ATYP(1) + the longest DST.ADDR + DST.PORT(2), before DATA.
MAX_UDP_HEADER_SIZE = 2 + 1 + 1 + 1 + 255 + 2
# SOCKS4 gives USERID (and SOCKS4A the name) no length: they end at a NUL. Our bounds: a
# USERID of up to 255 bytes (an RFC 1413 user id, or what RFC 1929 allows a login name),
# a name of up to 255 (what a SOCKS5 request can carry). Longer is refused with 91.
MAX_SOCKS4_USERID = 255
MAX_SOCKS4_NAME = 255
# SOCKS4: VN CD DSTPORT(2) DSTIP(4) USERID NULL, and for SOCKS4A the name and its NULL.
MAX_SOCKS4_REQUEST_SIZE = 8 + MAX_SOCKS4_USERID + 1 + MAX_SOCKS4_NAME + 1
# SOCKS4: VN CD DSTPORT(2) DSTIP(4).
SOCKS4_REPLY_SIZE = 8


class Method(IntEnum):
    """RFC 1928 §3: authentication METHOD values."""

    NO_AUTHENTICATION_REQUIRED = 0x00
    GSSAPI = 0x01
    USERNAME_PASSWORD = 0x02
    NO_ACCEPTABLE_METHODS = 0xFF


class Command(IntEnum):
    """RFC 1928 §4: the CMD field of a request."""

    CONNECT = 0x01
    BIND = 0x02
    UDP_ASSOCIATE = 0x03


class AddressType(IntEnum):
    """RFC 1928 §4/§5: the ATYP field."""

    IPV4 = 0x01
    DOMAINNAME = 0x03
    IPV6 = 0x04


class Reply(IntEnum):
    """RFC 1928 §6: the REP field of a reply."""

    SUCCEEDED = 0x00
    GENERAL_FAILURE = 0x01
    CONNECTION_NOT_ALLOWED = 0x02
    NETWORK_UNREACHABLE = 0x03
    HOST_UNREACHABLE = 0x04
    CONNECTION_REFUSED = 0x05
    TTL_EXPIRED = 0x06
    COMMAND_NOT_SUPPORTED = 0x07
    ADDRESS_TYPE_NOT_SUPPORTED = 0x08


class AuthStatus(IntEnum):
    """RFC 1929 §2: the STATUS field; any value other than X'00' is a failure."""

    SUCCESS = 0x00
    FAILURE = 0x01


class Socks4Reply(IntEnum):
    """SOCKS4: the CD field of a reply."""

    GRANTED = 0x5A  # 90: request granted
    REJECTED = 0x5B  # 91: request rejected or failed
    NO_IDENTD = 0x5C  # 92: rejected, the server cannot reach the client's identd
    IDENTD_MISMATCH = 0x5D  # 93: rejected, identd and the client report different user ids

    @classmethod
    def for_reply(cls, reply: Reply) -> Socks4Reply:
        """SOCKS4 has one failure code for every RFC 1928 failure: 91."""
        return cls.GRANTED if reply == Reply.SUCCEEDED else cls.REJECTED


# Lookup tables: a dict lookup is cheaper than raising ValueError from an IntEnum call.
_COMMANDS: dict[int, Command] = {c.value: c for c in Command}
_REPLIES: dict[int, Reply] = {r.value: r for r in Reply}
# SOCKS4: "CD is the SOCKS command code and should be 1 for CONNECT or 2 for BIND".
_SOCKS4_COMMANDS: dict[int, Command] = {1: Command.CONNECT, 2: Command.BIND}
_SOCKS4_REPLIES: dict[int, Socks4Reply] = {r.value: r for r in Socks4Reply}


class ProtocolError(Exception):
    """A malformed or unsupported message.

    ``reply`` is the RFC 1928 reply to send before closing, or ``None`` to close without a
    reply (wrong version, bad greeting or auth message, bad UDP datagram). ``message`` says what
    was wrong, for a DEBUG log line; it never contains a password.
    """

    def __init__(self, message: str, reply: Reply | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.reply = reply

    def __repr__(self) -> str:
        return f"ProtocolError({self.message!r}, reply={self.reply!r})"


# A domain name we are willing to hand to the resolver: dot-separated labels of letters,
# digits, hyphens or underscores (underscores occur in real host names, e.g. SRV-style and
# some intranet names), with an optional trailing root dot. No spaces, NULs, control bytes,
# '/', '@', '%' or ':' that could confuse getaddrinfo or a log line. The lengths are the
# resolver's to judge, not ours: DNS (RFC 1035 §2.3.4) takes labels of up to 63 octets and
# names of up to 253 characters, but the system resolver also answers names that never go
# to DNS (the numbers-and-dots forms of an IPv4 address, /etc/hosts), and refuses on its own,
# without a query, a name that DNS cannot carry.
_DOMAIN_RE = re.compile(rb"(?:[A-Za-z0-9_-]+\.)*[A-Za-z0-9_-]+\.?")
# RFC 1928 §5: the name's length is one octet, so the longest name a client can send.
_MAX_DOMAIN_TEXT = 255


def _normalize_domain(raw: bytes) -> str | None:
    """Return the ASCII (IDNA A-label) form of a domain name, or None if it is not usable."""
    if not raw.isascii():
        # RFC 1928 §5 says only "a fully-qualified domain name"; clients such as curl send
        # internationalized names as UTF-8, which the resolver needs in the A-label form.
        try:
            raw = raw.decode("utf-8").encode("idna")
        except ValueError:  # UnicodeError is a ValueError: bad UTF-8, bad label, bad char
            return None
    text_len = len(raw) - 1 if raw.endswith(b".") else len(raw)
    if text_len > _MAX_DOMAIN_TEXT or _DOMAIN_RE.fullmatch(raw) is None:
        # An IPv6 literal sent as a name is still something the resolver can use.
        if b":" in raw and b"%" not in raw and _is_ipv6_literal(raw):
            return raw.decode("ascii")
        return None
    return raw.decode("ascii")


def _is_ipv6_literal(raw: bytes) -> bool:
    try:
        ipaddress.IPv6Address(raw.decode("ascii"))
    except ValueError:
        return False
    return True


@functools.lru_cache(maxsize=4096)
def _ip_literal(host: str) -> tuple[AddressType, str]:
    """An IP literal as (ATYP, text): without brackets or zone (the wire format has none),
    IPv6 compressed per RFC 5952. Cached: each connection converts several (peer, egress),
    the same few recur, and ipaddress parsing and formatting cost microseconds."""
    ip = parse_ip(host)
    return (AddressType.IPV4 if ip.version == 4 else AddressType.IPV6), str(ip)


@dataclass(frozen=True, slots=True)
class Address:
    """RFC 1928 §4/§5: an ATYP with its address and a port.

    ``host`` is dotted-quad IPv4, compressed IPv6 without brackets, or an ASCII domain name
    (IDNA A-label form). A domain name that happens to be an IP literal stays ``DOMAINNAME``:
    it is the resolver's to interpret.
    """

    type: AddressType
    host: str
    port: int

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 0xFFFF:
            raise ValueError(f"port out of range: {self.port!r}")

    @classmethod
    def from_sockaddr(cls, sockaddr: tuple[Any, ...]) -> Address:
        """Build an Address from a socket address: ``(host, port)`` or
        ``(host, port, flowinfo, scope_id)``. An IPv4-mapped IPv6 address (what a dual-stack
        socket reports for an IPv4 peer) becomes IPv4; a zone index (``%eth0``) is dropped.
        """
        atyp, text = _ip_literal(canonical_ip(sockaddr[0]))
        return cls(atyp, text, sockaddr[1])

    @classmethod
    def from_host(cls, host: str, port: int) -> Address:
        """Build an Address from an IPv4/IPv6 literal (brackets allowed) or a domain name.

        A non-ASCII domain name is converted to its A-label form. Raises ValueError for a
        host that is neither.
        """
        try:
            atyp, text = _ip_literal(host)
        except ValueError:
            pass
        else:
            return cls(atyp, text, port)
        try:
            raw = host.encode("utf-8")
        except UnicodeError:  # lone surrogates
            raise ValueError(f"invalid domain name: {host!r}") from None
        name = _normalize_domain(raw)
        if name is None or len(name) > 255:
            raise ValueError(f"invalid domain name: {host!r}")
        return cls(AddressType.DOMAINNAME, name, port)

    def __str__(self) -> str:
        return format_host_port(self.host, self.port)


UNSPECIFIED_IPV4 = Address(AddressType.IPV4, "0.0.0.0", 0)


@dataclass(frozen=True, slots=True)
class Greeting:
    """RFC 1928 §3: the client's version identifier/method selection message."""

    methods: tuple[int, ...]  # raw METHOD bytes as offered, unknown values kept, in order


@dataclass(frozen=True, slots=True)
class UsernamePassword:
    """RFC 1929 §2: the username/password request. The password never appears in a repr."""

    username: bytes
    password: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class Request:
    """RFC 1928 §4: a SOCKS request."""

    command: Command
    address: Address


@dataclass(frozen=True, slots=True)
class Socks4Request:
    """A SOCKS4 request, or a SOCKS4A one when ``address`` is a domain name."""

    command: Command  # CONNECT or BIND
    address: Address  # IPv4, or DOMAINNAME (SOCKS4A)
    userid: bytes  # USERID as sent, without its NULL: a claim, never a login

    @property
    def is_4a(self) -> bool:
        return self.address.type == AddressType.DOMAINNAME


@dataclass(frozen=True, slots=True)
class UdpDatagram:
    """RFC 1928 §7: a UDP request header and its payload."""

    frag: int
    address: Address
    data: bytes


def _parse_address(buf: Buffer, offset: int, replies: bool) -> tuple[Address, int] | None:
    """Parse ATYP DST.ADDR DST.PORT at ``offset``; return (address, end offset) or None.

    With ``replies`` (a request), errors carry the RFC 1928 §6 reply to send; otherwise
    (UDP datagrams, replies read by a client) they carry None.
    """
    n = len(buf)
    if n <= offset:
        return None
    atyp = buf[offset]
    if atyp == AddressType.IPV4:
        # RFC 1928 §5: "a version-4 IP address, with a length of 4 octets"
        end = offset + 1 + 4 + 2
        if n < end:
            return None
        host = f"{buf[offset + 1]}.{buf[offset + 2]}.{buf[offset + 3]}.{buf[offset + 4]}"
        return Address(AddressType.IPV4, host, (buf[end - 2] << 8) | buf[end - 1]), end
    if atyp == AddressType.IPV6:
        # RFC 1928 §5: "a version-6 IP address, with a length of 16 octets"
        end = offset + 1 + 16 + 2
        if n < end:
            return None
        host = ipaddress.IPv6Address(bytes(buf[offset + 1 : offset + 17])).compressed
        return Address(AddressType.IPV6, host, (buf[end - 2] << 8) | buf[end - 1]), end
    if atyp == AddressType.DOMAINNAME:
        # RFC 1928 §5: "the first octet of the address field contains the number of octets
        # of name that follow, there is no terminating NUL octet"
        if n < offset + 2:
            return None
        length = buf[offset + 1]
        if length == 0:
            raise ProtocolError("empty domain name", Reply.GENERAL_FAILURE if replies else None)
        end = offset + 2 + length + 2
        if n < end:
            return None
        raw = bytes(buf[offset + 2 : offset + 2 + length])
        name = _normalize_domain(raw)
        if name is None:
            raise ProtocolError(
                f"invalid domain name {raw[:64]!r}", Reply.HOST_UNREACHABLE if replies else None
            )
        return Address(AddressType.DOMAINNAME, name, (buf[end - 2] << 8) | buf[end - 1]), end
    # RFC 1928 §6: X'08' Address type not supported.
    raise ProtocolError(
        f"unknown address type {atyp:#04x}",
        Reply.ADDRESS_TYPE_NOT_SUPPORTED if replies else None,
    )


def parse_greeting(buf: Buffer) -> tuple[Greeting, int] | None:
    """RFC 1928 §3: parse ``VER NMETHODS METHODS``."""
    n = len(buf)
    if n < 1:
        return None
    if buf[0] != SOCKS_VERSION:
        # Not SOCKS5 (a SOCKS4 or HTTP client): there is no common reply format; just close.
        raise ProtocolError(f"unsupported SOCKS version {buf[0]:#04x}")
    if n < 2:
        return None
    nmethods = buf[1]
    if nmethods == 0:
        # RFC 1928 §3: METHODS is 1 to 255 octets.
        raise ProtocolError("greeting offers no methods")
    end = 2 + nmethods
    if n < end:
        return None
    return Greeting(tuple(buf[2:end])), end


def parse_username_password(buf: Buffer) -> tuple[UsernamePassword, int] | None:
    """RFC 1929 §2: parse ``VER ULEN UNAME PLEN PASSWD``.

    A zero ULEN or PLEN (the RFC says 1 to 255) is accepted; the credential check fails it.
    """
    n = len(buf)
    if n < 1:
        return None
    if buf[0] != USERNAME_PASSWORD_VERSION:
        raise ProtocolError(f"unsupported username/password version {buf[0]:#04x}")
    if n < 2:
        return None
    ulen = buf[1]
    plen_at = 2 + ulen
    if n < plen_at + 1:
        return None
    end = plen_at + 1 + buf[plen_at]
    if n < end:
        return None
    username = bytes(buf[2:plen_at])
    password = bytes(buf[plen_at + 1 : end])
    return UsernamePassword(username, password), end


def parse_request(buf: Buffer) -> tuple[Request, int] | None:
    """RFC 1928 §4: parse ``VER CMD RSV ATYP DST.ADDR DST.PORT``.

    An unknown CMD or ATYP fails as soon as its byte arrives, with the reply to send.
    """
    n = len(buf)
    if n < 1:
        return None
    if buf[0] != SOCKS_VERSION:
        raise ProtocolError(f"unsupported SOCKS version {buf[0]:#04x} in request")
    if n < 2:
        return None
    command = _COMMANDS.get(buf[1])
    if command is None:
        # RFC 1928 §6: X'07' Command not supported.
        raise ProtocolError(f"unknown command {buf[1]:#04x}", Reply.COMMAND_NOT_SUPPORTED)
    # RFC 1928 §4: RSV is X'00'; it is ignored rather than checked, as most servers do.
    parsed = _parse_address(buf, 3, replies=True)
    if parsed is None:
        return None
    address, end = parsed
    return Request(command, address), end


def parse_udp_datagram(buf: Buffer) -> UdpDatagram:
    """RFC 1928 §7: parse a whole datagram ``RSV FRAG ATYP DST.ADDR DST.PORT DATA``.

    FRAG is returned as is: RFC 1928 §7 lets a relay that does not reassemble drop any
    datagram whose FRAG is not X'00', which is the caller's decision. RSV is ignored.
    """
    # RFC 1928 §7: RSV(2) FRAG(1); the address starts at offset 3.
    parsed = _parse_address(buf, 3, replies=False) if len(buf) >= 3 else None
    if parsed is None:
        raise ProtocolError(f"truncated UDP datagram ({len(buf)} bytes)")
    address, end = parsed
    return UdpDatagram(buf[2], address, bytes(buf[end:]))


def parse_reply(buf: Buffer) -> tuple[tuple[Reply | int, Address], int] | None:
    """RFC 1928 §6: parse ``VER REP RSV ATYP BND.ADDR BND.PORT`` (client side).

    An unknown REP value is returned as a plain int.
    """
    n = len(buf)
    if n < 1:
        return None
    if buf[0] != SOCKS_VERSION:
        raise ProtocolError(f"unsupported SOCKS version {buf[0]:#04x} in reply")
    if n < 2:
        return None
    rep = buf[1]
    parsed = _parse_address(buf, 3, replies=False)
    if parsed is None:
        return None
    address, end = parsed
    return (_REPLIES.get(rep, rep), address), end


def _nul_terminated(buf: Buffer, start: int, limit: int, what: str) -> int | None:
    """The offset of the NULL ending a field that starts at ``start`` and holds at most
    ``limit`` bytes; None while it may still come; ProtocolError (91) once it cannot."""
    window = bytes(buf[start : start + limit + 1])
    end = window.find(0)
    if end >= 0:
        return start + end
    if len(window) > limit:
        raise ProtocolError(f"SOCKS4 {what} longer than {limit} bytes", Reply.GENERAL_FAILURE)
    return None


def parse_socks4_request(buf: Buffer) -> tuple[Socks4Request, int] | None:
    """SOCKS4: parse ``VN CD DSTPORT DSTIP USERID NULL``; SOCKS4A: then ``NAME NULL``
    when DSTIP is 0.0.0.x with x nonzero.

    Errors carry an RFC 1928 reply (the handshake answers every one with 91): an unknown
    CD (SOCKS4 has no UDP), a USERID or name past its bound (MAX_SOCKS4_USERID,
    MAX_SOCKS4_NAME) without its NULL, an empty or unusable name.
    """
    n = len(buf)
    if n < 1:
        return None
    if buf[0] != SOCKS4_VERSION:
        raise ProtocolError(f"unsupported SOCKS version {buf[0]:#04x}")
    if n < 2:
        return None
    command = _SOCKS4_COMMANDS.get(buf[1])
    if command is None:
        raise ProtocolError(f"unknown SOCKS4 command {buf[1]:#04x}", Reply.COMMAND_NOT_SUPPORTED)
    if n < 8:
        return None
    port = (buf[2] << 8) | buf[3]
    userid_end = _nul_terminated(buf, 8, MAX_SOCKS4_USERID, "USERID")
    if userid_end is None:
        return None
    userid = bytes(buf[8:userid_end])
    if buf[4] or buf[5] or buf[6] or not buf[7]:
        host = f"{buf[4]}.{buf[5]}.{buf[6]}.{buf[7]}"
        return Socks4Request(command, Address(AddressType.IPV4, host, port), userid), userid_end + 1
    # SOCKS4A: "Following the NULL byte terminating USERID, the client must send the
    # destination domain name and terminate it with another NULL byte."
    name_end = _nul_terminated(buf, userid_end + 1, MAX_SOCKS4_NAME, "name")
    if name_end is None:
        return None
    raw = bytes(buf[userid_end + 1 : name_end])
    if not raw:
        raise ProtocolError("empty domain name", Reply.GENERAL_FAILURE)
    name = _normalize_domain(raw)
    if name is None:
        raise ProtocolError(f"invalid domain name {raw[:64]!r}", Reply.HOST_UNREACHABLE)
    address = Address(AddressType.DOMAINNAME, name, port)
    return Socks4Request(command, address, userid), name_end + 1


def parse_socks4_reply(buf: Buffer) -> tuple[tuple[Socks4Reply | int, Address], int] | None:
    """SOCKS4: parse ``VN CD DSTPORT DSTIP`` (client side); an unknown CD as a plain int."""
    if len(buf) < SOCKS4_REPLY_SIZE:
        return None
    if buf[0] != SOCKS4_REPLY_VERSION:
        raise ProtocolError(f"unsupported SOCKS4 reply version {buf[0]:#04x}")
    host = f"{buf[4]}.{buf[5]}.{buf[6]}.{buf[7]}"
    address = Address(AddressType.IPV4, host, (buf[2] << 8) | buf[3])
    return (_SOCKS4_REPLIES.get(buf[1], buf[1]), address), SOCKS4_REPLY_SIZE


def parse_method_selection(buf: Buffer) -> tuple[int, int] | None:
    """RFC 1928 §3: parse the server's ``VER METHOD`` (client side); METHOD as an int."""
    if len(buf) < 1:
        return None
    if buf[0] != SOCKS_VERSION:
        raise ProtocolError(f"unsupported SOCKS version {buf[0]:#04x} in method selection")
    if len(buf) < 2:
        return None
    return buf[1], 2


def parse_auth_status(buf: Buffer) -> tuple[int, int] | None:
    """RFC 1929 §2: parse the server's ``VER STATUS`` (client side); X'00' is success."""
    if len(buf) < 1:
        return None
    if buf[0] != USERNAME_PASSWORD_VERSION:
        raise ProtocolError(f"unsupported username/password version {buf[0]:#04x} in status")
    if len(buf) < 2:
        return None
    return buf[1], 2


def _byte(value: int, what: str) -> bytes:
    if not 0 <= value <= 0xFF:
        raise ValueError(f"{what} out of range: {value!r}")
    return bytes((value,))


def encode_greeting(methods: Iterable[int]) -> bytes:
    """RFC 1928 §3: ``VER NMETHODS METHODS`` (client side)."""
    body = bytes(methods)  # ValueError for a value outside 0..255
    if not 1 <= len(body) <= 255:
        raise ValueError(f"a greeting offers 1 to 255 methods, not {len(body)}")
    return bytes((SOCKS_VERSION, len(body))) + body


def encode_method_selection(method: int) -> bytes:
    """RFC 1928 §3: the server's ``VER METHOD`` choice."""
    return bytes((SOCKS_VERSION,)) + _byte(method, "method")


def encode_username_password(username: bytes, password: bytes) -> bytes:
    """RFC 1929 §2: ``VER ULEN UNAME PLEN PASSWD`` (client side)."""
    if len(username) > 255 or len(password) > 255:
        raise ValueError("username and password are at most 255 bytes each")
    return (
        bytes((USERNAME_PASSWORD_VERSION, len(username)))
        + username
        + bytes((len(password),))
        + password
    )


def encode_auth_status(status: AuthStatus) -> bytes:
    """RFC 1929 §2: the server's ``VER STATUS`` response."""
    return bytes((USERNAME_PASSWORD_VERSION,)) + _byte(status, "status")


@functools.lru_cache(maxsize=4096)
def _packed(atyp: AddressType, host: str) -> bytes:
    """An IP literal's wire bytes. Cached: every reply carries the outbound socket's
    address, the same few recur, and ipaddress parsing costs ~10 us per call."""
    if atyp == AddressType.IPV4:
        return ipaddress.IPv4Address(host).packed
    return ipaddress.IPv6Address(host).packed


def encode_address(address: Address) -> bytes:
    """RFC 1928 §4/§5: ``ATYP ADDR PORT``. Raises ValueError for a host that does not fit."""
    atyp = address.type
    if atyp == AddressType.IPV4 or atyp == AddressType.IPV6:
        addr = _packed(atyp, address.host)
    elif atyp == AddressType.DOMAINNAME:
        name = address.host.encode("ascii")  # A-label form; UnicodeEncodeError is a ValueError
        if not 1 <= len(name) <= 255:
            raise ValueError(f"domain name must be 1 to 255 bytes: {address.host!r}")
        addr = bytes((len(name),)) + name
    else:
        raise ValueError(f"unknown address type: {atyp!r}")
    return bytes((atyp,)) + addr + address.port.to_bytes(2, "big")


def encode_request(command: Command, address: Address) -> bytes:
    """RFC 1928 §4: ``VER CMD RSV ATYP DST.ADDR DST.PORT`` (client side)."""
    return bytes((SOCKS_VERSION, _byte(command, "command")[0], 0x00)) + encode_address(address)


def encode_reply(reply: Reply, bound: Address | None = None) -> bytes:
    """RFC 1928 §6: ``VER REP RSV ATYP BND.ADDR BND.PORT``.

    Without ``bound`` (a failure, or nothing meaningful to report) the address is IPv4
    0.0.0.0:0, which every client can parse.
    """
    if bound is None:
        bound = UNSPECIFIED_IPV4
    return bytes((SOCKS_VERSION, _byte(reply, "reply")[0], 0x00)) + encode_address(bound)


def encode_udp_datagram(address: Address, data: bytes, frag: int = 0) -> bytes:
    """RFC 1928 §7: ``RSV FRAG ATYP DST.ADDR DST.PORT DATA``."""
    return b"\x00\x00" + _byte(frag, "frag") + encode_address(address) + data


def encode_socks4_request(command: Command, address: Address, userid: bytes = b"") -> bytes:
    """SOCKS4 ``VN CD DSTPORT DSTIP USERID NULL`` (client side); a domain name gives the
    SOCKS4A form (DSTIP 0.0.0.1, the name and its NULL after USERID)."""
    if command not in _SOCKS4_COMMANDS.values():
        raise ValueError(f"SOCKS4 has no command {command!r}")
    if len(userid) > MAX_SOCKS4_USERID or 0 in userid:
        raise ValueError(f"a USERID is at most {MAX_SOCKS4_USERID} bytes, without NUL")
    head = bytes((SOCKS4_VERSION, command)) + address.port.to_bytes(2, "big")
    if address.type == AddressType.IPV4:
        return head + _packed(AddressType.IPV4, address.host) + userid + b"\x00"
    if address.type == AddressType.DOMAINNAME:
        name = address.host.encode("ascii")
        if not 1 <= len(name) <= MAX_SOCKS4_NAME:
            raise ValueError(f"a SOCKS4A name is 1 to {MAX_SOCKS4_NAME} bytes: {address.host!r}")
        return head + b"\x00\x00\x00\x01" + userid + b"\x00" + name + b"\x00"
    raise ValueError(f"SOCKS4 cannot carry an IPv6 address: {address}")


def encode_socks4_reply(code: Socks4Reply, bound: Address | None = None) -> bytes:
    """SOCKS4 ``VN CD DSTPORT DSTIP``, VN = 0.

    DSTPORT and DSTIP carry ``bound`` when it is IPv4 (BIND's replies: where to connect,
    who did). What SOCKS4 cannot carry (an IPv6 address) goes as DSTIP 0.0.0.0 with its
    port: for BIND the document says a client reads DSTIP 0 as "the SOCKS server's
    address". Without ``bound`` (a failure) both are zero.
    """
    head = bytes((SOCKS4_REPLY_VERSION, _byte(code, "reply")[0]))
    if bound is None:
        return head + bytes(6)
    ip = _packed(AddressType.IPV4, bound.host) if bound.type == AddressType.IPV4 else bytes(4)
    return head + bound.port.to_bytes(2, "big") + ip
