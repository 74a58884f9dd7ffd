"""Imports point one way, package by package (see docs/ARCHITECTURE.md):

    ops  ->  socks  ->  policy  ->  core

core knows no SOCKS and imports nothing of the project outside itself; policy may use
the core, the config records (ops.config) and the wire-format enums (socks.protocol);
socks may use core, policy and ops.config; ops assembles everything. On top: the wire
format and the handshake state machine stay pure (no sockets), click lives in the CLI
only, nothing imports the CLI, and nothing imports the standard library's socketserver.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "socks5d"
SUBPACKAGES = ("core", "policy", "socks", "ops")

# package -> what else its modules may import (a package, or one module of one)
MAY_IMPORT: dict[str, set[str]] = {
    "core": set(),
    "policy": {"core", "ops.config", "socks.protocol"},
    "socks": {"core", "policy", "ops.config"},
    "ops": {"core", "policy", "socks", "__init__"},
}
# Records and formats everybody reads: they import only the core.
LEAVES = {"ops.config", "socks.protocol"}
NO_SOCKETS = {
    "socks.protocol",
    "socks.handshake",
    "ops.config",
    "policy.auth",
    "policy.throttle",
    "core.addresses",
}


def modules() -> list[str]:
    """Every module as "package.module"."""
    return sorted(
        f"{path.parent.name}.{path.stem}"
        for package in SUBPACKAGES
        for path in (PACKAGE / package).glob("*.py")
        if path.stem != "__init__"
    )


def project_imports(module: str) -> tuple[set[str], set[str]]:
    """("package.module" of the project, top-level other modules) that `module` imports."""
    package, _, name = module.partition(".")
    path = PACKAGE / package / f"{name}.py"
    project, other = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:  # from .x import y: this package
                project.add(f"{package}.{node.module}")
            elif node.level == 2:  # from ..pkg.x import y, from .. import __version__
                project.add(node.module or "__init__")
            elif node.module and node.module.startswith("socks5d"):
                project.add(node.module.partition(".")[2] or "__init__")
            elif node.module:
                other.add(node.module.partition(".")[0])
        elif isinstance(node, ast.Import):
            other.update(alias.name.partition(".")[0] for alias in node.names)
    return project, other


def allowed(module: str, target: str) -> bool:
    package = module.partition(".")[0]
    if target.partition(".")[0] == package:
        return True
    rules = MAY_IMPORT[package]
    return target in rules or target.partition(".")[0] in rules


def test_every_module_is_in_a_subpackage():
    top = {path.stem for path in PACKAGE.glob("*.py")}
    assert top == {"__init__", "__main__"}, "new modules go in core/, policy/, socks/ or ops/"
    assert len(modules()) > 20


@pytest.mark.parametrize("module", modules())
def test_module_imports_only_what_its_package_may(module):
    project, other = project_imports(module)
    wrong = sorted(target for target in project if not allowed(module, target))
    assert wrong == [], f"{module} may not import {wrong}"
    if module in LEAVES:
        assert {t for t in project if not t.startswith("core.")} == set(), module
    assert "socketserver" not in other
    if module in NO_SOCKETS:
        assert not {"socket", "select", "selectors"} & other
    if module != "ops.cli":
        assert "click" not in other
        assert "ops.cli" not in project


def test_the_rules_would_catch_an_upward_import():
    assert not allowed("core.relay", "socks.protocol")
    assert not allowed("policy.rules", "socks.handler")
    assert not allowed("socks.handler", "ops.daemon")
    assert allowed("socks.handler", "policy.rules")
    assert allowed("ops.daemon", "socks.handler")


def test_the_probe_is_a_client_only_the_cli_uses():
    """`socks5d probe` talks to servers from the outside: no part of the server imports it."""
    for module in modules():
        if module in {"ops.cli", "ops.probe"}:
            continue
        project, _ = project_imports(module)
        assert not {"ops.probe", "ops.probe_targets"} & project, module


def test_only_the_metrics_module_knows_prometheus():
    """The core hands out plain counts (TrafficMeter, refusal_counted) and the socks layer
    plain hooks (SessionObserver); prometheus_client is ops.metrics' business alone."""
    for module in modules():
        package, _, name = module.partition(".")
        text = (PACKAGE / package / f"{name}.py").read_text()
        if module != "ops.metrics":
            assert "prometheus" not in text, module
        if package in ("core", "policy"):
            assert "metrics" not in text.lower(), module
