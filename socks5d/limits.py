"""Per-user connection counts that hold across threads and forked children.

The per-address cap lives in the server core, which sees every accept; a user is only
known after RFC 1929 login, inside the handler, which in forking mode runs in a child
process. So the counts live in an anonymous shared memory table created before any
fork, guarded by a process-shared lock. Stdlib only; knows nothing of SOCKS.
"""

from __future__ import annotations

import mmap
import multiprocessing
import struct
import zlib

_SLOT = struct.Struct("=i")


class UserSlots:
    """Counts open connections per user name against a limit (None or 0: unlimited).

    Names hash into a fixed table of `size` counters; two names sharing a counter only
    makes the cap stricter for both, never looser. Counts survive a reload (the same
    table is kept); a child killed with SIGKILL cannot give its slot back, which only
    happens when the daemon itself is being stopped.
    """

    def __init__(self, limit: int | None = None, size: int = 4096) -> None:
        self.limit = limit
        self.size = size
        # fileno -1: anonymous, MAP_SHARED, so forked children share the counters.
        self.table = mmap.mmap(-1, size * _SLOT.size)
        self.lock = multiprocessing.Lock()

    def _offset(self, user: str) -> int:
        return (zlib.crc32(user.encode("utf-8", "surrogatepass")) % self.size) * _SLOT.size

    def acquire(self, user: str) -> bool:
        """Take a slot for `user`; False (and nothing taken) when the user is at the cap."""
        offset = self._offset(user)
        with self.lock:
            (count,) = _SLOT.unpack_from(self.table, offset)
            if self.limit and count >= self.limit:
                return False
            _SLOT.pack_into(self.table, offset, count + 1)
            return True

    def release(self, user: str) -> None:
        offset = self._offset(user)
        with self.lock:
            (count,) = _SLOT.unpack_from(self.table, offset)
            _SLOT.pack_into(self.table, offset, max(count - 1, 0))

    def count(self, user: str) -> int:
        with self.lock:
            return _SLOT.unpack_from(self.table, self._offset(user))[0]
