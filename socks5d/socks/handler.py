"""Socks5Handler: one client connection in a thread, from greeting to the end of its tunnel.

The negotiation itself is :class:`~socks5d.socks.handshake.ServerHandshake` (no I/O); this
module drives it with blocking reads under one deadline, carries out what it asks for
(checking a login in its turn, a request's rules, lookup and connect, BIND, UDP
ASSOCIATE) and writes the access-log line. A handshake an event loop began arrives as a
:class:`Negotiation` and carries on exactly where the loop left it. Wire format lives in
protocol.py, policy in auth.py and rules.py, connecting in outbound.py, moving bytes in
relay.py.
"""

from __future__ import annotations

import collections
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
from typing import Any, Protocol

from ..core.addresses import (
    IPAddress,
    canonical_ip,
    client_ip,
    format_address,
    parse_ip,
    unmapped,
    unmapped_host,
)
from ..core.relay import RelayResult, fix_socket_buffers, relay, socket_buffer_for
from ..core.server import BaseRequestHandler
from ..ops.config import Config, Upstream
from ..policy.auth import Authenticator
from ..policy.limits import UserSlots
from ..policy.rules import Decision, Policy
from ..policy.throttle import NO_WAIT, CheckGate, FailedLoginBackoff
from .bind import ClientLeft, expected_peer_ips, open_bind_listener, wait_for_peer
from .handshake import Action, Authenticate, Dispatch, Proxied, Send, ServerHandshake
from .lookups import LookupPool
from .outbound import (
    ANY_SOURCE,
    ConnectFailed,
    OutgoingAddresses,
    Resolver,
    SockAddr,
    connect_any,
    numeric_host,
    reply_for_error,
    resolve_target,
    system_resolver,
)
from .protocol import Address, AddressType, Command, Reply, Request
from .session import NO_OBSERVER, Session, SessionObserver
from .udp import open_udp_endpoint, serve_association
from .upstream import ParentFailed, open_via_parent

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("socks5d.access")


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
    # server.proxy_protocol ("v1", "v2", "any"; None: off) and the balancers trusted to
    # send the header (server.proxy_trusted).
    proxy_protocol: str | None = None
    proxy_trusted: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    @classmethod
    def from_config(
        cls, config: Config, listening: Iterable[tuple[str, int]] = ()
    ) -> HandlerSettings:
        """`listening`: the bound (host, port) addresses, for the rules' loop guard."""
        timeouts = config.timeouts
        return cls(
            authenticator=Authenticator.from_users(
                config.users, config.source, socks4=config.server.socks4
            ),
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
            proxy_protocol=config.server.proxy_header_mode,
            proxy_trusted=config.server.proxy_trusted,
        )

    def trusts_balancer(self, ip: str) -> bool:
        """Whether `ip` may send a PROXY protocol header (is in server.proxy_trusted)."""
        try:
            address: IPAddress = unmapped(parse_ip(ip))
        except ValueError:
            return False  # not an IP peer (a Unix socket): never trusted
        return any(address in network for network in self.proxy_trusted)


DEFAULTS = HandlerSettings()


class RelayInLoop(Protocol):
    """Hands an established tunnel to an event loop (see EventLoopMixIn.relay_in_loop):
    True when the loop took it (it calls `on_done` when the tunnel ends, then ends the
    request), False when the caller must relay it itself."""

    def __call__(
        self,
        request: socket.socket,
        other: socket.socket,
        on_done: Callable[[RelayResult], None],
        *,
        idle_timeout: float | None,
        pending_a_to_b: bytes,
    ) -> bool: ...


def _default_settings() -> HandlerSettings:
    return DEFAULTS


def _one_connection() -> int:
    return 1


def _nothing_to_move(request: socket.socket, client_address: Any) -> bool:
    return True


@dataclass(frozen=True, slots=True)
class HandlerContext:
    """All a handler may use of the process that serves it, declared in one place.

    The daemon assembles it; the core hands it, unread, to every handler (a thread's
    Socks5Handler, a loop's FastHandshake) as its `context`.

    - settings(): the HandlerSettings a new connection begins under. A reload changes
      what it returns, never the settings of a connection already begun.
    - login_backoff, check_gate, user_slots: state that outlives a reload (and with
      workers, the process): None when there is none.
    - active_count(): the connections open now (tunnel socket buffers shrink as they
      grow in number).
    - relay_in_loop: hands an established tunnel to an event loop; None: every tunnel is
      relayed by its handler thread.
    - readdress(request, client_address): count the request under the client a PROXY
      header named (the core's readdress_request); False when that client is at its
      per-address cap.
    - observer: told of each connection's events (the daemon's metrics; see
      SessionObserver); the default does nothing.
    """

    settings: Callable[[], HandlerSettings] = _default_settings
    login_backoff: FailedLoginBackoff | None = None
    check_gate: CheckGate | None = None
    user_slots: UserSlots | None = None
    active_count: Callable[[], int] = _one_connection
    relay_in_loop: RelayInLoop | None = None
    readdress: Callable[[socket.socket, Any], bool] = _nothing_to_move
    observer: SessionObserver = NO_OBSERVER


DEFAULT_CONTEXT = HandlerContext()


def handler_context(context: object) -> HandlerContext:
    """The context a server passed on, or the defaults when it passed none."""
    return context if isinstance(context, HandlerContext) else DEFAULT_CONTEXT


@dataclass(slots=True)
class Negotiation:
    """One client's handshake in progress: the one object an event loop hands to a
    handler thread. The state machine (with its access-log record), the settings the
    connection began under (a reload in between does not change its policy), its
    deadline, and the actions the loop left for the thread to carry out."""

    handshake: ServerHandshake
    settings: HandlerSettings
    deadline: float
    session: Session  # the handshake's own (a field, not a property: read on every step)
    # The client's IP, for rules, the login back-off and UDP: the socket's peer, or the
    # client a trusted balancer's PROXY header named (see readdress()).
    client_ip: str
    # The socket's peer's IP (a balancer's, when a PROXY header readdressed the client):
    # socket buffers are sized by the host at the other end of the socket.
    peer_ip: str
    pending: list[Action] = field(default_factory=list)

    @classmethod
    def begin(
        cls,
        settings: HandlerSettings,
        client_address: Any,
        observer: SessionObserver = NO_OBSERVER,
    ) -> Negotiation:
        """A connection's handshake, as both drivers begin it (and `observer` is told).
        With server.proxy_protocol on, a peer outside server.proxy_trusted is refused
        here, before a byte is read: `pending` then holds the Close."""
        session = Session(client=format_address(client_address))
        observer.begun(session)
        ip = client_ip(client_address)
        proxy_protocol = settings.proxy_protocol
        handshake = ServerHandshake(settings.authenticator, session, proxy_protocol, observer)
        deadline = time.monotonic() + settings.handshake_timeout
        negotiation = cls(handshake, settings, deadline, session, ip, ip)
        if proxy_protocol is not None and not settings.trusts_balancer(ip):
            negotiation.pending = handshake.untrusted_source()
        return negotiation


class HandshakeTimeout(Exception):
    """The client did not complete the handshake within the handshake timeout."""


class HandshakeIO:
    """Blocking reads and writes of a handshake under one overall deadline.

    A deadline (not a per-recv timeout) so a client trickling a byte at a time cannot
    hold its thread past the handshake timeout. The socket is made non-blocking once and
    every recv/send is tried first, with a poll only when it would block: a socket timeout
    would cost a settimeout() per message and a poll() before every call (each a syscall
    that also hands the GIL to another thread). The socket stays non-blocking afterwards;
    the relay and the BIND/UDP paths work with it as it is.
    """

    def __init__(self, sock: socket.socket, timeout: float, deadline: float) -> None:
        self.sock = sock
        self.timeout = timeout
        self.deadline = deadline
        self.poller: select.poll | None = None  # made on the first wait
        sock.setblocking(False)

    def renew(self) -> None:
        """A fresh deadline for a reply: a connect or a BIND wait may outlast the
        handshake's, and the client still gets `timeout` seconds to take the answer."""
        self.deadline = time.monotonic() + self.timeout

    def recv(self) -> bytes:
        """What the client sent next (b"" at EOF); HandshakeTimeout at the deadline."""
        while True:
            try:
                return self.sock.recv(4096)
            except BlockingIOError:
                self._wait(select.POLLIN)

    def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                sent = self.sock.send(view)
            except BlockingIOError:
                self._wait(select.POLLOUT)
                continue
            view = view[sent:]

    def send_actions(self, actions: list[Action]) -> None:
        """Send what a final answer of the handshake says to send (a Close follows)."""
        for action in actions:
            if isinstance(action, Send):
                self.send(action.data)

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
    """Serves one SOCKS5 client (RFC 1928, RFC 1929) in a thread.

    Everything it uses of the process comes from its `context` (a HandlerContext). A
    fresh connection begins under `context.settings()`, so after a reload new
    connections see the new policy while old ones keep theirs; one an event loop began
    arrives as the Negotiation it handed over (the core's `handover`), with its settings.
    """

    context: HandlerContext

    def setup(self) -> None:
        self.context = handler_context(self.context)
        negotiation = self.handover if isinstance(self.handover, Negotiation) else None
        if negotiation is None:
            negotiation = Negotiation.begin(
                self.context.settings(), self.client_address, self.context.observer
            )
        self.negotiation = negotiation
        self.settings: HandlerSettings = negotiation.settings
        self.handshake = negotiation.handshake
        self.session = negotiation.session
        self.client_ip = negotiation.client_ip
        self.user_slot = False
        self.parent_early = 0  # bytes a parent proxy sent behind its answer (to the client)
        # True once the tunnel went to an event loop: the loop ends it (and logs).
        self.detached = False

    @property
    def user(self) -> str | None:
        """The RFC 1929 login name, once the login succeeded."""
        return self.handshake.user

    def handle(self) -> None:
        session = self.session
        try:
            self.serve()
        except ConnectionError:
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
            slots = self.context.user_slots
            if slots is not None:
                slots.release(self.user)
        conclude_session(self.request, self.session, self.context.observer)

    def serve(self) -> None:
        io = HandshakeIO(self.request, self.settings.handshake_timeout, self.negotiation.deadline)
        request = self.negotiate(io, self.negotiation.pending)
        if request is not None:
            self.carry_out(request, io)

    def negotiate(self, io: HandshakeIO, actions: list[Action]) -> Request | None:
        """Drive the handshake until it dispatches a request (returned) or closes (None)."""
        handshake = self.handshake
        todo = collections.deque(actions)
        while True:
            while todo:
                action = todo.popleft()
                if isinstance(action, Send):
                    io.send(action.data)
                elif isinstance(action, Dispatch):
                    return action.request
                elif isinstance(action, Authenticate):
                    failure = self.login(action, io.deadline)
                    todo.extend(
                        handshake.credentials_checked(True)
                        if failure is None
                        else handshake.credentials_checked(False, failure)
                    )
                elif isinstance(action, Proxied):
                    todo.extend(readdress(self.context, self.request, self.negotiation, action))
                    self.client_ip = self.negotiation.client_ip
                else:  # Close: the handshake's last word was said (or there was none)
                    return None
            try:
                data = io.recv()
            except HandshakeTimeout:
                todo.extend(handshake.timed_out())
                continue
            todo.extend(handshake.receive(data) if data else handshake.eof())

    def login(self, credentials: Authenticate, deadline: float) -> str | None:
        """RFC 1929 §2: None when the credentials are right, else why not (for the log).

        Credentials that logged in moments ago pass at once. Others are checked in
        their turn: after this client's failed-login back-off (FailedLoginBackoff) and
        within the bound on checks running at once (CheckGate), both before the
        handshake deadline, else refused with no check.
        """
        auth = self.settings.authenticator
        username, password = credentials.username, credentials.password
        if auth.remembers(username, password):
            backoff = self.context.login_backoff
            if backoff is not None:
                backoff.succeeded(self.client_ip, username)
            return None
        return self.check_in_turn(auth, username, password, deadline)

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
        backoff, gate = self.context.login_backoff, self.context.check_gate
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
        slots = self.context.user_slots
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
    ) -> tuple[list[SockAddr], Upstream | None]:
        """Keep the resolved addresses the rules allow; a name is checked address by address
        (a name that resolves to 127.0.0.1 is caught like the literal). With them, the
        route the first allowed address takes (a parent proxy, or None: directly); the
        addresses routed otherwise are dropped, so one request takes one route."""
        host = address.host if address.type is AddressType.DOMAINNAME else None
        allowed: list[SockAddr] = []
        via: Upstream | None = None
        for family, sockaddr in candidates:
            decision = self.check(command, host, canonical_ip(sockaddr[0]), address.port)
            if decision is None or decision.allowed:
                route = decision.via if decision is not None else None
                if not allowed:
                    via = route
                if route is via:
                    allowed.append((family, sockaddr))
            elif session.rule == "-":
                session.rule = decision.reason
        return allowed, via

    def parent_for_name(self, command: str, address: Address) -> Upstream | None:
        """The parent that resolves this name itself (socks5h, http), when the rules route
        the name there as it is: then no lookup of ours happens at all. Not for a "name"
        that is an address ("10.1.2.3", "127.1"): resolved here (to itself), it meets the
        `to` networks and the private-destination guard like the literal it is."""
        policy = self.settings.policy
        if policy is None or not policy.routes or address.type is not AddressType.DOMAINNAME:
            return None
        if numeric_host(address.host):
            return None
        decision = policy.check(
            self.client_ip, self.user, command, address.host, None, address.port, unresolved=True
        )
        via = decision.via if decision.allowed else None
        return via if via is not None and via.resolves_names else None

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

    def carry_out(self, request: Request, io: HandshakeIO) -> None:
        """The dispatched request: the per-user limit, then the command."""
        if self.user is not None and not self.take_user_slot(self.user):
            self.context.observer.limit_refused("per_user")
            self.fail(io, Reply.GENERAL_FAILURE, "per-user connection limit")
            return
        if request.command is Command.CONNECT:
            self.connect(request, io)
        elif request.command is Command.BIND:
            self.bind(request, io)
        else:
            self.udp_associate(request, io)

    def connect(self, request: Request, io: HandshakeIO) -> None:
        """RFC 1928 §4 CONNECT: reply with the outbound socket's address, then relay."""
        settings = self.settings
        session = self.session
        parent = self.parent_for_name("connect", request.address)
        if parent is not None:
            self.connect_via(parent, request.address, io)
            return
        if not self.allowed_by_name("connect", request.address, session):
            self.deny(io)
            return
        try:
            candidates = self.resolve(request.address)
            allowed, via = self.allowed_candidates("connect", request.address, candidates, session)
            if not allowed:
                self.deny(io)
                return
            if via is not None:
                # Resolved here (socks5://, or an address the client gave): the parent
                # gets the address our rules and private-destination checks passed.
                self.connect_via(via, Address.from_sockaddr(allowed[0][1]), io)
                return
            upstream = connect_any(
                allowed,
                settings.connect_timeout,
                attempt_delay=settings.attempt_delay,
                outgoing=settings.outgoing,
                blocking=False,  # the relay wants it non-blocking
            )
        except ConnectFailed as exc:
            self.fail(io, exc.reply, exc.reason)
            return
        try:
            session.resolved = format_address(upstream.getpeername())
            bound = Address.from_sockaddr(upstream.getsockname())
            session.egress = str(bound)
            io.renew()
            io.send_actions(self.handshake.reply(Reply.SUCCEEDED, bound))
            self.tunnel(upstream)
        finally:
            if not self.detached:
                upstream.close()

    def connect_via(self, parent: Upstream, target: Address, io: HandshakeIO) -> None:
        """CONNECT through a parent proxy; its answer mapped (upstream.py), then the
        same tunnel as a direct CONNECT, the parent's early bytes first to the client."""
        settings = self.settings
        session = self.session
        session.via = parent.name
        if target.type is not AddressType.DOMAINNAME:
            session.resolved = str(target)  # what the parent was asked to reach
        try:
            chained = open_via_parent(
                parent,
                target,
                settings.connect_timeout,
                resolver=settings.resolver,
                resolve_timeout=settings.resolve_timeout,
                lookups=settings.lookups,
                attempt_delay=settings.attempt_delay,
                outgoing=settings.outgoing,
            )
        except ParentFailed as exc:
            session.parent = exc.said
            self.fail(io, exc.reply, exc.reason)
            return
        session.parent = chained.said
        try:
            # Where the target sees us come from: the parent's BND (SOCKS5), else (HTTP
            # tells nothing) our address toward the parent; the reply says the same.
            session.egress = str(chained.bound)
            io.renew()
            io.send_actions(self.handshake.reply(Reply.SUCCEEDED, chained.bound))
            if chained.early:
                io.send(chained.early)
                self.parent_early = len(chained.early)
            self.tunnel(chained.sock)
        finally:
            if not self.detached:
                chained.sock.close()

    def refuse_via_parent(self, io: HandshakeIO, command: str, parent: Upstream) -> None:
        """RFC 1928 §6 X'07': BIND and UDP ASSOCIATE are not chained through parents."""
        self.session.via = parent.name
        self.fail(io, Reply.COMMAND_NOT_SUPPORTED, f"{command} via a parent proxy: not supported")

    def bind(self, request: Request, io: HandshakeIO) -> None:
        """RFC 1928 §4 BIND: first reply with where to connect, second with who did."""
        settings = self.settings
        session = self.session
        if not self.allowed_by_name("bind", request.address, session):
            self.deny(io)
            return
        try:
            candidates = self.resolve(request.address)
        except ConnectFailed as exc:
            self.fail(io, exc.reply, exc.reason)
            return
        candidates, via = self.allowed_candidates("bind", request.address, candidates, session)
        if not candidates:
            self.deny(io)
            return
        if via is not None:
            self.refuse_via_parent(io, "BIND", via)
            return
        resolved = [sockaddr[0] for _, sockaddr in candidates]
        expected = expected_peer_ips(request.address, resolved)
        # An all-zero DST gives no route to look up: listen where the client reached us.
        routable = [ip for ip in resolved if not ipaddress.ip_address(ip).is_unspecified]
        if not self.handshake.replies_carry_ipv6:
            # SOCKS4's first reply names an IPv4 address only: listen on IPv4 if we can.
            routable.sort(key=lambda ip: ":" in ip)
        try:
            listener = open_bind_listener(
                routable or [unmapped_host(self.request.getsockname()[0])], settings.outgoing
            )
        except OSError as exc:
            self.fail(io, reply_for_error(exc), f"bind failed: {exc}")
            return
        with listener:
            bound = Address.from_sockaddr(listener.getsockname())
            session.egress = str(bound)
            io.renew()
            io.send_actions(self.handshake.bind_listening(bound))
            try:
                accepted = wait_for_peer(listener, self.request, expected, settings.bind_timeout)
            except ClientLeft:
                session.end = "client closed while waiting for the BIND peer"
                session.closed_by = "client"
                return
        if accepted is None:
            # Nobody (expected) connected in time: the same code as a connect timeout.
            self.fail(io, Reply.HOST_UNREACHABLE, "no BIND peer before the timeout")
            return
        try:
            session.resolved = str(accepted.peer)
            io.renew()
            io.send_actions(self.handshake.reply(Reply.SUCCEEDED, accepted.peer))
            self.tunnel(accepted.sock)
        finally:
            if not self.detached:
                accepted.sock.close()

    def udp_associate(self, request: Request, io: HandshakeIO) -> None:
        """RFC 1928 §7: a UDP relay that lives exactly as long as this TCP connection."""
        settings = self.settings
        session = self.session
        # The association itself: client, user and command (destinations come per datagram).
        decision = self.check("udp", None, None, None)
        if decision is not None and not decision.allowed:
            session.rule = decision.reason
            self.deny(io)
            return
        if decision is not None and decision.via is not None:
            self.refuse_via_parent(io, "UDP ASSOCIATE", decision.via)
            return
        local_ip = unmapped_host(self.request.getsockname()[0])
        try:
            endpoint = open_udp_endpoint(local_ip, settings.udp_port_range)
        except OSError as exc:
            self.fail(io, Reply.GENERAL_FAILURE, f"no UDP port: {exc}")
            return
        bound = Address.from_sockaddr(endpoint.getsockname())
        session.egress = str(bound)
        try:
            io.renew()
            io.send_actions(self.handshake.reply(Reply.SUCCEEDED, bound))
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
        dropped_up = stats.dropped - stats.dropped_down
        session.datagrams = (
            stats.datagrams_up,
            stats.datagrams_down,
            dropped_up,
            stats.dropped_down,
        )
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
        # A destination routed via a parent proxy: datagrams are not chained, dropped.
        return decision is None or (decision.allowed and decision.via is None)

    def tunnel(self, upstream: socket.socket) -> None:
        """Relay between the client and `upstream`; pipelined client bytes go first.

        With event loops (threading mode), the tunnel goes to one and this thread returns
        to the pool; the loop calls tunnel_ended. Else it is relayed here.
        """
        pending = self.handshake.early_data()
        size_tunnel_buffers(
            self.settings,
            self.request,
            self.negotiation.peer_ip,
            upstream,
            None,
            self.context.active_count(),
        )
        idle_timeout = self.settings.idle_timeout
        relay_in_loop = self.context.relay_in_loop
        if relay_in_loop is not None:
            # Before the hand-over: the loop may end the tunnel before the call returns.
            self.detached = True
            on_done = functools.partial(self.tunnel_ended, upstream)
            if relay_in_loop(
                self.request, upstream, on_done, idle_timeout=idle_timeout, pending_a_to_b=pending
            ):
                return
            self.detached = False  # refused (the daemon is stopping): relayed here
        result = relay(self.request, upstream, idle_timeout=idle_timeout, pending_a_to_b=pending)
        self.record(result)

    def record(self, result: RelayResult) -> None:
        record_relay(self.session, result)
        self.session.down += self.parent_early

    def tunnel_ended(self, upstream: socket.socket, result: RelayResult) -> None:
        """The loop's on_done (in its thread): what handle() does inline; the server
        ends the request right after."""
        upstream.close()
        self.record(result)
        self.conclude()

    def deny(self, io: HandshakeIO) -> None:
        """RFC 1928 §6 reply 02: a rule said no (named in the access log)."""
        self.fail(io, Reply.CONNECTION_NOT_ALLOWED, f"denied by {self.session.rule}")

    def fail(self, io: HandshakeIO, reply: Reply, reason: str) -> None:
        """Send a failure reply; the connection closes right after (RFC 1928 §6)."""
        io.renew()
        io.send_actions(self.handshake.reply(reply, reason=reason))


def readdress(
    context: HandlerContext, request: socket.socket, negotiation: Negotiation, proxied: Proxied
) -> list[Action]:
    """Carry out a Proxied action (either driver): the connection is the header's
    client's from now on. Its per-address slot moves to that client, or the connection
    is refused when that client is at max_connections_per_ip; rules, the login back-off
    and UDP then see that client's IP (negotiation.client_ip)."""
    handshake = negotiation.handshake
    if not context.readdress(request, proxied.client):
        return handshake.client_readdressed(False, "max_connections_per_ip (proxied client)")
    negotiation.client_ip = client_ip(proxied.client)
    return handshake.client_readdressed(True)


def size_tunnel_buffers(
    settings: HandlerSettings,
    client: socket.socket,
    client_host: str,
    upstream: socket.socket,
    upstream_ip: str | None,
    connections: int,
) -> None:
    """Fix the socket buffers of a new tunnel as server.socket_buffer says, each by its
    peer's IP (``upstream_ip`` None: asked of the socket) and the ``connections`` open."""
    setting = settings.socket_buffer
    if setting == 0:
        return
    size = socket_buffer_for(setting, client_host, connections)
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


def conclude_session(
    client: socket.socket,
    session: Session,
    observer: SessionObserver = NO_OBSERVER,
    *,
    linger: bool = True,
) -> None:
    """Close out a connection that failed before its tunnel (linger), write its line;
    the one place every connection ends, so the observer counts its outcome here.

    ``linger=False`` for an event loop, which must not wait on one client: it has no
    failure reply to protect (the handler thread sends those).
    """
    if linger and session.reply is not Reply.SUCCEEDED:
        linger_close(client)
    observer.concluded(session)
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
