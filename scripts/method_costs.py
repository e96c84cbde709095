"""What each method cost, from the run directories' run.yaml: trainable entries, optimiser and
method state, peak memory of the fine-tuning steps (or of the merge), step time, delta size.

    python scripts/method_costs.py RUN_DIR...        (a markdown table on stdout)
"""
from __future__ import annotations

import sys
from pathlib import Path

import yaml


def row(run: Path) -> list[str]:
    side = yaml.safe_load((run / "run.yaml").read_text())
    mb = lambda b: f"{b / 2**20:.1f}" if b is not None else "-"  # noqa: E731
    peak = side.get("peak_memory", {})
    opt = side.get("optimizer", {})
    if "merge" in side:  # post-hoc: no training of its own; its cost is the merge process
        train_peak, extra = "-", f"merge peak RSS {peak.get('host_rss_mb', '-')} MB"
    else:
        train_peak = f"{peak.get('train_rss_mb', '-')}"
        extra = f"+{peak['train_rss_mb'] - peak['pre_train_rss_mb']:.0f} MB over the loaded model" \
            if "pre_train_rss_mb" in peak else ""
        if "device_mb" in peak:
            extra = f"device peak {peak['device_mb']} MB"
    trainable = side.get("trainable", {}).get("trainable_entries")
    return [run.name, side.get("method", "?"), f"{trainable:,}" if trainable else "-",
            mb(opt.get("state_bytes")), mb(opt.get("method_state_bytes")), train_peak, extra,
            f"{side['mean_step_s']:.2f}" if "mean_step_s" in side else "-",
            mb(side.get("outputs", {}).get("delta", {}).get("bytes"))]


def main(runs: list[str]) -> None:
    head = ["run", "method", "trainable entries", "optimiser state MB", "method state MB",
            "peak RSS in training MB", "note", "step s", "delta MB"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in runs:
        print("| " + " | ".join(row(Path(r))) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
