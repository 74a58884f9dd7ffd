"""Authentication policy: which RFC 1928 method to pick, and RFC 1929 credential checks.

Pure decisions, no sockets. Credentials are compared in constant time, and an unknown
user costs the same as a wrong password so a client cannot probe for user names.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from dataclasses import dataclass, field

from .config import User
from .protocol import Method


@dataclass(frozen=True, slots=True)
class Authenticator:
    """The users known to this server; none means no authentication is required."""

    passwords: dict[bytes, bytes] = field(default_factory=dict, repr=False)

    @classmethod
    def from_users(cls, users: Iterable[User]) -> Authenticator:
        return cls({user.name.encode(): user.password.encode() for user in users})

    @property
    def required(self) -> bool:
        return bool(self.passwords)

    def choose_method(self, offered: Iterable[int]) -> Method:
        """RFC 1928 §3: pick the one method we accept among those the client offers."""
        wanted = Method.USERNAME_PASSWORD if self.required else Method.NO_AUTHENTICATION_REQUIRED
        return wanted if wanted in offered else Method.NO_ACCEPTABLE_METHODS

    def check(self, username: bytes, password: bytes) -> bool:
        """RFC 1929 §2: constant-time check; unknown users compare against a dummy."""
        expected = self.passwords.get(username)
        known = expected is not None
        if expected is None:
            expected = b"\0" * max(len(password), 1)
        matches = hmac.compare_digest(expected, password)
        return known and matches
