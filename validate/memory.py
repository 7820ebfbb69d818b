"""Private memory of a process tree, sampled while it runs.

Private (anonymous) memory is what a stage really costs: weights mapped from files are page cache
the kernel can drop and share, so they are left out (RssFile), while a copy of a weight in a
heap buffer counts (RssAnon). Linux only (/proc)."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path


def _status_kb(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _children(pid: int) -> list[int]:
    out = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:             # the process is gone
        return out
    for task in tasks:
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            pass
    return out


def tree_rss_anon(pid: int) -> int:
    """Bytes of RssAnon summed over `pid` and all its descendants."""
    total, stack, seen = 0, [pid], set()
    while stack:
        p = stack.pop()
        if p in seen:
            continue
        seen.add(p)
        total += _status_kb(p, "RssAnon") * 1024
        stack += _children(p)
    return total


class PeakSampler:
    """Samples `tree_rss_anon(pid)` every `interval` seconds on a thread; `.peak` in bytes."""

    def __init__(self, pid: int, interval: float = 0.02):
        self.pid, self.interval, self.peak = pid, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss_anon(self.pid))
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def run_sampled(cmd: list[str], env: dict | None = None, timeout: float | None = None,
                interval: float = 0.02) -> tuple[subprocess.CompletedProcess, int, float]:
    """Run `cmd`, sampling its tree's private memory -> (completed process, peak RssAnon bytes,
    wall seconds)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, **(env or {})})
    with PeakSampler(p.pid, interval) as s:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
            raise
    return subprocess.CompletedProcess(cmd, p.returncode, out, err), s.peak, time.perf_counter() - t0
