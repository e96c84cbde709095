"""The data-free drift: KL(p_base || p_model) of next-token distributions on text the base model
writes itself (sampled as `dowser probe` samples it). One definition, used by eval-forgetting's
drift column and by the live meter of `dowser finetune --drift-every`; on the same settings both
read the same texts, so the meter's value at step N is the report's drift of the snapshot at N.
Also the base's own generations that data-free replay trains on."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import nn

from dowser_cli import probing
from dowser_cli.data import pack_right, pad_id
from dowser_cli.models import LoadedModel


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """The model in eval mode for the block, its training mode restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def probe_texts(base: LoadedModel, samples: int, seq_len: int, seed: int, device: str) -> list[list[int]]:
    """``samples`` token sequences of at most ``seq_len`` (BOS + random prefix, continued by ``base``
    with the probe's sampling; text only). Deterministic in (model, samples, seq_len, seed)."""
    cfg = probing.ProbeConfig(samples=samples, seq_len=seq_len, seed=seed)
    ids = probing.token_ids(base)
    out: list[list[int]] = []
    with eval_mode(base.model):
        for start in range(0, samples, cfg.gen_chunk()):
            n = min(cfg.gen_chunk(), samples - start)
            out += [s.tokens for s in probing.make_samples(base, cfg, ids, start, n, None, device)]
    return out


def kl_terms(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_v p (log p - log q) per position [n, T], from log-probabilities [n, T, V]."""
    return (lp.exp() * (lp - lq)).sum(-1)


def kl_rows(lp: torch.Tensor, lq: torch.Tensor, mask: torch.Tensor) -> tuple[list[float], list[int]]:
    """Per row: sum over real positions of KL(p || q), and the count of those positions. lp, lq:
    log-probabilities [n, T, V]; mask [n, T] (1 = real position)."""
    return (kl_terms(lp, lq) * mask).sum(-1).cpu().tolist(), mask.sum(-1).cpu().long().tolist()


@torch.no_grad()
def log_probs(lm: LoadedModel, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log-softmax of the model's next-token logits, fp32 [n, T, V]."""
    return torch.log_softmax(lm.model(input_ids=ids, attention_mask=mask).logits.float(), -1)


def base_log_probs(base: LoadedModel, ids: torch.Tensor, mask: torch.Tensor, batch_size: int,
                   device: str) -> torch.Tensor:
    """The base's next-token log-probabilities of texts ids [n, T] (mask [n, T], long), computed in
    eval mode ``batch_size`` rows at a time and kept on the host: [n, T, V] fp32."""
    with eval_mode(base.model):
        return torch.cat([log_probs(base, ids[i:i + batch_size].to(device), mask[i:i + batch_size].to(device)).cpu()
                          for i in range(0, len(ids), batch_size)])


@torch.no_grad()
def kl_per_sequence(base: LoadedModel, lm: LoadedModel, seqs: list[list[int]], batch_size: int, device: str,
                    advance: Callable[[int], None] = lambda k: None) -> tuple[list[float], list[int]]:
    """Per sequence: the summed KL(p_base || p_model) over its real positions and their count (the
    units the drift's bootstrap interval resamples). Both models live."""
    sums, counts = [], []
    for i in range(0, len(seqs), batch_size):
        ids, mask = pack_right(seqs[i:i + batch_size], pad_id(base.tokenizer))
        ids, mask = ids.to(device), mask.long().to(device)
        s, c = kl_rows(log_probs(base, ids, mask), log_probs(lm, ids, mask), mask)
        sums, counts = sums + s, counts + c
        advance(len(seqs[i:i + batch_size]))
    return sums, counts


class DriftMeter:
    """The live meter of a fine-tuning run: the base's distributions on fixed probe texts, computed
    once before the first step (kept on the host: samples x seq_len x vocab fp32, 151 MB for the
    default 16 x 48 on SmolLM2's 49k vocabulary), then ``measure`` costs one forward pass over the
    texts. Needs no data."""

    def __init__(self, base: LoadedModel, samples: int, seq_len: int, seed: int, batch_size: int, device: str):
        self.lm, self.device, self.batch_size = base, device, batch_size
        self.seqs = probe_texts(base, samples, seq_len, seed, device)
        ids, mask = pack_right(self.seqs, pad_id(base.tokenizer))
        self.ids, self.mask = ids, mask.long()
        self.base_lp = base_log_probs(base, self.ids, self.mask, batch_size, device)

    @torch.no_grad()
    def measure(self) -> float:
        """Mean over real positions of KL(p_base || p_model), the model as it is now (its training mode
        is restored afterwards)."""
        sums = counts = 0.0
        with eval_mode(self.lm.model):
            for i in range(0, len(self.ids), self.batch_size):
                ids, mask = self.ids[i:i + self.batch_size], self.mask[i:i + self.batch_size]
                lq = log_probs(self.lm, ids.to(self.device), mask.to(self.device)).cpu()
                s, c = kl_rows(self.base_lp[i:i + self.batch_size], lq, mask)
                sums, counts = sums + sum(s), counts + sum(c)
        return sums / max(counts, 1)
