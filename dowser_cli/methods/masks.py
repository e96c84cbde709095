"""Built-in mask strategies. The ratio means the same for all: exactly round(rho * n) trainable."""
from __future__ import annotations

import torch

from dowser_cli import scoring
from dowser_cli.methods.registry import MASK_STRATEGIES, MaskStrategy


def _dowser(weight, psi, act, gen):
    return scoring.mean_score(weight, psi, act)


def _dowser_dense(weight, importance, gen):
    return importance.float()


def _magnitude(weight, psi, act, gen):
    return weight.detach().float().abs()


def _wanda(weight, psi, act, gen):
    # Wanda's |W_ij| * ||X_j||, with the probe's mean |activation| standing in for the input norm
    return weight.detach().float().abs() * act.float().mean(0)


def _sensitivity(weight, psi, act, gen):
    # the probe's psi_i a_j alone: Model-Dowser's score without |W| (an ablation of the weight factor)
    return scoring.mean_sensitivity(psi, act)


def _random(weight, psi, act, gen):
    return torch.rand(weight.shape, generator=gen)


for strategy in (
    MaskStrategy("dowser", _dowser, True, help="Model-Dowser score |W| * mean_p psi a (train the least important)",
                 from_dense=_dowser_dense),
    MaskStrategy("magnitude", _magnitude, False, help="|W| only"),
    MaskStrategy("wanda", _wanda, True, help="|W| * mean activation, from the same factors"),
    MaskStrategy("sensitivity", _sensitivity, True, help="ablation: mean_p psi a without |W|"),
    MaskStrategy("random", _random, False, help="uniformly random entries (seeded)"),
    MaskStrategy("inverse", _dowser, True, invert=True, help="ablation: train the MOST important entries",
                 from_dense=_dowser_dense),
):
    MASK_STRATEGIES.register(strategy.name, strategy)
