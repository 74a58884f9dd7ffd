"""The man pages: generated from the click command and the config schema by
tools/gen_man.py, checked in under man/, installed to <prefix>/share/man by `pip install`."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import click
import pytest
from conftest import ROOT

from socks5d.ops import config as schema
from socks5d.ops.cli import main as command

REGENERATE = "python tools/gen_man.py"


def load_generator():
    spec = importlib.util.spec_from_file_location("gen_man", ROOT / "tools" / "gen_man.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_man"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


gen_man = load_generator()


@pytest.mark.parametrize("name", ["socks5d.1", "socks5d.toml.5"])
def test_checked_in_pages_match_what_the_generator_makes_now(name):
    checked_in = (ROOT / "man" / name).read_text()
    assert checked_in == gen_man.pages()[name], (
        f"man/{name} is out of date with the CLI or the config schema: run {REGENERATE}"
    )


def test_the_generator_check_mode_agrees():
    done = subprocess.run(
        [sys.executable, "tools/gen_man.py", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def roff(text: str) -> str:
    return text.replace("-", "\\-")


def test_section_1_names_every_flag_of_every_command_and_the_required_sections():
    page = gen_man.page_socks5d()
    context = click.Context(command, info_name="socks5d")
    commands = [command] + [command.get_command(context, n) for n in command.list_commands(context)]
    for cmd in commands:
        for param in cmd.params:
            for name in getattr(param, "opts", []):
                if name.startswith("-"):
                    assert f"\\fB{roff(name)}\\fR" in page, name
    for name in command.list_commands(context):
        assert f'.SS "socks5d {roff(name)} ' in page
    for section in ("NAME", "SYNOPSIS", "OPTIONS", "COMMANDS", "SIGNALS", "EXIT STATUS", "FILES"):
        assert f".SH {section}" in page
    assert ".B SIGHUP" in page


def test_section_5_names_every_section_and_key_with_its_default():
    page = gen_man.page_config()
    for section, (_cls, validators) in schema.SECTIONS.items():
        assert f'.SH "[{section}]"' in page
        for key in validators:
            assert f"\\fB{roff(key)}\\fR" in page, f"{section}.{key}"
    assert '\\fBmode\\fR = "threading"' in page
    assert "\\fBport\\fR = 1080" in page
    assert "Values: one of threading, forking." in page
    for name in schema.ARRAYS:
        assert f'.SH "[[{name}]]"' in page
    assert "(Not described in config.example.toml.)" not in page


def test_a_key_added_to_the_schema_appears_in_the_page(monkeypatch):
    """What another change adding a key does: the page picks it up with no generator edit."""

    @dataclasses.dataclass(frozen=True)
    class ChainConfig:
        upstream: str = ""

    def _upstream(value):
        raise ValueError('must be "socks5://HOST:PORT", got ' + repr(value))

    monkeypatch.setitem(schema.SECTIONS, "chain", (ChainConfig, {"upstream": _upstream}))
    page = gen_man.page_config()
    assert '.SH "[chain]"' in page
    assert '\\fBupstream\\fR = ""' in page
    assert 'Values: "socks5://HOST:PORT".' in page
    assert "(Not described in config.example.toml.)" in page  # until the example says more


@pytest.mark.skipif(shutil.which("man") is None, reason="man is not installed")
@pytest.mark.parametrize("name", ["socks5d.1", "socks5d.toml.5"])
def test_pages_render_without_warnings(name):
    done = subprocess.run(
        ["man", "--warnings", "-l", str(ROOT / "man" / name)],
        env={**os.environ, "MANWIDTH": "80", "MAN_KEEP_FORMATTING": "0", "PAGER": "cat"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == "", done.stderr
    assert "probe" in done.stdout or "[server]" in done.stdout


def test_pip_install_puts_the_pages_where_man_finds_them(tmp_path):
    """Build the wheel from a copy of the source, install it into a fresh venv, and find
    the pages under its sys.prefix/share/man (and through `man -w`, as a user would)."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "socks5d", "man"):
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, source / name)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if built.returncode != 0:
        pytest.skip(
            f"cannot build a wheel here (no setuptools/wheel to build with): {built.stderr[-300:]}"
        )
    wheel = next(tmp_path.glob("socks5d-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    assert any(n.endswith(".data/data/share/man/man1/socks5d.1") for n in names), names
    assert any(n.endswith(".data/data/share/man/man5/socks5d.toml.5") for n in names), names
    venv = tmp_path / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120
    )
    installed = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(venv / "bin" / "python"),
            "install",
            "--no-deps",
            "-q",
            str(wheel),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert installed.returncode == 0, installed.stderr
    prefix = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import sys; print(sys.prefix)"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.strip()
    page = Path(prefix) / "share" / "man" / "man1" / "socks5d.1"
    assert page.read_text() == (ROOT / "man" / "socks5d.1").read_text()
    assert (Path(prefix) / "share" / "man" / "man5" / "socks5d.toml.5").is_file()
    if shutil.which("man") is None:
        return  # the files are where man-db looks; no man here to ask
    found = subprocess.run(
        ["man", "-w", "socks5d", "socks5d.toml"],
        env={**os.environ, "PATH": f"{venv / 'bin'}:{os.environ['PATH']}", "MANPATH": ""},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert found.stdout.split() == [str(page), str(page.parent.parent / "man5" / "socks5d.toml.5")]


def test_the_pages_do_not_depend_on_what_ran_before():
    """click caches a command's help option from the first context that asks; a run of a
    subcommand on its own (as other tests do) must not change the page."""
    from click.testing import CliRunner

    before = gen_man.pages()
    for sub in command.commands.values():
        CliRunner().invoke(sub, ["--help"])
    assert gen_man.pages() == before
