"""`dowser inspect`: what an artifact is, what it came from, and a per-layer table."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dowser_cli import artifacts, scoring
from dowser_cli.artifacts.masks import open_mask
from dowser_cli.artifacts.runs import open_run
from dowser_cli.errors import UserError
from dowser_cli.models import load_config, load_model, meta_model, resolve_source
from dowser_cli.models.registry import adapter_for_config, resolve_parts
from dowser_cli.models.runs import load_run
from dowser_cli.selection import TARGETS, layer_of

_LAYER = re.compile(r"\.(\d+)\.")


def _layer(name: str) -> str:
    m = _LAYER.search(name)
    return m.group(1) if m else "-"


def _type(name: str) -> str:
    parts = name.split(".")
    return parts[-2] if parts[-1] == "weight" else parts[-1]


def describe(path: Path) -> dict[str, Any]:
    if path.is_dir():
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


def describe_run(run_path: Path) -> dict[str, Any]:
    """What a run changed, per decoder layer and module type: trained entries, entries that moved,
    and the relative size of the change ||dW|| / ||W||."""

    run = open_run(run_path)
    info = run.sidecar["model"]
    source = resolve_source(info["spec"], random_init=bool(info.get("random_init")))
    base = load_model(source, load_config(source), getattr(torch, info.get("dtype", "float32")), "cpu",
                      tokenizer=False)
    tuned = load_run(run)
    rows: dict[str, dict[str, float]] = {}
    for name in run.params:
        w0 = base.model.get_parameter(name).detach().float()
        w1 = tuned.model.get_parameter(name).detach().float()
        layer = layer_of(name, info["layers_path"])
        typ = name.rsplit(".", 2)[-2] if name.endswith(".weight") or name.endswith(".bias") else name
        key = f"{'-' if layer is None else layer}\t{typ}"
        r = rows.setdefault(key, {"numel": 0, "trained": 0, "changed": 0, "sq_delta": 0.0, "sq_base": 0.0})
        r["numel"] += w0.numel()
        r["trained"] += w0.numel() if not run.params[name]["masked"] else int(
            artifacts.read_tensors(run.delta, [name])[name].numel())
        r["changed"] += int((w1 != w0).sum())
        r["sq_delta"] += float((w1 - w0).pow(2).sum())
        r["sq_base"] += float(w0.pow(2).sum())
    table = []
    for key, r in rows.items():
        layer, typ = key.split("\t")
        table.append({"layer": layer, "module": typ, "numel": r["numel"], "trained": r["trained"],
                      "changed": r["changed"], "rel_change": (r["sq_delta"] / max(r["sq_base"], 1e-30)) ** 0.5})
    return {"kind": "dowser.run", "path": str(run_path), "method": run.sidecar.get("method"),
            "model": info["spec"], "steps": run.sidecar.get("steps"), "tuned_layers": run.sidecar.get("tuned_layers"),
            "trainable": run.sidecar.get("trainable"), "rows": table}


def describe_model(spec: str, random_init: bool = False) -> dict[str, Any]:
    """Where dowser finds a model's parts (its architecture adapter resolved against the module tree,
    built without weights): decoder layers, vision tower, projector, final norm, lm_head, and the
    linears a probe scores per layer. Nothing is downloaded beyond the config (and, with
    --trust-remote-code, the model's own code)."""
    source = resolve_source(spec, random_init=random_init)
    config = load_config(source)
    adapter = adapter_for_config(config)
    model = meta_model(source, config, torch.float32)
    parts = resolve_parts(adapter, model)
    first = f"{parts.layers_path}.0."
    linears = [n.removeprefix(first) for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and n.startswith(first)]
    scored = [n for n in linears if any(rx.search(n) for rx in TARGETS.values())]
    count = lambda prefix: sum(p.numel() for n, p in model.named_parameters() if prefix and n.startswith(prefix + "."))
    return {"kind": "model", "spec": spec, "model_type": getattr(config, "model_type", None),
            "class": type(model).__name__, "adapter": adapter.name,
            "decoder_layers": {"path": parts.layers_path, "count": parts.num_layers},
            "layer_linears": linears, "scored_per_layer": scored,
            "vision_tower": parts.vision_tower, "projector": parts.projector, "final_norm": parts.final_norm,
            "lm_head": parts.lm_head, "noise_images": adapter.noise_images is not None,
            "image_token_id": getattr(config, "image_token_id", getattr(config, "image_token_index", None)),
            "params": {"total": sum(p.numel() for p in model.parameters()),
                       "decoder_layers": count(parts.layers_path), "vision_tower": count(parts.vision_tower),
                       "projector": count(parts.projector)}}


def render_model(info: dict[str, Any]):
    from rich.table import Table

    t = Table(title=f"{info['spec']}: {info['class']} (adapter {info['adapter']}, model_type {info['model_type']})")
    t.add_column("part")
    t.add_column("module")
    t.add_column("params", justify="right")
    p = info["params"]
    d = info["decoder_layers"]
    t.add_row("decoder layers", f"{d['path']} (x{d['count']})", f"{p['decoder_layers']:,}")
    t.add_row("  scored per layer", ", ".join(info["scored_per_layer"]) or "-", "")
    t.add_row("vision tower", info["vision_tower"] or "-", f"{p['vision_tower']:,}" if info["vision_tower"] else "")
    t.add_row("projector", info["projector"] or "-", f"{p['projector']:,}" if info["projector"] else "")
    t.add_row("final norm", info["final_norm"] or "-", "")
    t.add_row("lm_head", info["lm_head"] or "- (tied or absent)", "")
    t.add_row("noise images", "yes" if info["noise_images"] else "no (text probes only)", "")
    t.add_row("total", "", f"{p['total']:,}")
    return t
