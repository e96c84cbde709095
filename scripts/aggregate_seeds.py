#!/usr/bin/env python
"""Mean and spread over seeds from a forgetting report whose runs are named <method>-s<seed>
(as scripts/compare_methods.sh names them), and a chart of U against D with error bars.

    python scripts/aggregate_seeds.py REPORT_DIR [--out chart.png]     (a markdown table on stdout)

Per method: D, U, H, ΔU and drift as mean ± sample standard deviation over its seeds, the range
[min, max], and the mean half-width of the per-run 95 % bootstrap intervals (item noise within one run;
the seeds' spread is the training noise across runs). When the report was made with
`eval-forgetting --reference METHOD`, a last column gives each method's ΔU against it, paired and pooled
over seeds, with its paired bootstrap interval. Snapshots (RUN@STEP) are left out: the runs' ends only. The chart's error bars are ± one standard
deviation over seeds (a method run with one seed: its 95 % bootstrap interval); the base is a star with
its bootstrap interval."""
from __future__ import annotations

import argparse
import re
import statistics
from pathlib import Path

import yaml

KEYS = ("D", "U", "H", "dU", "drift")


def groups(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in rows[1:]:
        if "@" in r["model"]:   # a snapshot: curves are in the report itself
            continue
        m = re.fullmatch(r"(.+)-s(\d+)", r["model"])
        out.setdefault(m.group(1) if m else r["model"], []).append(r)
    return out


def summary(runs: list[dict], key: str) -> dict | None:
    vals = [r[key] for r in runs if key in r]
    if not vals:
        return None
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    ci = [r.get("ci95", {}).get(key) for r in runs]
    half = [(c[1] - c[0]) / 2 for c in ci if c]
    return {"mean": statistics.fmean(vals), "sd": sd, "min": min(vals), "max": max(vals),
            "ci_half": statistics.fmean(half) if half else None, "n": len(vals)}


def fmt(s: dict | None, signed: bool = False, drift: bool = False) -> str:
    if s is None:
        return "-"
    f = "+.2f" if signed else ".2f"
    if drift:   # nats
        return f"{s['mean']:.4f} ± {s['sd']:.4f} [{s['min']:.4f}, {s['max']:.4f}]"
    ci = f" (±{s['ci_half']:.1f})" if s["ci_half"] is not None else ""
    return f"{s['mean']:{f}} ± {s['sd']:.2f} [{s['min']:{f}}, {s['max']:{f}}]{ci}"


def vs_reference(paired: dict, method: str, runs: list[dict]) -> str:
    """The pooled paired ΔU of ``method`` against the reference at its runs' last step."""
    if method == paired["reference"]:
        return "(reference)"
    step = runs[0].get("step")
    hit = next((p for p in paired["pooled"] if p["group"] == method and p["step"] == step), None)
    if hit is None:
        return "-"
    lo, hi = hit["ci95"]["dU"]
    return f"{hit['dU']:+.2f} [{lo:+.2f}, {hi:+.2f}] (seeds {','.join(map(str, hit['seeds']))})"


def per_run(rows: list[dict]) -> None:
    has_drift = any("drift" in r for r in rows)
    head = ["run", "method", "D", "U", "H", "ΔU"] + (["drift (KL)"] if has_drift else [])
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        ci = r.get("ci95", {})

        def cell(key: str, f: str = ".2f") -> str:
            v = r[key]
            return f"{v:{f}} [{ci[key][0]:{f}}, {ci[key][1]:{f}}]" if key in ci else f"{v:{f}}"

        cells = [r["model"], r["method"], cell("D"), cell("U"), cell("H"), cell("dU", "+.2f")]
        if has_drift:
            cells.append(cell("drift", ".4f"))
        print("| " + " | ".join(cells) + " |")
    print()
    print("value [95 % bootstrap interval over the items; ΔU paired with the base]")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("report", type=Path)
    ap.add_argument("--out", type=Path, help="PNG chart of U against D with error bars")
    ap.add_argument("--per-run", action="store_true",
                    help="print instead one line per run: D, U, H, ΔU and drift with their 95 %% intervals")
    a = ap.parse_args()
    report = yaml.safe_load((a.report / "report.yaml").read_text())
    rows = report["rows"]
    paired = report.get("paired")
    if a.per_run:
        per_run(rows)
        return
    base, g = rows[0], groups(rows)
    has_drift = any("drift" in r for r in rows)
    head = ["method", "seeds", "D", "U", "H", "ΔU"] + (["drift (KL)"] if has_drift else []) + \
        ([f"ΔU vs {paired['reference']} (paired, pooled)"] if paired else [])
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    bci = base.get("ci95", {})
    print(f"| {base['model']} | - | {base['D']:.2f} [{bci.get('D', ['-', '-'])[0]}, {bci.get('D', ['-', '-'])[1]}] | "
          f"{base['U']:.2f} [{bci.get('U', ['-', '-'])[0]}, {bci.get('U', ['-', '-'])[1]}] | {base['H']:.2f} | +0.00 |"
          + (" 0 |" if has_drift else "") + (" - |" if paired else ""))
    stats = {}
    for method, runs in g.items():
        stats[method] = {k: summary(runs, k) for k in KEYS}
        s = stats[method]
        cells = [method, str(len(runs)), fmt(s["D"]), fmt(s["U"]), fmt(s["H"]), fmt(s["dU"], signed=True)]
        if has_drift:
            cells.append(fmt(s["drift"], drift=True))
        if paired:
            cells.append(vs_reference(paired, method, runs))
        print("| " + " | ".join(cells) + " |")
    print()
    print("mean ± sd over seeds [min, max] (± mean half-width of the runs' 95 % bootstrap intervals)")
    if a.out:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 5), dpi=120)
        ax.errorbar(base["D"], base["U"], xerr=[[base["D"] - bci["D"][0]], [bci["D"][1] - base["D"]]] if "D" in bci else None,
                    yerr=[[base["U"] - bci["U"][0]], [bci["U"][1] - base["U"]]] if "U" in bci else None,
                    fmt="*", ms=12, color="black", label="base", capsize=3)
        cmap = plt.get_cmap("tab20")
        for k, (method, s) in enumerate(stats.items()):
            if s["D"]["n"] > 1:   # the spread over seeds
                xerr, yerr, how = s["D"]["sd"], s["U"]["sd"], f"n={s['D']['n']}, ± sd"
            else:                 # one seed: its 95 % bootstrap interval
                xerr, yerr, how = s["D"]["ci_half"], s["U"]["ci_half"], "n=1, 95 % interval"
            ax.errorbar(s["D"]["mean"], s["U"]["mean"], xerr=xerr, yerr=yerr, fmt="os^vDP*X"[k % 8], capsize=3,
                        color=cmap(k % 20), label=f"{method} ({how})")
            ax.annotate(method, (s["D"]["mean"], s["U"]["mean"]), textcoords="offset points", xytext=(5, 3),
                        fontsize=7)
        ax.set_xlabel("downstream D (learnt), mean over seeds")
        ax.set_ylabel("upstream U (kept), mean over seeds")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        fig.savefig(a.out)
        print(f"chart: {a.out}")


if __name__ == "__main__":
    main()
