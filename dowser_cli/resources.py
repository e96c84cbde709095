"""Peak memory figures recorded in every artifact's YAML."""
from __future__ import annotations

import resource

import torch


def peak_host_mb() -> float:
    """Peak resident set size of this process so far, MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_memory(device: str) -> dict[str, float]:
    peak = {"host_rss_mb": round(peak_host_mb(), 1)}
    if device.startswith("cuda"):
        peak["device_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return peak



def _proc_status_mb(key: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def host_rss_mb() -> float | None:
    """This process's resident set size now, MiB (None where /proc is missing)."""
    return _proc_status_mb("VmRSS")


def reset_host_peak() -> float | None:
    """Start a new host peak (Linux VmHWM, reset through /proc/self/clear_refs), so that a stage's
    peak shows apart from loading's (ru_maxrss cannot be reset). Returns the RSS now, MiB (None where
    /proc is missing)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return _proc_status_mb("VmRSS")


def host_peak_since_reset_mb() -> float | None:
    """Peak RSS since the last ``reset_host_peak`` (or since start), MiB."""
    return _proc_status_mb("VmHWM")
