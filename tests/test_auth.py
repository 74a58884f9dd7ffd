"""Method choice (RFC 1928 §3) and credential checks (RFC 1929)."""

from __future__ import annotations

import os

import pytest

from socks5d.ops.config import User
from socks5d.policy.auth import (
    Authenticator,
    HashFormatError,
    hash_password,
    parse_hash,
)
from socks5d.policy.throttle import FailedLoginBackoff
from socks5d.socks.protocol import Method

OPEN = Authenticator()
LOCKED = Authenticator.from_users([User("alice", "secret"), User("bob", "hunter2")])


def test_without_users_no_authentication_is_chosen():
    assert OPEN.choose_method([0x00]) is Method.NO_AUTHENTICATION_REQUIRED
    assert OPEN.choose_method([0x02, 0x00]) is Method.NO_AUTHENTICATION_REQUIRED


def test_without_users_a_client_offering_only_password_gets_no_acceptable():
    assert OPEN.choose_method([0x02]) is Method.NO_ACCEPTABLE_METHODS


def test_with_users_password_is_required_even_if_no_auth_is_offered_first():
    assert LOCKED.choose_method([0x00, 0x02]) is Method.USERNAME_PASSWORD
    assert LOCKED.choose_method([0x00]) is Method.NO_ACCEPTABLE_METHODS
    assert LOCKED.choose_method([0x01, 0x80, 0xFE]) is Method.NO_ACCEPTABLE_METHODS


def test_credentials_must_match_exactly():
    assert LOCKED.check(b"alice", b"secret")
    assert LOCKED.check(b"bob", b"hunter2")
    assert not LOCKED.check(b"alice", b"hunter2")
    assert not LOCKED.check(b"alice", b"secret ")
    assert not LOCKED.check(b"alice", b"")
    assert not LOCKED.check(b"carol", b"secret")
    assert not LOCKED.check(b"", b"")
    assert not OPEN.check(b"alice", b"secret")


def test_repr_does_not_show_passwords():
    assert "secret" not in repr(LOCKED)


# ---- password hashes ----


@pytest.mark.parametrize("scheme", ["scrypt", "pbkdf2_sha256"])
def test_hashed_password_verifies_and_wrong_one_does_not(scheme):
    encoded = hash_password("correct horse", scheme)
    assert encoded.startswith(f"{scheme}$")
    assert "correct horse" not in encoded
    auth = Authenticator.from_users([User("alice", password_hash=encoded)])
    assert auth.check(b"alice", b"correct horse")
    assert not auth.check(b"alice", b"correct horsE")
    assert not auth.check(b"bob", b"correct horse")


def test_two_hashes_of_one_password_differ_by_salt():
    assert hash_password("x") != hash_password("x")


def test_scrypt_hash_names_its_parameters():
    scheme, params, salt, digest = hash_password("x").split("$")
    assert (scheme, params) == ("scrypt", "ln=14,r=8,p=1")
    assert len(salt) == 22 and len(digest) == 43  # 16 and 32 bytes, base64 without padding


@pytest.mark.parametrize(
    "encoded",
    [
        "md5$abc",
        "scrypt$ln=14,r=8$c2FsdA$aGFzaA",
        "scrypt$ln=99,r=8,p=1$c2FsdA$aGFzaA",
        "scrypt$ln=14,r=8,p=1$not base64!$aGFzaA",
        "pbkdf2_sha256$ten$c2FsdA$aGFzaA",
        "pbkdf2_sha256$10$c2FsdA$aGFzaA",
        "scrypt$",
    ],
)
def test_malformed_hashes_are_rejected_with_a_reason(encoded):
    with pytest.raises(HashFormatError):
        parse_hash(encoded)


def test_a_successful_check_is_remembered_but_a_failure_is_not():
    encoded = hash_password("pw", "pbkdf2_sha256")
    auth = Authenticator.from_users([User("alice", password_hash=encoded)])
    key = auth.verified.key(b"alice", b"pw")
    assert key not in auth.verified
    assert auth.check(b"alice", b"pw")
    assert key in auth.verified
    assert not auth.check(b"alice", b"nope")
    assert auth.verified.key(b"alice", b"nope") not in auth.verified


def test_cache_keys_do_not_collide_across_the_user_password_split():
    auth = Authenticator.from_users([User("ab", "c")])
    assert auth.verified.key(b"ab", b"c") != auth.verified.key(b"a", b"bc")


# ---- back-off after failed logins ----


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def wait(backoff: FailedLoginBackoff, client: str, user: bytes = b"alice") -> float | None:
    turn = backoff.book(client, user)
    return None if turn is None else turn.wait


def test_no_wait_before_any_failure():
    backoff = FailedLoginBackoff(delay=0.5, clock=Clock())
    assert wait(backoff, "192.0.2.1") == 0.0


def test_delay_doubles_per_failure_up_to_the_cap():
    clock = Clock()
    backoff = FailedLoginBackoff(delay=0.5, max_delay=3.0, clock=clock)
    waits = []
    for _ in range(5):
        backoff.failed("192.0.2.1", b"alice")
        waits.append(wait(backoff, "192.0.2.1"))
        clock.now += 100  # far apart: each wait is the fresh delay
    assert waits == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_parallel_attempts_queue_up_instead_of_multiplying_the_rate():
    clock = Clock()
    backoff = FailedLoginBackoff(delay=1.0, max_delay=10.0, clock=clock)
    backoff.failed("192.0.2.1", b"alice")
    assert [wait(backoff, "192.0.2.1") for _ in range(3)] == [1.0, 2.0, 3.0]
    assert wait(backoff, "192.0.2.2") == 0.0  # other clients are not slowed


def test_success_and_quiet_window_forget_the_failures():
    clock = Clock()
    backoff = FailedLoginBackoff(delay=1.0, window=60.0, clock=clock)
    backoff.failed("192.0.2.1", b"alice")
    backoff.succeeded("192.0.2.1", b"alice")
    assert wait(backoff, "192.0.2.1") == 0.0
    backoff.failed("192.0.2.3", b"alice")
    clock.now += 61
    assert wait(backoff, "192.0.2.3") == 0.0
    assert backoff.failures("192.0.2.3") == 0


def test_forked_children_share_the_failures():
    backoff = FailedLoginBackoff(delay=1.0, clock=Clock())
    pid = os.fork()
    if pid == 0:  # a child fails a login, as a forking-mode handler would
        backoff.failed("192.0.2.1", b"alice")
        os._exit(0)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    assert backoff.failures("192.0.2.1", b"alice") == 1
    assert wait(backoff, "192.0.2.1") == 1.0
