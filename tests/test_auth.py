"""Method choice (RFC 1928 §3) and credential checks (RFC 1929)."""

from __future__ import annotations

from socks5d.auth import Authenticator
from socks5d.config import User
from socks5d.protocol import Method

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
