"""Benchmark socks5d against its peers and a direct (no proxy) baseline, in one command.

    python bench/run.py [--proxies socks5d-threading,socks5d-forking,socks5d-workers2,
                                   microsocks,dante,pproxy]
                        [--socks5d-variant NAME=FLAGS]... [--no-direct]
                        [--scenarios throughput,connrate,latency,idle] [--rounds 3]
                        [--size-mib N] [--streams 1,8] [--concurrency 32] [--duration S]
                        [--idle-tunnels K] [--pin] [--quick] [--json out.json]

Round r runs every proxy for one scenario before the next scenario, so drift on a shared
machine hits all proxies alike; the table shows medians over rounds. See BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import resource
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import client, procfs, proxies, report, scenarios
from bench.scenarios import Endpoint, Harness, MiB, Sample

SCENARIOS = ("throughput", "connrate", "latency", "idle")
QUICK = {"rounds": 1, "size_mib": 8, "duration": 0.5, "pings": 200, "idle_tunnels": 50}
DEFAULTS = {"rounds": 3, "size_mib": 1024, "duration": 3.0, "pings": 3000, "idle_tunnels": 1000}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; ``--quick`` only changes the defaults of unset sizes."""
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--proxies",
        default=",".join(proxies.DEFAULT_PROXIES),
        help="comma-separated names; known: " + ", ".join(proxies.known_specs()),
    )
    parser.add_argument(
        "--socks5d-variant",
        action="append",
        default=[],
        metavar="NAME=FLAGS",
        help="add a socks5d variant, e.g. 'socks5d-workers4=--workers 4' (repeatable)",
    )
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--no-direct", action="store_true", help="skip the no-proxy baseline")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--size-mib", type=int, help="bytes moved per throughput run, all streams")
    parser.add_argument("--streams", default="1,8", help="parallel streams per throughput run")
    parser.add_argument("--directions", default="down,up")
    parser.add_argument("--concurrency", type=int, default=32, help="connrate: connections at once")
    parser.add_argument("--duration", type=float, help="connrate: seconds per run")
    parser.add_argument("--pings", type=int, help="latency: round trips per run (max 10 s)")
    parser.add_argument("--idle-tunnels", type=int, help="idle: tunnels held open (K)")
    parser.add_argument("--pin", action="store_true", help="latency: client, proxy, echo on CPU 0")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (the smoke test)")
    parser.add_argument("--client-procs", type=int, help="client worker processes (default: auto)")
    parser.add_argument("--json", type=Path, help="write every raw sample and the metadata here")
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.streams = [int(n) for n in args.streams.split(",") if n]
    args.directions = [d for d in args.directions.split(",") if d]
    args.scenarios = [s for s in args.scenarios.split(",") if s]
    variants = dict(proxies.parse_variant(text) for text in args.socks5d_variant)
    args.specs = proxies.known_specs(variants)
    args.proxies = [p for p in args.proxies.split(",") if p] + [
        name for name in variants if name not in args.proxies.split(",")
    ]
    for name in args.proxies:
        if name not in args.specs:
            parser.error(f"unknown proxy {name!r}; known: {', '.join(args.specs)}")
    for name in args.scenarios:
        if name not in SCENARIOS:
            parser.error(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}")
    if bad := [d for d in args.directions if d not in ("down", "up")]:
        parser.error(f"unknown direction {bad[0]!r}: down or up")
    if args.rounds < 1 or args.concurrency < 1 or not args.streams or min(args.streams) < 1:
        parser.error("rounds, concurrency and streams must be at least 1")
    return args


def raise_nofile() -> int:
    """Soft RLIMIT_NOFILE to the hard limit: idle tunnels need thousands of descriptors,
    and the proxies inherit the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


class Slot:
    """One proxy under test: started once, restarted once if it dies, else marked n/a."""

    def __init__(self, spec: proxies.ProxySpec, workdir: Path, echo: tuple[str, int]) -> None:
        self.spec, self.workdir, self.echo = spec, workdir, echo
        self.running: proxies.RunningProxy | None = None
        self.unavailable: str | None = None
        self.restarts = 0
        self.notes: list[str] = []
        self.stops: list[str] = []
        self.log: list[str] = []

    def start(self) -> None:
        try:
            self.running = proxies.start(self.spec, self.workdir, self.echo)
        except proxies.ProxyUnavailable as exc:
            self.unavailable = str(exc)

    def endpoint(self) -> Endpoint | str:
        """The endpoint to measure, or why there is none (it died and did not come back)."""
        if self.unavailable:
            return self.unavailable
        assert self.running is not None
        if not self.running.alive():
            died = f"died (exit {self.running.process.returncode}): {self.running.log_tail(3)}"
            self.notes.append(died)
            self._stop()
            if self.restarts >= 1:
                self.unavailable = died
                return died
            self.restarts += 1
            self.start()
            if self.unavailable:
                return self.unavailable
            assert self.running is not None
        return Endpoint(self.spec.name, self.running.address, self.running.pid)

    def fresh(self) -> None:
        """Restart before an idle run: memory per tunnel is then measured from a fresh
        process, not on top of heap and stacks that earlier scenarios left resident."""
        if self.running is not None and not self.unavailable:
            self._stop()
            self.start()

    def _stop(self) -> None:
        assert self.running is not None
        status = self.running.stop()
        self.stops.append(status)
        if not proxies.clean_stop(status):
            self.notes.append(f"stop: {status}")

    def stop(self) -> None:
        """Stop it for good, and keep what it logged for the report."""
        if self.running is not None and self.running.alive():
            self._stop()
        if self.running is not None:
            self.log = self.running.log_lines()


def run_one(
    harness: Harness, args: argparse.Namespace, scenario: str, ep: Endpoint, rnd: int
) -> list[Sample]:
    """All cases of one scenario against one endpoint, in one round."""
    if scenario == "throughput":
        return [
            scenarios.run_throughput(harness, ep, rnd, direction, streams, args.size_mib * MiB)
            for direction in args.directions
            for streams in args.streams
        ]
    if scenario == "connrate":
        return [scenarios.run_connrate(harness, ep, rnd, args.concurrency, args.duration)]
    if scenario == "latency":
        return [scenarios.run_latency(harness, ep, rnd, args.pings, 10.0)]
    if ep.pid is None:
        return []  # idle measures a proxy's memory: nothing to measure without one
    return [scenarios.run_idle(harness, ep, rnd, args.idle_tunnels)]


def metadata(args: argparse.Namespace, argv: list[str], slots: dict[str, Slot]) -> dict[str, Any]:
    """What the figures were measured on and with: printed above the table, kept in JSON."""
    uname = subprocess.run(["uname", "-a"], capture_output=True, text=True, check=False)
    return {
        "command": shlex.join(["python", "bench/run.py", *argv]),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "uname": uname.stdout.strip() or " ".join(platform.uname()),
        "cpu": f"{procfs.cpu_model()} x {os.cpu_count()}",
        "python": platform.python_version(),
        "client verify MiB/s per core": round(client.verify_speed_mib_s(), 0),
        "versions": {
            name: proxies.version(slot.spec) for name, slot in slots.items() if not slot.unavailable
        },
        "not run": {name: slot.unavailable for name, slot in slots.items() if slot.unavailable},
        "settings": {
            "rounds": args.rounds,
            "size MiB per throughput run": args.size_mib,
            "streams": args.streams,
            "connrate concurrency": args.concurrency,
            "connrate seconds": args.duration,
            "latency pings": args.pings,
            "idle tunnels": args.idle_tunnels,
            "pinned": args.pin,
        },
    }


def render(meta: dict[str, Any], samples: list[Sample], names: list[str]) -> str:
    """The whole printed report: metadata lines, then the table."""
    lines = [f"{key}: {meta[key]}" for key in ("command", "date", "uname", "cpu", "python")]
    lines.append(
        f"client content check: {meta['client verify MiB/s per core']:.0f} MiB/s per core"
        " (memcmp against the pattern); the direct rows are the client's ceiling"
    )
    lines += [f"version: {name}: {text}" for name, text in meta["versions"].items()]
    lines += [f"not run: {name}: {why}" for name, why in meta["not run"].items()]
    lines += [f"note: {text}" for text in meta.get("notes", [])]
    for name, log in meta.get("logs", {}).items():
        if log["lines"]:
            last = " | ".join(line.strip()[:160] for line in log["last"])
            lines.append(f"log: {name} wrote {log['lines']} line(s), last: {last}")
    lines.append(f"took: {meta.get('seconds', 0):.0f} s")
    ran = [name for name in names if name not in meta["not run"]]
    peers = [name for name in proxies.PEERS if name in ran]
    lines += ["", report.table(samples, ran, peers, meta["not run"])]
    return "\n".join(lines)


def run_rounds(
    harness: Harness, args: argparse.Namespace, slots: dict[str, Slot], names: list[str]
) -> list[Sample]:
    """Round r runs every proxy for one scenario before the next scenario (drift hits all)."""
    samples: list[Sample] = []
    for rnd in range(args.rounds):
        for scenario in args.scenarios:
            shift = rnd % len(names)  # rotate the order too: no proxy always goes first
            for name in names[shift:] + names[:shift]:
                if scenario == "idle" and name != report.DIRECT:
                    slots[name].fresh()
                ep = Endpoint(name) if name == report.DIRECT else slots[name].endpoint()
                if isinstance(ep, str):
                    continue
                try:
                    got = run_one(harness, args, scenario, ep, rnd)
                except Exception as exc:  # a broken run is a result, not a crash
                    got = [Sample(rnd, scenario, "?", name, error=f"{type(exc).__name__}: {exc}")]
                samples.extend(got)
                for sample in got:
                    shown = ", ".join(
                        f"{key} {report.fmt(value)}"
                        for key, value in list(sample.metrics.items())[:2]
                    )
                    print(
                        f"bench: round {rnd + 1}/{args.rounds} {scenario} {sample.case} {name}: "
                        f"{shown or sample.error}",
                        file=sys.stderr,
                        flush=True,
                    )
    return samples


def main(argv: list[str] | None = None) -> int:
    """Start targets and proxies, run rounds x scenarios x proxies, print the table."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    raise_nofile()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks
    workers = args.client_procs or max(max(args.streams), min(args.concurrency, 8), 1)
    started = time.monotonic()
    slots: dict[str, Slot] = {}
    names = ([] if args.no_direct else [report.DIRECT]) + args.proxies
    with tempfile.TemporaryDirectory(prefix="socks5d-bench-") as tmp:
        harness = Harness(workers, pin=args.pin)
        finished = False
        try:
            harness.start_targets()
            for name in args.proxies:
                slots[name] = slot = Slot(args.specs[name], Path(tmp), harness.target("echo"))
                slot.start()
                status = slot.unavailable or f"pid {slot.running.pid if slot.running else '?'}"
                print(f"bench: {name}: {status}", file=sys.stderr, flush=True)
            samples = run_rounds(harness, args, slots, names)
            finished = True
        finally:
            for slot in slots.values():
                slot.stop()
            harness.close(interrupted=not finished)
            proxies.stop_all()
    meta = metadata(args, argv, slots)
    meta["notes"] = [f"{n}: {note}" for n, slot in slots.items() for note in slot.notes]
    meta["stops"] = {name: slot.stops for name, slot in slots.items()}
    meta["logs"] = {
        name: {"lines": len(slot.log), "last": slot.log[-3:]} for name, slot in slots.items()
    }
    meta["seconds"] = round(time.monotonic() - started, 1)
    print(render(meta, samples, names))
    if args.json:
        document = {"meta": meta, "samples": [dataclasses.asdict(s) for s in samples]}
        args.json.write_text(json.dumps(document, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("bench: interrupted; every process it started is stopped", file=sys.stderr)
        sys.exit(130)
