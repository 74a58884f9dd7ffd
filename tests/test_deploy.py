"""deploy/kubernetes.yaml: its config starts, its readiness command tells a SOCKS5 server
from anything else, and its grace periods fit together. (deploy/haproxy.cfg is run by
tests/test_proxy_protocol.py.)"""

from __future__ import annotations

import socket
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from clients import TIMEOUT, closed_port, wait_until
from conftest import DaemonProcess, TargetServer

from socks5d.ops.config import load_config
from socks5d.policy.rules import exposure_problem

yaml = pytest.importorskip("yaml", reason="PyYAML (the test extra) reads the manifest")

MANIFEST = Path(__file__).resolve().parent.parent / "deploy" / "kubernetes.yaml"


def documents() -> dict[str, dict[str, Any]]:
    """The manifest's objects by kind."""
    with MANIFEST.open() as file:
        return {doc["kind"]: doc for doc in yaml.safe_load_all(file) if doc}


def container() -> dict[str, Any]:
    return documents()["Deployment"]["spec"]["template"]["spec"]["containers"][0]


def config_text() -> str:
    return documents()["ConfigMap"]["data"]["socks5d.toml"]


def readiness(port: int) -> int:
    """The manifest's readiness command, pointed at `port` on loopback: its exit code."""
    command = container()["readinessProbe"]["exec"]["command"]
    assert command[:2] == ["python3", "-c"]
    script = command[2]
    assert '("127.0.0.1", 1080)' in script
    script = script.replace('("127.0.0.1", 1080)', f'("127.0.0.1", {port})')
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=TIMEOUT * 3)
    return done.returncode


def test_the_configmap_is_a_valid_config_that_is_not_an_open_proxy(tmp_path: Path) -> None:
    path = tmp_path / "socks5d.toml"
    path.write_text(config_text())
    config = load_config(path)
    assert (config.server.host, config.server.port) == ("0.0.0.0", 1080)
    # Listening on every address is safe only because clients are restricted.
    assert exposure_problem(config, [("0.0.0.0", 1080)]) is None
    assert config.access.default_action == "deny"


def test_the_grace_periods_fit_together() -> None:
    pod = documents()["Deployment"]["spec"]["template"]["spec"]
    grace = tomllib.loads(config_text())["timeouts"]["shutdown_grace"]
    pre_stop = int(container()["lifecycle"]["preStop"]["exec"]["command"][1])
    # Kubernetes kills the pod after terminationGracePeriodSeconds, counted from preStop.
    assert pod["terminationGracePeriodSeconds"] > pre_stop + grace
    assert documents()["Service"]["spec"]["externalTrafficPolicy"] == "Local"


def test_the_deployment_runs_with_its_config_and_is_ready(
    tmp_path: Path, daemon_factory: Callable[..., DaemonProcess]
) -> None:
    path = tmp_path / "socks5d.toml"
    path.write_text(config_text())
    args = [a.replace("/etc/socks5d/socks5d.toml", str(path)) for a in container()["args"]]
    # The pod's own flags, on loopback and a free port here (flags override the file).
    daemon = daemon_factory(*args, "--host", "127.0.0.1", "--port", "0")
    assert readiness(daemon.port) == 0
    # The readiness greeting is one access record: a handshake the client ended.
    assert wait_until(lambda: "client closed during handshake" in daemon.output())


def test_readiness_passes_when_logins_are_required(
    tmp_path: Path, daemon_factory: Callable[..., DaemonProcess]
) -> None:
    path = tmp_path / "socks5d.toml"
    path.write_text('[[users]]\nname = "alice"\npassword = "a long secret"\n')
    daemon = daemon_factory("--config", str(path), "--port", "0")
    assert readiness(daemon.port) == 0  # 05 ff: it speaks SOCKS5, it wants a login


def test_readiness_fails_for_a_closed_port_and_for_a_server_that_is_not_socks5(
    target_factory: Callable[..., TargetServer],
) -> None:
    assert readiness(closed_port()) != 0

    def http_server(conn: socket.socket) -> None:
        conn.recv(16)
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")

    assert readiness(target_factory(http_server).port) != 0

    def silent(conn: socket.socket) -> None:
        conn.recv(16)  # then nothing: the probe's own 2 s timeout ends it

    assert readiness(target_factory(silent).port) != 0
