"""Imports point one way: pure modules stay pure, nothing imports the CLI."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "socks5d"

# module -> the project modules it may import
ALLOWED = {
    "protocol": {"addresses"},
    "config": set(),
    "relay": set(),
    "eventloop": {"relay"},
    "loopserver": {"eventloop", "relay", "server"},
    "fastpath": {
        "addresses",
        "handler",
        "handshake",
        "eventloop",
        "loopserver",
        "outbound",
        "protocol",
        "relay",
        "server",
    },
    "server": {"addresses"},
    "shmem": set(),
    "limits": {"shmem"},
    "throttle": {"addresses", "shmem"},
    "logs": set(),
    "systemd": set(),
    "privileges": set(),
    "session": {"protocol"},
    "handshake": {"protocol", "session", "auth"},
    "rules": {"addresses", "config", "protocol"},
    "capacity": {"addresses", "config", "rules"},
    "auth": {"protocol", "config", "shmem"},
    "addresses": set(),
    "lookups": {"shmem"},
    "outbound": {"protocol", "lookups"},
    "bind": {"addresses", "protocol", "outbound"},
    "udp": {"addresses", "protocol", "outbound", "lookups"},
    "handler": {
        "addresses",
        "handshake",
        "protocol",
        "config",
        "limits",
        "lookups",
        "auth",
        "outbound",
        "bind",
        "udp",
        "relay",
        "rules",
        "server",
        "session",
        "throttle",
    },
    "daemon": {
        "addresses",
        "protocol",
        "config",
        "auth",
        "outbound",
        "relay",
        "eventloop",
        "loopserver",
        "fastpath",
        "rules",
        "server",
        "handler",
        "capacity",
        "limits",
        "logs",
        "systemd",
        "privileges",
        "shmem",
        "throttle",
    },
    "cli": {"addresses", "config", "auth", "rules", "daemon", "logs", "__init__"},
    "__main__": {"cli"},
    "__init__": set(),
}
NO_SOCKETS = {"protocol", "config", "auth", "throttle", "addresses"}


def project_imports(path: Path) -> tuple[set[str], set[str]]:
    """(project modules, top-level stdlib/third-party modules) that `path` imports."""
    project, other = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                if node.module:
                    project.add(node.module)
                else:  # `from . import x`: module x if there is one, else the package
                    for alias in node.names:
                        is_module = (PACKAGE / f"{alias.name}.py").exists()
                        project.add(alias.name if is_module else "__init__")
            elif node.module and node.module.startswith("socks5d"):
                project.add(node.module.partition(".")[2] or "__init__")
            elif node.module:
                other.add(node.module.partition(".")[0])
        elif isinstance(node, ast.Import):
            other.update(alias.name.partition(".")[0] for alias in node.names)
    return project, other


def test_every_module_is_listed():
    assert {path.stem for path in PACKAGE.glob("*.py")} == set(ALLOWED)


@pytest.mark.parametrize("module", sorted(ALLOWED))
def test_module_imports_only_what_it_may(module):
    project, other = project_imports(PACKAGE / f"{module}.py")
    assert project <= ALLOWED[module], f"{module} imports {project - ALLOWED[module]}"
    assert "socketserver" not in other
    if module in NO_SOCKETS:
        assert not {"socket", "select", "selectors"} & other
    if module != "cli":
        assert "click" not in other
