"""Configuration: TOML file → frozen dataclasses, embedded defaults, CLI overrides, validation.

Owns the shape of the config file and every default. A problem is reported as a
`ConfigError` naming the file, the key and what is wrong, so an operator can fix it
without reading code. Must not import sockets, the server core or anything SOCKS.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

MODES = ("threading", "forking")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
ACTIONS = ("allow", "deny")
PRIVATE_DESTINATIONS = ("auto", "allow", "deny")
PROXY_PROTOCOLS = ("off", "v1", "v2", "any")  # server.proxy_protocol
RULE_COMMANDS = ("connect", "bind", "udp")
PASSWORD_HASH_SCHEMES = ("scrypt$", "pbkdf2_sha256$")
# Parent proxies: SOCKS5 with our own lookups first, SOCKS5 resolving names itself
# (the "h" of curl's socks5h://), an HTTP proxy taking CONNECT (RFC 9110 §9.3.6).
UPSTREAM_SCHEMES = ("socks5", "socks5h", "http")

IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network


def _cpu_count() -> int:
    """CPUs this process may run on (its affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class ConfigError(Exception):
    """A bad config file, key or flag; the message names where and what."""


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 1080
    listen: tuple[tuple[str, int], ...] = ()  # when given, replaces host/port
    mode: str = "threading"
    backlog: int = 128
    outgoing_address: tuple[str, ...] = ()  # at most one IPv4 and one IPv6 source address
    # A non-loopback listener with no users and no client restriction is refused unless set.
    allow_open: bool = False
    run_as_user: str = ""  # "": keep the user we were started as
    run_as_group: str = ""  # "": the primary group of run_as_user
    workers: int = 1  # processes accepting on the same sockets; "auto" in the file = CPUs
    # Event-loop threads of threading mode ("auto" = CPUs); 0: a handler thread per
    # connection does everything. One by default: loops in one process share the GIL, and
    # a second one halved short-connection rate (bench/); --workers uses more cores.
    relay_threads: int = 1
    # SO_SNDBUF/SO_RCVBUF of tunnel sockets in bytes; 0: the kernel's autotuning; "auto":
    # a fixed size for loopback peers only (see socks5d.core.relay.socket_buffer_for).
    socket_buffer: int | str = "auto"
    # PROXY protocol (haproxy doc/proxy-protocol.txt) from a load balancer in front:
    # "off", or the header version every connection must begin with ("v1", "v2", "any").
    proxy_protocol: str = "off"
    # The balancers allowed to send that header; required when proxy_protocol is on.
    proxy_trusted: tuple[IPNetwork, ...] = ()

    @property
    def proxy_header_mode(self) -> str | None:
        """proxy_protocol as the handshake takes it: None when off."""
        return None if self.proxy_protocol == "off" else self.proxy_protocol

    # SOCKS4/4a clients on the same port. "auto": accepted while no [[users]] are
    # configured (SOCKS4 carries no password), refused once logins are required; True:
    # accepted even then, without a login; False: always refused.
    socks4: bool | str = "auto"

    @property
    def listen_addresses(self) -> tuple[tuple[str, int], ...]:
        """Every (host, port) to listen on: `listen`, or the host/port short form."""
        return self.listen or ((self.host, self.port),)

    def outgoing_for(self, version: int) -> str | None:
        """The configured source address of IP `version` (4 or 6), if any."""
        return next(
            (ip for ip in self.outgoing_address if ipaddress.ip_address(ip).version == version),
            None,
        )


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    # "auto": as many as the open-file limit can back (socks5d.policy.capacity); or a number.
    max_connections: int | str = "auto"
    # "auto": unlimited while every listener is loopback-only, else 256; 0 = unlimited.
    max_connections_per_ip: int | str = "auto"
    max_connections_per_user: int = 256  # 0 = unlimited
    # IPv6 clients are counted per network of this prefix length for per-address limits
    # and the login back-off (a host usually owns a whole /64); 128: per address.
    ipv6_client_prefix: int = 64


@dataclass(frozen=True, slots=True)
class TimeoutsConfig:
    handshake: float = 10.0
    connect: float = 10.0
    # A name lookup's bound (getaddrinfo has none of its own): then 04, or UDP drops.
    resolve: float = 10.0
    connect_attempt_delay: float = 0.25  # RFC 8305 §5: "Connection Attempt Delay"
    idle: float = 3600.0  # 0 disables
    bind: float = 60.0
    udp_idle: float = 120.0  # 0 disables
    shutdown_grace: float = 5.0  # SIGTERM: time tunnels get to finish; 0 cuts them at once


@dataclass(frozen=True, slots=True)
class UdpConfig:
    port_range: tuple[int, int] | None = None  # None: the OS picks


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    level: str = "info"
    format: str = "text"  # or "json"
    file: str = ""  # "": stderr only; else a file, reopened on SIGHUP


@dataclass(frozen=True, slots=True)
class AuthConfig:
    """Login throttling per client (and per user name): the delay doubles per failure up
    to a cap; a quiet window forgets the count. Password checks at once are bounded."""

    failure_delay: float = 0.5
    failure_delay_max: float = 10.0
    failure_window: float = 600.0
    # Password hash checks running at once in the whole daemon (each scrypt check holds
    # 16 MiB); "auto": one per CPU. The others wait their turn within the handshake timeout.
    max_parallel_checks: int | str = "auto"

    @property
    def parallel_checks(self) -> int:
        """max_parallel_checks as a number ("auto": the CPUs this process may use)."""
        limit = self.max_parallel_checks
        return _cpu_count() if limit == "auto" else int(limit)


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    # Where Prometheus scrapes /metrics: "HOST:PORT" (validated); "": no metrics.
    listen: str = ""

    @property
    def address(self) -> tuple[str, int] | None:
        """listen as (host, port); None when metrics are off."""
        return parse_listen_address(self.listen) if self.listen else None


@dataclass(frozen=True, slots=True)
class AccessConfig:
    default_action: str = "allow"  # when no [[rules]] entry matches
    # "auto": private destinations are denied when any listener is not loopback-only.
    private_destinations: str = "auto"
    # An [[upstreams]] name: allowed CONNECTs whose rule has no `via` go through it.
    default_via: str = ""


@dataclass(frozen=True, slots=True)
class Upstream:
    """One [[upstreams]] entry: a parent proxy CONNECTs can be chained through.

    The credentials are kept out of every repr (and so out of tracebacks and logs);
    `policy.rules.masked_url` is the form safe to print.
    """

    name: str
    scheme: str  # one of UPSTREAM_SCHEMES
    host: str
    port: int
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)

    @property
    def resolves_names(self) -> bool:
        """Whether the parent is handed names to resolve (socks5h, http), not addresses."""
        return self.scheme != "socks5"


@dataclass(frozen=True, slots=True)
class User:
    """A login: exactly one of `password` (plaintext) and `password_hash` (auth.py verifies)."""

    name: str
    password: str | None = field(default=None, repr=False)
    password_hash: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class RuleSpec:
    """One validated [[rules]] entry. An empty field means the rule has no such key (any)."""

    action: str  # "allow" | "deny"
    sources: tuple[IPNetwork, ...] = ()  # `from`: client networks
    destinations: tuple[IPNetwork, ...] = ()  # `to`: destination networks
    host_patterns: tuple[str, ...] = ()  # `to`: "example.com" or "*.example.com", lowercased
    ports: tuple[tuple[int, int], ...] = ()  # inclusive ranges
    users: frozenset[str] = frozenset()
    commands: frozenset[str] = frozenset()  # subset of RULE_COMMANDS
    index: int = 0  # position in the file: rules[index]
    # An [[upstreams]] name to CONNECT through; "": directly (even with access.default_via);
    # None: no `via` key, access.default_via applies.
    via: str | None = None

    @property
    def has_to(self) -> bool:
        """Whether the rule names its destinations (a `to` key)."""
        return bool(self.destinations or self.host_patterns)


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig = ServerConfig()
    limits: LimitsConfig = LimitsConfig()
    timeouts: TimeoutsConfig = TimeoutsConfig()
    logging: LoggingConfig = LoggingConfig()
    udp: UdpConfig = UdpConfig()
    auth: AuthConfig = AuthConfig()
    access: AccessConfig = AccessConfig()
    metrics: MetricsConfig = MetricsConfig()
    users: tuple[User, ...] = ()
    rules: tuple[RuleSpec, ...] = ()
    upstreams: tuple[Upstream, ...] = ()
    source: str = "<defaults>"


# ---- validators: each returns the cleaned value or raises ValueError(problem) ----


def _integer(low: int, high: int) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"must be an integer, got {_describe(value)}")
        if not low <= value <= high:
            raise ValueError(f"must be between {low} and {high}, got {value}")
        return value

    return check


def _integer_or_auto(low: int, high: int) -> Callable[[Any], int | str]:
    check = _integer(low, high)

    def check_or_auto(value: Any) -> int | str:
        if value == "auto":
            return "auto"
        try:
            return check(value)
        except ValueError as exc:
            raise ValueError(f'{exc} (or "auto")') from None

    return check_or_auto


def _seconds(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"must be a number of seconds, got {_describe(value)}")
    if not 0 <= value <= 7 * 24 * 3600:
        raise ValueError(f"must be between 0 and 604800 seconds, got {value}")
    return float(value)


def _positive_seconds(value: Any) -> float:
    seconds = _seconds(value)
    if seconds == 0:
        raise ValueError("must be greater than 0")
    return seconds


def _choice(choices: tuple[str, ...]) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if not isinstance(value, str) or value.lower() not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, got {_describe(value)}")
        return value.lower()

    return check


def _host(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"must be an IP address or host name, got {_describe(value)}")
    host = value.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not _is_hostname(host):
            raise ValueError(f"is not an IP address or host name: {value!r}") from None
    return host


def _is_hostname(name: str) -> bool:
    if len(name) > 253:
        return False
    labels = name.rstrip(".").split(".")
    allowed = set("abcdefghijklmnopqrstuvwxyz0123456789-")
    return all(
        0 < len(label) <= 63 and set(label.lower()) <= allowed and not label.startswith("-")
        for label in labels
    )


def _text(limit: int) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if not isinstance(value, str):
            raise ValueError(f"must be a string, got {_describe(value)}")
        if not 0 < len(value.encode()) <= limit:
            raise ValueError(f"must be 1 to {limit} bytes long (RFC 1929)")
        return value

    return check


def parse_listen_address(value: Any) -> tuple[str, int]:
    """ "HOST:PORT" or "[V6]:PORT" → (host, port), host validated like server.host."""
    if not isinstance(value, str):
        raise ValueError(f'must be a "HOST:PORT" string, got {_describe(value)}')
    host, sep, port_text = value.strip().rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f'must look like "127.0.0.1:1080" or "[::1]:1080", got {value!r}')
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        raise ValueError(f'IPv6 addresses need brackets, as in "[::1]:1080", got {value!r}')
    return _host(host), _integer(0, 65535)(int(port_text))


def _metrics_listen(value: Any) -> str:
    """ "HOST:PORT" to serve metrics on (checked like server.listen), or "" for none."""
    if value == "":
        return ""
    parse_listen_address(value)
    return str(value).strip()


def _listen(value: Any) -> tuple[tuple[str, int], ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise ValueError('must be a list like ["127.0.0.1:1080", "[::1]:1080"]')
    addresses = tuple(parse_listen_address(item) for item in items)
    if len(set(addresses)) != len(addresses):
        raise ValueError("lists the same address twice")
    return addresses


def _outgoing(value: Any) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise ValueError(f"must be an IP address or a list of them, got {_describe(value)}")
    versions: dict[int, str] = {}
    for item in items:
        try:
            address = ipaddress.ip_address(item)
        except (ValueError, TypeError):
            raise ValueError(f"is not an IP address: {item!r}") from None
        if address.version in versions:
            raise ValueError(f"gives two IPv{address.version} addresses; at most one of each")
        versions[address.version] = str(address)
    return tuple(versions.values())


def _port_range(value: Any) -> tuple[int, int] | None:
    if value == []:
        return None
    if not isinstance(value, list) or len(value) != 2:
        raise ValueError(f"must be [FIRST, LAST] (or [] for any), got {_describe(value)}")
    first, last = (_integer(1, 65535)(item) for item in value)
    if first > last:
        raise ValueError(f"first port {first} is above last port {last}")
    return (first, last)


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, got {_describe(value)}")
    return value


# POSIX portable user/group names (plus a numeric id); the daemon looks them up at start-up.
_ACCOUNT = re.compile(r"[A-Za-z0-9._][A-Za-z0-9._-]{0,255}\$?")


def _account(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f'must be a user or group name (or ""), got {_describe(value)}')
    if value and not _ACCOUNT.fullmatch(value):
        raise ValueError(f"is not a valid user or group name: {value!r}")
    return value


def _path_or_empty(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f'must be a file path (or "" for none), got {_describe(value)}')
    if "\0" in value:
        raise ValueError("must not contain a NUL character")
    return value


def _password_hash(value: Any) -> str:
    if not isinstance(value, str) or not value.startswith(PASSWORD_HASH_SCHEMES):
        # Never echo the value: it may be a plaintext password put in the wrong key.
        schemes = " or ".join(f'"{scheme}"' for scheme in PASSWORD_HASH_SCHEMES)
        raise ValueError(f"must be a password hash starting with {schemes}")
    if len(value) > 1024:
        raise ValueError("must be at most 1024 characters")
    return value


def _items(value: Any, example: str) -> list[Any]:
    """A rule key's list; a lone value is a list of one. Empty is an error: omit the key."""
    if isinstance(value, dict):
        raise ValueError(f"must be a list like {example}, got {_describe(value)}")
    items = value if isinstance(value, list) else [value]
    if not items:
        raise ValueError("must not be empty (leave the key out to match any)")
    return items


def _network(item: Any) -> IPNetwork:
    if not isinstance(item, str):
        raise ValueError(f"{item!r} is not an IP address or CIDR network")
    text = item.strip()
    if text.startswith("[") and "]" in text:  # "[2001:db8::]/32" or "[::1]"
        text = text[1:].replace("]", "", 1)
    try:
        network = ipaddress.ip_network(text)
    except ValueError:
        try:
            loose = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise ValueError(f"{item!r} is not an IP address or CIDR network") from None
        raise ValueError(f"{item!r} has host bits set (did you mean '{loose}'?)") from None
    return unmapped_network(network)


_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def unmapped_network(network: IPNetwork) -> IPNetwork:
    """An IPv4-mapped IPv6 network (``::ffff:10.0.0.0/104``) as the IPv4 network it means
    (``10.0.0.0/8``): addresses are unmapped before rules match them, so a mapped network
    left as it is would never match anything."""
    if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_MAPPED):
        first = network.network_address.ipv4_mapped
        assert first is not None
        return ipaddress.IPv4Network((int(first), network.prefixlen - 96))
    return network


def _networks(value: Any) -> tuple[IPNetwork, ...]:
    return tuple(_network(item) for item in _items(value, '["192.0.2.0/24", "2001:db8::/32"]'))


def _network_list(value: Any) -> tuple[IPNetwork, ...]:
    """A list of CIDR networks that may be empty (server.proxy_trusted)."""
    if not isinstance(value, list):
        raise ValueError(f'must be a list like ["10.0.0.5/32"], got {_describe(value)}')
    return tuple(_network(item) for item in value)


def _destinations(value: Any) -> tuple[tuple[IPNetwork, ...], tuple[str, ...]]:
    """`to`: CIDR networks (or bare addresses) and host-name patterns, kept apart."""
    networks: list[IPNetwork] = []
    patterns: list[str] = []
    for item in _items(value, '["*.example.com", "198.51.100.0/24"]'):
        problem = f"{item!r} is not a CIDR network, host name or pattern like '*.example.com'"
        if not isinstance(item, str):
            raise ValueError(problem)
        try:
            networks.append(_network(item))
            continue
        except ValueError as exc:
            if "host bits" in str(exc):
                raise
        pattern = item.strip().rstrip(".").lower()
        name = pattern[2:] if pattern.startswith("*.") else pattern
        if not name or "*" in name or not _is_hostname(name):
            raise ValueError(problem) from None
        patterns.append(pattern)
    return tuple(networks), tuple(patterns)


_PORT_RANGE = re.compile(r"\s*(\d{1,5})\s*(?:-\s*(\d{1,5})\s*)?")


def _ports(value: Any) -> tuple[tuple[int, int], ...]:
    ranges: list[tuple[int, int]] = []
    for item in _items(value, '[80, 443, "8000-8080"]'):
        if isinstance(item, int) and not isinstance(item, bool):
            if not 0 <= item <= 65535:
                raise ValueError(f"{item} is not a port (0-65535)")
            ranges.append((item, item))
            continue
        match = _PORT_RANGE.fullmatch(item) if isinstance(item, str) else None
        if match is None:
            raise ValueError(f'{item!r} is not a port range (like 443 or "8000-8080")')
        first = int(match[1])
        last = int(match[2] or first)
        if last > 65535:
            raise ValueError(f"{item!r} is not a port range ({last} is above 65535)")
        if first > last:
            raise ValueError(f"{item!r} is not a port range ({first} is above {last})")
        ranges.append((first, last))
    return tuple(ranges)


def _user_names(value: Any) -> frozenset[str]:
    names = _items(value, '["alice", "bob"]')
    check = _text(255)
    for name in names:
        try:
            check(name)
        except ValueError as exc:
            raise ValueError(f"{name!r}: {exc}") from None
    return frozenset(names)


def _commands(value: Any) -> frozenset[str]:
    commands = set()
    for item in _items(value, '["connect", "bind", "udp"]'):
        if not isinstance(item, str) or item.lower() not in RULE_COMMANDS:
            raise ValueError(f"{item!r} is not one of {', '.join(RULE_COMMANDS)}")
        commands.add(item.lower())
    return frozenset(commands)


def _relay_threads(value: Any) -> int:
    if value == "auto":
        return _cpu_count()
    if isinstance(value, str):
        if not value.isdigit():
            raise ValueError(f'must be a number of threads or "auto", got {value!r}')
        value = int(value)
    return _integer(0, 256)(value)


def _socket_buffer(value: Any) -> int | str:
    if value == "auto":
        return "auto"
    if isinstance(value, str):
        if not value.isdigit():
            raise ValueError(f'must be a number of bytes or "auto", got {value!r}')
        value = int(value)  # from the command line
    size: int = _integer(0, 64 * 1024 * 1024)(value)
    if 0 < size < 4096:
        raise ValueError(f"must be 0 (the kernel's autotuning) or at least 4096, got {size}")
    return size


def _socks4(value: Any) -> bool | str:
    if value == "auto" or isinstance(value, bool):
        return value
    raise ValueError(f'must be "auto", true or false, got {_describe(value)}')


def _workers(value: Any) -> int:
    if value == "auto":
        return os.cpu_count() or 1
    if isinstance(value, str):
        if not value.isdigit():
            raise ValueError(f'must be a number of processes or "auto", got {value!r}')
        value = int(value)  # from the command line
    return _integer(1, 256)(value)


def _parallel_checks(value: Any) -> int | str:
    if value == "auto":
        return "auto"
    if isinstance(value, str):
        raise ValueError(f'must be a number of checks or "auto", got {value!r}')
    limit: int = _integer(1, 1024)(value)
    return limit


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


# An upstream's name appears in log lines (via=NAME): plain characters only.
_UPSTREAM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def _upstream_name(value: Any) -> str:
    if not isinstance(value, str) or not _UPSTREAM_NAME.fullmatch(value):
        raise ValueError(
            f"must be 1 to 64 letters, digits, '.', '_' or '-' (starting with a letter or "
            f"digit), got {_describe(value)}"
        )
    return value


def _via(value: Any) -> str:
    """A rule's `via`: an upstream's name, or "" for "directly" (checked against
    [[upstreams]] once the whole file is read)."""
    return value if value == "" else _upstream_name(value)


def parse_upstream_url(value: Any) -> tuple[str, str, int, str | None, str | None]:
    """ "socks5h://user:pass@host:1080" → (scheme, host, port, user, password).

    The user and password are percent-decoded (RFC 3986 §2.1), so a password holding
    '@', ':' or '%' is written %40, %3A, %25. A problem never quotes the url: it may
    hold a password.
    """
    if not isinstance(value, str):
        raise ValueError(f'must be a url like "socks5h://host:1080", got {type(value).__name__}')
    if any(ord(char) < 0x21 or ord(char) == 0x7F for char in value):
        # urlsplit drops tabs and newlines silently (bpo-43882); refuse them instead.
        raise ValueError("must not contain spaces or control characters")
    try:
        parts = urllib.parse.urlsplit(value)
    except ValueError:
        # urlsplit's own message quotes the netloc, password and all (its NFKC check):
        # say what is wrong without it.
        raise ValueError(
            "is not a valid url (a bracketed IPv6 host left open, or characters that "
            "change under Unicode NFKC normalization: percent-encode them)"
        ) from None
    scheme = parts.scheme.lower()
    if scheme not in UPSTREAM_SCHEMES:
        raise ValueError(f"scheme must be one of {', '.join(UPSTREAM_SCHEMES)}, got {scheme!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError("must be scheme://[user:password@]host:port, with no path or query")
    if not parts.hostname:
        raise ValueError("has no host")
    host = _host(parts.hostname)
    try:
        port = parts.port
    except ValueError:
        port = -1
    if port is None or not 1 <= port <= 65535:
        raise ValueError("must end with a port from 1 to 65535, as in host:1080")
    user, password = parts.username, parts.password
    if user is None:
        return scheme, host, port, None, None
    if password is None:
        raise ValueError("gives a user without a password (user:password@host)")
    user, password = _percent_decoded(user, "user"), _percent_decoded(password, "password")
    if not 0 < len(user.encode()) <= 255 or not 0 < len(password.encode()) <= 255:
        raise ValueError("user and password must be 1 to 255 bytes each (RFC 1929)")
    if scheme == "http" and ":" in user:
        raise ValueError("an HTTP user name cannot contain ':' (RFC 7617 §2)")
    return scheme, host, port, user, password


def _percent_decoded(text: str, what: str) -> str:
    try:
        return urllib.parse.unquote(text, errors="strict")
    except UnicodeDecodeError:
        raise ValueError(f"the {what} is not UTF-8 once percent-decoded") from None


SERVER_KEYS: dict[str, Callable[[Any], Any]] = {
    "host": _host,
    "port": _integer(0, 65535),
    "listen": _listen,
    "mode": _choice(MODES),
    "backlog": _integer(1, 65535),
    "workers": _workers,
    "relay_threads": _relay_threads,
    "socket_buffer": _socket_buffer,
    "socks4": _socks4,
    "outgoing_address": _outgoing,
    "allow_open": _boolean,
    "run_as_user": _account,
    "run_as_group": _account,
    "proxy_protocol": _choice(PROXY_PROTOCOLS),
    "proxy_trusted": _network_list,
}
LIMITS_KEYS: dict[str, Callable[[Any], Any]] = {
    "max_connections": _integer_or_auto(1, 1_000_000),
    "max_connections_per_ip": _integer_or_auto(0, 1_000_000),
    "max_connections_per_user": _integer(0, 1_000_000),
    "ipv6_client_prefix": _integer(32, 128),
}
TIMEOUTS_KEYS: dict[str, Callable[[Any], Any]] = {
    "handshake": _positive_seconds,
    "connect": _positive_seconds,
    "resolve": _positive_seconds,
    "connect_attempt_delay": _positive_seconds,
    "idle": _seconds,
    "bind": _positive_seconds,
    "udp_idle": _seconds,
    "shutdown_grace": _seconds,
}
UDP_KEYS: dict[str, Callable[[Any], Any]] = {"port_range": _port_range}
LOGGING_KEYS: dict[str, Callable[[Any], Any]] = {
    "level": _choice(LOG_LEVELS),
    "format": _choice(LOG_FORMATS),
    "file": _path_or_empty,
}
AUTH_KEYS: dict[str, Callable[[Any], Any]] = {
    "failure_delay": _seconds,
    "failure_delay_max": _seconds,
    "failure_window": _positive_seconds,
    "max_parallel_checks": _parallel_checks,
}
ACCESS_KEYS: dict[str, Callable[[Any], Any]] = {
    "default_action": _choice(ACTIONS),
    "private_destinations": _choice(PRIVATE_DESTINATIONS),
    "default_via": _via,
}
METRICS_KEYS: dict[str, Callable[[Any], Any]] = {"listen": _metrics_listen}
USER_KEYS: dict[str, Callable[[Any], Any]] = {
    "name": _text(255),
    "password": _text(255),
    "password_hash": _password_hash,
}
RULE_KEYS: dict[str, Callable[[Any], Any]] = {
    "action": _choice(ACTIONS),
    "from": _networks,
    "to": _destinations,
    "ports": _ports,
    "users": _user_names,
    "commands": _commands,
    "via": _via,
}
UPSTREAM_KEYS: dict[str, Callable[[Any], Any]] = {
    "name": _upstream_name,
    "url": parse_upstream_url,
}

SECTIONS: dict[str, tuple[type, dict[str, Callable[[Any], Any]]]] = {
    "server": (ServerConfig, SERVER_KEYS),
    "limits": (LimitsConfig, LIMITS_KEYS),
    "timeouts": (TimeoutsConfig, TIMEOUTS_KEYS),
    "logging": (LoggingConfig, LOGGING_KEYS),
    "udp": (UdpConfig, UDP_KEYS),
    "auth": (AuthConfig, AUTH_KEYS),
    "access": (AccessConfig, ACCESS_KEYS),
    "metrics": (MetricsConfig, METRICS_KEYS),
}
# Arrays of tables, validated entry by entry.
ARRAYS = ("users", "rules", "upstreams")


def load_config(path: str | Path) -> Config:
    """Read and validate a TOML config file; defaults fill what it leaves out."""
    source = str(path)
    try:
        with open(path, "rb") as file:
            document = tomllib.load(file)
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    return parse_config(document, source)


def parse_config(document: Mapping[str, Any], source: str = "<config>") -> Config:
    """Validate a parsed TOML document into a Config (pure; raises ConfigError)."""
    sections: dict[str, Any] = {}
    for key, value in document.items():
        if key in ARRAYS:
            continue
        if key not in SECTIONS:
            raise ConfigError(f"{source}: unknown key {key!r} (expected one of: {_known()})")
        cls, validators = SECTIONS[key]
        sections[key] = _section(cls, validators, value, key, source)
        if key == "server" and value.get("listen") and {"host", "port"} & set(value):
            raise ConfigError(f"{source}: server.listen: give either listen or host/port, not both")
    users = _users(document.get("users", []), source)
    rules = _rules(document.get("rules", []), source)
    upstreams = _upstreams(document.get("upstreams", []), source)
    config = Config(**sections, users=users, rules=rules, upstreams=upstreams, source=source)
    problem = _cross_check(config)
    if problem:
        raise ConfigError(f"{source}: {problem}")
    return config


def _known() -> str:
    return ", ".join([*SECTIONS, *ARRAYS])


def _cross_check(config: Config) -> str | None:
    """A problem between keys that are each valid alone, as "section.key: problem"."""
    if config.server.run_as_group and not config.server.run_as_user:
        return "server.run_as_group: is set but server.run_as_user is not (give both)"
    if config.server.proxy_protocol != "off" and not config.server.proxy_trusted:
        return (
            f'server.proxy_trusted: required when server.proxy_protocol = "'
            f'{config.server.proxy_protocol}" (the load balancers allowed to send the header)'
        )
    if config.auth.failure_delay_max < config.auth.failure_delay:
        return (
            f"auth.failure_delay_max: {config.auth.failure_delay_max:g} is below "
            f"auth.failure_delay ({config.auth.failure_delay:g})"
        )
    return _route_problem(config)


def _route_problem(config: Config) -> str | None:
    """A `via` that names no [[upstreams]] entry, or one on a deny rule."""
    names = {upstream.name for upstream in config.upstreams}
    known = ", ".join(sorted(names)) or "none"
    for rule in config.rules:
        if rule.via is None:
            continue
        if rule.action != "allow":
            return f"rules[{rule.index}].via: only an allow rule can route via an upstream"
        if rule.via and rule.via not in names:
            return (
                f"rules[{rule.index}].via: no [[upstreams]] entry is named {rule.via!r} "
                f"(configured: {known})"
            )
    default = config.access.default_via
    if default and default not in names:
        return (
            f"access.default_via: no [[upstreams]] entry is named {default!r} (configured: {known})"
        )
    return None


def _section(
    cls: type, validators: dict[str, Callable[[Any], Any]], table: Any, name: str, source: str
) -> Any:
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: {name}: must be a table ([{name}]), got {_describe(table)}")
    values = {}
    for key, value in table.items():
        if key not in validators:
            expected = ", ".join(validators)
            raise ConfigError(f"{source}: unknown key '{name}.{key}' (expected one of: {expected})")
        try:
            values[key] = validators[key](value)
        except ValueError as exc:
            raise ConfigError(f"{source}: {name}.{key}: {exc}") from None
    return cls(**values)


def _array_of_tables(
    entries: Any, name: str, keys: dict[str, Callable[[Any], Any]], source: str, needs: str
) -> list[tuple[str, dict[str, Any]]]:
    """Validate a [[name]] array: (where, checked keys) for each table in it."""
    if not isinstance(entries, list):
        raise ConfigError(f"{source}: {name}: must be an array of tables ([[{name}]])")
    tables = []
    for index, entry in enumerate(entries):
        where = f"{name}[{index}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{source}: {where}: must be a table with {needs}")
        tables.append((where, _section(dict, keys, entry, where, source)))
    return tables


def _users(entries: Any, source: str) -> tuple[User, ...]:
    users: list[User] = []
    seen: set[str] = set()
    for where, section in _array_of_tables(
        entries, "users", USER_KEYS, source, "name and password"
    ):
        if "name" not in section:
            raise ConfigError(f"{source}: {where}.name: missing")
        if "password" not in section and "password_hash" not in section:
            raise ConfigError(
                f"{source}: {where}.password: missing (give password or password_hash)"
            )
        if "password" in section and "password_hash" in section:
            raise ConfigError(
                f"{source}: {where}.password_hash: give either password or password_hash, not both"
            )
        if section["name"] in seen:
            raise ConfigError(f"{source}: {where}.name: duplicate user {section['name']!r}")
        seen.add(section["name"])
        users.append(User(section["name"], section.get("password"), section.get("password_hash")))
    return tuple(users)


def _rules(entries: Any, source: str) -> tuple[RuleSpec, ...]:
    rules: list[RuleSpec] = []
    for index, (where, section) in enumerate(
        _array_of_tables(entries, "rules", RULE_KEYS, source, "at least an action")
    ):
        if "action" not in section:
            raise ConfigError(f'{source}: {where}.action: missing ("allow" or "deny")')
        destinations, host_patterns = section.get("to", ((), ()))
        rules.append(
            RuleSpec(
                action=section["action"],
                sources=section.get("from", ()),
                destinations=destinations,
                host_patterns=host_patterns,
                ports=section.get("ports", ()),
                users=section.get("users", frozenset()),
                commands=section.get("commands", frozenset()),
                index=index,
                via=section.get("via"),
            )
        )
    return tuple(rules)


def _upstreams(entries: Any, source: str) -> tuple[Upstream, ...]:
    upstreams: list[Upstream] = []
    seen: set[str] = set()
    for where, section in _array_of_tables(
        entries, "upstreams", UPSTREAM_KEYS, source, "a name and a url"
    ):
        for key in ("name", "url"):
            if key not in section:
                raise ConfigError(f"{source}: {where}.{key}: missing")
        name = section["name"]
        if name in seen:
            raise ConfigError(f"{source}: {where}.name: duplicate upstream {name!r}")
        seen.add(name)
        scheme, host, port, user, password = section["url"]
        upstreams.append(Upstream(name, scheme, host, port, user, password))
    return tuple(upstreams)


def parse_user_flag(text: str) -> User:
    """Turn a `--user NAME:PASSWORD` flag into a User (the password may contain colons)."""
    name, sep, password = text.partition(":")
    if not sep:
        raise ConfigError(f"--user {name!r}: expected NAME:PASSWORD")
    try:
        return User(_text(255)(name), _text(255)(password))
    except ValueError as exc:
        raise ConfigError(f"--user {name!r}: name and password {exc}") from None


def apply_overrides(config: Config, **overrides: Any) -> Config:
    """Return `config` with CLI values (None = not given) laid over the file's.

    Keys are `server.host`-style paths given as `server_host=...`, plus `users`,
    which replaces the file's users as a whole when given.
    """
    given = {key for key, value in overrides.items() if value is not None}
    if "server_listen" in given and given & {"server_host", "server_port"}:
        raise ConfigError("--listen: give either --listen or --host/--port, not both")
    result = config
    if given & {"server_host", "server_port"}:
        # The short form on the command line replaces a listen list from the file.
        result = dataclasses.replace(result, server=dataclasses.replace(result.server, listen=()))
    for key, value in overrides.items():
        if value is None:
            continue
        if key == "users":
            result = dataclasses.replace(result, users=tuple(value))
            continue
        section_name, _, name = key.partition("_")
        if section_name not in SECTIONS or name not in SECTIONS[section_name][1]:
            raise TypeError(f"apply_overrides: unknown key {key!r}")
        _cls, validators = SECTIONS[section_name]
        try:
            cleaned = validators[name](value)
        except ValueError as exc:
            raise ConfigError(f"{_flag(section_name, name)}: {exc}") from None
        section = dataclasses.replace(getattr(result, section_name), **{name: cleaned})
        result = dataclasses.replace(result, **{section_name: section})
    problem = _cross_check(result)
    if problem:
        raise ConfigError(f"{result.source}: {problem} (after command-line options)")
    return result


def _flag(section: str, name: str) -> str:
    """The command-line flag of an override key: --port, --allow-open, --log-format."""
    prefix = {"logging": "log-", "metrics": "metrics-"}.get(section, "")
    return f"--{prefix}{name.replace('_', '-')}"
