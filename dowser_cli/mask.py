"""`dowser mask`: per-unit exact-k trainable masks from probe scores (the selection is dowser_cli.masking),
plus mask comparison and set operations (`compare`, `combine`)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from dowser_cli import artifacts, scoring
from dowser_cli.artifacts.masks import MaskFile, open_mask, param_entry, write_mask
from dowser_cli.artifacts.scores import ScoresFile, open_scores
from dowser_cli.errors import UserError
from dowser_cli.masking import MaskConfig, build_masks, selected_modules, validate, write_mask_from_scores
from dowser_cli.models import ModelSource, load_config, load_model, meta_model, num_decoder_layers, resolve_source
from dowser_cli.models.registry import adapter_for_config, resolve_parts
from dowser_cli.progress import stderr_console


# ---- scores input ------------------------------------------------------------------------------------


def _model_for(scores: ScoresFile, model_spec: str | None) -> tuple[ModelSource, Any, torch.dtype]:
    info = scores.sidecar.get("model", {})
    spec = model_spec or info.get("spec")
    if not spec:
        raise UserError(f"{scores.path}: no {artifacts.sidecar_path(scores.path).name} beside it naming the model; "
                        f"pass --model")
    random_init = bool(info.get("random_init")) and model_spec is None
    dtype = getattr(torch, info.get("dtype", "float32"))
    source = resolve_source(spec, random_init=random_init)
    return source, load_config(source), dtype


def check_model(scores_path: Path, meta: dict[str, str], fingerprint: str, digest: str | None, spec: str) -> None:
    if meta.get("model_fingerprint") != fingerprint:
        raise UserError(f"{scores_path}: was made from a different model than {spec} "
                        f"(fingerprint {meta.get('model_fingerprint', '?')[:12]} != {fingerprint[:12]})")
    if digest is not None and meta.get("weights_digest") not in (None, digest):
        raise UserError(f"{scores_path}: was made from different weights than {spec} (same architecture, "
                        f"weights digest differs)")


# ---- selection -------------------------------------------------------------------------------------


# ---- the run ---------------------------------------------------------------------------------------


def run(scores_path: Path, out: Path, cfg: MaskConfig, model_spec: str | None = None,
        command: str = "") -> dict[str, Any]:
    t0 = time.perf_counter()
    strategy = validate(cfg)
    artifacts.check_writable(out)
    scores = open_scores(scores_path)
    source, config, dtype = _model_for(scores, model_spec)
    adapter = adapter_for_config(config)
    # fingerprint and module layout from a weightless (meta) copy: mismatches fail before weights load
    meta = meta_model(source, config, dtype)
    check_model(scores_path, scores.meta, artifacts.model_fingerprint(meta), None, source.spec)
    parts = resolve_parts(adapter, meta)
    modules, layers = selected_modules(scores, parts.layers_path, num_decoder_layers(config), cfg)
    del meta
    lm = load_model(source, config, dtype, "cpu", tokenizer=False)
    digest = artifacts.weights_digest(lm.model)
    check_model(scores_path, scores.meta, scores.meta["model_fingerprint"], digest, source.spec)
    console = stderr_console()
    packed, params = build_masks(lm, scores, strategy, cfg, modules, console)
    timings = {"total_s": round(time.perf_counter() - t0, 3)}
    sidecar = write_mask_from_scores(out, packed, params, cfg, scores, source, lm, digest, layers, timings, command)
    _print_summary(console, sidecar, out)
    return sidecar


def _print_summary(console, sidecar: dict, out: Path) -> None:
    from rich.table import Table

    groups: dict[str, list[int]] = {}
    for name, p in sidecar["params"].items():
        g = groups.setdefault(name.rsplit(".", 2)[-2], [0, 0])
        g[0] += p["trainable"]
        g[1] += p["numel"]
    t = sidecar["totals"]
    table = Table(title=f"{out}: {sidecar['config']['strategy']}, rho {sidecar['config']['ratio']}, "
                        f"{sidecar['config']['granularity']}; {t['trainable']:,} of {t['numel']:,} trainable")
    for col in ("module", "trainable", "of", "fraction"):
        table.add_column(col, justify="left" if col == "module" else "right")
    for typ, (k, n) in groups.items():
        table.add_row(typ, f"{k:,}", f"{n:,}", f"{k / n:.4f}")
    console.print(table)


# ---- reading, comparing and combining masks -----------------------------------------------------------


def _same_model(a_meta: dict, b_meta: dict, a: Path, b: Path) -> None:
    if a_meta.get("model_fingerprint") != b_meta.get("model_fingerprint"):
        raise UserError(f"{b}: is from a different model than {a} (fingerprint mismatch)")
    da, db = a_meta.get("weights_digest"), b_meta.get("weights_digest")
    if da and db and da != db:
        raise UserError(f"{b}: is from different weights than {a} (weights digest mismatch)")


OPS = {
    "union": lambda a, b: a | b,
    "intersection": lambda a, b: a & b,
    "difference": lambda a, b: a & ~b,  # padding bits stay 0: a's are 0
}


def combine(a_path: Path, b_path: Path, op: str, out: Path, command: str = "") -> dict[str, Any]:
    """Set operation on two masks of the same model; a parameter missing from one mask counts as
    all-frozen there."""
    if op not in OPS:
        raise UserError(f"--op {op!r}: expected one of {', '.join(OPS)}")
    artifacts.check_writable(out)
    a, b = open_mask(a_path), open_mask(b_path)
    _same_model(a.meta, b.meta, a_path, b_path)
    for name in set(a.params) & set(b.params):
        if a.params[name]["shape"] != b.params[name]["shape"]:
            raise UserError(f"{b_path}: {name} has shape {b.params[name]['shape']}, {a_path} has {a.params[name]['shape']}")
    packed, params = {}, {}
    for name in sorted(set(a.params) | set(b.params)):
        src = a if name in a.params else b
        n = src.numel(name)
        zero = torch.zeros((n + 7) // 8, dtype=torch.uint8)
        pa = a.packed(name) if name in a.params else zero
        pb = b.packed(name) if name in b.params else zero
        packed[name] = OPS[op](pa, pb)
        params[name] = param_entry(src.params[name]["shape"], src.params[name]["dtype"],
                                    scoring.popcount(packed[name]))
    sidecar = {
        **artifacts.sidecar_header(artifacts.MASK_KIND, command),
        "config": {"op": op},
        "model": {"fingerprint": a.meta["model_fingerprint"], "weights_digest": a.meta.get("weights_digest")},
        "inputs": {"a": {"path": str(a_path), "sha256": artifacts.sha256_file(a_path)},
                   "b": {"path": str(b_path), "sha256": artifacts.sha256_file(b_path)}},
    }
    return write_mask(out, packed, params, a.meta["model_fingerprint"], a.meta.get("weights_digest", ""),
                      dict(strategy=op, ratio="", granularity=""), sidecar)


def compare(a_path: Path, b_path: Path, ratio: float = 0.1, model_spec: str | None = None) -> dict[str, Any]:
    """Hamming distance between two masks, or, for two score files, Spearman correlation of the mean
    scores and Hamming distance of their matrix masks at ``ratio``; per module and overall (overall
    Spearman is the numel-weighted mean of the per-module values)."""
    kind_a = artifacts.read_header(a_path).get("dowser_kind")
    kind_b = artifacts.read_header(b_path).get("dowser_kind")
    if kind_a != kind_b:
        raise UserError(f"{b_path}: is a {kind_b} artifact, {a_path} is a {kind_a}; compare two of a kind")
    if kind_a == artifacts.MASK_KIND:
        return _compare_masks(open_mask(a_path), open_mask(b_path))
    if kind_a == artifacts.SCORES_KIND:
        return _compare_scores(open_scores(a_path), open_scores(b_path), ratio, model_spec)
    raise UserError(f"{a_path}: cannot compare {kind_a} artifacts (masks or scores only)")


def _compare_masks(a: MaskFile, b: MaskFile) -> dict[str, Any]:
    _same_model(a.meta, b.meta, a.path, b.path)
    common = sorted(set(a.params) & set(b.params))
    if not common:
        raise UserError(f"{b.path}: no parameter in common with {a.path}")
    per, diff, total = {}, 0, 0
    for name in common:
        d = scoring.popcount(a.packed(name) ^ b.packed(name))
        n = a.numel(name)
        per[name] = {"hamming": d / n}
        diff, total = diff + d, total + n
    return {"kind": "mask", "a": str(a.path), "b": str(b.path), "modules": per,
            "overall": {"hamming": diff / total}, "only_in_a": sorted(set(a.params) - set(b.params)),
            "only_in_b": sorted(set(b.params) - set(a.params))}


def _compare_scores(a: ScoresFile, b: ScoresFile, ratio: float, model_spec: str | None) -> dict[str, Any]:
    _same_model(a.meta, b.meta, a.path, b.path)
    if not 0 < ratio <= 1:
        raise UserError(f"--ratio {ratio}: must be in (0, 1]")
    source, config, dtype = _model_for(a, model_spec)
    lm = load_model(source, config, dtype, "cpu", tokenizer=False)
    check_model(a.path, a.meta, artifacts.model_fingerprint(lm.model), artifacts.weights_digest(lm.model), source.spec)
    common = [m for m in a.modules if m in set(b.modules)]
    per, rho_sum, diff, total = {}, 0.0, 0, 0
    for m in common:
        w = lm.model.get_submodule(m).weight
        fa, fb = a.factors(m), b.factors(m)
        sa, sb = scoring.mean_score(w, fa["psi"], fa["act"]), scoring.mean_score(w, fb["psi"], fb["act"])
        k = scoring.exact_k(ratio, sa.numel())
        d = int((scoring.select_lowest(sa, k) ^ scoring.select_lowest(sb, k)).sum())
        r = scoring.spearman(sa, sb)
        per[m] = {"spearman": r, "hamming": d / sa.numel()}
        rho_sum += r * sa.numel()
        diff, total = diff + d, total + sa.numel()
    return {"kind": "scores", "a": str(a.path), "b": str(b.path), "ratio": ratio, "modules": per,
            "overall": {"spearman": rho_sum / total, "hamming": diff / total}}
