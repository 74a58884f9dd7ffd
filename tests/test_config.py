"""Config: defaults, the example file, overrides, and one clear error per bad key."""

from __future__ import annotations

import ipaddress
import re
import tomllib
from pathlib import Path

import pytest

from socks5d.ops.config import (
    Config,
    ConfigError,
    User,
    apply_overrides,
    load_config,
    parse_config,
    parse_user_flag,
)

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_defaults_listen_on_loopback_1080_threading_without_users():
    config = Config()
    assert (config.server.host, config.server.port, config.server.mode) == (
        "127.0.0.1",
        1080,
        "threading",
    )
    assert config.server.backlog == 128
    assert config.users == ()
    assert config.timeouts.handshake == 10.0


def test_example_file_loads_and_equals_the_embedded_defaults():
    config = load_config(ROOT / "config.example.toml")
    assert config.server == Config().server
    assert config.limits == Config().limits
    assert config.timeouts == Config().timeouts
    assert config.logging == Config().logging
    assert config.udp == Config().udp
    assert config.auth == Config().auth
    assert config.access == Config().access
    assert config.metrics == Config().metrics
    assert config.users == ()
    assert config.rules == ()
    assert config.upstreams == ()


def test_example_file_documents_every_key():
    text = (ROOT / "config.example.toml").read_text()
    for section, keys in {
        "server": Config().server,
        "limits": Config().limits,
        "timeouts": Config().timeouts,
        "logging": Config().logging,
        "udp": Config().udp,
        "auth": Config().auth,
        "access": Config().access,
        "metrics": Config().metrics,
    }.items():
        assert f"[{section}]" in text
        for key in type(keys).__slots__:
            assert f"\n{key} = " in text, f"{section}.{key} is not documented"
    assert "# [[users]]" in text and '# name = "alice"' in text
    assert "# password_hash = " in text
    assert "# [[rules]]" in text
    for key in ("action", "from", "to", "ports", "users", "commands", "via"):
        assert f"\n# {key} = " in text, f"rules.{key} is not documented"
    assert "# [[upstreams]]" in text and "\n# url = " in text


def test_example_files_commented_tables_are_valid_when_uncommented():
    text = (ROOT / "config.example.toml").read_text()
    # Uncomment only the TOML lines of the [[rules]] / [[users]] examples, not the prose.
    text = text.replace('"scrypt$..."', '"scrypt$placeholder"')
    lines = [
        line[2:] if re.match(r"# (\[\[\w+\]\]$|\w+ = )", line) else line
        for line in text.splitlines()
    ]
    config = parse_config(tomllib.loads("\n".join(lines)), "example")
    assert [rule.action for rule in config.rules] == ["allow", "deny", "allow"]
    assert [upstream.name for upstream in config.upstreams] == ["corp"]
    assert config.rules[2].via == "corp"
    assert config.users == (
        User("alice", password_hash="scrypt$placeholder"),
        User("bob", "change me"),
    )


def test_full_file_is_read(tmp_path):
    path = write(
        tmp_path,
        """
[server]
host = "::1"
port = 1081
mode = "forking"
backlog = 512
[limits]
max_connections = 10
[timeouts]
handshake = 2
connect = 3.5
idle = 0
[logging]
level = "DEBUG"
[[users]]
name = "alice"
password = "change me"
[[users]]
name = "bob"
password = "pa:ss"
""",
    )
    config = load_config(path)
    assert config.server.host == "::1" and config.server.port == 1081
    assert config.server.mode == "forking" and config.server.backlog == 512
    assert config.limits.max_connections == 10
    assert config.timeouts.handshake == 2.0 and config.timeouts.idle == 0.0
    assert config.logging.level == "debug"
    assert config.users == (User("alice", "change me"), User("bob", "pa:ss"))
    assert config.source == str(path)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[server]\nport = 70000\n", "server.port: must be between 0 and 65535, got 70000"),
        ("[server]\nport = -1\n", "server.port: must be between 0 and 65535, got -1"),
        ('[server]\nport = "1080"\n', "server.port: must be an integer, got str '1080'"),
        ("[server]\nport = true\n", "server.port: must be an integer, got bool True"),
        ("[server]\nprot = 1080\n", "unknown key 'server.prot'"),
        ("[sever]\nport = 1080\n", "unknown key 'sever'"),
        ('[server]\nmode = "async"\n', "server.mode: must be one of threading, forking"),
        ('[server]\nhost = "not a host!"\n', "server.host: is not an IP address or host name"),
        ("[timeouts]\nhandshake = 0\n", "timeouts.handshake: must be greater than 0"),
        ('[timeouts]\nidle = "1h"\n', "timeouts.idle: must be a number of seconds"),
        ("[limits]\nmax_connections = 0\n", "limits.max_connections: must be between 1"),
        ('[logging]\nlevel = "loud"\n', "logging.level: must be one of debug, info"),
        ('[[users]]\nname = "a"\n', "users[0].password: missing"),
        ('[[users]]\nname = "a"\npassword = ""\n', "users[0].password: must be 1 to 255 bytes"),
        ('[[users]]\nname = "a"\npassword = "x"\nrole = "admin"\n', "unknown key 'users[0].role'"),
        (
            '[[users]]\nname = "a"\npassword = "x"\n[[users]]\nname = "a"\npassword = "y"\n',
            "users[1].name: duplicate user 'a'",
        ),
        ('users = "alice"\n', "users: must be an array of tables"),
        ("server = 1\n", "server: must be a table"),
        ("[server\n", "not valid TOML"),
    ],
)
def test_bad_file_names_file_key_and_problem(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: ")
    assert expected in message
    assert "\n" not in message


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.toml")


def test_overrides_replace_only_given_keys():
    base = parse_config({"server": {"host": "::1", "port": 1081}, "users": []})
    result = apply_overrides(base, server_port=2000, server_host=None, logging_level="debug")
    assert result.server.host == "::1"
    assert result.server.port == 2000
    assert result.logging.level == "debug"
    assert base.server.port == 1081  # frozen: the original is untouched


def test_cli_users_replace_the_files_users():
    base = parse_config({"users": [{"name": "alice", "password": "a"}]})
    result = apply_overrides(base, users=[User("bob", "b")])
    assert result.users == (User("bob", "b"),)


def test_override_is_validated_and_names_the_flag():
    with pytest.raises(ConfigError, match=r"^--port: must be between 0 and 65535, got 99999$"):
        apply_overrides(Config(), server_port=99999)


def test_user_flag_splits_at_the_first_colon():
    assert parse_user_flag("alice:se:cret") == User("alice", "se:cret")
    with pytest.raises(ConfigError, match="expected NAME:PASSWORD"):
        parse_user_flag("alice")
    with pytest.raises(ConfigError, match="1 to 255 bytes"):
        parse_user_flag("alice:")


def test_password_is_not_in_repr():
    assert "secret" not in repr(User("alice", "secret"))
    assert "secret" not in repr(parse_config({"users": [{"name": "a", "password": "secret"}]}))


def test_listen_list_and_outgoing_addresses_are_read():
    config = parse_config(
        {
            "server": {
                "listen": ["127.0.0.1:1080", "[::1]:1081", "localhost:1082"],
                "outgoing_address": ["2001:db8::1", "192.0.2.1"],
            },
            "timeouts": {"bind": 5, "udp_idle": 0, "connect_attempt_delay": 0.1},
            "udp": {"port_range": [40000, 40099]},
        }
    )
    assert config.server.listen_addresses == (
        ("127.0.0.1", 1080),
        ("::1", 1081),
        ("localhost", 1082),
    )
    assert config.server.outgoing_for(4) == "192.0.2.1"
    assert config.server.outgoing_for(6) == "2001:db8::1"
    assert config.timeouts.bind == 5.0 and config.timeouts.udp_idle == 0.0
    assert config.udp.port_range == (40000, 40099)


def test_without_listen_the_short_form_is_the_one_address():
    assert Config().server.listen_addresses == (("127.0.0.1", 1080),)
    assert Config().server.outgoing_for(4) is None


@pytest.mark.parametrize(
    ("server", "expected"),
    [
        ({"listen": ["127.0.0.1"]}, 'server.listen: must look like "127.0.0.1:1080"'),
        ({"listen": ["::1:1080"]}, "server.listen: IPv6 addresses need brackets"),
        ({"listen": ["127.0.0.1:99999"]}, "server.listen: must be between 0 and 65535"),
        ({"listen": ["a:1", "a:1"]}, "server.listen: lists the same address twice"),
        ({"listen": [1080]}, 'server.listen: must be a "HOST:PORT" string, got int 1080'),
        ({"listen": ["127.0.0.1:1"], "port": 2}, "give either listen or host/port"),
        ({"outgoing_address": ["10.0.0.1", "10.0.0.2"]}, "two IPv4 addresses"),
        ({"outgoing_address": "eth0"}, "server.outgoing_address: is not an IP address: 'eth0'"),
    ],
)
def test_bad_listen_and_outgoing_values(server, expected):
    with pytest.raises(ConfigError, match=re.escape(expected)):
        parse_config({"server": server}, "c.toml")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ([2, 1], "first port 2 is above last port 1"),
        ([0, 10], "must be between 1 and 65535"),
        ([1], "must be [FIRST, LAST]"),
    ],
)
def test_bad_udp_port_range(value, expected):
    with pytest.raises(ConfigError, match=re.escape(f"udp.port_range: {expected}")):
        parse_config({"udp": {"port_range": value}}, "c.toml")


def test_cli_short_form_replaces_the_files_listen_list():
    base = parse_config({"server": {"listen": ["127.0.0.1:1", "[::1]:2"]}})
    assert apply_overrides(base, server_port=3).server.listen_addresses == (("127.0.0.1", 3),)
    result = apply_overrides(base, server_listen=["127.0.0.1:4"])
    assert result.server.listen_addresses == (("127.0.0.1", 4),)
    with pytest.raises(ConfigError, match="either --listen or --host/--port"):
        apply_overrides(base, server_listen=["127.0.0.1:4"], server_port=5)


# ---- keys added with access rules, privilege dropping, throttling and log options ----


def test_new_keys_default_to_the_documented_values():
    config = Config()
    assert (config.server.allow_open, config.server.run_as_user, config.server.run_as_group) == (
        False,
        "",
        "",
    )
    assert config.limits.max_connections == "auto"
    assert config.limits.max_connections_per_ip == "auto"
    assert config.limits.max_connections_per_user == 256
    assert config.timeouts.shutdown_grace == 5.0
    assert (config.auth.failure_delay, config.auth.failure_delay_max) == (0.5, 10.0)
    assert config.auth.failure_window == 600.0
    assert (config.logging.format, config.logging.file) == ("text", "")
    assert (config.access.default_action, config.access.private_destinations) == ("allow", "auto")
    assert config.rules == ()


def test_new_keys_are_read(tmp_path):
    path = write(
        tmp_path,
        """
[server]
host = "0.0.0.0"
allow_open = true
run_as_user = "socks5d"
run_as_group = "nogroup"
[limits]
max_connections_per_ip = 0
max_connections_per_user = 3
[timeouts]
shutdown_grace = 0
[auth]
failure_delay = 1
failure_delay_max = 30
failure_window = 60
[logging]
format = "JSON"
file = "/var/log/socks5d.log"
[access]
default_action = "deny"
private_destinations = "allow"
[[users]]
name = "alice"
password_hash = "scrypt$16384$8$1$c2FsdA$aGFzaA"
[[users]]
name = "bob"
password = "plain"
""",
    )
    config = load_config(path)
    assert config.server.allow_open is True
    assert (config.server.run_as_user, config.server.run_as_group) == ("socks5d", "nogroup")
    assert config.limits.max_connections_per_ip == 0
    assert config.limits.max_connections_per_user == 3
    assert config.timeouts.shutdown_grace == 0.0
    assert (config.auth.failure_delay, config.auth.failure_delay_max) == (1.0, 30.0)
    assert config.auth.failure_window == 60.0
    assert (config.logging.format, config.logging.file) == ("json", "/var/log/socks5d.log")
    assert (config.access.default_action, config.access.private_destinations) == ("deny", "allow")
    alice, bob = config.users
    assert alice == User("alice", password_hash="scrypt$16384$8$1$c2FsdA$aGFzaA")
    assert alice.password is None
    assert bob == User("bob", "plain") and bob.password_hash is None


def test_rules_are_validated_into_rule_specs():
    config = parse_config(
        {
            "rules": [
                {
                    "action": "DENY",
                    "from": ["192.0.2.0/24", "2001:db8::1", "[2001:db8:1::]/48"],
                    "to": ["*.Example.COM.", "example.org", "198.51.100.0/24", "2001:db8::/32"],
                    "ports": [80, 443, "8000-8080", " 9000 "],
                    "users": ["alice"],
                    "commands": ["connect", "UDP"],
                },
                {"action": "allow"},
                {"action": "allow", "from": "10.0.0.1", "ports": 22},
            ]
        }
    )
    first, second, third = config.rules
    net = ipaddress.ip_network
    assert first.action == "deny" and first.index == 0
    assert first.sources == (net("192.0.2.0/24"), net("2001:db8::1/128"), net("2001:db8:1::/48"))
    assert first.destinations == (net("198.51.100.0/24"), net("2001:db8::/32"))
    assert first.host_patterns == ("*.example.com", "example.org")
    assert first.ports == ((80, 80), (443, 443), (8000, 8080), (9000, 9000))
    assert first.users == frozenset({"alice"})
    assert first.commands == frozenset({"connect", "udp"})
    assert first.has_to
    # A key left out is empty: the rule does not look at it.
    assert second.index == 1 and not second.has_to
    assert (second.sources, second.ports, second.users, second.commands) == (
        (),
        (),
        frozenset(),
        frozenset(),
    )
    # A lone value is a list of one.
    assert third.sources == (net("10.0.0.1/32"),) and third.ports == ((22, 22),)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[server]\nallow_open = "yes"\n', "server.allow_open: must be true or false, got str"),
        ("[server]\nallow_open = 1\n", "server.allow_open: must be true or false, got int 1"),
        ("[server]\nrun_as_user = 0\n", "server.run_as_user: must be a user or group name"),
        ('[server]\nrun_as_user = "a b"\n', "server.run_as_user: is not a valid user or group"),
        ('[server]\nrun_as_group = "-x"\n', "server.run_as_group: is not a valid user or group"),
        (
            '[server]\nrun_as_group = "nogroup"\n',
            "server.run_as_group: is set but server.run_as_user is not",
        ),
        ("[limits]\nmax_connections_per_ip = -1\n", "limits.max_connections_per_ip: must be betw"),
        ('[limits]\nmax_connections_per_user = "9"\n', "limits.max_connections_per_user: must be"),
        ("[timeouts]\nshutdown_grace = -1\n", "timeouts.shutdown_grace: must be between 0"),
        ('[timeouts]\nshutdown_grace = "5s"\n', "timeouts.shutdown_grace: must be a number"),
        ("[auth]\nfailure_delay = -0.5\n", "auth.failure_delay: must be between 0"),
        ("[auth]\nfailure_delay_max = true\n", "auth.failure_delay_max: must be a number"),
        ("[auth]\nfailure_window = 0\n", "auth.failure_window: must be greater than 0"),
        (
            "[auth]\nfailure_delay = 20\n",
            "auth.failure_delay_max: 10 is below auth.failure_delay (20)",
        ),
        ("[auth]\nfailure_dealy = 1\n", "unknown key 'auth.failure_dealy'"),
        ('[logging]\nformat = "xml"\n', "logging.format: must be one of text, json"),
        ("[logging]\nfile = 1\n", "logging.file: must be a file path"),
        ('[logging]\nfile = "a\\u0000b"\n', "logging.file: must not contain a NUL"),
        ('[access]\ndefault_action = "block"\n', "access.default_action: must be one of allow"),
        ("[access]\nprivate_destinations = true\n", "access.private_destinations: must be one of"),
        ('[access]\ndefault = "deny"\n', "unknown key 'access.default'"),
        ('[[users]]\nname = "a"\npassword_hash = "hunter2"\n', "users[0].password_hash: must be"),
        ('[[users]]\nname = "a"\npassword_hash = ""\n', "users[0].password_hash: must be"),
        ('[[users]]\npassword = "x"\n', "users[0].name: missing"),
        (
            '[[users]]\nname = "a"\npassword = "x"\npassword_hash = "scrypt$y"\n',
            "users[0].password_hash: give either password or password_hash, not both",
        ),
        ('rules = "deny"\n', "rules: must be an array of tables"),
        ("rules = [1]\n", "rules[0]: must be a table"),
        ('[[rules]]\nfrom = ["10.0.0.0/8"]\n', "rules[0].action: missing"),
        ('[[rules]]\naction = "reject"\n', "rules[0].action: must be one of allow, deny"),
        ('[[rules]]\naction = "deny"\nform = ["10.0.0.0/8"]\n', "unknown key 'rules[0].form'"),
        ('[[rules]]\naction = "deny"\nfrom = []\n', "rules[0].from: must not be empty"),
        ('[[rules]]\naction = "deny"\nfrom = ["foo"]\n', "rules[0].from: 'foo' is not an IP"),
        ('[[rules]]\naction = "deny"\nfrom = [10]\n', "rules[0].from: 10 is not an IP address"),
        (
            '[[rules]]\naction = "deny"\nfrom = ["10.1.2.3/8"]\n',
            "rules[0].from: '10.1.2.3/8' has host bits set (did you mean '10.0.0.0/8'?)",
        ),
        ('[[rules]]\naction = "deny"\nto = []\n', "rules[0].to: must not be empty"),
        ('[[rules]]\naction = "deny"\nto = ["*"]\n', "rules[0].to: '*' is not a CIDR network"),
        ('[[rules]]\naction = "deny"\nto = ["a.*.com"]\n', "rules[0].to: 'a.*.com' is not a"),
        ('[[rules]]\naction = "deny"\nto = ["bad name"]\n', "rules[0].to: 'bad name' is not a"),
        ('[[rules]]\naction = "deny"\nto = ["10.0.0.0/33"]\n', "rules[0].to: '10.0.0.0/33'"),
        ('[[rules]]\naction = "deny"\nto = [{a = 1}]\n', "rules[0].to: {'a': 1} is not a CIDR"),
        ('[[rules]]\naction = "deny"\nto = {a = 1}\n', "rules[0].to: must be a list like"),
        (
            '[[rules]]\naction = "deny"\nto = ["10.0.0.1/8"]\n',
            "rules[0].to: '10.0.0.1/8' has host bits set",
        ),
        ('[[rules]]\naction = "deny"\nports = []\n', "rules[0].ports: must not be empty"),
        (
            '[[rules]]\naction = "deny"\n[[rules]]\naction = "deny"\nports = ["80-70"]\n',
            "rules[1].ports: '80-70' is not a port range",
        ),
        ('[[rules]]\naction = "deny"\nports = ["http"]\n', "rules[0].ports: 'http' is not a port"),
        ('[[rules]]\naction = "deny"\nports = [70000]\n', "rules[0].ports: 70000 is not a port"),
        ('[[rules]]\naction = "deny"\nports = ["1-70000"]\n', "'1-70000' is not a port range"),
        ('[[rules]]\naction = "deny"\nports = [true]\n', "rules[0].ports: True is not a port"),
        ('[[rules]]\naction = "deny"\nports = [1.5]\n', "rules[0].ports: 1.5 is not a port"),
        ('[[rules]]\naction = "deny"\nusers = []\n', "rules[0].users: must not be empty"),
        ('[[rules]]\naction = "deny"\nusers = [""]\n', "rules[0].users: '': must be 1 to 255"),
        ('[[rules]]\naction = "deny"\nusers = [7]\n', "rules[0].users: 7: must be a string"),
        ('[[rules]]\naction = "deny"\ncommands = []\n', "rules[0].commands: must not be empty"),
        (
            '[[rules]]\naction = "deny"\ncommands = ["get"]\n',
            "rules[0].commands: 'get' is not one of connect, bind, udp",
        ),
    ],
)
def test_bad_new_key_names_file_key_and_problem(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: ")
    assert expected in message
    assert "\n" not in message


def test_a_wrong_password_hash_is_not_echoed():
    with pytest.raises(ConfigError) as caught:
        parse_config({"users": [{"name": "a", "password_hash": "my secret"}]}, "c.toml")
    assert "my secret" not in str(caught.value)


def test_user_positional_form_and_repr_hide_passwords_and_hashes():
    assert User("alice", "secret") == User(name="alice", password="secret")
    assert User("alice", "secret").password_hash is None
    hashed = User("alice", password_hash="scrypt$abc")
    assert "scrypt$abc" not in repr(hashed) and "alice" in repr(hashed)
    config = parse_config({"users": [{"name": "a", "password_hash": "scrypt$abc"}]})
    assert "scrypt$abc" not in repr(config)


def test_new_override_keys_are_applied():
    result = apply_overrides(
        Config(),
        logging_format="json",
        logging_file="/tmp/socks5d.log",
        server_run_as_user="nobody",
        server_run_as_group="nogroup",
        server_allow_open=True,
    )
    assert (result.logging.format, result.logging.file) == ("json", "/tmp/socks5d.log")
    assert (result.server.run_as_user, result.server.run_as_group) == ("nobody", "nogroup")
    assert result.server.allow_open is True
    assert apply_overrides(result, server_allow_open=False).server.allow_open is False
    unchanged = apply_overrides(Config(), server_allow_open=None, logging_file=None)
    assert unchanged == Config()


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"server_allow_open": "yes"}, "--allow-open: must be true or false, got str 'yes'"),
        ({"server_run_as_user": "a b"}, "--run-as-user: is not a valid user or group name"),
        ({"server_run_as_group": "a:b"}, "--run-as-group: is not a valid user or group name"),
        ({"logging_format": "xml"}, "--log-format: must be one of text, json"),
        ({"logging_file": 3}, "--log-file: must be a file path"),
        ({"logging_level": "loud"}, "--log-level: must be one of debug"),
        ({"server_run_as_group": "nogroup"}, "server.run_as_group: is set but server.run_as_user"),
    ],
)
def test_bad_new_override_names_the_flag(overrides, expected):
    with pytest.raises(ConfigError, match=re.escape(expected)):
        apply_overrides(Config(), **overrides)


def test_run_as_group_from_the_file_is_fine_with_the_user_from_a_flag():
    base = Config()
    result = apply_overrides(base, server_run_as_user="nobody", server_run_as_group="nogroup")
    assert result.server.run_as_group == "nogroup"


def test_unknown_override_key_is_a_programming_error():
    with pytest.raises(TypeError, match="server_colour"):
        apply_overrides(Config(), server_colour="blue")


def test_relay_threads_and_socket_buffer_defaults_and_values(tmp_path):
    assert (Config().server.relay_threads, Config().server.socket_buffer) == (1, "auto")
    path = write(tmp_path, "[server]\nrelay_threads = 0\nsocket_buffer = 65536\n")
    server = load_config(path).server
    assert (server.relay_threads, server.socket_buffer) == (0, 65536)
    assert load_config(write(tmp_path, "[server]\nsocket_buffer = 0\n")).server.socket_buffer == 0
    flags = apply_overrides(Config(), server_socket_buffer="262144", server_relay_threads="3")
    assert (flags.server.socket_buffer, flags.server.relay_threads) == (262144, 3)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("socket_buffer = 12", "server.socket_buffer: must be 0 (the kernel's autotuning) or at"),
        ("socket_buffer = -1", "server.socket_buffer: must be between 0 and 67108864, got -1"),
        ('socket_buffer = "big"', 'server.socket_buffer: must be a number of bytes or "auto"'),
        ("socket_buffer = 1.5", "server.socket_buffer: must be an integer, got float 1.5"),
        ("relay_threads = 999", "server.relay_threads: must be between 0 and 256, got 999"),
    ],
)
def test_bad_relay_keys_name_the_key_and_problem(tmp_path, text, expected):
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, f"[server]\n{text}\n"))
    assert expected in str(caught.value)
