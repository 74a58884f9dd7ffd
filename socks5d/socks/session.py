"""The access-log record of one client connection, as a text line or a JSON-ready dict.

Filled in as the connection goes through its phases, by whatever serves it (the
handshake, an event loop's fast path, a handler thread), and logged once at the end.
Stdlib and the protocol's Reply enum only.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any

from .protocol import Reply


def new_session_id() -> str:
    """12 hex digits: unique enough to grep one connection's lines, cheap to make.

    Not a secret, so the `random` generator (no syscall; reseeded in a forked child)
    rather than os.urandom, a getrandom() call per connection.
    """
    return f"{random.getrandbits(48):012x}"


@dataclass(slots=True)
class Session:
    """What the access log reports about one connection."""

    client: str
    id: str = field(default_factory=new_session_id)
    started: float = field(default_factory=time.monotonic)
    proto: str = "socks5"  # the client's dialect: "socks5", "socks4" or "socks4a"
    user: str = "-"  # the RFC 1929 login name
    userid: str | None = None  # SOCKS4's USERID: what the client claims, never a login
    command: str = "-"
    target: str = "-"  # as requested: a name or an address, with the port
    resolved: str = "-"  # the address actually connected to (or the BIND peer)
    egress: str = "-"  # our address on the outside: outbound socket, BIND or UDP socket
    # The outcome as an RFC 1928 §6 code, in every dialect (a SOCKS4 client was sent
    # 90 for 00 and 91 for any other).
    reply: Reply | None = None
    up: int = 0  # bytes client -> target
    down: int = 0  # bytes target -> client
    closed_by: str = "-"  # "client", "target", "idle", "proxy", ...
    end: str = "-"  # why it ended, in words
    rule: str = "-"  # the access decision that applied, when one denied
    # The load balancer the connection came through, when a PROXY protocol header named
    # `client` (server.proxy_protocol); "-": the client connected directly.
    balancer: str = "-"
    via: str = "-"  # the parent proxy (its [[upstreams]] name) a CONNECT went through
    parent: str = "-"  # what that parent said: "reply 05", "HTTP 403 Forbidden", "timeout"
    dispatched_at: float = 0.0  # time.monotonic() when the request came (0.0: none yet)
    replied_at: float = 0.0  # and when a CONNECT got its reply (set by the metrics)
    # UDP ASSOCIATE: datagrams relayed up, relayed down, dropped up, dropped down.
    datagrams: tuple[int, int, int, int] | None = None

    def duration(self) -> float:
        return time.monotonic() - self.started

    def __str__(self) -> str:
        return self.log_line()

    def log_line(self) -> str:
        reply = "-" if self.reply is None else f"{self.reply:02x}"
        # USERID only where there is one: SOCKS5 lines stay as they were, plus proto.
        userid = ""
        if self.proto != "socks5":
            userid = f"userid={'-' if self.userid is None else _field(self.userid)} "
        line = (
            f"id={self.id} client={self.client} proto={self.proto} user={_field(self.user)} "
            f"{userid}cmd={self.command} "
            f"target={self.target} resolved={self.resolved} egress={self.egress} "
            f"reply={reply} up={self.up} down={self.down} time={self.duration():.3f}s "
            f"closed_by={self.closed_by} rule={self.rule} end={self.end!r}"
        )
        if self.balancer != "-":
            line += f" balancer={self.balancer}"
        if self.via != "-":  # chained through a parent proxy
            line += f" via={self.via} parent={self.parent!r}"
        return line

    def as_dict(self) -> dict[str, Any]:
        return {
            "event": "access",
            "session": self.id,
            "client": self.client,
            "proto": self.proto,
            "user": None if self.user == "-" else self.user,
            "userid": self.userid,
            "command": self.command,
            "target": self.target,
            "resolved": None if self.resolved == "-" else self.resolved,
            "egress": None if self.egress == "-" else self.egress,
            "reply": None if self.reply is None else int(self.reply),
            "bytes_up": self.up,
            "bytes_down": self.down,
            "duration": round(self.duration(), 6),
            "closed_by": self.closed_by,
            "rule": None if self.rule == "-" else self.rule,
            "end": self.end,
            "balancer": None if self.balancer == "-" else self.balancer,
            "via": None if self.via == "-" else self.via,
            "parent": None if self.parent == "-" else self.parent,
        }


class SessionObserver:
    """Hooks for whoever watches connections as they go (the daemon's metrics).

    Each is called once per event, at the one place that settles it, whichever driver
    (loop or thread) serves the connection: begun and concluded by the drivers' shared
    Negotiation.begin and conclude_session, the rest by the handshake and the handler.
    They run on the connection's path, so they must be quick and must not raise. This
    one does nothing (metrics off).
    """

    __slots__ = ()

    def begun(self, session: Session) -> None:
        """A client was accepted; its handshake begins."""

    def dispatched(self, session: Session) -> None:
        """Its request was parsed (command and target set) and goes to be carried out."""

    def replied(self, session: Session) -> None:
        """The request got its final reply (session.reply)."""

    def login_failed(self, session: Session) -> None:
        """RFC 1929 credentials were refused."""

    def limit_refused(self, limit: str) -> None:
        """A client was refused at a connection limit: "max_connections", "per_ip" or
        "per_user"."""

    def concluded(self, session: Session) -> None:
        """The connection ended; the session holds what the access log writes."""


NO_OBSERVER = SessionObserver()

_PLAIN = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._@+-")


def _field(text: str) -> str:
    """A client-chosen value (the login name) as one unforgeable field of the line:
    anything beyond plain characters is quoted with escapes, so a name holding a newline
    or `key=value` text cannot fake a field or a log line."""
    return text if text and _PLAIN.issuperset(text) else repr(text)
