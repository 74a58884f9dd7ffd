"""The `socks5d` command: a click adapter from options to Config to Daemon, nothing more.

Exit codes: 0 after a clean stop, 1 when the daemon cannot start (port in use,
permission), 2 for a bad flag or config file (click's usage-error convention).
"""

from __future__ import annotations

import errno
import socket
from typing import Any

import click

from . import __version__
from .config import LOG_LEVELS, MODES, Config, ConfigError, apply_overrides, load_config
from .config import parse_user_flag as parse_user
from .daemon import Daemon, configure_logging, format_address

EXAMPLES = """\b
Examples:
  socks5d --port 1081                      open proxy on 127.0.0.1:1081
  socks5d --config /etc/socks5d/config.toml
  socks5d --host :: --port 1080 --user alice:secret
  curl --socks5-hostname 127.0.0.1:1081 https://example.com/
"""


class ConfigProblem(click.ClickException):
    """A bad config file or flag: exit code 2, one line naming the key."""

    exit_code = 2


@click.group(
    invoke_without_command=True,
    subcommand_metavar="[COMMAND [ARGS]...]",
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog=EXAMPLES,
)
@click.option(
    "--host", help="Address or host name to listen on ('::' for dual-stack).  [default: 127.0.0.1]"
)
@click.option(
    "--port", type=int, help="TCP port to listen on (0 picks a free one).  [default: 1080]"
)
@click.option(
    "--listen",
    "listen",
    multiple=True,
    metavar="HOST:PORT",
    help="Listen on this address ([::1]:1080 for IPv6); repeatable. Instead of --host/--port.",
)
@click.option(
    "--outgoing-address",
    "outgoing",
    multiple=True,
    metavar="IP",
    help="Source address for outbound connections (one IPv4 and/or one IPv6); repeatable.",
)
@click.option(
    "--mode",
    type=click.Choice(MODES),
    help="One thread or one process per client.  [default: threading]",
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(exists=True, dir_okay=False, readable=True),
    help="TOML config file; flags given here override its keys.",
)
@click.option(
    "--user",
    "users",
    multiple=True,
    metavar="NAME:PASSWORD",
    help="Require RFC 1929 login; repeatable. Replaces the config file's users.",
)
@click.option(
    "--log-level", type=click.Choice(LOG_LEVELS, case_sensitive=False), help="[default: info]"
)
@click.version_option(__version__, prog_name="socks5d")
@click.pass_context
def main(
    context: click.Context,
    host: str | None,
    port: int | None,
    listen: tuple[str, ...],
    outgoing: tuple[str, ...],
    mode: str | None,
    config_path: str | None,
    users: tuple[str, ...],
    log_level: str | None,
) -> None:
    """A SOCKS5 proxy daemon (RFC 1928 CONNECT, BIND, UDP ASSOCIATE; RFC 1929 login).

    With no command it runs the proxy; the commands below are tools around it.
    """
    if context.invoked_subcommand is not None:
        return
    overrides: dict[str, Any] = {
        "server_host": host,
        "server_port": port,
        "server_listen": list(listen) or None,
        "server_outgoing_address": list(outgoing) or None,
        "server_mode": mode,
        "logging_level": log_level,
        "users": None,
    }
    try:
        if users:
            overrides["users"] = [parse_user(flag) for flag in users]
        config = load_config(config_path) if config_path else Config()
        config = apply_overrides(config, **overrides)
    except ConfigError as exc:
        raise ConfigProblem(str(exc)) from None
    configure_logging(config.logging.level)
    daemon = Daemon(config, config_path, overrides)
    try:
        daemon.bind()
    except OSError as exc:
        host, port = getattr(exc, "bind_address", config.server.listen_addresses[0])[:2]
        raise click.ClickException(_bind_error(exc, host, port)) from None
    raise SystemExit(daemon.run())


def _bind_error(exc: OSError, host: str, port: int) -> str:
    where = format_address(host, port)
    if exc.errno == errno.EADDRINUSE:
        return f"address already in use: {where}"
    if exc.errno == errno.EACCES:
        return f"permission denied binding {where} (ports below 1024 need privileges)"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"cannot listen on {where}: no such local address"
    if isinstance(exc, socket.gaierror):
        return f"cannot listen on {where}: {exc.strerror}"
    return f"cannot listen on {where}: {exc.strerror or exc}"
