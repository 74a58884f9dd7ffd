"""What the "auto" connection limits become: how many connections this process can hold
with the descriptors it may open, and a per-address cap that fits where it listens.

Pure functions of numbers and addresses (the caller reads the resource limits, see
process_limits()). Imports addresses, config and rules (which listeners are loopback-only) only.
"""

from __future__ import annotations

import resource
from collections.abc import Iterable
from dataclasses import dataclass

from ..core.addresses import format_host_port
from ..ops.config import LimitsConfig
from .rules import exposed_listeners

# A spliced tunnel holds up to six descriptors: the client's socket, the target's and a
# pipe (two descriptors) per direction (socks5d.core.relay, the splice path). A handshake
# holds fewer: the client, a name lookup's socket, the Happy Eyeballs attempts.
DESCRIPTORS_PER_CONNECTION = 6
# Held whatever the load: stdio, the log file, the wake-up socketpair, the shared
# memory's and the odd file (/etc/hosts, /etc/resolv.conf, /proc) opened while serving.
FIXED_DESCRIPTORS = 32
# Each event loop: its epoll descriptor and its wake-up pipe.
DESCRIPTORS_PER_RELAY_THREAD = 3
# Forking mode: the parent closes each client socket right after fork(), so descriptors
# do not bound it; processes do. A child costs about 3 MiB of its own memory (measured:
# 2.5 MiB private dirty, 2.9 MiB PSS with an open tunnel), so 1024 children are ~3 GiB.
FORKING_AUTO = 1024
# Processes (or threads) of the same user that RLIMIT_NPROC must leave room for.
PROCESS_HEADROOM = 64
# Per client address when a listener is reachable from other hosts. A browser opens at
# most 32 connections per proxy (Chromium's and Firefox's per-proxy socket limit), and
# an office behind one NAT address shares the cap: 256 lets 8 browsers each use their
# full 32 at the same moment, and far more people browsing normally, while one address
# still cannot take every slot of max_connections.
EXPOSED_PER_ADDRESS = 256


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """The limits in force and where each number came from, for the log and check-config."""

    max_connections: int
    max_connections_per_ip: int | None  # None: unlimited
    total_source: str
    per_ip_source: str
    warning: str | None = None

    def describe(self) -> str:
        per_ip = self.max_connections_per_ip
        return (
            f"connection limits: max_connections = {self.max_connections} "
            f"({self.total_source}), max_connections_per_ip = "
            f"{'unlimited' if per_ip is None else per_ip} ({self.per_ip_source})"
        )


@dataclass(frozen=True, slots=True)
class ProcessLimits:
    """The resource limits that bound how many connections one process can serve."""

    open_files: int  # RLIMIT_NOFILE, soft
    processes: int | None  # RLIMIT_NPROC, soft (None: unlimited)


def process_limits(raised: bool = False) -> ProcessLimits:
    """This process's limits; `raised`: as they will be once the daemon has raised
    RLIMIT_NOFILE's soft limit to the hard one (what `check-config` should assume)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if raised and hard != resource.RLIM_INFINITY:
        soft = hard
    nproc = resource.getrlimit(resource.RLIMIT_NPROC)[0]
    return ProcessLimits(
        open_files=soft,
        processes=None if nproc == resource.RLIM_INFINITY else nproc,
    )


def descriptor_capacity(open_files: int, relay_threads: int, listeners: int) -> int:
    """Connections the descriptors can back (at least 1), after what the daemon keeps."""
    reserved = FIXED_DESCRIPTORS + DESCRIPTORS_PER_RELAY_THREAD * relay_threads + listeners
    return max(1, (open_files - reserved) // DESCRIPTORS_PER_CONNECTION)


def resolve_limits(
    limits: LimitsConfig,
    *,
    mode: str,
    relay_threads: int,
    listening: Iterable[tuple[str, int]],
    process: ProcessLimits,
    behind_balancer: bool = False,
) -> ConnectionLimits:
    """Turn limits.max_connections and max_connections_per_ip ("auto" or numbers) into
    the numbers to enforce on servers listening on `listening` (bound addresses);
    `behind_balancer`: clients come through a PROXY protocol balancer (every listener
    counts as reachable from other hosts)."""
    bound = list(listening)
    total, total_source, warning = _max_connections(
        limits.max_connections, mode, relay_threads, len(bound), process
    )
    per_ip, per_ip_source = _per_ip(limits.max_connections_per_ip, bound, behind_balancer)
    return ConnectionLimits(total, per_ip, total_source, per_ip_source, warning)


def _max_connections(
    setting: int | str, mode: str, relay_threads: int, listeners: int, process: ProcessLimits
) -> tuple[int, str, str | None]:
    """(the number, where it came from, a warning when the process cannot back it)."""
    if mode == "forking":
        return _forking_max_connections(setting, process)
    fitting = descriptor_capacity(process.open_files, relay_threads, listeners)
    source = (
        f"RLIMIT_NOFILE {process.open_files}, up to {DESCRIPTORS_PER_CONNECTION} "
        "descriptors per connection"
    )
    by_threads = relay_threads == 0 and process.processes is not None
    if by_threads:  # a thread per connection: threads count against RLIMIT_NPROC
        assert process.processes is not None
        fitting = min(fitting, max(1, process.processes - PROCESS_HEADROOM))
        source += f", a thread each under RLIMIT_NPROC {process.processes}"
    if setting == "auto":
        return fitting, f"auto: {source}", None
    number = int(setting)
    if number <= fitting:
        return number, "set", None
    return (
        number,
        "set",
        f"limits.max_connections = {number} is more than this process can hold "
        f"({source}: about {fitting}); past that, accept() fails with EMFILE and "
        'clients wait: raise the limit (LimitNOFILE= in the unit, ulimit -n) or use "auto"',
    )


def _forking_max_connections(
    setting: int | str, process: ProcessLimits
) -> tuple[int, str, str | None]:
    fitting = FORKING_AUTO
    source = "forking: a process of ~3 MiB per connection"
    if process.processes is not None:
        fitting = min(fitting, max(1, process.processes - PROCESS_HEADROOM))
        source += f", RLIMIT_NPROC {process.processes}"
    if setting == "auto":
        return fitting, f"auto: {source}", None
    number = int(setting)
    if process.processes is None or number <= process.processes - PROCESS_HEADROOM:
        return number, "set", None
    return (
        number,
        "set",
        f"limits.max_connections = {number} is more processes than RLIMIT_NPROC "
        f"({process.processes}) allows: past about {fitting}, fork() fails",
    )


def _per_ip(
    setting: int | str, bound: list[tuple[str, int]], behind_balancer: bool
) -> tuple[int | None, str]:
    if setting != "auto":
        number = int(setting)
        return (number or None), ("set" if number else "set: 0 is unlimited")
    exposed = exposed_listeners(bound, behind_balancer)
    if not exposed:
        # Every client is this host (127.0.0.1 or ::1): a cap per address would be a
        # cap on all local users together.
        return None, "auto: every listener is loopback-only"
    where = ", ".join(format_host_port(host, port) for host, port in exposed)
    how = "through a PROXY protocol balancer" if behind_balancer else "from other hosts"
    return EXPOSED_PER_ADDRESS, f"auto: {where} reachable {how}"
