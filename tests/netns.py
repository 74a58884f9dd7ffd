"""Private network namespaces for the tests that must listen on a wildcard address.

A listener on 0.0.0.0 or :: is reachable from every network the machine is on; bound inside
`unshare --net` it is reachable from nowhere but that namespace, which holds nothing but
its own loopback. So a test that needs a non-loopback listener runs its body there:

    @netns_only
    def scenario(arg1, arg2): ...                  # binds 0.0.0.0, returns JSON-able facts

    result = call_in_netns(scenario, arg1, arg2)   # scenario(*args) runs in the namespace

`scenario` is a module-level function of a test module (importable as `tests/<module>.py`);
it returns something JSON can carry and the test asserts on that. `run_in_netns(code)`
runs a raw snippet instead. Both refuse to run anything unless the namespace has no
interface but `lo` (`assert_isolated`), and mark their tests with `needs_netns`, a skip
when `unshare` or `ip` is missing or unsharing is not permitted (not root).

The namespace also gets its own PID namespace where util-linux allows it, so a timeout
that kills the snippet takes every process it started (a daemon, a forked child) along.
With `mount=True` it also gets a private mount namespace, where the snippet may bind-mount
files over system ones (say /etc/resolv.conf) that no other process sees.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
NETNS_TIMEOUT = 60.0

# Bring the namespace's loopback up (it starts down), then become the Python snippet.
SCRIPT = 'ip link set lo up && exec "$PYTHON" -c "$CODE"'
# --pid --fork --kill-child: the snippet is PID 1 of its own PID namespace and dies with
# unshare, so killing unshare on a timeout ends every process below it too.
WITH_PID_NAMESPACE = ("unshare", "--net", "--pid", "--fork", "--kill-child")
NET_ONLY = ("unshare", "--net")


def _probe(command: tuple[str, ...]) -> str | None:
    try:
        probe = subprocess.run(
            [*command, "sh", "-c", "ip link set lo up"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{' '.join(command)} failed: {exc}"
    if probe.returncode != 0:
        return f"{' '.join(command)} failed (not root?): {probe.stderr.strip()}"
    return None


@functools.lru_cache(maxsize=1)
def _unshare_command() -> tuple[tuple[str, ...] | None, str]:
    """(the unshare command to use, or None) and why not."""
    for tool in ("unshare", "ip"):
        if shutil.which(tool) is None:
            return None, f"`{tool}` is not installed; no private network namespace"
    problem = _probe(WITH_PID_NAMESPACE)
    if problem is None:
        return WITH_PID_NAMESPACE, ""
    problem = _probe(NET_ONLY)
    if problem is None:
        return NET_ONLY, ""
    return None, problem


def netns_unavailable() -> str | None:
    """Why a private network namespace cannot be made here, or None when it can."""
    command, reason = _unshare_command()
    return None if command is not None else reason


needs_netns = pytest.mark.skipif(
    netns_unavailable() is not None,
    reason=netns_unavailable() or "private network namespaces are available",
)


def assert_isolated() -> None:
    """Refuse to go on unless this process sees no network interface but loopback."""
    names = [name for _, name in socket.if_nameindex()]
    if names != ["lo"]:
        raise RuntimeError(f"not in a private network namespace (interfaces: {names})")


def netns_only(function: Callable[..., Any]) -> Callable[..., Any]:
    """Mark a scenario function for call_in_netns; called anywhere else, it refuses to run
    (assert_isolated) rather than bind a wildcard address on the real network."""

    @functools.wraps(function)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        assert_isolated()
        return function(*args, **kwargs)

    guarded.netns_only = True  # type: ignore[attr-defined]
    return guarded


def run_in_netns(
    code: str,
    *,
    timeout: float = NETNS_TIMEOUT,
    env: dict[str, str] | None = None,
    mount: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run a Python snippet in a fresh network namespace; cwd is the repository root and
    `tests/` is importable (conftest, clients, the test modules). Bounded by `timeout`.
    `mount`: in a private mount namespace too (mounts made there stay there)."""
    command, reason = _unshare_command()
    if command is None:
        pytest.skip(reason)
    if mount:
        command = (command[0], "--mount", *command[1:])
    guarded = "from netns import assert_isolated\nassert_isolated()\n" + textwrap.dedent(code)
    python_path = [str(TESTS), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    environment = {
        **os.environ,
        **(env or {}),
        "PYTHON": sys.executable,
        "CODE": guarded,
        "PYTHONPATH": os.pathsep.join(python_path),
        "PYTHONUNBUFFERED": "1",
    }
    return subprocess.run(
        [*command, "sh", "-c", SCRIPT],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def json_in_netns(
    code: str,
    *,
    timeout: float = NETNS_TIMEOUT,
    env: dict[str, str] | None = None,
    mount: bool = False,
) -> Any:
    """Run `code` in a namespace; it must exit 0 and print JSON as its last stdout line."""
    result = run_in_netns(code, timeout=timeout, env=env, mount=mount)
    lines = result.stdout.strip().splitlines()
    assert result.returncode == 0 and lines, (
        f"netns snippet failed with exit code {result.returncode}\n"
        f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    )
    return json.loads(lines[-1])


def call_in_netns(
    function: Callable[..., Any], *args: Any, timeout: float = NETNS_TIMEOUT, mount: bool = False
) -> Any:
    """`function(*args)` in a private network namespace; returns its JSON-able result.

    `function` must be a module-level function of a module under tests/, and `args`
    JSON-serialisable: the snippet imports it by name and passes the arguments through.
    """
    module, name = function.__module__, function.__qualname__
    assert "." not in name and "<" not in name, f"{name}: not a module-level function"
    assert getattr(function, "netns_only", False), f"{name}: decorate it with @netns_only"
    code = (
        "import json, os\n"
        f"from {module} import {name}\n"
        f"result = {name}(*json.loads(os.environ['NETNS_ARGS']))\n"
        "print()\n"
        "print(json.dumps(result))\n"
    )
    return json_in_netns(
        code, timeout=timeout, env={"NETNS_ARGS": json.dumps(list(args))}, mount=mount
    )
