"""CPU time and memory of a system under test, read from /proc.

A system is measured as a process tree: its root process and every live descendant (nginx's
master and its worker, the threads of Envoy or pymesh are inside one process), or as several
trees summed (the two sidecars of the `pymesh-mtls` pair). CPU is
user + system time from `/proc/PID/stat`; memory is `VmRSS` (now) and `VmHWM` (the peak
resident set since the process started) from `/proc/PID/status`, each summed over the tree.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
PROC = Path("/proc")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: fields start after the last ')'.
    return text.rsplit(")", 1)[1].split()


def process_tree(*roots: int) -> list[int]:
    """`roots` and their live descendants (found through the parent pid of every process), once each."""
    children: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    tree: list[int] = []
    todo = list(roots)
    while todo:
        pid = todo.pop()
        if pid not in tree and (PROC / str(pid)).exists():
            tree.append(pid)
            todo.extend(children.get(pid, []))
    return tree


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds consumed so far by `pids` (all their threads)."""
    total = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields:
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / CLK_TCK


@dataclass
class Memory:
    """Resident memory of a process tree, KiB, summed over its processes."""

    rss_kib: int
    peak_kib: int  # sum of each process's VmHWM
    processes: int
    # RssAnon: the heap and stacks the processes hold privately, which is RSS without the
    # code and other file pages they map (shared with every process mapping the same file).
    anon_kib: int = 0


def memory(pids: list[int]) -> Memory:
    rss = peak = anon = count = 0
    for pid in pids:
        try:
            status = (PROC / str(pid) / "status").read_text()
        except OSError:
            continue
        count += 1
        for line in status.splitlines():
            key, _, rest = line.partition(":")
            if key == "VmRSS":
                rss += int(rest.split()[0])
            elif key == "VmHWM":
                peak += int(rest.split()[0])
            elif key == "RssAnon":
                anon += int(rest.split()[0])
    return Memory(rss, peak, count, anon)


class TreeSampler:
    """CPU of the process trees under `roots` between `start()` and `stop()`, summed, counting
    processes that come and go in between only while they are seen (nginx keeps its worker
    for the whole run)."""

    def __init__(self, *roots: int) -> None:
        self.roots = roots
        self._before = 0.0

    def start(self) -> None:
        self._before = cpu_seconds(process_tree(*self.roots))

    def stop(self) -> float:
        return max(0.0, cpu_seconds(process_tree(*self.roots)) - self._before)

    def memory(self) -> Memory:
        return memory(process_tree(*self.roots))
