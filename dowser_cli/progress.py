"""Progress and tables on stderr (stdout is for data)."""
from __future__ import annotations

import os

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def stderr_console(quiet: bool = False) -> Console:
    """``quiet``: e.g. ranks other than 0 under a launcher, so that one progress bar shows."""
    return Console(stderr=True, quiet=quiet or bool(os.environ.get("DOWSER_QUIET")))


def progress_bar(console: Console) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=console, transient=False)
