"""Access rules: who may reach which destination through the proxy.

Owns the evaluation of ``[[rules]]`` and ``[access]`` (from :mod:`config`) as pure functions:
:class:`Policy` answers one question per candidate destination address, and two helpers
report what a configuration exposes (:func:`exposure_problem`, :func:`describe_policy`).
Three checks, in this order:

1. the loop guard (always on): a destination that is one of our own listeners is denied, so
   a client cannot make the proxy connect to itself over and over;
2. the rules, first match wins, else ``access.default_action``;
3. private destinations (loopback, link-local such as the cloud metadata address, RFC 1918,
   CGNAT, ULA, unspecified, multicast and broadcast) and this host's own addresses are
   denied when protected, unless the deciding rule is an allow rule whose ``to`` names them
   explicitly (a network inside the private range, the own address itself, or the exact
   host name: ``0.0.0.0/0`` merely contains them and opens nothing).

Imports ``addresses``, ``config`` and ``protocol`` only, and does no I/O except
:func:`is_local_address` (one UDP ``bind()`` probe, not cached: an address added after start
counts at once), which the loop guard and the own-address check need.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from ..core.addresses import IPAddress, format_host_port, parse_ip, strip_brackets, unmapped
from ..ops.config import Config, RuleSpec, Upstream
from ..socks.protocol import Command, Reply

__all__ = [
    "COMMAND_NAMES",
    "Decision",
    "Policy",
    "describe_policy",
    "describe_rule",
    "exposure_problem",
    "is_local_address",
    "is_private",
    "masked_url",
]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

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
        "168.63.129.16/32",  # a cloud platform's host address (DHCP, DNS, health probes)
        "224.0.0.0/4",  # multicast
        "240.0.0.0/4",  # reserved, incl. broadcast 255.255.255.255
        "64:ff9b:1::/48",  # RFC 8215 local-use NAT64: reaches whatever the local NAT64 maps
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
    # Allowed through this parent proxy (the rule's `via`, else access.default_via);
    # None: directly.
    via: Upstream | None = None


def _allow(reason: str, via: Upstream | None = None) -> Decision:
    return Decision(True, reason, Reply.SUCCEEDED, via)


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
    # Parent proxies by name, and the one allowed requests without a rule `via` take.
    upstreams: tuple[Upstream, ...] = ()
    default_via: str = ""
    _exact: frozenset[tuple[IPAddress, int]] = field(init=False, repr=False, compare=False)
    _wildcard_ports: frozenset[int] = field(init=False, repr=False, compare=False)
    _ports: frozenset[int] = field(init=False, repr=False, compare=False)
    _by_name: dict[str, Upstream] = field(init=False, repr=False, compare=False)

    # Whether an address is this host's (I/O; replaceable in tests).
    own_address: Callable[[str], bool] = field(default=None, repr=False, compare=False)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.own_address is None:
            object.__setattr__(self, "own_address", is_local_address)
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
        object.__setattr__(self, "_by_name", {up.name: up for up in self.upstreams})

    @classmethod
    def from_config(cls, config: Config, listening: Iterable[tuple[str, int]]) -> Policy:
        """The policy of `config` for a server bound to `listening` ((host, port) pairs).

        Pass the bound addresses (``getsockname()``), not the configured ones: a configured
        port 0 or host name does not say which port or address a loop would hit.
        """
        bound = [(strip_brackets(item[0]), item[1]) for item in listening]
        mode = config.access.private_destinations
        if mode == "auto":
            protect = bool(exposed_listeners(bound, behind_balancer(config)))
        else:
            protect = mode == "deny"
        return cls(
            rules=config.rules,
            default_allow=config.access.default_action == "allow",
            protect_private=protect,
            own_listeners=frozenset(bound),
            upstreams=config.upstreams,
            default_via=config.access.default_via,
        )

    @property
    def routes(self) -> bool:
        """Whether any request may go through a parent proxy."""
        return bool(self.upstreams)

    def route(self, rule: RuleSpec | None) -> Upstream | None:
        """The parent an allow decision by `rule` (None: the default) goes through."""
        if not self._by_name:
            return None
        name = self.default_via if rule is None or rule.via is None else rule.via
        return self._by_name.get(name) if name else None

    def check(
        self,
        client_ip: str,
        user: str | None,
        command: str,
        host: str | None,
        ip: str | None,
        port: int | None,
        *,
        unresolved: bool = False,
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

        `unresolved`: `host` is final, we will never resolve it (a parent proxy would):
        a `to` network cannot match it, rather than "may match once resolved".
        """
        if command not in _COMMANDS:
            raise ValueError(f"unknown command {command!r} (expected connect, bind or udp)")
        client = parse_ip(client_ip)
        name = host.rstrip(".").lower() if host else None
        target = parse_ip(ip) if ip is not None else None
        if command == "bind" and target is not None and target.is_unspecified:
            # RFC 1928 §4: an all-zero BIND DST means "a peer from anywhere", not a host to
            # reach; only the rules judge it (a connect() to 0.0.0.0 is another matter).
            target_guarded = None
        else:
            target_guarded = target

        if (
            target_guarded is not None
            and port is not None
            and self._is_own_listener(target_guarded, port)
        ):
            return _deny("own listener")

        rule = self._first_match(client, user, command, name, target, port, unresolved)
        if rule is None:
            decision = (
                _allow("default allow", self.route(None) if self._by_name else None)
                if self.default_allow
                else _deny("default deny")
            )
        elif rule.action == "allow":
            decision = _allow(f"rules[{rule.index}]", self.route(rule) if self._by_name else None)
        else:
            return _deny(f"rules[{rule.index}]")

        if self.protect_private and target_guarded is not None:
            return self._guard_private(decision, rule, name, target_guarded)
        return decision

    def _guard_private(
        self, decision: Decision, rule: RuleSpec | None, name: str | None, target: IPAddress
    ) -> Decision:
        """Deny a private destination or an address of this host unless the allow rule
        that decided names it explicitly (see :func:`_names_explicitly`)."""
        if is_private(target):
            narrow, reason = _inside_private, "private destination"
        elif self.own_address(str(unmapped(target))):
            # Services bound to 0.0.0.0 answer on every address of the host, and host
            # firewalls guard the external interface, not traffic that stays on it.
            narrow, reason = _single_address, "own address"
        else:
            return decision
        if rule is None or not _names_explicitly(rule, name, target, narrow):
            return _deny(reason)
        return decision

    def _first_match(
        self,
        client: IPAddress,
        user: str | None,
        command: str,
        name: str | None,
        target: IPAddress | None,
        port: int | None,
        unresolved: bool = False,
    ) -> RuleSpec | None:
        for rule in self.rules:
            if not _applies_to(rule, client, user, command):
                continue
            # The destination keys may be undecidable (None) in a pre-check.
            to = _to_matches(rule, name, target) if rule.has_to else True
            if to is None and unresolved and name is not None:
                to = False  # a name nobody here resolves is in no `to` network
            ports = _port_matches(rule, port) if rule.ports else True
            if to is False or ports is False:
                continue
            if (to is None or ports is None) and rule.action == "deny":
                continue  # it may not apply: the destinations it misses go on to later rules
            if to is None and name is not None and target is None:
                # An allow rule that only a resolved address could match (its `to` has
                # networks): a later rule that denies this very name must still win before
                # DNS, or the name leaks to the resolver.
                later = self._name_denial_after(rule.index, client, user, command, name, port)
                return later or rule
            return rule
        return None

    def _name_denial_after(
        self,
        after: int,
        client: IPAddress,
        user: str | None,
        command: str,
        name: str,
        port: int | None,
    ) -> RuleSpec | None:
        """The first rule after `after` that denies `name` by a host pattern outright."""
        for rule in self.rules[after + 1 :]:
            if rule.action != "deny" or not rule.host_patterns:
                continue
            if not _applies_to(rule, client, user, command):
                continue
            if rule.ports and _port_matches(rule, port) is not True:
                continue
            if any(_host_matches(name, pattern) for pattern in rule.host_patterns):
                return rule
        return None

    def _is_own_listener(self, target: IPAddress, port: int) -> bool:
        """The loop guard: would connecting to (target, port) reach one of our listeners?"""
        if port not in self._ports:
            return False
        target = unmapped(target)
        if (target, port) in self._exact:
            return True
        if target.is_unspecified:
            # connect() to 0.0.0.0 / :: goes to this host, whichever address we listen on.
            return True
        if port in self._wildcard_ports:
            return target.is_loopback or is_local_address(str(target))
        return False


_COMMANDS = frozenset(COMMAND_NAMES.values())


def _applies_to(rule: RuleSpec, client: IPAddress, user: str | None, command: str) -> bool:
    """Whether the rule's `from`, `users` and `commands` keys hold for this request."""
    if rule.sources and not _in_any(client, rule.sources):
        return False
    if rule.users and (user is None or user not in rule.users):
        return False
    return not (rule.commands and command not in rule.commands)


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


def _names_explicitly(
    rule: RuleSpec, name: str | None, target: IPAddress, narrow: Callable[[IPNetwork], bool]
) -> bool:
    """Whether an allow rule names this protected destination on purpose: a `to` network
    holding the address that is `narrow` (inside the private range, or the one address),
    or the exact host name. Networks that merely contain it (0.0.0.0/0, ::/0, 8.0.0.0/6)
    do not count, nor does a wildcard ("*.example.com"): whoever controls a matching
    name's DNS could point it at 169.254.169.254."""
    forms = {target, unmapped(target)}
    if any(form in network and narrow(network) for network in rule.destinations for form in forms):
        return True
    return name is not None and any(
        not pattern.startswith("*.") and _host_matches(name, pattern)
        for pattern in rule.host_patterns
    )


def _inside_private(network: IPNetwork) -> bool:
    """A `to` network that lies wholly inside one private range (10.1.0.0/16, ::1/128)."""
    network = _nat64_embedded(network)
    return any(
        network.version == private.version and network.subnet_of(private)  # type: ignore[arg-type]
        for private in _PRIVATE_NETWORKS
    )


def _single_address(network: IPNetwork) -> bool:
    """A `to` network that is one address (192.0.2.2, 192.0.2.2/32, 2001:db8::2/128)."""
    return network.num_addresses == 1


def _nat64_embedded(network: IPNetwork) -> IPNetwork:
    """64:ff9b::a00:0/104 as the IPv4 network behind the NAT64 prefix (10.0.0.0/8)."""
    if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_NAT64):
        return ipaddress.IPv4Network(
            (int(network.network_address) & 0xFFFFFFFF, network.prefixlen - 96)
        )
    return network


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
    forms = {address, unmapped(address)}
    return any(form in network for network in networks for form in forms)


def is_private(address: IPAddress | str) -> bool:
    """Whether `address` is a private destination (see the module docstring), in any form."""
    if isinstance(address, str):
        address = parse_ip(address)
    address = unmapped(address)
    if isinstance(address, ipaddress.IPv6Address) and address in _NAT64:
        address = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return any(address in network for network in _PRIVATE_NETWORKS)


def is_local_address(ip: str) -> bool:
    """Whether this host owns `ip` right now: a UDP socket can bind to it (else
    EADDRNOTAVAIL). One socket()/bind()/close(), ~4 us, asked only on exposed listeners.

    Not cached, so an address added after start is protected at once. Where the kernel
    lets any address be bound (net.ipv4.ip_nonlocal_bind, net.ipv6.ip_nonlocal_bind), the
    route is asked instead: a local destination is reached from itself.
    """
    address = unmapped(parse_ip(ip))
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            if _nonlocal_bind(address.version):
                probe.connect((str(address), 9))  # UDP: a route lookup, nothing is sent
                return parse_ip(probe.getsockname()[0]) == address
            probe.bind((str(address), 0))
    except OSError:
        return False
    return True


@functools.lru_cache(maxsize=2)
def _nonlocal_bind(version: int) -> bool:
    """Whether the kernel lets sockets bind addresses the host does not have."""
    path = f"/proc/sys/net/ipv{version}/ip_nonlocal_bind"
    try:
        with open(path) as sysctl:
            return sysctl.read().strip() not in ("", "0")
    except OSError:
        return False


# ---- what a configuration exposes: the start-up check and `socks5d check-config` ----


def exposure_problem(config: Config, listening: Iterable[tuple[str, int]]) -> str | None:
    """A message when `config` would run an open proxy on `listening`, else None.

    Open: some listener is not loopback-only, there are no users (or server.socks4 = true
    lets SOCKS4 clients past them), clients are not restricted by rules, and
    server.allow_open is not set.
    """
    exposed = exposed_listeners(listening, behind_balancer(config))
    if not exposed or config.server.allow_open or clients_restricted(config):
        return None
    where = ", ".join(format_host_port(host, port) for host, port in exposed)
    if config.users and config.server.socks4 is True:
        # SOCKS4 has no password: with socks4 = true its clients skip the login.
        return (
            f"refusing to run an open proxy on {where}: server.socks4 = true serves SOCKS4 "
            f'clients without a login; set server.socks4 = "auto", or restrict clients with '
            f'[[rules]] (from = [...]) and access.default_action = "deny", '
            f"or set server.allow_open = true (--allow-open)"
        )
    if config.users:
        return None
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
    if rule.via is not None:
        parts.append(f"via {rule.via}" if rule.via else "directly")
    return " ".join(parts)


def describe_policy(config: Config, listening: Iterable[tuple[str, int]]) -> list[str]:
    """Human-readable lines saying what `config` lets whom do, for `socks5d check-config`."""
    bound = [(strip_brackets(item[0]), item[1]) for item in listening]
    policy = Policy.from_config(config, bound)
    lines = []
    for host, port in bound:
        scope = "loopback only" if _is_loopback_host(host) else "reachable from other hosts"
        if behind_balancer(config):
            scope += "; clients come through the PROXY protocol balancer"
        lines.append(f"listening on {format_host_port(host, port)} ({scope})")
    lines.append(_proxy_protocol_line(config))
    if config.users:
        names = ", ".join(user.name for user in config.users)
        lines.append(f"authentication: required (RFC 1929), {len(config.users)} user(s): {names}")
    else:
        lines.append("authentication: none (any client that can connect may use the proxy)")
    lines.append(_socks4_line(config))
    if config.rules:
        lines.extend(describe_rule(rule) for rule in config.rules)
    else:
        lines.append("rules: none")
    lines.append(f"default action: {config.access.default_action}")
    lines.extend(_route_lines(config))
    setting = f'access.private_destinations = "{config.access.private_destinations}"'
    if policy.protect_private:
        lines.append(
            "private destinations and this host's own addresses: denied unless an allow rule "
            "names them explicitly in `to` (a network inside a private range, the address "
            f"itself, or the exact host name) ({setting})"
        )
        lines.extend(_covering_notes(config))
    else:
        lines.append(f"private destinations: allowed ({setting})")
    lines.append(_exposure_line(config, bound))
    lines.extend(_warnings(config))
    return lines


def _socks4_line(config: Config) -> str:
    """What server.socks4 means with these users: SOCKS4 has no password."""
    setting = config.server.socks4
    shown = f'"{setting}"' if isinstance(setting, str) else str(setting).lower()
    if setting is False:
        verdict = "refused (reply 91)"
    elif not config.users:
        verdict = "accepted (no logins are configured)"
    elif setting is True:
        verdict = "accepted WITHOUT a login; rules that name users never match them"
    else:
        verdict = "refused (reply 91): logins are required and SOCKS4 has none"
    return f"SOCKS4/4a: {verdict} (server.socks4 = {shown})"


def _route_lines(config: Config) -> list[str]:
    """The parent proxies (password masked) and which rules CONNECT through each."""
    if not config.upstreams:
        return ["upstreams: none (every CONNECT goes directly to its target)"]
    default = config.access.default_via
    lines = []
    for upstream in config.upstreams:
        names = "the parent resolves names" if upstream.resolves_names else "we resolve names"
        routed = [
            f"rules[{rule.index}]"
            for rule in config.rules
            if rule.action == "allow" and _rule_route(rule, default) == upstream.name
        ]
        if default == upstream.name:
            routed.append("the default route")
        lines.append(
            f"upstream {upstream.name}: {masked_url(upstream)} ({names}); CONNECT via it: "
            f"{', '.join(routed) or 'nothing routes via it'}"
        )
    lines.append(
        f"default route: via {default}" if default else "default route: directly (no default_via)"
    )
    lines.append("BIND and UDP ASSOCIATE via a parent proxy: refused with reply 07")
    return lines


def masked_url(upstream: Upstream) -> str:
    """An upstream's url with the password masked, safe for check-config and logs."""
    login = ""
    if upstream.username is not None:
        login = f"{urllib.parse.quote(upstream.username, safe='')}:***@"
    return f"{upstream.scheme}://{login}{format_host_port(upstream.host, upstream.port)}"


def _rule_route(rule: RuleSpec, default_via: str) -> str:
    """The upstream name an allow rule sends its CONNECTs to ("": directly)."""
    return default_via if rule.via is None else rule.via


def _covering_notes(config: Config) -> list[str]:
    """Allow rules whose `to` networks hold private ranges without lying inside one: say
    that they do not open them (what a reader of `to = ["0.0.0.0/0"]` might expect)."""
    notes = []
    for rule in config.rules:
        covering = [
            network
            for network in rule.destinations
            if not _inside_private(network)
            and any(
                network.version == private.version and private.subnet_of(network)  # type: ignore[arg-type]
                for private in _PRIVATE_NETWORKS
            )
        ]
        if rule.action == "allow" and covering:
            listed = ", ".join(map(str, covering))
            notes.append(
                f"note: rules[{rule.index}] `to` {listed} covers private destinations but "
                "does not open them; name them explicitly"
            )
    return notes


def _proxy_protocol_line(config: Config) -> str:
    server = config.server
    if not behind_balancer(config):
        return (
            'PROXY protocol: off (server.proxy_protocol = "off"): clients connect directly; '
            "a connection that begins with a PROXY header is not SOCKS and is closed"
        )
    trusted = ", ".join(map(str, server.proxy_trusted))
    return (
        f'PROXY protocol: {server.proxy_protocol} (server.proxy_protocol = "'
        f'{server.proxy_protocol}"): every connection must begin with the header; only '
        f"from {trusted} (server.proxy_trusted), others are closed; rules, limits and the "
        "log see the client the header names, and every listener counts as reachable "
        "from other hosts (through the balancer)"
    )


def _exposure_line(config: Config, bound: list[tuple[str, int]]) -> str:
    exposed = exposed_listeners(bound, behind_balancer(config))
    if not exposed:
        return "exposure: loopback only; only this host can use the proxy"
    where = ", ".join(format_host_port(host, port) for host, port in exposed)
    problem = exposure_problem(config, bound)
    if problem:
        return f"exposure: OPEN PROXY, {problem}"
    if config.users and config.server.socks4 is not True:
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


def exposed_listeners(
    listening: Iterable[tuple[str, int]], behind_balancer: bool = False
) -> list[tuple[str, int]]:
    """The (host, port) pairs of `listening` that other hosts can reach (not loopback-only).

    `behind_balancer` (server.proxy_protocol on): clients come through a load balancer
    from wherever it accepts them, so a loopback listener is no limit: all count.
    """
    bound = [(strip_brackets(item[0]), item[1]) for item in listening]
    if behind_balancer:
        return bound
    return [(host, port) for host, port in bound if not _is_loopback_host(host)]


def behind_balancer(config: Config) -> bool:
    """Whether clients reach `config`'s listeners through a load balancer that names
    them in a PROXY protocol header (server.proxy_protocol on)."""
    return config.server.proxy_header_mode is not None


def _listener_addresses(host: str) -> list[IPAddress]:
    if host.lower() == "localhost":
        return [ipaddress.IPv4Address("127.0.0.1"), ipaddress.IPv6Address("::1")]
    try:
        return [unmapped(parse_ip(host))]
    except ValueError:
        return []  # a host name: the caller should pass bound addresses


def _is_loopback_host(host: str) -> bool:
    """A listener only this host can reach. Host names other than localhost count as not."""
    addresses = _listener_addresses(strip_brackets(host))
    return bool(addresses) and all(address.is_loopback for address in addresses)
