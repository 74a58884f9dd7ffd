"""The report: one aligned table of medians over rounds, ratios to direct and to each peer.

Ratios are this proxy's median divided by the reference's median, whatever the metric: for
MiB/s and conn/s higher is better, for microseconds and KiB lower is better (the table's
``better`` column says which).
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from bench.scenarios import Sample

DIRECT = "direct"


@dataclass(frozen=True)
class Metric:
    """A table row kind: which metric of which scenario, which way is better, its CPU figure."""

    scenario: str
    key: str
    higher_is_better: bool
    cpu_key: str | None = None


METRICS = (
    Metric("throughput", "MiB/s", True, "cpu s/GiB"),
    Metric("connrate", "conn/s", True, "cpu us/conn"),
    Metric("latency", "p50 us", False, "cpu us/ping"),
    Metric("latency", "p99 us", False),
    Metric("idle", "rss KiB/tunnel", False, "cpu us/tunnel"),
    Metric("idle", "pss KiB/tunnel", False),
)


def fmt(value: float | None) -> str:
    """Three significant figures or so: enough for medians of noisy runs."""
    if value is None:
        return "n/a"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def median_of(samples: Iterable[Sample], key: str) -> float | None:
    values = [s.metrics[key] for s in samples if key in s.metrics]
    return statistics.median(values) if values else None


def _spread(samples: list[Sample], key: str) -> str:
    values = [s.metrics[key] for s in samples if key in s.metrics]
    middle = statistics.median(values) if values else 0
    if len(values) < 2 or not middle:
        return "-"
    return f"{(max(values) - min(values)) / abs(middle) * 100:.0f}%"


def _notes(metric: Metric, samples: list[Sample]) -> str:
    """Failures, failed runs, and scenario extras (idle: threads and processes)."""
    notes = []
    failed = [s for s in samples if s.error]
    if failed:
        notes.append(f"{len(failed)}/{len(samples)} runs: {failed[0].error}")
    failures: Counter[str] = Counter()
    for sample in samples:
        failures.update(sample.failures)
    if failures and not failed:
        notes.append("failures " + ", ".join(f"{k} {v}" for k, v in sorted(failures.items())))
    if metric.key == "rss KiB/tunnel":
        threads, procs = median_of(samples, "threads"), median_of(samples, "processes")
        if threads is not None and procs is not None:
            notes.append(f"threads {threads:.0f}, processes {procs:.0f}")
    if metric.scenario == "throughput" and samples and samples[0].proxy == DIRECT:
        notes.append(
            f"client+targets cpu {fmt(median_of(samples, 'client+target cpu s/GiB'))} s/GiB"
        )
    return "; ".join(notes)


def table(
    samples: list[Sample],
    proxies: list[str],
    peers: list[str],
    not_run: dict[str, str] | None = None,
) -> str:
    """The aligned plain-text table of medians, one row per scenario case x metric x proxy;
    a proxy in ``not_run`` gets an n/a row saying why."""
    not_run = not_run or {}
    by_key: dict[tuple[str, str, str], list[Sample]] = {}
    cases: dict[str, list[str]] = {}
    for sample in samples:
        by_key.setdefault((sample.scenario, sample.case, sample.proxy), []).append(sample)
        if sample.case not in cases.setdefault(sample.scenario, []):
            cases[sample.scenario].append(sample.case)
    present_peers = [p for p in peers if p in proxies]
    header = ["scenario", "case", "metric", "better", "proxy", "median", "spread", "vs direct"]
    header += [f"vs {peer}" for peer in present_peers] + ["proxy cpu", "notes"]
    rows: list[list[str]] = []
    for metric in METRICS:
        for case in cases.get(metric.scenario, []):
            medians = {
                p: median_of(by_key.get((metric.scenario, case, p), []), metric.key)
                for p in proxies
            }
            for proxy in [*proxies, *not_run]:
                group = by_key.get((metric.scenario, case, proxy))
                if proxy in not_run:
                    why = not_run[proxy]
                    why = why if len(why) <= 70 else why[:67] + "..."
                    rows.append(
                        [metric.scenario, case, metric.key, "", proxy, "n/a", "-", "-"]
                        + ["-"] * len(present_peers)
                        + ["-", f"not run: {why}"]
                    )
                    continue
                if not group:
                    continue
                value = medians[proxy]
                ratios = []
                for ref in [DIRECT, *present_peers]:
                    base = medians.get(ref)
                    ok = ref != proxy and value is not None and base
                    ratios.append(f"{value / base:.2f}x" if ok else "-")  # type: ignore[operator]
                cpu = median_of(group, metric.cpu_key) if metric.cpu_key else None
                cpu_text = (
                    f"{fmt(cpu)} {metric.cpu_key.removeprefix('cpu ')}"
                    if cpu is not None and metric.cpu_key
                    else "-"
                )
                rows.append(
                    [
                        metric.scenario,
                        case,
                        metric.key,
                        "higher" if metric.higher_is_better else "lower",
                        proxy,
                        fmt(value),
                        _spread(group, metric.key),
                        *ratios,
                        cpu_text,
                        _notes(metric, group),
                    ]
                )
    return align([header, *rows], right=set(range(5, len(header) - 1)))


def align(rows: list[list[str]], right: set[int] | None = None) -> str:
    """Columns padded to their widest cell (numbers to the right); notes are left ragged."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for number, row in enumerate(rows):
        cells = [
            cell.rjust(width) if i in (right or ()) else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row[:-1], widths, strict=False))
        ]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
        if number == 0:
            lines.append("  ".join("-" * width for width in widths).rstrip())
    return "\n".join(lines)
