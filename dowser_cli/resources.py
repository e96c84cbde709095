"""Peak memory figures recorded in every artifact's YAML."""
from __future__ import annotations

import os
import resource
import threading

import torch


def peak_host_mb() -> float:
    """Peak resident set size of this process so far, MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_memory(device: str) -> dict[str, float]:
    peak = {"host_rss_mb": round(peak_host_mb(), 1)}
    if device.startswith("cuda"):
        peak["device_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return peak


class PeakRSS:
    """Peak resident memory of this process while the block runs, sampled every ``interval`` s from
    /proc (ru_maxrss cannot be reset, so it would report model loading instead of the training step).
    ``peak_mb`` and ``start_mb`` after the block; 0 where /proc is missing."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak_mb, self.start_mb = interval, 0.0, 0.0

    @staticmethod
    def current_mb() -> float:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        except OSError:
            return 0.0

    def _poll(self):
        while not self._stop.wait(self.interval):
            self.peak_mb = max(self.peak_mb, self.current_mb())

    def __enter__(self):
        self.start_mb = self.peak_mb = self.current_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, self.current_mb())
