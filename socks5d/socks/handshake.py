"""The server side of one SOCKS5 (or SOCKS4/4a) handshake, as a state machine with no I/O.

In the manner of h11's ``Connection``: bytes go in (:meth:`ServerHandshake.receive`), and
what comes out is a list of :class:`Action` values for whoever drives it, a thread with
blocking reads or an event loop: bytes to send, credentials to check, a request to carry
out, a connection to close. The driver reports back what it did
(:meth:`~ServerHandshake.credentials_checked`, :meth:`~ServerHandshake.reply`) and gets
the next actions. Nothing here reads a socket, a clock or a file, so both ways of serving
a client run the same negotiation, and a connection handed from a loop to a thread is
this one object.

Owns: the PROXY protocol header a trusted load balancer sends first (when the listener
expects one; parsed by :mod:`socks5d.core.proxyheader`), RFC 1928 §3 method selection,
RFC 1929 §2 subnegotiation framing, the request (§4), every reply (§6) and the
access-log fields these settle. The first byte after any PROXY header decides the
dialect: 0x05 is SOCKS5, 0x04 a SOCKS4 or SOCKS4A request, which becomes the same
Dispatch(Request); its replies (VN 0, CD 90 or 91) are encoded here, never by a driver.
Policy (which method, whether SOCKS4 is served, whether credentials are right, whether a
destination is allowed) is asked of the :class:`~socks5d.policy.auth.Authenticator` passed
in or left to the driver. Imports only the wire format (and the PROXY header's parser
from the core), the session record and the authenticator.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..core.proxyheader import ProxyHeaderError, parse_proxy_header
from .protocol import (
    MAX_GREETING_SIZE,
    MAX_REQUEST_SIZE,
    MAX_SOCKS4_REQUEST_SIZE,
    MAX_USERNAME_PASSWORD_SIZE,
    SOCKS4_VERSION,
    Address,
    AuthStatus,
    Command,
    Method,
    ProtocolError,
    Reply,
    Request,
    Socks4Reply,
    encode_auth_status,
    encode_method_selection,
    encode_reply,
    encode_socks4_reply,
    parse_greeting,
    parse_request,
    parse_socks4_request,
    parse_username_password,
)
from .session import NO_OBSERVER, Session, SessionObserver

if TYPE_CHECKING:
    from ..policy.auth import Authenticator

__all__ = [
    "Action",
    "Authenticate",
    "Close",
    "Dispatch",
    "Proxied",
    "Send",
    "ServerHandshake",
    "State",
]


class State(enum.Enum):
    """Where a handshake stands; the driver acts on actions, not on states."""

    PROXY_HEADER = "proxy header"  # server.proxy_protocol on: waiting for the header
    READDRESSING = "readdressing"  # Proxied handed out: waiting for client_readdressed()
    GREETING = "greeting"  # waiting for VER NMETHODS METHODS
    LOGIN = "login"  # method 02 chosen: waiting for the RFC 1929 request
    CHECKING = "checking"  # Authenticate handed out: waiting for credentials_checked()
    REQUEST = "request"  # waiting for VER CMD RSV ATYP DST.ADDR DST.PORT
    COMMAND = "command"  # Dispatch handed out: waiting for reply()
    SOCKS4_REQUEST = "socks4 request"  # first byte 04: VN CD DSTPORT DSTIP USERID NULL [NAME NULL]
    BIND_WAIT = "bind wait"  # BIND's first reply sent: waiting for the second
    ESTABLISHED = "established"  # success sent: relay (or UDP control) from here on
    CLOSED = "closed"  # a final answer (or none) given: close the connection


@dataclass(frozen=True, slots=True)
class Send:
    """Send these bytes to the client, whole, before the next action."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Authenticate:
    """Check these RFC 1929 credentials; answer with credentials_checked()."""

    username: bytes
    password: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class Dispatch:
    """Carry out this request (rules, resolving, connecting); answer with reply()."""

    request: Request


@dataclass(frozen=True, slots=True)
class Close:
    """The handshake is over without a tunnel: close the connection (after any Send)."""

    reason: str


@dataclass(frozen=True, slots=True)
class Proxied:
    """A trusted balancer's PROXY header named the real client: serve the connection as
    that client's from now on (its per-address slot, rules, back-off); answer with
    client_readdressed(). ``balancer`` is the connection's peer, that sent the header."""

    client: tuple[str, int]
    balancer: str


Action = Send | Authenticate | Dispatch | Close | Proxied

# The most bytes a state may hold without a whole message (each message's upper bound).
_LIMITS = {
    State.GREETING: MAX_GREETING_SIZE,
    State.LOGIN: MAX_USERNAME_PASSWORD_SIZE,
    State.REQUEST: MAX_REQUEST_SIZE,
    State.SOCKS4_REQUEST: MAX_SOCKS4_REQUEST_SIZE,
}


def _socks4_reply(reply: Reply, bound: Address | None = None) -> bytes:
    """A reply in the SOCKS4 dialect: CD 90 for success, 91 for every failure."""
    return encode_socks4_reply(Socks4Reply.for_reply(reply), bound)


class ServerHandshake:
    """One client's SOCKS5 negotiation, from greeting to the reply that ends it.

    ``authenticator`` chooses the method (and so whether a login is required);
    ``session`` is the access-log record the handshake fills in (user, command, target,
    reply, how it ended). The settings a connection began under travel with this object:
    a reload does not change its policy halfway through.
    """

    __slots__ = (
        "authenticator",
        "buffer",
        "encode_reply",
        "login_name",
        "observer",
        "proxy_protocol",
        "request",
        "session",
        "state",
        "user",
    )

    def __init__(
        self,
        authenticator: Authenticator,
        session: Session,
        proxy_protocol: str | None = None,
        observer: SessionObserver = NO_OBSERVER,
    ) -> None:
        """`proxy_protocol`: "v1", "v2" or "any" when a PROXY protocol header must come
        first (server.proxy_protocol); None (the default, "off"): SOCKS from the first byte."""
        self.authenticator = authenticator
        self.session = session
        self.observer = observer  # told of the request, its reply and failed logins
        if proxy_protocol is None:
            self.state = State.GREETING
        else:
            self.state = State.PROXY_HEADER
            self.proxy_protocol = proxy_protocol
        # Replies in the client's dialect (RFC 1928 §6 until a SOCKS4 request says otherwise).
        self.encode_reply = encode_reply
        self.buffer = bytearray()
        self.request: Request | None = None
        self.user: str | None = None  # the login name once RFC 1929 succeeded
        self.login_name = ""  # the name being checked

    @property
    def replies_carry_ipv6(self) -> bool:
        """False for a SOCKS4 client: its replies hold an IPv4 address only."""
        return self.session.proto == "socks5"

    # ---- bytes in ----

    def receive(self, data: bytes) -> list[Action]:
        """Take bytes from the client; the actions they call for ([] : need more data).

        Bytes that arrive while the driver is busy (checking credentials, carrying out the
        request) are kept: a client may pipeline its request behind its login, and its
        first payload behind its request (that is :meth:`early_data`).
        """
        if self.state is State.CLOSED or not data:
            return []
        self.buffer += data
        return self._advance()

    def eof(self) -> list[Action]:
        """The client closed its side before the handshake was complete."""
        if self.state in (State.ESTABLISHED, State.CLOSED):
            return []
        return self._close("client closed during handshake", closed_by="client")

    def timed_out(self) -> list[Action]:
        """The handshake deadline passed (the driver keeps the clock)."""
        if self.state in (State.ESTABLISHED, State.CLOSED):
            return []
        return self._close("handshake timeout")

    def early_data(self) -> bytes:
        """Bytes the client sent after its request: the first of the tunnel's payload."""
        data = bytes(self.buffer)
        self.buffer.clear()
        return data

    def untrusted_source(self) -> list[Action]:
        """The connection comes from outside server.proxy_trusted while a PROXY header is
        expected: close before reading a byte, so no client can claim another's address."""
        self._expect(State.PROXY_HEADER)
        return self._close("PROXY header expected from an untrusted address (proxy_trusted)")

    # ---- the driver's answers ----

    def client_readdressed(self, ok: bool, reason: str = "") -> list[Action]:
        """The outcome of a Proxied: on to the greeting as the header's client, or (the
        client is at a per-address cap) close with `reason` in the log."""
        self._expect(State.READDRESSING)
        if not ok:
            return self._close(reason or "client refused")
        self.state = State.GREETING
        return self._advance()

    def credentials_checked(self, ok: bool, reason: str = "authentication failed") -> list[Action]:
        """The outcome of an Authenticate: RFC 1929 §2 status, then on to the request;
        `reason` says in the log why a login failed (a wrong password, or no check run)."""
        self._expect(State.CHECKING)
        if not ok:
            self.state = State.CLOSED
            self.session.end = reason
            self.session.closed_by = "proxy"
            self.observer.login_failed(self.session)
            return [Send(encode_auth_status(AuthStatus.FAILURE)), Close(reason)]
        self.user = self.login_name
        self.state = State.REQUEST
        return [Send(encode_auth_status(AuthStatus.SUCCESS)), *self._advance()]

    def reply(self, reply: Reply, bound: Address | None = None, reason: str = "") -> list[Action]:
        """Answer the dispatched request (RFC 1928 §6).

        Success establishes the tunnel, except BIND's first reply (``bind_listening``);
        any other code closes the connection with ``reason`` in the log.
        """
        if self.state is not State.COMMAND and self.state is not State.BIND_WAIT:
            self._expect(State.COMMAND, State.BIND_WAIT)  # raises (inline: a hot path)
        self.session.reply = reply
        self.observer.replied(self.session)
        if reply is Reply.SUCCEEDED:
            self.state = State.ESTABLISHED
            return [Send(self.encode_reply(reply, bound))]
        self.state = State.CLOSED
        self.session.end = reason or f"reply {reply:02x}"
        self.session.closed_by = "proxy"
        return [Send(self.encode_reply(reply, bound)), Close(self.session.end)]

    def bind_listening(self, bound: Address) -> list[Action]:
        """BIND's first reply (RFC 1928 §4; SOCKS4 "BIND"): where the peer must connect;
        the second reply (who did, or a failure) comes with :meth:`reply`."""
        self._expect(State.COMMAND)
        if self.request is None or self.request.command is not Command.BIND:
            raise RuntimeError("bind_listening() answers a BIND request only")
        self.state = State.BIND_WAIT
        return [Send(self.encode_reply(Reply.SUCCEEDED, bound))]

    # ---- the steps ----

    def _advance(self) -> list[Action]:
        try:
            if self.state is State.GREETING:
                return self._greeting()
            if self.state is State.LOGIN:
                return self._login()
            if self.state is State.REQUEST:
                return self._request()
            if self.state is State.SOCKS4_REQUEST:
                return self._socks4_request()
            if self.state is State.PROXY_HEADER:
                return self._proxy_header()
        except ProtocolError as exc:
            return self._refuse(exc)
        except ProxyHeaderError as exc:
            return self._close(f"bad PROXY header: {exc}")
        # READDRESSING, CHECKING, COMMAND, BIND_WAIT, ESTABLISHED: bytes wait in the buffer
        return []

    def _proxy_header(self) -> list[Action]:
        """The PROXY protocol header (haproxy doc/proxy-protocol.txt) before any SOCKS
        byte; the parser bounds its size, the driver's deadline its time."""
        parsed = parse_proxy_header(self.buffer, self.proxy_protocol)
        if parsed is None:
            return []
        header, used = parsed
        del self.buffer[:used]
        session = self.session
        balancer = session.client
        session.balancer = balancer
        if header.source is None:
            # v2 LOCAL (a health check), v1 UNKNOWN, v2 UNSPEC/UNIX: §2.1/§2.2 say to use
            # the connection's own addresses, so the balancer is the client.
            self.state = State.GREETING
            return self._advance() if self.buffer else []
        session.client = str(Address.from_sockaddr(header.source))
        self.state = State.READDRESSING
        return [Proxied(header.source, balancer)]

    def _greeting(self) -> list[Action]:
        # The first byte decides the dialect (none yet: a PROXY header came alone).
        if self.buffer and self.buffer[0] == SOCKS4_VERSION:
            return self._begin_socks4()
        parsed = parse_greeting(self.buffer)
        if parsed is None:
            return self._need_more()
        greeting, used = parsed
        del self.buffer[:used]
        method = self.authenticator.choose_method(greeting.methods)
        send = Send(encode_method_selection(method))
        if method is Method.NO_ACCEPTABLE_METHODS:
            # RFC 1928 §3: X'FF', and the client must close the connection.
            return [send, *self._close("no acceptable method offered")]
        # What follows may be pipelined behind the greeting: parse it now, under its own
        # error handling, so the method's answer is sent even if that message is bad.
        self.state = State.LOGIN if method is Method.USERNAME_PASSWORD else State.REQUEST
        if not self.buffer:  # the usual case: the client waits for the answer
            return [send]
        return [send, *self._advance()]

    def _login(self) -> list[Action]:
        parsed = parse_username_password(self.buffer)
        if parsed is None:
            return self._need_more()
        credentials, used = parsed
        del self.buffer[:used]
        self.login_name = credentials.username.decode("utf-8", "backslashreplace")
        self.session.user = self.login_name or "''"
        self.state = State.CHECKING
        return [Authenticate(credentials.username, credentials.password)]

    def _request(self) -> list[Action]:
        parsed = parse_request(self.buffer)
        if parsed is None:
            return self._need_more()
        request, used = parsed
        del self.buffer[:used]
        self.request = request
        self.session.command = request.command.name
        self.session.target = str(request.address)
        self.state = State.COMMAND
        self.observer.dispatched(self.session)
        return [Dispatch(request)]

    def _begin_socks4(self) -> list[Action]:
        """A SOCKS4 or SOCKS4A request in place of a greeting: no methods, no login;
        every reply from here on is SOCKS4's."""
        self.state = State.SOCKS4_REQUEST
        self.encode_reply = _socks4_reply
        self.session.proto = "socks4"
        return self._socks4_request()

    def _socks4_request(self) -> list[Action]:
        parsed = parse_socks4_request(self.buffer)
        if parsed is None:
            return self._need_more()
        socks4, used = parsed
        del self.buffer[:used]
        session = self.session
        session.proto = "socks4a" if socks4.is_4a else "socks4"
        session.userid = socks4.userid.decode("utf-8", "backslashreplace")
        request = Request(socks4.command, socks4.address)
        self.request = request
        session.command = request.command.name
        session.target = str(request.address)
        self.state = State.COMMAND
        self.observer.dispatched(session)
        # Allowed or not by the settings the connection began under (its authenticator).
        refusal = self.authenticator.socks4_refusal()
        if refusal is not None:
            return self.reply(Reply.CONNECTION_NOT_ALLOWED, reason=refusal)
        return [Dispatch(request)]

    def _need_more(self) -> list[Action]:
        limit = _LIMITS[self.state]
        if len(self.buffer) >= limit:  # cannot happen with a well-formed prefix; be sure
            return self._refuse(ProtocolError(f"message longer than {limit} bytes"))
        return []

    def _refuse(self, exc: ProtocolError) -> list[Action]:
        """A malformed message: the reply it carries (a request's 07 or 08), then close."""
        actions: list[Action] = []
        if exc.reply is not None:
            self.session.reply = exc.reply
            actions.append(Send(self.encode_reply(exc.reply)))
        return [*actions, *self._close(f"protocol error: {exc.message}")]

    def _close(self, reason: str, closed_by: str = "proxy") -> list[Action]:
        self.state = State.CLOSED
        self.session.end = reason
        self.session.closed_by = closed_by
        return [Close(reason)]

    def _expect(self, *states: State) -> None:
        if self.state not in states:
            raise RuntimeError(f"not expected in state {self.state.value!r}")
