"""`dowser finetune`: sparse fine-tuning that never moves a frozen weight (DESIGN sections 1 and 2).

setup (config, model, what trains, data) -> train (masked AdamW, checkpoints, Ctrl-C) -> save
(`delta.safetensors` with only the trainable values, `run.yaml`, the mask used).

A run directory holds: ``delta.safetensors`` + ``run.yaml`` (the product), ``mask.safetensors`` (+ .yaml)
when a mask was used, and ``checkpoint/`` while a run is unfinished (trainable values, optimiser state,
step), from which ``--resume`` continues bit for bit."""
from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dowser_cli import artifacts, data, distributed, drift, masking
from dowser_cli.artifacts.masks import open_mask
from dowser_cli.artifacts.runs import SNAPSHOT_KIND, open_run, run_outputs, snapshot_dir, snapshot_steps
from dowser_cli.artifacts.scores import open_scores
from dowser_cli.errors import Interrupted, UserError
from dowser_cli.methods.finetuning import FINETUNE_METHODS
from dowser_cli.models import (LoadedModel, ModelSource, ensure_tokenizer, load_config, load_model, meta_model,
                               num_decoder_layers, resolve_source)
from dowser_cli.models.registry import adapter_for_config, resolve_parts
from dowser_cli.optim import MaskedAdamW
from dowser_cli.progress import stderr_console
from dowser_cli.resources import host_peak_since_reset_mb, host_rss_mb, peak_memory, reset_host_peak
from dowser_cli.runtime import StopRequests, resolve_device, resolve_dtype
from dowser_cli.selection import default_layers, format_ranges, layer_of, parse_layers
from dowser_cli.trackers import open_tracker
from dowser_cli.training import (FinetuneConfig, LocalBackend, Schedule, Trainable, TrainState, apply_values,
                                 batch_loader, forward_keys,
                                 make_lr_lambda, make_schedule, param_groups, snapshot_due, train_step, validate,
                                 write_delta)


# ---- setup: what trains -----------------------------------------------------------------------------------

@dataclass
class MaskInput:
    """The mask as given: a mask artifact, or scores to build one from (``--mask scores --ratio``)."""

    path: Path
    kind: str                      # dowser.mask | dowser.scores
    meta: dict[str, str]
    layers: list[int] | None       # decoder layers the mask covers
    dtype: torch.dtype             # the model dtype the artifact's fingerprint was computed in


def open_mask_input(path: Path) -> MaskInput:
    meta = artifacts.read_header(path)
    kind = meta.get("dowser_kind")
    if kind == artifacts.MASK_KIND:
        mf = open_mask(path)
        side = artifacts.sidecar_path(path)
        layers = artifacts.read_yaml(side).get("layers") if side.exists() else None
        return MaskInput(path, kind, meta, layers, mf.dtype or torch.float32)
    if kind == artifacts.SCORES_KIND:
        sf = open_scores(path)
        return MaskInput(path, kind, meta, None, getattr(torch, sf.sidecar.get("model", {}).get("dtype", "float32")))
    raise UserError(f"--mask {path}: is a {kind} artifact, expected a mask or a scores file")


# ---- setup: the plan -------------------------------------------------------------------------------------

@dataclass
class Plan:
    cfg: FinetuneConfig
    source: ModelSource
    config: Any
    device: str
    dtype: torch.dtype
    layers: list[int]
    mask: MaskInput | None
    out: Path
    method: Any                    # methods.FinetuneMethod


def resolve_method(cfg: FinetuneConfig, mask_path: Path | None):
    """The registered method; with no --method, masked when there is a mask, else full-ft."""
    name = cfg.method or ("masked" if mask_path else "full-ft")
    method = FINETUNE_METHODS.get(name, "--method")
    if method.mask == "required" and mask_path is None:
        raise UserError(f"--method {name}: needs --mask (a mask from `dowser mask`, or scores with --ratio)")
    if method.mask == "forbidden" and mask_path is not None:
        raise UserError(f"--method {name}: takes no --mask (it decides itself which weights move)")
    observed = cfg.snapshot_every or cfg.snapshot_steps or cfg.max_drift
    if observed and not method.snapshots:
        raise UserError(f"--method {name}: keeps no snapshots (--snapshot-every, --snapshot-steps, --max-drift): "
                        f"its adapters become a delta only when they merge at the end")
    cfg.method = name  # the resolved name is what run.yaml and --resume see
    return method


def plan(model_spec: str, cfg: FinetuneConfig, out: Path, mask_path: Path | None, random_init: bool,
         resume: bool) -> Plan:
    """Everything checkable before weights load: options, output dir, model config, the mask's model."""
    validate(cfg)
    method = resolve_method(cfg, mask_path)
    _check_out(out, resume)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    source = resolve_source(model_spec, random_init=random_init)
    config = load_config(source)
    adapter = adapter_for_config(config)
    n_layers = num_decoder_layers(config)
    mask = open_mask_input(mask_path) if mask_path else None
    if mask is not None:
        meta = meta_model(source, config, mask.dtype)
        fp = artifacts.model_fingerprint(meta)
        if mask.meta.get("model_fingerprint") != fp:
            raise UserError(f"--mask {mask.path}: was made from a different model than {model_spec} "
                            f"(fingerprint {mask.meta.get('model_fingerprint', '?')[:12]} != {fp[:12]})")
        if mask.layers is None and mask.kind == artifacts.MASK_KIND:
            parts = resolve_parts(adapter, meta)
            mask.layers = sorted({layer_of(n, parts.layers_path) for n in artifacts.tensor_names(mask.path)} - {None})
        del meta
    spec = cfg.tune_layers or (_ranges_spec(mask.layers) if mask is not None and mask.layers else
                               default_layers(n_layers))
    layers = parse_layers(spec, n_layers, "--tune-layers")
    if mask is not None and mask.layers is not None and cfg.tune_layers and layers != list(mask.layers):
        raise UserError(f"--tune-layers {cfg.tune_layers}: the mask {mask.path} covers layers "
                        f"{_ranges_spec(mask.layers)}; tune exactly those or make a mask for these layers")
    return Plan(cfg, source, config, device, dtype, layers, mask, out, method)


def _ranges_spec(layers: list[int]) -> str:
    return format_ranges(sorted(layers))


def _check_out(out: Path, resume: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory")
    if resume:
        if not (out / "checkpoint" / "state.yaml").is_file():
            raise UserError(f"--resume: no checkpoint in {out} (nothing to resume)")
        return
    if (out / "run.yaml").exists() or (out / "checkpoint").exists():
        raise UserError(f"--out {out}: already holds a run; pass --resume to continue it or choose another --out")


def load_masks(p: Plan, lm: LoadedModel, command: str) -> dict[str, torch.Tensor]:
    """Dense bool masks by parameter name; a mask built from scores is written into the run dir."""
    mf = prepare_mask(p, lm, command)
    if mf is None:
        return {}
    return {name: mf.dense(name).to(lm.model.get_parameter(name).device) for name in mf.params}


def load_rank_masks(d: distributed.Dist, p: Plan, lm: LoadedModel, command: str) -> dict[str, torch.Tensor | None]:
    """Rank 0 puts the run's mask file in place (a copy, or built from scores); then every rank reads
    it: DDP the whole mask; FSDP only the names here, its rows once the model is sharded (shard_masks)."""
    if p.mask is None:
        return {}
    distributed.main_first(d, lambda: prepare_mask(p, lm, command))
    if not d.main and p.mask.kind == artifacts.SCORES_KIND:
        target = p.out / "mask.safetensors"
        p.mask = MaskInput(target, artifacts.MASK_KIND, artifacts.read_header(target), p.layers, p.mask.dtype)
    mf = open_mask(p.mask.path)
    if d.strategy == "fsdp":
        return dict.fromkeys(mf.params)
    return {name: mf.dense(name).to(d.device) for name in mf.params}


def prepare_mask(p: Plan, lm: LoadedModel, command: str):
    """Put the run's mask file in place (a copy, or built from scores) and check it; the opened MaskFile."""
    if p.mask is None:
        return None
    if p.mask.kind == artifacts.SCORES_KIND:
        scores = open_scores(p.mask.path)
        mcfg = masking.MaskConfig(ratio=p.cfg.ratio, layers=_ranges_spec(p.layers), targets=p.cfg.targets)
        strategy = masking.validate(mcfg)
        modules, layers = masking.select_modules(scores, lm, mcfg)
        packed, params = masking.build_masks(lm, scores, strategy, mcfg, modules, stderr_console())
        target = p.out / "mask.safetensors"
        masking.write_for(target, packed, params, mcfg, scores, lm, artifacts.weights_digest(lm.model), layers,
                           command)
        p.mask = MaskInput(target, artifacts.MASK_KIND, artifacts.read_header(target), layers, p.mask.dtype)
    elif p.mask.path.resolve() != (p.out / "mask.safetensors").resolve():
        artifacts.copy_with_sidecar(p.mask.path, p.out / "mask.safetensors")
    mf = open_mask(p.mask.path)
    digest = p.mask.meta.get("weights_digest")
    # the digest reads values in the dtype the mask was made in: comparable where the run loads that
    # dtype (a bf16 run from a mask probed in fp32 is checked by the fingerprint alone)
    if digest and artifacts.held_in(lm.model, p.mask.dtype) and digest != artifacts.weights_digest(lm.model):
        raise UserError(f"--mask {p.mask.path}: was made from different weights than {p.source.spec} "
                        f"(same architecture, weights digest differs)")
    return mf


# ---- the run ---------------------------------------------------------------------------------------------

def _progress(console):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=console)


def run(model_spec: str, data_path: Path, out: Path, cfg: FinetuneConfig, mask_path: Path | None = None,
        image_folder: Path | None = None, random_init: bool = False, resume: bool = False,
        command: str = "") -> dict[str, Any]:
    t0 = time.perf_counter()
    with artifacts.output_lock(out, command), \
            distributed.session(cfg.strategy, cfg.device) as dist:   # None when not launched by torchrun & co.
        return _run(dist, t0, model_spec, data_path, out, cfg, mask_path, image_folder, random_init, resume,
                    command)


def _run(dist: distributed.Dist | None, t0: float, model_spec: str, data_path: Path, out: Path, cfg: FinetuneConfig,
         mask_path: Path | None, image_folder: Path | None, random_init: bool, resume: bool,
         command: str) -> dict[str, Any]:
    p = plan(model_spec, cfg, out, mask_path, random_init, resume)
    if dist is not None and not p.method.distributed:
        raise UserError(f"--method {cfg.method}: runs in one process only, not under torchrun / accelerate "
                        f"launch (its per-step hooks and state are not sharded)")
    backend = dist or LocalBackend(p.device)
    p.device = backend.device
    lm = load_model(p.source, p.config, p.dtype, backend.load_device(p.device), empty=backend.empty)
    console = stderr_console(quiet=not backend.main)
    ensure_tokenizer(lm, console)
    ds = data.read_dataset(lm.tokenizer, lm.processor, data_path, image_folder, cfg.max_len, cfg.skip_bad, console,
                           lm.stop_ids())
    out.mkdir(parents=True, exist_ok=True)
    fingerprint = artifacts.model_fingerprint(lm.model)
    # (only rank 0 writes it; an empty rank has no values to digest)
    base_digest = "" if backend.empty else artifacts.weights_digest(lm.model)
    masks = load_rank_masks(dist, p, lm, command) if dist else load_masks(p, lm, command)
    method = p.method.make(lm, cfg)
    tr = method.trainable(p.layers, masks)
    meter = None
    if cfg.drift_every:
        if backend.strategy == "fsdp":
            raise UserError("--drift-every: not under --strategy fsdp (the meter runs the whole model on each "
                            "rank); use ddp or one process")
        # the base's distributions, before any update (and before --resume writes the checkpoint's values)
        console.print(f"drift meter: {cfg.drift_samples} probe texts of {cfg.drift_seq_len} tokens from the base")
        meter = drift.DriftMeter(lm, cfg.drift_samples, cfg.drift_seq_len, 0, cfg.batch_size, p.device)
    if cfg.gradient_checkpointing:   # on the layers themselves, before DDP / FSDP wrap them
        lm.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = backend.wrap(lm, tr, p.cfg, p.mask.path if p.mask else None)  # FSDP: tr now holds this rank's shards
    opt = MaskedAdamW(param_groups(tr, lm, cfg), masks={tr.params[n]: m for n, m in tr.masks.items()}, lr=cfg.lr,
                      betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps, weight_decay=cfg.weight_decay,
                      compact_grads=backend.compact_grads)
    state = load_checkpoint(out, tr, opt, cfg, fingerprint, method, backend) if resume else TrainState()
    sched = make_schedule(len(ds.examples), backend.global_cfg(cfg))
    ctx = SnapshotContext(p, lm, fingerprint, base_digest, method, backend, command)
    if cfg.max_drift and not resume:
        ctx.write(tr, TrainState(), drift=0.0)   # step 0 is the base: the budget's fallback
    if p.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    # the training steps' peak apart from loading's (under FSDP rank 0 holds the whole model while loading)
    load_peak_rss = host_peak_since_reset_mb()
    pre_train_rss = reset_host_peak()
    backend.start_rss_mb, backend.load_peak_rss_mb = pre_train_rss, load_peak_rss
    load_s = time.perf_counter() - t0
    _train(p, lm, ds, tr, opt, state, sched, fingerprint, console, method, backend, model, meter, ctx)
    if state.over_budget:
        _keep_last_under_budget(p, tr, state, console)
    timings = {"load_s": round(load_s, 3), "train_s": round(state.train_s, 3)}
    sidecar = _save(p, lm, ds, tr, opt, state, sched, fingerprint, base_digest, data_path, timings, t0, command,
                    method, pre_train_rss, backend, model)
    if backend.main:
        shutil.rmtree(out / "checkpoint", ignore_errors=True)
        _print_summary(console, sidecar, out)
    return sidecar


def _train(p: Plan, lm: LoadedModel, ds: data.Dataset, tr: Trainable, opt: MaskedAdamW, state: TrainState,
           sched: Schedule, fingerprint: str, console, method, backend: LocalBackend, model,
           meter: drift.DriftMeter | None = None, ctx: SnapshotContext | None = None) -> None:
    cfg = p.cfg
    lr_at = make_lr_lambda(sched, cfg)
    pad = data.pad_id(lm.tokenizer)
    lm.model.train()
    agreed = False  # all ranks decided to stop (so all of them join the checkpoint)
    logdir = Path(cfg.logging_dir) if cfg.logging_dir else p.out / "logs"
    tracker = open_tracker(cfg.report_to if backend.main else "none", logdir, dataclasses.asdict(cfg))
    try:
        # a launcher forwards the terminal's Ctrl-C to ranks that already got it: not a second Ctrl-C
        with StopRequests("abort", grace_s=backend.stop_grace_s, message="\ndowser: stopping after this step "
                          "(Ctrl-C again to abort without a checkpoint)") as stop, _progress(console) as bar:
            task = bar.add_task(f"finetune {p.source.spec}", total=sched.total_steps, completed=state.step, info="")
            batches = batch_loader(ds, sched, cfg, backend, state.step, pad, lm.processor, forward_keys(lm.model))
            while state.step < sched.total_steps:
                t = time.perf_counter()
                r = train_step(state.step, ds, sched, cfg, model, opt, lr_at, backend, p.dtype, pad, lm.processor,
                               lambda: stop.requested, method, batches)
                loss, tokens, seen, finite, stop_now = r.loss, r.tokens, r.seen, r.finite, r.stop
                if not finite:
                    _diverged(p, state, loss, sched)
                else:
                    state.in_a_row = 0
                dt = time.perf_counter() - t
                state.train_s += dt
                state.tokens += tokens
                extra = method.step_metrics() if method is not None else {}
                state.losses.append({"step": state.step + 1, "loss": round(loss, 6),
                                     "lr": float(f"{cfg.lr * lr_at(state.step):.6g}"), "tokens": tokens,
                                     "seconds": round(dt, 4), **{k: round(v, 6) for k, v in extra.items()},
                                     **({} if finite else {"skipped": True})})
                state.step += 1
                bar.update(task, advance=1, info=f"loss {loss:.4f}  {seen / dt:,.0f} tok/s")
                tracker.log(state.step, {**_step_metrics(r, cfg.lr * lr_at(state.step - 1), dt, p.device), **extra})
                measured = None
                if meter is not None and state.step % cfg.drift_every == 0:
                    measured = float(f"{meter.measure():.6g}")
                    state.drifts.append({"step": state.step, "drift": measured})
                    tracker.log(state.step, {"drift": measured})
                    bar.update(task, info=f"loss {loss:.4f}  drift {measured:.4g}")
                    if cfg.max_drift and measured > cfg.max_drift:
                        state.over_budget = state.step
                        break
                if ctx is not None and (snapshot_due(cfg, state.step) or (cfg.max_drift and measured is not None)):
                    ctx.write(tr, state, measured, loss)
                if stop_now and state.step < sched.total_steps:
                    agreed = True
                    raise KeyboardInterrupt
                if cfg.save_every and state.step % cfg.save_every == 0 and state.step < sched.total_steps:
                    save_checkpoint(p.out, tr, opt, state, cfg, fingerprint, method, backend)
    except KeyboardInterrupt:
        opt.zero_grad()  # a half-accumulated step is dropped; the checkpoint is at a step boundary
        if backend.world > 1 and not agreed:  # one rank aborted mid-step: the others cannot join a save
            err = Interrupted("aborted; no checkpoint written")
            err.together = False  # nor a last barrier: the launcher ends the others
            raise err from None
        if state.step:
            save_checkpoint(p.out, tr, opt, state, cfg, fingerprint, method, backend)
            raise Interrupted(f"interrupted at step {state.step}/{sched.total_steps}; checkpoint in "
                              f"{p.out / 'checkpoint'}; rerun with --resume to continue") from None
        raise Interrupted("interrupted before the first step finished; nothing to resume") from None
    finally:
        tracker.close()
        lm.model.eval()
        opt.remove_hooks()


class SnapshotContext:
    """Writes OUT/snapshots/step-N: the delta as it stands after step N (the layout of the run's own
    delta) and snapshot.yaml (what eval-forgetting needs to load it, the step's loss and drift)."""

    def __init__(self, p: Plan, lm: LoadedModel, fingerprint: str, base_digest: str, method, backend: LocalBackend,
                 command: str = ""):
        self.p, self.lm, self.fingerprint, self.base_digest = p, lm, fingerprint, base_digest
        self.method, self.backend, self.command = method, backend, command
        # the run's mask is in place before training starts: its sha256 once, not at every snapshot
        mask_file = p.out / "mask.safetensors" if p.mask is not None and backend.main else None
        self.mask_sha = artifacts.sha256_file(mask_file) if mask_file else None

    def write(self, tr: Trainable, state: TrainState, drift: float | None = None, loss: float | None = None) -> None:
        values = self.backend.trainable_values(tr)   # a collective under a launcher: every rank joins
        if not self.backend.main:
            return
        p, mask_sha = self.p, self.mask_sha
        with artifacts.replace_dir(snapshot_dir(p.out, state.step)) as d:
            write_delta(d / "delta.safetensors", tr, self.fingerprint, self.base_digest, mask_sha, values)
            artifacts.write_yaml(d / "snapshot.yaml", {
                **artifacts.sidecar_header(SNAPSHOT_KIND, self.command),
                "step": state.step, "loss": loss, "drift": drift,
                "method": self.method.label(p.mask.meta if p.mask is not None else None),
                "model": model_section(p, self.lm, self.fingerprint, self.base_digest),
                "outputs": run_outputs(d / "delta.safetensors", mask_sha)})


def model_section(p: Plan, lm: LoadedModel, fingerprint: str, base_digest: str) -> dict[str, Any]:
    """run.yaml's (and a snapshot's) ``model``: what a reader needs to rebuild the base."""
    return {"spec": p.source.spec, "random_init": p.source.random_init, "adapter": lm.adapter.name,
            "dtype": str(p.dtype).removeprefix("torch."), "device": p.device, "fingerprint": fingerprint,
            "weights_digest": base_digest, "layers_path": lm.parts.layers_path, "num_layers": lm.parts.num_layers}


def _keep_last_under_budget(p: Plan, tr: Trainable, state: TrainState, console) -> None:
    """--max-drift was passed at step state.over_budget: the trained values go back to the last
    snapshot whose drift was within the budget (step 0, the base, when none was)."""
    kept = max((s for s in snapshot_steps(p.out) if s < state.over_budget and
                (artifacts.read_yaml(snapshot_dir(p.out, s) / "snapshot.yaml").get("drift") or 0.0) <= p.cfg.max_drift),
               default=None)
    if kept is None:
        raise UserError(f"--max-drift {p.cfg.max_drift}: passed at step {state.over_budget} and no snapshot under "
                        f"the budget is left in {p.out / 'snapshots'}")
    run = open_run(p.out, kept)
    values = artifacts.read_tensors(run.delta)
    apply_values(tr.params, tr.masks, {n: values[n] for n in tr.params})
    state.kept_step = kept
    console.print(f"drift {state.drifts[-1]['drift']:.4g} > --max-drift {p.cfg.max_drift} at step "
                  f"{state.over_budget}: stopped; the run keeps step {kept}'s values")


def _step_metrics(r, lr: float, seconds: float, device: str) -> dict[str, float]:
    """What --report-to logs for one step."""
    out = {"loss": r.loss, "lr": lr, "tokens_per_s": r.seen / seconds, "assistant_tokens": float(r.tokens),
           "grad_norm": r.grad_norm, "host_rss_mb": host_rss_mb() or float("nan")}
    if device.startswith("cuda"):
        out["device_mb"] = torch.cuda.memory_allocated() / 2**20
        out["device_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def _diverged(p: Plan, state: TrainState, value: float, sched: Schedule) -> None:
    """Step state.step + 1 had a non-finite loss or gradient norm and made no update: under
    --nan-policy stop (or past --nan-max-skips in a row) end the run in one line, keeping the last
    checkpoint as it is; under skip-step count it and go on."""
    cfg, n = p.cfg, state.step + 1
    state.in_a_row += 1
    if cfg.nan_policy == "skip-step" and state.in_a_row <= cfg.nan_max_skips:
        state.skipped.append(n)
        return
    ckpt = p.out / "checkpoint" / "state.yaml"
    kept = (f"the last good checkpoint (step {artifacts.read_yaml(ckpt)['step']}) is kept in {ckpt.parent}"
            if ckpt.is_file() else "no checkpoint was written")
    if p.out.is_dir() and not any(p.out.iterdir()):
        p.out.rmdir()  # nothing of this run to keep
    why = (f"{state.in_a_row} non-finite steps in a row (--nan-max-skips {cfg.nan_max_skips})"
           if cfg.nan_policy == "skip-step" else f"a non-finite loss or gradient norm ({value})")
    raise UserError(f"step {n}/{sched.total_steps}: {why}; stopped without an update or a delta; {kept} "
                    f"(lower --lr, or --nan-policy skip-step)")


def _save(p: Plan, lm: LoadedModel, ds: data.Dataset, tr: Trainable, opt: MaskedAdamW, state: TrainState,
          sched: Schedule, fingerprint: str, base_digest: str, data_path: Path, timings: dict, t0: float,
          command: str, method, pre_train_rss: float | None, backend: LocalBackend, model) -> dict[str, Any]:
    # the collectives first, on every rank; then rank 0 writes. A method's finish (PEFT: merge the
    # adapters) gives the delta's tensors; the counts are of what trained
    finished = method.finish(tr, p.out)
    values = backend.trainable_values(finished)
    counts, ranks = backend.counts(tr), backend.rank_report(model, opt)
    if not backend.main:
        return {}
    mask_file = p.out / "mask.safetensors" if p.mask is not None else None
    mask_sha = artifacts.sha256_file(mask_file) if mask_file else None
    delta = p.out / "delta.safetensors"
    write_delta(delta, finished, fingerprint, base_digest, mask_sha, values)
    full_bytes = sum(q.numel() * q.element_size() for q in lm.model.parameters())
    timings["total_s"] = round(time.perf_counter() - t0, 3)
    sidecar = {
        **artifacts.sidecar_header("dowser.run", command),
        "config": dataclasses.asdict(p.cfg),
        "method": method.label(p.mask.meta if p.mask is not None else None),
        "method_details": method.describe(),
        "model": model_section(p, lm, fingerprint, base_digest),
        "inputs": {"data": {"path": str(data_path), "sha256": artifacts.sha256_file(data_path)},
                   **({"mask": {"path": str(p.mask.path), "sha256": mask_sha}} if mask_file else {})},
        "outputs": run_outputs(delta, mask_sha, full_bytes),
        "tuned_layers": p.layers,
        "trainable": counts,
        "optimizer": {"name": "masked-adamw", "state_bytes": backend.optimizer_state_bytes(opt, ranks),
                      "method_state_bytes": method.state_bytes()},
        "data": {"records": ds.total, "format": ds.format, "used": len(ds.examples), "skipped": len(ds.skipped),
                 "images": sum(e.image is not None for e in ds.examples),
                 "skipped_records": ds.skipped[:100]},
        "schedule": dataclasses.asdict(sched),
        "steps": state.step, "tokens": state.tokens,
        "nonfinite": {"policy": p.cfg.nan_policy, "skipped_steps": state.skipped, "count": len(state.skipped)},
        "mean_step_s": round(state.train_s / max(state.step, 1), 4),
        "loss_curve": state.losses,
        **({"drift_curve": state.drifts} if state.drifts else {}),
        **({"snapshots": kept} if (kept := snapshot_steps(p.out)) else {}),
        **({"max_drift": {"budget": p.cfg.max_drift, "passed_at_step": state.over_budget,
                          "kept_step": state.kept_step}} if state.over_budget else {}),
        "timings": timings,
        # train_rss_mb: this process's peak RSS while training (the process-wide peak includes loading)
        "peak_memory": {**peak_memory(p.device), "train_rss_mb": host_peak_since_reset_mb(),
                        "pre_train_rss_mb": pre_train_rss},
    }
    if (section := backend.describe(p.cfg, ranks)) is not None:
        sidecar["distributed"] = section
    artifacts.write_yaml(p.out / "run.yaml", sidecar)
    return sidecar


def _print_summary(console, sidecar: dict, out: Path) -> None:
    c = sidecar["trainable"]
    losses = sidecar["loss_curve"]
    first, last = (losses[0]["loss"], losses[-1]["loss"]) if losses else (float("nan"),) * 2
    console.print(f"{out}: {sidecar['method']}, {sidecar['steps']} steps, loss {first:.4f} -> {last:.4f}; "
                  f"{c['trainable_entries']:,} trainable entries in {c['params']} tensors; delta "
                  f"{sidecar['outputs']['delta']['bytes'] / 2**20:.1f} MiB (full checkpoint "
                  f"{sidecar['outputs']['full_checkpoint_bytes'] / 2**20:.1f} MiB); optimiser state "
                  f"{sidecar['optimizer']['state_bytes'] / 2**20:.1f} MiB")


def save_checkpoint(run_dir: Path, tr: Trainable, opt: MaskedAdamW, state: TrainState, cfg: FinetuneConfig,
                    fingerprint: str, method, backend: LocalBackend) -> None:
    tensors = backend.checkpoint_tensors(tr, opt)  # under a launcher every rank joins the gather
    if not backend.main:  # rank 0 writes the same layout as one process
        return
    if method is not None:  # (methods with state of their own run in one process only: see plan)
        tensors.update({f"method/{k}": v.cpu() for k, v in method.state().items()})
    meta = artifacts.base_metadata(artifacts.CHECKPOINT_KIND, fingerprint, step=state.step,
                                   training_digest=cfg.training_digest())
    # the new checkpoint is built beside the old one and replaces it whole: a failed write (a full
    # disk) leaves the previous checkpoint as it was
    with artifacts.replace_dir(run_dir / "checkpoint") as ckpt:
        artifacts.write_safetensors(ckpt / "state.safetensors", tensors, meta)
        artifacts.write_yaml(ckpt / "state.yaml", {"step": state.step, "training_digest": cfg.training_digest(),
                                                    "state_sha256": artifacts.sha256_file(ckpt / "state.safetensors"),
                                                    "train_s": state.train_s, "tokens": state.tokens,
                                                    "losses": state.losses, "skipped": state.skipped,
                                                    "drifts": state.drifts})


def load_checkpoint(run_dir: Path, tr: Trainable, opt: MaskedAdamW, cfg: FinetuneConfig,
                    fingerprint: str, method, backend: LocalBackend) -> TrainState:
    ckpt = run_dir / "checkpoint"
    side = artifacts.read_yaml(ckpt / "state.yaml")
    path = ckpt / "state.safetensors"
    # verified before anything reads it: a truncated or altered file is refused whole
    if not path.is_file():
        raise UserError(f"--resume: {path} is missing (state.yaml names it)")
    if side.get("state_sha256") != artifacts.sha256_file(path):
        raise UserError(f"--resume: {path} does not match the sha256 in its state.yaml (truncated or altered); "
                        f"nothing was resumed")
    meta = artifacts.read_header(path, artifacts.CHECKPOINT_KIND)
    if meta.get("model_fingerprint") != fingerprint:
        raise UserError(f"--resume: {path} is from a different model (fingerprint mismatch)")
    if side.get("training_digest") != cfg.training_digest() or meta.get("training_digest") != cfg.training_digest():
        raise UserError(f"--resume: {run_dir} was trained with different settings; resume with the same options "
                        f"(see {run_dir / 'checkpoint' / 'state.yaml'} and the run's config) or start a new --out")
    backend.load_checkpoint(path, tr, opt, int(side["step"]), method)
    return TrainState(int(side["step"]), list(side.get("losses") or []), float(side.get("train_s", 0.0)),
                      int(side.get("tokens", 0)), list(side.get("skipped") or []),
                      drifts=list(side.get("drifts") or []))
