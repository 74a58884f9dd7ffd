"""The common handshake, run inside a relay hub instead of a thread of its own.

Most connections are the same few steps: a greeting that needs no login, a CONNECT to an
IP address the rules allow, one non-blocking connect, the reply, a tunnel. Run in a
handler thread, each step that waits hands the GIL and the CPU to another thread (the
benchmark counted ~100 futex calls per short connection with 32 clients at once). The
hub already waits on epoll for its tunnels; here it waits for handshakes too, so a
short connection lives in one thread from accept to close.

This is only a faster way through the success path. At the first step it does not take
as the common case (a login, a name to resolve, BIND, UDP, a rule that refuses, a
malformed message, EOF, the handshake timeout, a failed connect) it hands the connection
to a handler thread with a :class:`~socks5d.handler.Resume`: the bytes read so far and
where the linear :class:`~socks5d.handler.Socks5Handler` carries on, so every reply, log
line and limit is the handler's own.
"""

from __future__ import annotations

import functools
import logging
import select
import socket
import time
from typing import Any

from .addresses import canonical_ip, client_ip
from .handler import (
    HandlerSettings,
    Resume,
    conclude_session,
    format_peer,
    record_relay,
    size_tunnel_buffers,
)
from .hub import RelayHub, Timer
from .outbound import ConnectFailed, connect_failed, start_connect
from .protocol import (
    MAX_GREETING_SIZE,
    MAX_REQUEST_SIZE,
    Address,
    AddressType,
    Command,
    Method,
    ProtocolError,
    Reply,
    Request,
    encode_method_selection,
    encode_reply,
    parse_greeting,
    parse_request,
)
from .relay import RelayResult
from .session import Session

__all__ = ["FastHandshake"]

logger = logging.getLogger(__name__)

_POLLIN = select.POLLIN
_POLLOUT = select.POLLOUT


class FastHandshake:
    """One client's handshake, driven by its hub's events (see the module docstring).

    ``server`` is the threading server that accepted the request and detached it
    (``finish`` ends it); it provides ``settings``, ``resumes`` and ``resume_in_thread``.
    """

    __slots__ = (
        "buffer",
        "client",
        "client_address",
        "deadline",
        "finish",
        "hub",
        "request",
        "server",
        "session",
        "settings",
        "stage",
        "timer",
        "upstream",
    )

    def __init__(
        self,
        server: Any,
        hub: RelayHub,
        client: socket.socket,
        client_address: Any,
        finish: Any,
    ) -> None:
        self.server = server
        self.hub = hub
        self.client = client
        self.client_address = client_address
        self.finish = finish
        self.settings: HandlerSettings = server.settings
        self.session = Session(client=format_peer(client_address))
        self.deadline = time.monotonic() + self.settings.handshake_timeout
        self.buffer = bytearray()
        self.stage = "greeting"
        self.request: Request | None = None
        self.upstream: socket.socket | None = None
        self.timer: Timer | None = None

    def begin(self) -> None:
        """In the hub's thread: start waiting for the greeting."""
        client = self.client
        try:
            client.setblocking(False)
            self.hub.watch(client.fileno(), _POLLIN, self)
        except (OSError, ValueError):  # already closed (the daemon is stopping)
            self.to_thread()
            return
        self.timer = self.hub.call_later(self.settings.handshake_timeout, self.timed_out)

    # ---- hub callbacks ----

    def on_events(self, revents: dict[int, int]) -> None:
        if self.stage == "connecting":
            self.connect_done(revents)
            return
        try:
            chunk = self.client.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            self.to_thread()  # the handler meets the error (or the EOF after it) itself
            return
        if not chunk:
            self.to_thread()
            return
        self.buffer += chunk
        self.advance()

    def timed_out(self) -> None:
        self.timer = None
        if self.stage == "connecting":
            self.connect_failed(TimeoutError("connect timed out"))
        else:
            self.to_thread()  # past the deadline: the handler logs the timeout

    def on_hub_close(self) -> None:
        self.drop_upstream()
        if self.timer is not None:
            self.timer.cancel()
        session = self.session
        session.end = "stopped during the handshake"
        session.closed_by = "proxy"
        try:
            conclude_session(self.client, session, linger=False)
        finally:
            self.finish()

    # ---- the steps ----

    def advance(self) -> None:
        """Parse what has arrived; answer and move on, or hand over."""
        try:
            if self.stage == "greeting":
                parsed_greeting = parse_greeting(self.buffer)
                if parsed_greeting is None:
                    if len(self.buffer) >= MAX_GREETING_SIZE:
                        self.to_thread()
                    return
                greeting, used = parsed_greeting
                method = self.settings.authenticator.choose_method(greeting.methods)
                if method is not Method.NO_AUTHENTICATION_REQUIRED:
                    self.to_thread()  # a login (or a refusal): the handler's part
                    return
                if not self.send(encode_method_selection(method)):
                    return
                del self.buffer[:used]
                self.stage = "request"
            parsed_request = parse_request(self.buffer)
        except ProtocolError:
            self.to_thread()  # it parses again and sends the right reply
            return
        if parsed_request is None:
            if len(self.buffer) >= MAX_REQUEST_SIZE:
                self.to_thread()
            return
        self.request, used = parsed_request
        del self.buffer[:used]
        self.stage = "command"
        self.connect(self.request)

    def connect(self, request: Request) -> None:
        """CONNECT to an allowed IP address: start the one non-blocking connect."""
        address = request.address
        if request.command is not Command.CONNECT or address.type is AddressType.DOMAINNAME:
            self.to_thread()  # names (DNS blocks), BIND, UDP ASSOCIATE
            return
        sockaddr: tuple[Any, ...]
        if address.type is AddressType.IPV4:
            family, sockaddr = socket.AF_INET, (address.host, address.port)
        else:
            family, sockaddr = socket.AF_INET6, (address.host, address.port, 0, 0)
        policy = self.settings.policy
        if policy is not None:
            ip = canonical_ip(address.host)
            decision = policy.check(
                client_ip(self.client_address), None, "connect", None, ip, address.port
            )
            if not decision.allowed:
                self.to_thread()  # the handler checks again and replies 02
                return
        try:
            upstream, connected = start_connect(family, sockaddr, self.settings.outgoing)
        except OSError as exc:
            self.connect_failed(exc)
            return
        self.upstream = upstream
        if connected:
            self.succeed(upstream)
            return
        self.stage = "connecting"
        # Nothing more is read from the client until the reply; bytes it pipelines wait
        # in the kernel, and its EOF or reset reaches the tunnel.
        self.hub.unwatch(self.client.fileno())
        self.hub.watch(upstream.fileno(), _POLLOUT, self)
        if self.timer is not None:
            self.timer.cancel()
        self.timer = self.hub.call_later(self.settings.connect_timeout, self.timed_out)

    def connect_done(self, revents: dict[int, int]) -> None:
        upstream = self.upstream
        assert upstream is not None
        events = revents.get(upstream.fileno(), 0)
        if not events:
            return
        code = upstream.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code == 0 and events & _POLLOUT:
            self.hub.unwatch(upstream.fileno())
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
            self.succeed(upstream)
            return
        self.connect_failed(OSError(code or 103, "connection aborted"))

    def connect_failed(self, exc: BaseException) -> None:
        self.drop_upstream()
        failure: ConnectFailed = connect_failed([exc], 1, 1)
        self.to_thread(failure)

    def succeed(self, upstream: socket.socket) -> None:
        """Reply 00 with the outbound address; the tunnel starts in this hub."""
        session = self.session
        request = self.request
        assert request is not None
        session.command = request.command.name
        session.target = str(request.address)
        try:
            session.resolved = format_peer(upstream.getpeername())
            bound = Address.from_sockaddr(upstream.getsockname())
        except OSError as exc:  # reset between connect and now
            self.connect_failed(exc)
            return
        session.egress = str(bound)
        session.reply = Reply.SUCCEEDED
        if self.stage != "connecting":
            self.hub.unwatch(self.client.fileno())
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        error: OSError | None = None
        reply = encode_reply(Reply.SUCCEEDED, bound)
        try:
            sent = self.client.send(reply)
        except OSError as exc:
            sent, error = 0, exc
        if error is not None or sent < len(reply):  # a fresh socket takes 10-22 bytes whole
            self.drop_upstream()
            session.end = f"error: {getattr(error, 'strerror', None) or 'reply not sent'}"
            session.closed_by = "client"
            self.close_out()
            return
        self.upstream = None  # the tunnel's now
        size_tunnel_buffers(
            self.settings,
            self.client,
            self.client_address,
            upstream,
            request.address.host,
            self.server.active_count,
        )
        self.hub.add_here(
            self.client,
            upstream,
            functools.partial(self.tunnel_ended, upstream),
            idle_timeout=self.settings.idle_timeout,
            pending_a_to_b=bytes(self.buffer),
        )

    def tunnel_ended(self, upstream: socket.socket, result: RelayResult) -> None:
        """The tunnel's on_done, as the handler's: close, record, log, end the request."""
        upstream.close()
        record_relay(self.session, result)
        self.close_out()

    # ---- ways out ----

    def send(self, data: bytes) -> bool:
        """Send a short answer whole; False (and the handler takes over) if it cannot."""
        try:
            sent = self.client.send(data)
        except OSError:
            self.to_thread()  # nothing sent: the handler answers again and meets the error
            return False
        if sent == len(data):
            return True
        # Part of a few bytes into a fresh socket's empty buffer: not seen in practice,
        # and the stream cannot be repaired. Close.
        self.session.end = "error: answer not sent whole"
        self.session.closed_by = "proxy"
        self.close_out()
        return False

    def close_out(self) -> None:
        try:
            conclude_session(self.client, self.session, linger=False)
        finally:
            self.finish()

    def drop_upstream(self) -> None:
        if self.upstream is not None:
            self.hub.unwatch(self.upstream.fileno())
            self.upstream.close()
            self.upstream = None

    def to_thread(self, failure: ConnectFailed | None = None) -> None:
        """Give the connection to a handler thread, which carries on from this stage."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        with_fd = self.client.fileno()
        if with_fd >= 0:
            self.hub.unwatch(with_fd)
        stage = "failed" if failure is not None else self.stage
        self.server.resumes[self.client] = Resume(
            stage=stage,
            buffer=bytes(self.buffer),
            deadline=self.deadline,
            session=self.session,
            settings=self.settings,
            request=self.request,
            failure=failure,
        )
        try:
            self.server.resume_in_thread(self.client, self.client_address)
        except Exception:
            self.server.resumes.pop(self.client, None)
            logger.exception("could not hand a handshake to a thread")
