"""Socks5Handler: one client connection, from greeting to the end of its tunnel.

A linear negotiation with one method per phase (greeting → method choice → RFC 1929
auth → request → command), reading the stream through a buffer so a message may arrive
in any number of pieces and bytes pipelined after the request reach the target. Wire
format lives in protocol.py, policy in auth.py, connecting in outbound.py, moving bytes
in relay.py; this module only sequences them and writes the access log line.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import math
import select
import socket
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .addresses import canonical_ip, client_ip, unmapped_host
from .auth import Authenticator
from .bind import ClientLeft, expected_peer_ips, open_bind_listener, wait_for_peer
from .config import Config
from .lookups import LookupPool
from .outbound import (
    ANY_SOURCE,
    ConnectFailed,
    OutgoingAddresses,
    Resolver,
    SockAddr,
    connect_any,
    reply_for_error,
    resolve_target,
    system_resolver,
)
from .protocol import (
    MAX_GREETING_SIZE,
    MAX_REQUEST_SIZE,
    MAX_USERNAME_PASSWORD_SIZE,
    Address,
    AddressType,
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
from .relay import RelayResult, fix_socket_buffers, relay, socket_buffer_for
from .rules import Decision, Policy
from .server import BaseRequestHandler
from .session import Session
from .throttle import NO_WAIT, CheckGate, FailedLoginBackoff
from .udp import open_udp_endpoint, serve_association

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
    resolve_timeout: float = 10.0  # each name lookup (CONNECT, BIND, UDP destinations)
    idle_timeout: float | None = 3600.0
    bind_timeout: float = 60.0
    attempt_delay: float = 0.25
    udp_idle_timeout: float | None = 120.0
    udp_port_range: tuple[int, int] | None = None
    outgoing: OutgoingAddresses = ANY_SOURCE
    resolver: Resolver = system_resolver
    lookups: LookupPool | None = None  # None: the process-wide pool (lookups.LOOKUPS)
    policy: Policy | None = None  # None: every destination allowed (tests, embedding)
    socket_buffer: int | str = "auto"  # server.socket_buffer (see relay.socket_buffer_for)

    @classmethod
    def from_config(
        cls, config: Config, listening: Iterable[tuple[str, int]] = ()
    ) -> HandlerSettings:
        """`listening`: the bound (host, port) addresses, for the rules' loop guard."""
        timeouts = config.timeouts
        return cls(
            authenticator=Authenticator.from_users(config.users, config.source),
            handshake_timeout=timeouts.handshake,
            connect_timeout=timeouts.connect,
            resolve_timeout=timeouts.resolve,
            idle_timeout=timeouts.idle or None,
            bind_timeout=timeouts.bind,
            attempt_delay=timeouts.connect_attempt_delay,
            udp_idle_timeout=timeouts.udp_idle or None,
            udp_port_range=config.udp.port_range,
            outgoing=OutgoingAddresses(
                config.server.outgoing_for(4), config.server.outgoing_for(6)
            ),
            policy=Policy.from_config(config, listening),
            socket_buffer=config.server.socket_buffer,
        )


DEFAULTS = HandlerSettings()


@dataclass(slots=True)
class Resume:
    """Where a handshake begun elsewhere (the relay hub's fast path) stands, for a
    handler thread to carry on from: the start of `stage`, with the bytes read so far.

    Stages: "greeting" (nothing answered yet), "request" (method NO AUTHENTICATION
    REQUIRED answered), "command" (`request` parsed, nothing answered), "failed"
    (`request` parsed and its connect failed: send `failure` and close).
    """

    stage: str
    buffer: bytes
    deadline: float
    session: Session
    # The settings the handshake began under: one connection is judged by one policy
    # from greeting to reply, whatever a reload swapped in meanwhile.
    settings: HandlerSettings
    request: Request | None = None
    failure: ConnectFailed | None = None


class ClientGone(Exception):
    """The client closed its side before the handshake was complete."""


class HandshakeTimeout(Exception):
    """The client did not complete the handshake within the handshake timeout."""


class HandshakeReader:
    """Reads whole messages off a stream socket under one overall deadline.

    A deadline (not a per-recv timeout) so a client trickling a byte at a time cannot
    hold its thread past the handshake timeout. The socket is made non-blocking once and
    every recv/send is tried first, with a poll only when it would block: a socket timeout
    would cost a settimeout() per message and a poll() before every call (each a syscall
    that also hands the GIL to another thread). The socket stays non-blocking afterwards;
    the relay and the BIND/UDP paths work with it as it is.
    """

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        self.sock = sock
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        self.buffer = bytearray()
        self.poller: select.poll | None = None  # made on the first wait
        sock.setblocking(False)

    def send_reply(self, reply: Reply, bound: Address | None = None) -> None:
        """Send an RFC 1928 §6 reply with a fresh deadline.

        Replies follow a connect or a BIND wait that may outlast the handshake deadline;
        the client still gets `timeout` seconds to take the reply.
        """
        self.deadline = time.monotonic() + self.timeout
        self.send(encode_reply(reply, bound))

    def read(self, parser: Parser[Message], limit: int) -> Message:
        while True:
            parsed = parser(self.buffer)
            if parsed is not None:
                message, consumed = parsed
                del self.buffer[:consumed]
                return message
            if len(self.buffer) >= limit:
                raise ProtocolError(f"message longer than {limit} bytes")
            try:
                chunk = self.sock.recv(4096)
            except BlockingIOError:
                self._wait(select.POLLIN)
                continue
            if not chunk:
                raise ClientGone
            self.buffer += chunk

    def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                sent = self.sock.send(view)
            except BlockingIOError:
                self._wait(select.POLLOUT)
                continue
            view = view[sent:]

    def _wait(self, event: int) -> None:
        """Wait until the socket is ready for `event` (or has an error or EOF to report,
        which the retried call then raises or returns); HandshakeTimeout at the deadline."""
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise HandshakeTimeout
        if self.poller is None:
            self.poller = select.poll()
            self.poller.register(self.sock, event)
        else:
            self.poller.modify(self.sock, event)
        if not self.poller.poll(math.ceil(remaining * 1000)):
            raise HandshakeTimeout


class Socks5Handler(BaseRequestHandler):
    """Serves one SOCKS5 client (RFC 1928, RFC 1929).

    Reads its settings from `server.settings` (a HandlerSettings), so a reload swaps one
    attribute and new connections see the new policy while old ones keep theirs. State
    that outlives a reload (login back-off, per-user slots) lives on the server too.
    """

    def setup(self) -> None:
        self.settings: HandlerSettings = getattr(self.server, "settings", None) or DEFAULTS
        self.client_ip = client_ip(self.client_address)
        resumes = getattr(self.server, "resumes", None)
        self.resume: Resume | None = resumes.pop(self.request, None) if resumes else None
        if self.resume is not None:
            self.settings = self.resume.settings  # not a reload's: see Resume.settings
            self.session = self.resume.session
        else:
            self.session = Session(client=format_peer(self.client_address))
        self.user: str | None = None  # set once RFC 1929 login succeeded
        self.user_slot = False
        # True once the tunnel went to the server's relay hub: the hub ends it (and logs).
        self.detached = False

    def handle(self) -> None:
        session = self.session
        try:
            self.serve(session)
        except (ClientGone, ConnectionError):
            session.end = "client closed during handshake"
            session.closed_by = "client"
        except HandshakeTimeout:
            session.end = "handshake timeout"
            session.closed_by = "proxy"
        except OSError as exc:
            session.end = f"error: {exc.strerror or exc}"
        finally:
            if not self.detached:
                self.conclude()

    def conclude(self) -> None:
        """The end of every connection: free its user slot, write its access line."""
        if self.user_slot and self.user is not None:
            slots = getattr(self.server, "user_slots", None)
            if slots is not None:
                slots.release(self.user)
        conclude_session(self.request, self.session)

    def serve(self, session: Session) -> None:
        settings = self.settings
        reader = HandshakeReader(self.request, settings.handshake_timeout)
        resume, stage = self.resume, "greeting"
        if resume is not None:
            reader.buffer += resume.buffer
            reader.deadline = resume.deadline
            stage = resume.stage
        try:
            if stage == "greeting" and not self.negotiate(reader, settings.authenticator, session):
                return
            if stage in ("greeting", "request"):
                request = reader.read(parse_request, MAX_REQUEST_SIZE)
            else:
                assert resume is not None and resume.request is not None
                request = resume.request
        except ProtocolError as exc:
            session.end = f"protocol error: {exc.message}"
            session.closed_by = "proxy"
            if exc.reply is not None:
                session.reply = exc.reply
                reader.send_reply(exc.reply)
            return
        session.command = request.command.name
        session.target = str(request.address)
        if resume is not None and resume.failure is not None:
            self.fail(reader, session, resume.failure.reply, resume.failure.reason)
            return
        if self.user is not None and not self.take_user_slot(self.user):
            self.fail(reader, session, Reply.GENERAL_FAILURE, "per-user connection limit")
            return
        if request.command is Command.CONNECT:
            self.connect(request, reader, session)
        elif request.command is Command.BIND:
            self.bind(request, reader, session)
        else:
            self.udp_associate(request, reader, session)

    def negotiate(self, reader: HandshakeReader, auth: Authenticator, session: Session) -> bool:
        """RFC 1928 §3 method selection, then RFC 1929 when that is the method."""
        greeting = reader.read(parse_greeting, MAX_GREETING_SIZE)
        method = auth.choose_method(greeting.methods)
        reader.send(encode_method_selection(method))
        if method is Method.NO_ACCEPTABLE_METHODS:
            session.end = "no acceptable method offered"
            session.closed_by = "proxy"
            return False
        if method is Method.USERNAME_PASSWORD:
            return self.authenticate(reader, auth, session)
        return True

    def authenticate(self, reader: HandshakeReader, auth: Authenticator, session: Session) -> bool:
        """RFC 1929 §2: a non-zero status means the connection must close.

        Credentials that logged in moments ago pass at once. Others are checked in
        their turn: after this client's failed-login back-off (FailedLoginBackoff) and
        within the bound on checks running at once (CheckGate), both before the
        handshake deadline, else refused with status 01 and no check.
        """
        credentials = reader.read(parse_username_password, MAX_USERNAME_PASSWORD_SIZE)
        name = credentials.username.decode("utf-8", "backslashreplace")
        session.user = name or "''"
        username, password = credentials.username, credentials.password
        backoff = getattr(self.server, "login_backoff", None)
        if auth.remembers(username, password):
            failure = None
            if backoff is not None:
                backoff.succeeded(self.client_ip, username)
        else:
            failure = self.check_in_turn(auth, username, password, reader.deadline)
        if failure is None:
            reader.send(encode_auth_status(AuthStatus.SUCCESS))
            self.user = name
            return True
        reader.send(encode_auth_status(AuthStatus.FAILURE))
        session.end = failure
        session.closed_by = "proxy"
        return False

    def check_in_turn(
        self,
        auth: Authenticator,
        username: bytes,
        password: bytes,
        deadline: float,
    ) -> str | None:
        """Run the password check when this client's back-off turn has come and a check
        slot is free, without a check when either is past `deadline`. None: logged in;
        else why not, for the access log."""
        backoff: FailedLoginBackoff | None = getattr(self.server, "login_backoff", None)
        gate: CheckGate | None = getattr(self.server, "check_gate", None)
        while True:
            turn = NO_WAIT if backoff is None else backoff.book(self.client_ip, username, deadline)
            if turn is None:
                return "login refused unchecked: back-off turn after the deadline"
            if turn.wait:
                time.sleep(turn.wait)
            with gate.slot(deadline) if gate is not None else nullcontext(True) as admitted:
                if not admitted:
                    return "login refused unchecked: password checks busy"
                if backoff is not None and backoff.overtaken(self.client_ip, username, turn):
                    continue  # a failure landed while this one waited: take a later turn
                ok = auth.verify(username, password)
            if backoff is not None:
                (backoff.succeeded if ok else backoff.failed)(self.client_ip, username)
            return None if ok else "authentication failed"

    def take_user_slot(self, user: str) -> bool:
        slots = getattr(self.server, "user_slots", None)
        if slots is None:
            return True
        self.user_slot = slots.acquire(user)
        return self.user_slot

    def check(
        self, command: str, host: str | None, ip: str | None, port: int | None
    ) -> Decision | None:
        """The access decision for one destination; None when no policy is set."""
        policy = self.settings.policy
        if policy is None:
            return None
        return policy.check(self.client_ip, self.user, command, host, ip, port)

    def allowed_by_name(self, command: str, address: Address, session: Session) -> bool:
        """Rules that deny a name whatever it resolves to, before any DNS lookup: the
        name must not leak to DNS, and the client gets 02, not a resolver error."""
        if address.type is not AddressType.DOMAINNAME:
            return True
        decision = self.check(command, address.host, None, address.port)
        if decision is None or decision.allowed:
            return True
        session.rule = decision.reason
        return False

    def allowed_candidates(
        self, command: str, address: Address, candidates: list[SockAddr], session: Session
    ) -> list[SockAddr]:
        """Keep the resolved addresses the rules allow; a name is checked address by address
        (a name that resolves to 127.0.0.1 is caught like the literal)."""
        host = address.host if address.type is AddressType.DOMAINNAME else None
        allowed: list[SockAddr] = []
        for family, sockaddr in candidates:
            decision = self.check(command, host, canonical_ip(sockaddr[0]), address.port)
            if decision is None or decision.allowed:
                allowed.append((family, sockaddr))
            elif session.rule == "-":
                session.rule = decision.reason
        return allowed

    def resolve(self, address: Address) -> list[SockAddr]:
        """The target's addresses, a name looked up within the resolve timeout on the
        bounded lookup threads; ConnectFailed (04) when it fails, times out or no lookup
        thread is free."""
        settings = self.settings
        return resolve_target(
            address,
            settings.resolver,
            timeout=settings.resolve_timeout,
            lookups=settings.lookups,
        )

    def connect(self, request: Request, reader: HandshakeReader, session: Session) -> None:
        """RFC 1928 §4 CONNECT: reply with the outbound socket's address, then relay."""
        settings = self.settings
        if not self.allowed_by_name("connect", request.address, session):
            self.deny(reader, session)
            return
        try:
            candidates = self.resolve(request.address)
            allowed = self.allowed_candidates("connect", request.address, candidates, session)
            if not allowed:
                self.deny(reader, session)
                return
            upstream = connect_any(
                allowed,
                settings.connect_timeout,
                attempt_delay=settings.attempt_delay,
                outgoing=settings.outgoing,
                blocking=False,  # the relay wants it non-blocking
            )
        except ConnectFailed as exc:
            self.fail(reader, session, exc.reply, exc.reason)
            return
        try:
            session.resolved = format_peer(upstream.getpeername())
            bound = Address.from_sockaddr(upstream.getsockname())
            session.egress = str(bound)
            session.reply = Reply.SUCCEEDED
            reader.send_reply(Reply.SUCCEEDED, bound)
            self.tunnel(upstream, reader, session)
        finally:
            if not self.detached:
                upstream.close()

    def bind(self, request: Request, reader: HandshakeReader, session: Session) -> None:
        """RFC 1928 §4 BIND: first reply with where to connect, second with who did."""
        settings = self.settings
        if not self.allowed_by_name("bind", request.address, session):
            self.deny(reader, session)
            return
        try:
            candidates = self.resolve(request.address)
        except ConnectFailed as exc:
            self.fail(reader, session, exc.reply, exc.reason)
            return
        candidates = self.allowed_candidates("bind", request.address, candidates, session)
        if not candidates:
            self.deny(reader, session)
            return
        resolved = [sockaddr[0] for _, sockaddr in candidates]
        expected = expected_peer_ips(request.address, resolved)
        # An all-zero DST gives no route to look up: listen where the client reached us.
        routable = [ip for ip in resolved if not ipaddress.ip_address(ip).is_unspecified]
        try:
            listener = open_bind_listener(
                routable or [unmapped_host(self.request.getsockname()[0])], settings.outgoing
            )
        except OSError as exc:
            self.fail(reader, session, reply_for_error(exc), f"bind failed: {exc}")
            return
        with listener:
            bound = Address.from_sockaddr(listener.getsockname())
            session.egress = str(bound)
            reader.send_reply(Reply.SUCCEEDED, bound)
            try:
                accepted = wait_for_peer(listener, self.request, expected, settings.bind_timeout)
            except ClientLeft:
                session.end = "client closed while waiting for the BIND peer"
                session.closed_by = "client"
                return
        if accepted is None:
            # Nobody (expected) connected in time: the same code as a connect timeout.
            self.fail(reader, session, Reply.HOST_UNREACHABLE, "no BIND peer before the timeout")
            return
        try:
            session.resolved = str(accepted.peer)
            session.reply = Reply.SUCCEEDED
            reader.send_reply(Reply.SUCCEEDED, accepted.peer)
            self.tunnel(accepted.sock, reader, session)
        finally:
            if not self.detached:
                accepted.sock.close()

    def udp_associate(self, request: Request, reader: HandshakeReader, session: Session) -> None:
        """RFC 1928 §7: a UDP relay that lives exactly as long as this TCP connection."""
        settings = self.settings
        # The association itself: client, user and command (destinations come per datagram).
        decision = self.check("udp", None, None, None)
        if decision is not None and not decision.allowed:
            session.rule = decision.reason
            self.deny(reader, session)
            return
        local_ip = unmapped_host(self.request.getsockname()[0])
        try:
            endpoint = open_udp_endpoint(local_ip, settings.udp_port_range)
        except OSError as exc:
            self.fail(reader, session, Reply.GENERAL_FAILURE, f"no UDP port: {exc}")
            return
        bound = Address.from_sockaddr(endpoint.getsockname())
        session.egress = str(bound)
        session.reply = Reply.SUCCEEDED
        try:
            reader.send_reply(Reply.SUCCEEDED, bound)
        except BaseException:
            endpoint.close()
            raise
        stats = serve_association(
            self.request,
            endpoint,
            self.client_ip,
            request.address,
            idle_timeout=settings.udp_idle_timeout,
            outgoing=settings.outgoing,
            resolver=settings.resolver,
            resolve_timeout=settings.resolve_timeout,
            lookups=settings.lookups,
            allow=self.allow_datagram if settings.policy is not None else None,
        )
        session.up, session.down = stats.bytes_up, stats.bytes_down
        session.closed_by = "client" if stats.end == "control closed" else "proxy"
        session.end = (
            f"{stats.end} (datagrams up={stats.datagrams_up} down={stats.datagrams_down}"
            f" dropped={stats.dropped})"
        )

    def allow_datagram(self, address: Address, sockaddr: tuple[Any, ...] | None) -> bool:
        """Rules for each UDP destination, as for CONNECT (sockaddr None: the name alone,
        before it is resolved)."""
        host = address.host if address.type is AddressType.DOMAINNAME else None
        ip = canonical_ip(sockaddr[0]) if sockaddr is not None else None
        decision = self.check("udp", host, ip, address.port)
        return decision is None or decision.allowed

    def tunnel(self, upstream: socket.socket, reader: HandshakeReader, session: Session) -> None:
        """Relay between the client and `upstream`; pipelined client bytes go first.

        With a relay hub on the server (threading mode), the tunnel goes there and this
        thread returns to the pool; the hub calls tunnel_ended. Else it is relayed here.
        """
        pending = bytes(reader.buffer)
        reader.buffer.clear()
        size_tunnel_buffers(
            self.settings,
            self.request,
            self.client_address,
            upstream,
            None,
            getattr(self.server, "active_count", 1),
        )
        idle_timeout = self.settings.idle_timeout
        hub = getattr(self.server, "relay_hub", None)
        detach = getattr(self.server, "detach_request", None)
        if hub is not None and detach is not None:
            finish = detach(self.request)
            self.detached = True
            try:
                hub.add(
                    self.request,
                    upstream,
                    functools.partial(self.tunnel_ended, upstream, finish),
                    idle_timeout=idle_timeout,
                    pending_a_to_b=pending,
                )
                return
            except Exception as exc:  # closed as the daemon stops, or out of descriptors
                logger.debug("relay hub refused a tunnel (%s): relaying in the thread", exc)
                self.detached = False
                self.server.reclaim_request(self.request)  # type: ignore[attr-defined]
        result = relay(self.request, upstream, idle_timeout=idle_timeout, pending_a_to_b=pending)
        self.record(result)

    def record(self, result: RelayResult) -> None:
        record_relay(self.session, result)

    def tunnel_ended(
        self, upstream: socket.socket, finish: Callable[[], None], result: RelayResult
    ) -> None:
        """The hub's on_done (in its thread): what handle() and the core do inline."""
        try:
            upstream.close()
            self.record(result)
            self.conclude()
        finally:
            finish()

    def deny(self, reader: HandshakeReader, session: Session) -> None:
        """RFC 1928 §6 reply 02: a rule said no (named in the access log)."""
        self.fail(reader, session, Reply.CONNECTION_NOT_ALLOWED, f"denied by {session.rule}")

    @staticmethod
    def fail(reader: HandshakeReader, session: Session, reply: Reply, reason: str) -> None:
        """Send a failure reply; the connection closes right after (RFC 1928 §6)."""
        session.reply = reply
        session.end = reason
        session.closed_by = "proxy"
        reader.send_reply(reply)


def size_tunnel_buffers(
    settings: HandlerSettings,
    client: socket.socket,
    client_address: Any,
    upstream: socket.socket,
    upstream_ip: str | None,
    connections: int,
) -> None:
    """Fix the socket buffers of a new tunnel as server.socket_buffer says, each by its
    peer (``upstream_ip`` None: asked of the socket) and the ``connections`` open."""
    setting = settings.socket_buffer
    if setting == 0:
        return
    size = socket_buffer_for(setting, client_ip(client_address), connections)
    fix_socket_buffers(client, size)
    if upstream_ip is None:
        try:
            upstream_ip = str(upstream.getpeername()[0])
        except OSError:
            return  # reset already: the relay will see it
    fix_socket_buffers(upstream, socket_buffer_for(setting, upstream_ip, connections))


def record_relay(session: Session, result: RelayResult) -> None:
    """Put a finished tunnel's byte counts and ending into its access record."""
    session.up, session.down = result.a_to_b, result.b_to_a
    closer = {"a": "client", "b": "target"}.get(result.closed_first, result.closed_first)
    session.closed_by = closer
    session.end = f"{closer} {result.reason}"


def conclude_session(client: socket.socket, session: Session, *, linger: bool = True) -> None:
    """Close out a connection that failed before its tunnel (linger), write its line.

    ``linger=False`` for an event loop, which must not wait on one client: it has no
    failure reply to protect (the handler thread sends those).
    """
    if linger and session.reply is not Reply.SUCCEEDED:
        linger_close(client)
    if access_logger.isEnabledFor(logging.INFO):
        # The record carries the session; the line (or JSON) is built only by a handler
        # that emits it.
        access_logger.info("%s", session, extra={"access": session})


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


def format_peer(sockaddr: Any) -> str:
    """A socket address as the access log writes it."""
    try:
        return str(Address.from_sockaddr(sockaddr))
    except (ValueError, TypeError, IndexError):
        return str(sockaddr)
