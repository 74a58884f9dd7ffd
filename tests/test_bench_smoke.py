"""The benchmark runs end to end on tiny sizes (no timing is asserted: numbers vary by machine).

Why: bench/run.py is the project's only way to measure the proxy; this keeps it from rotting
as socks5d changes. It runs the real daemon against the harness's own loopback targets.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ("throughput", "connrate", "latency", "idle")
NUMBER = re.compile(r"\s\d+(\.\d+)?\s")


def test_bench_quick_run_prints_a_number_for_every_scenario(tmp_path: Path) -> None:
    out = tmp_path / "samples.json"
    command = [sys.executable, "bench/run.py", "--quick", "--proxies", "socks5d-threading"]
    done = subprocess.run(
        [*command, "--rounds", "1", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if "socks5d-threading" in line]
    for scenario in SCENARIOS:
        mine = [row for row in rows if row.startswith(scenario + " ")]
        assert mine, f"no {scenario} row in:\n{done.stdout}"
        for row in mine:
            assert NUMBER.search(row) and " n/a " not in row, f"no figure in {row!r}"
    assert re.search(r"^throughput .* direct ", done.stdout, re.MULTILINE), "no direct baseline"
    assert out.read_text().startswith("{"), "--json wrote nothing"


def test_a_variant_can_run_another_checkout_for_side_by_side_commits() -> None:
    """`--socks5d-variant 'old=@DIR FLAGS'` runs DIR's socks5d (a worktree of the old
    commit) with FLAGS, so one interleaved run compares two commits."""
    sys.path.insert(0, str(ROOT))
    from bench import proxies

    name, flags = proxies.parse_variant("socks5d-old=@/srv/old-tree --workers 2")
    spec = proxies.known_specs({name: flags})[name]
    assert spec == proxies.ProxySpec("socks5d-old", "socks5d", ("--workers", "2"), "/srv/old-tree")
    plain = proxies.known_specs({"w4": ("--workers", "4")})["w4"]
    assert (plain.flags, plain.source) == (("--workers", "4"), None)
