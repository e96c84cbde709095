"""Built-in mask strategies. The ratio means the same for all: exactly round(rho * n) trainable."""
from __future__ import annotations

import torch

from dowser_cli import scoring
from dowser_cli.methods.registry import MASK_STRATEGIES, MaskStrategy


def _dowser(weight, f, gen):
    return scoring.mean_score(weight, f["psi"], f["act"])


def _dowser_dense(weight, importance, gen):
    return importance.float()


def _magnitude(weight, f, gen):
    return weight.detach().float().abs()


def _wanda(weight, f, gen):
    # Wanda's |W_ij| * ||X_j||_2 (Sun et al. 2024, eq. 1): the L2 norm of input feature j over every
    # real token the probe fed the model (act_sq holds each batch's sum of squares)
    return weight.detach().float().abs() * f["act_sq"].double().sum(0).sqrt().float()


def _sensitivity(weight, f, gen):
    # the probe's psi_i a_j alone: Model-Dowser's score without |W| (an ablation of the weight factor)
    return scoring.mean_sensitivity(f["psi"], f["act"])


def _random(weight, f, gen):
    return torch.rand(weight.shape, generator=gen)


for strategy in (
    MaskStrategy("dowser", _dowser, ("psi", "act"),
                 help="Model-Dowser score |W| * mean_p psi a (train the least important)", from_dense=_dowser_dense),
    MaskStrategy("magnitude", _magnitude, help="|W| only"),
    MaskStrategy("wanda", _wanda, ("act_sq",), help="Wanda's |W| * ||X_j||_2 over the probe's tokens"),
    MaskStrategy("sensitivity", _sensitivity, ("psi", "act"), help="ablation: mean_p psi a without |W|"),
    MaskStrategy("random", _random, help="uniformly random entries (seeded)"),
    MaskStrategy("inverse", _dowser, ("psi", "act"), invert=True, help="ablation: train the MOST important entries",
                 from_dense=_dowser_dense),
):
    MASK_STRATEGIES.register(strategy.name, strategy)
