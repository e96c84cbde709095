"""`dowser merge`: the paper's post-hoc baselines (DARE, Model Tailor, Grafting) applied to a fine-tuned run.

setup (config, source run, base model, calibration data) -> the method edits the delta of the tuned
decoder layers' linear weights (`dowser_cli.methods.merges`, math in `dowser_cli.merging`) -> save a run
directory exactly like finetune's (dense `delta.safetensors` of every tensor the source run trained +
`run.yaml`), so `export`, `eval-forgetting` and `inspect` read it unchanged. The directory is built
beside OUT and renamed into place: OUT is either complete or absent.

Tensors that are not targeted decoder linears (norms, biases, a trained projector) keep the source
run's delta unchanged."""
from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from dowser_cli import artifacts, data, merging
from dowser_cli.config import option
from dowser_cli.errors import UserError
from dowser_cli.artifacts.runs import RunDir, open_run, run_outputs
from dowser_cli.models.runs import apply_delta
from dowser_cli.training import LossHead, to_device
from dowser_cli.methods import MERGE_METHODS, MergeMethod
from dowser_cli.models import LoadedModel, ensure_tokenizer, load_config, load_model, resolve_source
from dowser_cli.runtime import resolve_device, step_seed
from dowser_cli.progress import progress_bar, stderr_console
from dowser_cli.resources import peak_memory
from dowser_cli.selection import TARGETS, layer_of


@dataclass
class MergeConfig:
    method: str = option("dare", "dare | tailor | graft.")
    p: float = option(0.9, "DARE: drop probability of each delta entry.")
    keep: float = option(0.1, "Tailor: fraction of each 128-column block that keeps its change.")
    block: int = option(128, "Tailor: columns per block (selection and lazy compensation).")
    compensation: str = option("official", "Tailor: official (the authors' += update) | sparsegpt (the textbook -=).")
    magnitude_weight: float = option(0.8, "Tailor: score = w z(|delta|) + (1 - w) z(W^2 / U_jj^2).")
    damp: float = option(0.01, "Tailor: Hessian damping, fraction of mean diag.")
    calib_samples: int = option(128, "Tailor: calibration examples from --data.")
    budget: float = option(0.1, "Graft: base region, fraction of all tuned entries together.")
    steps: int = option(100, "Graft: SGD steps on the relaxed mask.")
    lr: float = option(1e7, "Graft: SGD learning rate of the mask logits (the authors' 1e7).")
    grad_accum: int = option(1, "Graft: batches averaged per step.")
    sigmoid_bias: float = option(10.0, "Graft: bias inside the relaxation's sigmoid, frac = base + (1 - 2 base) "
                                 "sigmoid(S - bias).")
    binarise: str = option("round", "Graft: round (the authors') | topk (exactly the budget).")
    batch_size: int = option(4, "Examples per forward pass (calibration, grafting steps).")
    max_len: int = option(2048, "Longest record in tokens.")
    seed: int = option(0, "Seed of DARE's drops, the calibration subset, graft batches.")
    device: str = option("auto", "auto | cpu | cuda | cuda:N; the dtype is the run's.")


def validate(cfg: MergeConfig) -> MergeMethod:
    method = MERGE_METHODS.get(cfg.method, "--method")
    checks = [
        (0 <= cfg.p < 1, f"--p {cfg.p}: must be in [0, 1)"),
        (0 < cfg.keep <= 1, f"--keep {cfg.keep}: must be in (0, 1]"),
        (cfg.block >= 1, f"--block {cfg.block}: must be >= 1"),
        (cfg.compensation in merging.COMPENSATION_SIGNS,
         f"--compensation {cfg.compensation!r}: expected one of {', '.join(merging.COMPENSATION_SIGNS)}"),
        (0 < cfg.budget <= 1, f"--budget {cfg.budget}: must be in (0, 1]"),
        (cfg.steps >= 0, f"--steps {cfg.steps}: must be >= 0"),
        (cfg.lr > 0, f"--lr {cfg.lr}: must be > 0"),
        (cfg.grad_accum >= 1, f"--grad-accum {cfg.grad_accum}: must be >= 1"),
        (cfg.binarise in ("round", "topk"), f"--binarise {cfg.binarise!r}: expected round or topk"),
        (cfg.calib_samples >= 1, f"--calib-samples {cfg.calib_samples}: must be >= 1"),
        (cfg.batch_size >= 1, f"--batch-size {cfg.batch_size}: must be >= 1"),
        (cfg.damp > 0, f"--damp {cfg.damp}: must be > 0"),
        (0 <= cfg.magnitude_weight <= 1, f"magnitude_weight {cfg.magnitude_weight}: must be in [0, 1]"),
        (cfg.max_len >= 8, f"--max-len {cfg.max_len}: must be >= 8"),
    ]
    for ok, msg in checks:
        if not ok:
            raise UserError(msg)
    return method


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out}: already exists and is not an empty directory; choose another --out")


# ---- the context a method works in ------------------------------------------------------------------------

@dataclass
class MergeContext:
    """Base and fine-tuned values of every tensor the run trained (on the model's device), the
    targeted decoder linears, and the model (holding the fine-tuned values) for calibration/loss."""

    cfg: MergeConfig
    lm: LoadedModel
    run: RunDir
    base: dict[str, torch.Tensor]
    tuned: dict[str, torch.Tensor]
    targets: list[str]              # tuned decoder layers' 2-D linear weights, name order
    layer_tensors: list[str]        # every trained tensor inside the decoder layers, name order
    dataset: data.Dataset | None
    device: str
    console: Any

    def delta(self, name: str) -> torch.Tensor:
        """tuned - base, float32 [shape]."""
        return self.tuned[name].float() - self.base[name].float()

    def each(self, items: list, label: str) -> Iterable:
        with progress_bar(self.console) as bar:
            task = bar.add_task(label, total=len(items))
            for x in items:
                yield x
                bar.advance(task)

    def _batches(self, indices: list[int]) -> Iterable[dict[str, torch.Tensor]]:
        ds, lm = self.dataset, self.lm
        for i in range(0, len(indices), self.cfg.batch_size):
            chunk = [ds.examples[j] for j in indices[i:i + self.cfg.batch_size]]
            yield to_device(data.collate(chunk, data.pad_id(lm.tokenizer), lm.processor), self.device,
                            next(lm.model.parameters()).dtype)

    def calibration_indices(self) -> list[int]:
        """--calib-samples examples of --data, a subset seeded by --seed."""
        n_ex = len(self.dataset.examples)
        order = torch.randperm(n_ex, generator=torch.Generator().manual_seed(self.cfg.seed)).tolist()
        return order[:min(self.cfg.calib_samples, n_ex)]

    def layerwise(self, on_layer: Callable[[list[str], dict[str, tuple[torch.Tensor, int]]], None]) -> int:
        """Model Tailor's calibration flow (the authors' main_model_tailor.py): the calibration examples
        go through the FINE-TUNED model up to the first tuned layer once (its inputs are kept); then,
        layer by layer, the inputs X of that layer's targets are gathered from the layer as it stands
        (X^T X [in, in] fp32 and the count of real, non-padding positions per target), ``on_layer(names,
        grams)`` tailors them (writing the new weights into the model), and the TAILORED layer's
        outputs become the next layer's inputs. Returns the calibration positions per target."""
        lm = self.lm
        stack = lm.model.get_submodule(lm.parts.layers_path)
        by_layer: dict[int, list[str]] = {}
        for n in self.targets:
            by_layer.setdefault(layer_of(n, lm.parts.layers_path), []).append(n)
        first, last = min(by_layer), max(by_layer)
        chosen = self.calibration_indices()
        captured: list[list] = []    # per batch: [hidden, args after it, kwargs, real-position mask]

        def grab(module, args, kwargs):
            captured.append([args[0].detach(), args[1:], dict(kwargs)])
            raise _ReachedLayer

        loss_head = LossHead(lm)
        handle = stack[first].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            with torch.no_grad():
                for batch in self._batches(chosen):
                    try:
                        loss_head(batch)
                    except _ReachedLayer:
                        pass
                    captured[-1].append(batch["attention_mask"].bool())
        finally:
            handle.remove()
        positions = 0
        with torch.no_grad(), progress_bar(self.console) as bar:
            task = bar.add_task(f"tailor: layers {first}-{last} ({len(chosen)} calibration examples)",
                                total=last - first + 1)
            for index in range(first, last + 1):
                layer, names = stack[index], by_layer.get(index, [])
                if names:
                    grams = self._layer_grams(layer, names, captured)
                    positions = max(positions, *(n for _, n in grams.values()))
                    on_layer(names, grams)
                for item in captured:
                    out = layer(item[0], *item[1], **item[2])
                    item[0] = out[0] if isinstance(out, (tuple, list)) else out
                bar.advance(task)
        return positions

    def _layer_grams(self, layer: torch.nn.Module, names: list[str], captured: list[list]
                     ) -> dict[str, tuple[torch.Tensor, int]]:
        """X^T X and position counts of ``names`` (targets inside ``layer``) over the captured batches,
        from one pass of the layer as it stands."""
        grams: dict[str, list] = {}
        state: dict[str, torch.Tensor] = {}

        def hook_for(name):
            def hook(module, args):
                x = args[0].detach()
                pos = state["mask"]
                # a module whose input is not [B, T, in] over the batch's tokens (none of the adapters'
                # decoder linears so far) is calibrated over all its rows rather than not at all
                rows = (x[pos] if pos.shape == x.shape[:-1] else x.reshape(-1, x.shape[-1])).float()
                g = grams.setdefault(name, [torch.zeros(x.shape[-1], x.shape[-1], device=x.device), 0])
                g[0].addmm_(rows.T, rows)
                g[1] += rows.shape[0]
            return hook

        handles = [self.lm.model.get_submodule(n.rsplit(".", 1)[0]).register_forward_pre_hook(hook_for(n))
                   for n in names]
        try:
            for item in captured:
                state["mask"] = item[3].to(item[0].device)
                layer(item[0], *item[1], **item[2])
        finally:
            for h in handles:
                h.remove()
        missing = [n for n in names if n not in grams]
        if missing:
            raise UserError(f"--data: {missing[0]} saw no calibration input ({len(missing)} such modules)")
        return {n: (g[0], g[1]) for n, g in grams.items()}

    def learn_region(self, names: list[str], base_region: dict[str, torch.Tensor],
                     logits: dict[str, torch.Tensor]) -> list[dict]:
        """Grafting's optimisation (the authors' graft_trainer.train_graft), in place on ``logits`` (S,
        float32 [shape] per tensor): each step sets theta = theta_0 + frac(S) * delta with
        frac = base + (1 - 2 base) sigmoid(S - bias), averages dL/dtheta over --grad-accum batches of
        --batch-size seeded random examples (mean token loss each, finetune's LossHead), and takes a
        plain SGD step S -= lr * dL/dtheta * delta * (1 - 2 base) * sigmoid'(S - bias). The other
        trained tensors keep their fine-tuned values throughout. Returns the loss curve."""
        cfg, lm = self.cfg, self.lm
        params = {n: lm.model.get_parameter(n) for n in names}
        lm.model.requires_grad_(False)
        for p in params.values():
            p.requires_grad_(True)
        loss_head, n_ex, curve = LossHead(lm), len(self.dataset.examples), []
        gen = torch.Generator().manual_seed(cfg.seed)
        lm.model.train()
        try:
            with progress_bar(self.console) as bar:
                task = bar.add_task("graft: learning the region", total=cfg.steps)
                for step in range(cfg.steps):
                    with torch.no_grad():
                        for n, p in params.items():
                            frac = merging.graft_frac(logits[n], base_region[n], cfg.sigmoid_bias)
                            p.copy_(self.base[n].float() + frac * self.delta(n))
                    total = 0.0
                    for micro in range(cfg.grad_accum):
                        idx = torch.randperm(n_ex, generator=gen)[:cfg.batch_size].tolist()
                        batch = next(iter(self._batches(idx)))
                        torch.manual_seed(step_seed(cfg.seed, step * cfg.grad_accum + micro))  # dropout, if any
                        n_tok = int((batch["labels"][:, 1:] != data.IGNORE).sum())
                        loss = loss_head(batch) / max(n_tok, 1)
                        loss.backward()
                        total += float(loss.detach())
                    grads = [p.grad for p in params.values() if p.grad is not None]
                    if not math.isfinite(total) or not all(bool(torch.isfinite(g).all()) for g in grads):
                        raise UserError(f"graft step {step + 1}/{cfg.steps}: a non-finite loss or gradient "
                                        f"({total}); stopped, nothing written (lower --lr)")
                    with torch.no_grad():
                        for n, p in params.items():
                            g = p.grad / cfg.grad_accum if p.grad is not None else torch.zeros_like(p)
                            logits[n] -= cfg.lr * merging.graft_grad(g, self.delta(n), logits[n], base_region[n],
                                                                     cfg.sigmoid_bias)
                            p.grad = None
                    curve.append({"step": step + 1, "loss": round(total / cfg.grad_accum, 6)})
                    bar.advance(task)
        finally:
            lm.model.eval()
            lm.model.requires_grad_(False)
            self.restore_tuned(params)
        return curve

    def restore_tuned(self, names: Iterable[str]) -> None:
        """Put the fine-tuned values back into the model's tensors ``names``."""
        with torch.no_grad():
            for n in names:
                self.lm.model.get_parameter(n).copy_(self.tuned[n])


class _ReachedLayer(Exception):
    """Raised by the hook that captures the first tuned layer's inputs: the rest of the pass is not needed."""


# ---- the stage ------------------------------------------------------------------------------------------

def targets_of(run: RunDir, lm: LoadedModel) -> list[str]:
    """The run's trained 2-D linear weights inside decoder layers (attention and MLP), name order."""
    path = lm.parts.layers_path
    return sorted(n for n, info in run.params.items()
                  if len(info["shape"]) == 2 and n.endswith(".weight") and layer_of(n, path) is not None
                  and any(t.search(n) for t in TARGETS.values()))


def layer_tensors_of(run: RunDir, lm: LoadedModel) -> list[str]:
    """Every tensor the run trained inside the decoder layers (linears, their biases, norms), name order:
    what Grafting localises (the authors graft every fine-tuned parameter; here the tuned layers, as a
    trained projector holds no pretrained knowledge in the embedded default)."""
    return sorted(n for n in run.params if layer_of(n, lm.parts.layers_path) is not None)


def setup(run_path: Path, cfg: MergeConfig, method: MergeMethod, data_path: Path | None,
          image_folder: Path | None) -> MergeContext:
    """Load the base model, keep the base values of the run's tensors, apply the run's delta, read the data."""
    run = open_run(run_path)
    if run.meta.get("weights_digest") is None:
        raise UserError(f"{run.delta}: no weights digest in its metadata (not a finetune run)")
    info = run.sidecar["model"]
    device = resolve_device(cfg.device)
    dtype = getattr(torch, info.get("dtype", "float32"))
    source = resolve_source(info["spec"], random_init=bool(info.get("random_init")))
    lm = load_model(source, load_config(source), dtype, device, tokenizer=method.needs_data)
    console = stderr_console()
    base = {n: lm.model.get_parameter(n).detach().clone() for n in run.params}
    apply_delta(lm, run)
    tuned = {n: lm.model.get_parameter(n).detach().clone() for n in run.params}
    ds = _read_data(lm, data_path, image_folder, cfg, console) if method.needs_data else None
    return MergeContext(cfg, lm, run, base, tuned, targets_of(run, lm), layer_tensors_of(run, lm), ds, device, console)


def _read_data(lm: LoadedModel, path: Path, image_folder: Path | None, cfg: MergeConfig, console) -> data.Dataset:
    ensure_tokenizer(lm, console)  # what finetune uses for a config-only model
    # finetune's reading and encoding (chat template, labels, images), so the merge sees the downstream
    # data exactly as training did
    return data.read_dataset(lm.tokenizer, lm.processor, path, image_folder, cfg.max_len, False, console,
                             lm.stop_ids())


def merged_values(ctx: MergeContext, patches: dict[str, merging.Patch]) -> dict[str, torch.Tensor]:
    """Every tensor the source run trained, dense, on the CPU: patched targets, others as fine-tuned."""
    out = {}
    for name in ctx.run.params:
        if name in patches:
            pt = patches[name]
            out[name] = merging.patch(ctx.base[name], ctx.tuned[name], pt.keep, pt.new_delta).cpu()
        else:
            out[name] = ctx.tuned[name].cpu()
    return out


def kept_counts(ctx: MergeContext, patches: dict[str, merging.Patch]) -> dict[str, Any]:
    """Entries that keep a fine-tuned change (possibly rescaled or compensated), overall and per tensor
    type (q_proj, ..., input_layernorm); untargeted tensors count whole."""
    by_type: dict[str, dict[str, int]] = {}
    for name, info in ctx.run.params.items():
        numel = math.prod(info["shape"])
        kept = int(patches[name].keep.sum()) if name in patches else numel
        typ = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else name
        row = by_type.setdefault(typ, {"tensors": 0, "numel": 0, "kept": 0, "merged": 0})
        row["tensors"] += 1
        row["numel"] += numel
        row["kept"] += kept
        row["merged"] += int(name in patches)
    for row in by_type.values():
        row["fraction"] = round(row["kept"] / max(row["numel"], 1), 6)
    numel = sum(r["numel"] for r in by_type.values())
    kept = sum(r["kept"] for r in by_type.values())
    target_numel = sum(int(patches[n].keep.numel()) for n in patches)
    target_kept = sum(int(patches[n].keep.sum()) for n in patches)
    return {"tensors": len(ctx.run.params), "merged_tensors": len(patches),
            "unchanged_tensors": len(ctx.run.params) - len(patches), "numel": numel, "kept": kept,
            "merged_numel": target_numel, "merged_kept": target_kept,
            "merged_fraction": round(target_kept / max(target_numel, 1), 6), "by_type": by_type}


def write_run(tmp: Path, ctx: MergeContext, values: dict[str, torch.Tensor], counts: dict, stats: dict,
              run_path: Path, data_path: Path | None, timings: dict, command: str) -> dict[str, Any]:
    """delta.safetensors (dense, unmasked, the base's fingerprint and digest) and run.yaml into ``tmp``."""
    run, cfg = ctx.run, ctx.cfg
    params = {n: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch."), "masked": False}
              for n, v in values.items()}
    meta = artifacts.base_metadata(artifacts.DELTA_KIND, run.meta["model_fingerprint"], weights_digest=run.meta["weights_digest"],
                                   mask_sha256="", params=json.dumps(params, sort_keys=True),
                                   merge_method=cfg.method)
    delta = tmp / "delta.safetensors"
    artifacts.write_safetensors(delta, values, meta)
    source_sha = artifacts.sha256_file(run.delta)
    inputs = {"source_delta": {"path": str(run.delta), "sha256": source_sha}}
    if data_path is not None and ctx.dataset is not None:
        inputs["data"] = {"path": str(data_path), "sha256": artifacts.sha256_file(data_path)}
    side = run.sidecar
    sidecar = {
        **artifacts.sidecar_header("dowser.run", command),
        "config": dataclasses.asdict(cfg),
        "method": cfg.method,
        "model": {**side["model"], "device": ctx.device},
        "merge": {"source_run": str(run_path), "source_method": side.get("method"),
                  "source_delta_sha256": source_sha,
                  "options": _method_options(cfg), "seed": cfg.seed, "kept": counts, **stats},
        "inputs": inputs,
        "outputs": run_outputs(delta),
        "tuned_layers": side.get("tuned_layers"),
        "trainable": {"params": len(values), "masked_params": 0, "numel": counts["numel"],
                      "trainable_entries": counts["kept"]},
        "steps": side.get("steps"),
        "timings": timings,
        "peak_memory": peak_memory(ctx.device),
    }
    artifacts.write_yaml(tmp / "run.yaml", sidecar)
    return sidecar


def _method_options(cfg: MergeConfig) -> dict[str, Any]:
    """The options that shape the chosen method's result."""
    per = {"dare": ("p",), "tailor": ("keep", "block", "compensation", "magnitude_weight", "damp", "calib_samples",
                                      "batch_size", "max_len"),
           "graft": ("budget", "steps", "lr", "grad_accum", "sigmoid_bias", "binarise", "batch_size", "max_len")}
    return {k: getattr(cfg, k) for k in per.get(cfg.method, ())}


def run(run_path: Path, out: Path, cfg: MergeConfig, data_path: Path | None = None,
        image_folder: Path | None = None, command: str = "") -> dict[str, Any]:
    with artifacts.output_lock(out, command):
        return _run(run_path, out, cfg, data_path, image_folder, command)


def _run(run_path: Path, out: Path, cfg: MergeConfig, data_path: Path | None, image_folder: Path | None,
         command: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    method = validate(cfg)
    _check_out(out)
    if method.needs_data and data_path is None:
        raise UserError(f"--data: required by --method {cfg.method} (downstream examples: "
                        f"{'calibration inputs' if cfg.method == 'tailor' else 'the loss the region is learnt on'})")
    ctx = setup(run_path, cfg, method, data_path, image_folder)
    if not ctx.targets:
        raise UserError(f"{run_path}: trained no decoder-layer linear weights; nothing for {cfg.method} to merge")
    if ctx.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    load_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    patches, stats = method.apply(ctx)
    merge_s = time.perf_counter() - t1
    values = merged_values(ctx, patches)
    counts = kept_counts(ctx, patches)
    timings = {"load_s": round(load_s, 3), "merge_s": round(merge_s, 3)}

    out.parent.mkdir(parents=True, exist_ok=True)
    with artifacts.atomic_dir(out) as tmp:
        timings["total_s"] = round(time.perf_counter() - t0, 3)
        sidecar = write_run(tmp, ctx, values, counts, stats, run_path, data_path, timings, command)
        _check_out(out)  # another process may have taken OUT meanwhile
    ctx.console.print(f"{out}: {cfg.method} of {run_path}; {counts['merged_kept']:,} of {counts['merged_numel']:,} "
                      f"entries kept in {counts['merged_tensors']} merged decoder-layer tensors "
                      f"({counts['merged_fraction']:.4f}); "
                      f"{counts['unchanged_tensors']} other tensors keep their delta")
    return sidecar
