"""The mask core, shared by `dowser mask` and `finetune --mask SCORES`: per-unit exact-k selection of the
trainable entries from probe scores, and the mask artifact it writes.

Scores are materialised one module at a time from the factors (|W| * Psi^T A / P); units larger than
one matrix (layer, global) are selected by a streaming radix select, so no stage holds more than one
module's dense scores."""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from dowser_cli import artifacts, scoring
from dowser_cli.artifacts.masks import param_entry, write_mask
from dowser_cli.artifacts.scores import ScoresFile
from dowser_cli.config import option
from dowser_cli.errors import UserError
from dowser_cli.methods import MASK_STRATEGIES, MaskStrategy
from dowser_cli.models import LoadedModel, ModelSource
from dowser_cli.progress import progress_bar
from dowser_cli.resources import peak_memory
from dowser_cli.selection import (DEFAULT_LAYERS, TARGETS, default_layers, format_ranges, layer_of, parse_layers,
                                  parse_targets)


GRANULARITIES = ("matrix", "row", "layer", "global")
COUNT_RULES = ("round", "peft")


@dataclass
class MaskConfig:
    ratio: float = option(0.1, "rho: fraction of each unit that is TRAINABLE.")
    strategy: str = option("dowser", "dowser | magnitude | wanda | sensitivity | random | inverse.")
    granularity: str = option("matrix", "Unit of exact-k selection: matrix | row | layer | global.")
    layers: str = option(DEFAULT_LAYERS, "Decoder layers to mask: last:N | all | ranges.", show="last:20; all if fewer")
    targets: str = option("attn,mlp", "Linears of those layers: attn (q/k/v/o) | mlp (gate/up/down) | attn,mlp.")
    seed: int = option(0, "Seed of the random strategy.")
    count_rule: str = option("round", "Entries a unit keeps: round (round(rho * numel)) | peft (int(numel * (1 - "
                             "(1 - rho))), PEFT Super-Tuning's rule, so that `export --format peft` holds the mask; "
                             "matrix granularity).")


def validate(cfg: MaskConfig) -> MaskStrategy:
    if not 0 < cfg.ratio <= 1:
        raise UserError(f"--ratio {cfg.ratio}: must be in (0, 1]")
    if cfg.granularity not in GRANULARITIES:
        raise UserError(f"--granularity {cfg.granularity!r}: expected one of {', '.join(GRANULARITIES)}")
    if cfg.count_rule not in COUNT_RULES:
        raise UserError(f"--count-rule {cfg.count_rule!r}: expected one of {', '.join(COUNT_RULES)}")
    if cfg.count_rule == "peft" and cfg.granularity != "matrix":
        raise UserError(f"--count-rule peft: PEFT counts per matrix; use --granularity matrix "
                        f"(not {cfg.granularity})")
    parse_targets(cfg.targets)
    return MASK_STRATEGIES.get(cfg.strategy, "--strategy")


def unit_k(cfg: MaskConfig, n: int) -> int:
    """Trainable entries of a unit of n entries under the count rule."""
    if cfg.count_rule == "peft":   # PEFT's SupertuningLayer._num_trainable with sparsity = 1 - rho
        return int(n * (1 - (1.0 - cfg.ratio)))
    return scoring.exact_k(cfg.ratio, n)


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
        gen = torch.Generator().manual_seed(module_seed(self.cfg.seed, module))
        if self.strategy.needs_factors and self.scores.dense:
            return self.strategy.from_dense(weight, self.scores.score(module), gen)
        factors = self.scores.factors(module, self.strategy.factors) if self.strategy.factors else {}
        return self.strategy.score(weight, factors, gen)

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
        k = unit_k(self.cfg, n)
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


def selected_modules(scores: ScoresFile, layers_path: str, num_layers: int, cfg: MaskConfig) -> tuple[list[str], list[int]]:
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


def build_masks(lm: LoadedModel, scores: ScoresFile, strategy: MaskStrategy, cfg: MaskConfig, modules: list[str],
                console) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """Packed trainable masks {"<module>.weight": uint8 [ceil(numel/8)]} and their parameter table."""
    if scores.dense and strategy.needs_factors and strategy.from_dense is None:
        raise UserError(f"--strategy {strategy.name}: needs the probe's factors, and {scores.path} holds dense "
                        f"importance scores (import-scores); use dowser, inverse, magnitude or random")
    selector = UnitSelector(lm, scores, strategy, cfg)
    packed, params = {}, {}
    with progress_bar(console) as bar:
        task = bar.add_task(f"mask {cfg.strategy} rho={cfg.ratio}", total=len(modules))
        for unit in module_units(modules, lm.parts.layers_path, cfg.granularity):
            for module, trainable in selector.select(unit):
                name = f"{module}.weight"
                weight = lm.model.get_submodule(module).weight
                packed[name] = scoring.pack_bits(trainable)
                params[name] = param_entry(list(trainable.shape), str(weight.dtype).removeprefix("torch."),
                                            int(trainable.sum()))
                bar.update(task, advance=1)
    return packed, params


def select_modules(scores: ScoresFile, lm: LoadedModel, cfg: MaskConfig) -> tuple[list[str], list[int]]:
    return selected_modules(scores, lm.parts.layers_path, lm.parts.num_layers, cfg)


def write_for(out: Path, packed, params, cfg: MaskConfig, scores: ScoresFile, lm: LoadedModel, digest: str,
              layers: list[int], command: str) -> dict[str, Any]:
    """Write a mask built in another stage (e.g. `dowser finetune --mask scores.safetensors`)."""
    return write_mask_from_scores(out, packed, params, cfg, scores, lm.source, lm, digest, layers, {}, command)


def write_mask_from_scores(out: Path, packed, params, cfg: MaskConfig, scores: ScoresFile, source: ModelSource, lm: LoadedModel,
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
