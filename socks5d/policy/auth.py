"""Authentication policy: which RFC 1928 method to pick, RFC 1929 credential checks and
password hashes. (How often and how many checks may run: throttle.py.)

No sockets. Credentials are compared in constant time; an unknown user and a plaintext
entry cost one scrypt check with the default parameters, exactly what a wrong password
of a default hash costs, so timing does not tell which names exist; passwords are stored
as self-describing scrypt or PBKDF2 hashes (plaintext still works, with a warning).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from ..ops.config import ConfigError, User
from ..socks.protocol import Method

# ---- password hashes ----

# scrypt with N = 2**14, r = 8, p = 1: 16 MiB and tens of milliseconds per check (the
# parameters RFC 7914 §2 and OWASP suggest for interactive logins).
SCRYPT_LOG_N, SCRYPT_R, SCRYPT_P = 14, 8, 1
PBKDF2_ITERATIONS = 600_000  # OWASP 2023 for PBKDF2-HMAC-SHA256


class HashFormatError(ValueError):
    """A password_hash string that is not one of our self-describing formats."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def hash_password(password: str, scheme: str = "scrypt") -> str:
    """A self-describing hash: `scrypt$ln=14,r=8,p=1$SALT$HASH` or `pbkdf2_sha256$N$SALT$HASH`."""
    salt = os.urandom(16)
    secret = password.encode()
    if scheme == "scrypt":
        digest = _scrypt(secret, salt, SCRYPT_LOG_N, SCRYPT_R, SCRYPT_P)
        params = f"ln={SCRYPT_LOG_N},r={SCRYPT_R},p={SCRYPT_P}"
        return f"scrypt${params}${_b64(salt)}${_b64(digest)}"
    if scheme == "pbkdf2_sha256":
        digest = hashlib.pbkdf2_hmac("sha256", secret, salt, PBKDF2_ITERATIONS)
        return f"pbkdf2_sha256${PBKDF2_ITERATIONS}${_b64(salt)}${_b64(digest)}"
    raise ValueError(f"unknown scheme {scheme!r} (scrypt or pbkdf2_sha256)")


def _scrypt(secret: bytes, salt: bytes, log_n: int, r: int, p: int) -> bytes:
    n = 1 << log_n
    return hashlib.scrypt(secret, salt=salt, n=n, r=r, p=p, maxmem=256 * n * r, dklen=32)


def parse_hash(encoded: str) -> Callable[[bytes], bytes]:
    """Check a hash string's shape; returns a function computing the digest to compare.

    Raises HashFormatError naming what is wrong, so config errors are caught at load.
    """
    scheme, _, rest = encoded.partition("$")
    parts = rest.split("$")
    try:
        if scheme == "scrypt" and len(parts) == 3:
            params = dict(item.split("=", 1) for item in parts[0].split(","))
            log_n, r, p = int(params["ln"]), int(params["r"]), int(params["p"])
            if not (1 <= log_n <= 20 and 1 <= r <= 32 and 1 <= p <= 16):
                raise HashFormatError("scrypt parameters out of range")
            salt = _unb64(parts[1])
            return lambda secret: _scrypt(secret, salt, log_n, r, p)
        if scheme == "pbkdf2_sha256" and len(parts) == 3:
            iterations = int(parts[0])
            if not 1_000 <= iterations <= 10_000_000:
                raise HashFormatError("pbkdf2 iterations out of range")
            salt = _unb64(parts[1])
            return lambda secret: hashlib.pbkdf2_hmac("sha256", secret, salt, iterations)
    except (KeyError, ValueError) as exc:
        if isinstance(exc, HashFormatError):
            raise
        raise HashFormatError(f"malformed {scheme} hash: {exc}") from None
    raise HashFormatError("expected scrypt$ln=..,r=..,p=..$SALT$HASH or pbkdf2_sha256$N$SALT$HASH")


def _expected_digest(encoded: str) -> bytes:
    return _unb64(encoded.rsplit("$", 1)[1])


@dataclass(frozen=True, slots=True)
class _Credential:
    compute: Callable[[bytes], bytes] = field(repr=False)
    expected: bytes = field(repr=False)


def _credential(user: User) -> _Credential:
    if user.password_hash:
        return _Credential(parse_hash(user.password_hash), _expected_digest(user.password_hash))
    # Plaintext: hashed here as the default scheme would, so that checking it costs what
    # checking a default hash does (and the compare is constant time whatever the length).
    salt = os.urandom(16)
    compute = _default_scrypt(salt)
    return _Credential(compute, compute((user.password or "").encode()))


def _default_scrypt(salt: bytes) -> Callable[[bytes], bytes]:
    return lambda secret: _scrypt(secret, salt, SCRYPT_LOG_N, SCRYPT_R, SCRYPT_P)


def _unknown_user() -> _Credential:
    """What an unknown name is checked against: a default scrypt that never matches."""
    return _Credential(_default_scrypt(os.urandom(16)), os.urandom(32))


def is_default_hash(encoded: str) -> bool:
    """True for a scrypt hash with our parameters: checking it costs what an unknown
    user costs. Others (PBKDF2, other scrypt costs) can be told apart by timing."""
    return encoded.startswith(f"scrypt$ln={SCRYPT_LOG_N},r={SCRYPT_R},p={SCRYPT_P}$")


_PROCESS_KEY = os.urandom(32)


def _keyed(secret: bytes) -> bytes:
    return hmac.new(_PROCESS_KEY, secret, hashlib.sha256).digest()


class _VerifiedCache:
    """Remembers recent successful (user, password) pairs by a keyed digest.

    A scrypt check costs tens of milliseconds of CPU; a client opening many short
    connections with the right password must not pay it every time. Only successes are
    cached, keyed by credentials (never by client address), in a bounded LRU.
    """

    def __init__(self, size: int = 1024) -> None:
        self.size = size
        self.entries: OrderedDict[bytes, None] = OrderedDict()
        self.lock = threading.Lock()

    def key(self, username: bytes, password: bytes) -> bytes:
        return _keyed(len(username).to_bytes(2, "big") + username + password)

    def __contains__(self, key: bytes) -> bool:
        with self.lock:
            if key in self.entries:
                self.entries.move_to_end(key)
                return True
            return False

    def add(self, key: bytes) -> None:
        with self.lock:
            self.entries[key] = None
            while len(self.entries) > self.size:
                self.entries.popitem(last=False)


# ---- method choice and credential check ----


@dataclass(frozen=True, slots=True)
class Authenticator:
    """The users known to this server; none means no authentication is required.

    `socks4` is server.socks4: whether a SOCKS4/4a client, which has no way to log in,
    may use the proxy ("auto": only while no logins are required).
    """

    credentials: dict[bytes, _Credential] = field(default_factory=dict, repr=False)
    verified: _VerifiedCache = field(default_factory=_VerifiedCache, repr=False, compare=False)
    unknown: _Credential = field(default_factory=_unknown_user, repr=False, compare=False)
    socks4: bool | str = "auto"

    @classmethod
    def from_users(
        cls, users: Iterable[User], source: str = "<config>", socks4: bool | str = "auto"
    ) -> Authenticator:
        """Raises ConfigError naming the user whose password_hash is malformed."""
        credentials = {}
        for index, user in enumerate(users):
            try:
                credentials[user.name.encode()] = _credential(user)
            except HashFormatError as exc:
                raise ConfigError(f"{source}: users[{index}].password_hash: {exc}") from None
        return cls(credentials, socks4=socks4)

    @property
    def required(self) -> bool:
        return bool(self.credentials)

    def socks4_refusal(self) -> str | None:
        """Why a SOCKS4/4a client is refused (for the access log), or None to serve it.

        SOCKS4's USERID is a claim with no password: it never counts as a login.
        """
        if self.socks4 is False:
            return "SOCKS4 refused (server.socks4 = false)"
        if self.socks4 == "auto" and self.required:
            return "SOCKS4 refused: logins are required and SOCKS4 has none (server.socks4 = auto)"
        return None

    def choose_method(self, offered: Iterable[int]) -> Method:
        """RFC 1928 §3: pick the one method we accept among those the client offers."""
        wanted = Method.USERNAME_PASSWORD if self.required else Method.NO_AUTHENTICATION_REQUIRED
        return wanted if wanted in offered else Method.NO_ACCEPTABLE_METHODS

    def check(self, username: bytes, password: bytes) -> bool:
        """RFC 1929 §2: remembered, or verified now (see verify)."""
        return self.remembers(username, password) or self.verify(username, password)

    def remembers(self, username: bytes, password: bytes) -> bool:
        """True when this exact pair logged in recently: no hash (and no queue) needed."""
        return self.verified.key(username, password) in self.verified

    def verify(self, username: bytes, password: bytes) -> bool:
        """The costly constant-time check; an unknown user costs one default scrypt too."""
        credential = self.credentials.get(username)
        known = credential is not None
        if credential is None:
            credential = self.unknown
        matches = hmac.compare_digest(credential.compute(password), credential.expected)
        if known and matches:
            self.verified.add(self.verified.key(username, password))
            return True
        return False
