"""Bidirectional byte relay between two connected stream sockets (the tunnel after CONNECT/BIND).

Owns :func:`relay` and its :class:`RelayResult`: one ``select.poll`` loop in the calling thread
that moves bytes both ways, with

* no lost bytes: a partial ``send`` keeps the rest buffered until the destination is writable;
* bounded memory: one preallocated ``buffer_size`` buffer per direction, reused through
  ``recv_into`` and memoryviews; a direction holding unwritten bytes stops reading its source
  (backpressure reaches the sender through TCP flow control);
* half-close: EOF on one side becomes ``shutdown(SHUT_WR)`` on the other once the buffered
  bytes are flushed, and the other direction keeps flowing until it ends as well;
* prompt ends on resets (ECONNRESET, EPIPE, POLLERR) and on POLLHUP of a socket that someone
  else shut down (how the server aborts tunnels when it stops);
* an optional idle timeout measured with ``time.monotonic``;
* descriptors above 1024 (``poll``, never ``select``).

It knows nothing of SOCKS and must not import anything from ``socks5d``: stdlib only.
The caller owns the sockets and closes them; ``relay`` only switches them to non-blocking for
its duration (their previous timeouts are restored) and sets ``TCP_NODELAY`` on TCP sockets.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import select
import socket
import time
from dataclasses import dataclass

__all__ = ["RelayResult", "relay"]

logger = logging.getLogger(__name__)

# errno values that mean "the peer is gone": reported as reason "reset" against that side.
_RESET_ERRNOS = frozenset({errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED})

# Read/forward rounds one direction may run per wake-up before the loop serves the other one:
# saves poll calls on a busy direction without starving the opposite one.
_MAX_ROUNDS = 8

_POLLIN = select.POLLIN
_POLLOUT = select.POLLOUT
_POLLERR = select.POLLERR
_POLLHUP = select.POLLHUP
_POLLNVAL = select.POLLNVAL


@dataclass(frozen=True, slots=True)
class RelayResult:
    """What a finished tunnel did, for the access log.

    ``closed_first`` is ``"a"`` or ``"b"`` (whose EOF or reset came first), ``"idle"`` when the
    idle timeout ended the tunnel, or ``"abort"`` on POLLHUP of a socket shut down locally by
    someone else, or on any other error. ``reason`` is short text: ``"eof"``, ``"reset"``,
    ``"idle timeout"``, ``"hangup"`` or ``"error: ..."``.
    """

    a_to_b: int  # bytes written from a to b (including ``pending_a_to_b``)
    b_to_a: int  # bytes written from b to a
    closed_first: str
    reason: str


class _End(Exception):
    """Raised inside the loop to end the tunnel with a given ``closed_first`` and ``reason``."""

    def __init__(self, closed_first: str, reason: str) -> None:
        super().__init__(closed_first, reason)
        self.closed_first = closed_first
        self.reason = reason


def _failure(side: str, exc: OSError) -> _End:
    if exc.errno in _RESET_ERRNOS:
        return _End(side, "reset")
    return _End("abort", f"error: {side}: {exc.strerror or exc}")


class _Direction:
    """One direction of the tunnel: reads ``src`` into its own buffer, writes it to ``dst``.

    Unwritten bytes are ``out[start:end]``; ``out`` is the reusable buffer, or the caller's
    pending bytes until those are delivered.
    """

    __slots__ = (
        "buf",
        "count",
        "done",
        "dst",
        "dst_fd",
        "dst_name",
        "end",
        "eof",
        "out",
        "src",
        "src_fd",
        "src_name",
        "start",
    )

    def __init__(
        self,
        src_name: str,
        src: socket.socket,
        dst_name: str,
        dst: socket.socket,
        buffer_size: int,
        pending: bytes = b"",
    ) -> None:
        self.src_name = src_name
        self.src = src
        self.src_fd = src.fileno()
        self.dst_name = dst_name
        self.dst = dst
        self.dst_fd = dst.fileno()
        self.buf = memoryview(bytearray(buffer_size))
        self.out = memoryview(pending) if pending else self.buf
        self.start = 0
        self.end = len(pending)
        self.count = 0  # bytes written to dst
        self.eof = False  # src reached EOF
        self.done = False  # EOF seen, everything flushed, dst shut down for writing

    @property
    def has_data(self) -> bool:
        return self.start < self.end

    def flush(self) -> int:
        """Send as much of the buffered data as ``dst`` accepts now; return the bytes sent."""
        sent = 0
        out = self.out
        try:
            while self.start < self.end:
                if self.start == 0 and self.end == len(out):
                    n = self.dst.send(out)
                else:
                    n = self.dst.send(out[self.start : self.end])
                if n <= 0:  # not seen on stream sockets; never spin on it
                    break
                self.start += n
                sent += n
        except BlockingIOError:
            pass
        except OSError as exc:
            raise _failure(self.dst_name, exc) from exc
        finally:
            self.count += sent
        if self.start >= self.end:
            self.start = self.end = 0
            if out is not self.buf:  # the pending bytes are delivered: back to our buffer
                self.out = self.buf
        return sent

    def pump(self) -> int:
        """Read from ``src`` and forward while both sides keep up; nonzero if any byte moved."""
        moved = 0
        size = len(self.buf)
        for _ in range(_MAX_ROUNDS):
            try:
                n = self.src.recv_into(self.buf)
            except BlockingIOError:
                break
            except OSError as exc:
                raise _failure(self.src_name, exc) from exc
            if n == 0:
                self.eof = True
                break
            self.start, self.end = 0, n
            moved += n + self.flush()
            if self.start < self.end or n < size:
                # dst is full (wait for POLLOUT), or src is most likely drained.
                break
        return moved

    def finish(self) -> None:
        """Pass the EOF on: half-close ``dst`` so its peer sees EOF while the reverse flows."""
        self.done = True
        try:
            self.dst.shutdown(socket.SHUT_WR)
        except OSError as exc:
            if exc.errno == errno.ENOTCONN:  # the peer is already gone (reset)
                raise _End(self.dst_name, "reset") from exc
            raise _failure(self.dst_name, exc) from exc


class _Relay:
    def __init__(
        self,
        a: socket.socket,
        b: socket.socket,
        idle_timeout: float | None,
        buffer_size: int,
        pending_a_to_b: bytes,
    ) -> None:
        self.ab = _Direction("a", a, "b", b, buffer_size, pending_a_to_b)
        self.ba = _Direction("b", b, "a", a, buffer_size)
        # (name, socket, fd, the direction that writes into it)
        self.sides = (
            ("a", a, self.ab.src_fd, self.ba),
            ("b", b, self.ba.src_fd, self.ab),
        )
        self.idle_timeout = idle_timeout
        self.poller = select.poll()
        self.registered: dict[int, int] = {}
        self.first_eof: str | None = None
        self.last_activity = time.monotonic()

    def result(self, closed_first: str, reason: str) -> RelayResult:
        return RelayResult(self.ab.count, self.ba.count, closed_first, reason)

    def run(self) -> RelayResult:
        try:
            while True:
                if self.ab.done and self.ba.done:
                    return self.result(self.first_eof or "a", "eof")
                self.update_registration()
                timeout_ms: int | None = None
                if self.idle_timeout is not None:
                    # Recomputed on every pass, so wake-ups that move nothing (and a poll that
                    # PEP 475 retried after EINTR) never stretch the idle deadline.
                    remaining = self.last_activity + self.idle_timeout - time.monotonic()
                    if remaining <= 0:
                        return self.result("idle", "idle timeout")
                    timeout_ms = math.ceil(remaining * 1000)
                try:
                    events = self.poller.poll(timeout_ms)
                except InterruptedError:  # pragma: no cover - PEP 475 retries poll itself
                    continue
                if events and self.serve(dict(events)):
                    self.last_activity = time.monotonic()
        except _End as end:
            return self.result(end.closed_first, end.reason)

    def update_registration(self) -> None:
        """Register exactly the events the directions wait for, as poll masks per socket."""
        want = {self.ab.src_fd: 0, self.ba.src_fd: 0}
        for d in (self.ab, self.ba):
            if d.done:
                continue
            if d.has_data:
                want[d.dst_fd] |= _POLLOUT  # backpressure: do not read src meanwhile
            elif not d.eof:
                want[d.src_fd] |= _POLLIN
        for _name, _sock, fd, into in self.sides:
            mask = want[fd]
            # A socket we still write into stays registered even with mask 0: poll always
            # reports POLLERR/POLLHUP, which is how resets and aborts are noticed while the
            # tunnel waits elsewhere. Once we have shut it down for writing, POLLHUP is
            # permanent (it comes with the peer's FIN), so watching it with nothing to read
            # would spin.
            watch = mask != 0 or not into.done
            current = self.registered.get(fd)
            if not watch:
                if current is not None:
                    self.poller.unregister(fd)
                    del self.registered[fd]
            elif current is None:
                self.poller.register(fd, mask)
                self.registered[fd] = mask
            elif current != mask:
                self.poller.modify(fd, mask)
                self.registered[fd] = mask

    def serve(self, revents: dict[int, int]) -> int:
        """Serve every ready descriptor of one wake-up; return the bytes moved."""
        for name, sock, fd, into in self.sides:
            ev = revents.get(fd, 0)
            if ev & _POLLNVAL:
                raise _End("abort", f"error: {name}: descriptor closed")
            if ev & _POLLERR:
                code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if code == 0 or code in _RESET_ERRNOS:
                    raise _End(name, "reset")
                raise _End("abort", f"error: {name}: {os.strerror(code)}")
            if ev & _POLLHUP and not into.done:
                # POLLHUP means both halves are shut. The peer alone cannot do that without
                # an error (a FIN only shuts our read half), and we have not shut the write
                # half: someone shut the socket down locally to abort the tunnel.
                raise _End("abort", "hangup")
        moved = 0
        for d in (self.ab, self.ba):
            if d.done:
                continue
            if d.has_data and revents.get(d.dst_fd, 0) & _POLLOUT:
                moved += d.flush()
            if not d.has_data and not d.eof and revents.get(d.src_fd, 0) & (_POLLIN | _POLLHUP):
                moved += d.pump()
            if d.eof:
                if self.first_eof is None:
                    self.first_eof = d.src_name
                if not d.has_data:
                    d.finish()
        return moved


def relay(
    a: socket.socket,
    b: socket.socket,
    *,
    idle_timeout: float | None = None,
    buffer_size: int = 65536,
    pending_a_to_b: bytes = b"",
) -> RelayResult:
    """Relay bytes between ``a`` (the client side) and ``b`` (the target) until both ends close.

    ``pending_a_to_b`` (bytes the client pipelined after its request) is delivered to ``b``
    before anything else read from ``a``. Returns when both directions have seen EOF and
    flushed, on a reset or error, on POLLHUP of a socket shut down locally (abort), or when no
    byte moved for ``idle_timeout`` seconds (``None``: no timeout). The sockets stay open.
    """
    if buffer_size <= 0:
        raise ValueError(f"buffer_size must be positive, not {buffer_size}")
    if idle_timeout is not None and idle_timeout <= 0:
        raise ValueError(f"idle_timeout must be positive or None, not {idle_timeout}")
    if a.fileno() < 0 or b.fileno() < 0:
        raise ValueError("relay needs two open sockets")
    if a.fileno() == b.fileno():
        raise ValueError("relay needs two distinct sockets")

    saved = [(sock, sock.gettimeout()) for sock in (a, b)]
    try:
        for sock in (a, b):
            # Each chunk is forwarded as soon as it is read; Nagle would only add latency.
            # Not TCP (socketpair, AF_UNIX): nothing to set.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setblocking(False)
        result = _Relay(a, b, idle_timeout, buffer_size, bytes(pending_a_to_b)).run()
    finally:
        for sock, timeout in saved:
            with contextlib.suppress(OSError):  # closed by someone else meanwhile
                sock.settimeout(timeout)
    logger.debug(
        "relay ended: %s (%s), a->b %d bytes, b->a %d bytes",
        result.closed_first,
        result.reason,
        result.a_to_b,
        result.b_to_a,
    )
    return result
