"""Reading /proc: a process tree's CPU time, memory, threads, and CPU affinity.

/proc is the steadiest figure on a shared machine: CPU seconds do not depend on what else
runs, unlike wall time. Linux only; every reader tolerates a process vanishing mid-read.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (which may hold spaces or parens)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2 :].split()


def _all_parents() -> dict[int, int]:
    parents: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None:
                parents[int(entry.name)] = int(fields[1])
    return parents


def tree_pids(root: int) -> list[int]:
    """The root and all its living descendants (forking proxies and Dante are trees)."""
    parents = _all_parents()
    if root not in parents:
        return []
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    found: list[int] = []
    queue = [root]
    while queue and len(found) < 1_000_000:
        pid = queue.pop()
        found.append(pid)
        queue.extend(children.get(pid, ()))
    return found


def start_time(pid: int) -> int | None:
    """Start time in ticks since boot: with the PID, names a process unambiguously."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


def tree_cpu_seconds(root: int) -> float:
    """utime+stime of every process in the tree, plus the reaped children's (cutime+cstime).

    A child that exited and was waited for moves its time into its parent's cutime, so the
    sum stays monotonic across forked children that come and go during a run.
    """
    ticks = 0
    for pid in tree_pids(root):
        fields = _stat_fields(pid)
        if fields:
            ticks += sum(int(value) for value in fields[11:15])
    return ticks / CLOCK_TICKS


def pids_cpu_seconds(pids: list[int]) -> float:
    """utime+stime (+ reaped children) of the given processes, each on its own."""
    ticks = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields:
            ticks += sum(int(value) for value in fields[11:15])
    return ticks / CLOCK_TICKS


@dataclass(frozen=True, slots=True)
class TreeMemory:
    """Memory of a process tree: RSS double-counts shared pages; PSS splits them fairly."""

    rss_kib: int
    pss_kib: int
    threads: int
    processes: int


def tree_memory(root: int) -> TreeMemory:
    """Sum Rss and Pss from smaps_rollup, and Threads from status, over the tree."""
    rss = pss = threads = processes = 0
    for pid in tree_pids(root):
        try:
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        processes += 1
        for line in rollup.splitlines():
            if line.startswith("Rss:"):
                rss += int(line.split()[1])
            elif line.startswith("Pss:"):
                pss += int(line.split()[1])
        for line in status.splitlines():
            if line.startswith("Threads:"):
                threads += int(line.split()[1])
    return TreeMemory(rss, pss, threads, processes)


def tcp_connections(port: int) -> int:
    """TCP connections to or from ``port`` on loopback that are not listening or in TIME_WAIT:
    zero once every tunnel through a proxy on that port has closed on the proxy's side."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                local, remote, state = fields[1], fields[2], fields[3]
                ports = {int(local.rsplit(":", 1)[1], 16), int(remote.rsplit(":", 1)[1], 16)}
                if port in ports and state not in ("0A", "06"):  # LISTEN, TIME_WAIT
                    count += 1
    return count


def set_tree_affinity(root: int, cpus: set[int]) -> None:
    """Pin every thread of the tree; threads and children created later inherit it."""
    for pid in tree_pids(root):
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(int(tid), cpus)


def cpu_model() -> str:
    """The 'model name' line of /proc/cpuinfo (what the figures were measured on)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"
