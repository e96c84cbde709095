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
