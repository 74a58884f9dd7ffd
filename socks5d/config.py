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
    mode: str = "threading"
    backlog: int = 128


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    max_connections: int = 1024


@dataclass(frozen=True, slots=True)
class TimeoutsConfig:
    handshake: float = 10.0
    connect: float = 10.0
    idle: float = 3600.0  # 0 disables


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


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


SERVER_KEYS: dict[str, Callable[[Any], Any]] = {
    "host": _host,
    "port": _integer(0, 65535),
    "mode": _choice(MODES),
    "backlog": _integer(1, 65535),
}
LIMITS_KEYS: dict[str, Callable[[Any], Any]] = {"max_connections": _integer(1, 1_000_000)}
TIMEOUTS_KEYS: dict[str, Callable[[Any], Any]] = {
    "handshake": _positive_seconds,
    "connect": _positive_seconds,
    "idle": _seconds,
}
LOGGING_KEYS: dict[str, Callable[[Any], Any]] = {"level": _choice(LOG_LEVELS)}
USER_KEYS: dict[str, Callable[[Any], Any]] = {"name": _text(255), "password": _text(255)}

SECTIONS: dict[str, tuple[type, dict[str, Callable[[Any], Any]]]] = {
    "server": (ServerConfig, SERVER_KEYS),
    "limits": (LimitsConfig, LIMITS_KEYS),
    "timeouts": (TimeoutsConfig, TIMEOUTS_KEYS),
    "logging": (LoggingConfig, LOGGING_KEYS),
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
    result = config
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
