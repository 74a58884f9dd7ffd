"""Relay loops shared by many tunnels: a thread per loop, not a thread per tunnel.

In threading mode the hubs also accept, and run the common handshake themselves
(socks5d.fastpath: no login, CONNECT to an allowed IP); a handshake that needs more (a
login, a name to resolve, BIND, UDP, a refusal) goes to a handler thread, which negotiates,
connects, replies, then hands the two sockets back to a :class:`RelayHub` and returns to
its pool. The hub's one thread waits on ``epoll`` (``poll`` where there is none) for every
tunnel and handshake it holds and drives each tunnel with the same
:class:`socks5d.relay.Tunnel` engine that :func:`socks5d.relay.relay` runs inline, so the
semantics (backpressure, half-close, resets, idle timeout, splice) are the same.

Why: an idle tunnel in its own thread costs ~23 KiB (stack pages, thread state, the
interpreter's frame chunk) whatever ``threading.stack_size`` says; in a hub it costs its
Python objects: about 1.6 KiB for the tunnel and its hub entry, about 3.9 KiB with all
that the daemon keeps per connection (sockets, handshake and server bookkeeping), by
tracemalloc over 200 idle tunnels. And a thread freed right after the reply is ready for
the next client. :class:`HubPool` runs one hub per CPU so bulk tunnels still use every core
(splice and recv/send drop the GIL).

Tunnels end in the hub thread, which calls the ``on_done`` given with the tunnel: that is
where the owner closes the sockets and writes its log. Timers (idle timeout, giving back a
quiet tunnel's pipes) live in one heap per hub, so a wake-up costs the same with 10 or
10,000 tunnels.

Knows no SOCKS: imports :mod:`socks5d.relay` and the stdlib only.
"""

from __future__ import annotations

import collections
import contextlib
import heapq
import itertools
import logging
import math
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from .relay import RelayResult, Tunnel, log_result, prepare_sockets

__all__ = ["HubPool", "RelayHub", "Timer", "Watcher"]

logger = logging.getLogger(__name__)

OnDone = Callable[[RelayResult], None]

# Rebuild the timer heap once more than this many of its entries are stale and they are
# at least half of it (a tunnel that ends or moves its timer earlier, and a cancelled
# Timer, leave their old entry behind).
_STALE_SLACK = 1024

# Several hubs (and worker processes) watch the same listening socket: with
# EPOLLEXCLUSIVE (Linux 4.5) a new connection wakes one of them, not all.
_EXCLUSIVE = getattr(select, "EPOLLEXCLUSIVE", 0) if hasattr(select, "epoll") else 0


class _Entry:
    """A tunnel in a hub: its engine, its sockets, who to tell, its timer."""

    __slots__ = ("a", "b", "on_done", "timer_at", "tunnel")

    def __init__(self, tunnel: Tunnel, a: socket.socket, b: socket.socket, on_done: OnDone) -> None:
        self.tunnel: Tunnel | None = tunnel
        self.a = a
        self.b = b
        self.on_done: OnDone | None = on_done
        self.timer_at = math.inf  # the heap entry that counts; inf: none


class Watcher(Protocol):
    """Something other than a tunnel that waits on descriptors in a hub (see watch())."""

    def on_events(self, revents: dict[int, int]) -> None:
        """Its descriptors are ready (fd -> poll mask); runs in the hub thread."""

    def on_hub_close(self) -> None:
        """The hub is closing with this still watched: let go of everything."""


class Timer:
    """A call_later() call; cancel() (in the hub's thread) before it fires and it never does."""

    __slots__ = ("callback", "cancelled", "hub")

    def __init__(self, hub: RelayHub, callback: Callable[[], None]) -> None:
        self.hub = hub
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            # Its heap entry is stale now: counted, so a hub that sets and cancels a
            # handshake timer per connection compacts its heap instead of growing it.
            hub = self.hub
            hub._stale += 1
            if hub._stale > _STALE_SLACK:
                hub._compact_timers()


class _ListenerWatch:
    """A listening socket served from a hub: accept() when it is readable."""

    __slots__ = ("accept", "hub", "listener", "timer")

    def __init__(self, hub: RelayHub, listener: Any, accept: Callable[[Any], float]) -> None:
        self.hub = hub
        self.listener = listener
        self.accept = accept
        self.timer: Timer | None = None

    def on_events(self, revents: dict[int, int]) -> None:
        paused_until = self.accept(self.listener)
        if paused_until:
            # Out of descriptors or the like: the listener stays readable, so stop
            # watching it until the back-off ends, or the loop would spin.
            self.hub.unwatch(self.listener.fileno())
            delay = max(0.0, paused_until - time.monotonic())
            self.timer = self.hub.call_later(delay, self.resume)

    def resume(self) -> None:
        self.timer = None
        self.hub._watch_listener(self)

    def resume_now(self) -> None:
        """The back-off ended early (a descriptor was freed): watch again at once."""
        if self.timer is not None:
            self.timer.cancel()
            self.resume()

    def forget(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        with contextlib.suppress(OSError, ValueError):
            self.hub.unwatch(self.listener.fileno())

    def on_hub_close(self) -> None:
        self.forget()


class _Poller:
    """epoll where there is one, else poll, behind one interface (timeouts in seconds)."""

    def __init__(self) -> None:
        epoll = getattr(select, "epoll", None)
        self._epoll = epoll() if epoll is not None else None
        self._poll = select.poll() if self._epoll is None else None
        self.exclusive = _EXCLUSIVE if self._epoll is not None else 0
        target: Any = self._epoll if self._epoll is not None else self._poll
        self.register = target.register
        self.modify = target.modify
        self.unregister = target.unregister

    def poll(self, timeout: float | None) -> list[tuple[int, int]]:
        if self._epoll is not None:
            return self._epoll.poll(-1 if timeout is None else timeout)
        assert self._poll is not None
        return self._poll.poll(None if timeout is None else math.ceil(timeout * 1000))

    def close(self) -> None:
        if self._epoll is not None:
            self._epoll.close()


class RelayHub:
    """One thread relaying any number of tunnels.

    :meth:`add` may be called from any thread; everything else about a tunnel happens in
    the hub's thread, started by the first :meth:`add` (so a process that forks before
    serving starts its own). :meth:`close` ends the tunnels still open (reason ``"hub
    closed"``) and stops the thread.
    """

    def __init__(self, name: str = "relay-hub") -> None:
        self.name = name
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._incoming: collections.deque[_Entry | Callable[[], None]] = collections.deque()
        self._sleeping = False
        self._closing = False
        self._wake_r = self._wake_w = -1
        self._poller: _Poller | None = None
        self._by_fd: dict[int, _Entry | Watcher] = {}
        self._live = 0  # tunnels added and not yet ended (read from other threads)
        self._timers: list[tuple[float, int, _Entry | Timer]] = []
        self._stale = 0
        self._seq = itertools.count()
        self._listeners: list[_ListenerWatch] = []

    @property
    def tunnel_count(self) -> int:
        """Tunnels handed to this hub that have not ended yet."""
        return self._live

    def last_activity(self) -> float:
        """When (time.monotonic) a byte last moved in any of this hub's tunnels; -inf for
        none. Read from another thread: list() of the dict is taken whole under the GIL,
        and a float read is atomic, so the answer is at worst a moment old."""
        entries = list(self._by_fd.values())
        return max(
            (e.tunnel.last_activity for e in entries if isinstance(e, _Entry) and e.tunnel),
            default=-math.inf,
        )

    def add(
        self,
        a: socket.socket,
        b: socket.socket,
        on_done: OnDone,
        *,
        idle_timeout: float | None = None,
        pending_a_to_b: bytes = b"",
        mode: str | None = None,
        buffer_size: int | None = None,
    ) -> None:
        """Relay between ``a`` and ``b`` (as :func:`socks5d.relay.relay` would) in the hub.

        Arguments are checked here (ValueError, as ``relay``); from then on the hub owns the
        tunnel and calls ``on_done(result)`` from its thread when it ends, once. The sockets
        are made non-blocking; the caller closes them in ``on_done``.
        """
        self.start()
        entry = self._entry(
            a,
            b,
            on_done,
            idle_timeout=idle_timeout,
            pending_a_to_b=pending_a_to_b,
            mode=mode,
            buffer_size=buffer_size,
        )
        try:
            self._queue(entry)
        except RuntimeError:
            with self._lock:
                self._live -= 1
            raise

    def add_here(self, a: socket.socket, b: socket.socket, on_done: OnDone, **options: Any) -> None:
        """:meth:`add` (same options), from the hub's own thread (a watcher's callback):
        the tunnel starts at once."""
        self._begin(self._entry(a, b, on_done, **options))

    def _entry(self, a: socket.socket, b: socket.socket, on_done: OnDone, **options: Any) -> _Entry:
        prepare_sockets(a, b)
        tunnel = Tunnel(a, b, poller=self._poller, **options)
        with self._lock:
            self._live += 1
        return _Entry(tunnel, a, b, on_done)

    def call_soon(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` in the hub's thread, soon (from any thread)."""
        self.start()
        self._queue(callback)

    def _queue(self, item: _Entry | Callable[[], None]) -> None:
        # Checked and queued in one step: once close() has begun, the thread may already
        # have ended what it had, and nothing queued later would ever run.
        with self._lock:
            if self._closing:
                raise RuntimeError("relay hub is closed")
            self._incoming.append(item)
        # The hub sets _sleeping before it looks at _incoming one last time and then
        # waits: either it sees this item, or this sees it asleep and wakes it.
        if self._sleeping:
            self._wake()

    @property
    def thread_ident(self) -> int | None:
        """The hub thread's ident, once started."""
        return self._thread.ident if self._thread is not None else None

    def serve_listeners(self, listeners: list[Any], accept: Callable[[Any], float]) -> None:
        """Watch non-blocking listening sockets and call ``accept(listener)`` (from the
        hub's thread) when one is readable. ``accept`` returns 0.0, or a time.monotonic()
        until which to stop watching (a back-off after EMFILE). From any thread."""
        self.call_soon(lambda: self._serve_listeners(listeners, accept))

    def _serve_listeners(self, listeners: list[Any], accept: Callable[[Any], float]) -> None:
        for listener in listeners:
            watch = _ListenerWatch(self, listener, accept)
            self._listeners.append(watch)
            self._watch_listener(watch)

    def _watch_listener(self, watch: _ListenerWatch) -> None:
        if watch in self._listeners:
            assert self._poller is not None
            fd = watch.listener.fileno()
            self._poller.register(fd, select.POLLIN | self._poller.exclusive)
            self._by_fd[fd] = watch

    def resume_listeners(self) -> None:
        """End an accept back-off early: listeners paused by ``accept``'s return value are
        watched again at once. From any thread; a closed hub ignores it."""
        with contextlib.suppress(RuntimeError):
            self.call_soon(self._resume_listeners)

    def _resume_listeners(self) -> None:
        for watch in self._listeners:
            watch.resume_now()

    def forget_listeners(self, timeout: float = 2.0) -> None:
        """Stop watching the listening sockets, before they are closed. From any thread
        but the hub's; waits (at most ``timeout``) until the hub has let them go."""
        done = threading.Event()

        def forget() -> None:
            listeners, self._listeners = self._listeners, []
            for watch in listeners:
                watch.forget()
            done.set()

        try:
            self.call_soon(forget)
        except RuntimeError:
            return  # closed: it watches nothing
        done.wait(timeout)

    # ---- for watchers, in the hub's thread only ----

    def watch(self, fd: int, mask: int, watcher: Watcher) -> None:
        """Call ``watcher.on_events`` when ``fd`` is ready for ``mask`` (poll bits)."""
        assert self._poller is not None
        self._poller.register(fd, mask)
        self._by_fd[fd] = watcher

    def rewatch(self, fd: int, mask: int) -> None:
        assert self._poller is not None
        self._poller.modify(fd, mask)

    def unwatch(self, fd: int) -> None:
        if self._by_fd.pop(fd, None) is not None and self._poller is not None:
            with contextlib.suppress(OSError, KeyError, ValueError):
                self._poller.unregister(fd)

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        """Call ``callback`` in the hub's thread after ``delay`` seconds, unless cancelled."""
        timer = Timer(self, callback)
        heapq.heappush(self._timers, (time.monotonic() + delay, next(self._seq), timer))
        return timer

    def close(self, timeout: float = 5.0) -> int:
        """End every tunnel still open, stop the thread; returns how many were ended."""
        with self._lock:
            self._closing = True
            thread = self._thread
        if thread is None:
            return 0
        self._wake()
        thread.join(timeout)
        if thread.is_alive():
            logger.warning("%s: thread still running %.1f s after close", self.name, timeout)
            return self._live
        ended, self._ended_at_close = self._ended_at_close, 0
        wake_r, wake_w = self._wake_r, self._wake_w
        self._wake_r = self._wake_w = -1  # a second close() must not touch the numbers
        for fd in (wake_r, wake_w):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        if self._poller is not None:
            self._poller.close()
            self._poller = None
        return ended

    # ---- the hub's thread ----

    _ended_at_close = 0

    def start(self) -> None:
        """Start the thread, if not yet (the first :meth:`add` does it otherwise)."""
        with self._lock:
            if self._closing:
                raise RuntimeError("relay hub is closed")
            if self._thread is None:
                self._start()

    def _start(self) -> None:
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._poller = _Poller()
        self._poller.register(self._wake_r, select.POLLIN)
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def _wake(self) -> None:
        if self._wake_w < 0:
            return
        with contextlib.suppress(OSError):  # full (a wake-up is pending anyway) or closed
            os.write(self._wake_w, b"\0")

    def _run(self) -> None:
        poller = self._poller
        assert poller is not None
        wake_r = self._wake_r
        by_fd = self._by_fd
        incoming = self._incoming
        while True:
            while incoming:
                item = incoming.popleft()
                if isinstance(item, _Entry):
                    self._begin(item)
                else:
                    self._call(item)
            if self._closing:
                break
            timeout = self._run_timers()
            self._sleeping = True
            if incoming or self._closing:
                self._sleeping = False
                continue
            try:
                events = poller.poll(timeout)
            finally:
                self._sleeping = False
            if len(events) == 1:  # the common case: one socket of one tunnel
                fd, mask = events[0]
                entry = by_fd.get(fd)
                if isinstance(entry, _Entry):
                    self._serve(entry, {fd: mask})
                elif entry is not None:
                    self._notify(entry, {fd: mask})
                elif fd == wake_r:
                    self._drain_wake()
                continue
            ready: dict[_Entry | Watcher, dict[int, int]] = {}
            for fd, mask in events:
                entry = by_fd.get(fd)
                if entry is None:
                    if fd == wake_r:
                        self._drain_wake()
                    continue
                revents = ready.get(entry)
                if revents is None:
                    ready[entry] = {fd: mask}
                else:
                    revents[fd] = mask
            for entry, revents in ready.items():
                if not isinstance(entry, _Entry):
                    self._notify(entry, revents)
                elif entry.tunnel is not None:  # not ended by an earlier one's on_done
                    self._serve(entry, revents)
        self._end_all()

    def _drain_wake(self) -> None:
        with contextlib.suppress(OSError):
            while os.read(self._wake_r, 4096):
                pass

    def _call(self, callback: Callable[[], None]) -> None:
        try:
            callback()
        except Exception:
            logger.exception("%s: a callback failed", self.name)

    def _notify(self, watcher: Watcher, revents: dict[int, int]) -> None:
        try:
            watcher.on_events(revents)
        except Exception:
            logger.exception("%s: a watcher failed", self.name)

    def _begin(self, entry: _Entry) -> None:
        tunnel = entry.tunnel
        assert tunnel is not None
        for fd in tunnel.fds:
            self._by_fd[fd] = entry
        try:
            result = tunnel.start()
        except Exception as exc:  # a bug, not the peer: end this tunnel, keep the hub
            logger.exception("%s: starting a tunnel failed", self.name)
            result = tunnel.result("abort", f"error: {exc}")
        self._settle(entry, result)

    def _serve(self, entry: _Entry, revents: dict[int, int]) -> None:
        tunnel = entry.tunnel
        assert tunnel is not None
        try:
            result = tunnel.serve_events(revents)
        except Exception as exc:  # a bug, not the peer: end this tunnel, keep the hub
            logger.exception("%s: relaying failed", self.name)
            result = tunnel.result("abort", f"error: {exc}")
        self._settle(entry, result)

    def _settle(self, entry: _Entry, result: RelayResult | None) -> None:
        """End the tunnel with ``result``, or keep its timer right."""
        if result is not None:
            self._end(entry, result)
            return
        tunnel = entry.tunnel
        assert tunnel is not None
        when = tunnel.next_timer()
        if when < entry.timer_at:
            if entry.timer_at != math.inf:
                self._stale += 1
            entry.timer_at = when
            heapq.heappush(self._timers, (when, next(self._seq), entry))

    def _run_timers(self) -> float | None:
        """Fire the timers that are due; return seconds until the next (None: none)."""
        timers = self._timers
        now = time.monotonic()
        while timers and timers[0][0] <= now:
            when, _, entry = heapq.heappop(timers)
            if isinstance(entry, Timer):
                if entry.cancelled:
                    self._stale -= 1
                else:
                    entry.cancelled = True  # fired: a late cancel() is not stale
                    self._call(entry.callback)
                continue
            assert isinstance(entry, _Entry)
            if entry.tunnel is None or when != entry.timer_at:
                self._stale -= 1
                continue
            entry.timer_at = math.inf
            try:
                result = entry.tunnel.on_timer(now)
            except Exception as exc:
                logger.exception("%s: a tunnel's timer failed", self.name)
                result = entry.tunnel.result("abort", f"error: {exc}")
            self._settle(entry, result)
        if self._stale > _STALE_SLACK:
            self._compact_timers()
            timers = self._timers
        if not timers:
            return None
        return max(0.0, timers[0][0] - time.monotonic())

    def _compact_timers(self) -> None:
        """Drop the heap's stale entries, once they outnumber the live ones."""
        if self._stale <= len(self._timers) // 2:
            return  # mostly live: compacting now would cost more than it frees
        self._timers = [t for t in self._timers if _pending(t)]
        heapq.heapify(self._timers)
        self._stale = 0

    def _end(self, entry: _Entry, result: RelayResult) -> None:
        tunnel, on_done = entry.tunnel, entry.on_done
        assert tunnel is not None and on_done is not None
        entry.tunnel = entry.on_done = None
        if entry.timer_at != math.inf:
            self._stale += 1
        for fd in tunnel.fds:
            self._by_fd.pop(fd, None)
        tunnel.close()
        with self._lock:
            self._live -= 1
        log_result(result)
        try:
            on_done(result)
        except Exception:
            logger.exception("%s: a tunnel's on_done failed", self.name)
            for sock in (entry.a, entry.b):
                sock.close()

    def _end_all(self) -> None:
        """At close: end what is left, open tunnels and ones never begun; let watchers go."""
        ended = 0
        while self._incoming:
            item = self._incoming.popleft()
            if isinstance(item, _Entry):
                if item.tunnel is not None:
                    self._end(item, item.tunnel.result("abort", "hub closed"))
                    ended += 1
            else:
                self._call(item)  # (a watcher it starts is let go below)
        for entry in list({id(e): e for e in self._by_fd.values()}.values()):
            if isinstance(entry, _Entry):
                if entry.tunnel is not None:
                    self._end(entry, entry.tunnel.result("abort", "hub closed"))
                    ended += 1
            else:
                try:
                    entry.on_hub_close()
                except Exception:
                    logger.exception("%s: a watcher failed to close", self.name)
        self._by_fd.clear()
        self._ended_at_close = ended


class HubPool:
    """Several hubs; each new tunnel goes to the one holding the fewest."""

    def __init__(self, count: int, name: str = "relay-hub") -> None:
        if count < 1:
            raise ValueError(f"a hub pool needs at least one hub, not {count}")
        self.hubs = [RelayHub(f"{name}-{i}") for i in range(count)]

    @property
    def tunnel_count(self) -> int:
        return sum(hub.tunnel_count for hub in self.hubs)

    def last_activity(self) -> float:
        return max((hub.last_activity() for hub in self.hubs), default=-math.inf)

    def start(self) -> None:
        """Start every hub now (their descriptors are then there from the start)."""
        for hub in self.hubs:
            hub.start()

    def current(self) -> RelayHub | None:
        """The hub whose thread this is, if any."""
        ident = threading.get_ident()
        for hub in self.hubs:
            if hub.thread_ident == ident:
                return hub
        return None

    def serve_listeners(self, listeners: list[Any], accept: Callable[[Any], float]) -> None:
        """Every hub accepts from the listeners (one per connection, by EPOLLEXCLUSIVE);
        only the first without epoll, whose poll would wake them all."""
        hubs = self.hubs if _EXCLUSIVE else self.hubs[:1]
        for hub in hubs:
            hub.serve_listeners(listeners, accept)

    def resume_listeners(self) -> None:
        """End every hub's accept back-off early (see :meth:`RelayHub.resume_listeners`)."""
        for hub in self.hubs:
            hub.resume_listeners()

    def forget_listeners(self, timeout: float = 2.0) -> None:
        deadline = time.monotonic() + timeout
        for hub in self.hubs:
            hub.forget_listeners(max(0.1, deadline - time.monotonic()))

    def pick(self) -> RelayHub:
        """The hub holding the fewest tunnels."""
        hubs = self.hubs
        return hubs[0] if len(hubs) == 1 else min(hubs, key=_load)

    def add(self, a: socket.socket, b: socket.socket, on_done: OnDone, **options: Any) -> None:
        """As :meth:`RelayHub.add`, on the least loaded hub."""
        self.pick().add(a, b, on_done, **options)

    def close(self, timeout: float = 5.0) -> int:
        """Close every hub (within ``timeout`` in all); returns the tunnels ended."""
        deadline = time.monotonic() + timeout
        return sum(hub.close(max(0.1, deadline - time.monotonic())) for hub in self.hubs)


def _pending(timer: tuple[float, int, _Entry | Timer]) -> bool:
    """Whether a heap entry may still fire (not stale, not cancelled, not ended)."""
    when, _, item = timer
    if isinstance(item, Timer):
        return not item.cancelled
    assert isinstance(item, _Entry)
    return item.tunnel is not None and when == item.timer_at


def _load(hub: RelayHub) -> int:
    return hub.tunnel_count
