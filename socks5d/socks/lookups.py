"""Blocking lookups (getaddrinfo) with a time limit, on a bounded set of threads.

getaddrinfo cannot be cancelled or given a timeout: with a resolver that never answers it
blocks for as long as the C library's own retries take (10 s with glibc's defaults, more
with several name servers), whatever our timeouts say. So a lookup runs on a worker thread
of a :class:`LookupPool` and its caller waits for it at most a given time. A lookup that
was given up keeps its worker until getaddrinfo returns, and counts against the pool's bound
until then: when every worker is taken, the next lookup fails at once (:class:`LookupBusy`)
instead of queueing, so a flood of never-answering names costs at most ``max_threads``
threads and each of its clients an immediate answer.

Workers are daemon threads, so a lookup stuck at shutdown never holds the process; an idle
worker exits after ``idle_seconds``. A forked child starts with an empty pool (the parent's
threads do not exist there; see shmem.ProcessLocal). Knows nothing of SOCKS; imports only
the standard library and shmem.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from ..core.shmem import ProcessLocal

__all__ = ["LOOKUPS", "LookupBusy", "LookupPool", "LookupTimedOut"]

Result = TypeVar("Result")

# Lookups in flight at once in one process, abandoned ones included. Far above what a
# healthy resolver needs (a lookup takes milliseconds), low enough that a flood of names
# that never resolve costs a bounded number of threads (each a few dozen KiB resident).
DEFAULT_MAX_THREADS = 64
# An idle worker waits this long for the next lookup before it exits.
DEFAULT_IDLE_SECONDS = 30.0


class LookupBusy(Exception):
    """Every worker is busy (with lookups that may never finish): try again later."""


class LookupTimedOut(TimeoutError):
    """The lookup did not finish in time; it goes on in its worker, unwatched."""


Job = tuple[Future, Callable[..., Any], tuple[Any, ...]]


class LookupPool(ProcessLocal):
    """At most ``max_threads`` lookups at once, each on its own daemon worker thread.

    ``submit`` hands back a Future; ``run`` waits for it within a timeout. Invariant: there
    are at least as many workers as lookups in flight (admitted and not finished), so an
    admitted lookup starts at once and none waits behind a stuck one.
    """

    def __init__(
        self,
        max_threads: int = DEFAULT_MAX_THREADS,
        idle_seconds: float = DEFAULT_IDLE_SECONDS,
        name: str = "socks5d-lookup",
    ) -> None:
        if max_threads < 1:
            raise ValueError(f"max_threads must be at least 1, not {max_threads}")
        self.max_threads = max_threads
        self.idle_seconds = idle_seconds
        self.name = name
        self._register()

    def _start_process(self) -> None:
        """A fresh, empty pool: the parent's workers and jobs do not exist in a forked child."""
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue[Job] = queue.SimpleQueue()
        self._in_flight = 0  # admitted and not finished, abandoned ones included
        self._threads = 0  # workers alive

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def threads(self) -> int:
        return self._threads

    def submit(self, function: Callable[..., Result], *args: Any) -> Future[Result]:
        """Start ``function(*args)`` on a worker; LookupBusy when ``max_threads`` run already."""
        future: Future[Result] = Future()
        with self._lock:
            if self._in_flight >= self.max_threads:
                raise LookupBusy(f"{self._in_flight} lookups in flight")
            self._in_flight += 1
            if self._threads < self._in_flight:
                self._start_worker()
            self._jobs.put((future, function, args))
        return future

    def run(self, function: Callable[..., Result], *args: Any, timeout: float) -> Result:
        """``function(*args)`` on a worker, waited for at most ``timeout`` seconds.

        Raises LookupTimedOut when it takes longer (it goes on, unwatched), LookupBusy when
        no worker is free, else whatever the function raised.
        """
        future = self.submit(function, *args)
        try:
            return future.result(timeout)
        except TimeoutError:  # concurrent.futures.TimeoutError is TimeoutError (3.11)
            future.cancel()  # only takes effect if it has not started
            raise LookupTimedOut(f"lookup took longer than {timeout:g} s") from None

    def _start_worker(self) -> None:
        # Called with the lock held. A daemon thread: a getaddrinfo that never returns must
        # not keep the process alive at exit.
        worker = threading.Thread(target=self._work, name=self.name, daemon=True)
        worker.start()
        self._threads += 1

    def _work(self) -> None:
        while True:
            try:
                future, function, args = self._jobs.get(timeout=self.idle_seconds)
            except queue.Empty:
                with self._lock:
                    # Leave only if the rest still cover every lookup in flight.
                    if self._threads > self._in_flight:
                        self._threads -= 1
                        return
                continue
            if future.set_running_or_notify_cancel():
                try:
                    result = function(*args)
                except BaseException as exc:  # handed to the caller, not raised here
                    future.set_exception(exc)
                else:
                    future.set_result(result)
            del future, function, args  # no reference to the result while idle
            with self._lock:
                self._in_flight -= 1


#: The process-wide pool every name lookup of the proxy goes through.
LOOKUPS = LookupPool()
