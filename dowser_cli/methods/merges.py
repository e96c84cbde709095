"""Built-in post-hoc baselines of `dowser merge` (DESIGN section 1: the paper's DARE, Model Tailor and
Grafting). Each edits the delta of the targeted decoder linears only; the budget means the same for
the two that take one: exactly round(fraction * numel) entries of each matrix keep a change."""
from __future__ import annotations

import math

import torch

from dowser_cli import merging
from dowser_cli.methods import MERGE_METHODS, MergeMethod
from dowser_cli.scoring import exact_k


def _dare(ctx):
    """Drop with probability p, rescale by 1/(1-p); one CPU generator seeded by --seed, tensors in name
    order, so the same seed gives the same drops on any device."""
    gen = torch.Generator().manual_seed(ctx.cfg.seed)
    patches = {}
    for name in ctx.targets:
        keep, scaled = merging.dare(ctx.delta(name), ctx.cfg.p, gen)
        patches[name] = merging.Patch(keep, scaled)
    return patches, {}


def _tailor(ctx):
    """Salience (|delta| and OBS sensitivity under the fine-tuned model's calibration Hessian) picks the
    patch; the OBS update compensates it for the reverted entries."""
    cfg = ctx.cfg
    grams = ctx.input_grams()
    patches, sq = {}, {"compensated": 0.0, "reverted": 0.0}
    positions = max(n for _, n in grams.values())
    for name in ctx.each(ctx.targets, "tailor: salience + OBS compensation"):
        delta = ctx.delta(name)
        xtx, n = grams[name]
        hinv = merging.hessian_inverse(merging.hessian(xtx, n, cfg.damp))
        sal = merging.tailor_salience(delta, torch.diagonal(hinv), cfg.magnitude_weight)
        keep = merging.binarise_top(sal, exact_k(cfg.keep, delta.numel()))
        new = merging.obs_compensate(delta, keep, hinv)
        sq["compensated"] += merging.reconstruction_error(new, delta, xtx) ** 2
        sq["reverted"] += merging.reconstruction_error(delta * keep, delta, xtx) ** 2
        patches[name] = merging.Patch(keep, new)
    # per calibration token, over all targeted matrices: sqrt(sum ||(delta' - delta) X^T||^2 / positions)
    err = {k: math.sqrt(v / max(positions, 1)) for k, v in sq.items()}
    return patches, {"calibration_positions": positions,
                     "reconstruction_rms": {k: float(f"{v:.6g}") for k, v in err.items()}}


def _graft(ctx):
    """Relaxed region sigmoid(S) learnt on the downstream loss, then binarised to the budget."""
    cfg = ctx.cfg
    ks = {n: exact_k(cfg.budget, ctx.base[n].numel()) for n in ctx.targets}
    logits = {n: merging.graft_init(ctx.delta(n), ks[n]).requires_grad_(True) for n in ctx.targets}
    init = {n: s.detach() > 0 for n, s in logits.items()}
    losses = ctx.learn_region(logits)
    patches = {n: merging.Patch(merging.binarise_top(logits[n], ks[n]), None) for n in ctx.targets}
    kept = sum(ks.values())
    moved = sum(int((patches[n].keep & ~init[n]).sum()) for n in ctx.targets)
    return patches, {"loss_curve": losses, "entries_moved_from_initial_region": moved,
                     "fraction_moved": round(moved / max(kept, 1), 6)}


for method in (
    MergeMethod("dare", _dare, needs_data=False, help="drop delta entries with probability p, rescale by 1/(1-p)"),
    MergeMethod("tailor", _tailor, needs_data=True,
                help="Model Tailor: salient patch of --keep, OBS-compensated on calibration data"),
    MergeMethod("graft", _graft, needs_data=True,
                help="Grafting: a --budget region of the delta learnt on the downstream loss"),
):
    MERGE_METHODS.register(method.name, method)
