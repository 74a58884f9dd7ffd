"""Memory shared by the processes forked from one parent, and a lock the kernel frees
when its holder dies.

Why not multiprocessing.Lock: it is a POSIX semaphore, and a process killed while
holding one never posts it, so every other process then waits on it forever. A
RobustLock is an fcntl (POSIX record) lock on one byte of an anonymous file: the kernel
drops every record lock of a process when the process ends, however it ends. Record
locks belong to a process, not to a thread, and a child does not inherit its parent's,
so a threading.Lock orders the threads of one process first and is made anew in a
forked child.

Everything here must be made before the fork that shares it (the descriptor and the
mapping are inherited). Linux/POSIX, stdlib only; knows nothing of SOCKS.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
import tempfile
import threading
import weakref
from types import TracebackType

__all__ = ["RobustLock", "SharedBytes", "SharedInts", "anonymous_file"]


def anonymous_file(size: int = 0) -> int:
    """A descriptor of a file with no name (memfd; else an unlinked temporary file),
    `size` bytes long (sparse: pages cost memory only once written)."""
    try:
        fd = os.memfd_create("socks5d", os.MFD_CLOEXEC)
    except (AttributeError, OSError):  # no memfd here: an unlinked file in the temp dir
        with tempfile.TemporaryFile() as file:
            fd = os.dup(file.fileno())
        os.set_inheritable(fd, False)
    try:
        os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        raise
    return fd


# Every RobustLock alive, so a forked child can replace their thread locks: one that
# another thread of the parent held at fork() would otherwise stay locked forever.
_LOCKS: weakref.WeakSet[RobustLock] = weakref.WeakSet()


def _renew_thread_locks() -> None:
    for lock in list(_LOCKS):
        lock._thread_lock = threading.Lock()


os.register_at_fork(after_in_child=_renew_thread_locks)


class RobustLock:
    """A lock shared across forked processes that a dying holder cannot keep.

    An exclusive fcntl record lock on byte `offset` of `fd` (a file opened for writing,
    e.g. from anonymous_file), taken after a per-process threading.Lock. The kernel
    releases the record lock when the holder exits or is killed. Not reentrant.

    Beware the POSIX rule: closing any descriptor of that file in a process drops all of
    that process's locks on it, so keep the file open while the lock is in use.
    """

    def __init__(self, fd: int, offset: int = 0) -> None:
        self.fd = fd
        self.offset = offset
        self._thread_lock = threading.Lock()
        _LOCKS.add(self)

    def acquire(self) -> None:
        self._thread_lock.acquire()
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX, 1, self.offset)
        except BaseException:
            self._thread_lock.release()
            raise

    def release(self) -> None:
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, self.offset)
        finally:
            self._thread_lock.release()

    def __enter__(self) -> RobustLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()


class SharedInts:
    """`count` signed 64-bit integers (all 0 at first) in memory shared with the
    processes forked after this was made, and a RobustLock to guard them.

    `values` is a memoryview of the integers: index it, or slice and .tolist() it.
    What needs the lock (a read-modify-write, a consistent view of several values) is
    up to the caller.
    """

    def __init__(self, count: int) -> None:
        self.count = count
        self.fd = anonymous_file(count * 8)
        try:
            self.map = mmap.mmap(self.fd, count * 8)  # MAP_SHARED: the same pages after fork
        except BaseException:
            os.close(self.fd)
            raise
        self.values = memoryview(self.map).cast("q")
        self.lock = RobustLock(self.fd)


_HEADER = struct.Struct("=qq")  # generation, length of the data that follows


class SharedBytes:
    """A byte string that one process publishes and the others read whole.

    Each publish() raises the generation number, so a reader can tell whether there is
    anything new since it last looked. Readers never see half of a publication: both
    sides hold the lock. Only processes holding the descriptor (forked from the maker)
    can write it, so the data is as trustworthy as the processes themselves.
    """

    def __init__(self) -> None:
        self.fd = anonymous_file(_HEADER.size)
        self.lock = RobustLock(self.fd)

    def publish(self, data: bytes) -> int:
        """Replace the data; returns its generation (1 for the first publication)."""
        with self.lock:
            generation, _ = _HEADER.unpack(_pread_exactly(self.fd, _HEADER.size, 0))
            generation += 1
            os.ftruncate(self.fd, _HEADER.size + len(data))
            _pwrite_all(self.fd, data, _HEADER.size)
            _pwrite_all(self.fd, _HEADER.pack(generation, len(data)), 0)
        return generation

    def read(self) -> tuple[int, bytes]:
        """(generation, data); (0, b"") before anything was published."""
        with self.lock:
            generation, length = _HEADER.unpack(_pread_exactly(self.fd, _HEADER.size, 0))
            return generation, _pread_exactly(self.fd, length, _HEADER.size)

    @property
    def generation(self) -> int:
        return self.read()[0]


def _pread_exactly(fd: int, length: int, offset: int) -> bytes:
    parts = []
    while length:
        chunk = os.pread(fd, length, offset)
        if not chunk:
            raise EOFError(f"shared file ends {length} byte(s) early")
        parts.append(chunk)
        length -= len(chunk)
        offset += len(chunk)
    return b"".join(parts)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written
