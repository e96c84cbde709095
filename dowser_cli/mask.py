"""`dowser mask`: per-unit exact-k trainable masks from probe scores (DESIGN sections 1 and 2), plus
mask comparison and set operations.

Scores are materialised one module at a time from the factors (|W| * Psi^T A / P); units larger than
one matrix (layer, global) are selected by a streaming radix select, so no stage holds more than one
module's dense scores."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open

from dowser_cli import artifacts, scoring
from dowser_cli.config import option
from dowser_cli.errors import UserError
from dowser_cli.methods import MASK_STRATEGIES, MaskStrategy
from dowser_cli.models import (LoadedModel, ModelSource, load_config, load_model, meta_model, num_decoder_layers,
                               resolve_source)
from dowser_cli.models.registry import adapter_for_config, resolve_parts
from dowser_cli.progress import progress_bar, stderr_console
from dowser_cli.resources import peak_memory
from dowser_cli.selection import (DEFAULT_LAYERS, TARGETS, default_layers, format_ranges, layer_of, parse_layers,
                                  parse_targets)

GRANULARITIES = ("matrix", "row", "layer", "global")


@dataclass
class MaskConfig:
    ratio: float = option(0.1, "rho: fraction of each unit that is TRAINABLE.")
    strategy: str = option("dowser", "dowser | magnitude | wanda | random | inverse.")
    granularity: str = option("matrix", "Unit of exact-k selection: matrix | row | layer | global.")
    layers: str = option(DEFAULT_LAYERS, "Decoder layers to mask: last:N | all | ranges.", show="last:20; all if fewer")
    targets: str = option("attn,mlp", "Linears of those layers: attn (q/k/v/o) | mlp (gate/up/down) | attn,mlp.")
    seed: int = option(0, "Seed of the random strategy.")


def validate(cfg: MaskConfig) -> MaskStrategy:
    if not 0 < cfg.ratio <= 1:
        raise UserError(f"--ratio {cfg.ratio}: must be in (0, 1]")
    if cfg.granularity not in GRANULARITIES:
        raise UserError(f"--granularity {cfg.granularity!r}: expected one of {', '.join(GRANULARITIES)}")
    parse_targets(cfg.targets)
    return MASK_STRATEGIES.get(cfg.strategy, "--strategy")


# ---- scores input ------------------------------------------------------------------------------------

@dataclass
class ScoresFile:
    path: Path
    meta: dict[str, str]
    sidecar: dict[str, Any]
    modules: list[str]

    def factors(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """psi [P, out], act [P, in] of one module, read on demand (memory-mapped)."""
        with safe_open(str(self.path), framework="pt") as f:
            return f.get_tensor(f"{module}.psi"), f.get_tensor(f"{module}.act")


def open_scores(path: Path) -> ScoresFile:
    meta = artifacts.read_header(path, artifacts.SCORES_KIND)
    keys = artifacts.tensor_names(path)
    modules = sorted({k.rsplit(".", 1)[0] for k in keys if k.endswith((".psi", ".act"))})
    side_path = artifacts.sidecar_path(path)
    sidecar = artifacts.read_yaml(side_path) if side_path.exists() else {}
    return ScoresFile(path, meta, sidecar, modules)


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

def module_units(modules: list[str], layers_path: str, granularity: str) -> list[list[str]]:
    """Groups of modules selected together: one matrix (matrix, row), a decoder layer, or all."""
    if granularity == "global":
        return [modules]
    if granularity == "layer":
        groups: dict[int, list[str]] = {}
        for m in modules:
            groups.setdefault(layer_of(m, layers_path), []).append(m)
        return list(groups.values())
    return [[m] for m in modules]


def module_seed(seed: int, module: str) -> int:
    return int.from_bytes(hashlib.sha256(f"dowser-mask:{seed}:{module}".encode()).digest()[:7], "little")


class UnitSelector:
    """Computes strategy scores per module and turns them into trainable masks, unit by unit."""

    def __init__(self, lm: LoadedModel, scores: ScoresFile, strategy: MaskStrategy, cfg: MaskConfig):
        self.lm, self.scores, self.strategy, self.cfg = lm, scores, strategy, cfg

    def module_scores(self, module: str) -> torch.Tensor:
        # selection runs on the host whatever device holds the model (one module at a time), so a
        # mask is the same bits whether it was built beside a GPU run or by `dowser mask` on a CPU
        weight = self.lm.model.get_submodule(module).weight.detach().cpu()
        psi = act = None
        if self.strategy.needs_factors:
            psi, act = self.scores.factors(module)
        gen = torch.Generator().manual_seed(module_seed(self.cfg.seed, module))
        return self.strategy.score(weight, psi, act, gen)

    def select(self, unit: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (module, bool trainable mask [out, in]) for every module of the unit."""
        invert, rho = self.strategy.invert, self.cfg.ratio
        if self.cfg.granularity == "row":
            for m in unit:
                s = self.module_scores(m)
                k = scoring.exact_k(rho, s.shape[1])
                # inverse: freeze the (in - k) lowest per row, train the rest
                sel = scoring.select_lowest_rows(s, s.shape[1] - k if invert else k)
                yield m, ~sel if invert else sel
            return
        n = sum(self.lm.model.get_submodule(m).weight.numel() for m in unit)
        k = scoring.exact_k(rho, n)
        k_low = n - k if invert else k
        if len(unit) == 1:
            s = self.module_scores(unit[0])
            sel = scoring.select_lowest(s, k_low)
            yield unit[0], ~sel if invert else sel
            return
        threshold = scoring.lowest_k_threshold(lambda: (self.module_scores(m) for m in unit), k_low)
        selector = scoring.LowestKSelector(threshold)
        for m in unit:
            sel = selector(self.module_scores(m))
            yield m, ~sel if invert else sel


# ---- the run ---------------------------------------------------------------------------------------

def _selected_modules(scores: ScoresFile, layers_path: str, num_layers: int, cfg: MaskConfig) -> tuple[list[str], list[int]]:
    spec = default_layers(num_layers) if cfg.layers == DEFAULT_LAYERS else cfg.layers
    layers = parse_layers(spec, num_layers)
    targets = parse_targets(cfg.targets)
    probed = {layer_of(m, layers_path) for m in scores.modules} - {None}
    missing = [i for i in layers if i not in probed]
    if missing:
        have = f"{min(probed)}-{max(probed)}" if probed else "none"
        raise UserError(f"--layers {cfg.layers}: layer(s) {format_ranges(missing)} are not in {scores.path} "
                        f"(probed decoder layers: {have})")
    chosen = []
    for m in scores.modules:
        i = layer_of(m, layers_path)
        if i in layers and any(TARGETS[t].search(m[len(layers_path):]) for t in targets):
            chosen.append(m)
    if not chosen:
        raise UserError(f"--targets {cfg.targets}: no such modules in {scores.path}")
    return sorted(chosen, key=lambda m: (layer_of(m, layers_path), m)), layers




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
    modules, layers = _selected_modules(scores, parts.layers_path, num_decoder_layers(config), cfg)
    del meta
    lm = load_model(source, config, dtype, "cpu", tokenizer=False)
    digest = artifacts.weights_digest(lm.model)
    check_model(scores_path, scores.meta, scores.meta["model_fingerprint"], digest, source.spec)
    console = stderr_console()
    packed, params = build_masks(lm, scores, strategy, cfg, modules, console)
    timings = {"total_s": round(time.perf_counter() - t0, 3)}
    sidecar = _write(out, packed, params, cfg, scores, source, lm, digest, layers, timings, command)
    _print_summary(console, sidecar, out)
    return sidecar


def build_masks(lm: LoadedModel, scores: ScoresFile, strategy: MaskStrategy, cfg: MaskConfig, modules: list[str],
                console) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """Packed trainable masks {"<module>.weight": uint8 [ceil(numel/8)]} and their parameter table."""
    selector = UnitSelector(lm, scores, strategy, cfg)
    packed, params = {}, {}
    with progress_bar(console) as bar:
        task = bar.add_task(f"mask {cfg.strategy} rho={cfg.ratio}", total=len(modules))
        for unit in module_units(modules, lm.parts.layers_path, cfg.granularity):
            for module, trainable in selector.select(unit):
                name = f"{module}.weight"
                weight = lm.model.get_submodule(module).weight
                packed[name] = scoring.pack_bits(trainable)
                params[name] = _param_entry(list(trainable.shape), str(weight.dtype).removeprefix("torch."),
                                            int(trainable.sum()))
                bar.update(task, advance=1)
    return packed, params


def select_modules(scores: ScoresFile, lm: LoadedModel, cfg: MaskConfig) -> tuple[list[str], list[int]]:
    return _selected_modules(scores, lm.parts.layers_path, lm.parts.num_layers, cfg)


def write_for(out: Path, packed, params, cfg: MaskConfig, scores: ScoresFile, lm: LoadedModel, digest: str,
              layers: list[int], command: str) -> dict[str, Any]:
    """Write a mask built in another stage (e.g. `dowser finetune --mask scores.safetensors`)."""
    return _write(out, packed, params, cfg, scores, lm.source, lm, digest, layers, {}, command)


def _param_entry(shape: list[int], dtype: str, trainable: int) -> dict[str, Any]:
    numel = 1
    for d in shape:
        numel *= d
    return {"shape": shape, "dtype": dtype, "numel": numel, "trainable": trainable,
            "fraction": round(trainable / numel, 6)}


def write_mask(out: Path, packed: dict[str, torch.Tensor], params: dict[str, dict], fingerprint: str,
               digest: str, meta_extra: dict[str, Any], sidecar: dict[str, Any]) -> dict[str, Any]:
    """The one writer of mask artifacts: packed bits + the parameter table in the metadata, and the
    YAML sidecar (``sidecar`` fields, then totals and per-parameter counts)."""
    shapes = {k: {"shape": v["shape"], "dtype": v["dtype"]} for k, v in params.items()}
    meta = artifacts.base_metadata(artifacts.MASK_KIND, fingerprint, weights_digest=digest,
                                   params=json.dumps(shapes, sort_keys=True), **meta_extra)
    numel = sum(v["numel"] for v in params.values())
    trainable = sum(v["trainable"] for v in params.values())
    sidecar = {**sidecar, "totals": {"numel": numel, "trainable": trainable,
                                     "fraction": round(trainable / max(numel, 1), 6)}, "params": params}
    artifacts.write_safetensors(out, packed, meta)
    artifacts.write_yaml(artifacts.sidecar_path(out), sidecar)
    return sidecar


def _write(out: Path, packed, params, cfg: MaskConfig, scores: ScoresFile, source: ModelSource, lm: LoadedModel,
           digest: str, layers: list[int], timings: dict, command: str) -> dict[str, Any]:
    scores_sha = artifacts.sha256_file(scores.path)
    fingerprint = scores.meta["model_fingerprint"]
    sidecar = {
        **artifacts.sidecar_header(artifacts.MASK_KIND, command),
        "config": dataclasses.asdict(cfg),
        "model": {"spec": source.spec, "random_init": source.random_init, "fingerprint": fingerprint,
                  "weights_digest": digest, "layers_path": lm.parts.layers_path, "num_layers": lm.parts.num_layers},
        "inputs": {"scores": {"path": str(scores.path), "sha256": scores_sha}},
        "layers": layers,
        "timings": timings, "peak_memory": peak_memory("cpu"),
    }
    return write_mask(out, packed, params, fingerprint, digest,
                      dict(strategy=cfg.strategy, ratio=cfg.ratio, granularity=cfg.granularity,
                           scores_sha256=scores_sha), sidecar)


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

@dataclass
class MaskFile:
    path: Path
    meta: dict[str, str]
    params: dict[str, dict]   # name -> {"shape", "dtype"}

    def packed(self, name: str) -> torch.Tensor:
        with safe_open(str(self.path), framework="pt") as f:
            return f.get_tensor(name)

    def numel(self, name: str) -> int:
        n = 1
        for d in self.params[name]["shape"]:
            n *= d
        return n

    def dense(self, name: str) -> torch.Tensor:
        return scoring.unpack_bits(self.packed(name), self.numel(name)).reshape(self.params[name]["shape"])


def open_mask(path: Path) -> MaskFile:
    meta = artifacts.read_header(path, artifacts.MASK_KIND)
    try:
        params = json.loads(meta["params"])
    except (KeyError, ValueError):
        raise UserError(f"{path}: mask metadata has no readable parameter table") from None
    names = set(artifacts.tensor_names(path))
    if names != set(params):
        raise UserError(f"{path}: tensors and parameter table disagree")
    mf = MaskFile(path, meta, params)
    for name in params:
        want = (mf.numel(name) + 7) // 8
        with safe_open(str(path), framework="pt") as f:
            got = f.get_slice(name).get_shape()
        if list(got) != [want]:
            raise UserError(f"{path}: {name} has {got} packed bytes, its shape needs [{want}]")
    return mf


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
        params[name] = _param_entry(src.params[name]["shape"], src.params[name]["dtype"],
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
        sa, sb = scoring.mean_score(w, *a.factors(m)), scoring.mean_score(w, *b.factors(m))
        k = scoring.exact_k(ratio, sa.numel())
        d = int((scoring.select_lowest(sa, k) ^ scoring.select_lowest(sb, k)).sum())
        r = scoring.spearman(sa, sb)
        per[m] = {"spearman": r, "hamming": d / sa.numel()}
        rho_sum += r * sa.numel()
        diff, total = diff + d, total + sa.numel()
    return {"kind": "scores", "a": str(a.path), "b": str(b.path), "ratio": ratio, "modules": per,
            "overall": {"spearman": rho_sum / total, "hamming": diff / total}}
