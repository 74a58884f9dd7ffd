"""The `socks5d` command: a click adapter from options to Config to Daemon, nothing more.

Exit codes: 0 after a clean stop, 1 when the daemon cannot start (port in use,
permission), 2 for a bad flag or config file (click's usage-error convention).
"""

from __future__ import annotations

import errno
import signal
import socket
import sys
from typing import Any

import click

from .. import __version__
from ..core.addresses import format_host_port
from ..policy.auth import Authenticator, hash_password
from ..policy.rules import describe_policy, exposure_problem
from .config import (
    LOG_LEVELS,
    MODES,
    Config,
    ConfigError,
    apply_overrides,
    load_config,
    parse_listen_address,
)
from .config import parse_user_flag as parse_user
from .daemon import (
    Daemon,
    apply_logging,
    connection_limits,
    raise_open_file_limit,
)
from .metrics import exposure_warning
from .probe import ProbeOptions, probe, target_hosts_by_version

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
    "--host",
    metavar="HOST",
    help="Address or host name to listen on ('::' for dual-stack).  [default: 127.0.0.1]",
)
@click.option(
    "--port",
    type=int,
    metavar="PORT",
    help="TCP port to listen on (0 picks a free one).  [default: 1080]",
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
    "--workers",
    metavar="N|auto",
    help="Processes accepting on the same sockets (auto: one per CPU).  [default: 1]",
)
@click.option(
    "--relay-threads",
    metavar="N|auto",
    help="Threading mode: event loops that accept, handshake and relay (0: a thread per"
    " connection does it all; auto: one per CPU).  [default: 1]",
)
@click.option(
    "--socket-buffer",
    metavar="BYTES|auto",
    help="SO_SNDBUF/SO_RCVBUF of tunnel sockets (0: kernel autotuning; auto: 256-512 KiB for"
    " loopback peers only).  [default: auto]",
)
@click.option(
    "--mode",
    type=click.Choice(MODES),
    help="threading: event loops and a thread pool; forking: a process per client."
    "  [default: threading]",
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
    "--allow-open",
    is_flag=True,
    default=None,
    help="Start even on a public address with no login and no client restriction.",
)
@click.option(
    "--run-as-user",
    metavar="USER",
    help="When started as root: switch to this user once the sockets are bound.",
)
@click.option("--run-as-group", metavar="GROUP", help="Group for --run-as-user (default: its own).")
@click.option(
    "--log-level", type=click.Choice(LOG_LEVELS, case_sensitive=False), help="[default: info]"
)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    help="Text lines, or one JSON object per line.  [default: text]",
)
@click.option(
    "--log-file",
    type=click.Path(dir_okay=False, writable=True),
    help="Write logs to this file instead of stderr (reopened on SIGHUP).",
)
@click.option(
    "--metrics-listen",
    metavar="HOST:PORT",
    help="Serve Prometheus metrics at http://HOST:PORT/metrics (needs socks5d[metrics]).",
)
@click.version_option(__version__, prog_name="socks5d")
@click.pass_context
def main(
    context: click.Context,
    host: str | None,
    port: int | None,
    listen: tuple[str, ...],
    outgoing: tuple[str, ...],
    workers: str | None,
    relay_threads: str | None,
    socket_buffer: str | None,
    mode: str | None,
    config_path: str | None,
    users: tuple[str, ...],
    allow_open: bool | None,
    run_as_user: str | None,
    run_as_group: str | None,
    log_level: str | None,
    log_format: str | None,
    log_file: str | None,
    metrics_listen: str | None,
) -> None:
    """A SOCKS5 proxy daemon (RFC 1928 CONNECT, BIND, UDP ASSOCIATE; RFC 1929 login).

    The same port serves SOCKS4/4a clients (server.socks4); CONNECTs may go through
    parent proxies ([[upstreams]]). With no command it runs the proxy; the commands below
    are tools around it.
    """
    if context.invoked_subcommand is not None:
        return
    overrides: dict[str, Any] = {
        "server_host": host,
        "server_port": port,
        "server_listen": list(listen) or None,
        "server_outgoing_address": list(outgoing) or None,
        "server_mode": mode,
        "server_workers": workers,
        "server_relay_threads": relay_threads,
        "server_socket_buffer": socket_buffer,
        "server_allow_open": allow_open,
        "server_run_as_user": run_as_user,
        "server_run_as_group": run_as_group,
        "logging_level": log_level,
        "logging_format": log_format,
        "logging_file": log_file,
        "metrics_listen": metrics_listen,
        "users": None,
    }
    try:
        if users:
            overrides["users"] = [parse_user(flag) for flag in users]
        config = load_config(config_path) if config_path else Config()
        config = apply_overrides(config, **overrides)
    except ConfigError as exc:
        raise ConfigProblem(str(exc)) from None
    try:
        apply_logging(config)
    except OSError as exc:
        raise ConfigProblem(
            f"logging.file: cannot open {config.logging.file}: {exc.strerror or exc}"
        ) from None
    raise_open_file_limit()
    daemon = Daemon(config, config_path, overrides)
    try:
        daemon.bind()
    except ConfigError as exc:  # an open proxy refused, a malformed password hash
        raise ConfigProblem(str(exc)) from None
    except OSError as exc:
        host, port = getattr(exc, "bind_address", config.server.listen_addresses[0])[:2]
        raise click.ClickException(_bind_error(exc, host, port)) from None
    except (ValueError, RuntimeError) as exc:  # run_as_user unknown, unusable systemd socket
        raise click.ClickException(str(exc)) from None
    code = daemon.run()
    _ignore_late_stop_signals()
    raise SystemExit(code)


def _ignore_late_stop_signals() -> None:
    """The daemon has stopped; the process only has to exit. While the interpreter shuts
    down, Python gives signals with a handler their default action back, so a SIGTERM
    arriving then (a second `kill`, an impatient supervisor) would turn exit 0 into death
    by signal. Ignored signals it leaves alone."""
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)


def _bind_error(exc: OSError, host: str, port: int) -> str:
    where = format_host_port(host, port)
    if exc.errno == errno.EADDRINUSE:
        return f"address already in use: {where}"
    if exc.errno == errno.EACCES:
        return f"permission denied binding {where} (ports below 1024 need privileges)"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"cannot listen on {where}: no such local address"
    if isinstance(exc, socket.gaierror):
        return f"cannot listen on {where}: {exc.strerror}"
    return f"cannot listen on {where}: {exc.strerror or exc}"


@main.command("hash-password")
@click.option(
    "--scheme",
    type=click.Choice(["scrypt", "pbkdf2_sha256"]),
    default="scrypt",
    show_default=True,
    help="Hash function.",
)
def hash_password_command(scheme: str) -> None:
    """Print a password hash for [[users]] password_hash.

    Asks twice without echo on a terminal; otherwise reads the password from the first
    line of standard input, so it never has to appear on a command line:

    \b
      socks5d hash-password
      printf '%s\\n' "$PASSWORD" | socks5d hash-password
    """
    if sys.stdin.isatty():
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise ConfigProblem("hash-password: the password is empty")
    if len(password.encode()) > 255:
        raise ConfigProblem("hash-password: RFC 1929 passwords are at most 255 bytes")
    click.echo(hash_password(password, scheme))


@main.command("check-config")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, readable=True))
def check_config_command(file: str) -> None:
    """Validate FILE and print the policy it gives: listeners, login, rules, exposure.

    Exits 0 when the daemon would start with it, 2 when it would refuse (a bad key, a
    malformed password hash, an open proxy on a public address).
    """
    try:
        config = load_config(file)
        Authenticator.from_users(config.users, config.source)  # checks password hashes
    except ConfigError as exc:
        raise ConfigProblem(str(exc)) from None
    listening = config.server.listen_addresses
    for line in describe_policy(config, listening):
        click.echo(line)
    # With this shell's resource limits (a systemd unit has its own LimitNOFILE=).
    caps = connection_limits(config, listening, raised_open_files=True)
    click.echo(caps.describe())
    if caps.warning:
        click.echo(f"warning: {caps.warning}")
    metrics = config.metrics.address
    if metrics is not None:
        click.echo(f"metrics: http://{format_host_port(*metrics)}/metrics")
        if (warning := exposure_warning(metrics)) is not None:
            click.echo(f"warning: {warning}")
    problem = exposure_problem(config, listening)
    if problem:
        raise ConfigProblem(f"{file}: {problem}")
    click.echo(f"{file}: OK")


@main.command("probe")
@click.argument("server", metavar="HOST:PORT")
@click.option(
    "--user",
    metavar="NAME:PASSWORD",
    help="Log in with RFC 1929 username/password, and check that a wrong password fails.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.option(
    "--target-host",
    "target_hosts",
    multiple=True,
    metavar="ADDR",
    help="Address of this host the proxy can reach, where the probe's targets listen (one"
    " IPv4 and/or one IPv6; repeatable).  [default: 127.0.0.1 and ::1]",
)
@click.option(
    "--target-name",
    metavar="NAME",
    help="A name of the IPv4 target host, for connect.name.  [default: localhost on loopback]",
)
@click.option(
    "--timeout",
    type=click.FloatRange(0.1, 300),
    default=5.0,
    show_default=True,
    metavar="SECONDS",
    help="Seconds each connection of a check may take.",
)
@click.option(
    "--handshake-wait",
    type=click.FloatRange(0.1, 3600),
    default=15.0,
    show_default=True,
    metavar="SECONDS",
    help="Seconds a silent client waits for the server to close it (timeout.handshake).",
)
def probe_command(
    server: str,
    user: str | None,
    as_json: bool,
    target_hosts: tuple[str, ...],
    target_name: str | None,
    timeout: float,
    handshake_wait: float,
) -> None:
    """Check the SOCKS5 server at HOST:PORT against RFC 1928 and RFC 1929.

    Runs greeting, login, CONNECT (IPv4, IPv6, a name), reply-code, split and pipelined
    input, half-close, BIND, UDP ASSOCIATE and handshake-timeout checks against any SOCKS5
    server, with targets it starts itself, and prints a table (or --json). Exits 0 when
    every check that applies passes, 1 when one fails, 2 for a usage error.

    \b
      socks5d probe 127.0.0.1:1080
      socks5d probe [::1]:1080 --user alice:secret --json
    """
    try:
        proxy = parse_listen_address(server)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="HOST:PORT") from None
    credentials = None
    if user is not None:
        name, sep, password = user.partition(":")
        if not sep or not 0 < len(name.encode()) <= 255 or len(password.encode()) > 255:
            raise click.BadParameter(
                "expected NAME:PASSWORD (each 1-255 bytes)", param_hint="--user"
            )
        credentials = (name.encode(), password.encode())
    try:
        target_hosts_by_version(target_hosts)
    except ValueError:
        raise click.BadParameter(
            f"not an IP address: {', '.join(target_hosts)}", param_hint="--target-host"
        ) from None
    options = ProbeOptions(proxy, credentials, target_hosts, target_name, timeout, handshake_wait)
    try:
        report = probe(options)
    except OSError as exc:  # a target could not listen on --target-host
        raise ConfigProblem(f"cannot start the probe's targets: {exc.strerror or exc}") from None
    click.echo(report.as_json() if as_json else report.as_table())
    raise SystemExit(0 if report.ok else 1)
