"""`dowser inspect`: what an artifact is, what it came from, and a per-layer table."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from dowser_cli import artifacts, scoring
from dowser_cli.errors import UserError

_LAYER = re.compile(r"\.(\d+)\.")


def _layer(name: str) -> str:
    m = _LAYER.search(name)
    return m.group(1) if m else "-"


def _type(name: str) -> str:
    parts = name.split(".")
    return parts[-2] if parts[-1] == "weight" else parts[-1]


def describe(path: Path) -> dict[str, Any]:
    if path.is_dir():
        from dowser_cli.export import describe_run

        return describe_run(path)
    meta = artifacts.read_header(path)
    kind = meta["dowser_kind"]
    side_path = artifacts.sidecar_path(path)
    side = artifacts.read_yaml(side_path) if side_path.exists() else {}
    info: dict[str, Any] = {"path": str(path), "kind": kind, "format_version": meta["format_version"],
                            "tool_version": meta.get("tool_version"), "model_fingerprint": meta.get("model_fingerprint"),
                            "model": side.get("model", {}).get("spec"), "command": side.get("command"),
                            "created": side.get("created"), "inputs": side.get("inputs", {})}
    table: dict[str, dict[str, float]] = {}
    if kind == artifacts.SCORES_KIND:
        info["probes"] = int(meta.get("probes", 0))
        info["metric"] = "mean score"
        if not side:
            raise UserError(f"{path}: needs {side_path.name} beside it for its per-module summaries")
        for name, m in side.get("modules", {}).items():
            table.setdefault(_layer(name), {})[m["type"]] = m["score_mean"]
    elif kind == artifacts.MASK_KIND:
        from dowser_cli.mask import open_mask

        mf = open_mask(path)
        info.update({k: meta.get(k) for k in ("strategy", "ratio", "granularity")})
        info["metric"] = "trainable fraction"
        counts: dict[tuple[str, str], list[int]] = {}
        for name in mf.params:
            c = counts.setdefault((_layer(name), _type(name)), [0, 0])
            c[0] += scoring.popcount(mf.packed(name))
            c[1] += mf.numel(name)
        for (layer, typ), (k, n) in counts.items():
            table.setdefault(layer, {})[typ] = k / n
        total = [sum(c[0] for c in counts.values()), sum(c[1] for c in counts.values())]
        info["totals"] = {"trainable": total[0], "numel": total[1], "fraction": total[0] / max(total[1], 1)}
    else:
        raise UserError(f"{path}: cannot inspect {kind} artifacts yet")
    info["layers"] = dict(sorted(table.items(), key=lambda kv: (kv[0] == "-", int(kv[0]) if kv[0] != "-" else 0)))
    return info


def render(info: dict[str, Any]):
    from rich.console import Group
    from rich.table import Table

    if info["kind"] == "dowser.run":
        return _render_run(info)

    head = Table.grid(padding=(0, 2))
    for key in ("path", "kind", "model", "model_fingerprint", "probes", "strategy", "ratio", "granularity",
                "command", "created"):
        if info.get(key) not in (None, ""):
            head.add_row(key, str(info[key]))
    for name, inp in (info.get("inputs") or {}).items():
        head.add_row(f"input {name}", f"{inp.get('path')} (sha256 {str(inp.get('sha256'))[:12]})")
    if "totals" in info:
        t = info["totals"]
        head.add_row("trainable", f"{t['trainable']:,} of {t['numel']:,} ({t['fraction']:.4f})")
    types = list(dict.fromkeys(t for row in info["layers"].values() for t in row))
    table = Table(title=f"{info['metric']} per layer and module")
    table.add_column("layer", justify="right")
    for t in types:
        table.add_column(t, justify="right")
    fmt = "{:.3e}" if info["kind"] == artifacts.SCORES_KIND else "{:.4f}"
    for layer, row in info["layers"].items():
        table.add_row(layer, *(fmt.format(row[t]) if t in row else "" for t in types))
    return Group(head, table)


def _render_run(info: dict[str, Any]):
    from rich.console import Group
    from rich.table import Table

    head = Table.grid(padding=(0, 2))
    for key in ("path", "method", "model", "steps", "tuned_layers"):
        head.add_row(key, str(info.get(key)))
    t = info.get("trainable") or {}
    if t:
        head.add_row("trainable", f"{t['trainable_entries']:,} entries of {t['numel']:,} in {t['params']} tensors")
    table = Table(title="what changed, per layer and module (rel change = ||W - W0|| / ||W0||)")
    for col in ("layer", "module", "entries", "trained", "changed", "rel change"):
        table.add_column(col, justify="left" if col == "module" else "right")
    for r in info["rows"]:
        table.add_row(r["layer"], r["module"], f"{r['numel']:,}", f"{r['trained']:,}", f"{r['changed']:,}",
                      f"{r['rel_change']:.2e}")
    return Group(head, table)
