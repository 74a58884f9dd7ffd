"""Config: defaults, the example file, overrides, and one clear error per bad key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from socks5d.config import (
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
    assert config.users == ()


def test_example_file_documents_every_key():
    text = (ROOT / "config.example.toml").read_text()
    for section, keys in {
        "server": Config().server,
        "limits": Config().limits,
        "timeouts": Config().timeouts,
        "logging": Config().logging,
    }.items():
        assert f"[{section}]" in text
        for key in type(keys).__slots__:
            assert f"\n{key} = " in text, f"{section}.{key} is not documented"
    assert "# [[users]]" in text and '# name = "alice"' in text


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
