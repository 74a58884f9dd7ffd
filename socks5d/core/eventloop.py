"""Event loops: one thread waits on ``epoll`` for any number of watchers, tunnels among them.

An :class:`EventLoop` is a small general loop: watchers wait on descriptors
(:meth:`EventLoop.watch`), callbacks run soon (:meth:`EventLoop.call_soon`, from any
thread) or later (:meth:`EventLoop.call_later`), listening sockets are accepted from
(:meth:`EventLoop.serve_listeners`). A tunnel (:meth:`EventLoop.add`) is one kind of
watcher: the loop drives it with the same :class:`socks5d.core.relay.Tunnel` engine that
:func:`socks5d.core.relay.relay` runs inline, so the semantics (backpressure, half-close,
resets, idle timeout, splice) are the same. Everything a loop waits on implements one
interface (:class:`Watcher`): the loop calls ``on_events`` without asking what it is.

In threading mode the loops accept, and run the common handshake themselves
(socks5d.socks.fastpath: no login, CONNECT to an allowed IP); a handshake that needs more (a
login, a name to resolve, BIND, UDP, a refusal) goes to a handler thread, which
negotiates, connects, replies, then hands the two sockets back to a loop and returns to
its pool (socks5d.core.loopserver).

Why: an idle tunnel in its own thread costs ~23 KiB (stack pages, thread state, the
interpreter's frame chunk) whatever ``threading.stack_size`` says; in a loop it costs
its Python objects: about 1.6 KiB for the tunnel and its watcher, about 3.9 KiB with all
that the daemon keeps per connection (sockets, handshake and server bookkeeping), by
tracemalloc over 200 idle tunnels. And a handler thread freed right after the reply is
ready for the next client. :class:`EventLoopPool` runs several loops so bulk tunnels can
use more than one core (splice and recv/send drop the GIL).

Tunnels end in the loop's thread, which calls the ``on_done`` given with the tunnel:
that is where the owner closes the sockets and writes its log. Timers (idle timeout,
giving back a quiet tunnel's pipes, :meth:`EventLoop.call_later`) live in one heap per
loop, so a wake-up costs the same with 10 or 10,000 tunnels.

Knows no SOCKS: imports :mod:`socks5d.core.relay` and the stdlib only.
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

__all__ = ["EventLoop", "EventLoopPool", "Timer", "Watcher"]

logger = logging.getLogger(__name__)

OnDone = Callable[[RelayResult], None]

# Rebuild the timer heap once more than this many of its entries are stale and they are
# at least half of it (a tunnel that ends or moves its timer earlier, and a cancelled
# Timer, leave their old entry behind).
_STALE_SLACK = 1024

# Several loops (and worker processes) watch the same listening socket: with
# EPOLLEXCLUSIVE (Linux 4.5) a new connection wakes one of them, not all.
_EXCLUSIVE = getattr(select, "EPOLLEXCLUSIVE", 0) if hasattr(select, "epoll") else 0


class Watcher(Protocol):
    """What waits on descriptors in a loop (see :meth:`EventLoop.watch`): a tunnel, a
    listening socket, a handshake in progress."""

    def on_events(self, revents: dict[int, int]) -> None:
        """Its descriptors are ready (fd -> poll mask); runs in the loop's thread."""

    def on_loop_close(self) -> None:
        """The loop is closing with this still watched: let go of everything."""


class _Scheduled(Protocol):
    """What the timer heap holds: a :class:`Timer`, or a tunnel's next deadline."""

    def fire(self, when: float, now: float) -> None:
        """Its entry for `when` is due (it may be stale: then it only says so)."""

    def pending(self, when: float) -> bool:
        """Whether its entry for `when` may still fire (not stale, not cancelled)."""


class Timer:
    """A call_later() call; cancel() (in the loop's thread) before it fires and it never does."""

    __slots__ = ("callback", "cancelled", "loop")

    def __init__(self, loop: EventLoop, callback: Callable[[], None]) -> None:
        self.loop = loop
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            # Its heap entry is stale now: counted, so a loop that sets and cancels a
            # handshake timer per connection compacts its heap instead of growing it.
            self.loop._stale_entry()

    def fire(self, when: float, now: float) -> None:
        if self.cancelled:
            self.loop._stale -= 1
            return
        self.cancelled = True  # fired: a late cancel() is not stale
        self.loop._call(self.callback)

    def pending(self, when: float) -> bool:
        return not self.cancelled


class _TunnelWatch:
    """A tunnel in a loop (a :class:`Watcher`): its engine, its sockets, who to tell, its
    timer."""

    __slots__ = ("a", "b", "loop", "on_done", "timer_at", "tunnel")

    def __init__(
        self, loop: EventLoop, tunnel: Tunnel, a: socket.socket, b: socket.socket, on_done: OnDone
    ) -> None:
        self.loop = loop
        self.tunnel: Tunnel | None = tunnel
        self.a = a
        self.b = b
        self.on_done: OnDone | None = on_done
        self.timer_at = math.inf  # the heap entry that counts; inf: none

    def begin(self) -> None:
        """Register the tunnel and move what can move already (in the loop's thread)."""
        tunnel = self.tunnel
        assert tunnel is not None
        self.loop._tunnel_began(self, tunnel.fds)
        try:
            result = tunnel.start()
        except Exception as exc:  # a bug, not the peer: end this tunnel, keep the loop
            logger.exception("%s: starting a tunnel failed", self.loop.name)
            result = tunnel.result("abort", f"error: {exc}")
        self.loop._settle(self, result)

    def on_events(self, revents: dict[int, int]) -> None:
        tunnel = self.tunnel
        if tunnel is None:  # ended by an earlier watcher of the same wake-up
            return
        try:
            result = tunnel.serve_events(revents)
        except Exception as exc:  # a bug, not the peer: end this tunnel, keep the loop
            logger.exception("%s: relaying failed", self.loop.name)
            result = tunnel.result("abort", f"error: {exc}")
        self.loop._settle(self, result)

    def fire(self, when: float, now: float) -> None:
        tunnel = self.tunnel
        if tunnel is None or when != self.timer_at:
            self.loop._stale -= 1
            return
        self.timer_at = math.inf
        try:
            result = tunnel.on_timer(now)
        except Exception as exc:
            logger.exception("%s: a tunnel's timer failed", self.loop.name)
            result = tunnel.result("abort", f"error: {exc}")
        self.loop._settle(self, result)

    def pending(self, when: float) -> bool:
        return self.tunnel is not None and when == self.timer_at

    def on_loop_close(self) -> None:
        if self.tunnel is not None:
            self.loop._end(self, self.tunnel.result("abort", "loop closed"))
            self.loop._ended_at_close += 1


class _ListenerWatch:
    """A listening socket served from a loop: accept() when it is readable."""

    __slots__ = ("accept", "listener", "loop", "timer")

    def __init__(self, loop: EventLoop, listener: Any, accept: Callable[[Any], float]) -> None:
        self.loop = loop
        self.listener = listener
        self.accept = accept
        self.timer: Timer | None = None

    def on_events(self, revents: dict[int, int]) -> None:
        paused_until = self.accept(self.listener)
        if paused_until:
            # Out of descriptors or the like: the listener stays readable, so stop
            # watching it until the back-off ends, or the loop would spin.
            self.loop.unwatch(self.listener.fileno())
            delay = max(0.0, paused_until - time.monotonic())
            self.timer = self.loop.call_later(delay, self.resume)

    def resume(self) -> None:
        self.timer = None
        self.loop._watch_listener(self)

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
            self.loop.unwatch(self.listener.fileno())

    def on_loop_close(self) -> None:
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


class EventLoop:
    """One thread serving any number of watchers (tunnels, listeners, handshakes).

    :meth:`add`, :meth:`call_soon` and :meth:`serve_listeners` may be called from any
    thread; everything else happens in the loop's thread, started by the first of them
    (so a process that forks before serving starts its own). :meth:`close` ends the
    tunnels still open (reason ``"loop closed"``), lets the other watchers go and stops
    the thread.
    """

    def __init__(self, name: str = "event-loop") -> None:
        self.name = name
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._incoming: collections.deque[Callable[[], None]] = collections.deque()
        self._sleeping = False
        self._closing = False
        self._wake_r = self._wake_w = -1
        self._poller: _Poller | None = None
        self._by_fd: dict[int, Watcher] = {}
        self._tunnels: set[_TunnelWatch] = set()  # begun and not ended
        self._live = 0  # tunnels added and not yet ended (read from other threads)
        self._timers: list[tuple[float, int, _Scheduled]] = []
        self._stale = 0
        self._seq = itertools.count()
        self._listeners: list[_ListenerWatch] = []

    @property
    def tunnel_count(self) -> int:
        """Tunnels handed to this loop that have not ended yet."""
        return self._live

    def last_activity(self) -> float:
        """When (time.monotonic) a byte last moved in any of this loop's tunnels; -inf for
        none. Read from another thread: list() of the set is taken whole under the GIL,
        and a float read is atomic, so the answer is at worst a moment old."""
        tunnels = [watch.tunnel for watch in list(self._tunnels)]
        return max((t.last_activity for t in tunnels if t is not None), default=-math.inf)

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
        """Relay between ``a`` and ``b`` (as :func:`socks5d.core.relay.relay` would) in the loop.

        Arguments are checked here (ValueError, as ``relay``); from then on the loop owns
        the tunnel and calls ``on_done(result)`` from its thread when it ends, once. The
        sockets are made non-blocking; the caller closes them in ``on_done``.
        """
        self.start()
        watch = self._tunnel(
            a,
            b,
            on_done,
            idle_timeout=idle_timeout,
            pending_a_to_b=pending_a_to_b,
            mode=mode,
            buffer_size=buffer_size,
        )
        try:
            self._queue(watch.begin)
        except RuntimeError:
            with self._lock:
                self._live -= 1
            raise

    def add_here(self, a: socket.socket, b: socket.socket, on_done: OnDone, **options: Any) -> None:
        """:meth:`add` (same options), from the loop's own thread (a watcher's callback):
        the tunnel starts at once."""
        self._tunnel(a, b, on_done, **options).begin()

    def _tunnel(
        self, a: socket.socket, b: socket.socket, on_done: OnDone, **options: Any
    ) -> _TunnelWatch:
        prepare_sockets(a, b)
        tunnel = Tunnel(a, b, poller=self._poller, **options)
        with self._lock:
            self._live += 1
        return _TunnelWatch(self, tunnel, a, b, on_done)

    def call_soon(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` in the loop's thread, soon (from any thread)."""
        self.start()
        self._queue(callback)

    def _queue(self, callback: Callable[[], None]) -> None:
        # Checked and queued in one step: once close() has begun, the thread may already
        # have ended what it had, and nothing queued later would ever run.
        with self._lock:
            if self._closing:
                raise RuntimeError("event loop is closed")
            self._incoming.append(callback)
        # The loop sets _sleeping before it looks at _incoming one last time and then
        # waits: either it sees this item, or this sees it asleep and wakes it.
        if self._sleeping:
            self._wake()

    @property
    def thread_ident(self) -> int | None:
        """The loop thread's ident, once started."""
        return self._thread.ident if self._thread is not None else None

    def serve_listeners(self, listeners: list[Any], accept: Callable[[Any], float]) -> None:
        """Watch non-blocking listening sockets and call ``accept(listener)`` (from the
        loop's thread) when one is readable. ``accept`` returns 0.0, or a time.monotonic()
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
        watched again at once. From any thread; a closed loop ignores it."""
        with contextlib.suppress(RuntimeError):
            self.call_soon(self._resume_listeners)

    def _resume_listeners(self) -> None:
        for watch in self._listeners:
            watch.resume_now()

    def forget_listeners(self, timeout: float = 2.0) -> None:
        """Stop watching the listening sockets, before they are closed. From any thread
        but the loop's; waits (at most ``timeout``) until the loop has let them go."""
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

    # ---- for watchers, in the loop's thread only ----

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
            try:  # noqa: SIM105 (suppress() is 3 Python calls; this runs per connection)
                self._poller.unregister(fd)
            except (OSError, KeyError, ValueError):
                pass

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        """Call ``callback`` in the loop's thread after ``delay`` seconds, unless cancelled."""
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

    # ---- the loop's thread ----

    _ended_at_close = 0

    def start(self) -> None:
        """Start the thread, if not yet (the first :meth:`add` does it otherwise)."""
        with self._lock:
            if self._closing:
                raise RuntimeError("event loop is closed")
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
                self._call(incoming.popleft())
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
                watcher = by_fd.get(fd)
                if watcher is not None:
                    try:  # _notify(), inlined: this is the relay's hot path
                        watcher.on_events({fd: mask})
                    except Exception:
                        logger.exception("%s: a watcher failed", self.name)
                elif fd == wake_r:
                    self._drain_wake()
                continue
            ready: dict[Watcher, dict[int, int]] = {}
            for fd, mask in events:
                watcher = by_fd.get(fd)
                if watcher is None:
                    if fd == wake_r:
                        self._drain_wake()
                    continue
                revents = ready.get(watcher)
                if revents is None:
                    ready[watcher] = {fd: mask}
                else:
                    revents[fd] = mask
            for watcher, revents in ready.items():
                self._notify(watcher, revents)
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

    # ---- tunnels, for _TunnelWatch ----

    def _tunnel_began(self, watch: _TunnelWatch, fds: tuple[int, int]) -> None:
        for fd in fds:
            self._by_fd[fd] = watch
        self._tunnels.add(watch)

    def _settle(self, watch: _TunnelWatch, result: RelayResult | None) -> None:
        """End the tunnel with ``result``, or keep its timer right."""
        if result is not None:
            self._end(watch, result)
            return
        tunnel = watch.tunnel
        assert tunnel is not None
        when = tunnel.next_timer()
        if when < watch.timer_at:
            if watch.timer_at != math.inf:
                self._stale += 1
            watch.timer_at = when
            heapq.heappush(self._timers, (when, next(self._seq), watch))

    def _end(self, watch: _TunnelWatch, result: RelayResult) -> None:
        tunnel, on_done = watch.tunnel, watch.on_done
        assert tunnel is not None and on_done is not None
        watch.tunnel = watch.on_done = None
        if watch.timer_at != math.inf:
            self._stale += 1
        for fd in tunnel.fds:
            self._by_fd.pop(fd, None)
        self._tunnels.discard(watch)
        tunnel.close()
        with self._lock:
            self._live -= 1
        log_result(result)
        try:
            on_done(result)
        except Exception:
            logger.exception("%s: a tunnel's on_done failed", self.name)
            for sock in (watch.a, watch.b):
                sock.close()

    # ---- timers ----

    def _run_timers(self) -> float | None:
        """Fire the timers that are due; return seconds until the next (None: none)."""
        timers = self._timers
        now = time.monotonic()
        while timers and timers[0][0] <= now:
            when, _, scheduled = heapq.heappop(timers)
            scheduled.fire(when, now)
        if self._stale > _STALE_SLACK:
            self._compact_timers()
            timers = self._timers
        if not timers:
            return None
        return max(0.0, timers[0][0] - time.monotonic())

    def _stale_entry(self) -> None:
        """One more heap entry will never fire (a cancelled Timer)."""
        self._stale += 1
        if self._stale > _STALE_SLACK:
            self._compact_timers()

    def _compact_timers(self) -> None:
        """Drop the heap's stale entries, once they outnumber the live ones."""
        if self._stale <= len(self._timers) // 2:
            return  # mostly live: compacting now would cost more than it frees
        self._timers = [entry for entry in self._timers if entry[2].pending(entry[0])]
        heapq.heapify(self._timers)
        self._stale = 0

    def _end_all(self) -> None:
        """At close: run what is queued (a tunnel added last begins, to be ended at once),
        then end every tunnel and let every other watcher go."""
        while self._incoming:
            self._call(self._incoming.popleft())
        for watcher in list({id(w): w for w in self._by_fd.values()}.values()):
            try:
                watcher.on_loop_close()
            except Exception:
                logger.exception("%s: a watcher failed to close", self.name)
        self._by_fd.clear()


class EventLoopPool:
    """Several event loops; each new tunnel goes to the one holding the fewest."""

    def __init__(self, count: int, name: str = "event-loop") -> None:
        if count < 1:
            raise ValueError(f"an event loop pool needs at least one loop, not {count}")
        self.loops = [EventLoop(f"{name}-{i}") for i in range(count)]

    @property
    def tunnel_count(self) -> int:
        return sum(loop.tunnel_count for loop in self.loops)

    def last_activity(self) -> float:
        return max((loop.last_activity() for loop in self.loops), default=-math.inf)

    def start(self) -> None:
        """Start every loop now (their descriptors are then there from the start)."""
        for loop in self.loops:
            loop.start()

    def current(self) -> EventLoop | None:
        """The loop whose thread this is, if any."""
        ident = threading.get_ident()
        for loop in self.loops:
            if loop.thread_ident == ident:
                return loop
        return None

    def serve_listeners(self, listeners: list[Any], accept: Callable[[Any], float]) -> None:
        """Every loop accepts from the listeners (one per connection, by EPOLLEXCLUSIVE);
        only the first without epoll, whose poll would wake them all."""
        loops = self.loops if _EXCLUSIVE else self.loops[:1]
        for loop in loops:
            loop.serve_listeners(listeners, accept)

    def resume_listeners(self) -> None:
        """End every loop's accept back-off early (see :meth:`EventLoop.resume_listeners`)."""
        for loop in self.loops:
            loop.resume_listeners()

    def forget_listeners(self, timeout: float = 2.0) -> None:
        deadline = time.monotonic() + timeout
        for loop in self.loops:
            loop.forget_listeners(max(0.1, deadline - time.monotonic()))

    def pick(self) -> EventLoop:
        """The loop holding the fewest tunnels."""
        loops = self.loops
        return loops[0] if len(loops) == 1 else min(loops, key=_load)

    def add(self, a: socket.socket, b: socket.socket, on_done: OnDone, **options: Any) -> None:
        """As :meth:`EventLoop.add`, on the least loaded loop."""
        self.pick().add(a, b, on_done, **options)

    def close(self, timeout: float = 5.0) -> int:
        """Close every loop (within ``timeout`` in all); returns the tunnels ended."""
        deadline = time.monotonic() + timeout
        return sum(loop.close(max(0.1, deadline - time.monotonic())) for loop in self.loops)


def _load(loop: EventLoop) -> int:
    return loop.tunnel_count
