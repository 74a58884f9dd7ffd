"""socks5d.core.shmem: memory shared with forked processes, and a lock that a killed holder
cannot keep (the kernel drops an fcntl record lock when its process ends).

Children are forked from the test process, do one small thing and leave with
os._exit(); every wait on them or on a lock has a deadline.
"""

from __future__ import annotations

import contextlib
import gc
import os
import re
import signal
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from clients import TIMEOUT

from socks5d.core.shmem import (
    ProcessLocal,
    RobustLock,
    SharedBytes,
    SharedInts,
    SharedMemory,
    SharedRecords,
    anonymous_file,
)
from socks5d.policy.limits import UserSlots
from socks5d.policy.throttle import CheckGate, FailedLoginBackoff


def fork_child(body: Callable[[], int]) -> int:
    """Fork a child that runs `body` and exits with its status (1 on an exception)."""
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            status = body()
        finally:
            os._exit(status)
    return pid


def exit_code(pid: int) -> int:
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def finishes(action: Callable[[], object], timeout: float = TIMEOUT) -> bool:
    """Whether `action` returns within `timeout` (run in a daemon thread: a hang is
    reported, not inherited by the rest of the run)."""
    done = threading.Event()

    def run() -> None:
        action()
        done.set()

    threading.Thread(target=run, daemon=True).start()
    return done.wait(timeout)


def die_holding(lock: RobustLock) -> int:
    """Fork a child that takes `lock` and is SIGKILLed while holding it; reaped."""

    def body() -> int:
        lock.acquire()
        os.kill(os.getpid(), signal.SIGKILL)
        return 0

    pid = fork_child(body)
    assert exit_code(pid) == -signal.SIGKILL
    return pid


@contextlib.contextmanager
def held_by_a_child(lock: RobustLock) -> Iterator[Callable[[], None]]:
    """A forked child holds `lock` inside the block; the function given lets it go and
    reaps the child (done on the way out if the block did not)."""
    took, release = os.pipe(), os.pipe()

    def hold_until_told() -> int:
        with lock:
            os.write(took[1], b"x")
            os.read(release[0], 1)
        return 0

    pid = fork_child(hold_until_told)
    held = True

    def let_go() -> None:
        nonlocal held
        if held:
            held = False
            os.write(release[1], b"x")
            assert exit_code(pid) == 0

    try:
        assert os.read(took[0], 1) == b"x"
        yield let_go
    finally:
        let_go()
        for end in (*took, *release):
            os.close(end)


def take_and_release(lock: RobustLock) -> None:
    with lock:
        pass


def assert_waits_until_released(lock: RobustLock, release: Callable[[], object]) -> None:
    """`lock` is held elsewhere: a thread here must wait for it until release() runs."""
    acquired = threading.Event()

    def take() -> None:
        with lock:
            acquired.set()

    thread = threading.Thread(target=take, daemon=True)
    thread.start()
    # Held elsewhere: still waiting after this long (a lower bound, safe under load).
    assert not acquired.wait(0.3)
    release()
    assert acquired.wait(TIMEOUT)
    thread.join(TIMEOUT)


# ---- RobustLock ----


def test_a_holder_killed_with_the_lock_does_not_block_the_others():
    fd = anonymous_file()
    lock = RobustLock(fd)
    die_holding(lock)
    assert finishes(lambda: take_and_release(lock))
    os.close(fd)


def test_the_lock_excludes_another_process_until_released():
    fd = anonymous_file()
    lock = RobustLock(fd)
    with held_by_a_child(lock) as let_go:
        assert_waits_until_released(lock, let_go)
    os.close(fd)


def test_the_lock_excludes_other_threads_of_the_same_process():
    # fcntl record locks belong to the process: only the thread lock keeps two threads apart.
    fd = anonymous_file()
    lock = RobustLock(fd)
    lock.acquire()
    assert_waits_until_released(lock, lock.release)
    os.close(fd)


def test_a_child_forked_while_another_thread_holds_the_lock_can_take_it():
    fd = anonymous_file()
    lock = RobustLock(fd)
    holding, done = threading.Event(), threading.Event()

    def hold() -> None:
        with lock:
            holding.set()
            done.wait(TIMEOUT)

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    assert holding.wait(TIMEOUT)
    try:
        # The child has neither the other thread nor its record lock; after the parent's
        # thread lets go, the child gets the lock (its thread lock is a fresh one).
        def take_after_release() -> int:
            lock.acquire()
            lock.release()
            return 0

        pid = fork_child(take_after_release)
    finally:
        done.set()
    holder.join(TIMEOUT)
    assert exit_code(pid) == 0
    os.close(fd)


# ---- SharedInts and SharedBytes ----


def test_shared_ints_start_at_zero_and_are_shared_with_children():
    shared = SharedInts(1000)
    assert shared.values[0:1000].tolist() == [0] * 1000

    def add() -> int:
        for _ in range(100):
            with shared.lock:
                shared.values[999] += 1
        return 0

    pids = [fork_child(add) for _ in range(4)]
    assert [exit_code(pid) for pid in pids] == [0] * 4
    assert shared.values[999] == 400
    shared.values[0] = -(2**63)  # signed 64-bit
    assert shared.values[0] == -(2**63)


def test_shared_bytes_publishes_whole_generations_to_children():
    box = SharedBytes()
    assert box.read() == (0, b"")
    assert box.publish(b"first") == 1
    data = os.urandom(300_000)  # far above one page and a pipe's buffer

    def read_second() -> int:
        generation, seen = box.read()
        return 0 if (generation, seen) == (2, data) else 1

    assert box.publish(data) == 2
    assert exit_code(fork_child(read_second)) == 0
    assert box.publish(b"") == 3 and box.read() == (3, b"")


# ---- UserSlots on top of them ----


def test_user_slots_survive_a_process_killed_inside_their_lock():
    # Before: a multiprocessing.Lock (a POSIX semaphore) stayed taken forever.
    slots = UserSlots(limit=2)
    die_holding(slots.lock)
    assert finishes(lambda: slots.acquire("alice"))
    assert slots.count("alice") == 1


def test_reconcile_gives_back_what_a_dead_process_held():
    slots = UserSlots(limit=3)
    assert slots.acquire("alice")

    def take_two_and_one() -> int:
        ok = slots.acquire("alice") and slots.acquire("alice") and slots.acquire("bob")
        return 0 if ok else 1

    pid = fork_child(take_two_and_one)  # exits without releasing: as if it were killed
    assert exit_code(pid) == 0
    assert (slots.count("alice"), slots.count("bob")) == (3, 1)
    assert not slots.acquire("alice")
    assert slots.reconcile(pid) == 3
    assert (slots.count("alice"), slots.count("bob")) == (1, 0)  # ours is still ours
    assert slots.reconcile(pid) == 0  # nothing twice
    slots.release("alice")
    assert slots.count("alice") == 0


def test_reconcile_leaves_the_slots_of_live_processes():
    slots = UserSlots(limit=10)
    for _ in range(3):
        assert slots.acquire("alice")
    assert slots.reconcile(os.getpid() + 1_000_000) == 0  # no such process holds any
    assert slots.count("alice") == 3
    for _ in range(3):
        slots.release("alice")
    assert slots.count("alice") == 0


def test_a_full_ledger_refuses_under_a_limit_and_does_not_count_without_one():
    slots = UserSlots(limit=5, capacity=2)
    assert slots.acquire("alice") and slots.acquire("bob")
    assert slots.acquire("alice")  # alice's entry of this process already exists
    carol = next(
        n
        for n in (f"user{i}" for i in range(100))
        if slots._bucket(n) not in {slots._bucket("alice"), slots._bucket("bob")}
    )
    assert not slots.acquire(carol)  # no entry left: refused rather than unaccounted
    slots.limit = None
    assert slots.acquire(carol)  # no limit: served, uncounted
    assert slots.count(carol) == 0
    slots.release(carol)  # nothing held: nothing changes
    assert (slots.count("alice"), slots.count("bob")) == (2, 1)


def test_entries_are_reused_after_release_and_reconcile():
    slots = UserSlots(limit=None, capacity=4)
    for round_ in range(50):
        users = [f"u{round_}-{n}" for n in range(4)]
        assert all(slots.acquire(user) for user in users)
        for user in users:
            slots.release(user)
        pid = fork_child(lambda users=users: 0 if all(map(slots.acquire, users)) else 1)
        assert exit_code(pid) == 0
        assert slots.reconcile(pid) == 4
    assert slots.acquire("last") and slots.count("last") == 1


# ---- one lock, one table, one fork rule for the whole package ----


def test_try_acquire_never_waits_for_another_thread_or_process():
    fd = anonymous_file()
    lock = RobustLock(fd)
    assert lock.try_acquire()
    assert not lock.try_acquire()  # this process, another thread's turn: no wait
    lock.release()
    with held_by_a_child(lock) as let_go:
        assert not lock.try_acquire()  # another process holds the byte
        let_go()
        assert lock.try_acquire()
    lock.release()
    os.close(fd)


def test_shared_records_start_zeroed_and_are_shared_with_children():
    record = struct.Struct("=Qidd")
    table = SharedRecords(record, 16)
    assert [table.read(index) for index in range(16)] == [(0, 0, 0.0, 0.0)] * 16

    def write_last() -> int:
        with table.lock:
            table.write(15, 2**64 - 1, -5, 1.5, float("inf"))
        return 0

    assert exit_code(fork_child(write_last)) == 0
    assert table.read(15) == (2**64 - 1, -5, 1.5, float("inf"))
    table.clear(15)
    assert table.read(15) == (0, 0, 0.0, 0.0)
    assert table.read(14) == (0, 0, 0.0, 0.0)


def test_the_file_of_shared_memory_is_closed_with_it():
    # Each back-off table and check gate made (one per daemon, many in tests) used to hold
    # its descriptor open for good (SharedInts, SharedBytes) or close it (throttle's copy).
    shared = SharedMemory(4096)
    fd = shared.fd
    before = os.fstat(fd)
    assert before.st_size == 4096
    del shared
    gc.collect()
    try:
        after = os.fstat(fd)
    except OSError:
        return  # closed
    # The number may already serve another file opened meanwhile, not this one.
    assert (after.st_dev, after.st_ino) != (before.st_dev, before.st_ino)


def test_process_local_state_starts_afresh_in_a_forked_child():
    class Counter(ProcessLocal):
        def __init__(self) -> None:
            self._register()

        def _start_process(self) -> None:
            self.pid = os.getpid()

    counter = Counter()

    def fresh() -> int:
        return 0 if counter.pid == os.getpid() else 1

    assert exit_code(fork_child(fresh)) == 0
    assert counter.pid == os.getpid()


def test_the_login_back_off_survives_a_process_killed_inside_its_lock():
    backoff = FailedLoginBackoff(delay=1.0)
    assert isinstance(backoff.lock, RobustLock)
    die_holding(backoff.lock)
    assert finishes(lambda: backoff.failed("192.0.2.7", b"alice"))
    assert backoff.failures("192.0.2.7", b"alice") == 1


def test_the_check_gate_follows_a_reloaded_limit():
    # Daemon._apply sets check_gate.limit on reload; the gate's bytes must follow it.
    gate = CheckGate(1)
    first = gate.acquire(time.monotonic() + TIMEOUT)
    assert first is not None
    assert gate.acquire(time.monotonic() + 0.1) is None
    gate.limit = 2
    second = gate.acquire(time.monotonic() + TIMEOUT)
    assert second is not None and second != first
    gate.release(first)
    gate.release(second)


def test_only_shmem_takes_record_locks_maps_memory_or_hooks_fork():
    # throttle.py had its own fcntl lock, mmap table and at-fork registry beside these;
    # lookups.py its own at-fork hook. One implementation each, here.
    package = Path(__file__).resolve().parent.parent / "socks5d"
    pattern = re.compile(r"\b(fcntl\.lockf|mmap\.mmap|memfd_create|register_at_fork)\b")
    found = [
        f"{path.name}: {match.group(1)}"
        for path in sorted(package.rglob("*.py"))
        if path.name != "shmem.py"
        for match in pattern.finditer(path.read_text())
    ]
    assert found == []
