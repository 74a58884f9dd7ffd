"""CONNECT through a parent proxy: the client side of SOCKS5 and of HTTP CONNECT.

A rule's `via` (or `access.default_via`) sends a CONNECT to a parent proxy instead of the
target. This module speaks to that parent: RFC 1928 with the RFC 1929 login for a
``socks5://`` or ``socks5h://`` parent, RFC 9110 §9.3.6 CONNECT for an ``http://`` one. The
wire format is pure (encode the requests, parse the answers, map them to RFC 1928 reply
codes) and kept apart from the one blocking function that drives it, :func:`open_via_parent`,
whose whole exchange (reaching the parent included) is bounded by one deadline, the
connect timeout.

Replies are mapped in :func:`reply_for_http_status` and :class:`ParentFailed` (see there
for why). What the parent said goes into the access log; the parent's credentials never do,
nor into an exception message.

Imports the wire format, outbound.py (connecting, resolving) and the config's Upstream
record; nothing of the handshake or the drivers.
"""

from __future__ import annotations

import base64
import logging
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from ..core.addresses import format_host_port
from ..ops.config import Upstream
from .lookups import LookupPool
from .outbound import (
    ANY_SOURCE,
    ConnectFailed,
    OutgoingAddresses,
    Resolver,
    connect_any,
    resolve_target,
    system_resolver,
)
from .protocol import (
    Address,
    AuthStatus,
    Buffer,
    Command,
    Method,
    ProtocolError,
    Reply,
    encode_greeting,
    encode_request,
    encode_username_password,
    parse_auth_status,
    parse_method_selection,
    parse_reply,
)

__all__ = [
    "MAX_HTTP_HEAD",
    "MAX_HTTP_STATUS_LINE",
    "Chained",
    "ParentFailed",
    "encode_http_connect",
    "open_via_parent",
    "parse_http_response",
    "reply_for_http_status",
    "reply_for_socks_code",
]

logger = logging.getLogger(__name__)

# Bounds on an HTTP parent's answer: a parent sending an endless header or status line is
# cut off here instead of growing a buffer (nginx and tinyproxy use 8 KiB heads; a CONNECT
# answer has a status line and a few short fields).
MAX_HTTP_STATUS_LINE = 1024
MAX_HTTP_HEAD = 16 * 1024

# RFC 9110 §15: what an HTTP parent's status means for the client, in RFC 1928 §6 terms.
# - 403 Forbidden, 407 Proxy Authentication Required (and 401, which tinyproxy sends for
#   a wrong Proxy-Authorization): the parent's policy, or our login to it, says no: 02,
#   connection not allowed by ruleset, as our own rules would say.
# - 502 Bad Gateway, 503 Service Unavailable, 504 Gateway Timeout: the parent could not
#   reach the target (or would not now): 04, host unreachable, as our own failed or timed
#   out connect says; 05 would claim the target refused, which the parent did not tell.
# - anything else that is not 2xx (400, 405, 500...): 01, general SOCKS server failure
#   (tinyproxy reports a target it could not connect to as "500 Unable to connect": the
#   code says nothing more specific, the reason phrase goes to the log).
HTTP_REPLIES: dict[int, Reply] = {
    401: Reply.CONNECTION_NOT_ALLOWED,
    403: Reply.CONNECTION_NOT_ALLOWED,
    407: Reply.CONNECTION_NOT_ALLOWED,
    502: Reply.HOST_UNREACHABLE,
    503: Reply.HOST_UNREACHABLE,
    504: Reply.HOST_UNREACHABLE,
}

_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([1-9][0-9]{2})(?: ([^\r\n]*))?\r?")
_HEAD_END = re.compile(rb"\r?\n\r?\n")
_REPLIES = {reply.value: reply for reply in Reply}


class ParentFailed(Exception):
    """The parent could not be reached or did not open the tunnel.

    ``reply``: the RFC 1928 §6 code for our client. ``said``: what the parent said, for the
    access log's ``parent=`` field ("reply 05", "HTTP 403 Forbidden", "unreachable",
    "timeout", "closed", "malformed answer"). Neither holds a credential.

    A parent we cannot reach, or that does not answer within the connect timeout, is 04
    (host unreachable): from the client's side the target cannot be reached by the route
    it must take, exactly what 04 says of a direct connect that fails; 01 would hide that
    it is a reachability problem, 05 would blame the target. A parent that breaks the
    protocol (closes or resets mid-exchange, sends garbage or an endless header) is 01,
    general SOCKS server failure: the fault is in the proxy chain, not the target.
    """

    def __init__(self, reply: Reply, said: str, reason: str) -> None:
        super().__init__(reason)
        self.reply = reply
        self.said = said
        self.reason = reason


@dataclass(slots=True)
class Chained:
    """A tunnel the parent opened: the socket (non-blocking, for the relay), the address
    to report as BND (RFC 1928 §6), the bytes the parent sent after its answer (the
    tunnel's first payload toward the client) and what the parent said."""

    sock: socket.socket
    bound: Address
    early: bytes
    said: str


# ---- the wire format (pure) ----


def reply_for_socks_code(code: int) -> Reply:
    """A SOCKS5 parent's REP passed on as it is; a code RFC 1928 does not define is 01."""
    return _REPLIES.get(code, Reply.GENERAL_FAILURE)


def reply_for_http_status(status: int) -> Reply | None:
    """None for 2xx (RFC 9110 §9.3.6: the tunnel is open), else the reply (HTTP_REPLIES)."""
    if 200 <= status <= 299:
        return None
    return HTTP_REPLIES.get(status, Reply.GENERAL_FAILURE)


def http_authority(target: Address) -> str:
    """RFC 9110 §9.3.6: CONNECT's request target is host:port (brackets around IPv6)."""
    return format_host_port(target.host, target.port)


def encode_http_connect(target: Address, username: str | None, password: str | None) -> bytes:
    """The CONNECT request head; with credentials, RFC 7617 Basic in Proxy-Authorization.

    The host came through the request parser (an ASCII name or an IP literal), so it
    cannot carry a CR or LF into the head.
    """
    authority = http_authority(target)
    lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}"]
    if username is not None and password is not None:
        token = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
        lines.append(f"Proxy-Authorization: Basic {token}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


def parse_http_response(buf: Buffer) -> tuple[tuple[int, str], int] | None:
    """The parent's response head: ((status, reason phrase), head length) or None for
    more. Bounded: a status line past MAX_HTTP_STATUS_LINE or a head past MAX_HTTP_HEAD
    is a ProtocolError, as is anything that is not an HTTP/1.x status line. Bytes after
    the head are the tunnel's (RFC 9110 §9.3.6), left to the caller. A bare LF ends a
    line too (RFC 9112 §2.2 lets a recipient accept it).
    """
    data = bytes(buf)
    line_end = data.find(b"\n")
    if line_end < 0:
        if len(data) > MAX_HTTP_STATUS_LINE:
            raise ProtocolError(f"status line longer than {MAX_HTTP_STATUS_LINE} bytes")
        return None
    if line_end > MAX_HTTP_STATUS_LINE:
        raise ProtocolError(f"status line longer than {MAX_HTTP_STATUS_LINE} bytes")
    match = _STATUS_LINE.fullmatch(data[:line_end])
    if match is None:
        raise ProtocolError("not an HTTP/1.x status line")
    head_end = _HEAD_END.search(data, line_end - 1 if line_end else 0)
    if head_end is None:
        if len(data) > MAX_HTTP_HEAD:
            raise ProtocolError(f"response head longer than {MAX_HTTP_HEAD} bytes")
        return None
    if head_end.end() > MAX_HTTP_HEAD:
        raise ProtocolError(f"response head longer than {MAX_HTTP_HEAD} bytes")
    reason = (match[2] or b"").decode("latin-1").strip()
    return (int(match[1]), _printable(reason)), head_end.end()


def _printable(text: str, limit: int = 64) -> str:
    """A parent's words as one safe log field: printable ASCII, bounded."""
    return "".join(char if " " <= char <= "~" else "?" for char in text[:limit])


# ---- driving it over a socket ----

Parsed = TypeVar("Parsed")


class _Exchange:
    """Blocking reads and writes to the parent under one deadline; what was read past
    the last parsed message stays in `buffer` (the tunnel's first bytes)."""

    def __init__(self, sock: socket.socket, deadline: float, name: str) -> None:
        self.sock = sock
        self.deadline = deadline
        self.name = name
        self.buffer = bytearray()

    def remaining(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise self.timeout()
        return left

    def timeout(self) -> ParentFailed:
        return ParentFailed(
            Reply.HOST_UNREACHABLE, "timeout", f"parent {self.name} did not answer in time"
        )

    def send(self, data: bytes) -> None:
        self.sock.settimeout(self.remaining())
        try:
            self.sock.sendall(data)
        except TimeoutError:
            raise self.timeout() from None
        except OSError as exc:
            raise self.broken(exc) from None

    def read(self, parse: Callable[[Buffer], tuple[Parsed, int] | None]) -> Parsed:
        """The next message `parse` recognises; more is read until it does."""
        while True:
            try:
                parsed = parse(self.buffer)
            except ProtocolError as exc:
                raise ParentFailed(
                    Reply.GENERAL_FAILURE,
                    "malformed answer",
                    f"parent {self.name} sent a malformed answer: {exc.message}",
                ) from None
            if parsed is not None:
                message, used = parsed
                del self.buffer[:used]
                return message
            self.sock.settimeout(self.remaining())
            try:
                chunk = self.sock.recv(16384)
            except TimeoutError:
                raise self.timeout() from None
            except OSError as exc:
                raise self.broken(exc) from None
            if not chunk:
                raise ParentFailed(
                    Reply.GENERAL_FAILURE, "closed", f"parent {self.name} closed mid-handshake"
                )
            self.buffer += chunk

    def broken(self, exc: OSError) -> ParentFailed:
        what = exc.strerror or type(exc).__name__
        return ParentFailed(
            Reply.GENERAL_FAILURE, "closed", f"parent {self.name} failed mid-handshake: {what}"
        )


def open_via_parent(
    upstream: Upstream,
    target: Address,
    timeout: float,
    *,
    resolver: Resolver = system_resolver,
    resolve_timeout: float | None = None,
    lookups: LookupPool | None = None,
    attempt_delay: float = 0.25,
    outgoing: OutgoingAddresses = ANY_SOURCE,
) -> Chained:
    """Reach `upstream` and have it open a tunnel to `target`, all within `timeout`.

    `target` goes to the parent as it is: a name for the parent to resolve, or an address.
    Raises ParentFailed (the reply to send, what the parent said).
    """
    deadline = time.monotonic() + timeout
    sock = _reach(upstream, deadline, resolver, resolve_timeout, lookups, attempt_delay, outgoing)
    try:
        exchange = _Exchange(sock, deadline, upstream.name)
        if upstream.scheme == "http":
            bound, said = _http_connect(exchange, upstream, target)
        else:
            bound, said = _socks5_connect(exchange, upstream, target)
        sock.setblocking(False)  # the relay wants it so
    except BaseException:
        sock.close()
        raise
    return Chained(sock, bound, bytes(exchange.buffer), said)


def _reach(
    upstream: Upstream,
    deadline: float,
    resolver: Resolver,
    resolve_timeout: float | None,
    lookups: LookupPool | None,
    attempt_delay: float,
    outgoing: OutgoingAddresses,
) -> socket.socket:
    """A connection to the parent itself; any failure, its timeout too, is 04."""
    try:
        left = max(deadline - time.monotonic(), 0.001)
        address = Address.from_host(upstream.host, upstream.port)
        bound = left if resolve_timeout is None else min(resolve_timeout, left)
        candidates = resolve_target(address, resolver, timeout=bound, lookups=lookups)
        left = max(deadline - time.monotonic(), 0.001)
        return connect_any(candidates, left, attempt_delay=attempt_delay, outgoing=outgoing)
    except ConnectFailed as exc:
        said = "timeout" if "timed out" in exc.reason else "unreachable"
        raise ParentFailed(
            Reply.HOST_UNREACHABLE, said, f"parent {upstream.name} unreachable: {exc.reason}"
        ) from None


def _socks5_connect(
    exchange: _Exchange, upstream: Upstream, target: Address
) -> tuple[Address, str]:
    """RFC 1928 §3-§6 as a client, with the RFC 1929 login when the url has one."""
    login = upstream.username is not None and upstream.password is not None
    offered = [Method.USERNAME_PASSWORD] if login else [Method.NO_AUTHENTICATION_REQUIRED]
    exchange.send(encode_greeting(offered))
    method = exchange.read(parse_method_selection)
    if method not in offered:
        # X'FF' (RFC 1928 §3: none acceptable) or one we did not offer: our account at the
        # parent does not fit it, a fault in the chain's setup, not the client's.
        raise ParentFailed(
            Reply.GENERAL_FAILURE,
            f"method {method:02x}",
            f"parent {exchange.name} accepts none of the methods offered",
        )
    if method == Method.USERNAME_PASSWORD:
        assert upstream.username is not None and upstream.password is not None
        exchange.send(
            encode_username_password(upstream.username.encode(), upstream.password.encode())
        )
        if exchange.read(parse_auth_status) != AuthStatus.SUCCESS:
            # Refused like an HTTP parent's 407: 02, not allowed.
            raise ParentFailed(
                Reply.CONNECTION_NOT_ALLOWED,
                "login refused",
                f"parent {exchange.name} refused our login",
            )
    exchange.send(encode_request(Command.CONNECT, target))
    code, bound = exchange.read(parse_reply)
    said = f"reply {int(code):02x}"
    if code != Reply.SUCCEEDED:
        raise ParentFailed(
            reply_for_socks_code(code), said, f"parent {exchange.name} answered {said}"
        )
    # RFC 1928 §6: BND is the address the parent connects to the target from; passed on.
    return bound, said


def _http_connect(exchange: _Exchange, upstream: Upstream, target: Address) -> tuple[Address, str]:
    """RFC 9110 §9.3.6: CONNECT host:port, any 2xx opens the tunnel."""
    exchange.send(encode_http_connect(target, upstream.username, upstream.password))
    status, reason = exchange.read(parse_http_response)
    said = f"HTTP {status} {reason}".rstrip()
    failure = reply_for_http_status(status)
    if failure is not None:
        raise ParentFailed(failure, said, f"parent {exchange.name} answered {said}")
    # HTTP says nothing of the parent's outside address: report ours toward it.
    return Address.from_sockaddr(exchange.sock.getsockname()), said
