"""Per-user connection counts that hold across threads, worker processes and forked
children, and that a dead process cannot keep.

The per-address cap lives in the server core, which sees every accept; a user is only
known after RFC 1929 login, inside the handler, which in forking mode runs in a child
process. So the counts live in shared memory made before any fork (socks5d.core.shmem),
under a lock the kernel frees if its holder dies. Beside each count, a ledger records
which process holds how many slots of it, so that whoever reaps a dead process (the
supervisor, the forking parent) gives back what it held: reconcile(pid). Stdlib and
socks5d.core.shmem only; knows nothing of SOCKS.
"""

from __future__ import annotations

import logging
import os
import zlib

from ..core.shmem import SharedInts

logger = logging.getLogger(__name__)

# Header cells of the shared table.
_HIGH_WATER = 0  # ledger entries ever used (entries past it were never touched)
_FREE_HEAD = 1  # first free ledger entry + 1; 0: none (free entries link through `count`)
_HEADER = 2


class UserSlots:
    """Counts open connections per user name against a limit (None or 0: unlimited).

    Names hash into a fixed table of `size` counters; two names sharing a counter only
    makes the cap stricter for both, never looser. Counts survive a reload (the same
    table is kept). The ledger holds up to `capacity` (process, counter) pairs at once;
    the memory is sparse, so an unused entry costs nothing. Were it ever full, a slot
    under a limit is refused (a slot nobody could give back would be worse); without a
    limit the connection goes uncounted.
    """

    def __init__(self, limit: int | None = None, size: int = 4096, capacity: int = 1 << 20):
        self.limit = limit
        self.size = size
        self.capacity = capacity
        self.shared = SharedInts(_HEADER + size + 3 * capacity)
        self.table = self.shared.values
        self.lock = self.shared.lock
        self._pids = _HEADER + size  # ledger columns: pid, counter index, slots held
        self._buckets = self._pids + capacity
        self._counts = self._buckets + capacity
        # This process's ledger entries: counter index -> entry. Private memory, so it
        # is only good in the process that filled it (a forked child starts empty).
        self._mine: dict[int, int] = {}
        self._mine_pid = os.getpid()
        self._full_warned = False

    def _bucket(self, user: str) -> int:
        return zlib.crc32(user.encode("utf-8", "surrogatepass")) % self.size

    def acquire(self, user: str) -> bool:
        """Take a slot for `user`; False (and nothing taken) when the user is at the cap."""
        bucket = self._bucket(user)
        table = self.table
        with self.lock:
            count = table[_HEADER + bucket]
            if self.limit and count >= self.limit:
                return False
            entry = self._entry_for(bucket)
            if entry is None:  # the ledger is full
                return not self.limit
            table[_HEADER + bucket] = count + 1
            table[self._counts + entry] += 1
            return True

    def release(self, user: str) -> None:
        """Give back a slot this process took for `user` (nothing if it holds none)."""
        bucket = self._bucket(user)
        table = self.table
        with self.lock:
            mine = self._own_entries()
            entry = mine.get(bucket)
            if entry is None:
                return
            if (table[self._pids + entry], table[self._buckets + entry]) != (
                self._mine_pid,
                bucket,
            ):
                del mine[bucket]  # reconciled as if we were dead (a reused PID): not ours now
                return
            table[_HEADER + bucket] = max(table[_HEADER + bucket] - 1, 0)
            table[self._counts + entry] -= 1
            if table[self._counts + entry] <= 0:
                del mine[bucket]
                self._free(entry)

    def reconcile(self, pid: int) -> int:
        """Give back every slot process `pid` still held; returns how many.

        For whoever reaped `pid`: call it before another process can be given the same
        PID (a zombie keeps its PID until it is reaped).
        """
        table = self.table
        given_back = 0
        with self.lock:
            used = table[_HIGH_WATER]
            pids = table[self._pids : self._pids + used].tolist()
            for entry, holder in enumerate(pids):
                if holder != pid:
                    continue
                bucket = table[self._buckets + entry]
                held = table[self._counts + entry]
                table[_HEADER + bucket] = max(table[_HEADER + bucket] - held, 0)
                given_back += held
                self._free(entry)
        return given_back

    def count(self, user: str) -> int:
        with self.lock:
            return self.table[_HEADER + self._bucket(user)]

    # ---- the ledger (call with the lock held) ----

    def _own_entries(self) -> dict[int, int]:
        pid = os.getpid()
        if pid != self._mine_pid:  # a forked child: the parent's entries are not ours
            self._mine = {}
            self._mine_pid = pid
        return self._mine

    def _entry_for(self, bucket: int) -> int | None:
        """This process's entry for `bucket`, made if needed; None if the ledger is full."""
        mine = self._own_entries()
        entry = mine.get(bucket)
        if entry is not None:
            return entry
        table = self.table
        if table[_FREE_HEAD]:
            entry = table[_FREE_HEAD] - 1
            table[_FREE_HEAD] = table[self._counts + entry]
        elif table[_HIGH_WATER] < self.capacity:
            entry = table[_HIGH_WATER]
            table[_HIGH_WATER] = entry + 1
        else:
            if not self._full_warned:
                self._full_warned = True
                logger.warning(
                    "per-user slot ledger full (%d entries): %s",
                    self.capacity,
                    "refusing logins at the per-user limit" if self.limit else "not counting",
                )
            return None
        table[self._pids + entry] = self._mine_pid
        table[self._buckets + entry] = bucket
        table[self._counts + entry] = 0
        mine[bucket] = entry
        return entry

    def _free(self, entry: int) -> None:
        table = self.table
        table[self._pids + entry] = 0
        table[self._buckets + entry] = 0
        table[self._counts + entry] = table[_FREE_HEAD]  # link to the next free entry
        table[_FREE_HEAD] = entry + 1
