"""The data-free drift: KL(p_base || p_model) of next-token distributions on text the base model
writes itself (sampled as `dowser probe` samples it). One definition, used by eval-forgetting's
drift column and by the live meter of `dowser finetune --drift-every`; on the same settings both
read the same texts, so the meter's value at step N is the report's drift of the snapshot at N.
Also the base's own generations that data-free replay trains on."""
from __future__ import annotations

from typing import Callable

import torch

from dowser_cli import probing
from dowser_cli.data import pack_right, pad_id
from dowser_cli.models import LoadedModel


def probe_texts(base: LoadedModel, samples: int, seq_len: int, seed: int, device: str) -> list[list[int]]:
    """``samples`` token sequences of at most ``seq_len`` (BOS + random prefix, continued by ``base``
    with the probe's sampling; text only). Deterministic in (model, samples, seq_len, seed)."""
    cfg = probing.ProbeConfig(samples=samples, seq_len=seq_len, seed=seed)
    ids = probing.token_ids(base)
    out: list[list[int]] = []
    was_training = base.model.training
    base.model.eval()
    try:
        for start in range(0, samples, cfg.gen_chunk()):
            n = min(cfg.gen_chunk(), samples - start)
            out += [s.tokens for s in probing.make_samples(base, cfg, ids, start, n, None, device)]
    finally:
        base.model.train(was_training)
    return out


def kl_rows(lp: torch.Tensor, lq: torch.Tensor, mask: torch.Tensor) -> tuple[list[float], list[int]]:
    """Per row: sum over real positions of KL(p || q) = sum_v p (log p - log q), and the count of those
    positions. lp, lq: log-probabilities [n, T, V]; mask [n, T] (1 = real position)."""
    kl = (lp.exp() * (lp - lq)).sum(-1) * mask
    return kl.sum(-1).cpu().tolist(), mask.sum(-1).cpu().long().tolist()


@torch.no_grad()
def log_probs(lm: LoadedModel, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log-softmax of the model's next-token logits, fp32 [n, T, V]."""
    return torch.log_softmax(lm.model(input_ids=ids, attention_mask=mask).logits.float(), -1)


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
        self.batches = []
        was_training = base.model.training
        base.model.eval()
        for i in range(0, len(self.seqs), batch_size):
            ids, mask = pack_right(self.seqs[i:i + batch_size], pad_id(base.tokenizer))
            mask = mask.long()
            self.batches.append((ids, mask, log_probs(base, ids.to(device), mask.to(device)).cpu()))
        base.model.train(was_training)

    @torch.no_grad()
    def measure(self) -> float:
        """Mean over real positions of KL(p_base || p_model), the model as it is now (its training mode
        is restored afterwards)."""
        model = self.lm.model
        was_training = model.training
        model.eval()
        try:
            sums = counts = 0.0
            for ids, mask, lp in self.batches:
                lq = log_probs(self.lm, ids.to(self.device), mask.to(self.device)).cpu()
                s, c = kl_rows(lp, lq, mask)
                sums, counts = sums + sum(s), counts + sum(c)
        finally:
            model.train(was_training)
        return sums / max(counts, 1)
