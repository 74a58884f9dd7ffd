"""The synchronous server core: BaseServer, TCPServer, the threading and forking mixins and
the request handler base classes, in the spirit of CPython's ``socketserver``.

Owns: the listening socket (address family from the host, SO_REUSEADDR, backlog), the
accept loop (selector with a wake-up socketpair), the accept-side accounting
(:class:`AcceptAccounting`: slots per client and in all, refusals, the back-off after
EMFILE), concurrency (a pool of threads or forked children, capped by
``max_connections``), graceful and forced close, and error logging. Hook and class names
follow ``socketserver`` so its documentation applies; where we differ (prompt shutdown,
accept back-off, reaped threads, capped concurrency, logging instead of printing) the
class docstrings say so. Serving from event loops as well as threads is
:mod:`socks5d.core.loopserver`'s.

Must not import SOCKS code (protocol, auth, handler, ...) nor ``socketserver``: it is the
bottom layer and knows nothing of what the handler speaks. Stdlib and the pure
``socks5d.core.addresses`` helpers only.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import functools
import io
import logging
import os
import queue
import selectors
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Self, cast

from .addresses import DEFAULT_IPV6_CLIENT_PREFIX, client_ip, client_key, format_address

__all__ = [
    "AcceptAccounting",
    "BaseRequestHandler",
    "BaseServer",
    "ForkingMixIn",
    "ForkingTCPServer",
    "StreamRequestHandler",
    "TCPServer",
    "ThreadingMixIn",
    "ThreadingTCPServer",
    "reap_child",
]

logger = logging.getLogger(__name__)

# poll() has no FD_SETSIZE limit (select.select fails past descriptor 1024), needs no
# descriptor of its own (unlike epoll, which matters when we are out of descriptors) and
# one syscall per wait. Fall back to the platform default elsewhere.
_ServerSelector: type[selectors.BaseSelector] = getattr(
    selectors, "PollSelector", selectors.DefaultSelector
)

# accept() failures that mean "out of descriptors or memory": retrying at once would spin
# at 100% CPU because the pending connection keeps the listening socket readable.
_RESOURCE_ERRNOS = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM},
)
# accept() failures that concern one connection only (the client gave up, a firewall
# said no, a signal arrived, nothing was pending after all): ignore and go on.
_TRANSIENT_ERRNOS = frozenset(
    code
    for code in (
        errno.ECONNABORTED,
        errno.EAGAIN,
        errno.EWOULDBLOCK,
        getattr(errno, "EPROTO", None),
        errno.EINTR,
        errno.EPERM,
    )
    if code is not None
)

# Errors that say "the peer went away" rather than "our code is broken".
_CONNECTION_ERRORS = (ConnectionError, TimeoutError)

_WAKEUP = "wakeup"
_LISTENER = "listener"

# What a pooled handler thread is given: (request, client_address, handover).
_WorkItem = tuple[socket.socket, Any, object]


class AcceptAccounting:
    """What accepting changes, kept in one place for any number of accepting threads.

    - Slots: the requests admitted and not yet ended, in all and per client key
      (take_slot, give_back, held), and how many were admitted since start.
    - Refusals at a cap not yet logged (refused, log_refusals): at most one WARNING per
      interval, however many threads refuse.
    - The accept back-off after EMFILE and the like (accept_failed, accept_succeeded):
      it doubles from the minimum to the maximum, and a request that closes ends it at
      once (descriptor_freed), calling the wakers of loops that stopped watching their
      listeners (add_waker).

    One lock guards all of it. A slot is checked and taken in one step under it, so no
    cap is ever exceeded however many loops accept at once. An RLock: the check (the
    server's over_limit hook) runs under it and may read the counts. The knobs (caps,
    intervals, back-off bounds) are the server's, passed with each call, so they may be
    changed on the server at any time.
    """

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.admitted = 0
        self.per_client: collections.Counter[str] = collections.Counter()
        self.admitted_total = 0  # since start: systemd's "served"
        # Requests closed so far (approximate: only "has it changed?" matters).
        self.releases = 0
        # Refusals not yet logged: by cap, and per-client ones by client key.
        self._refused: collections.Counter[str] = collections.Counter()
        self._refused_clients: collections.Counter[str] = collections.Counter()
        self._refusals_logged_at = float("-inf")
        # The accept back-off; resume_at 0.0: not paused.
        self.resume_at = 0.0
        self._backoff = 0.0
        self._failures = 0
        self._burst_started = 0.0
        self._burst_warned = False
        self._unlogged = 0  # failures in bursts that logged nothing
        self._warned_at = float("-inf")
        self._wakers: list[Callable[[], None]] = []

    # ---- slots ----

    def take_slot(self, key: str, refuse: Callable[[], bool]) -> bool:
        """Count a new request under `key`, unless `refuse()` (called under the lock)."""
        with self.lock:
            if refuse():
                return False
            self.admitted += 1
            self.per_client[key] += 1
            self.admitted_total += 1
        return True

    def give_back(self, key: str) -> None:
        """A request counted under `key` has ended."""
        with self.lock:
            self.admitted -= 1
            left = self.per_client[key] - 1
            if left > 0:
                self.per_client[key] = left
            else:
                del self.per_client[key]

    def move_slot(self, old: str, new: str, max_per_client: int | None) -> bool:
        """Count a slot held under `old` under `new` instead (the client turned out to be
        another address: a PROXY protocol header named it). False, with nothing changed,
        when `new` is at `max_per_client`; the total does not change."""
        if old == new:
            return True
        with self.lock:
            if max_per_client is not None and self.per_client[new] >= max_per_client:
                return False
            self.per_client[new] += 1
            left = self.per_client[old] - 1
            if left > 0:
                self.per_client[old] = left
            else:
                del self.per_client[old]
        return True

    def held(self, key: str | None = None) -> int:
        """Slots held now: in all, or under one client key."""
        with self.lock:
            return self.admitted if key is None else self.per_client[key]

    def cap_reached(self, key: str, max_total: int | None, max_per_client: int | None) -> str:
        """The name of the cap a new request under `key` would exceed, or ""."""
        with self.lock:
            if max_total is not None and self.admitted >= max_total:
                return "max_connections"
            if max_per_client is not None and self.per_client[key] >= max_per_client:
                return "max_connections_per_ip"
            return ""

    # ---- refusals ----

    def refused(self, key: str, max_total: int | None, max_per_client: int | None) -> str:
        """Count a refusal for the next log_refusals() line, by the cap that was full
        (returned: "max_connections", "max_connections_per_ip" or "a cap of the server")."""
        with self.lock:
            reason = self.cap_reached(key, max_total, max_per_client) or "a cap of the server"
            self._refused[reason] += 1
            if reason == "max_connections_per_ip":
                self._refused_clients[key] += 1
        return reason

    def log_refusals(
        self,
        max_total: int | None,
        max_per_client: int | None,
        interval: float,
        force: bool = False,
    ) -> None:
        """Log the refusals counted since the last line, unless that was too recent."""
        if not self._refused:  # the common case, without the lock
            return
        with self.lock:
            now = time.monotonic()
            if not self._refused or (not force and now - self._refusals_logged_at < interval):
                return
            refused, self._refused = self._refused, collections.Counter()
            clients, self._refused_clients = self._refused_clients, collections.Counter()
            self._refusals_logged_at = now
        parts = [f"{count} at {reason}" for reason, count in sorted(refused.items())]
        if clients:
            busiest, count = clients.most_common(1)[0]
            parts.append(f"most from {busiest} ({count})")
        logger.warning(
            "connection limit reached (max_connections=%s, max_connections_per_ip=%s): "
            "refused %d connection(s): %s",
            max_total,
            max_per_client,
            sum(refused.values()),
            ", ".join(parts),
        )

    # ---- the accept back-off ----

    def add_waker(self, waker: Callable[[], None]) -> None:
        """Have `waker()` called (from any thread) when a back-off ends early."""
        with self.lock:
            self._wakers.append(waker)

    def accept_failed(
        self,
        exc: OSError,
        releases: int,
        backoff: tuple[float, float],
        log_interval: float,
    ) -> None:
        """Ignore per-connection failures; pause accepting on exhaustion.

        `releases`: self.releases before the failed accept(). A request that closed since
        then found no pause to end: retry at once instead of waiting for the back-off.
        `backoff`: its (minimum, maximum) in seconds. Warns at most once per
        `log_interval`, counting the failures of bursts that logged nothing.
        """
        if exc.errno in _TRANSIENT_ERRNOS or (exc.errno is None and isinstance(exc, TimeoutError)):
            logger.debug("accept() failed, ignored: %s", exc)
            return
        now = time.monotonic()
        warn, earlier = False, 0
        with self.lock:
            if self._failures == 0:
                self._burst_started = now
                self._backoff = backoff[0]
                # A closing request ends each burst at once, so under lasting starvation
                # bursts come and go: warn for at most one per log_interval, and count
                # the failures of the others for the next warning.
                warn = now - self._warned_at >= log_interval
                self._burst_warned = warn
                if warn:
                    self._warned_at = now
                    earlier, self._unlogged = self._unlogged, 0
            else:
                self._backoff = min(self._backoff * 2, backoff[1])
            if not self._burst_warned:
                self._unlogged += 1
            self._failures += 1
            released = self.releases != releases
            self.resume_at = now if released else now + self._backoff
        if not warn:
            return
        since = f" ({earlier} more failure(s) since the last warning)" if earlier else ""
        if exc.errno in _RESOURCE_ERRNOS:
            logger.warning(
                "accept() failed: %s; pausing accepts until a connection closes "
                "(or for up to %.1f s)%s",
                exc,
                backoff[1],
                since,
            )
        else:
            # Unknown: still back off, so a persistent failure cannot spin either.
            logger.error("accept() failed: %s; pausing accepts%s", exc, since)

    def accept_succeeded(self) -> None:
        """accept() worked (or found nothing pending): a back-off in force is over."""
        if not self._failures:  # the common case, without the lock
            return
        with self.lock:
            failures, self._failures = self._failures, 0
            if not failures:
                return
            warned = self._burst_warned
            self._backoff = 0.0
            self.resume_at = 0.0
            started = self._burst_started
        if warned:
            logger.info(
                "accept() recovered after %d failed attempt(s) over %.2f s",
                failures,
                time.monotonic() - started,
            )

    def descriptor_freed(self) -> None:
        """A request closed and gave back its descriptor: if accepting is paused after
        EMFILE, retry now instead of when the back-off ends (which stays, as a fallback,
        for descriptors freed by anything else)."""
        self.releases += 1  # for an accept() failing right now (see accept_failed)
        if not self.resume_at:  # not paused: the common case, without the lock
            return
        with self.lock:
            if not self.resume_at:
                return
            self.resume_at = 0.0
            wakers = list(self._wakers)
        for waker in wakers:
            try:
                waker()
            except Exception:
                logger.exception("an accept waker failed")


class BaseServer:
    """Base class for servers: the accept loop, shutdown and error policy.

    Methods for the caller:

    - __init__(server_address, RequestHandlerClass)
    - serve_forever(poll_interval=0.5)
    - shutdown()      # from any thread, a handler or a signal handler; never deadlocks
    - handle_request()  # if you do not use serve_forever()
    - fileno() -> int   # for the selector
    - accept_ready(listener)  # accept from a loop of your own (with accept_elsewhere)
    - active_count, active_for(client), wait_for_idle(timeout)

    Methods that may be overridden:

    - server_bind()
    - server_activate()
    - get_request() -> request, client_address
    - listeners(), get_request_from(listener)  # for servers with several sockets
    - handle_timeout()
    - verify_request(request, client_address)
    - stop_listening()  # close the listening sockets, requests go on
    - server_close()
    - process_request(request, client_address)
    - shutdown_request(request)
    - close_request(request)
    - service_actions()
    - handle_error(request, client_address)
    - over_limit(client_address)  # runs under the accounting lock
    - handle_overload(request, client_address)
    - refusal_counted(cap)  # a client refused at a cap, counted

    Methods for derived classes:

    - finish_request(request, client_address, handover=None)

    Class variables that may be overridden by derived classes or instances:

    - timeout (for handle_request)
    - overload_log_interval (seconds between "connection limit reached" warnings)
    - accept_log_interval (seconds between "accept() failed" warnings)
    - accept_backoff_min, accept_backoff_max (the accept back-off after EMFILE and the
      like: it doubles from min to max; closing a request ends it at once)
    - accept_elsewhere (False; True: serve_forever() leaves the listening sockets to
      another loop that calls accept_ready(), and only waits for shutdown() and runs
      service_actions())
    - ipv6_client_prefix (64: IPv6 clients are counted per network of this length)

    Instance variables:

    - server_address
    - RequestHandlerClass
    - context (None: whatever the application gives every handler, as its `context`;
      the core never looks inside)
    - max_connections (None: unlimited; may be changed while serving)
    - max_connections_per_ip (None: unlimited; may be changed while serving)
    - per_client_exempt (None, or a test of a client address: peers whose new
      connections max_connections_per_ip does not cap at accept, such as a trusted load
      balancer whose connections each count under the client they turn out to be, see
      readdress_request())
    - accounting (the AcceptAccounting: slots held, refusals, the accept back-off; safe
      with several threads accepting at once, as loops calling accept_ready() do)
    """

    timeout: float | None = None
    max_connections: int | None = None
    max_connections_per_ip: int | None = None
    per_client_exempt: Callable[[Any], bool] | None = None
    ipv6_client_prefix: int = DEFAULT_IPV6_CLIENT_PREFIX
    overload_log_interval: float = 1.0
    accept_log_interval: float = 10.0
    accept_backoff_min: float = 0.05
    accept_backoff_max: float = 1.0
    accept_elsewhere: bool = False
    context: object = None

    def __init__(self, server_address: Any, RequestHandlerClass: type[BaseRequestHandler]) -> None:
        """Constructor. May be extended, do not override."""
        self.server_address = server_address
        self.RequestHandlerClass = RequestHandlerClass
        # Set while no serve_forever() loop runs, so shutdown() never waits for a loop
        # that does not exist.
        self._is_shut_down = threading.Event()
        self._is_shut_down.set()
        self._shutdown_request = False
        self._serving_ident: int | None = None
        # shutdown() writes one byte here to wake the selector at once instead of
        # waiting for poll_interval.
        self._wakeup_r, self._wakeup_w = socket.socketpair()
        self._wakeup_r.setblocking(False)
        self._wakeup_w.setblocking(False)
        self.accounting = AcceptAccounting()
        # A back-off that ends early: serve_forever() watches the listeners again.
        self.accounting.add_waker(self._wake)

    # ---- the loop ----

    def server_activate(self) -> None:
        """Called by the constructor to activate the server. May be overridden."""

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Handle requests until shutdown().

        Waits on a selector holding the listening socket and the wake-up socket, so
        shutdown() takes effect at once; poll_interval only bounds how long
        service_actions() may wait. A shutdown() that came while no loop ran (for example
        a signal between installing the handler and calling this) makes it return at once.
        In the main thread it also points signal.set_wakeup_fd() at the wake-up socket
        (unless the application already set one), so a signal handler that calls
        shutdown() runs at once even if the kernel delivered the signal to another thread.
        """
        self._is_shut_down.clear()
        self._serving_ident = threading.get_ident()
        owns_signal_wakeup = self._claim_signal_wakeup()
        try:
            # Stale wake-up bytes would only cost one spurious iteration; the flag is set
            # before the byte is written, so draining here cannot lose a shutdown.
            self._drain_wakeup()
            with _ServerSelector() as selector:
                selector.register(self._wakeup_r, selectors.EVENT_READ, _WAKEUP)
                listening = False
                while not self._shutdown_request:
                    now = time.monotonic()
                    timeout = poll_interval
                    paused = self.accounting.resume_at > now
                    if self.accept_elsewhere:  # another loop accepts (accept_ready)
                        if listening:
                            for listener in self.listeners():
                                selector.unregister(listener)
                            listening = False
                    elif paused:
                        # Back-off: stop watching the listening socket (still readable
                        # with the connection we could not accept) but keep the wake-up
                        # socket, so shutdown stays prompt.
                        if listening:
                            for listener in self.listeners():
                                selector.unregister(listener)
                            listening = False
                        timeout = min(timeout, self.accounting.resume_at - now)
                    elif not listening:
                        for listener in self.listeners():
                            selector.register(listener, selectors.EVENT_READ, _LISTENER)
                        listening = True
                    ready = selector.select(timeout)
                    # bpo-35017: shutdown() during select() means exit now.
                    if self._shutdown_request:
                        break
                    for key, _events in ready:
                        if key.data == _WAKEUP:
                            self._drain_wakeup()
                        else:
                            self.accept_ready(key.fileobj, limit=1)
                    self.service_actions()
                    self._log_refusals()
        finally:
            if owns_signal_wakeup:
                signal.set_wakeup_fd(-1)
            self._shutdown_request = False
            self._serving_ident = None
            self._is_shut_down.set()

    def _claim_signal_wakeup(self) -> bool:
        """Make signals wake the selector, if we serve in the main thread and nobody else
        has claimed signal.set_wakeup_fd().

        Python runs signal handlers in the main thread only, and only between bytecodes;
        the kernel may deliver SIGTERM to any thread, so without this a handler calling
        shutdown() could wait for poll_interval. Returns whether we must release it.
        """
        if threading.current_thread() is not threading.main_thread():
            return False
        try:
            previous = signal.set_wakeup_fd(self._wakeup_w.fileno(), warn_on_full_buffer=False)
        except (ValueError, OSError):
            return False
        if previous != -1:
            # Someone else (the application) owns it: give it back untouched.
            signal.set_wakeup_fd(previous)
            return False
        return True

    def shutdown(self) -> None:
        """Stop the serve_forever() loop; safe from any thread and from signal handlers.

        Sets a flag and writes one byte to the wake-up socket (no lock, so a signal
        handler cannot deadlock against the code it interrupted). Called from another
        thread it waits until the loop has exited; called from the serving thread (a
        handler of a synchronous server, or a signal handler) it returns at once and the
        loop exits when control returns to it. With no loop running it returns at once.
        """
        self._shutdown_request = True
        self._wake()
        if self._serving_ident == threading.get_ident():
            return
        self._is_shut_down.wait()

    def reinit_after_fork(self) -> None:
        """Give a forked copy of this server (a worker process) its own wake-up socket.

        A shared one would let one process's shutdown() byte be drained by another's loop.
        """
        self._close_wakeup()
        self._wakeup_r, self._wakeup_w = socket.socketpair()
        self._wakeup_r.setblocking(False)
        self._wakeup_w.setblocking(False)

    def _wake(self) -> None:
        # Full (a wake-up is already pending) or closed by server_close(): either way
        # there is nothing more to do.
        with contextlib.suppress(OSError):
            self._wakeup_w.send(b"\0")

    def _drain_wakeup(self) -> None:
        while True:
            try:
                if not self._wakeup_r.recv(4096):
                    return
            except OSError:
                return

    def _close_wakeup(self) -> None:
        self._wakeup_r.close()
        self._wakeup_w.close()

    def service_actions(self) -> None:
        """Called by serve_forever() after every wake-up, and at least every poll_interval.

        May be overridden (call super()); ForkingMixIn reaps children here.
        """

    def handle_request(self) -> None:
        """Handle one request, waiting at most self.timeout for it (None: forever)."""
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        with _ServerSelector() as selector:
            for listener in self.listeners():
                selector.register(listener, selectors.EVENT_READ, _LISTENER)
            while True:
                now = time.monotonic()
                remaining = None if deadline is None else deadline - now
                if remaining is not None and remaining <= 0:
                    self.handle_timeout()
                    return
                pause = self.accounting.resume_at - now
                if pause > 0:
                    time.sleep(pause if remaining is None else min(pause, remaining))
                    continue
                ready = selector.select(remaining)
                if ready:
                    self.accept_ready(ready[0][0].fileobj, limit=1)
                    return

    def accept_ready(self, listener: Any, limit: int = 16) -> float:
        """Accept and dispatch up to `limit` queued connections of a readable listener.

        serve_forever() calls it, and so may a loop of your own that watches the
        (non-blocking) listening sockets itself (see accept_elsewhere), from any thread.
        Returns 0.0, or the time.monotonic() until which accepting is paused after a
        failure such as EMFILE: stop watching the listener until then, or the loop would
        spin. A request that closes ends the pause early and calls the wakers given to
        accounting.add_waker().
        """
        accounting = self.accounting
        for _ in range(limit):
            resume_at = accounting.resume_at
            if resume_at > time.monotonic():
                return resume_at  # another loop hit EMFILE: no point trying
            releases = accounting.releases
            try:
                request, client_address = self.get_request_from(listener)
            except BlockingIOError:
                # Drained (or another loop took it). accept() takes a descriptor before
                # it looks at the queue, so this also means EMFILE is over.
                accounting.accept_succeeded()
                return 0.0
            except OSError as exc:
                backoff = (self.accept_backoff_min, self.accept_backoff_max)
                accounting.accept_failed(exc, releases, backoff, self.accept_log_interval)
                continue
            accounting.accept_succeeded()
            self._dispatch(request, client_address)
        return 0.0

    def _dispatch(self, request: socket.socket, client_address: Any) -> None:
        if self.verify_request(request, client_address):
            try:
                self.process_request(request, client_address)
            except Exception:
                self._handle_error_safely(request, client_address)
                self.shutdown_request(request)
            except BaseException:
                self.shutdown_request(request)
                raise
        else:
            self.shutdown_request(request)

    def handle_timeout(self) -> None:
        """Called if no new request arrives within self.timeout (handle_request only)."""

    def verify_request(self, request: socket.socket, client_address: Any) -> bool:
        """Return True to proceed with this request. May be overridden."""
        return True

    def process_request(self, request: socket.socket, client_address: Any) -> None:
        """Handle the request inline. Overridden by ForkingMixIn and ThreadingMixIn."""
        self.finish_request(request, client_address)
        self.shutdown_request(request)

    def stop_listening(self) -> None:
        """Close the listening sockets now (idempotent): new clients are refused at once
        while the requests in progress go on. TCPServer closes its sockets."""

    def server_close(self) -> None:
        """Release the server's resources. May be extended (call super())."""
        self._log_refusals(force=True)  # refusals not yet logged: now or never
        self._close_wakeup()

    def finish_request(
        self, request: socket.socket, client_address: Any, handover: object = None
    ) -> None:
        """Finish one request by instantiating RequestHandlerClass."""
        self.RequestHandlerClass(request, client_address, self, handover)

    def shutdown_request(self, request: socket.socket) -> None:
        """Called to shut down and close an individual request."""
        self.close_request(request)

    def close_request(self, request: socket.socket) -> None:
        """Called to clean up an individual request."""

    def get_request(self) -> tuple[socket.socket, Any]:
        """Return (request, client_address). Must be overridden."""
        raise NotImplementedError

    def listeners(self) -> list[Any]:
        """What serve_forever() waits on for new requests (objects with fileno()).

        The default is the server itself; TCPServer lists each of its listening sockets.
        """
        return [self]

    def get_request_from(self, listener: Any) -> tuple[socket.socket, Any]:
        """Accept from one of listeners(); the default ignores which and calls get_request()."""
        return self.get_request()

    def fileno(self) -> int:
        """The descriptor to wait on. Must be overridden."""
        raise NotImplementedError

    # ---- accounting: slots per client and in all (see AcceptAccounting) ----

    def client_key(self, client_address: Any) -> str:
        """What a client's connections count under for max_connections_per_ip: its IP,
        or for IPv6 its network of ipv6_client_prefix bits (see socks5d.core.addresses)."""
        return client_key(client_ip(client_address), self.ipv6_client_prefix)

    @property
    def active_count(self) -> int:
        """Requests holding a slot now (admitted by process_request, not yet ended)."""
        return self.accounting.held()

    def active_for(self, client: str) -> int:
        """Requests holding a slot now for one client: an IP (an IPv6 one counts with its
        whole network, see client_key()) or a key client_key() returned."""
        return self.accounting.held(client_key(client, self.ipv6_client_prefix))

    def _admit(self, client_address: Any) -> str | None:
        """Take a slot for a new client: its key (for accounting.give_back()), or None
        when over_limit() says no. The check and the taking are one step."""
        key = self.client_key(client_address)
        if self.accounting.take_slot(key, functools.partial(self.over_limit, client_address)):
            return key
        return None

    def over_limit(self, client_address: Any) -> bool:
        """Whether a new client must go to handle_overload(): the total or its key's cap.

        Called under the accounting lock (held while the slot is taken), so it sees the
        counts as they are. May be overridden; keep it quick.
        """
        key = self.client_key(client_address)
        per_client = self.max_connections_per_ip
        if (
            per_client is not None
            and self.per_client_exempt is not None
            and self.per_client_exempt(client_address)
        ):
            per_client = None
        return bool(self.accounting.cap_reached(key, self.max_connections, per_client))

    def readdress_request(self, request: socket.socket, client_address: Any) -> bool:
        """The request's client is `client_address`, not the socket's peer (a trusted
        load balancer said so): count it under that client for max_connections_per_ip.
        False (the request must end) when that client is at its cap; the refusal is
        counted for the usual WARNING. Here (and in ForkingMixIn, whose children cannot
        reach the parent's count) nothing moves: the slot stays with the peer.
        ThreadingMixIn moves it."""
        return True

    def handle_overload(self, request: socket.socket, client_address: Any) -> None:
        """Called instead of process_request() when over_limit() says so.

        The default counts the refusal for a rate-limited WARNING (at most one line per
        overload_log_interval, with how many were refused at which cap, from any number
        of accepting threads) and closes the connection with a FIN. Override to send
        something first (then call super()).
        """
        key = self.client_key(client_address)
        cap = self.accounting.refused(key, self.max_connections, self.max_connections_per_ip)
        self.refusal_counted(cap)
        self._log_refusals()
        self.shutdown_request(request)

    def refusal_counted(self, cap: str) -> None:
        """A client was refused at `cap` (see AcceptAccounting.refused), in the accepting
        thread. May be overridden; keep it quick."""

    def _log_refusals(self, force: bool = False) -> None:
        self.accounting.log_refusals(
            self.max_connections, self.max_connections_per_ip, self.overload_log_interval, force
        )

    def wait_for_idle(self, timeout: float, cancelled: Callable[[], bool] | None = None) -> int:
        """Wait up to `timeout` s for active requests to finish (sooner if `cancelled()`).

        Returns how many are still active. Polls in short steps: handler threads and
        children end on their own schedule and have nothing to wait on together.
        """
        deadline = time.monotonic() + timeout
        step = 0.005
        while True:
            self._reap()
            active = self.active_count
            remaining = deadline - time.monotonic()
            if not active or remaining <= 0 or (cancelled is not None and cancelled()):
                return active
            time.sleep(min(step, remaining))
            step = min(step * 2, 0.05)

    def _reap(self) -> None:
        """Collect finished workers; ForkingMixIn reaps its children here."""

    def handle_error(self, request: socket.socket, client_address: Any) -> None:
        """Log the exception being handled; the server goes on. May be overridden.

        A peer that vanished (reset, broken pipe, timeout) is routine: DEBUG with the
        traceback. Anything else is a bug or an unexpected condition: ERROR with the
        traceback. Never prints.
        """
        exc = sys.exc_info()[1]
        peer = format_address(client_address)
        if isinstance(exc, _CONNECTION_ERRORS):
            logger.debug("connection error from %s: %s", peer, exc, exc_info=True)
        else:
            logger.exception("error while handling request from %s", peer)

    def _handle_error_safely(self, request: socket.socket, client_address: Any) -> None:
        # An overridden handle_error that raises must not end the loop or the thread
        # without a trace.
        try:
            self.handle_error(request, client_address)
        except Exception:
            logger.exception("handle_error() raised while handling an error")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *args: object) -> None:
        self.server_close()


def _resolve_bind_address(address: Any) -> tuple[socket.AddressFamily, Any, bool]:
    """Return (family, sockaddr, dual_stack) for a (host, port[, flowinfo, scope_id]).

    Literals need no lookup (AI_NUMERICHOST); names go through getaddrinfo and the first
    result wins. "" (or None) means all interfaces: "::" dual-stack where the system
    supports it, else 0.0.0.0. "::" itself is dual-stack too.
    """
    host, port = address[0], address[1]
    if host is None:
        host = ""
    if isinstance(host, str) and host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host == "":
        if socket.has_dualstack_ipv6():
            return socket.AF_INET6, ("::", port, 0, 0), True
        return socket.AF_INET, ("0.0.0.0", port), False
    flags = socket.AI_PASSIVE
    try:
        infos = socket.getaddrinfo(
            host, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, flags | socket.AI_NUMERICHOST
        )
    except socket.gaierror:
        infos = socket.getaddrinfo(host, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, flags)
    family = infos[0][0]
    sockaddr: Any = infos[0][4]
    if family == socket.AF_INET6 and len(address) == 4:
        # An explicit (host, port, flowinfo, scope_id) keeps its flowinfo and scope.
        sockaddr = (sockaddr[0], sockaddr[1], address[2], address[3])
    return family, sockaddr, family == socket.AF_INET6 and host == "::"


class TCPServer(BaseServer):
    """A TCP server over IPv4 or IPv6, handling one request at a time (see the mixins).

    Methods for the caller:

    - __init__(server_address, RequestHandlerClass, bind_and_activate=True, *,
               backlog=128, max_connections=None, listen_sockets=None)
    - serve_forever(poll_interval=0.5)
    - shutdown()
    - handle_request()  # if you don't use serve_forever()
    - fileno() -> int   # for the selector

    Methods that may be overridden:

    - server_bind()
    - server_activate()
    - get_request() -> request, client_address
    - handle_timeout()
    - verify_request(request, client_address)
    - process_request(request, client_address)
    - shutdown_request(request)
    - close_request(request)
    - handle_error(request, client_address)
    - handle_overload(request, client_address)
    - service_actions()
    - server_close()

    Methods for derived classes:

    - finish_request(request, client_address, handover=None)

    Class variables that may be overridden by derived classes or instances:

    - timeout
    - socket_type
    - allow_reuse_address (True: a restart can bind while old connections sit in TIME_WAIT)
    - allow_reuse_port (False)

    server_address may also be a list of addresses: the server then listens on each
    (say 127.0.0.1 and ::1), all served by one accept loop and one max_connections.

    listen_sockets=[...] adopts sockets that already listen (systemd socket activation)
    instead of binding: server_address and bind_and_activate are then ignored, and
    sockets, server_addresses and address_family come from the adopted sockets, which
    server_close() closes like its own.

    Instance variables:

    - server_address (the bound address after server_bind(): port 0 becomes the real port)
    - server_addresses (every bound address, in the order given)
    - sockets (every listening socket; socket is the first)
    - address_family (of the first address: AF_INET or AF_INET6)
    - backlog
    - max_connections
    - RequestHandlerClass
    - socket (non-blocking; accepted sockets are made blocking)
    """

    address_family: socket.AddressFamily = socket.AF_INET
    socket_type = socket.SOCK_STREAM
    allow_reuse_address = True
    allow_reuse_port = False

    def __init__(
        self,
        server_address: Any,
        RequestHandlerClass: type[BaseRequestHandler],
        bind_and_activate: bool = True,
        *,
        backlog: int = 128,
        max_connections: int | None = None,
        listen_sockets: Sequence[socket.socket] | None = None,
    ) -> None:
        """Constructor. May be extended, do not override."""
        if backlog < 0:
            raise ValueError(f"backlog must be >= 0, not {backlog}")
        if max_connections is not None and max_connections < 1:
            raise ValueError(f"max_connections must be >= 1 or None, not {max_connections}")
        # ---- adopted sockets (systemd socket activation) ----
        if listen_sockets is not None:
            self._adopt(listen_sockets, RequestHandlerClass, backlog, max_connections)
            return
        # ---- end adopted sockets ----
        # A list listens on every address in it, all served by the one accept loop (and
        # sharing max_connections); a single address is the socketserver form.
        addresses = server_address if isinstance(server_address, list) else [server_address]
        if not addresses:
            raise ValueError("no address to listen on")
        resolved = [_resolve_bind_address(address) for address in addresses]
        BaseServer.__init__(self, resolved[0][1], RequestHandlerClass)
        self.address_family = resolved[0][0]
        self.backlog = backlog
        self.max_connections = max_connections
        self.server_addresses = [sockaddr for _, sockaddr, _ in resolved]
        self._dual_stack = [dual_stack for _, _, dual_stack in resolved]
        self.sockets: list[socket.socket] = []
        try:
            for family, _, _ in resolved:
                sock = socket.socket(family, self.socket_type)
                self.sockets.append(sock)
                # Non-blocking: a connection that vanishes between poll() and accept()
                # must not block the loop (and shutdown) forever.
                sock.setblocking(False)
        except BaseException:
            for sock in self.sockets:
                sock.close()
            self._close_wakeup()
            raise
        self.socket = self.sockets[0]
        if bind_and_activate:
            try:
                self.server_bind()
                self.server_activate()
            except BaseException:
                self.server_close()
                raise

    # ---- adopted sockets (systemd socket activation) ----

    def _adopt(
        self,
        listen_sockets: Sequence[socket.socket],
        RequestHandlerClass: type[BaseRequestHandler],
        backlog: int,
        max_connections: int | None,
    ) -> None:
        """Serve on sockets that already listen (say, passed by systemd) instead of binding.

        Each must be a listening TCP socket over IPv4 or IPv6; otherwise ValueError, and
        the caller keeps the sockets. Once adopted they belong to the server:
        server_close() closes them. No bind() or listen() happens, so the backlog of
        whoever created them applies; server_address is ignored.
        """
        sockets = list(listen_sockets)
        if not sockets:
            raise ValueError("listen_sockets is empty")
        accept_conn = getattr(socket, "SO_ACCEPTCONN", None)
        for sock in sockets:
            if sock.family not in (socket.AF_INET, socket.AF_INET6):
                raise ValueError(
                    f"cannot adopt socket fd {sock.fileno()}: {sock.family.name}, "
                    "not AF_INET or AF_INET6"
                )
            if sock.type != self.socket_type:
                raise ValueError(
                    f"cannot adopt socket fd {sock.fileno()}: {sock.type.name}, "
                    f"not {self.socket_type.name}"
                )
            # An unlistening socket would make every accept() fail with EINVAL.
            if accept_conn is not None and not sock.getsockopt(socket.SOL_SOCKET, accept_conn):
                raise ValueError(f"cannot adopt socket fd {sock.fileno()}: not listening")
        BaseServer.__init__(self, sockets[0].getsockname(), RequestHandlerClass)
        self.address_family = sockets[0].family
        self.backlog = backlog
        self.max_connections = max_connections
        self.server_addresses = [sock.getsockname() for sock in sockets]
        self._dual_stack = [False] * len(sockets)
        self.sockets = sockets
        for sock in sockets:
            # As for our own sockets: a vanished connection must not block the loop.
            sock.setblocking(False)
        self.socket = sockets[0]

    # ---- end adopted sockets ----

    def server_bind(self) -> None:
        """Set socket options and bind each socket; records the real addresses.

        May be overridden.
        """
        for index, sock in enumerate(self.sockets):
            if self.allow_reuse_address and hasattr(socket, "SO_REUSEADDR"):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self.allow_reuse_port and hasattr(socket, "SO_REUSEPORT"):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if self._dual_stack[index]:
                # "::" should also take IPv4 clients (as ::ffff:a.b.c.d) whatever the
                # system default (net.ipv6.bindv6only) says.
                try:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                except (AttributeError, OSError) as exc:
                    logger.debug("cannot clear IPV6_V6ONLY, IPv6 only: %s", exc)
            try:
                sock.bind(self.server_addresses[index])
            except OSError as exc:
                # Which of several addresses failed, for the caller's error message.
                exc.bind_address = self.server_addresses[index]  # type: ignore[attr-defined]
                raise
            self.server_addresses[index] = sock.getsockname()
        self.server_address = self.server_addresses[0]

    def server_activate(self) -> None:
        """Start listening with the configured backlog. May be overridden."""
        for sock in self.sockets:
            sock.listen(self.backlog)

    def stop_listening(self) -> None:
        """Close the listening sockets now (idempotent), as a graceful stop needs."""
        for sock in self.sockets:
            sock.close()

    def server_close(self) -> None:
        """Stop listening and release the server's descriptors. May be extended."""
        self.stop_listening()
        super().server_close()

    def fileno(self) -> int:
        """The first listening socket's descriptor."""
        return self.socket.fileno()

    def listeners(self) -> list[Any]:
        """Every listening socket: one accept loop serves them all."""
        return list(self.sockets)

    def get_request(self) -> tuple[socket.socket, Any]:
        """Accept from the first listening socket (see get_request_from)."""
        return self.get_request_from(self.socket)

    def get_request_from(self, listener: Any) -> tuple[socket.socket, Any]:
        """Accept one connection and make it blocking for the handler. May be overridden."""
        request, client_address = listener.accept()
        try:
            # Linux never passes the listener's O_NONBLOCK on to an accepted socket, so one
            # Python sees as blocking already is: skip the syscall. (BSDs inherit it.)
            if sys.platform != "linux" or request.gettimeout() is not None:
                request.setblocking(True)
        except OSError:
            request.close()
            raise
        return request, client_address

    def shutdown_request(self, request: socket.socket) -> None:
        """Send FIN (SHUT_WR), then close: the peer sees a clean EOF."""
        with contextlib.suppress(OSError):  # ENOTCONN when the peer is already gone
            request.shutdown(socket.SHUT_WR)
        self.close_request(request)

    def close_request(self, request: socket.socket) -> None:
        """Close the request socket; a paused accept (EMFILE) may go on at once."""
        request.close()
        self.accounting.descriptor_freed()


class ThreadingMixIn(BaseServer):
    """Mix-in: handle each request in a thread of a pool, at most max_connections at once.

    A thread that finishes a request waits up to idle_thread_timeout for the next one
    instead of exiting (at most max_idle_threads wait): starting a thread costs tens of
    microseconds, a hand-over through a queue well under one.

    Class variables that may be overridden by derived classes or instances:

    - daemon_threads (True: a stuck handler never keeps the process alive)
    - block_on_close (True: server_close() waits for handlers, bounded by close_timeout)
    - close_timeout (5.0 seconds, in total, not per thread)
    - max_idle_threads (32; 0 starts a new thread for every request)
    - idle_thread_timeout (60.0 seconds an idle thread waits before it exits)

    Methods that may be overridden: process_request_thread(), end_request() (plus those
    of the server).

    server_close() policy: stop listening; then, if block_on_close, join the handler
    threads for at most close_timeout seconds in total; threads still running after that
    are abandoned (they are daemon threads by default, so they do not hold up exit) and
    their number is logged. Call abort_active_requests() first to make blocked handlers
    end promptly.

    Finished threads remove themselves from the bookkeeping as they end, so a long-running
    server keeps no list of dead threads.
    """

    daemon_threads = True
    block_on_close = True
    close_timeout = 5.0
    max_idle_threads = 32
    idle_thread_timeout = 60.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # State first: a failing TCPServer.__init__ calls server_close(), which uses it.
        # RLock: abort_active_requests() may run in a signal handler that interrupted
        # this same thread while it held the lock.
        self._threads_lock = threading.RLock()
        self._threads: set[threading.Thread] = set()
        # One hand-over queue per idle thread, most recently idle last (its stack and
        # caches are the warmest).
        self._idle: list[queue.SimpleQueue[_WorkItem | None]] = []
        # request -> the client key its slot is held under (see BaseServer._admit).
        self._active_requests: dict[socket.socket, str] = {}
        super().__init__(*args, **kwargs)

    def process_request(self, request: socket.socket, client_address: Any) -> None:
        """Hand the request to an idle thread or start one; handle_overload() at a cap."""
        if not self._track_request(request, client_address):
            self.handle_overload(request, client_address)
            return
        self._start_in_thread(request, client_address)

    def _track_request(self, request: socket.socket, client_address: Any) -> bool:
        """Take a slot for the request and keep it among the active ones; False at a cap."""
        key = self._admit(client_address)
        if key is None:
            return False
        with self._threads_lock:
            self._active_requests[request] = key
        return True

    def readdress_request(self, request: socket.socket, client_address: Any) -> bool:
        """Move the request's slot to the client `client_address` names (see
        BaseServer.readdress_request); False at that client's cap."""
        new = self.client_key(client_address)
        with self._threads_lock:
            old = self._active_requests.get(request)
        if old is None:  # not counted here (an embedding's own request)
            return True
        if not self.accounting.move_slot(old, new, self.max_connections_per_ip):
            self.accounting.refused(new, None, self.max_connections_per_ip)  # that cap, named
            self._log_refusals()
            return False
        with self._threads_lock:
            self._active_requests[request] = new
        return True

    def _untrack_request(self, request: socket.socket) -> None:
        """Give the request's slot back (a client that has seen EOF is no longer counted)."""
        with self._threads_lock:
            key = self._active_requests.pop(request, None)
        if key is not None:
            self.accounting.give_back(key)

    def _start_in_thread(
        self, request: socket.socket, client_address: Any, handover: object = None
    ) -> None:
        with self._threads_lock:
            idle = self._idle.pop() if self._idle else None
        if idle is not None:
            idle.put((request, client_address, handover))
            return
        thread = threading.Thread(
            target=self._thread_main,
            args=(request, client_address, handover),
            name="handler",
            daemon=self.daemon_threads,
        )
        with self._threads_lock:
            self._threads.add(thread)
        try:
            thread.start()
        except BaseException:
            with self._threads_lock:
                self._threads.discard(thread)
            self._untrack_request(request)
            raise

    def _thread_main(
        self, request: socket.socket, client_address: Any, handover: object = None
    ) -> None:
        """Serve the first request, then further ones handed over while idle."""
        try:
            item: _WorkItem | None = (request, client_address, handover)
            while item is not None:
                self.process_request_thread(*item)
                item = self._wait_for_work()
        finally:
            with self._threads_lock:
                self._threads.discard(threading.current_thread())

    def _wait_for_work(self) -> _WorkItem | None:
        handover: queue.SimpleQueue[_WorkItem | None] = queue.SimpleQueue()
        with self._threads_lock:
            if len(self._idle) >= self.max_idle_threads:
                return None
            self._idle.append(handover)
        try:
            return handover.get(timeout=self.idle_thread_timeout)
        except queue.Empty:
            with self._threads_lock:
                if handover in self._idle:
                    self._idle.remove(handover)
                    return None
            # process_request took this thread just as it timed out: the item is coming.
            return handover.get()

    def process_request_thread(
        self, request: socket.socket, client_address: Any, handover: object = None
    ) -> None:
        """Run the request in this thread; errors go to handle_error()."""
        try:
            self.finish_request(request, client_address, handover)
        except Exception:
            self._handle_error_safely(request, client_address)
        finally:
            self.end_request(request)

    def end_request(self, request: socket.socket) -> None:
        """The handler is done: give back the request's slot, then shut it down and close.

        Untracked before it is closed: abort_active_requests() must never shut down a
        descriptor number that close() has already released for reuse, and a client
        that sees EOF may count on the slot being free.
        """
        self._untrack_request(request)
        self.shutdown_request(request)

    def abort_active_requests(self) -> int:
        """shutdown(SHUT_RDWR) every active request so handlers blocked in recv/poll end.

        Returns how many sockets were shut down. Errors (peer already gone) are ignored.
        """
        count = 0
        with self._threads_lock:
            for request in list(self._active_requests):
                try:
                    request.shutdown(socket.SHUT_RDWR)
                    count += 1
                except OSError:
                    pass
        return count

    def server_close(self) -> None:
        """Stop listening, then join handlers for at most close_timeout (see class doc)."""
        super().server_close()
        with self._threads_lock:
            idle, self._idle = self._idle, []
            self.max_idle_threads = 0  # threads finishing from now on exit
        for handover in idle:
            handover.put(None)
        if not self.block_on_close:
            return
        with self._threads_lock:
            threads = [t for t in self._threads if t is not threading.current_thread()]
        deadline = time.monotonic() + self.close_timeout
        for thread in threads:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            thread.join(remaining)
        abandoned = sum(1 for t in threads if t.is_alive())
        if abandoned:
            logger.warning(
                "server_close: abandoning %d handler thread(s) still running after %.1f s",
                abandoned,
                self.close_timeout,
            )


# Signals whose parent handlers must not run in a forked child: the child is a plain
# worker that SIGTERM ends and that reaps nothing.
_CHILD_DEFAULT_SIGNALS = tuple(
    sig
    for sig in (
        getattr(signal, "SIGTERM", None),
        getattr(signal, "SIGINT", None),
        getattr(signal, "SIGHUP", None),
        getattr(signal, "SIGCHLD", None),
    )
    if sig is not None
)


class ForkingMixIn(BaseServer):
    """Mix-in: handle each request in a forked child process, at most max_connections.

    Class variables that may be overridden by derived classes or instances:

    - block_on_close (True: server_close() waits up to close_timeout for children)
    - close_timeout (5.0 seconds)
    - timeout (300: handle_request() reaps children when idle this long)

    The child closes the listening socket and the wake-up socketpair, resets SIGTERM,
    SIGINT, SIGHUP and SIGCHLD to SIG_DFL (those signals are blocked around fork(), so
    none reaches the child's copy of the parent's handlers), runs finish_request() and
    shutdown_request() and leaves with os._exit(0), or 1 after handle_error(). In a child,
    shutdown() is a harmless no-op: only the parent runs the loop.

    The parent reaps without blocking (reap_child()) in service_actions() and before the
    cap check, never blocking the loop. It reaps any child, also those that some
    other part of the process forked, so a process serving with this mixin should not
    start other child processes whose status it needs. child_exited(pid, code) may be
    overridden: it runs for each child that ended, while the child is still a zombie
    (so no other process can have its PID yet), to clean up what a child killed
    mid-request could not (shared counters it held).

    server_close() policy: stop listening; wait up to close_timeout (0 if not
    block_on_close) for the children; SIGKILL and reap the rest, logging how many. No
    child outlives server_close() and none is left a zombie. Only PIDs this server forked
    are ever signalled; a PID stays ours until we reap it, so it cannot be reused.
    """

    block_on_close = True
    close_timeout = 5.0
    timeout: float | None = 300

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # RLock: abort_active_requests() may run in a signal handler in the serving thread.
        self._children_lock = threading.RLock()
        # pid -> the client key its slot is held under (see BaseServer._admit); a child
        # counts (active_count, the caps) until it is reaped.
        self._children: dict[int, str] = {}
        super().__init__(*args, **kwargs)

    def _forget_child(self, pid: int) -> None:
        with self._children_lock:
            key = self._children.pop(pid, None)
        if key is not None:
            self.accounting.give_back(key)
            # A child's exit frees system-wide resources (ENFILE, ENOMEM): try accepting.
            self.accounting.descriptor_freed()

    def collect_children(self) -> None:
        """Reap every child that has exited, without blocking."""
        with self._children_lock:
            while self._children:
                try:
                    ended = reap_child(self._child_exited_safely)
                except ChildProcessError:
                    # No children at all: whatever we tracked is gone.
                    for pid in list(self._children):
                        self._forget_child(pid)
                    return
                if ended is None:
                    return
                self._forget_child(ended[0])

    def child_exited(self, pid: int, code: int) -> None:
        """A child ended (`code`: its exit status, or minus the signal that killed it) and
        is not reaped yet. May be overridden."""

    def _child_exited_safely(self, pid: int, code: int) -> None:
        try:
            self.child_exited(pid, code)
        except Exception:
            logger.exception("child_exited(%d) failed", pid)

    def handle_timeout(self) -> None:
        """Reap children when handle_request() has been idle for self.timeout."""
        self.collect_children()

    def _reap(self) -> None:
        self.collect_children()

    def service_actions(self) -> None:
        """Reap children on every loop iteration."""
        super().service_actions()
        self.collect_children()

    def process_request(self, request: socket.socket, client_address: Any) -> None:
        """Fork a child for the request, or hand it to handle_overload() at the cap."""
        self.collect_children()
        key = self._admit(client_address)
        if key is None:
            self.handle_overload(request, client_address)
            return
        blocked = set(_CHILD_DEFAULT_SIGNALS)
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
        # Held across fork() until the PID is recorded, so abort_active_requests() in
        # another thread cannot miss a child that is already serving.
        with self._children_lock:
            try:
                pid = os.fork()
            except BaseException:
                signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
                self.accounting.give_back(key)
                raise
            if pid:
                self._children[pid] = key
        if pid:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            self.close_request(request)
            return
        # Child: this must never return into the parent's loop, hence os._exit().
        status = 1
        try:
            try:
                self._become_child(old_mask)
                self.finish_request(request, client_address)
                status = 0
            except Exception:
                self._handle_error_safely(request, client_address)
            finally:
                self.shutdown_request(request)
        finally:
            os._exit(status)

    def _become_child(self, old_mask: Any) -> None:
        # The lock may have been held by another parent thread at fork time.
        self._children_lock = threading.RLock()
        self._children = {}
        self.accounting = AcceptAccounting()  # the parent's counts, lock and wakers are not ours
        self.stop_listening()
        # The parent may have pointed signal.set_wakeup_fd() at the socketpair we are
        # about to close (a reused descriptor number must not receive signal bytes), or
        # at some other descriptor of its own loop, which the child must not wake.
        with contextlib.suppress(ValueError, OSError):
            signal.set_wakeup_fd(-1)
        self._close_wakeup()
        for sig in _CHILD_DEFAULT_SIGNALS:
            with contextlib.suppress(OSError, ValueError):
                signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)

    def abort_active_requests(self) -> int:
        """Send SIGTERM to every live child of this server. Returns how many were signalled."""
        self.collect_children()
        count = 0
        with self._children_lock:
            pids = list(self._children)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
                count += 1
            except ProcessLookupError:
                pass
        return count

    def server_close(self) -> None:
        """Stop listening, wait for children, kill the rest (see class doc)."""
        super().server_close()
        timeout = self.close_timeout if self.block_on_close else 0.0
        deadline = time.monotonic() + timeout
        delay = 0.001
        while True:
            self.collect_children()
            remaining = deadline - time.monotonic()
            if not self.active_count or remaining <= 0:
                break
            # waitpid() has no timeout; poll with a short, growing sleep.
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, 0.05)
        with self._children_lock:
            pids = list(self._children)
            if not pids:
                return
            logger.warning(
                "server_close: killing %d child process(es) still running after %.1f s",
                len(pids),
                timeout,
            )
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            for pid in pids:
                with contextlib.suppress(ChildProcessError):
                    reap_child(self._child_exited_safely, pid, block=True)
                self._forget_child(pid)


def reap_child(
    before_reaping: Callable[[int, int], object], pid: int | None = None, block: bool = False
) -> tuple[int, int] | None:
    """Reap one ended child (`pid`, or any): (its PID, code), or None if none has ended
    yet (only when not blocking). ChildProcessError when there is no such child.

    `before_reaping(pid, code)` runs while the child is still a zombie: until it is
    reaped, its PID cannot be given to another process, so whatever is recorded under
    that PID (shared counters) is surely the dead child's. `code` is the exit status,
    or minus the number of the signal that killed it.
    """
    which, ident = (os.P_ALL, 0) if pid is None else (os.P_PID, pid)
    info = os.waitid(which, ident, os.WEXITED | os.WNOWAIT | (0 if block else os.WNOHANG))
    if info is None or not info.si_pid:  # WNOHANG and nothing has ended
        return None
    code = info.si_status if info.si_code == os.CLD_EXITED else -info.si_status
    before_reaping(info.si_pid, code)
    os.waitpid(info.si_pid, 0)  # a zombie: returns at once
    return info.si_pid, code


class ThreadingTCPServer(ThreadingMixIn, TCPServer):
    """TCPServer handling each connection in a (daemon) thread of a reused pool."""


class ForkingTCPServer(ForkingMixIn, TCPServer):
    """TCPServer with one child process per connection."""


class BaseRequestHandler:
    """Base class for request handlers: one instance per request.

    The constructor sets request, client_address, server and context (the server's:
    what the application gives every handler), then calls setup(), handle() and, in a
    finally, finish(). Override handle(); setup() and finish() may be overridden too.
    `handover` is what the request's previous owner passed along when it gave the
    request back to a thread (EventLoopMixIn.resume_in_thread); None for a fresh request.
    """

    def __init__(
        self,
        request: socket.socket,
        client_address: Any,
        server: BaseServer,
        handover: object = None,
    ) -> None:
        self.request = request
        self.client_address = client_address
        self.server = server
        self.context = server.context
        self.handover = handover
        self.setup()
        try:
            self.handle()
        finally:
            self.finish()

    def setup(self) -> None:
        """Prepare for handle(). May be overridden."""

    def handle(self) -> None:
        """Serve the request. Override this."""

    def finish(self) -> None:
        """Clean up after handle(), even if it raised. May be overridden."""


class StreamRequestHandler(BaseRequestHandler):
    """Adds rfile/wfile file objects over the request socket.

    Class variables that may be overridden:

    - rbufsize (-1: buffered reads; per-byte reads from a socket are slow)
    - wbufsize (0: unbuffered writes via sendall, nothing to forget to flush)
    - timeout (None, or seconds applied to the request socket)
    - disable_nagle_algorithm (False; only useful with wbufsize != 0)
    """

    rbufsize = -1
    wbufsize = 0
    timeout: float | None = None
    disable_nagle_algorithm = False

    rfile: io.BufferedIOBase
    wfile: io.BufferedIOBase

    def setup(self) -> None:
        self.connection = self.request
        if self.timeout is not None:
            self.connection.settimeout(self.timeout)
        if self.disable_nagle_algorithm:
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        # makefile() gives a BufferedReader/Writer, or a raw SocketIO for size 0; both
        # read/write like the annotation says.
        self.rfile = cast(io.BufferedIOBase, self.connection.makefile("rb", self.rbufsize))
        if self.wbufsize == 0:
            self.wfile = _SocketWriter(self.connection)
        else:
            self.wfile = cast(io.BufferedIOBase, self.connection.makefile("wb", self.wbufsize))

    def finish(self) -> None:
        if not self.wfile.closed:
            # The peer may be gone (ECONNRESET, EPIPE); nothing left to tell it.
            with contextlib.suppress(OSError):
                self.wfile.flush()
        self.wfile.close()
        self.rfile.close()


class _SocketWriter(io.BufferedIOBase):
    """Writable file over a socket with no buffer: write() is sendall(), flush() a no-op."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self._sock.sendall(b)
        with memoryview(b) as view:
            return view.nbytes

    def fileno(self) -> int:
        return self._sock.fileno()
