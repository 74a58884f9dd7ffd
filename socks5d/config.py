"""Configuration: TOML file → frozen dataclasses, embedded defaults, CLI overrides, validation.

Owns the shape of the config file and every default. A problem is reported as a
`ConfigError` naming the file, the key and what is wrong, so an operator can fix it
without reading code. Must not import sockets, the server core or anything SOCKS.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MODES = ("threading", "forking")
LOG_LEVELS = ("debug", "info", "warning", "error")


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
    max_connections: int = 1024


@dataclass(frozen=True, slots=True)
class TimeoutsConfig:
    handshake: float = 10.0
    connect: float = 10.0
    connect_attempt_delay: float = 0.25  # RFC 8305 §5: "Connection Attempt Delay"
    idle: float = 3600.0  # 0 disables
    bind: float = 60.0
    udp_idle: float = 120.0  # 0 disables


@dataclass(frozen=True, slots=True)
class UdpConfig:
    port_range: tuple[int, int] | None = None  # None: the OS picks


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    level: str = "info"


@dataclass(frozen=True, slots=True)
class User:
    name: str
    password: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig = ServerConfig()
    limits: LimitsConfig = LimitsConfig()
    timeouts: TimeoutsConfig = TimeoutsConfig()
    logging: LoggingConfig = LoggingConfig()
    udp: UdpConfig = UdpConfig()
    users: tuple[User, ...] = ()
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


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


SERVER_KEYS: dict[str, Callable[[Any], Any]] = {
    "host": _host,
    "port": _integer(0, 65535),
    "listen": _listen,
    "mode": _choice(MODES),
    "backlog": _integer(1, 65535),
    "outgoing_address": _outgoing,
}
LIMITS_KEYS: dict[str, Callable[[Any], Any]] = {"max_connections": _integer(1, 1_000_000)}
TIMEOUTS_KEYS: dict[str, Callable[[Any], Any]] = {
    "handshake": _positive_seconds,
    "connect": _positive_seconds,
    "connect_attempt_delay": _positive_seconds,
    "idle": _seconds,
    "bind": _positive_seconds,
    "udp_idle": _seconds,
}
UDP_KEYS: dict[str, Callable[[Any], Any]] = {"port_range": _port_range}
LOGGING_KEYS: dict[str, Callable[[Any], Any]] = {"level": _choice(LOG_LEVELS)}
USER_KEYS: dict[str, Callable[[Any], Any]] = {"name": _text(255), "password": _text(255)}

SECTIONS: dict[str, tuple[type, dict[str, Callable[[Any], Any]]]] = {
    "server": (ServerConfig, SERVER_KEYS),
    "limits": (LimitsConfig, LIMITS_KEYS),
    "timeouts": (TimeoutsConfig, TIMEOUTS_KEYS),
    "logging": (LoggingConfig, LOGGING_KEYS),
    "udp": (UdpConfig, UDP_KEYS),
}


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
        if key == "users":
            continue
        if key not in SECTIONS:
            raise ConfigError(f"{source}: unknown key {key!r} (expected one of: {_known()})")
        cls, validators = SECTIONS[key]
        sections[key] = _section(cls, validators, value, key, source)
        if key == "server" and value.get("listen") and {"host", "port"} & set(value):
            raise ConfigError(f"{source}: server.listen: give either listen or host/port, not both")
    users = _users(document.get("users", []), source)
    return Config(**sections, users=users, source=source)


def _known() -> str:
    return ", ".join([*SECTIONS, "users"])


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


def _users(entries: Any, source: str) -> tuple[User, ...]:
    if not isinstance(entries, list):
        raise ConfigError(f"{source}: users: must be an array of tables ([[users]])")
    users: list[User] = []
    seen: set[str] = set()
    for index, entry in enumerate(entries):
        where = f"users[{index}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{source}: {where}: must be a table with name and password")
        section = _section(dict, USER_KEYS, entry, where, source)
        for required in ("name", "password"):
            if required not in section:
                raise ConfigError(f"{source}: {where}.{required}: missing")
        if section["name"] in seen:
            raise ConfigError(f"{source}: {where}.name: duplicate user {section['name']!r}")
        seen.add(section["name"])
        users.append(User(section["name"], section["password"]))
    return tuple(users)


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
        _cls, validators = SECTIONS[section_name]
        try:
            cleaned = validators[name](value)
        except ValueError as exc:
            raise ConfigError(f"--{name.replace('_', '-')}: {exc}") from None
        section = dataclasses.replace(getattr(result, section_name), **{name: cleaned})
        result = dataclasses.replace(result, **{section_name: section})
    return result
