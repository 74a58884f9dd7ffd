"""Shell completion comes from click's own mechanism: `_SOCKS5D_COMPLETE=bash_source socks5d`
prints the script the README tells users to eval, and the script asks the command itself."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT

# The console script, as installed by `pip install` (its name is what click keys on).
SCRIPT = shutil.which("socks5d", path=os.path.dirname(sys.executable)) or shutil.which("socks5d")
needs_script = pytest.mark.skipif(SCRIPT is None, reason="the socks5d script is not installed")


def complete(words: str, cword: int) -> list[tuple[str, str]]:
    """(type, value) pairs that click's bash_complete answers for COMP_WORDS/COMP_CWORD."""
    env = {
        **os.environ,
        "COMP_WORDS": words,
        "COMP_CWORD": str(cword),
        "_SOCKS5D_COMPLETE": "bash_complete",
    }
    done = subprocess.run(
        [SCRIPT], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    return [tuple(line.split(",", 1)) for line in done.stdout.splitlines() if line]  # type: ignore[misc]


@needs_script
def test_completing_mo_offers_mode():
    assert complete("socks5d --mo", 1) == [("plain", "--mode")]


@needs_script
def test_completing_the_mode_value_offers_both_modes():
    assert complete("socks5d --mode ", 2) == [("plain", "threading"), ("plain", "forking")]


@needs_script
def test_subcommands_and_their_flags_complete():
    assert ("plain", "probe") in complete("socks5d pr", 1)
    assert ("plain", "--handshake-wait") in complete("socks5d probe --hand", 2)
    # A value that is no choice completes to nothing, not an error.
    assert complete("socks5d --mode nonsense", 2) == []


@needs_script
@pytest.mark.parametrize(
    ("shell", "marker"),
    [
        ("bash", "complete -o nosort -F _socks5d_completion socks5d"),
        ("zsh", "#compdef socks5d"),
        ("fish", "complete --no-files --command socks5d"),
    ],
)
def test_each_shell_gets_its_script(shell, marker):
    done = subprocess.run(
        [SCRIPT],
        env={**os.environ, "_SOCKS5D_COMPLETE": f"{shell}_source"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert marker in done.stdout


@needs_script
@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_bash_script_fills_compreply_as_the_readme_enables_it():
    """The README's line, evaluated by a real bash, then its completion function called as
    bash would on TAB after `socks5d --mode `."""
    script = (
        f'PATH="{os.path.dirname(SCRIPT)}:$PATH"\n'
        'eval "$(_SOCKS5D_COMPLETE=bash_source socks5d)"\n'
        "COMP_WORDS=(socks5d --mode '')\nCOMP_CWORD=2\n"
        "_socks5d_completion socks5d\n"
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    done = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["threading", "forking"]
