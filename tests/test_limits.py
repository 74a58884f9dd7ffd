"""Per-user connection slots, shared by threads and by forked children."""

from __future__ import annotations

import os

from socks5d.policy.limits import UserSlots


def test_slots_up_to_the_limit_then_refused_until_one_is_released():
    slots = UserSlots(limit=2)
    assert [slots.acquire("alice") for _ in range(3)] == [True, True, False]
    assert slots.count("alice") == 2
    assert slots.acquire("bob")  # other users have their own count
    slots.release("alice")
    assert slots.acquire("alice")


def test_no_limit_means_unlimited():
    for limit in (None, 0):
        slots = UserSlots(limit=limit)
        assert all(slots.acquire("alice") for _ in range(1000))
        assert slots.count("alice") == 1000


def test_release_never_goes_below_zero():
    slots = UserSlots(limit=1)
    slots.release("alice")
    assert slots.count("alice") == 0
    assert slots.acquire("alice")


def test_forked_children_share_the_counts():
    slots = UserSlots(limit=3)
    assert slots.acquire("alice")
    pids = []
    for _ in range(2):
        pid = os.fork()
        if pid == 0:  # child: take one slot, report through the exit status
            os._exit(0 if slots.acquire("alice") else 1)
        pids.append(pid)
    statuses = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
    assert statuses == [0, 0]
    assert slots.count("alice") == 3  # the children's slots are visible here
    assert not slots.acquire("alice")
