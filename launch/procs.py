"""Process trees: everything a launcher started, found and killed at once.

torchrun starts its workers in their own sessions, so a process-group kill does not reach them; these walk
/proc instead (Linux). Used by the chaos benchmark and the tests' torchrun helpers and leftover reaper."""
from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path


def descendants(pid: int) -> list[int]:
    """All live descendants of pid, children before their own children."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_pids(pids: list[int]) -> list[int]:
    """SIGKILL each pid (one that already exited is skipped); returns the pids."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:  # exited between listing and killing: nothing to do
            continue
    return pids


def kill_tree(proc: subprocess.Popen) -> list[int]:
    """SIGKILL a launcher (torchrun) and every process it started, at once, as a node failure would; waits for
    the launcher and returns the pids it killed (the launcher's first)."""
    victims = kill_pids([proc.pid] + descendants(proc.pid))
    proc.wait()
    return victims
