"""Memory shared by the processes forked from one parent, and a lock the kernel frees
when its holder dies.

Why not multiprocessing.Lock: it is a POSIX semaphore, and a process killed while
holding one never posts it, so every other process then waits on it forever. A
RobustLock is an fcntl (POSIX record) lock on one byte of an anonymous file: the kernel
drops every record lock of a process when the process ends, however it ends. Record
locks belong to a process, not to a thread, and a child does not inherit its parent's,
so a threading.Lock orders the threads of one process first and is made anew in a
forked child.

The package's one implementation of each: RobustLock (per-user slots, the login back-off,
the bound on password checks), SharedMemory with its typed views SharedInts (limits.py)
and SharedRecords (throttle.py), SharedBytes (what the supervisor publishes to workers),
and ProcessLocal, for per-process state a forked child must start afresh.

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
from typing import Any

__all__ = [
    "ProcessLocal",
    "RobustLock",
    "SharedBytes",
    "SharedInts",
    "SharedMemory",
    "SharedRecords",
    "anonymous_file",
]


def anonymous_file(size: int = 0, owner: object = None) -> int:
    """A descriptor of a file with no name (memfd; else an unlinked temporary file),
    `size` bytes long (sparse: pages cost memory only once written). With `owner`, the
    descriptor is closed when `owner` is collected.

    Nothing else may open this file: closing any descriptor of a file drops every POSIX
    record lock the process holds on it (fcntl(2)).
    """
    try:
        fd = os.memfd_create("socks5d", os.MFD_CLOEXEC)
    except (AttributeError, OSError):  # no memfd here (old kernel, seccomp): a temp file
        with tempfile.TemporaryFile() as file:
            fd = os.dup(file.fileno())
        os.set_inheritable(fd, False)
    try:
        os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        raise
    if owner is not None:
        weakref.finalize(owner, os.close, fd)
    return fd


# Every ProcessLocal alive, so a forked child can start their per-process state afresh.
_REBUILT_IN_CHILD: weakref.WeakSet[ProcessLocal] = weakref.WeakSet()


class ProcessLocal:
    """Has per-process state (`_start_process`) that a forked child starts afresh.

    A threading.Lock that another thread of the parent held at fork() would stay locked
    forever in the child, which has only the forking thread; so would a record of which
    fcntl locks "this process" holds, as a child does not inherit its parent's. Subclasses
    call `_register()` once their shared state is made.
    """

    def _start_process(self) -> None:
        raise NotImplementedError

    def _register(self) -> None:
        self._start_process()
        _REBUILT_IN_CHILD.add(self)


def _rebuild_in_child() -> None:
    for item in list(_REBUILT_IN_CHILD):
        item._start_process()


os.register_at_fork(after_in_child=_rebuild_in_child)


class RobustLock(ProcessLocal):
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
        self._register()

    def _start_process(self) -> None:
        self._thread_lock = threading.Lock()

    def acquire(self) -> None:
        self._thread_lock.acquire()
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX, 1, self.offset)
        except BaseException:
            self._thread_lock.release()
            raise

    def try_acquire(self) -> bool:
        """Take the lock if nobody (no thread here, no other process) holds it; never waits."""
        if not self._thread_lock.acquire(blocking=False):
            return False
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, self.offset)
        except (BlockingIOError, PermissionError):  # EAGAIN or EACCES: another process has it
            self._thread_lock.release()
            return False
        except BaseException:
            self._thread_lock.release()
            raise
        return True

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


class SharedMemory:
    """`size` bytes (all 0 at first) of memory shared with the processes forked after
    this was made, and a RobustLock to guard them.

    `map` is the shared mapping (MAP_SHARED: the same pages after fork). What needs the
    lock (a read-modify-write, a consistent view of several values) is up to the caller.
    The file is closed when this object is collected: keep it, not only its lock.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.fd = anonymous_file(size, owner=self)
        self.map = mmap.mmap(self.fd, size)
        self.lock = RobustLock(self.fd)


class SharedInts(SharedMemory):
    """`count` signed 64-bit integers in SharedMemory.

    `values` is a memoryview of the integers: index it, or slice and .tolist() it.
    """

    def __init__(self, count: int) -> None:
        super().__init__(count * 8)
        self.count = count
        self.values = memoryview(self.map).cast("q")


class SharedRecords(SharedMemory):
    """`count` fixed-size records, laid out as `record` says, in SharedMemory.

    For tables whose entries mix types (an integer tag, a count, a float time) that one
    memoryview cannot hold. A record of all zero bytes is what every one is at first.
    """

    def __init__(self, record: struct.Struct, count: int) -> None:
        super().__init__(record.size * count)
        self.record = record
        self.count = count

    def read(self, index: int) -> tuple[Any, ...]:
        return self.record.unpack_from(self.map, index * self.record.size)

    def write(self, index: int, *values: Any) -> None:
        self.record.pack_into(self.map, index * self.record.size, *values)

    def clear(self, index: int) -> None:
        self.map[index * self.record.size : (index + 1) * self.record.size] = bytes(
            self.record.size
        )


_HEADER = struct.Struct("=qq")  # generation, length of the data that follows


class SharedBytes:
    """A byte string that one process publishes and the others read whole.

    Each publish() raises the generation number, so a reader can tell whether there is
    anything new since it last looked. Readers never see half of a publication: both
    sides hold the lock. Only processes holding the descriptor (forked from the maker)
    can write it, so the data is as trustworthy as the processes themselves.
    """

    def __init__(self) -> None:
        self.fd = anonymous_file(_HEADER.size, owner=self)
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
