"""Serving requests from event loops as well as from a pool of handler threads.

:class:`~socks5d.core.server.ThreadingMixIn` gives every request a thread from accept to
close. :class:`EventLoopMixIn` adds event loops (:mod:`socks5d.core.eventloop`) that accept,
begin requests themselves and relay the tunnels handler threads give them, with three
moves between a loop and a thread:

- :meth:`~EventLoopMixIn.detach_request`: a request outlives the thread serving it; its
  new owner ends it with the function this returns (:meth:`~EventLoopMixIn.reclaim_request`
  undoes it);
- :meth:`~EventLoopMixIn.relay_in_loop`: a handler thread hands an established tunnel to
  a loop and goes back to the pool;
- :meth:`~EventLoopMixIn.resume_in_thread`: a loop hands a request it began to a handler
  thread, with what it passes along (the handler's ``handover``).

A detached request stays counted (max_connections, the per-client cap, active_count,
wait_for_idle, abort_active_requests) until it ends.

Knows no SOCKS: imports the core (:mod:`socks5d.core.server`) and the event loops only.
"""

from __future__ import annotations

import functools
import logging
import socket
from collections.abc import Callable
from typing import Any

from .eventloop import EventLoop, EventLoopPool
from .relay import RelayResult
from .server import TCPServer, ThreadingMixIn

__all__ = ["EventLoopMixIn", "EventLoopTCPServer", "LoopHandler"]

logger = logging.getLogger(__name__)

#: Begins a detached request in an event loop's thread:
#: (server, loop, request, client_address, finish) -> None.
LoopHandler = Callable[["EventLoopMixIn", EventLoop, socket.socket, Any, Callable[[], None]], None]


class EventLoopMixIn(ThreadingMixIn):
    """Mix-in for a thread-pool server: event loops accept and serve requests too.

    Until serve_in_loops() it is ThreadingMixIn as it is. After it the loops accept
    (serve_forever() only waits for shutdown()) and begin each request in the accepting
    loop's thread, already detached, by calling ``loop_handler(server, loop, request,
    client_address, finish)``: the handler ends the request with ``finish()``, or gives
    it to a thread with resume_in_thread(). Without a loop_handler, or when the loop
    refuses it, a request goes to a thread as usual.

    Methods for the caller:

    - serve_in_loops(loops, loop_handler=None)
    - detach_request(request) -> finish
    - reclaim_request(request) -> bool
    - resume_in_thread(request, client_address, handover=None)
    - relay_in_loop(request, other, on_done, **options) -> bool

    Instance variables:

    - loops (the EventLoopPool; None until serve_in_loops())
    - loop_handler

    stop_listening() has the loops let go of the listening sockets before they close;
    server_close() closes the loops after the threads, ending the tunnels still open.
    """

    loops: EventLoopPool | None = None
    loop_handler: LoopHandler | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Requests whose handler passed them on (detach_request): their thread leaves them.
        self._detached: set[socket.socket] = set()
        super().__init__(*args, **kwargs)

    def serve_in_loops(self, loops: EventLoopPool, loop_handler: LoopHandler | None = None) -> None:
        """Let `loops` accept from the listening sockets, begin requests with
        `loop_handler` and relay tunnels. The server owns them from now on."""
        loops.start()
        self.loops = loops
        self.loop_handler = loop_handler
        self.accept_elsewhere = True
        loops.serve_listeners(self.listeners(), self.accept_ready)
        # A closed request ends an EMFILE back-off at once, in the loops too.
        self.accounting.add_waker(loops.resume_listeners)

    def process_request(self, request: socket.socket, client_address: Any) -> None:
        """Begin the request in an event loop (the one that accepted it, else the least
        loaded), or in a thread (no loop_handler, or the loop refused); handle_overload()
        at a cap."""
        loops, begin = self.loops, self.loop_handler
        if loops is None or begin is None:
            super().process_request(request, client_address)
            return
        if not self._track_request(request, client_address):
            self.handle_overload(request, client_address)
            return
        finish = self.detach_request(request)
        try:
            here = loops.current()
            if here is not None:  # accepted by this loop: begin right here
                begin(self, here, request, client_address, finish)
                return
            loop = loops.pick()
            loop.call_soon(functools.partial(begin, self, loop, request, client_address, finish))
            return
        except Exception as exc:  # the loop is closed (the server is stopping), or worse
            logger.debug("an event loop refused a request (%s): a thread serves it", exc)
            self.reclaim_request(request)
        except BaseException:
            self.reclaim_request(request)
            self._untrack_request(request)
            raise
        self._start_in_thread(request, client_address)

    def detach_request(self, request: socket.socket) -> Callable[[], None]:
        """Let the request outlive its handler thread; returns the function that ends it.

        Called when something else (an event loop) takes the connection over: the thread
        then returns to the pool without closing the socket, and the request stays
        counted until the returned function is called, once, from any thread. That
        function shuts the request down and closes it, as the thread would have.
        """
        with self._threads_lock:
            self._detached.add(request)

        def finish() -> None:
            # ThreadingMixIn's, not ours: ours would leave a detached request alone.
            ThreadingMixIn.end_request(self, request)
            # A request a loop took straight from accept never reaches a thread's
            # end_request(): forget it here, or the set keeps every one for ever.
            # After the close: a thread that looks now finds it closed, not still open.
            with self._threads_lock:
                self._detached.discard(request)

        return finish

    def reclaim_request(self, request: socket.socket) -> bool:
        """Undo detach_request (the hand-over failed): the thread ends the request after
        all. Returns whether the request was detached."""
        with self._threads_lock:
            if request in self._detached:
                self._detached.discard(request)
                return True
            return False

    def end_request(self, request: socket.socket) -> None:
        """As ThreadingMixIn's, unless the handler detached the request: its new owner
        ends it."""
        if not self.reclaim_request(request):
            super().end_request(request)

    def resume_in_thread(
        self, request: socket.socket, client_address: Any, handover: object = None
    ) -> None:
        """Serve a detached request in a handler thread after all (from any thread): the
        thread runs the handler, given `handover` (what the previous owner passes on),
        then ends the request as usual."""
        self.reclaim_request(request)
        try:
            self._start_in_thread(request, client_address, handover)
        except BaseException:
            self._untrack_request(request)
            self.shutdown_request(request)
            raise

    def relay_in_loop(
        self,
        request: socket.socket,
        other: socket.socket,
        on_done: Callable[[RelayResult], None],
        **options: Any,
    ) -> bool:
        """Relay between a request and `other` in an event loop; the request's thread may
        then return to the pool.

        `on_done(result)` runs in the loop's thread when the tunnel ends; the request is
        ended right after it. Options as EventLoop.add(). False, with nothing changed,
        when there are no loops or they refuse (closed, out of descriptors): the caller
        relays in its thread then.
        """
        loops = self.loops
        if loops is None:
            return False
        finish = self.detach_request(request)

        def done(result: RelayResult) -> None:
            try:
                on_done(result)
            finally:
                finish()

        try:
            loops.add(request, other, done, **options)
        except Exception as exc:  # closed as the server stops, or out of descriptors
            logger.debug("an event loop refused a tunnel (%s): relaying in the thread", exc)
            self.reclaim_request(request)
            return False
        return True

    def stop_listening(self) -> None:
        """The loops let go of the listening sockets first, then they close."""
        if self.loops is not None:
            self.loops.forget_listeners()
        super().stop_listening()

    def server_close(self) -> None:
        """As ThreadingMixIn's, then close the loops: tunnels still open there end."""
        super().server_close()
        if self.loops is not None:
            self.loops.close()


class EventLoopTCPServer(EventLoopMixIn, TCPServer):
    """TCPServer with a pool of handler threads and, after serve_in_loops(), event loops."""
