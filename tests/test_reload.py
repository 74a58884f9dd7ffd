"""What a reload (SIGHUP) keeps from the running config, and says it keeps.

In process: a Daemon bound on port 0 and reloaded by calling reload(), as the signal
handler's loop does; no signals, no child processes.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from socks5d.ops import systemd
from socks5d.ops.config import ServerConfig, load_config
from socks5d.ops.daemon import Daemon, changed_fields

BEFORE = '[server]\nport = 0\nsocket_buffer = "auto"\n'
# outgoing_address, socket_buffer and allow_open were kept without a word: the warning
# listed only listen address, mode, workers and relay_threads.
AFTER = (
    '[server]\nport = 0\nsocket_buffer = 65536\noutgoing_address = ["127.0.0.1"]\n'
    "allow_open = true\n"
    '[[users]]\nname = "alice"\npassword = "pw"\n'
)


@pytest.fixture
def daemon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(systemd, "listen_fds", lambda: [])
    path = tmp_path / "config.toml"
    path.write_text(BEFORE)
    daemon = Daemon(load_config(str(path)), str(path))
    server = daemon.bind()
    try:
        yield daemon, path
    finally:
        server.server_close()


def test_a_reload_names_every_server_setting_it_keeps(daemon, caplog):
    daemon, path = daemon
    caplog.set_level(logging.WARNING, logger="socks5d")
    path.write_text(AFTER)
    assert daemon.reload()
    (warning,) = [r.getMessage() for r in caplog.records if "need a restart" in r.getMessage()]
    assert warning == (
        "reload: [server] changes need a restart, kept as they were: "
        "outgoing_address, allow_open, socket_buffer"
    )
    assert daemon.server.context.settings().socket_buffer == "auto"  # kept, as the warning says
    assert daemon.config.server.outgoing_address == ()
    assert [user.name for user in daemon.config.users] == ["alice"]  # the rest applies


def test_a_reload_without_server_changes_warns_of_nothing(daemon, caplog):
    daemon, path = daemon
    caplog.set_level(logging.WARNING, logger="socks5d")
    path.write_text(BEFORE + '[[users]]\nname = "alice"\npassword = "pw"\n')
    assert daemon.reload()
    assert not [r for r in caplog.records if "need a restart" in r.getMessage()]


def test_changed_fields_names_the_differences_in_declaration_order():
    old = ServerConfig()
    new = ServerConfig(mode="forking", port=1, relay_threads=2)
    assert changed_fields(old, new) == ["port", "mode", "relay_threads"]
    assert changed_fields(old, ServerConfig()) == []
