"""CPU accounting from /proc, so every result says who was busy: broker, generator or others."""

from __future__ import annotations

import os
from collections.abc import Iterable

TICK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode(errors="replace")
    except OSError:
        return None
    # comm (field 2) may contain spaces and parentheses; the rest starts after the last ')'.
    return raw[raw.rfind(")") + 2 :].split()


def cpu_seconds(pids: Iterable[int]) -> float:
    """utime + stime of the given live processes, in seconds."""
    total = 0
    for pid in pids:
        f = _stat_fields(pid)
        if f:
            total += int(f[11]) + int(f[12])
    return total / TICK


def session_pids(sid: int) -> list[int]:
    """Every live process in session ``sid``: a broker started in its own session, including
    any wrapper shell or worker processes it forks."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            f = _stat_fields(int(entry))
            if f and int(f[3]) == sid:
                pids.append(int(entry))
    return pids


def session_cpu_seconds(sid: int) -> float:
    return cpu_seconds(session_pids(sid))


def runnable_seconds(pids: Iterable[int]) -> float:
    """Time the processes' threads spent running or waiting for a CPU (/proc/*/schedstat).

    A broker that was runnable for the whole window never waited for the load generator: it
    was the bottleneck even when other jobs on the host kept it from running all the time.
    """
    total = 0
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    run_ns, wait_ns, _ = f.read().split()
            except (OSError, ValueError):
                continue
            total += int(run_ns) + int(wait_ns)
    return total / 1e9


def host_busy_seconds() -> float:
    """Busy CPU seconds summed over all cores (everything except idle and iowait)."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:9]]
    return (sum(values) - values[3] - values[4]) / TICK
