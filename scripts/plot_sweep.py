#!/usr/bin/env python
"""Chart U, D and H against a swept value from a forgetting report whose runs are named
<method>-<value> (as scripts/sweep_depth.sh and sweep_ratio.sh name them).

    python scripts/plot_sweep.py REPORT_DIR --xlabel "tuned decoder layers" --out sweep.png
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import yaml


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("report", type=Path)
    ap.add_argument("--xlabel", required=True)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    rows = yaml.safe_load((a.report / "report.yaml").read_text())["rows"]
    series: dict[str, list[tuple[float, dict]]] = {}
    base = rows[0]
    for r in rows[1:]:
        m = re.fullmatch(r"(.+)-([0-9.]+)", r["model"])
        if m:
            series.setdefault(m.group(1), []).append((float(m.group(2)), r))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8), dpi=120)
    for ax, key in zip(axes, ("U", "D", "H")):
        for method, pts in sorted(series.items()):
            pts.sort(key=lambda p: p[0])
            ax.plot([p[0] for p in pts], [p[1][key] for p in pts], marker="o", label=method)
        ax.axhline(base[key], color="grey", ls="--", lw=1, label="base")
        ax.set_xlabel(a.xlabel)
        ax.set_title(key)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(a.out)
    print(a.out)
    for method, pts in sorted(series.items()):
        for x, r in pts:
            print(f"{method}\t{x:g}\tU {r['U']:.2f}\tD {r['D']:.2f}\tH {r['H']:.2f}")


if __name__ == "__main__":
    main()
