"""Thread count under load: one intra-op thread while other processes keep the cores busy.

torch and the native kernels run many short OpenMP parallel regions. On a quiet machine every
thread has its core and the regions are cheap. When another process occupies a core, the thread
that shares it is descheduled for a whole time slice while the others spin at the region's
barrier: on the 2-core development VM a streaming call then fell from ~33,000 to 7,000-12,000
tokens/s (~900 with two busy processes), where one thread keeps ~20,000. A passive OpenMP wait policy helps too, but it costs ~10 % of a
training step on a quiet machine and must be set before torch loads (docs/BENCHMARKS.md).

`AdaptiveThreads` watches how many cores *other* processes used since its last look (from
/proc/stat, minus this process's own CPU time) and sets torch's intra-op thread count to the
cores left, at least one; the native kernels follow torch's count. It is opt-in for library
users (`enable()`), on in the `fwpkm` command. `tick()` is called by `memory_step`; it looks at
most every `interval` seconds, so its cost (one read of /proc/stat) does not show.
"""
from __future__ import annotations

import os
import threading
import time
from typing import Optional

import torch

_CLK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _busy_seconds() -> Optional[float]:
    """CPU seconds all processes spent busy since boot (None where /proc/stat is missing)."""
    try:
        with open("/proc/stat") as f:
            parts = f.readline().split()
    except OSError:
        return None
    if not parts or parts[0] != "cpu":
        return None
    vals = [int(x) for x in parts[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
    return (sum(vals[:8]) - idle) / _CLK  # user nice system idle iowait irq softirq steal


class AdaptiveThreads:
    """Sets torch's intra-op threads to the cores other processes leave free (at least 1)."""

    def __init__(self, max_threads: Optional[int] = None, interval: float = 0.5, margin: float = 0.3):
        if max_threads is not None and (isinstance(max_threads, bool) or not isinstance(max_threads, int)
                                        or max_threads < 1):
            raise ValueError(f"max_threads: expected a positive int or None, got {max_threads!r}")
        self.max_threads = max_threads or torch.get_num_threads()
        self.interval, self.margin = float(interval), float(margin)
        self._last = None
        self._lock = threading.Lock()
        self.others = 0.0  # cores used by other processes at the last look

    def tick(self) -> int:
        """Look (when `interval` has passed) and set the thread count; returns it."""
        now = time.monotonic()
        with self._lock:
            if self._last is not None and now - self._last[0] < self.interval:
                return torch.get_num_threads()
            busy, own = _busy_seconds(), time.process_time()
            if busy is None:
                return torch.get_num_threads()
            if self._last is not None:
                dt = now - self._last[0]
                self.others = max(0.0, (busy - self._last[1]) - (own - self._last[2])) / dt
            self._last = (now, busy, own)
            cores = os.cpu_count() or 1
            free = cores - int(self.others + self.margin)
            want = max(1, min(self.max_threads, free))
            if want != torch.get_num_threads():
                torch.set_num_threads(want)
            return want


_active: Optional[AdaptiveThreads] = None


def enable(max_threads: Optional[int] = None, interval: float = 0.5) -> AdaptiveThreads:
    """Turn the adaptive thread count on for this process (memory_step calls `tick`)."""
    global _active
    _active = AdaptiveThreads(max_threads, interval)
    _active.tick()
    return _active


def disable() -> None:
    """Turn it off and restore the thread count it started from."""
    global _active
    if _active is not None:
        torch.set_num_threads(_active.max_threads)
    _active = None


def tick() -> None:
    if _active is not None:
        _active.tick()
