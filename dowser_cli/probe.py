"""`dowser probe`: data-free importance factors (DESIGN section 1).

Per batch of B self-generated samples: one forward pass, then M Rademacher probes, each one backward
pass of s = sum_b xi_b . f_b / B (f = last-position logits). Hooks keep, per scored linear, only
a = mean |h| over real positions (one per batch) and psi = mean |ds/dz| (one per probe)."""
from __future__ import annotations

import dataclasses
import gc
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dowser_cli import artifacts, distributed, scoring
from dowser_cli.data import pack_right
from dowser_cli.errors import Interrupted, UserError
from dowser_cli.models import (LoadedModel, ModelSource, input_device, load_config, load_model, num_decoder_layers,
                               resolve_source)
from dowser_cli.models.registry import adapter_for_config
from dowser_cli.probing import (ProbeConfig, Sample, TokenIds, collate_images, make_samples, read_texts, sample_seed,
                                sequence_kwargs, token_ids, use_batched_probes, validate)
from dowser_cli.progress import progress_bar, stderr_console
from dowser_cli.resources import peak_memory
from dowser_cli.runtime import StopRequests, resolve_device, resolve_dtype
from dowser_cli.selection import decoder_linears, layer_of, parse_layers, parse_targets


# ---- probe text ----------------------------------------------------------------------------------------


# ---- hooks -------------------------------------------------------------------------------------------

def _home(mod: nn.Module, fallback: str | torch.device = "cpu") -> torch.device:
    """Where a module's factor buffers live: beside its weight (under --device-map the modules span
    devices), or ``fallback`` while the weight is still on the meta device."""
    dev = mod.weight.device
    return dev if dev.type != "meta" else torch.device(fallback)


class _Tap(torch.autograd.Function):
    """Identity on z whose backward also returns, as the gradient of a dummy ``sink`` [out], the
    position-weighted mean |ds/dz| (psi). Asking autograd for d s / d sink therefore yields psi
    directly, for all M probes in one vmapped backward pass (is_grads_batched)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(z, sink, weights):
        return z.view_as(z)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[2])

    @staticmethod
    def backward(ctx, g):
        (weights,) = ctx.saved_tensors
        return g, scoring.weighted_abs_mean(g, weights), None


class _TapInto(torch.autograd.Function):
    """As _Tap, for one probe at a time: psi is written straight into the hooks' preallocated buffer
    row of the current probe (no small tensors born during backward that would fragment the heap)."""

    @staticmethod
    def forward(ctx, z, sink, weights, hooks, name):
        ctx.save_for_backward(weights)
        ctx.hooks, ctx.name = hooks, name
        return z.view_as(z)

    @staticmethod
    def backward(ctx, g):
        (weights,) = ctx.saved_tensors
        h = ctx.hooks
        scoring.weighted_abs_mean(g, weights, out=h.psi[ctx.name][h.probe])
        h.reached.add(ctx.name)
        return g, None, None, None, None


class FactorHooks:
    """Forward pre-hooks record a = mean|h| over real positions into a buffer allocated once per
    module (small tensors allocated between the large transient ones of every pass would fragment the
    host heap); forward hooks route each scored z through a tap whose backward computes
    psi = mean|ds/dz| (into a buffer per probe, or, vmapped, as the gradient of the module's sink).
    Nothing O(W) is kept."""

    def __init__(self, modules: dict[str, nn.Linear], act_one: set[str], psi_one: set[str],
                 token_modules: set[str], act_sources: dict[str, nn.Module] | None = None,
                 device: str | torch.device = "cpu", probes: int = 1):
        self.modules, self.act_one, self.psi_one, self.token_modules = modules, act_one, psi_one, token_modules
        # name -> module whose OUTPUT is this module's full input (lm_head sees only kept positions)
        self.act_sources = act_sources or {}
        self.mask: torch.Tensor | None = None        # [B, T] real positions of the current batch
        # each module's buffers beside its weight (under --device-map the modules span devices)
        dev = {n: _home(m, device) for n, m in modules.items()}
        self.act = {n: torch.zeros(m.in_features, device=dev[n]) for n, m in modules.items() if n not in act_one}
        # sum of h^2 over the batch's real positions (Wanda's ||X_j||_2 over the probe's tokens)
        self.act_sq = {n: torch.zeros(m.in_features, device=dev[n]) for n, m in modules.items() if n not in act_one}
        self.sinks = {n: torch.zeros(m.out_features, device=dev[n], requires_grad=True)
                      for n, m in modules.items() if n not in psi_one}
        self.psi = {n: torch.zeros(probes, m.out_features, device=dev[n]) for n, m in modules.items()
                    if n not in psi_one}
        self.probe = 0                               # buffer row the current (unbatched) backward fills
        self.reached: set[str] = set()              # modules a probe's backward reached
        self.batched = False
        self.seen_act: set[str] = set()             # modules that saw input in this batch
        self.tapped: list[str] = []                  # modules whose sink is in this batch's graph
        self._weights: dict[tuple, torch.Tensor] = {}
        self.active = False                          # off while the model generates probe text
        self._handles = []

    def _mask_for(self, name: str, x: torch.Tensor) -> torch.Tensor | None:
        if name in self.token_modules and self.mask is not None and x.shape[:-1] == self.mask.shape:
            return self.mask
        return None

    def _position_weights(self, name: str, z: torch.Tensor) -> torch.Tensor:
        """[N] fp32 weights over z's flattened positions: 1/#real on real positions, 0 on padding."""
        mask = self._mask_for(name, z)
        key = (mask is not None, z.shape[:-1], z.device)
        if key not in self._weights:
            self._weights[key] = scoring.position_weights(mask, z.shape[:-1].numel(), z.device)
        return self._weights[key]

    def _record_act(self, name: str, x: torch.Tensor) -> None:
        w = self._position_weights(name, x)
        scoring.weighted_abs_mean(x.detach(), w, out=self.act[name])
        scoring.square_sum(x.detach(), w.gt(0).to(w.dtype), out=self.act_sq[name])
        self.seen_act.add(name)

    def _pre(self, name: str):
        def hook(mod, args):
            if self.active and name not in self.act_one and name not in self.act_sources:
                self._record_act(name, args[0])
        return hook

    def _post(self, name: str):
        def hook(mod, args, z):
            if not self.active or name in self.psi_one:
                return None
            self.tapped.append(name)
            w = self._position_weights(name, z)
            if self.batched:
                return _Tap.apply(z, self.sinks[name], w)
            return _TapInto.apply(z, self.sinks[name], w, self, name)
        return hook

    def _source(self, name: str):
        def hook(mod, args, out):
            if self.active:
                self._record_act(name, out)
        return hook

    def __enter__(self):
        for name, mod in self.modules.items():
            self._handles.append(mod.register_forward_pre_hook(self._pre(name)))
            self._handles.append(mod.register_forward_hook(self._post(name)))
        for name, src in self.act_sources.items():
            self._handles.append(src.register_forward_hook(self._source(name)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def new_batch(self, mask: torch.Tensor, batched: bool) -> None:
        self.mask, self.active, self._weights, self.batched = mask, True, {}, batched
        self.seen_act, self.tapped, self.reached = set(), [], set()

    def end_batch(self) -> None:
        self.mask, self.active, self._weights = None, False, {}

    def batch_factors(self, name: str, psi: dict[str, torch.Tensor],
                      probes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This batch's factors of one module, boundary rules applied: psi [M, out], act [in], and the
        sum of squared inputs act_sq [in]."""
        mod = self.modules[name]
        dev = _home(mod)
        if name in self.act_one:
            act = act_sq = torch.ones(mod.in_features, device=dev)
        elif name in self.seen_act:
            act, act_sq = self.act[name], self.act_sq[name]
        else:  # the module saw no input (e.g. projector without images)
            act = act_sq = torch.zeros(mod.in_features, device=dev)
        if name in self.psi_one:
            p = torch.ones(probes, mod.out_features, device=dev)
        else:  # no gradient reached z (module unused for this input): psi = 0
            p = psi.get(name)
            p = torch.zeros(probes, mod.out_features, device=dev) if p is None else p
        return p, act, act_sq


# ---- the run ---------------------------------------------------------------------------------------

@dataclass
class Plan:
    """Everything decided before weights are loaded (so bad input fails fast)."""

    cfg: ProbeConfig
    source: ModelSource
    config: Any
    layers: list[int]
    device: str
    dtype: torch.dtype
    texts: list[str] | None
    texts_sha256: str | None


def plan(model_spec: str, cfg: ProbeConfig, out: Path, random_init: bool = False) -> Plan:
    validate(cfg)
    artifacts.check_writable(out)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    texts = sha = None
    if cfg.texts:
        texts = read_texts(Path(cfg.texts), cfg.samples)
        sha = artifacts.sha256_file(Path(cfg.texts))
    source = resolve_source(model_spec, random_init=random_init)
    config = load_config(source)
    adapter_for_config(config)  # an unsupported architecture fails here, before any weights load
    layers = parse_layers(cfg.layers, num_decoder_layers(config))
    return Plan(cfg, source, config, layers, device, dtype, texts, sha)


def scored_modules(lm: LoadedModel, cfg: ProbeConfig, layers: list[int]) -> "Scored":
    """name -> linear, plus the boundary-rule sets: act == 1 (projector linears), psi == 1 (lm_head),
    the modules whose inputs are token positions (padding is excluded there), and act sources."""
    parts = lm.parts
    mods = decoder_linears(lm.model, parts.layers_path, layers, parse_targets(cfg.targets))
    token = set(mods)
    psi_one: set[str] = set()
    act_one: set[str] = set()
    if cfg.include_lm_head and parts.lm_head:
        head = lm.model.get_submodule(parts.lm_head)
        if isinstance(head, nn.Linear):
            mods[parts.lm_head] = head
            token.add(parts.lm_head)
            psi_one.add(parts.lm_head)
    if cfg.include_projector:
        if not parts.projector:
            raise UserError(f"--include-projector: {lm.adapter.name} model has no vision-language projector")
        for sub, mod in lm.model.get_submodule(parts.projector).named_modules():
            if isinstance(mod, nn.Linear):
                name = f"{parts.projector}.{sub}"
                mods[name] = mod
                # a = 1 on EVERY projector linear, as the authors' script (its boundary rule matches
                # the "proj." prefix, so the second linear's real input is not used either)
                act_one.add(name)
    if not mods:
        raise UserError("nothing to score: no linear layers match --layers/--targets")
    sources = {}
    if parts.lm_head in psi_one and parts.final_norm:
        # With logits_to_keep, lm_head sees only last positions; its input over all positions is the
        # final norm's output.
        sources[parts.lm_head] = lm.model.get_submodule(parts.final_norm)
        token.add(parts.lm_head)
    return Scored(mods, act_one, psi_one, token, sources)


@dataclass
class Scored:
    modules: dict[str, nn.Linear]
    act_one: set[str]
    psi_one: set[str]
    token: set[str]
    act_sources: dict[str, nn.Module]

    def hooks(self, device: str | torch.device = "cpu", probes: int = 1) -> FactorHooks:
        return FactorHooks(self.modules, self.act_one, self.psi_one, self.token, self.act_sources, device, probes)


class FactorStore:
    """Per-module factor matrices psi [P, out] and act [P, in], and act_sq [B, in] (each batch's sum of
    squared inputs, one row per batch of ``probes`` probes), fp32, kept beside each module's weight (on
    a GPU they stay on the device until the artifact is written: no host copy and no device sync per
    batch and module; the writer moves each tensor once)."""

    def __init__(self, modules: dict[str, nn.Linear], total: int, probes: int):
        self.probes = probes
        self.psi = {n: torch.zeros(total, m.out_features, device=_home(m)) for n, m in modules.items()}
        self.act = {n: torch.zeros(total, m.in_features, device=_home(m)) for n, m in modules.items()}
        self.act_sq = {n: torch.zeros(total // probes, m.in_features, device=_home(m)) for n, m in modules.items()}

    def tensors(self, rows: int | None = None) -> dict[str, torch.Tensor]:
        out = {}
        batches = None if rows is None else rows // self.probes
        for n in self.psi:
            out[f"{n}.psi"] = self.psi[n][:rows]
            out[f"{n}.act"] = self.act[n][:rows]
            out[f"{n}.act_sq"] = self.act_sq[n][:batches]
        return out

    def put(self, batch: int, hooks: FactorHooks, batch_psi: dict[str, torch.Tensor]) -> None:
        """Store batch ``batch``'s factors: psi and act as its ``probes`` rows, act_sq as its one row
        (copied: the hooks reuse their buffers)."""
        m = self.probes
        for name in self.psi:
            psi, act, act_sq = hooks.batch_factors(name, batch_psi, m)
            self.psi[name][batch * m: (batch + 1) * m].copy_(psi)
            self.act[name][batch * m: (batch + 1) * m].copy_(act)  # a is per batch: the same for its M probes
            self.act_sq[name][batch].copy_(act_sq)

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        for n in self.psi:
            p, a, q = tensors[f"{n}.psi"], tensors[f"{n}.act"], tensors[f"{n}.act_sq"]
            self.psi[n][: len(p)] = p
            self.act[n][: len(a)] = a
            self.act_sq[n][: len(q)] = q


def xi_generator(seed: int, batch: int) -> torch.Generator:
    """The Rademacher vectors of batch ``batch`` come from their own seeded CPU generator."""
    return torch.Generator().manual_seed(sample_seed(seed, batch, "xi"))


class BatchSource:
    """Probe batches in order, generating ``cfg.gen_chunk()`` samples per generate() call."""

    def __init__(self, lm: LoadedModel, cfg: ProbeConfig, ids: TokenIds, texts: list[str] | None, device: str):
        self.lm, self.cfg, self.ids, self.texts, self.device = lm, cfg, ids, texts, device
        self.sizes = cfg.batch_sizes()
        self._chunk: tuple[int, list[Sample]] | None = None

    def batch(self, b: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Batch ``b``: ids [n, T] right-padded, real-position mask [n, T], image kwargs."""
        start = sum(self.sizes[:b])
        chunk = self.cfg.gen_chunk()
        c0 = start // chunk * chunk
        if self._chunk is None or self._chunk[0] != c0:
            n = min(chunk, self.cfg.samples - c0)
            self._chunk = (c0, make_samples(self.lm, self.cfg, self.ids, c0, n, self.texts, self.device))
        samples = self._chunk[1][start - c0: start - c0 + self.sizes[b]]
        input_ids, mask = pack_right([s.tokens for s in samples], self.ids.pad)
        return input_ids, mask, collate_images(samples)


def probe_one(s, hooks: FactorHooks, b: int, cfg: ProbeConfig, device: str) -> tuple[float, float]:
    """Probe batch ``b`` of the session ``s`` (its own samples and Rademacher seeds) into the factor
    store. Returns (seconds building the batch, seconds probing it)."""
    tg = time.perf_counter()
    input_ids, mask, img_kwargs = s.batches.batch(b)
    tp = time.perf_counter()
    psi = probe_batch(s.lm, hooks, input_ids, mask, img_kwargs, xi_generator(cfg.seed, b), cfg.probes, device,
                      use_batched_probes(cfg, device))
    s.store.put(b, hooks, psi)
    return tp - tg, time.perf_counter() - tp


def probe_batch(lm: LoadedModel, hooks: FactorHooks, input_ids: torch.Tensor, mask: torch.Tensor,
                img_kwargs: dict, xi_gen: torch.Generator, probes: int, device: str,
                batched: bool = True) -> dict[str, torch.Tensor]:
    """One forward pass and the backward passes of ``probes`` Rademacher probes (one vmapped pass when
    ``batched``, else one each). Returns psi {name: [M, out]}; act stays in ``hooks``. Weights should be
    frozen (requires_grad False) so that the forward saves nothing for weight gradients."""
    hooks.new_batch(mask.to(device), batched)
    kwargs = {**img_kwargs, **sequence_kwargs(lm, input_ids, bool(img_kwargs))}
    last = mask.long().sum(1) - 1
    keep = torch.unique(last)  # sorted; only these positions go through lm_head
    if lm.parts.final_norm and accepts_logits_to_keep(lm.model):
        kwargs["logits_to_keep"] = keep
        col = torch.searchsorted(keep, last)
    else:
        col = last
    try:
        out = lm.model(input_ids=input_ids.to(device), attention_mask=mask.long().to(device),
                       **{k: v.to(device) for k, v in kwargs.items()}, use_cache=False)
        f = out.logits[torch.arange(len(last)), col.to(out.logits.device)]  # [B, V] last-position logits
        del out
        names = list(dict.fromkeys(hooks.tapped))
        if not names:
            return {}
        sinks = [hooks.sinks[n] for n in names]
        # d s / d f for s = xi . f / B, all probes stacked: [M, B, V]
        xi = torch.stack([scoring.rademacher(tuple(f.shape), xi_gen, f.device) for _ in range(probes)])
        cot = (xi / f.shape[0]).to(f.dtype)
        if batched:
            grads = torch.autograd.grad(f, sinks, grad_outputs=cot, is_grads_batched=True, allow_unused=True)
            return {n: g.float() for n, g in zip(names, grads) if g is not None}
        for p in range(probes):
            hooks.probe = p
            torch.autograd.grad(f, sinks, grad_outputs=cot[p], retain_graph=p + 1 < probes, allow_unused=True)
        # views of the hooks' buffers, on their device: the store copies them before the next batch
        return {n: hooks.psi[n][:probes] for n in names if n in hooks.reached}
    finally:
        hooks.end_batch()


def accepts_logits_to_keep(model: nn.Module) -> bool:
    import inspect

    return "logits_to_keep" in inspect.signature(type(model).forward).parameters


@dataclass
class Session:
    """A loaded model ready to probe, with the factor store (resumed or empty)."""

    plan: Plan
    lm: LoadedModel
    scored: Scored
    batches: BatchSource
    store: FactorStore
    fingerprint: str
    weights_digest: str
    done: int  # batches already in the store


def open_session(p: Plan, cfg: ProbeConfig, partial: Path, resume: bool) -> Session:
    lm = load_model(p.source, p.config, p.dtype, p.device, device_map=cfg.device_map or None)
    if cfg.device_map:  # inputs go where the embeddings are; accelerate's hooks move activations on
        p.device = str(input_device(lm.model))
    lm.model.requires_grad_(False)  # the graph then exists for activations only
    fingerprint = artifacts.model_fingerprint(lm.model)
    scored = scored_modules(lm, cfg, p.layers)
    store = FactorStore(scored.modules, cfg.total_probes, cfg.probes)
    done = _resume_from(partial, cfg, fingerprint, store) if resume else 0
    return Session(p, lm, scored, BatchSource(lm, cfg, token_ids(lm), p.texts, p.device), store, fingerprint,
                   artifacts.weights_digest(lm.model), done)


def probe_all(s: Session, cfg: ProbeConfig, partial: Path, label: str) -> dict[str, float]:
    """Run the remaining batches into the store; on Ctrl-C/SIGTERM save a resumable partial and raise
    Interrupted. Returns generate/probe seconds."""
    sizes, device = cfg.batch_sizes(), s.plan.device
    t_gen = t_probe = 0.0

    def save_partial(batches: int) -> None:
        meta = artifacts.base_metadata(artifacts.PARTIAL_KIND, s.fingerprint, batches_done=batches, config_digest=cfg.digest())
        artifacts.write_safetensors(partial, s.store.tensors(batches * cfg.probes), meta)

    try:
        with StopRequests(first="interrupt"), s.scored.hooks(device, cfg.probes) as hooks, \
                progress_bar(stderr_console()) as bar:
            task = bar.add_task(f"probing {label}", total=len(sizes), completed=s.done)
            for b in range(s.done, len(sizes)):
                dg, dp = probe_one(s, hooks, b, cfg, device)
                t_gen, t_probe = t_gen + dg, t_probe + dp
                bar.update(task, advance=1)
                s.done = b + 1
                if cfg.checkpoint_every and s.done % cfg.checkpoint_every == 0 and s.done < len(sizes):
                    save_partial(s.done)
    except KeyboardInterrupt:
        if s.done:
            save_partial(s.done)
            raise Interrupted(f"interrupted after {s.done}/{len(sizes)} batches; partial state in {partial}; "
                              f"rerun with --resume to continue") from None
        raise Interrupted("interrupted before the first batch finished; nothing written") from None
    return {"generate_s": round(t_gen, 3), "probe_s": round(t_probe, 3)}


def run(model_spec: str, out: Path, cfg: ProbeConfig, random_init: bool = False, resume: bool = False,
        command: str = "") -> dict[str, Any]:
    """Probe ``model_spec`` and write ``out`` (+ ``out``.yaml). Returns the sidecar dict."""

    t0 = time.perf_counter()
    with artifacts.output_lock(out, command), \
            distributed.session("", cfg.device, command="probe") as dist:  # None unless launched by torchrun & co.
        return _run(dist, t0, model_spec, out, cfg, random_init, resume, command)


def _run(dist, t0: float, model_spec: str, out: Path, cfg: ProbeConfig, random_init: bool, resume: bool,
         command: str) -> dict[str, Any]:
    p = plan(model_spec, cfg, out, random_init)
    if dist is not None:
        if cfg.device_map:
            raise UserError(f"--device-map {cfg.device_map}: one process spreads the model over the devices; "
                            f"run it without torchrun")
        p.device = dist.device
    partial = artifacts.partial_path(out)
    s = open_session(p, cfg, partial, resume)
    timings = {"load_s": round(time.perf_counter() - t0, 3)}
    if p.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    # under a launcher the ranks split the batches; afterwards every rank holds all factor rows
    timings.update(probe_all_ranks(dist, s, cfg, partial, model_spec) if dist else
                   probe_all(s, cfg, partial, model_spec))
    if dist is not None:
        ranks = distributed.all_gather_objects({"rank": dist.rank, "device": dist.device, **timings,
                                                "peak_memory": peak_memory(p.device)})
        if not dist.main:  # rank 0 writes the scores once
            return {}
    sidecar = _sidecar(p, s.lm, cfg, s.fingerprint, s.weights_digest, s.scored.modules, s.store, timings, command,
                       random_init, s.batches.ids)
    if dist is not None:
        sidecar["distributed"] = {"world_size": dist.world, "backend": dist.backend, "ranks": ranks}
    store, meta = s.store, artifacts.base_metadata(artifacts.SCORES_KIND, s.fingerprint, probes=cfg.total_probes,
                                                   config_digest=cfg.digest(), weights_digest=s.weights_digest)
    # Serialising copies the factors once more; drop the model first so that the write, not the
    # model, is what the host holds at that moment.
    del s
    gc.collect()
    artifacts.write_safetensors(out, store.tensors(), meta)
    timings["total_s"] = round(time.perf_counter() - t0, 3)
    sidecar["peak_memory"] = peak_memory(p.device)
    artifacts.write_yaml(artifacts.sidecar_path(out), sidecar)
    partial.unlink(missing_ok=True)
    _print_summary(stderr_console(), sidecar, out)
    return sidecar


def _resume_from(partial: Path, cfg: ProbeConfig, fingerprint: str, store: FactorStore) -> int:
    if not partial.exists():
        raise UserError(f"--resume: no partial run at {partial}")
    meta = artifacts.read_header(partial, artifacts.PARTIAL_KIND)
    if meta.get("model_fingerprint") != fingerprint:
        raise UserError(f"--resume: {partial} was probed on a different model (fingerprint mismatch)")
    if meta.get("config_digest") != cfg.digest():
        raise UserError(f"--resume: {partial} was made with different probe settings; rerun without --resume")
    store.load(artifacts.read_tensors(partial))
    return int(meta["batches_done"])


def sampling_record(cfg: ProbeConfig, ids: TokenIds) -> dict[str, Any]:
    """How the probe text was sampled, for scores.yaml: the settings and the exact ids involved."""
    return {"temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": cfg.top_k,
            "repetition_penalty": cfg.repetition_penalty, "suppress": cfg.suppress,
            "suppressed_ids": ids.suppressed(cfg.suppress),
            "prefix_replaced_ids": len(ids.special), "prefix_replaced_by": ids.bos}


def _sidecar(p: Plan, lm: LoadedModel, cfg: ProbeConfig, fingerprint: str, weights_digest: str, mods: dict, store: FactorStore,
             timings: dict, command: str, random_init: bool, ids: TokenIds) -> dict[str, Any]:
    modules = {}
    for name, mod in mods.items():
        psi, act = store.psi[name], store.act[name]
        modules[name] = {
            "type": name.rsplit(".", 1)[-1],
            "layer": layer_of(name, lm.parts.layers_path),
            "shape": [mod.out_features, mod.in_features],
            "psi_mean": float(psi.mean()), "act_mean": float(act.mean()),
            "score_mean": scoring.mean_score_scalar(mod.weight, psi, act),
        }
    return {
        **artifacts.sidecar_header(artifacts.SCORES_KIND, command),
        "config": dataclasses.asdict(cfg),
        "model": {"spec": p.source.spec, "source": p.source.kind, "location": p.source.location,
                  "revision": p.source.revision, "random_init": random_init, "adapter": lm.adapter.name,
                  "dtype": str(p.dtype).removeprefix("torch."), "device": p.device,
                  "num_layers": lm.parts.num_layers, "fingerprint": fingerprint, "weights_digest": weights_digest,
                  **({"device_map": _placement(lm.model)} if cfg.device_map else {})},
        "inputs": ({"texts": {"path": str(cfg.texts), "sha256": p.texts_sha256}} if cfg.texts else {}),
        "seed": cfg.seed, "probes": cfg.total_probes, "layers": p.layers,
        "sampling": sampling_record(cfg, ids) if cfg.texts is None else None,
        "timings": timings, "modules": modules,  # peak_memory is added once the artifact is written
    }


def _placement(model: nn.Module) -> dict[str, int]:
    """Device -> number of top-level placed modules (accelerate's hf_device_map)."""
    counts: dict[str, int] = {}
    for dev in getattr(model, "hf_device_map", {}).values():
        counts[str(dev)] = counts.get(str(dev), 0) + 1
    return counts


def _print_summary(console, sidecar: dict, out: Path) -> None:
    from rich.table import Table

    groups: dict[str, list[dict]] = {}
    for m in sidecar["modules"].values():
        groups.setdefault(m["type"], []).append(m)
    table = Table(title=f"{out}: {sidecar['probes']} probes, {len(sidecar['modules'])} modules")
    for col in ("module", "count", "mean psi", "mean act", "mean score"):
        table.add_column(col, justify="right" if col != "module" else "left")
    for typ, ms in groups.items():
        table.add_row(typ, str(len(ms)), *(f"{sum(m[k] for m in ms) / len(ms):.3e}"
                                           for k in ("psi_mean", "act_mean", "score_mean")))
    console.print(table)
    console.print(f"[dim]total {sidecar['timings']['total_s']:.1f} s "
                  f"(generate {sidecar['timings']['generate_s']:.1f} s, probe {sidecar['timings']['probe_s']:.1f} s)[/dim]")


def probe_all_ranks(d, s: Session, cfg: ProbeConfig, partial: Path, label: str) -> dict[str, float]:
    """probe_all across the ranks of a launch (``d``, a distributed.Dist): rank r probes batches r, r + W, ... (each batch's samples and
    Rademacher vectors have their own seeds, so which rank runs it does not change its numbers). After
    each round of W batches the ranks agree on stop requests; factor rows are summed over ranks at
    partial saves and at the end, after which every rank holds all rows. Returns generate/probe seconds."""
    import torch.distributed as tdist

    device, n = s.plan.device, len(cfg.batch_sizes())
    t_gen = t_probe = 0.0
    reduced = s.done  # rows of batches < reduced are complete on every rank (a resumed partial is)

    def sync(upto: int) -> None:
        nonlocal reduced
        distributed.reduce_rows(d, s.store, reduced * cfg.probes, upto * cfg.probes)
        reduced = upto

    def save_partial(batches: int) -> None:
        sync(batches)
        if d.main:
            meta = artifacts.base_metadata(artifacts.PARTIAL_KIND, s.fingerprint, batches_done=batches,
                                           config_digest=cfg.digest())
            artifacts.write_safetensors(partial, s.store.tensors(batches * cfg.probes), meta)

    console = stderr_console(quiet=not d.main)
    with StopRequests("ignore") as stop, s.scored.hooks(device, cfg.probes) as hooks, progress_bar(console) as bar:
        task = bar.add_task(f"probing {label} ({d.world} ranks)", total=n, completed=s.done)
        for start in range(s.done, n, d.world):
            b = start + d.rank
            if b < n:
                dg, dp = probe_one(s, hooks, b, cfg, device)
                t_gen, t_probe = t_gen + dg, t_probe + dp
            before, s.done = s.done, min(start + d.world, n)
            bar.update(task, completed=s.done)
            flag = torch.tensor([float(stop.requested)], device=d.device)
            tdist.all_reduce(flag)
            if flag.item() > 0 and s.done < n:
                save_partial(s.done)
                raise Interrupted(f"interrupted after {s.done}/{n} batches; partial state in {partial}; "
                                  f"rerun with --resume to continue")
            ce = cfg.checkpoint_every
            if ce and s.done // ce > before // ce and s.done < n:
                save_partial(s.done)
    sync(n)
    return {"generate_s": round(t_gen, 3), "probe_s": round(t_probe, 3)}
