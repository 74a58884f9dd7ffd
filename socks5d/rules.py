"""Access rules: who may reach which destination through the proxy.

Owns the evaluation of ``[[rules]]`` and ``[access]`` (from :mod:`config`) as pure functions:
:class:`Policy` answers one question per candidate destination address, and two helpers
report what a configuration exposes (:func:`exposure_problem`, :func:`describe_policy`).
Three checks, in this order:

1. the loop guard (always on): a destination that is one of our own listeners is denied, so
   a client cannot make the proxy connect to itself over and over;
2. the rules, first match wins, else ``access.default_action``;
3. private destinations (loopback, link-local such as the cloud metadata address, RFC 1918,
   CGNAT, ULA, unspecified, multicast and broadcast) are denied when protected, unless the
   deciding rule is an allow rule that names its destinations (``to``).

Imports ``config`` and ``protocol`` only, and does no I/O except :func:`is_local_address`
(one UDP ``bind()`` probe, cached), which the loop guard needs for wildcard listeners.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field

from .config import Config, RuleSpec
from .protocol import Command, Reply

__all__ = [
    "COMMAND_NAMES",
    "Decision",
    "Policy",
    "describe_policy",
    "describe_rule",
    "exposure_problem",
    "is_local_address",
    "is_private",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: The rule name of each RFC 1928 command, as `Policy.check` and `commands = [...]` spell it.
COMMAND_NAMES: dict[Command, str] = {
    Command.CONNECT: "connect",
    Command.BIND: "bind",
    Command.UDP_ASSOCIATE: "udp",
}

# Destinations a client should not reach through a proxy that others can use: they are this
# host or its private networks (SSRF). Explicit, not `ipaddress.is_private`, which also holds
# the documentation ranges (192.0.2.0/24, ...) and changes between Python versions.
_PRIVATE_NETWORKS = tuple(
    ipaddress.ip_network(network)
    for network in (
        "0.0.0.0/8",  # "this network"; connect() to 0.0.0.0 reaches this host
        "10.0.0.0/8",  # RFC 1918
        "100.64.0.0/10",  # RFC 6598 carrier-grade NAT
        "127.0.0.0/8",  # loopback
        "169.254.0.0/16",  # link-local, incl. cloud metadata 169.254.169.254
        "172.16.0.0/12",  # RFC 1918
        "192.168.0.0/16",  # RFC 1918
        "224.0.0.0/4",  # multicast
        "240.0.0.0/4",  # reserved, incl. broadcast 255.255.255.255
        "::/128",  # unspecified
        "::1/128",  # loopback
        "fe80::/10",  # link-local
        "fec0::/10",  # deprecated site-local
        "fc00::/7",  # unique local addresses
        "ff00::/8",  # multicast
    )
)
# RFC 6052 NAT64 well-known prefix: 64:ff9b::a00:1 is 10.0.0.1 behind a NAT64 gateway.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer for one destination."""

    allowed: bool
    # For the access log: "rules[2]", "default allow", "default deny", "private destination",
    # "own listener".
    reason: str
    # RFC 1928 §6 reply to send when denied: X'02' connection not allowed by ruleset.
    reply: int = Reply.SUCCEEDED


def _allow(reason: str) -> Decision:
    return Decision(True, reason, Reply.SUCCEEDED)


def _deny(reason: str) -> Decision:
    return Decision(False, reason, Reply.CONNECTION_NOT_ALLOWED)


@dataclass(frozen=True)
class Policy:
    """The access policy of a running server: rules, default action and guards.

    Build it with :meth:`from_config` once the listening sockets are bound (the loop guard
    needs their real addresses and ports), and again on reload.
    """

    rules: tuple[RuleSpec, ...] = ()
    default_allow: bool = True
    protect_private: bool = True
    # (ip, port) of our listening sockets; ip may be "0.0.0.0" / "::" for wildcard listeners.
    own_listeners: frozenset[tuple[str, int]] = frozenset()
    _exact: frozenset[tuple[IPAddress, int]] = field(init=False, repr=False, compare=False)
    _wildcard_ports: frozenset[int] = field(init=False, repr=False, compare=False)
    _ports: frozenset[int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        exact: set[tuple[IPAddress, int]] = set()
        wildcard: set[int] = set()
        for host, port in self.own_listeners:
            for address in _listener_addresses(host):
                if address.is_unspecified:
                    wildcard.add(port)
                else:
                    exact.add((address, port))
        object.__setattr__(self, "_exact", frozenset(exact))
        object.__setattr__(self, "_wildcard_ports", frozenset(wildcard))
        object.__setattr__(self, "_ports", frozenset(port for _, port in self.own_listeners))

    @classmethod
    def from_config(cls, config: Config, listening: Iterable[tuple[str, int]]) -> Policy:
        """The policy of `config` for a server bound to `listening` ((host, port) pairs).

        Pass the bound addresses (``getsockname()``), not the configured ones: a configured
        port 0 or host name does not say which port or address a loop would hit.
        """
        bound = [(_strip_host(item[0]), item[1]) for item in listening]
        mode = config.access.private_destinations
        if mode == "auto":
            protect = any(not _is_loopback_host(host) for host, _ in bound)
        else:
            protect = mode == "deny"
        return cls(
            rules=config.rules,
            default_allow=config.access.default_action == "allow",
            protect_private=protect,
            own_listeners=frozenset(bound),
        )

    def check(
        self,
        client_ip: str,
        user: str | None,
        command: str,
        host: str | None,
        ip: str | None,
        port: int | None,
    ) -> Decision:
        """Decide one candidate destination of one request.

        `command` is "connect", "bind" or "udp" (see :data:`COMMAND_NAMES`); `user` the login
        name, or None without authentication. `host` is the domain name the client asked
        for (None for an IP-address target); `ip` the address being considered: the literal
        target, or each resolved address of `host` in turn.

        A pre-check may leave parts of the destination unknown: `ip` None (deciding on the
        name before resolving it), `host` and `ip` both None (any destination, e.g. on a UDP
        ASSOCIATE request), `port` None (any port). A rule key that cannot be decided yet
        counts as a match for an allow rule and as no match for a deny rule, so a pre-check
        denies only what every such destination would be denied; the caller must then check
        each real destination (resolved address, datagram target) before using it. The loop
        guard and private destinations are checked only once `ip` (and `port`) are known.
        """
        if command not in _COMMANDS:
            raise ValueError(f"unknown command {command!r} (expected connect, bind or udp)")
        client = _address(client_ip)
        name = host.rstrip(".").lower() if host else None
        target = _address(ip) if ip is not None else None

        if target is not None and port is not None and self._is_own_listener(target, port):
            return _deny("own listener")

        rule = self._first_match(client, user, command, name, target, port)
        if rule is None:
            decision = _allow("default allow") if self.default_allow else _deny("default deny")
        elif rule.action == "allow":
            decision = _allow(f"rules[{rule.index}]")
        else:
            return _deny(f"rules[{rule.index}]")

        if (
            self.protect_private
            and target is not None
            and not (rule is not None and _names_explicitly(rule, name, target))
            and is_private(target)
        ):
            return _deny("private destination")
        return decision

    def _first_match(
        self,
        client: IPAddress,
        user: str | None,
        command: str,
        name: str | None,
        target: IPAddress | None,
        port: int | None,
    ) -> RuleSpec | None:
        for rule in self.rules:
            if rule.sources and not _in_any(client, rule.sources):
                continue
            if rule.users and (user is None or user not in rule.users):
                continue
            if rule.commands and command not in rule.commands:
                continue
            # The destination keys may be undecidable (None) in a pre-check.
            to = _to_matches(rule, name, target) if rule.has_to else True
            ports = _port_matches(rule, port) if rule.ports else True
            if to is False or ports is False:
                continue
            if (to is None or ports is None) and rule.action == "deny":
                continue  # it may not apply: the destinations it misses go on to later rules
            return rule
        return None

    def _is_own_listener(self, target: IPAddress, port: int) -> bool:
        """The loop guard: would connecting to (target, port) reach one of our listeners?"""
        if port not in self._ports:
            return False
        target = _unmapped(target)
        if (target, port) in self._exact:
            return True
        if target.is_unspecified:
            # connect() to 0.0.0.0 / :: goes to this host, whichever address we listen on.
            return True
        if port in self._wildcard_ports:
            return target.is_loopback or is_local_address(str(target))
        return False


_COMMANDS = frozenset(COMMAND_NAMES.values())


def _to_matches(rule: RuleSpec, name: str | None, target: IPAddress | None) -> bool | None:
    """Whether the rule's `to` matches; None when it cannot be told yet."""
    if name is not None and any(_host_matches(name, pattern) for pattern in rule.host_patterns):
        return True
    if target is not None:
        return _in_any(target, rule.destinations)
    if name is None:
        return None  # no destination at all yet: any of them
    # A name not yet resolved: one of its addresses may still fall in a `to` CIDR.
    return None if rule.destinations else False


def _names_explicitly(rule: RuleSpec, name: str | None, target: IPAddress) -> bool:
    """Whether an allow rule names this private destination on purpose: a `to` network
    holding the address, or the exact host name. A wildcard ("*.example.com") does not
    count: whoever controls a matching name's DNS could point it at 169.254.169.254."""
    if _in_any(target, rule.destinations):
        return True
    return name is not None and any(
        not pattern.startswith("*.") and _host_matches(name, pattern)
        for pattern in rule.host_patterns
    )


def _port_matches(rule: RuleSpec, port: int | None) -> bool | None:
    if port is None:
        return None
    return any(low <= port <= high for low, high in rule.ports)


def _host_matches(name: str, pattern: str) -> bool:
    """ "*.example.com" matches every sub-domain (not example.com); anything else is exact."""
    if pattern.startswith("*."):
        return name.endswith(pattern[1:])
    return name == pattern


def _in_any(
    address: IPAddress, networks: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]
) -> bool:
    # An IPv4-mapped IPv6 address (::ffff:10.0.0.1) is the IPv4 address on a dual-stack
    # socket: match it against IPv4 networks too, so a rule cannot be dodged by spelling.
    forms = {address, _unmapped(address)}
    return any(form in network for network in networks for form in forms)


@functools.lru_cache(maxsize=4096)
def _address(text: str) -> IPAddress:
    """Parse an IP address, without brackets or an IPv6 zone ("fe80::1%eth0").

    Cached: every request parses its client's address and each candidate target, and the
    same few addresses recur (ipaddress parsing is ~10 us; the results are immutable).
    """
    return ipaddress.ip_address(_strip_host(text).partition("%")[0])


def _unmapped(address: IPAddress) -> IPAddress:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def is_private(address: IPAddress | str) -> bool:
    """Whether `address` is a private destination (see the module docstring), in any form."""
    if isinstance(address, str):
        address = _address(address)
    address = _unmapped(address)
    if isinstance(address, ipaddress.IPv6Address) and address in _NAT64:
        address = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return any(address in network for network in _PRIVATE_NETWORKS)


@functools.lru_cache(maxsize=1024)
def is_local_address(ip: str) -> bool:
    """Whether this host owns `ip`: a UDP socket can bind to it (else EADDRNOTAVAIL).

    Cached: addresses rarely change, and the answer only widens the loop guard of a
    wildcard listener. (With net.ipv4.ip_nonlocal_bind = 1 every address looks local,
    which errs on the side of denying.)
    """
    address = _address(ip)
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.bind((str(address), 0))
    except OSError:
        return False
    return True


# ---- what a configuration exposes: the start-up check and `socks5d check-config` ----


def exposure_problem(config: Config, listening: Iterable[tuple[str, int]]) -> str | None:
    """A message when `config` would run an open proxy on `listening`, else None.

    Open: some listener is not loopback-only, there are no users, clients are not
    restricted by rules, and server.allow_open is not set.
    """
    exposed = exposed_listeners(listening)
    if not exposed or config.users or config.server.allow_open or clients_restricted(config):
        return None
    where = ", ".join(_format_address(host, port) for host, port in exposed)
    return (
        f"refusing to run an open proxy on {where}: add [[users]], or restrict clients with "
        f'[[rules]] (from = [...]) and access.default_action = "deny", '
        f"or set server.allow_open = true (--allow-open)"
    )


def clients_restricted(config: Config) -> bool:
    """Whether only listed client networks can use the proxy: default deny, and every allow
    rule has a `from` (a /0 network there restricts nothing)."""
    if config.access.default_action != "deny":
        return False
    return all(
        rule.sources and all(network.prefixlen > 0 for network in rule.sources)
        for rule in config.rules
        if rule.action == "allow"
    )


def describe_rule(rule: RuleSpec) -> str:
    """One line, in the words of the config file: "rules[0]: deny from 10.0.0.0/8 ports 25"."""
    parts = [f"rules[{rule.index}]: {rule.action}"]
    if rule.sources:
        parts.append("from " + ", ".join(map(str, rule.sources)))
    if rule.has_to:
        parts.append("to " + ", ".join([*rule.host_patterns, *map(str, rule.destinations)]))
    if rule.ports:
        parts.append("ports " + ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in rule.ports))
    if rule.users:
        parts.append("users " + ", ".join(sorted(rule.users)))
    if rule.commands:
        parts.append(
            "commands " + ", ".join(c for c in COMMAND_NAMES.values() if c in rule.commands)
        )
    if len(parts) == 1:
        parts.append("everything")
    return " ".join(parts)


def describe_policy(config: Config, listening: Iterable[tuple[str, int]]) -> list[str]:
    """Human-readable lines saying what `config` lets whom do, for `socks5d check-config`."""
    bound = [(_strip_host(item[0]), item[1]) for item in listening]
    policy = Policy.from_config(config, bound)
    lines = []
    for host, port in bound:
        scope = "loopback only" if _is_loopback_host(host) else "reachable from other hosts"
        lines.append(f"listening on {_format_address(host, port)} ({scope})")
    if config.users:
        names = ", ".join(user.name for user in config.users)
        lines.append(f"authentication: required (RFC 1929), {len(config.users)} user(s): {names}")
    else:
        lines.append("authentication: none (any client that can connect may use the proxy)")
    if config.rules:
        lines.extend(describe_rule(rule) for rule in config.rules)
    else:
        lines.append("rules: none")
    lines.append(f"default action: {config.access.default_action}")
    setting = f'access.private_destinations = "{config.access.private_destinations}"'
    if policy.protect_private:
        lines.append(
            f"private destinations: denied unless an allow rule names them in `to` ({setting})"
        )
    else:
        lines.append(f"private destinations: allowed ({setting})")
    lines.append(_exposure_line(config, bound))
    lines.extend(_warnings(config))
    return lines


def _exposure_line(config: Config, bound: list[tuple[str, int]]) -> str:
    exposed = exposed_listeners(bound)
    if not exposed:
        return "exposure: loopback only; only this host can use the proxy"
    where = ", ".join(_format_address(host, port) for host, port in exposed)
    problem = exposure_problem(config, bound)
    if problem:
        return f"exposure: OPEN PROXY, {problem}"
    if config.users:
        return f"exposure: {where} reachable from other hosts; clients must log in"
    if clients_restricted(config):
        return f"exposure: {where} reachable; only clients matched by `from` of allow rules"
    return (
        f"exposure: OPEN PROXY on {where} (server.allow_open = true): "
        "anyone who can reach it may use it"
    )


def _warnings(config: Config) -> list[str]:
    lines = []
    known = {user.name for user in config.users}
    for rule in config.rules:
        unknown = sorted(rule.users - known)
        if unknown:
            lines.append(
                f"warning: rules[{rule.index}] names user(s) not in [[users]]: {', '.join(unknown)}"
            )
    catch_all = next(
        (
            rule
            for rule in config.rules
            if not (rule.sources or rule.has_to or rule.ports or rule.users or rule.commands)
        ),
        None,
    )
    if catch_all is not None and catch_all.index < len(config.rules) - 1:
        lines.append(
            f"warning: rules[{catch_all.index}] matches everything; "
            f"the rules after it are never used"
        )
    return lines


def exposed_listeners(listening: Iterable[tuple[str, int]]) -> list[tuple[str, int]]:
    """The (host, port) pairs of `listening` that other hosts can reach (not loopback-only)."""
    bound = [(_strip_host(item[0]), item[1]) for item in listening]
    return [(host, port) for host, port in bound if not _is_loopback_host(host)]


def _listener_addresses(host: str) -> list[IPAddress]:
    if host.lower() == "localhost":
        return [ipaddress.IPv4Address("127.0.0.1"), ipaddress.IPv6Address("::1")]
    try:
        return [_unmapped(_address(host))]
    except ValueError:
        return []  # a host name: the caller should pass bound addresses


def _is_loopback_host(host: str) -> bool:
    """A listener only this host can reach. Host names other than localhost count as not."""
    addresses = _listener_addresses(_strip_host(host))
    return bool(addresses) and all(address.is_loopback for address in addresses)


def _strip_host(host: str) -> str:
    host = host.strip()
    if host.startswith("[") and host.endswith("]"):
        return host[1:-1]
    return host


def _format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
