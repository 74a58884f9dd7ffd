"""Socks5Handler: one client connection, from greeting to the end of its tunnel.

A linear negotiation with one method per phase (greeting → method choice → RFC 1929
auth → request → command), reading the stream through a buffer so a message may arrive
in any number of pieces and bytes pipelined after the request reach the target. Wire
format lives in protocol.py, policy in auth.py, connecting in outbound.py, moving bytes
in relay.py; this module only sequences them and writes the access log line.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .auth import Authenticator
from .config import Config
from .outbound import ConnectFailed, Resolver, open_connection, system_resolver
from .protocol import (
    MAX_GREETING_SIZE,
    MAX_REQUEST_SIZE,
    MAX_USERNAME_PASSWORD_SIZE,
    Address,
    AuthStatus,
    Command,
    Method,
    ProtocolError,
    Reply,
    Request,
    encode_auth_status,
    encode_method_selection,
    encode_reply,
    parse_greeting,
    parse_request,
    parse_username_password,
)
from .relay import relay
from .server import BaseRequestHandler

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("socks5d.access")

Message = TypeVar("Message")
Parser = Callable[[bytearray], tuple[Message, int] | None]


@dataclass(frozen=True, slots=True)
class HandlerSettings:
    """What a handler needs from the config, built once per (re)load, not per connection."""

    authenticator: Authenticator = field(default_factory=Authenticator)
    handshake_timeout: float = 10.0
    connect_timeout: float = 10.0
    idle_timeout: float | None = 3600.0
    resolver: Resolver = system_resolver

    @classmethod
    def from_config(cls, config: Config) -> HandlerSettings:
        return cls(
            authenticator=Authenticator.from_users(config.users),
            handshake_timeout=config.timeouts.handshake,
            connect_timeout=config.timeouts.connect,
            idle_timeout=config.timeouts.idle or None,
        )


class ClientGone(Exception):
    """The client closed its side before the handshake was complete."""


class HandshakeTimeout(Exception):
    """The client did not complete the handshake within the handshake timeout."""


class HandshakeReader:
    """Reads whole messages off a stream socket under one overall deadline.

    A deadline (not a per-recv timeout) so a client trickling a byte at a time cannot
    hold its thread past the handshake timeout.
    """

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        self.sock = sock
        self.deadline = time.monotonic() + timeout
        self.buffer = bytearray()

    def read(self, parser: Parser[Message], limit: int) -> Message:
        while True:
            parsed = parser(self.buffer)
            if parsed is not None:
                message, consumed = parsed
                del self.buffer[:consumed]
                return message
            if len(self.buffer) >= limit:
                raise ProtocolError(f"message longer than {limit} bytes")
            self.sock.settimeout(self._remaining())
            try:
                chunk = self.sock.recv(4096)
            except TimeoutError:
                raise HandshakeTimeout from None
            if not chunk:
                raise ClientGone
            self.buffer += chunk

    def send(self, data: bytes) -> None:
        self.sock.settimeout(self._remaining())
        try:
            self.sock.sendall(data)
        except TimeoutError:
            raise HandshakeTimeout from None

    def _remaining(self) -> float:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise HandshakeTimeout
        return remaining


@dataclass(slots=True)
class Session:
    """What the access log line reports about one connection."""

    client: str
    started: float = field(default_factory=time.monotonic)
    user: str = "-"
    command: str = "-"
    target: str = "-"
    remote: str = "-"
    reply: Reply | None = None
    up: int = 0
    down: int = 0
    end: str = "-"

    def log_line(self) -> str:
        reply = "-" if self.reply is None else f"{self.reply:02x}"
        duration = time.monotonic() - self.started
        return (
            f"client={self.client} user={self.user} cmd={self.command} target={self.target} "
            f"remote={self.remote} reply={reply} up={self.up} down={self.down} "
            f"time={duration:.3f}s end={self.end!r}"
        )


class Socks5Handler(BaseRequestHandler):
    """Serves one SOCKS5 client (RFC 1928, RFC 1929).

    Reads its settings from `server.settings` (a HandlerSettings), so a reload swaps one
    attribute and new connections see the new policy while old ones keep theirs.
    """

    def handle(self) -> None:
        settings: HandlerSettings = getattr(self.server, "settings", None) or HandlerSettings()
        session = Session(client=_format_peer(self.client_address))
        try:
            self.serve(settings, session)
        except (ClientGone, ConnectionError):
            session.end = "client closed during handshake"
        except HandshakeTimeout:
            session.end = "handshake timeout"
        except OSError as exc:
            session.end = f"error: {exc.strerror or exc}"
        finally:
            if session.reply is not Reply.SUCCEEDED:
                linger_close(self.request)
            access_logger.info("%s", session.log_line())

    def serve(self, settings: HandlerSettings, session: Session) -> None:
        reader = HandshakeReader(self.request, settings.handshake_timeout)
        try:
            if not self.negotiate(reader, settings.authenticator, session):
                return
            request = reader.read(parse_request, MAX_REQUEST_SIZE)
        except ProtocolError as exc:
            session.end = f"protocol error: {exc.message}"
            if exc.reply is not None:
                session.reply = exc.reply
                reader.send(encode_reply(exc.reply))
            return
        session.command = request.command.name
        session.target = str(request.address)
        if request.command is Command.CONNECT:
            self.connect(request, reader, settings, session)
        else:
            # BIND and UDP ASSOCIATE arrive in a later release.
            session.reply = Reply.COMMAND_NOT_SUPPORTED
            session.end = "command not supported"
            reader.send(encode_reply(Reply.COMMAND_NOT_SUPPORTED))

    def negotiate(self, reader: HandshakeReader, auth: Authenticator, session: Session) -> bool:
        """RFC 1928 §3 method selection, then RFC 1929 when that is the method."""
        greeting = reader.read(parse_greeting, MAX_GREETING_SIZE)
        method = auth.choose_method(greeting.methods)
        reader.send(encode_method_selection(method))
        if method is Method.NO_ACCEPTABLE_METHODS:
            session.end = "no acceptable method offered"
            return False
        if method is Method.USERNAME_PASSWORD:
            return self.authenticate(reader, auth, session)
        return True

    def authenticate(self, reader: HandshakeReader, auth: Authenticator, session: Session) -> bool:
        """RFC 1929 §2: a non-zero status means the connection must close."""
        credentials = reader.read(parse_username_password, MAX_USERNAME_PASSWORD_SIZE)
        session.user = credentials.username.decode("utf-8", "backslashreplace") or "''"
        if auth.check(credentials.username, credentials.password):
            reader.send(encode_auth_status(AuthStatus.SUCCESS))
            return True
        reader.send(encode_auth_status(AuthStatus.FAILURE))
        session.end = "authentication failed"
        return False

    def connect(
        self, request: Request, reader: HandshakeReader, settings: HandlerSettings, session: Session
    ) -> None:
        """RFC 1928 §4 CONNECT: reply with the outbound socket's address, then relay."""
        try:
            upstream = open_connection(request.address, settings.connect_timeout, settings.resolver)
        except ConnectFailed as exc:
            session.reply = exc.reply
            session.end = exc.reason
            reader.send(encode_reply(exc.reply))
            return
        with upstream:
            session.remote = _format_peer(upstream.getpeername())
            bound = Address.from_sockaddr(upstream.getsockname())
            session.reply = Reply.SUCCEEDED
            reader.send(encode_reply(Reply.SUCCEEDED, bound))
            pending = bytes(reader.buffer)
            reader.buffer.clear()
            result = relay(
                self.request,
                upstream,
                idle_timeout=settings.idle_timeout,
                pending_a_to_b=pending,
            )
            session.up, session.down = result.a_to_b, result.b_to_a
            closer = {"a": "client", "b": "target"}.get(result.closed_first, result.closed_first)
            session.end = f"{closer} {result.reason}"


def linger_close(sock: socket.socket, timeout: float = 1.0, limit: int = 65536) -> None:
    """Send FIN, then read and discard what the client still sends, briefly.

    Closing a socket with unread input makes the kernel send RST, which can destroy our
    last reply (05 FF, 01 01, an error code) in the client's buffer before it is read.
    """
    try:
        sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + timeout
        drained = 0
        while drained < limit and (remaining := deadline - time.monotonic()) > 0:
            sock.settimeout(remaining)
            chunk = sock.recv(4096)
            if not chunk:
                return
            drained += len(chunk)
    except OSError:
        pass


def _format_peer(sockaddr: Any) -> str:
    try:
        return str(Address.from_sockaddr(sockaddr))
    except (ValueError, TypeError, IndexError):
        return str(sockaddr)
