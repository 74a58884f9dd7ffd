"""Bidirectional byte relay between two connected stream sockets (the tunnel after CONNECT/BIND).

Owns :func:`relay` and its :class:`RelayResult`: one ``select.poll`` loop in the calling thread
that moves bytes both ways, with

* no lost bytes: a partial write keeps the rest pending until the destination is writable;
* bounded memory: each direction holds at most ``buffer_size`` unwritten bytes (its backlog);
  a direction with a backlog stops reading its source, so backpressure reaches the sender
  through TCP flow control;
* half-close: EOF on one side becomes ``shutdown(SHUT_WR)`` on the other once the backlog is
  flushed, and the other direction keeps flowing until it ends as well;
* prompt ends on resets (ECONNRESET, EPIPE, POLLERR) and on POLLHUP of a socket that someone
  else shut down (how the server aborts tunnels when it stops);
* an optional idle timeout measured with ``time.monotonic``;
* descriptors above 1024 (``poll``, never ``select``).

Two ways to move the bytes, same loop, same semantics (``mode``):

* ``"splice"`` (Linux): per direction a non-blocking pipe; ``os.splice`` moves socket -> pipe
  -> socket without copying through user space, and the bytes in the pipe are the backlog.
  Splice is given up for ``"copy"`` (for that direction; the pipe's bytes go first) when the
  kernel refuses the socket (EINVAL), the syscall is missing or forbidden (ENOSYS; EPERM from
  seccomp: then for the whole process), no descriptor is left for a pipe, TCP urgent data
  stops splice at its mark, or the socket's class overrides its I/O (``ssl.SSLSocket``).
* ``"copy"``: ``recv_into`` one reusable buffer per direction, ``send`` from memoryviews.
* ``"auto"`` (the default): copy a direction's first 256 KiB (a short request, a
  ping-pong: recv+send beat a pipe's setup and two splices per message), then splice;
  and copy while a new pipe cannot get its normal 16 pages (an unprivileged user past
  ``/proc/sys/fs/pipe-user-pages-soft`` gets 2-page pipes, the slowest row below).
  ``"splice"`` splices from the first byte through whatever pipe it gets.

Pipes and buffers are created when data first flows their way, at 64 KiB; they grow to
``buffer_size`` (default 1 MiB; pipes at most ``/proc/sys/fs/pipe-max-size``) on a bulk
transfer, and are given back when empty after ``RELEASE_AFTER`` quiet seconds and at EOF. An
idle tunnel holds no pipe and no buffer: about 1.6 KiB of Python objects besides its sockets
(tracemalloc, 200 idle tunnels in a loop; see socks5d.core.eventloop for the whole connection).
Full-size copy buffers come out of one process-wide ``GROWN_BUFFER_BUDGET``: a direction
whose reader stalls keeps its buffer full, and pipes (kernel memory, capped per user by
``pipe-user-pages-soft``) are not there to take over when a flood of such tunnels has used
them up; past the budget a direction keeps to 64 KiB reads.

Measured on the development VM (2 vCPU, Linux 6.18, loopback; sender, relay, receiver in three
processes; medians of 6 interleaved rounds on a busy machine: walls are noisy, CPU is not).
Relay CPU is the relay threads' CPU time::

                         1 GiB, 1 stream         8 x 128 MiB at once
                         relay CPU   wall        relay CPU   wall
    copy,    64 KiB        0.60 s   1.15 s         0.78 s   1.05 s
    copy,   256 KiB        0.54 s   1.06 s         0.73 s   1.02 s
    copy,     1 MiB        0.39 s   0.88 s         0.51 s   0.74 s
    splice,  64 KiB        0.46 s   1.05 s         0.48 s   0.87 s
    splice, 256 KiB        0.39 s   0.96 s         0.37 s   0.66 s
    splice,   1 MiB        0.29 s   0.72 s         0.24 s   0.50 s
    splice, 2 pages        2.05 s   3.17 s         2.21 s   2.52 s

Small messages (64 B and 16 KiB ping-pong) cost the same relay CPU either way (~27 us per
round trip). Hence splice with 1 MiB pipes by default, 1 MiB copy buffers as the fallback.

It knows nothing of SOCKS and must not import anything from ``socks5d``: stdlib only.
The caller owns the sockets and closes them; ``relay`` only switches them to non-blocking for
its duration (their previous timeouts are restored) and sets ``TCP_NODELAY`` on TCP sockets.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import math
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .shmem import ProcessLocal

__all__ = [
    "LOCAL_SOCKET_BUFFER",
    "MODES",
    "RELEASE_AFTER",
    "SPLICE_AVAILABLE",
    "RelayResult",
    "Tunnel",
    "fix_socket_buffers",
    "get_default_mode",
    "log_result",
    "prepare_sockets",
    "relay",
    "restore_timeouts",
    "set_default_mode",
    "socket_buffer_for",
]

logger = logging.getLogger(__name__)

MODES = ("auto", "splice", "copy")

# os.splice exists on Linux only (Python >= 3.10). Looked up through this module-level name on
# every call, so tests can wrap it.
_splice = getattr(os, "splice", None)
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)
_F_SETPIPE_SZ: int | None = getattr(fcntl, "F_SETPIPE_SZ", None)
SPLICE_AVAILABLE = _splice is not None

# Errors that mean "splice cannot serve this socket/process", not "the peer is gone": the
# direction falls back to recv_into/send. EINVAL: a socket type without splice support; ENOSYS,
# EPERM: the syscall is missing or forbidden (seccomp with SystemCallErrorNumber=EPERM).
_SPLICE_REFUSED = frozenset({errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS, errno.EPERM})
# Of those, the ones that will not change for this process: stop trying splice at all.
_SPLICE_GONE = frozenset({errno.ENOSYS, errno.EPERM})
_splice_gone = False

# Per-direction backlog bound when the caller gives no buffer_size (chosen by measurement,
# see the module docstring): the copy path's read buffer and the splice path's pipe size.
_COPY_BUFFER_SIZE = 1024 * 1024
_PIPE_SIZE = 1024 * 1024
# Where both start: a new pipe's size (16 pages). Small exchanges never need more, and the
# kernel charges a pipe's full size against the user's pipe-user-pages-soft.
_FIRST_CHUNK = 65536


_thread_local = threading.local()


def _default_grown_budget() -> int:
    """An eighth of physical memory, at most 256 MiB: room for 256 bulk copy-path
    directions at full size, while a flood of stalled tunnels cannot reach OOM."""
    try:
        physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        physical = 2 << 30
    return max(min(256 << 20, physical // 8), _COPY_BUFFER_SIZE)


# Bytes of full-size copy buffers all directions of this process hold at once. A direction
# whose reader is stalled keeps its buffer full until the reader drains it; without a bound,
# N stalled tunnels (pipes past pipe-user-pages-soft fall back to copying) held N x 1 MiB.
# Past the budget a bulk direction keeps to the 64 KiB path (slower, never stuck).
GROWN_BUFFER_BUDGET = _default_grown_budget()
_grown_bytes = 0
_grown_lock = threading.Lock()


def _take_grown(size: int) -> bool:
    """Book `size` bytes of the grown-buffer budget; False when it is spent."""
    global _grown_bytes
    with _grown_lock:
        if _grown_bytes + size > GROWN_BUFFER_BUDGET:
            return False
        _grown_bytes += size
        return True


def _give_back_grown(size: int) -> None:
    global _grown_bytes
    with _grown_lock:
        _grown_bytes -= size


def grown_buffer_bytes() -> int:
    """Bytes of full-size copy buffers held now (for tests and diagnostics)."""
    return _grown_bytes


def _scratch(size: int) -> memoryview:
    """This thread's read buffer for small exchanges (at most ``size`` bytes of it)."""
    buf: memoryview | None = getattr(_thread_local, "scratch", None)
    if buf is None:
        buf = _thread_local.scratch = memoryview(bytearray(_FIRST_CHUNK))
    return buf if size >= len(buf) else buf[:size]


def _pipe_max_size() -> int:
    """The largest pipe an unprivileged process may ask for (a sysctl, 1 MiB by default)."""
    try:
        with open("/proc/sys/fs/pipe-max-size", "rb") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1024 * 1024


_PIPE_MAX_SIZE = _pipe_max_size() if SPLICE_AVAILABLE else 0

# Seconds without traffic after which an empty pipe or buffer is given back.
RELEASE_AFTER = 1.0

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
_TROUBLE = _POLLERR | _POLLHUP | _POLLNVAL  # any of these: look closer (Tunnel.serve)

_default_mode = "auto"
# "auto" copies this many bytes of a direction before it starts splicing (see pump).
_SPLICE_AFTER = 256 * 1024


def set_default_mode(mode: str) -> None:
    """Set what ``relay(mode=None)`` uses (the daemon calls this from its configuration)."""
    global _default_mode
    if mode not in MODES:
        raise ValueError(f"relay mode must be one of {', '.join(MODES)}, not {mode!r}")
    _default_mode = mode


def get_default_mode() -> str:
    return _default_mode


@dataclass(frozen=True, slots=True)
class RelayResult:
    """What a finished tunnel did, for the access log.

    ``closed_first`` is ``"a"`` or ``"b"`` (whose EOF or reset came first), ``"idle"`` when the
    idle timeout ended the tunnel, or ``"abort"`` on POLLHUP of a socket shut down locally by
    someone else, or on any other error. ``reason`` is short text: ``"eof"``, ``"reset"``,
    ``"idle timeout"``, ``"hangup"`` or ``"error: ..."``. ``mode`` says how the relayed bytes
    were read: ``"splice"``, ``"copy"``, or ``"mixed"`` (both, after a fallback); for a tunnel
    that relayed nothing, the way it would have. It is left out of comparisons.
    """

    a_to_b: int  # bytes written from a to b (including ``pending_a_to_b``)
    b_to_a: int  # bytes written from b to a
    closed_first: str
    reason: str
    mode: str = field(default="copy", compare=False)


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


def _spliceable(sock: socket.socket) -> bool:
    """Whether splicing the descriptor gives the same bytes as the socket's own methods.

    A class that overrides ``send``/``recv_into`` (``ssl.SSLSocket``, instrumented doubles)
    must be driven through them: splicing its descriptor would bypass the override.
    """
    cls = type(sock)
    return (
        cls.send is socket.socket.send
        and cls.recv_into is socket.socket.recv_into
        and sock.type == socket.SOCK_STREAM
    )


class _Direction:
    """One direction of the tunnel: moves bytes from ``src`` to ``dst``.

    The backlog (read, not yet written) is either ``out[start:end]`` (copy path, and the
    caller's pending bytes) or ``piped`` bytes in the pipe (splice path); never both, because
    a direction only reads while its backlog is empty.
    """

    __slots__ = (
        "booked",
        "buf",
        "chunk",
        "copied",
        "copy_size",
        "count",
        "done",
        "dst",
        "dst_fd",
        "dst_name",
        "end",
        "eof",
        "grow",
        "out",
        "pipe_r",
        "pipe_size",
        "pipe_w",
        "piped",
        "retry",
        "splice",
        "spliced",
        "src",
        "src_fd",
        "src_name",
        "start",
        "strict",
    )

    def __init__(
        self,
        src_name: str,
        src: socket.socket,
        dst_name: str,
        dst: socket.socket,
        sizes: tuple[int, int],
        mode: str,
        pending: bytes = b"",
    ) -> None:
        self.src_name = src_name
        self.src = src
        self.src_fd = src.fileno()
        self.dst_name = dst_name
        self.dst = dst
        self.dst_fd = dst.fileno()
        # Backlog bounds: the pipe's size, the read buffer's. Both start at _FIRST_CHUNK at
        # most and grow to these on a bulk transfer.
        pipe_size, self.copy_size = sizes
        self.pipe_size = min(pipe_size, max(_PIPE_MAX_SIZE, _FIRST_CHUNK))
        self.chunk = 0  # bytes one splice may move into the pipe now
        self.grow = False  # the last read filled the buffer: use the full size next
        self.splice = mode != "copy"  # the path in use
        self.strict = mode == "splice"  # splice even through a pipe smaller than size
        self.retry = False  # splice dropped for want of a pipe: try again after a release
        self.buf: memoryview | None = None  # created on the first read (copy path)
        self.booked = 0  # bytes of GROWN_BUFFER_BUDGET that buf holds
        self.out: memoryview | None = memoryview(pending) if pending else None
        self.start = 0
        self.end = len(pending)
        self.pipe_r = -1  # created on the first read (splice path)
        self.pipe_w = -1
        self.piped = 0  # bytes in the pipe
        self.count = 0  # bytes written to dst
        self.spliced = self.copied = False  # how bytes were read from src (for the log)
        self.eof = False  # src reached EOF
        self.done = False  # EOF seen, everything flushed, dst shut down for writing

    @property
    def has_data(self) -> bool:
        return self.start < self.end or self.piped > 0

    @property
    def spare(self) -> bool:
        """Holds a pipe or buffer with nothing in it (releasable)."""
        return (self.buf is not None or self.pipe_r >= 0) and not self.has_data

    def release(self) -> None:
        """Give back an empty buffer and pipe; the next read creates them again."""
        if self.has_data:
            return
        self.drop_buffer()
        self.out = None
        self.grow = False
        self.close_pipe()
        if self.retry:
            self.splice, self.retry = True, False

    def drop_buffer(self) -> None:
        """Let go of the full-size buffer and give its bytes back to the budget."""
        self.buf = None
        if self.booked:
            _give_back_grown(self.booked)
            self.booked = 0

    def close_pipe(self) -> None:
        if self.pipe_r >= 0:
            os.close(self.pipe_r)
            os.close(self.pipe_w)
            self.pipe_r = self.pipe_w = -1
            self.piped = 0

    def flush(self) -> int:
        """Write as much of the backlog as ``dst`` accepts now; return the bytes written."""
        if self.piped:
            return self._flush_pipe()
        if self.start < self.end:
            return self._flush_out()
        return 0

    def _flush_out(self) -> int:
        sent = 0
        out = self.out
        assert out is not None
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
            self.out = self.buf  # the pending bytes (if those were it) are delivered
        return sent

    def _flush_pipe(self) -> int:
        assert _splice is not None
        sent = 0
        try:
            while self.piped:
                n = _splice(self.pipe_r, self.dst_fd, self.piped, flags=_SPLICE_FLAGS)
                if n <= 0:  # an empty pipe; cannot happen while piped > 0
                    break
                self.piped -= n
                sent += n
        except BlockingIOError:
            pass
        except OSError as exc:
            if exc.errno not in _SPLICE_REFUSED:
                raise _failure(self.dst_name, exc) from exc
            self._stop_splicing(str(exc.strerror), exc.errno in _SPLICE_GONE)
        finally:
            self.count += sent
        if self.start < self.end:  # splice refused dst: the pipe's bytes are in out now
            sent += self._flush_out()
        return sent

    def pump(self) -> int:
        """Read from ``src`` and forward while both sides keep up; nonzero if any byte moved."""
        if self.splice and (self.pipe_w >= 0 or self._splice_worth_it()):
            return self._pump_splice()
        return self._pump_copy()

    def _splice_worth_it(self) -> bool:
        """In "auto", copy a direction's first _SPLICE_AFTER bytes: a pipe costs four
        syscalls to set up and two splices per chunk, more than recv+send for the few
        small messages of a short request or a ping-pong; bulk transfers switch over."""
        if not self.strict and (self.count < _SPLICE_AFTER or self.start < self.end):
            return False
        return self._open_pipe()

    def _pump_copy(self) -> int:
        moved = 0
        for _ in range(_MAX_ROUNDS):
            buf = self.buf
            # The last read filled the buffer: a bulk transfer gets its own, full size,
            # while the process-wide budget has room (else it stays on the scratch path).
            if (
                self.grow
                and (buf is None or len(buf) < self.copy_size)
                and self._book(self.copy_size)
            ):
                buf = self.buf = memoryview(bytearray(self.copy_size))
            if buf is None:
                # Small exchanges read into the thread's scratch buffer, and what dst does
                # not take at once is copied out: a quiet tunnel holds no buffer at all.
                buf = _scratch(self.copy_size)
            self.out = buf
            try:
                n = self.src.recv_into(buf)
            except BlockingIOError:
                break
            except OSError as exc:
                raise _failure(self.src_name, exc) from exc
            if n == 0:
                self.eof = True
                break
            self.copied = True
            self.grow = n == len(buf)
            self.start, self.end = 0, n
            moved += n + self._flush_out()
            if self.start < self.end:
                # dst is full: wait for POLLOUT, with the rest in a buffer of our own.
                if buf is not self.buf:
                    self.out = memoryview(bytes(buf[self.start : self.end]))
                    self.start, self.end = 0, self.end - self.start
                break
            if n < len(buf):  # src is most likely drained
                break
            if self.splice and self.count >= _SPLICE_AFTER and self._splice_worth_it():
                # "auto" in a bulk transfer that never paused: splice from here on.
                return moved + self._pump_splice()
        return moved

    def _book(self, size: int) -> bool:
        if size <= _FIRST_CHUNK:
            return True  # small buffers are not what the budget is for
        if not _take_grown(size - self.booked):
            return False
        self.booked = size
        return True

    def _pump_splice(self) -> int:
        assert _splice is not None
        moved = 0
        for rounds in range(_MAX_ROUNDS):
            try:
                # The pipe is empty here, so EAGAIN cannot mean "pipe full".
                n = _splice(self.src_fd, self.pipe_w, self.chunk, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                # Nothing to read, or TCP urgent data: splice stops at the urgent mark with
                # EAGAIN for good, while recv skips the mark (poll said readable, so look).
                if rounds == 0 and self._peek() is not None:
                    self._stop_splicing("stuck at TCP urgent data", False)
                    return moved + self._pump_copy()
                break
            except OSError as exc:
                if exc.errno not in _SPLICE_REFUSED:
                    raise _failure(self.src_name, exc) from exc
                self._stop_splicing(str(exc.strerror), exc.errno in _SPLICE_GONE)
                return moved + self._pump_copy()
            if n == 0:
                # EOF, or a FIN behind urgent data that splice will not pass (recv does).
                if self._peek() == b"":
                    self.eof = True
                    break
                self._stop_splicing("0 before EOF", False)
                return moved + self._pump_copy()
            self.spliced = True
            self.piped += n
            asked = self.chunk
            if n >= asked // 4 and asked < self.pipe_size and _F_SETPIPE_SZ is not None:
                # A bulk transfer, which a bigger pipe serves with fewer calls. (A quarter,
                # not all: a pipe holds one skb fragment per page slot, so 16 slots of
                # 1448-byte segments take 23 KB.) Refused (see _open_pipe): keep this one.
                with contextlib.suppress(OSError):
                    fcntl.fcntl(self.pipe_w, _F_SETPIPE_SZ, self.pipe_size)
                    self.chunk = self.pipe_size
            moved += n + self._flush_pipe()
            if self.has_data or not self.splice or n < asked:
                # dst is full (wait for POLLOUT), or src is most likely drained: one more
                # splice would only fail with EAGAIN. (Or splice gave up on dst.)
                break
        return moved

    def _peek(self) -> bytes | None:
        """What ``recv`` would see first: one byte, ``b""`` at EOF, ``None`` for nothing."""
        try:
            return self.src.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return None
        except OSError as exc:
            raise _failure(self.src_name, exc) from exc

    def _open_pipe(self) -> bool:
        """Create the direction's pipe; False (copy instead) when there is none to be had."""
        try:
            self.pipe_r, self.pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:  # EMFILE, ENFILE: keep relaying, through a buffer
            self._stop_splicing(str(exc.strerror), False, retry=True)
            return False
        self.chunk = min(self.pipe_size, _FIRST_CHUNK)
        if _F_SETPIPE_SZ is not None:
            try:
                # A no-op on a normal new pipe (16 pages), but past pipe-user-pages-soft an
                # unprivileged user's new pipes get 2 pages and may not grow: splicing
                # through those costs several times the CPU of copying (measured).
                fcntl.fcntl(self.pipe_w, _F_SETPIPE_SZ, _FIRST_CHUNK)
            except OSError as exc:
                if not self.strict:
                    self._stop_splicing(f"pipe size: {exc.strerror}", False, retry=True)
                    return False
        return True

    def _stop_splicing(self, why: str, for_good: bool, *, retry: bool = False) -> None:
        """Copy instead of splice in this direction; the pipe's bytes go first."""
        global _splice_gone
        if for_good:  # ENOSYS, EPERM: no tunnel of this process will splice
            _splice_gone = True
        logger.debug(
            "relay %s->%s: copying instead of splice (%s)", self.src_name, self.dst_name, why
        )
        self.splice = False
        self.retry = retry
        if self.piped:
            backlog = bytearray()
            with contextlib.suppress(BlockingIOError):
                while len(backlog) < self.piped:
                    chunk = os.read(self.pipe_r, self.piped - len(backlog))
                    if not chunk:
                        break
                    backlog += chunk
            self.out = memoryview(backlog)
            self.start, self.end = 0, len(backlog)
            self.copied = True
        self.close_pipe()

    def finish(self) -> None:
        """Pass the EOF on: half-close ``dst`` so its peer sees EOF while the reverse flows."""
        self.done = True
        self.release()
        try:
            self.dst.shutdown(socket.SHUT_WR)
        except OSError as exc:
            if exc.errno == errno.ENOTCONN:  # the peer is already gone (reset)
                raise _End(self.dst_name, "reset") from exc
            raise _failure(self.dst_name, exc) from exc


class Tunnel:
    """The state of one tunnel: both directions and what they wait for.

    Driven by :func:`relay` (its own poll, in the calling thread) or by a loop shared by
    many tunnels (``socks5d.core.eventloop``): ``poller`` is anything with poll's
    ``register/modify/unregister`` (``select.poll``, ``select.epoll``), the loop calls
    :meth:`serve_events` with a tunnel's ready descriptors and :meth:`on_timer` once
    :meth:`next_timer` has passed; both return the :class:`RelayResult` when the tunnel
    has ended. The caller then calls :meth:`close` and closes the sockets.
    """

    __slots__ = (
        "ab",
        "ba",
        "first_eof",
        "idle_timeout",
        "last_activity",
        "poller",
        "registered",
        "registered_for",
        "sides",
    )

    def __init__(
        self,
        a: socket.socket,
        b: socket.socket,
        *,
        idle_timeout: float | None = None,
        buffer_size: int | None = None,
        mode: str | None = None,
        pending_a_to_b: bytes = b"",
        poller: Any = None,
    ) -> None:
        mode = _check_arguments(a, b, idle_timeout, buffer_size, mode)
        sizes = (
            (_PIPE_SIZE, _COPY_BUFFER_SIZE) if buffer_size is None else (buffer_size, buffer_size)
        )
        self.ab = _Direction("a", a, "b", b, sizes, mode, bytes(pending_a_to_b))
        self.ba = _Direction("b", b, "a", a, sizes, mode)
        # (name, socket, fd, the direction that writes into it)
        self.sides = (
            ("a", a, self.ab.src_fd, self.ba),
            ("b", b, self.ba.src_fd, self.ab),
        )
        self.idle_timeout = idle_timeout
        self.poller = select.poll() if poller is None else poller
        self.registered: dict[int, int] = {}
        # The direction states the registrations were made for (update_registration).
        self.registered_for: tuple[bool, ...] = ()
        self.first_eof: str | None = None
        self.last_activity = time.monotonic()

    @property
    def fds(self) -> tuple[int, int]:
        return self.ab.src_fd, self.ba.src_fd

    def result(self, closed_first: str, reason: str) -> RelayResult:
        ab, ba = self.ab, self.ba
        spliced, copied = ab.spliced or ba.spliced, ab.copied or ba.copied
        if spliced == copied:  # both, or no byte relayed yet: say what the tunnel planned
            mode = "mixed" if spliced else ("splice" if ab.splice or ba.splice else "copy")
        else:
            mode = "splice" if spliced else "copy"
        return RelayResult(ab.count, ba.count, closed_first, reason, mode)

    def close(self) -> None:
        """Close the pipes and leave the poller, on every way out (the sockets stay open)."""
        if _meter is not None:
            _meter.closed(self)
        for direction in (self.ab, self.ba):
            direction.close_pipe()
            direction.drop_buffer()
        for fd in self.registered:
            try:  # noqa: SIM105 (suppress() is 3 Python calls; this runs per tunnel)
                self.poller.unregister(fd)
            except (OSError, ValueError, KeyError):
                pass
        self.registered.clear()
        self.registered_for = ()

    def start(self) -> RelayResult | None:
        """Register with the poller; a tunnel with nothing to wait for has ended already."""
        if _meter is not None:
            _meter.opened(self)
        try:
            return self._after_events()
        except _End as end:
            return self.result(end.closed_first, end.reason)

    def next_timer(self) -> float:
        """When (time.monotonic) :meth:`on_timer` has work: the idle deadline, or the
        moment a spare pipe or buffer is given back; ``math.inf`` for never."""
        deadline = math.inf
        if self.idle_timeout is not None:
            deadline = self.last_activity + self.idle_timeout
        if self.ab.spare or self.ba.spare:
            deadline = min(deadline, self.last_activity + RELEASE_AFTER)
        return deadline

    def on_timer(self, now: float) -> RelayResult | None:
        """End the tunnel past its idle deadline; give back spare pipes and buffers."""
        if self.idle_timeout is not None and now >= self.last_activity + self.idle_timeout:
            return self.result("idle", "idle timeout")
        if now >= self.last_activity + RELEASE_AFTER:
            self.ab.release()
            self.ba.release()
        return None

    def serve_events(self, revents: dict[int, int]) -> RelayResult | None:
        """Serve one wake-up's ready descriptors (fd -> poll mask) of this tunnel."""
        try:
            if self.serve(revents):
                self.last_activity = time.monotonic()
            return self._after_events()
        except _End as end:
            return self.result(end.closed_first, end.reason)

    def _after_events(self) -> RelayResult | None:
        if self.ab.done and self.ba.done:
            return self.result(self.first_eof or "a", "eof")
        self.update_registration()
        return None

    def run(self) -> RelayResult:
        """Relay in the calling thread until the tunnel ends (:func:`relay`)."""
        result = self.start()
        poll = self.poller.poll
        while result is None:
            # Recomputed on every pass, so wake-ups that move nothing (and a poll that
            # PEP 475 retried after EINTR) never stretch the deadlines.
            deadline = self.next_timer()
            timeout_ms = None
            if deadline != math.inf:
                now = time.monotonic()
                if now >= deadline:
                    result = self.on_timer(now)
                    continue
                timeout_ms = math.ceil((deadline - now) * 1000)
            events = poll(timeout_ms)
            if events:
                result = self.serve_events(dict(events))
        return result

    def update_registration(self) -> None:
        """Register exactly the events the directions wait for, as poll masks per socket."""
        ab, ba = self.ab, self.ba
        state = (ab.done, ab.eof, ab.has_data, ba.done, ba.eof, ba.has_data)
        if state == self.registered_for:
            return  # the usual wake-up: what each side waits for has not changed
        self.registered_for = state
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
        seen = 0
        for ev in revents.values():
            seen |= ev
        if seen & _TROUBLE:
            self._check_trouble(revents)
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

    def _check_trouble(self, revents: dict[int, int]) -> None:
        """Errors, hang-ups and closed descriptors end the tunnel (raise _End)."""
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


def _resolve(mode: str, a: socket.socket, b: socket.socket) -> str:
    """The mode this tunnel starts in: ``"copy"`` wherever splice cannot work at all."""
    if _splice is None or _splice_gone or not (_spliceable(a) and _spliceable(b)):
        return "copy"
    return mode


def _check_arguments(
    a: socket.socket,
    b: socket.socket,
    idle_timeout: float | None,
    buffer_size: int | None,
    mode: str | None,
) -> str:
    """Validate a tunnel's arguments; return the mode it starts in."""
    if mode is None:
        mode = _default_mode
    if mode not in MODES:
        raise ValueError(f"relay mode must be one of {', '.join(MODES)}, not {mode!r}")
    if buffer_size is not None and buffer_size <= 0:
        raise ValueError(f"buffer_size must be positive, not {buffer_size}")
    if idle_timeout is not None and idle_timeout <= 0:
        raise ValueError(f"idle_timeout must be positive or None, not {idle_timeout}")
    if a.fileno() < 0 or b.fileno() < 0:
        raise ValueError("relay needs two open sockets")
    if a.fileno() == b.fileno():
        raise ValueError("relay needs two distinct sockets")
    return _resolve(mode, a, b)


def prepare_sockets(*socks: socket.socket) -> list[tuple[socket.socket, float | None]]:
    """Make the sockets ready to relay: non-blocking, TCP_NODELAY.

    Returns the (socket, timeout) pairs that were switched from another timeout, for
    :func:`restore_timeouts`: each switch is a syscall, and the handler hands over
    sockets that already are non-blocking.
    """
    saved = [(sock, timeout) for sock in socks if (timeout := sock.gettimeout()) != 0.0]
    for sock in socks:
        # Each chunk is forwarded as soon as it is read; Nagle would only add latency.
        # Not TCP (socketpair, AF_UNIX): nothing to set.
        try:  # noqa: SIM105 (per tunnel: see fix_socket_buffers)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
    for sock, _ in saved:
        sock.setblocking(False)
    return saved


# SO_SNDBUF/SO_RCVBUF for a socket whose peer is on this host (server.socket_buffer =
# "auto"); the kernel doubles it. Autotuned loopback buffers grow to megabytes and push
# the bytes out of the CPU cache between the writer's copy and the reader's. Measured
# on a 2-core VM (2 MiB L2 per core), MiB/s through socks5d, medians of 7:
#   1 stream:  autotuned ~1800, 512 KiB ~2900, 256 KiB ~2100
#   8 streams: autotuned ~2000, 512 KiB ~2080, 256 KiB ~2700
# so the size shrinks as more connections share the cache: LOCAL_BUFFER_BUDGET over the
# connections open, within [LOCAL_SOCKET_BUFFER_MIN, LOCAL_SOCKET_BUFFER] (a 1 MiB budget
# measured ~2500-2900 for 1 stream and ~2500-2770 for 8; a 2 MiB one ~2100-2300 / ~2450).
LOCAL_SOCKET_BUFFER = 512 * 1024
LOCAL_SOCKET_BUFFER_MIN = 256 * 1024
LOCAL_BUFFER_BUDGET = 1024 * 1024


def socket_buffer_for(setting: int | str, peer_ip: str, connections: int = 1) -> int:
    """The buffer size to fix on a socket to ``peer_ip``; 0: leave the kernel's autotuning.

    ``setting`` is ``server.socket_buffer``: a size for every socket, 0 for none, or
    ``"auto"``: a size for loopback peers only, smaller when more ``connections`` are
    open (see above). Over a real network a fixed buffer caps the TCP window (1 MiB at
    100 ms is 80 Mbit/s), so autotuning, which grows it to the path's needs, stays.
    """
    if setting != "auto":
        return int(setting)
    if peer_ip.startswith(("127.", "::ffff:127.")) or peer_ip == "::1":
        share = LOCAL_BUFFER_BUDGET // max(1, connections)
        return max(LOCAL_SOCKET_BUFFER_MIN, min(LOCAL_SOCKET_BUFFER, share))
    return 0


def fix_socket_buffers(sock: socket.socket, size: int) -> None:
    """Set SO_SNDBUF and SO_RCVBUF to ``size`` (nothing for 0); best effort."""
    if size:
        # try/except rather than contextlib.suppress, here and in the other per-tunnel
        # steps: suppress() costs three Python calls, ~1 % of a short connection's work.
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
        except OSError:
            pass


def restore_timeouts(saved: list[tuple[socket.socket, float | None]]) -> None:
    for sock, timeout in saved:
        try:  # noqa: SIM105 (per tunnel)
            sock.settimeout(timeout)
        except OSError:  # closed by someone else meanwhile
            pass


def relay(
    a: socket.socket,
    b: socket.socket,
    *,
    idle_timeout: float | None = None,
    buffer_size: int | None = None,
    pending_a_to_b: bytes = b"",
    mode: str | None = None,
) -> RelayResult:
    """Relay bytes between ``a`` (the client side) and ``b`` (the target) until both ends close.

    ``pending_a_to_b`` (bytes the client pipelined after its request) is delivered to ``b``
    before anything else read from ``a``. Returns when both directions have seen EOF and
    flushed, on a reset or error, on POLLHUP of a socket shut down locally (abort), or when no
    byte moved for ``idle_timeout`` seconds (``None``: no timeout). The sockets stay open.

    ``mode`` is ``"auto"``, ``"splice"`` or ``"copy"`` (see the module docstring); ``None``
    means the module default, ``"auto"`` unless :func:`set_default_mode` changed it.
    ``buffer_size`` bounds each direction's backlog (read buffer, or pipe); ``None``: 1 MiB.
    """
    _check_arguments(a, b, idle_timeout, buffer_size, mode)
    saved = prepare_sockets(a, b)
    try:
        tunnel = Tunnel(
            a,
            b,
            idle_timeout=idle_timeout,
            buffer_size=buffer_size,
            mode=mode,
            pending_a_to_b=pending_a_to_b,
        )
        try:
            result = tunnel.run()
        finally:
            tunnel.close()
    finally:
        restore_timeouts(saved)
    log_result(result)
    return result


class TrafficMeter(ProcessLocal):
    """The bytes this process's tunnels relayed, open tunnels included, passed on as
    ``report(up, down)`` (``up``: a to b) when :meth:`sample` is called (its owner does,
    every second or so), without adding work per chunk.

    Each tunnel keeps its own counts. A sample reads those of the open tunnels, adds
    what the tunnels that closed since the last one moved after it, and reports the
    difference: the sum of the reports never goes down, and once every tunnel has closed
    and a last sample was taken it is exactly what they relayed. Install it with
    :func:`set_traffic_meter`; ``report`` must not raise. Per tunnel it costs a dict
    store when it starts and a lock, a dict pop and two additions when it ends.
    """

    def __init__(self, report: Callable[[int, int], None]) -> None:
        self.report = report
        self._register()

    def _start_process(self) -> None:
        """Here and in a forked child: the parent's tunnels and lock are not a child's."""
        self._lock = threading.Lock()
        # Open tunnel -> (a_to_b, b_to_a) as last reported.
        self._open: dict[Tunnel, tuple[int, int]] = {}
        # Bytes of tunnels closed since the last sample, not reported yet.
        self._ended_up = self._ended_down = 0

    def opened(self, tunnel: Tunnel) -> None:
        # One dict store, atomic under the GIL; sample() iterates a copy.
        self._open[tunnel] = (0, 0)

    def closed(self, tunnel: Tunnel) -> None:
        with self._lock:  # against sample(): a tunnel's bytes are counted once
            seen = self._open.pop(tunnel, None)
            if seen is not None:
                self._ended_up += tunnel.ab.count - seen[0]
                self._ended_down += tunnel.ba.count - seen[1]

    def sample(self) -> None:
        """Report what moved since the last sample, in open and closed tunnels."""
        with self._lock:
            up, down = self._ended_up, self._ended_down
            self._ended_up = self._ended_down = 0
            for tunnel, (seen_up, seen_down) in list(self._open.items()):
                # Plain int reads: the loop or thread relaying it may be counting meanwhile.
                now_up, now_down = tunnel.ab.count, tunnel.ba.count
                if now_up != seen_up or now_down != seen_down:
                    self._open[tunnel] = (now_up, now_down)
                    up += now_up - seen_up
                    down += now_down - seen_down
        if up or down:
            try:
                self.report(up, down)
            except Exception:
                logger.exception("traffic meter: report failed")


_meter: TrafficMeter | None = None


def set_traffic_meter(meter: TrafficMeter | None) -> None:
    """Have every tunnel that starts from now on counted by ``meter`` (None: none)."""
    global _meter
    _meter = meter


def log_result(result: RelayResult) -> None:
    logger.debug(
        "relay ended: %s (%s), a->b %d bytes, b->a %d bytes, %s",
        result.closed_first,
        result.reason,
        result.a_to_b,
        result.b_to_a,
        result.mode,
    )
