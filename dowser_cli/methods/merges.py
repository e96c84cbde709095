"""Built-in post-hoc baselines of `dowser merge` (DESIGN section 1: the paper's DARE, Model Tailor and
Grafting), each as its authors' code does it: DARE and Model Tailor edit the tuned decoder layers'
linear weights (Tailor per 128-column block), Grafting every tensor trained inside those layers with one
budget over all of them."""
from __future__ import annotations

import math

import torch

from dowser_cli import merging
from dowser_cli.methods.registry import MERGE_METHODS, MergeMethod


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
    """Model Tailor as the authors' main_model_tailor.py + sparsegpt.py: layer by layer from the first
    tuned one, the calibration Hessian of each linear's inputs (through the already-tailored layers),
    per-block selection and the column-by-column compensation (merging.tailor)."""
    cfg = ctx.cfg
    sign = merging.COMPENSATION_SIGNS[cfg.compensation]
    patches, sq = {}, {"compensated": 0.0, "reverted": 0.0}

    def on_layer(names, grams):
        for name in names:
            xtx, n = grams[name]
            u = merging.hinv_cholesky(merging.hessian(xtx, n, cfg.damp))
            base = ctx.base[name]
            w, keep = merging.tailor(ctx.tuned[name], base, u, cfg.keep, cfg.magnitude_weight, cfg.block, sign)
            new = torch.where(keep, w - base.double(), torch.zeros((), dtype=w.dtype, device=w.device)).float()
            delta = ctx.delta(name)
            # how far each choice lands from the fine-tuned layer's outputs on these inputs
            sq["compensated"] += merging.reconstruction_error(new, delta, xtx) ** 2
            sq["reverted"] += merging.reconstruction_error(delta * keep, delta, xtx) ** 2
            patches[name] = merging.Patch(keep, new)
            with torch.no_grad():  # the next layers are calibrated on this layer's tailored outputs
                ctx.lm.model.get_parameter(name).copy_(merging.patch(base, ctx.tuned[name], keep, new))

    positions = ctx.layerwise(on_layer)
    ctx.restore_tuned(patches)
    # per calibration token, over all targeted matrices: sqrt(sum ||(delta' - delta) X^T||^2 / positions)
    err = {k: math.sqrt(v / max(positions, 1)) for k, v in sq.items()}
    return patches, {"calibration_positions": positions, "compensation": cfg.compensation,
                     "reconstruction_rms": {k: float(f"{v:.6g}") for k, v in err.items()}}


def _graft(ctx):
    """Grafting as the authors' graft_trainer.py: the base region is the top --budget of |delta| over all
    the tuned layers' trained tensors together; SGD moves the relaxed mask; the region is rounded
    (--binarise round, its size whatever it comes to) or cut to exactly the budget (topk)."""
    cfg = ctx.cfg
    names = ctx.layer_tensors
    deltas = {n: ctx.delta(n) for n in names}
    base_region = merging.graft_base_region(deltas, cfg.budget)
    del deltas
    gen = torch.Generator().manual_seed(cfg.seed)
    # the authors' torch.rand_like: S in [0, 1), far below the bias, so the start is the base region
    logits = {n: torch.rand(ctx.base[n].shape, generator=gen).to(ctx.base[n].device) for n in names}
    losses = ctx.learn_region(names, base_region, logits)
    fracs = {n: merging.graft_frac(logits[n], base_region[n], cfg.sigmoid_bias) for n in names}
    budget = merging.graft_budget(sum(f.numel() for f in fracs.values()), cfg.budget)
    region = merging.graft_binarise(fracs, cfg.binarise, budget)
    patches = {n: merging.Patch(region[n], None) for n in names}
    kept = sum(int(r.sum()) for r in region.values())
    start = sum(int(r.sum()) for r in base_region.values())
    moved_in = sum(int((region[n] & ~base_region[n]).sum()) for n in names)
    moved_out = sum(int((~region[n] & base_region[n]).sum()) for n in names)
    return patches, {"loss_curve": losses, "binarise": cfg.binarise, "budget_entries": budget,
                     "base_region_entries": start, "region_entries": kept,
                     "region_minus_budget": kept - budget,
                     "entries_moved_in": moved_in, "entries_moved_out": moved_out}


for method in (
    MergeMethod("dare", _dare, needs_data=False, help="drop delta entries with probability p, rescale by 1/(1-p)"),
    MergeMethod("tailor", _tailor, needs_data=True,
                help="Model Tailor: per 128-column block keep --keep of the delta, compensated on calibration data"),
    MergeMethod("graft", _graft, needs_data=True,
                help="Grafting: the top --budget |delta| region, moved by SGD on the downstream loss, rounded"),
):
    MERGE_METHODS.register(method.name, method)
