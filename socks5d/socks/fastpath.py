"""The common handshake, driven by an event loop instead of a thread of its own.

Most connections are the same few steps: a greeting that needs no login, a CONNECT to an
IP address the rules allow, one non-blocking connect, the reply, a tunnel. Run in a
handler thread, each step that waits hands the GIL and the CPU to another thread (the
benchmark counted ~100 futex calls per short connection with 32 clients at once). The
event loop already waits on epoll for its tunnels; here it waits for handshakes too, so
a short connection lives in one thread from accept to close.

The negotiation is the same :class:`~socks5d.socks.handshake.ServerHandshake` the handler
thread drives; this module only feeds it the loop's bytes and does the actions that
cannot block: sending an answer, and the connect of a CONNECT to an allowed address.
At the first action it does not take (checking a login, a name to resolve, BIND, UDP, a
refusal to send before closing, EOF, the handshake timeout) it hands the connection to
a handler thread as a :class:`~socks5d.socks.handler.Negotiation`: the same handshake object,
with the actions left to do, so every reply, log line and limit is the handler's own.
"""

from __future__ import annotations

import functools
import logging
import select
import socket
from collections.abc import Callable
from typing import Any

from ..core.addresses import canonical_ip, format_address
from ..core.eventloop import EventLoop, Timer
from ..core.loopserver import EventLoopMixIn
from ..core.relay import RelayResult
from .handler import (
    HandlerContext,
    Negotiation,
    conclude_session,
    handler_context,
    readdress,
    record_relay,
    size_tunnel_buffers,
)
from .handshake import Action, Close, Dispatch, Proxied, Send
from .outbound import connect_error, connect_failed, start_connect
from .protocol import Address, AddressType, Command, Reply, Request

__all__ = ["FastHandshake", "begin_fast_handshake"]

logger = logging.getLogger(__name__)

_POLLIN = select.POLLIN
_POLLOUT = select.POLLOUT


class FastHandshake:
    """One client's handshake, driven by its event loop (see the module docstring).

    ``server`` accepted the request and detached it (``finish`` ends it); its context
    (a HandlerContext) gives the settings, its ``resume_in_thread`` the way to a thread.
    """

    __slots__ = (
        "client",
        "client_address",
        "connecting",
        "context",
        "finish",
        "loop",
        "negotiation",
        "server",
        "timer",
        "upstream",
    )

    def __init__(
        self,
        server: EventLoopMixIn,
        loop: EventLoop,
        client: socket.socket,
        client_address: Any,
        finish: Callable[[], None],
    ) -> None:
        self.server = server
        self.context: HandlerContext = handler_context(server.context)
        self.loop = loop
        self.client = client
        self.client_address = client_address
        self.finish = finish
        self.negotiation = Negotiation.begin(
            self.context.settings(), client_address, self.context.observer
        )
        self.connecting = False
        self.upstream: socket.socket | None = None
        self.timer: Timer | None = None

    def begin(self) -> None:
        """In the loop's thread: start waiting for the greeting."""
        if self.negotiation.pending:  # refused before a byte is read (Negotiation.begin)
            self.close_out()
            return
        client = self.client
        try:
            client.setblocking(False)
            self.loop.watch(client.fileno(), _POLLIN, self)
        except (OSError, ValueError):  # already closed (the daemon is stopping)
            self.to_thread([])
            return
        timeout = self.negotiation.settings.handshake_timeout
        self.timer = self.loop.call_later(timeout, self.timed_out)

    # ---- the loop's callbacks (a Watcher) ----

    def on_events(self, revents: dict[int, int]) -> None:
        if self.connecting:
            self.connect_done(revents)
            return
        try:
            chunk = self.client.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            self.to_thread([])  # the handler meets the error (or the EOF after it) itself
            return
        if not chunk:
            self.to_thread([])
            return
        self.act(self.negotiation.handshake.receive(chunk))

    def timed_out(self) -> None:
        self.timer = None
        if self.connecting:
            self.connect_failed(TimeoutError("connect timed out"))
        else:
            self.to_thread([])  # past the deadline: the handler logs the timeout

    def on_loop_close(self) -> None:
        self.drop_upstream()
        if self.timer is not None:
            self.timer.cancel()
        session = self.negotiation.session
        session.end = "stopped during the handshake"
        session.closed_by = "proxy"
        try:
            conclude_session(self.client, session, self.context.observer, linger=False)
        finally:
            self.finish()

    # ---- the actions ----

    def act(self, actions: list[Action]) -> None:
        """Do the handshake's actions that cannot block; hand the rest to a thread."""
        for index, action in enumerate(actions):
            if isinstance(action, Send) and not _followed_by_close(actions, index):
                if not self.send(action.data):
                    return
            elif isinstance(action, Dispatch) and self.connect(action.request):
                return
            elif isinstance(action, Proxied):  # a lock and a count: no need for a thread
                self.act(readdress(self.context, self.client, self.negotiation, action))
                return
            else:
                # A login to check, a request that may block, or a last answer to send
                # and linger over: the handler's part.
                self.to_thread(actions[index:])
                return

    def connect(self, request: Request) -> bool:
        """CONNECT to an allowed IP address: start the one non-blocking connect. False
        when the request is not one the loop serves (names, BIND, UDP, refusals)."""
        address = request.address
        if request.command is not Command.CONNECT or address.type is AddressType.DOMAINNAME:
            return False
        settings = self.negotiation.settings
        if settings.policy is not None:
            ip = canonical_ip(address.host)
            decision = settings.policy.check(
                self.negotiation.client_ip, None, "connect", None, ip, address.port
            )
            if not decision.allowed or decision.via is not None:
                # The handler checks again: names the rule and replies 02, or chains the
                # CONNECT through the parent proxy (a blocking exchange).
                return False
        sockaddr: tuple[Any, ...]
        if address.type is AddressType.IPV4:
            family, sockaddr = socket.AF_INET, (address.host, address.port)
        else:
            family, sockaddr = socket.AF_INET6, (address.host, address.port, 0, 0)
        try:
            upstream, connected = start_connect(family, sockaddr, settings.outgoing)
        except OSError as exc:
            self.connect_failed(exc)
            return True
        self.upstream = upstream
        if connected:
            self.succeed(upstream)
            return True
        self.connecting = True
        # Nothing more is read from the client until the reply; bytes it pipelines wait
        # in the kernel, and its EOF or reset reaches the tunnel.
        self.loop.unwatch(self.client.fileno())
        self.loop.watch(upstream.fileno(), _POLLOUT, self)
        if self.timer is not None:
            self.timer.cancel()
        self.timer = self.loop.call_later(settings.connect_timeout, self.timed_out)
        return True

    def connect_done(self, revents: dict[int, int]) -> None:
        upstream = self.upstream
        assert upstream is not None
        events = revents.get(upstream.fileno(), 0)
        if not events:
            return
        error = connect_error(upstream, events)
        if error is None:
            self.loop.unwatch(upstream.fileno())
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
            self.succeed(upstream)
            return
        self.connect_failed(error)

    def connect_failed(self, exc: BaseException) -> None:
        self.drop_upstream()
        failure = connect_failed([exc], 1, 1)
        handshake = self.negotiation.handshake
        self.to_thread(handshake.reply(failure.reply, reason=failure.reason))

    def succeed(self, upstream: socket.socket) -> None:
        """Reply 00 with the outbound address; the tunnel starts in this loop."""
        negotiation = self.negotiation
        session = negotiation.session
        try:
            session.resolved = format_address(upstream.getpeername())
            bound = Address.from_sockaddr(upstream.getsockname())
        except OSError as exc:  # reset between connect and now
            self.connect_failed(exc)
            return
        session.egress = str(bound)
        if not self.connecting:
            self.loop.unwatch(self.client.fileno())
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        (reply,) = negotiation.handshake.reply(Reply.SUCCEEDED, bound)
        assert isinstance(reply, Send)
        error: OSError | None = None
        try:
            sent = self.client.send(reply.data)
        except OSError as exc:
            sent, error = 0, exc
        if error is not None or sent < len(reply.data):  # a fresh socket takes it whole
            self.drop_upstream()
            session.end = f"error: {getattr(error, 'strerror', None) or 'reply not sent'}"
            session.closed_by = "client"
            self.close_out()
            return
        self.upstream = None  # the tunnel's now
        request = negotiation.handshake.request
        assert request is not None
        size_tunnel_buffers(
            negotiation.settings,
            self.client,
            negotiation.peer_ip,
            upstream,
            request.address.host,
            self.context.active_count(),
        )
        self.loop.add_here(
            self.client,
            upstream,
            functools.partial(self.tunnel_ended, upstream),
            idle_timeout=negotiation.settings.idle_timeout,
            pending_a_to_b=negotiation.handshake.early_data(),
        )

    def tunnel_ended(self, upstream: socket.socket, result: RelayResult) -> None:
        """The tunnel's on_done, as the handler's: close, record, log, end the request."""
        upstream.close()
        record_relay(self.negotiation.session, result)
        self.close_out()

    # ---- ways out ----

    def send(self, data: bytes) -> bool:
        """Send a short answer whole; False when it could not be (and the connection
        went elsewhere: to a thread, which meets the error, or closed)."""
        try:
            sent = self.client.send(data)
        except OSError:
            # Nothing sent: the handler sends it again and meets the error.
            self.to_thread([Send(data)])
            return False
        if sent == len(data):
            return True
        # Part of a few bytes into a fresh socket's empty buffer: not seen in practice,
        # and the stream cannot be repaired. Close.
        session = self.negotiation.session
        session.end = "error: answer not sent whole"
        session.closed_by = "proxy"
        self.close_out()
        return False

    def close_out(self) -> None:
        try:
            conclude_session(
                self.client, self.negotiation.session, self.context.observer, linger=False
            )
        finally:
            self.finish()

    def drop_upstream(self) -> None:
        if self.upstream is not None:
            self.loop.unwatch(self.upstream.fileno())
            self.upstream.close()
            self.upstream = None

    def to_thread(self, actions: list[Action]) -> None:
        """Give the connection to a handler thread with the actions left to do."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        with_fd = self.client.fileno()
        if with_fd >= 0:
            self.loop.unwatch(with_fd)
        self.negotiation.pending = actions
        try:
            self.server.resume_in_thread(self.client, self.client_address, self.negotiation)
        except Exception:
            logger.exception("could not hand a handshake to a thread")


def begin_fast_handshake(
    server: EventLoopMixIn,
    loop: EventLoop,
    client: socket.socket,
    client_address: Any,
    finish: Callable[[], None],
) -> None:
    """The daemon's loop handler (EventLoopMixIn.loop_handler): every request begins
    with the common handshake in the loop that accepted it."""
    FastHandshake(server, loop, client, client_address, finish).begin()


def _followed_by_close(actions: list[Action], index: int) -> bool:
    """Whether the Send at `index` is a last answer (a Close comes right after it)."""
    return index + 1 < len(actions) and isinstance(actions[index + 1], Close)
