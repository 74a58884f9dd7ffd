"""`socks5d probe`: check any SOCKS5 server against RFC 1928 and RFC 1929, as a client.

Each check opens its own connections to the proxy, speaks the wire format of
:mod:`socks5d.socks.protocol` (the same encoders and parsers the server uses, here from the
client's side) and compares what comes back with what the RFCs ask. The targets the proxy is
asked to reach are started by the probe itself (:mod:`socks5d.ops.probe_targets`), so a
reply can be checked against what really happened: the source address the target saw, the
bytes that arrived after a half-close.

A check ends as ``pass``, ``fail``, ``not-supported`` (the server declined an optional part
with the answer the RFC gives for it: ``07`` for BIND or UDP ASSOCIATE, ``05 FF`` for
username/password, or it keeps a silent client open: it has no handshake timeout) or
``skipped`` (the probe cannot run it here: no ``--user``, no IPv6 target). Every read has a
deadline and every socket is closed when its check ends, whatever happened.

What counts as a pass where the RFC leaves room (documented in the README):
- a name that cannot resolve (``name.invalid``, RFC 6761 §6.4) must get ``04`` (host
  unreachable): ``01`` (general failure) says the server failed, not the target;
- a CONNECT reply's BND.ADDR/BND.PORT must be the source address the target saw (RFC 1928
  §6: "the address which the SOCKS server assigned to connect to the target host");
  ``0.0.0.0:0`` fails;
- a failure reply must be followed by a close (RFC 1928 §6: "MUST terminate the TCP
  connection shortly after sending the reply"), and a failed login too (RFC 1929 §2);
- a greeting, login and request split into single bytes, and a greeting, login, request and
  early data sent in one write, must both work: TCP delivers a stream, not messages.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from ..core.addresses import canonical_ip, format_host_port
from ..socks.protocol import (
    Address,
    AddressType,
    Command,
    ProtocolError,
    encode_address,
    encode_greeting,
    encode_request,
    encode_udp_datagram,
    encode_username_password,
    parse_reply,
    parse_udp_datagram,
)
from .probe_targets import TARGET_FIRST, Targets, TcpTarget, family_of

PASS = "pass"
FAIL = "fail"
NOT_SUPPORTED = "not-supported"
SKIPPED = "skipped"

# RFC 1928 §6, for the "got" column.
REPLY_NAMES = {
    0x00: "succeeded",
    0x01: "general failure",
    0x02: "not allowed by ruleset",
    0x03: "network unreachable",
    0x04: "host unreachable",
    0x05: "connection refused",
    0x06: "TTL expired",
    0x07: "command not supported",
    0x08: "address type not supported",
}
# RFC 6761 §6.4: "Any attempt to look up a name under .invalid ... MUST return NXDOMAIN".
UNRESOLVABLE_NAME = "name.invalid"
# Methods nobody implements: X'7E' is unassigned in the IANA range, X'FE' is private.
UNKNOWN_METHODS = (0x7E, 0xFE)
SPLIT_PAUSE = 0.01  # seconds between single-byte writes (TCP_NODELAY: a segment each)


@dataclass(frozen=True)
class CheckResult:
    """One row of the report."""

    check: str
    result: str
    expected: str
    got: str


@dataclass(frozen=True)
class ProbeOptions:
    """What to probe and how long anything may take."""

    proxy: tuple[str, int]
    user: tuple[bytes, bytes] | None = None
    # Where the targets listen: one IPv4 and/or one IPv6 address the proxy can reach.
    target_hosts: tuple[str, ...] = ()  # empty: 127.0.0.1, and ::1 where it exists
    target_name: str | None = None  # a name of the IPv4 target host ("localhost" on loopback)
    timeout: float = 5.0  # seconds for each connection of a check
    handshake_wait: float = 15.0  # seconds a silent client waits to be cut


@dataclass
class Report:
    """All results, and a note when the run could not get far (a login is needed)."""

    server: str
    results: list[CheckResult] = field(default_factory=list)
    note: str = ""

    @property
    def ok(self) -> bool:
        """Exit 0 only when nothing failed and nothing was left unchecked for want of a login."""
        return not self.note and all(r.result != FAIL for r in self.results)

    def as_json(self) -> str:
        return json.dumps(
            {
                "server": self.server,
                "ok": self.ok,
                "note": self.note,
                "checks": [asdict(r) for r in self.results],
            },
            indent=2,
        )

    def as_table(self) -> str:
        header = CheckResult("CHECK", "RESULT", "EXPECTED", "GOT")
        rows = [header, *self.results]
        widths = [max(len(getattr(row, col)) for row in rows) for col in ("check", "result")]
        expected_width = min(max(len(row.expected) for row in rows), 48)
        lines = [
            f"{row.check:<{widths[0]}}  {row.result:<{widths[1]}}  "
            f"{row.expected:<{expected_width}}  {row.got}".rstrip()
            for row in rows
        ]
        passed = sum(r.result == PASS for r in self.results)
        failed = sum(r.result == FAIL for r in self.results)
        lines.append("")
        lines.append(
            f"{self.server}: {passed} passed, {failed} failed, "
            f"{len(self.results) - passed - failed} not supported or skipped"
        )
        if self.note:
            lines.append(self.note)
        return "\n".join(lines)


class CheckFailed(Exception):
    """The server answered wrongly, or not at all; the message is what came back."""


class NotSupported(Exception):
    """The server declined an optional part the way the RFC says it may."""


class Skipped(Exception):
    """The probe cannot run this check here; the message says why."""


def hexbytes(data: bytes) -> str:
    return " ".join(f"{b:02x}" for b in data) or "nothing"


def reply_text(rep: int, bound: Address | None = None) -> str:
    text = f"{rep:02x} ({REPLY_NAMES.get(rep, 'unknown code')})"
    return f"{text}, bound {bound}" if bound is not None else text


def _unspecified(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def _same_address(a: tuple[str, int], b: tuple[str, int]) -> bool:
    try:
        return canonical_ip(a[0]) == canonical_ip(b[0]) and a[1] == b[1]
    except ValueError:
        return False


class Channel:
    """A client socket with a read buffer and one deadline: no read waits past it."""

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        self.sock = sock
        self.deadline = time.monotonic() + timeout
        self.buffer = bytearray()

    def send(self, data: bytes, split: bool = False) -> None:
        """Write ``data`` (one byte per segment with ``split``) before the deadline."""
        self.sock.settimeout(max(self.deadline - time.monotonic(), 0.01))
        pieces = [data[i : i + 1] for i in range(len(data))] if split else [data]
        for number, piece in enumerate(pieces):
            if number:
                time.sleep(SPLIT_PAUSE)
            try:
                self.sock.sendall(piece)
            except OSError as exc:
                sent = f" after {number} of {len(data)} bytes" if split else ""
                raise CheckFailed(
                    f"closed by the server while sending{sent} ({_os_error(exc)})"
                ) from None

    def _fill(self, what: str) -> bool:
        """Receive more bytes; False at EOF. Raises CheckFailed past the deadline."""
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise CheckFailed(self._so_far(f"no {what} in time"))
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(65536)
        except TimeoutError:
            raise CheckFailed(self._so_far(f"no {what} in time")) from None
        except ConnectionResetError:
            raise CheckFailed(self._so_far(f"connection reset before the {what}")) from None
        self.buffer += chunk
        return bool(chunk)

    def _so_far(self, text: str) -> str:
        return f"{text} (got {hexbytes(bytes(self.buffer[:32]))})" if self.buffer else text

    def read_exact(self, count: int, what: str) -> bytes:
        while len(self.buffer) < count:
            if not self._fill(what):
                raise CheckFailed(self._so_far(f"connection closed before the {what}"))
        data = bytes(self.buffer[:count])
        del self.buffer[:count]
        return data

    def read_reply(self, what: str = "reply") -> tuple[int, Address]:
        """RFC 1928 §6: one reply, leaving any bytes after it in the buffer."""
        while True:
            try:
                parsed = parse_reply(self.buffer)
            except ProtocolError as exc:
                raise CheckFailed(self._so_far(f"malformed {what}: {exc.message}")) from None
            if parsed is not None:
                (rep, bound), consumed = parsed
                del self.buffer[:consumed]
                return int(rep), bound
            if not self._fill(what):
                raise CheckFailed(self._so_far(f"connection closed before the {what}"))

    def read_to_eof(self, what: str, limit: int = 1 << 20) -> bytes:
        while self._fill(what):
            if len(self.buffer) > limit:
                raise CheckFailed(f"more than {limit} bytes before the {what}")
        data = bytes(self.buffer)
        self.buffer.clear()
        return data

    def expect_close(self, after: str) -> None:
        """The peer closes (EOF or reset) before the deadline, sending nothing more."""
        try:
            extra = self.read_to_eof(f"close {after}")
        except CheckFailed as exc:
            if "reset" in str(exc):
                return
            raise CheckFailed(f"still open {after}") from None
        if extra:
            raise CheckFailed(f"sent {hexbytes(extra[:16])} {after} instead of closing")


class Prober:
    """Runs every check against one proxy, with the targets it started."""

    def __init__(self, options: ProbeOptions, targets: Targets) -> None:
        self.options = options
        self.targets = targets
        self.sockets: list[socket.socket] = []  # opened by the running check; closed after it
        self.method: int | None = None  # the method sessions use, once the greeting told us
        self.login_required = False
        self.session_problem = "greeting.no-auth did not pass: no session to run this in"

    # ---- running ----

    def run(self) -> list[CheckResult]:
        """Every check in order; the silent client of timeout.handshake waits meanwhile."""
        started = time.monotonic()
        silent, silent_error = self._open_silent()
        results: list[CheckResult] = []
        try:
            results.append(self._check("greeting.no-auth", self.greeting_no_auth))
            for name, check in self._simple_checks():
                results.append(self._check(name, check))
            results.extend(self._two_stage("bind", self.bind_first, self.bind_second))
            results.extend(self._udp_checks())
            results.append(self._check("login.failure", self.login_failure))
            results.append(
                self._check(
                    "timeout.handshake", lambda: self.silent_client(silent, silent_error, started)
                )
            )
        finally:
            if silent is not None:
                silent.close()
        return results

    def _simple_checks(self) -> list[tuple[str, Callable[[], str]]]:
        return [
            ("greeting.methods", self.greeting_methods),
            ("greeting.no-acceptable", self.greeting_no_acceptable),
            ("login.success", self.login_success),
            ("connect.ipv4", lambda: self.connect_echo(4)),
            ("connect.ipv6", lambda: self.connect_echo(6)),
            ("connect.name", self.connect_name),
            ("connect.bnd-addr", self.connect_bound_address),
            ("reply.connection-refused", self.reply_refused),
            ("reply.host-unreachable", self.reply_unresolvable),
            ("reply.command-not-supported", self.reply_command),
            ("reply.address-type-not-supported", self.reply_address_type),
            ("stream.split-bytes", self.split_bytes),
            ("stream.pipelined", self.pipelined),
            ("halfclose.client-eof", self.client_half_close),
            ("halfclose.target-eof", self.target_half_close),
        ]

    def _check(self, name: str, check: Callable[[], str], keep_open: bool = False) -> CheckResult:
        """Run one check; whatever it raises becomes a row, never a traceback."""
        result = PASS
        try:
            got = check()
        except NotSupported as exc:
            result, got = NOT_SUPPORTED, str(exc)
        except Skipped as exc:
            result, got = SKIPPED, str(exc)
        except CheckFailed as exc:
            result, got = FAIL, str(exc)
        except OSError as exc:
            result, got = FAIL, _os_error(exc)
        except Exception as exc:  # a bug of the probe must not hide the other rows
            result, got = FAIL, f"probe error: {type(exc).__name__}: {exc}"
        finally:
            if not keep_open:
                self.close_sockets()
        return CheckResult(name, result, EXPECTED[name], got)

    def _two_stage(
        self, name: str, first: Callable[[dict[str, Any]], str], second: Callable[..., str]
    ) -> list[CheckResult]:
        """BIND and UDP ASSOCIATE: a second check runs on the first one's connection."""
        state: dict[str, Any] = {}
        try:
            one = self._check(f"{name}.first-reply", lambda: first(state), keep_open=True)
            if "relay" not in state:
                return [one, self._follows(f"{name}.second-reply", one)]
            return [one, self._check(f"{name}.second-reply", lambda: second(state))]
        finally:
            self.close_sockets()

    def _udp_checks(self) -> list[CheckResult]:
        state: dict[str, Any] = {}
        try:
            one = self._check("udp.associate", lambda: self.udp_associate(state), keep_open=True)
            rows = [one]
            for version in (4, 6):
                name = f"udp.round-trip-ipv{version}"
                if "relay" not in state:
                    rows.append(self._follows(name, one))
                    continue
                rows.append(
                    self._check(name, lambda v=version: self.udp_round_trip(state, v), True)
                )
            return rows
        finally:
            self.close_sockets()

    @staticmethod
    def _follows(name: str, first: CheckResult) -> CheckResult:
        """A second stage that cannot run: not supported or skipped as its first stage was,
        skipped when that failed."""
        if first.result == FAIL:
            return CheckResult(name, SKIPPED, EXPECTED[name], f"{first.check} failed")
        return CheckResult(name, first.result, EXPECTED[name], first.got)

    def close_sockets(self) -> None:
        while self.sockets:
            sock = self.sockets.pop()
            with contextlib.suppress(OSError):
                sock.close()

    # ---- connections ----

    def connect(self) -> Channel:
        """A new TCP connection to the proxy, closed when the check ends."""
        sock = socket.create_connection(self.options.proxy, timeout=self.options.timeout)
        self.sockets.append(sock)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return Channel(sock, self.options.timeout)

    def _open_silent(self) -> tuple[socket.socket | None, str]:
        try:
            return socket.create_connection(self.options.proxy, self.options.timeout), ""
        except OSError as exc:
            return None, _os_error(exc)

    def session_messages(self) -> tuple[bytes, bytes]:
        """The greeting and the login (empty without one) a session starts with."""
        if self.method is None:
            raise Skipped(self.session_problem)
        login = b""
        if self.method == 0x02 and self.options.user:
            login = encode_username_password(*self.options.user)
        return encode_greeting([self.method]), login

    def read_selection(self, channel: Channel) -> None:
        """RFC 1928 §3: the server's VER METHOD; RFC 1929 §2: VER STATUS after a login."""
        selection = channel.read_exact(2, "method selection")
        if selection != bytes((5, self.method or 0)):
            raise CheckFailed(f"method selection {hexbytes(selection)}")

    def read_login_status(self, channel: Channel) -> None:
        status = channel.read_exact(2, "login status")
        if status != b"\x01\x00":
            raise CheckFailed(f"login status {hexbytes(status)}")

    def session(self, split: bool = False) -> Channel:
        """A connection past greeting and login, ready for a request."""
        greeting, login = self.session_messages()
        channel = self.connect()
        channel.send(greeting, split)
        self.read_selection(channel)
        if login:  # RFC 1929: sent once the server chose the method
            channel.send(login, split)
            self.read_login_status(channel)
        return channel

    def request(
        self, channel: Channel, command: Command, address: Address, split: bool = False
    ) -> tuple[int, Address]:
        channel.send(encode_request(command, address), split)
        return channel.read_reply()

    def target_address(self, version: int) -> Address:
        echo = self.targets.echo.get(version)
        if echo is None:
            raise Skipped(f"no IPv{version} target host (see --target-host)")
        return Address.from_sockaddr(echo.address)

    def echo_through(self, channel: Channel, payload: bytes) -> None:
        channel.send(payload)
        echoed = channel.read_exact(len(payload), "echo")
        if echoed != payload:
            raise CheckFailed(f"the echo came back changed: {echoed[:32]!r}")

    def tunnel_to(self, target: TcpTarget | None) -> tuple[Channel, Address]:
        """A session with a CONNECT to one of our targets that succeeded."""
        if target is None:
            raise Skipped("no target host")
        channel = self.session()
        rep, bound = self.request(channel, Command.CONNECT, Address.from_sockaddr(target.address))
        self.connected(channel, rep, bound)
        return channel, bound

    def connected(self, channel: Channel, rep: int, bound: Address) -> None:
        if rep != 0x00:
            raise CheckFailed(reply_text(rep, bound))

    # ---- greeting (RFC 1928 §3) ----

    def greeting_no_auth(self) -> str:
        channel = self.connect()
        channel.send(encode_greeting([0x00]))
        selection = channel.read_exact(2, "method selection")
        if selection[0] != 5:
            raise CheckFailed(f"{hexbytes(selection)}: version {selection[0]:02x}, not 05")
        if selection[1] == 0x00:
            self.method = 0x00
            return "05 00 (no login needed)"
        if selection[1] == 0xFF:
            self.login_required = True
            if self.options.user:
                self.method = 0x02
            else:
                self.session_problem = "the server requires a login: give --user NAME:PASSWORD"
            return "05 ff (a login is required)"
        raise CheckFailed(f"{hexbytes(selection)}: method {selection[1]:02x} was not offered")

    def greeting_methods(self) -> str:
        offered = (0x00, 0x01, 0x02, 0x80)
        channel = self.connect()
        channel.send(encode_greeting(offered))
        selection = channel.read_exact(2, "method selection")
        if selection[0] == 5 and selection[1] in offered:
            return hexbytes(selection)
        raise CheckFailed(f"{hexbytes(selection)}: not one of the offered methods")

    def greeting_no_acceptable(self) -> str:
        channel = self.connect()
        channel.send(encode_greeting(UNKNOWN_METHODS))
        selection = channel.read_exact(2, "method selection")
        if selection != b"\x05\xff":
            raise CheckFailed(hexbytes(selection))
        return hexbytes(selection)

    # ---- login (RFC 1929) ----

    def _login(self, password: bytes) -> tuple[Channel, bytes]:
        if self.options.user is None:
            why = " (the server needs no login)" if self.method == 0x00 else ""
            raise Skipped(f"no --user given{why}")
        channel = self.connect()
        channel.send(encode_greeting([0x02]))
        selection = channel.read_exact(2, "method selection")
        if selection == b"\x05\xff":
            raise NotSupported("05 ff: the server does not offer username/password")
        if selection != b"\x05\x02":
            raise CheckFailed(f"method selection {hexbytes(selection)}")
        channel.send(encode_username_password(self.options.user[0], password))
        status = channel.read_exact(2, "login status")
        if status[0] != 0x01:  # RFC 1929 §2: the response's VER is X'01'
            raise CheckFailed(f"{hexbytes(status)}: version {status[0]:02x}, not 01")
        return channel, status

    def login_success(self) -> str:
        password = self.options.user[1] if self.options.user else b""
        _channel, status = self._login(password)
        if status[1] != 0x00:
            raise CheckFailed(f"05 02, {hexbytes(status)}: the login was refused")
        return f"05 02, {hexbytes(status)}"

    def login_failure(self) -> str:
        right = self.options.user[1] if self.options.user else b""
        wrong = (right + b"-not-the-password")[-255:] if right else b"wrong"
        channel, status = self._login(wrong)
        if status[1] == 0x00:
            raise CheckFailed(f"05 02, {hexbytes(status)}: a wrong password was accepted")
        # RFC 1929 §2: on failure the server "MUST close the connection".
        channel.expect_close("after the failed login")
        return f"05 02, {hexbytes(status)}, then closed"

    # ---- CONNECT (RFC 1928 §4, §6) ----

    def connect_echo(self, version: int) -> str:
        address = self.target_address(version)
        channel = self.session()
        rep, bound = self.request(channel, Command.CONNECT, address)
        self.connected(channel, rep, bound)
        self.echo_through(channel, b"probe connect.ipv%d\n" % version)
        return f"{reply_text(rep)}, echo ok"

    def connect_name(self) -> str:
        name = self.options.target_name
        port = self.target_address(4).port
        if name is None:
            if not (self.targets.ipv4 or "").startswith("127."):
                raise Skipped("give --target-name: a name of the IPv4 target host")
            name = "localhost"
        channel = self.session()
        rep, bound = self.request(channel, Command.CONNECT, Address.from_host(name, port))
        self.connected(channel, rep, bound)
        self.echo_through(channel, b"probe connect.name\n")
        return f"{reply_text(rep)} for {name}, echo ok"

    def connect_bound_address(self) -> str:
        echo = self.targets.echo.get(4) or self.targets.echo.get(6)
        _channel, bound = self.tunnel_to(echo)
        assert echo is not None
        want = (bound.host, bound.port)
        if echo.wait_for(
            lambda: any(_same_address(want, peer) for peer in echo.peers), self.options.timeout
        ):
            return f"bound {bound} = the source address the target saw"
        seen = format_host_port(*echo.peers[-1]) if echo.peers else "no connection"
        raise CheckFailed(f"bound {bound}, but the target saw {seen}")

    def _failure_reply(self, request: bytes, want: int, not_ok: str = "") -> str:
        channel = self.session()
        channel.send(request)
        rep, _bound = channel.read_reply()
        if rep != want:
            raise CheckFailed(reply_text(rep) + not_ok)
        # RFC 1928 §6: "the SOCKS server MUST terminate the TCP connection shortly after
        # sending the reply" when it reports a failure.
        channel.expect_close("after the failure reply")
        return f"{reply_text(rep)}, then closed"

    def reply_refused(self) -> str:
        if self.targets.closed is None:
            raise Skipped("no target host")
        address = Address.from_sockaddr(self.targets.closed.address)
        return self._failure_reply(encode_request(Command.CONNECT, address), 0x05)

    def reply_unresolvable(self) -> str:
        address = Address(AddressType.DOMAINNAME, UNRESOLVABLE_NAME, 80)
        request = encode_request(Command.CONNECT, address)
        return self._failure_reply(request, 0x04)

    def reply_command(self) -> str:
        address = self.targets.echo.get(4) or self.targets.echo.get(6)
        if address is None:
            raise Skipped("no target host")
        # RFC 1928 §4: VER CMD RSV ATYP...; CMD X'09' is no command.
        request = b"\x05\x09\x00" + encode_address(Address.from_sockaddr(address.address))
        return self._failure_reply(request, 0x07)

    def reply_address_type(self) -> str:
        # ATYP X'09' is no address type; four address bytes and a port follow, but a server
        # cannot know the length of an unknown type: it must answer after the ATYP.
        return self._failure_reply(b"\x05\x01\x00\x09\x7f\x00\x00\x01\x00\x50", 0x08)

    # ---- byte streams ----

    def split_bytes(self) -> str:
        address = self.target_address(4) if 4 in self.targets.echo else self.target_address(6)
        channel = self.session(split=True)
        rep, bound = self.request(channel, Command.CONNECT, address, split=True)
        self.connected(channel, rep, bound)
        self.echo_through(channel, b"probe stream.split-bytes\n")
        return f"{reply_text(rep)}, echo ok"

    def pipelined(self) -> str:
        address = self.target_address(4) if 4 in self.targets.echo else self.target_address(6)
        early = b"probe stream.pipelined: early data\n"
        greeting, login = self.session_messages()
        channel = self.connect()
        channel.send(greeting + login + encode_request(Command.CONNECT, address) + early)
        self.read_selection(channel)
        if login:
            self.read_login_status(channel)
        rep, bound = channel.read_reply()
        self.connected(channel, rep, bound)
        echoed = channel.read_exact(len(early), "echo of the early data")
        if echoed != early:
            raise CheckFailed(f"the early data came back changed: {echoed[:32]!r}")
        return f"{reply_text(rep)}, early data echoed"

    def client_half_close(self) -> str:
        channel, _bound = self.tunnel_to(self.targets.drain)
        channel.send(b"x" * 1000)
        channel.sock.shutdown(socket.SHUT_WR)
        answer = channel.read_to_eof("target's answer")
        if answer != b"got 1000 bytes\n":
            raise CheckFailed(
                f"{answer[:40]!r} after the client's EOF"
                if answer
                else "the tunnel ended at the client's EOF: the target's answer was lost"
            )
        return "the target's answer arrived after the client's EOF"

    def target_half_close(self) -> str:
        speak = self.targets.speak
        channel, _bound = self.tunnel_to(speak)
        first = channel.read_to_eof("target's EOF")
        if first != TARGET_FIRST:
            raise CheckFailed(f"{first[:40]!r} before the target's EOF")
        late = b"probe sent this after the target's EOF %d\n" % channel.sock.getsockname()[1]
        try:
            channel.send(late)
            channel.sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            raise CheckFailed(f"the tunnel ended at the target's EOF ({_os_error(exc)})") from None
        assert speak is not None  # tunnel_to skipped otherwise
        if speak.wait_for(lambda: late in speak.received, self.options.timeout):
            return "the client's bytes reached the target after the target's EOF"
        raise CheckFailed("the tunnel ended at the target's EOF: the client's bytes were lost")

    # ---- BIND (RFC 1928 §4, §6) ----

    def bind_first(self, state: dict[str, Any]) -> str:
        peer_host = self.targets.ipv4 or self.targets.ipv6
        if peer_host is None:
            raise Skipped("no target host")
        channel = self.session()
        # DST.ADDR: the address the peer will connect from; port 0: any port.
        rep, bound = self.request(channel, Command.BIND, Address.from_host(peer_host, 0))
        if rep == 0x07:
            raise NotSupported(reply_text(rep))
        if rep != 0x00:
            raise CheckFailed(reply_text(rep, bound))
        state.update(channel=channel, peer_host=peer_host, relay=(bound.host, bound.port))
        if bound.port == 0:
            del state["relay"]
            raise CheckFailed(f"{reply_text(rep, bound)}: port 0")
        if _unspecified(bound.host):
            state["relay"] = (self.options.proxy[0], bound.port)
            raise CheckFailed(f"{reply_text(rep, bound)}: no address a peer could connect to")
        return reply_text(rep, bound)

    def bind_second(self, state: dict[str, Any]) -> str:
        channel: Channel = state["channel"]
        peer = socket.socket(family_of(state["peer_host"]), socket.SOCK_STREAM)
        self.sockets.append(peer)
        peer.settimeout(self.options.timeout)
        peer.bind((state["peer_host"], 0))
        peer.connect(state["relay"])
        rep, bound = channel.read_reply("second reply")
        if rep != 0x00:
            raise CheckFailed(reply_text(rep, bound))
        source = peer.getsockname()[:2]
        if not _same_address((bound.host, bound.port), source):
            raise CheckFailed(
                f"{reply_text(rep, bound)}, but the peer is {format_host_port(*source)}"
            )
        peer.sendall(b"from the peer\n")
        if channel.read_exact(14, "peer's bytes") != b"from the peer\n":
            raise CheckFailed("the peer's bytes came through changed")
        channel.send(b"from the client\n")
        peer_channel = Channel(peer, self.options.timeout)
        if peer_channel.read_exact(16, "client's bytes") != b"from the client\n":
            raise CheckFailed("the client's bytes came through changed")
        return f"{reply_text(rep, bound)} = the peer; relayed both ways"

    # ---- UDP ASSOCIATE (RFC 1928 §7) ----

    def udp_associate(self, state: dict[str, Any]) -> str:
        channel = self.session()
        local_ip = channel.sock.getsockname()[0]
        udp = socket.socket(family_of(local_ip), socket.SOCK_DGRAM)
        self.sockets.append(udp)
        udp.bind((local_ip, 0))
        # DST.ADDR/DST.PORT: where the client will send its datagrams from.
        rep, bound = self.request(
            channel, Command.UDP_ASSOCIATE, Address.from_sockaddr(udp.getsockname())
        )
        if rep == 0x07:
            raise NotSupported(reply_text(rep))
        if rep != 0x00 or bound.port == 0:
            raise CheckFailed(reply_text(rep, bound))
        state.update(channel=channel, udp=udp, relay=(bound.host, bound.port))
        if _unspecified(bound.host):
            state["relay"] = (self.options.proxy[0], bound.port)
            raise CheckFailed(f"{reply_text(rep, bound)}: no address to send datagrams to")
        return reply_text(rep, bound)

    def udp_round_trip(self, state: dict[str, Any], version: int) -> str:
        echo = self.targets.udp.get(version)
        if echo is None:
            raise Skipped(f"no IPv{version} target host (see --target-host)")
        udp: socket.socket = state["udp"]
        target = Address.from_sockaddr(echo.address)
        deadline = time.monotonic() + self.options.timeout
        for number in range(3):
            payload = b"probe datagram %d over IPv%d" % (number, version)
            udp.sendto(encode_udp_datagram(target, payload), state["relay"])
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise CheckFailed(f"datagram {number}: no answer in time")
            udp.settimeout(remaining)
            try:
                data = udp.recv(65536)
            except TimeoutError:
                raise CheckFailed(f"datagram {number}: no answer in time") from None
            try:
                datagram = parse_udp_datagram(data)
            except ProtocolError as exc:
                raise CheckFailed(f"datagram {number}: {exc.message}") from None
            source = (datagram.address.host, datagram.address.port)
            if datagram.data != payload or not _same_address(source, echo.address):
                raise CheckFailed(
                    f"datagram {number}: {datagram.data[:32]!r} from {datagram.address}"
                )
        return f"3 datagrams to {target} and back, sender named"

    # ---- handshake timeout ----

    def silent_client(self, sock: socket.socket | None, error: str, started: float) -> str:
        """A client that connected first and never sent a byte: the server should cut it."""
        if sock is None:
            raise CheckFailed(error)
        wait = self.options.handshake_wait
        sock.settimeout(max(started + wait - time.monotonic(), 0.01))
        try:
            data = sock.recv(1)
        except TimeoutError:
            raise NotSupported(f"still open after {wait:g} s (see --handshake-wait)") from None
        except ConnectionResetError:
            data = b""
        elapsed = time.monotonic() - started
        if data:
            raise CheckFailed(f"sent {hexbytes(data)} to a client that said nothing")
        return f"closed after {elapsed:.1f} s"


# What each check expects, for the EXPECTED column, in the order the checks run.
EXPECTED: dict[str, str] = {
    "greeting.no-auth": "05 00, or 05 ff if a login is required",
    "greeting.methods": "05 and one of the offered 00 01 02 80",
    "greeting.no-acceptable": "05 ff for methods 7e fe",
    "login.success": "05 02, then 01 00",
    "connect.ipv4": "00, then the echo",
    "connect.ipv6": "00, then the echo",
    "connect.name": "00, then the echo",
    "connect.bnd-addr": "BND = the source address the target saw",
    "reply.connection-refused": "05 for a closed port, then a close",
    "reply.host-unreachable": f"04 for {UNRESOLVABLE_NAME}, then a close",
    "reply.command-not-supported": "07 for CMD 09, then a close",
    "reply.address-type-not-supported": "08 for ATYP 09, then a close",
    "stream.split-bytes": "handshake sent byte by byte works",
    "stream.pipelined": "handshake + early data in one write works",
    "halfclose.client-eof": "target's answer after the client's EOF",
    "halfclose.target-eof": "client's bytes after the target's EOF",
    "bind.first-reply": "00 with a reachable BND address and port",
    "bind.second-reply": "00 naming the peer, then relayed both ways",
    "udp.associate": "00 with a reachable BND address and port",
    "udp.round-trip-ipv4": "datagrams echoed, sender named",
    "udp.round-trip-ipv6": "datagrams echoed, sender named",
    "login.failure": "05 02, then 01 with a non-zero status, closed",
    "timeout.handshake": "a silent client is closed",
}
CHECK_NAMES = tuple(EXPECTED)


def _os_error(exc: OSError) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return exc.strerror or str(exc) or type(exc).__name__


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


def target_hosts_by_version(hosts: tuple[str, ...]) -> tuple[str | None, str | None]:
    """(IPv4, IPv6) target hosts: the given ones, or loopback by default."""
    if not hosts:
        return "127.0.0.1", ("::1" if ipv6_loopback() else None)
    ipv4 = ipv6 = None
    for host in hosts:
        version = ipaddress.ip_address(host.strip("[]")).version  # ValueError: usage error
        if version == 4:
            ipv4 = host
        else:
            ipv6 = host.strip("[]")
    return ipv4, ipv6


def probe(options: ProbeOptions) -> Report:
    """Start the targets, run every check against the proxy, stop the targets."""
    ipv4, ipv6 = target_hosts_by_version(options.target_hosts)
    report = Report(format_host_port(*options.proxy))
    with Targets(ipv4, ipv6, options.timeout) as targets:
        prober = Prober(options, targets)
        report.results = prober.run()
    if prober.login_required and options.user is None:
        report.note = (
            "the server requires a login: run again with --user NAME:PASSWORD to check the rest"
        )
    return report
