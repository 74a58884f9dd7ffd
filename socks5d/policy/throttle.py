"""Login throttling that holds across threads, forked children and worker processes:
the back-off after failed logins, and the bound on password checks running at once.

Both are made before any fork (Daemon.bind) so every process of the tree shares them:
the back-off as a table in shared memory, the bound as byte-range locks on an anonymous
file (socks5d.core.shmem). Every lock here is an fcntl record lock, which the kernel drops
when its holder dies: a worker killed by SIGKILL (or the OOM killer) cannot leave every
later login waiting forever, as a process-shared semaphore would. Stdlib,
socks5d.core.addresses and socks5d.core.shmem only; no sockets.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import math
import os
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ..core.addresses import DEFAULT_IPV6_CLIENT_PREFIX, client_key
from ..core.shmem import ProcessLocal, RobustLock, SharedRecords, anonymous_file

# ---- the bound on password checks running at once ----

# glibc's M_MMAP_THRESHOLD (malloc.h) and the size from which blocks get their own mapping.
_M_MMAP_THRESHOLD, _OWN_MAPPING_FROM = -3, 4 << 20


def _return_big_blocks_to_the_os() -> None:
    """Make glibc give every block of 4 MiB and more its own mapping, unmapped on free.

    By default glibc raises that threshold to the size of the first big block freed, so
    later scrypt buffers (16 MiB) come from per-thread arenas, which keep them: checks
    run one at a time in 60 threads still left 278 MiB resident. Elsewhere (musl) big
    blocks are mapped anyway.
    """
    with contextlib.suppress(AttributeError, OSError):
        ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, _OWN_MAPPING_FROM)


class CheckGate(ProcessLocal):
    """At most `limit` password checks at once across the process tree.

    A scrypt check holds 16 MiB for its duration; without a bound, a few hundred
    connections sending wrong logins at the same moment exhaust memory. A check holds
    one of the first `limit` bytes of a nameless file (a RobustLock each; a reload may
    change `limit`). Threads of one process queue in order; the first of them polls for
    a byte another process frees. A waiter gives up at its deadline.
    """

    POLL_FIRST, POLL_MAX = 0.002, 0.05  # seconds between looks at other processes' bytes

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.fd = anonymous_file(owner=self)
        self.bytes: dict[int, RobustLock] = {}  # made as first needed
        self._register()
        _return_big_blocks_to_the_os()  # else the memory bounded here stays resident

    def _start_process(self) -> None:
        self.lock = threading.Lock()
        self.held: set[int] = set()  # bytes this process holds
        self.queue: deque[threading.Condition] = deque()  # this process's waiters, in order

    @contextlib.contextmanager
    def slot(self, deadline: float) -> Iterator[bool]:
        """True inside while this caller holds a check slot; False: none before `deadline`."""
        index = self.acquire(deadline)
        try:
            yield index is not None
        finally:
            if index is not None:
                self.release(index)

    def acquire(self, deadline: float) -> int | None:
        """The byte held for one check, or None when `deadline` (monotonic) passed first."""
        with self.lock:
            turn = threading.Condition(self.lock)
            self.queue.append(turn)
            try:
                return self._wait_for_byte(turn, deadline)
            finally:
                self.queue.remove(turn)
                self._wake_first()

    def release(self, index: int) -> None:
        with self.lock:
            self.bytes[index].release()
            self.held.discard(index)
            self._wake_first()

    def _wait_for_byte(self, turn: threading.Condition, deadline: float) -> int | None:
        poll = self.POLL_FIRST
        while True:
            pause: float | None = None  # None: until a thread of ours wakes this one
            if self.queue[0] is turn and len(self.held) < max(self.limit, 1):
                index = self._lock_a_free_byte()
                if index is not None:
                    self.held.add(index)
                    return index
                pause, poll = poll, min(poll * 2, self.POLL_MAX)  # all held elsewhere
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            turn.wait(remaining if pause is None else min(pause, remaining))

    def _lock_a_free_byte(self) -> int | None:
        for index in range(max(self.limit, 1)):
            if index not in self.held and self._byte(index).try_acquire():
                return index
        return None

    def _byte(self, index: int) -> RobustLock:
        byte = self.bytes.get(index)
        if byte is None:
            byte = self.bytes[index] = RobustLock(self.fd, index)
        return byte

    def _wake_first(self) -> None:
        if self.queue:
            self.queue[0].notify()


# ---- back-off after failed logins ----

# One table entry: a tag naming whose it is (0: free), failure count, time of the last
# failure, and the time from which the next check may run (CLOCK_MONOTONIC is the same
# for every process).
_ENTRY = struct.Struct("=Qidd")
_BUCKET = 8  # entries a key may live in; the least recently failed one is reused

#: Failures from one client (any user names) before its own counter delays anything:
#: a user who mistypes a few times is not held up, a sprayer of names soon is.
CLIENT_FREE_FAILURES = 3


@dataclass(frozen=True, slots=True)
class Turn:
    """A booked check: how long to wait for it, and the failure counts it was booked at
    ((client, user), client) to notice failures that land while it waits."""

    wait: float
    seen: tuple[int, int] = (0, 0)


NO_WAIT = Turn(0.0)


@dataclass(slots=True)
class _Entry:
    index: int
    tag: int
    count: int = 0
    last: float = 0.0
    next_turn: float = 0.0


class FailedLoginBackoff:
    """Makes password guessing from one client slow, without slowing anyone else.

    Two counters per client: one per (client, user name), cleared by that user's
    successful login, and one per client over all user names (guessing many names),
    cleared by nothing but the quiet `window`. After n failures a check waits
    `delay * 2**(n-1)` (capped at `max_delay`) after the previous one, so parallel
    connections queue up instead of multiplying the guessing rate; the client counter
    only starts after CLIENT_FREE_FAILURES. An IPv6 client is its /`ipv6_prefix` network.

    Entries are found by a keyed hash (BLAKE2b with a secret made with the table, before
    any fork) and carry a tag, so a client can neither pick whose bucket it lands in nor
    ever read another client's counts; a full bucket reuses its least recently failed
    entry. The table is in shared memory (SharedRecords), so forked children and worker
    processes share one table.
    """

    def __init__(
        self,
        delay: float = 0.5,
        max_delay: float = 10.0,
        window: float = 600.0,
        capacity: int = 65536,
        clock: Callable[[], float] = time.monotonic,
        ipv6_prefix: int = DEFAULT_IPV6_CLIENT_PREFIX,
    ) -> None:
        self.delay = delay
        self.max_delay = max_delay
        self.window = window
        self.ipv6_prefix = ipv6_prefix
        self.clock = clock
        self.buckets = max(capacity // _BUCKET, 1)
        self.secret = os.urandom(32)
        self.table = SharedRecords(_ENTRY, self.buckets * _BUCKET)
        self.lock = self.table.lock

    # ---- what the handler asks ----

    def book(self, client_ip: str, user: bytes, deadline: float = math.inf) -> Turn | None:
        """Book this attempt's turn to be checked; None, with nothing booked, when that
        turn comes at or after `deadline`: a refused attempt delays nobody."""
        now = self.clock()
        with self.lock:
            user_entry, client_entry = self._pair(client_ip, user, now)
            user_delay = self._delay(user_entry.count)
            client_delay = self._client_delay(client_entry.count)
            turn = now
            for entry, delay in ((user_entry, user_delay), (client_entry, client_delay)):
                if delay:
                    turn = max(turn, entry.next_turn)
            if turn > now and turn >= deadline:
                for entry in (user_entry, client_entry):
                    if entry.count:
                        entry.last = now  # hammering is not quiet: the window restarts
                        self._store(entry)
                return None
            for entry, delay in ((user_entry, user_delay), (client_entry, client_delay)):
                if delay:
                    entry.next_turn = turn + delay
                    self._store(entry)
            return Turn(turn - now, (user_entry.count, client_entry.count))

    def overtaken(self, client_ip: str, user: bytes, turn: Turn) -> bool:
        """True when failures that count landed after `turn` was booked (parallel
        attempts of a first wave): its check must take a new, later turn."""
        with self.lock:
            user_entry, client_entry = self._pair(client_ip, user, self.clock())
        seen_user, seen_client = turn.seen
        return user_entry.count > seen_user or (
            client_entry.count > seen_client and self._client_delay(client_entry.count) > 0
        )

    def failed(self, client_ip: str, user: bytes) -> None:
        now = self.clock()
        keys = (self._user_key(client_ip, user), self._client_key(client_ip))
        with self.lock:
            # One after the other: two new keys in one bucket must not reuse one entry.
            for key, delay_of in zip(keys, (self._delay, self._client_delay), strict=True):
                entry = self._entry(key, now, create=True)
                entry.count += 1
                entry.last = now
                entry.next_turn = max(entry.next_turn, now + delay_of(entry.count))
                self._store(entry)

    def succeeded(self, client_ip: str, user: bytes) -> None:
        """Forget this user's failures from this client; the client's own count stays."""
        now = self.clock()
        with self.lock:
            index = self._find(self._user_key(client_ip, user), now)
            if index is not None:
                self.table.clear(index)

    def failures(self, client_ip: str, user: bytes | None = None) -> int:
        """The live failure count of (client, user), or of the client when user is None."""
        key = self._client_key(client_ip) if user is None else self._user_key(client_ip, user)
        now = self.clock()
        with self.lock:
            index = self._find(key, now)
            return 0 if index is None else self.table.read(index)[1]

    # ---- delays ----

    def _delay(self, count: int) -> float:
        if count <= 0:
            return 0.0
        return min(self.delay * 2 ** min(count - 1, 30), self.max_delay)

    def _client_delay(self, count: int) -> float:
        return self._delay(count - CLIENT_FREE_FAILURES)

    # ---- the table ----

    def _client_key(self, client_ip: str) -> bytes:
        return b"c" + client_key(client_ip, self.ipv6_prefix).encode()

    def _user_key(self, client_ip: str, user: bytes) -> bytes:
        client = client_key(client_ip, self.ipv6_prefix).encode()
        return b"u" + len(client).to_bytes(2, "big") + client + user

    def _pair(self, client_ip: str, user: bytes, now: float) -> tuple[_Entry, _Entry]:
        """The (client, user) and the client entries; blank ones (count 0) if absent."""
        keys = (self._user_key(client_ip, user), self._client_key(client_ip))
        return self._entry(keys[0], now), self._entry(keys[1], now)

    def _slot(self, key: bytes) -> tuple[int, int]:
        """(first entry of the key's bucket, tag): a keyed hash nobody outside can aim."""
        digest = hashlib.blake2b(key, key=self.secret, digest_size=16).digest()
        bucket = int.from_bytes(digest[:8], "little") % self.buckets
        return bucket * _BUCKET, int.from_bytes(digest[8:], "little") or 1

    def _find(self, key: bytes, now: float) -> int | None:
        """The index of `key`'s live entry; an expired one is freed on the way."""
        first, tag = self._slot(key)
        for index in range(first, first + _BUCKET):
            entry_tag, _, last, _ = self.table.read(index)
            if entry_tag == tag:
                if now - last > self.window:
                    self.table.clear(index)
                    return None
                return index
        return None

    def _entry(self, key: bytes, now: float, create: bool = False) -> _Entry:
        """`key`'s live entry; if absent, a blank one (index -1), or with `create` one
        placed in its bucket (stored only by _store)."""
        first, tag = self._slot(key)
        index = self._find(key, now)
        if index is not None:
            _, count, last, next_turn = self.table.read(index)
            return _Entry(index, tag, count, last, next_turn)
        return _Entry(self._reusable(first, now) if create else -1, tag, last=now)

    def _reusable(self, first: int, now: float) -> int:
        """A free or expired entry of the bucket, else the least recently failed one."""
        best, best_rank = first, math.inf
        for index in range(first, first + _BUCKET):
            tag, _, last, _ = self.table.read(index)
            rank = -math.inf if tag == 0 or now - last > self.window else last
            if rank < best_rank:
                best, best_rank = index, rank
        return best

    def _store(self, entry: _Entry) -> None:
        if entry.index >= 0:
            self.table.write(entry.index, entry.tag, entry.count, entry.last, entry.next_turn)
