"""Helpers every stage shares at run time: where and in what dtype to compute, the seed of a step,
and stop requests (Ctrl-C / SIGTERM) that end a loop at a safe point."""
from __future__ import annotations

import os
import signal
import sys
import time

import torch
import torch.distributed as dist

from dowser_cli.errors import UserError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine")
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: expected auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def step_seed(seed: int, step: int) -> int:
    """The seed of one step (an epoch's data order, a step's dropout): it depends only on the run's
    seed and the step, so a resumed run draws what an uninterrupted one drew."""
    return seed * 1_000_003 + step


class StopRequests:
    """What Ctrl-C / SIGTERM do inside a loop that can stop cleanly. ``first="stop"``: the first request
    asks the loop to stop at its next safe point (after the current optimiser step, or round of probe
    batches: an update cut in half, or ranks left waiting in a collective, would be worse); the loop
    reads ``requested``. ``first="interrupt"``: KeyboardInterrupt at once, for a loop whose work since
    its last saved state can simply be dropped (one process's probe batch). ``second``: what a second
    request does, "abort" (KeyboardInterrupt at once, no checkpoint) or "ignore"; within ``grace_s`` of
    the first it counts as the same request (a launcher passes on the terminal's Ctrl-C that the ranks
    already got). ``message`` is printed once, on rank 0."""

    def __init__(self, second: str = "abort", grace_s: float = 0.0, message: str = "", first: str = "stop"):
        self.requested = False
        self.first, self.second, self.grace_s, self.message, self._first = first, second, grace_s, message, 0.0

    def _handler(self, signum, frame):
        if self.first == "interrupt":
            raise KeyboardInterrupt
        if self.requested:
            if self.second == "ignore" or time.monotonic() - self._first < self.grace_s:
                return
            raise KeyboardInterrupt
        self.requested, self._first = True, time.monotonic()
        if self.message and os.environ.get("RANK", "0") in ("", "0"):  # under a launcher, rank 0 speaks for all
            print(self.message, file=sys.stderr)

    def __enter__(self):
        self._old = {s: signal.signal(s, self._handler) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def world_size() -> int:
    """Ranks of the initialised process group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
