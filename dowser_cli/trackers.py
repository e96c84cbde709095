"""Experiment trackers for `dowser finetune --report-to` (as the Trainer's ``report_to``): per step the
loss, lr, tokens/s, gradient norm and memory. One registry entry per tracker; the tracker's library
is imported only when it is chosen."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from dowser_cli.errors import UserError
from dowser_cli.methods.registry import Registry


class Tracker:
    """Nothing logged (``--report-to none``)."""

    def log(self, step: int, values: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoard(Tracker):
    """Event files under ``logdir`` (``tensorboard --logdir RUN/logs``)."""

    def __init__(self, logdir: Path, config: dict[str, Any]):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("--report-to tensorboard: the tensorboard package is not installed "
                            "(pip install tensorboard)") from None
        self.writer = SummaryWriter(log_dir=str(logdir))
        self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in sorted(config.items())))

    def log(self, step: int, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.writer.add_scalar(f"train/{k}", v, step)

    def close(self) -> None:
        self.writer.close()


class WandB(Tracker):
    """A wandb run in ``logdir`` (WANDB_MODE=offline works with no network; `wandb sync` uploads it
    later). Project from WANDB_PROJECT (default "dowser")."""

    def __init__(self, logdir: Path, config: dict[str, Any]):
        try:
            import wandb
        except ImportError:
            raise UserError("--report-to wandb: the wandb package is not installed (pip install wandb)") from None
        logdir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "dowser"), dir=str(logdir), config=config)

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log({f"train/{k}": v for k, v in values.items()}, step=step)

    def close(self) -> None:
        self.run.finish()


TRACKERS: Registry[Callable[[Path, dict], Tracker]] = Registry("tracker")
TRACKERS.register("none", lambda logdir, config: Tracker())
TRACKERS.register("tensorboard", TensorBoard)
TRACKERS.register("wandb", WandB)


def open_tracker(name: str, logdir: Path, config: dict[str, Any]) -> Tracker:
    return TRACKERS.get(name, "--report-to")(logdir, config)
