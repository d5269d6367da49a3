"""Peak resident memory and CPU time of process trees, and how busy the machine's cores
were, sampled with psutil and /proc/stat in a background thread."""

from __future__ import annotations

import bisect
import os
import threading
import time
from pathlib import Path
from types import TracebackType

import psutil

MB = 1024 * 1024
INTERVAL_S = 0.05


def machine_busy_s() -> float:
    """CPU seconds every core of this machine has been busy since boot (/proc/stat: all but
    idle and iowait), whoever used them: the worker, aggregator, PostgreSQL, Redis, clients."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    ticks = [int(value) for value in fields]
    idle = ticks[3] + ticks[4]
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _tree(pid: int) -> list[psutil.Process]:
    """Process `pid` and its descendants; empty once it has ended."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def trees_cpu_s(roots: dict[str, int]) -> dict[str, float]:
    """CPU seconds (user + system) each role's process tree has used so far, summed over its
    live processes: between two calls, what a long-lived tree (a worker, PostgreSQL) used."""
    used = dict.fromkeys(roots, 0.0)
    for role, pid in roots.items():
        for process in _tree(pid):
            try:
                times = process.cpu_times()
            except psutil.NoSuchProcess:
                continue
            used[role] += times.user + times.system
    return used


class PeakRss:
    """Samples the RSS and CPU time of each watched process and of its children (e.g. Celery's
    pool, PostgreSQL's backends) every `interval` s while in use as a context manager."""

    def __init__(self, roots: dict[str, int], interval: float = INTERVAL_S) -> None:
        self.roots = roots
        self.interval = interval
        # role -> pid -> peak bytes of that one process
        self.process_peak: dict[str, dict[int, int]] = {role: {} for role in roots}
        # role -> peak bytes of the whole tree at one instant
        self.tree_peak: dict[str, int] = dict.fromkeys(roots, 0)
        # role -> pid -> (CPU s at its first sample, at its last): a process that lives
        # between two samples is missed, one that ends loses its last interval.
        self.process_cpu: dict[str, dict[int, tuple[float, float]]] = {role: {} for role in roots}
        # (time.perf_counter(), machine_busy_s()) at each sample.
        self.busy: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peak-rss", daemon=True)

    def _sample(self) -> None:
        self.busy.append((time.perf_counter(), machine_busy_s()))
        for role, pid in self.roots.items():
            total = 0
            for process in _tree(pid):
                try:
                    rss = process.memory_info().rss
                    times = process.cpu_times()
                except psutil.NoSuchProcess:
                    continue
                cpu = times.user + times.system
                first, _ = self.process_cpu[role].get(process.pid, (cpu, cpu))
                self.process_cpu[role][process.pid] = (first, cpu)
                total += rss
                peaks = self.process_peak[role]
                peaks[process.pid] = max(peaks.get(process.pid, 0), rss)
            self.tree_peak[role] = max(self.tree_peak[role], total)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()

    def peak_mb(self, role: str) -> float:
        """The largest single process of `role`'s tree (its main process or one pool child)."""
        return max(self.process_peak[role].values(), default=0) / MB

    def peaks_mb(self, role: str) -> list[float]:
        """Every process of `role`'s tree, main process first."""
        return [rss / MB for rss in self.process_peak[role].values()]

    def cpu_s(self, role: str) -> float:
        """CPU seconds (user + system) `role`'s tree used while watched."""
        return sum(last - first for first, last in self.process_cpu[role].values())

    def cores_busy(self, start: float, end: float) -> float | None:
        """The share of the machine's cores busy from `start` to `end` (`time.perf_counter()`
        values), from the samples nearest inside; None with fewer than two there."""
        times = [t for t, _ in self.busy]
        first, last = bisect.bisect_left(times, start), bisect.bisect_right(times, end) - 1
        if last <= first:
            return None
        (t0, busy0), (t1, busy1) = self.busy[first], self.busy[last]
        return (busy1 - busy0) / (os.cpu_count() or 1) / (t1 - t0)

    def tree_mb(self, role: str) -> float:
        return self.tree_peak[role] / MB
