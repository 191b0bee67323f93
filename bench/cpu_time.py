"""CPU seconds that processes have used, read from /proc (Linux).

Latency on a shared 2-core VM swings by 2x from one minute to the next (other tenants, clock
changes); the CPU time a server spends per request moves far less, and tells how many requests a
core can serve. The benchmarks report both.
"""

from __future__ import annotations

import os
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (which may hold spaces)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # gone, or not Linux
        return None
    return text.rpartition(")")[2].split()


def _processes() -> dict[int, tuple[int, str]]:
    """{pid: (parent pid, command name)} of every process."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            try:
                name = (entry / "comm").read_text().strip()
            except OSError:
                continue
            if fields is not None:
                found[int(entry.name)] = (int(fields[1]), name)
    return found


def _seconds(pid: int) -> float:
    fields = _stat(pid)
    return 0.0 if fields is None else (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of `pid` and every live descendant (uvicorn's workers)."""
    processes = _processes()
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        children = [child for child, (ppid, _) in processes.items() if ppid == parent and child not in tree]
        tree.update(children)
        frontier.extend(children)
    return sum(_seconds(p) for p in tree)


def named_cpu_seconds(name: str) -> float:
    """User + system CPU seconds of every live process called `name` (e.g. "postgres")."""
    return sum(_seconds(pid) for pid, (_, comm) in _processes().items() if comm == name)
