"""
CPU time and memory of a server's processes, read from /proc.

A server is the set of processes in one session (the session id is the pid of
its leader: the Postfix master, or the command the harness started in a new
session).  CPU time is the user and system time of every live process plus
the time its exited, reaped children used (cutime and cstime of proc(5)), so
a difference of two snapshots counts the processes that came and went in
between as long as they were reaped inside the session.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
# How often the memory sampler looks; 0.2 s keeps its own cost small.
SAMPLE_INTERVAL = 0.2


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: split after the last.
    return text.rsplit(")", 1)[1].split()


def session_pids(session: int) -> list[int]:
    """The live (not zombie) processes whose session id is ``session``."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        fields = _stat_fields(int(name))
        # proc(5): fields[0] is the state, fields[3] the session id.
        if fields is not None and fields[0] != "Z" and int(fields[3]) == session:
            found.append(int(name))
    return found


def cpu_seconds(session: int) -> float:
    """User plus system CPU of a session, its reaped children included."""
    ticks = 0
    for pid in session_pids(session):
        fields = _stat_fields(pid)
        if fields is None:
            continue
        # proc(5) fields 14 to 17 (utime, stime, cutime, cstime) sit at
        # offsets 11 to 14 once pid and comm are split off.
        ticks += sum(int(value) for value in fields[11:15])
    return ticks / CLOCK_TICKS


def _kib_field(path: Path, name: str) -> int:
    try:
        with path.open() as lines:
            for line in lines:
                if line.startswith(name):
                    return int(line.split()[1])
    except OSError:
        return 0
    return 0


@dataclass
class Memory:
    """Peak memory of a session over a run, in KiB."""

    # The largest sum of RSS over the session's processes in one sample, or
    # the largest single VmHWM if that is larger (a peak between samples).
    rss_peak: int = 0
    # The largest sum of PSS (shared pages split among their users).
    pss_peak: int = 0
    samples: int = 0


def sample_memory(session: int, memory: Memory) -> None:
    """Take one sample of the session's memory into ``memory``."""
    rss = pss = hwm = 0
    for pid in session_pids(session):
        status = Path(f"/proc/{pid}/status")
        rss += _kib_field(status, "VmRSS:")
        hwm = max(hwm, _kib_field(status, "VmHWM:"))
        pss += _kib_field(Path(f"/proc/{pid}/smaps_rollup"), "Pss:")
    memory.rss_peak = max(memory.rss_peak, rss, hwm)
    memory.pss_peak = max(memory.pss_peak, pss)
    memory.samples += 1


class MemorySampler:
    """Samples a session's memory in a thread until stopped."""

    def __init__(self, session: int, interval: float = SAMPLE_INTERVAL) -> None:
        self.session = session
        self.interval = interval
        self.memory = Memory()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        # Bounded by stop(): the harness always calls it when the run ends.
        while not self._stop.is_set():
            sample_memory(self.session, self.memory)
            self._stop.wait(self.interval)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        sample_memory(self.session, self.memory)
