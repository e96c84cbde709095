#!/usr/bin/env python
"""Chart U, D, H and drift against a swept value from a forgetting report whose runs are named
<method>-<value> or <method>-<value>-s<seed> (as scripts/sweep_depth.sh and sweep_ratio.sh name them),
with ± one standard deviation over seeds as error bars; prints the table of means.

    python scripts/plot_sweep.py REPORT_DIR --xlabel "tuned decoder layers" --out sweep.png
"""
from __future__ import annotations

import argparse
import re
import statistics
from pathlib import Path

import yaml

KEYS = ("U", "D", "H", "drift")


def series(rows: list[dict]) -> dict[str, dict[float, list[dict]]]:
    out: dict[str, dict[float, list[dict]]] = {}
    for r in rows[1:]:
        m = re.fullmatch(r"(.+)-([0-9.]+)(?:-s\d+)?", r["model"])
        if m:
            out.setdefault(m.group(1), {}).setdefault(float(m.group(2)), []).append(r)
    return out


def stat(runs: list[dict], key: str) -> tuple[float, float, int]:
    vals = [r[key] for r in runs if key in r]
    if not vals:
        return float("nan"), 0.0, 0
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0, len(vals)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("report", type=Path)
    ap.add_argument("--xlabel", required=True)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    rows = yaml.safe_load((a.report / "report.yaml").read_text())["rows"]
    base, ser = rows[0], series(rows)
    keys = [k for k in KEYS if k in base]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.8), dpi=120)
    for ax, key in zip(axes, keys):
        for method, pts in sorted(ser.items()):
            xs = sorted(pts)
            st = [stat(pts[x], key) for x in xs]
            ax.errorbar(xs, [s[0] for s in st], yerr=[s[1] for s in st], marker="o", capsize=3, label=method)
        ax.axhline(base[key], color="grey", ls="--", lw=1, label="base")
        ax.set_xlabel(a.xlabel)
        ax.set_xscale("log") if all(x > 0 for p in ser.values() for x in p) and \
            max(x for p in ser.values() for x in p) / min(x for p in ser.values() for x in p) > 20 else None
        ax.set_title(key + (" (KL to the base)" if key == "drift" else ""))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(a.out)
    print(f"chart: {a.out}")
    print()
    print("| method | x | seeds | " + " | ".join(f"{k} mean ± sd" for k in keys) + " |")
    print("|" + "---|" * (3 + len(keys)))
    for method, pts in sorted(ser.items()):
        for x in sorted(pts):
            cells = []
            for k in keys:
                m, sd, n = stat(pts[x], k)
                cells.append(f"{m:.4f} ± {sd:.4f}" if k == "drift" else f"{m:.2f} ± {sd:.2f}")
            print(f"| {method} | {x:g} | {len(pts[x])} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
